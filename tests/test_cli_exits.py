"""How the command line ends when things go wrong outside it: a reader of stdout that left early
(`sidecar ... | head -1`), and a profile file that is empty or cut short."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import sidecar.drift
from sidecar.cli import EXIT_BROKEN_PIPE, main
from sidecar.drift import profile as profiles
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def profile_file(tmp_path: Path) -> Path:
    """A real profile, made as docs/drift.md says: `sidecar profile build`."""
    data = tmp_path / "train.csv"
    rows = (f"{i},{i % 7}.5,c{i % 3}" for i in range(200))
    data.write_text("a,b,c\n" + "\n".join(rows) + "\n")
    path = tmp_path / "profile.json"
    assert main(["profile", "build", str(data), "-o", str(path), "--quiet"]) == 0
    return path


def run_into_closed_pipe(*argv: str) -> subprocess.CompletedProcess[str]:
    """`python -m sidecar ARGV` with stdout a pipe whose reader is already gone."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run(
            [sys.executable, "-m", "sidecar", *argv],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(writer)


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["serve", "--help"],
        ["check-config", str(ROOT / "config" / "mlflow.yaml")],
        ["profile", "show", "PROFILE"],
    ],
)
def test_a_reader_that_left_early_ends_it_quietly(argv, profile_file):
    """`sidecar ... | head -1`: no BrokenPipeError traceback; 0, or 141 as after SIGPIPE."""
    result = run_into_closed_pipe(*(str(profile_file) if a == "PROFILE" else a for a in argv))
    assert result.stderr == ""
    assert result.returncode in (0, EXIT_BROKEN_PIPE)


def test_printing_into_a_closed_pipe_exits_141(profile_file):
    result = run_into_closed_pipe("profile", "show", str(profile_file))
    assert result.returncode == EXIT_BROKEN_PIPE == 141


def cut_in_half(path: Path) -> Path:
    text = path.read_bytes()
    half = path.with_name("half.json")
    half.write_bytes(text[: len(text) // 2])
    return half


@pytest.mark.parametrize("content", [b"", b" \n"])
def test_an_empty_profile_says_so(tmp_path, content, capsys):
    path = tmp_path / "empty.json"
    path.write_bytes(content)
    with pytest.raises(profiles.ProfileError, match=f"profile {path} is empty"):
        profiles.load(path)
    assert main(["profile", "show", str(path)]) == 2
    assert f"profile {path} is empty; make one with `sidecar profile build`" in (
        capsys.readouterr().err
    )


def test_a_truncated_profile_says_so(profile_file, capsys):
    half = cut_in_half(profile_file)
    assert main(["profile", "show", str(half)]) == 2
    assert (
        f"profile {half} is truncated or not a profile: its {half.stat().st_size} bytes end "
        "in the middle of the JSON document"
    ) in capsys.readouterr().err


def test_a_file_that_is_not_json_says_so(tmp_path):
    path = tmp_path / "notes.json"
    path.write_text("version: 1\n")
    with pytest.raises(profiles.ProfileError, match="is truncated or not a profile: JSON is"):
        profiles.load(path)


def test_serve_with_a_truncated_profile_exits_2_in_words(profile_file):
    """`sidecar serve --profile` with a cut file: exit 2 and one line, no traceback."""
    half = cut_in_half(profile_file)
    serve = ["serve", "--upstream", "http://127.0.0.1:1", "--port", "0", "--metrics-port", "0"]
    result = run_cli(*serve, "--profile", str(half))
    assert result.returncode == 2
    assert f"sidecar: configuration error: profile {half} is truncated" in result.stderr
    assert "Traceback" not in result.stderr


def test_profile_build_without_pyarrow_names_the_extra(tmp_path, monkeypatch, capsys):
    """pyarrow is the `profile` extra, out of the serving image: its absence is a sentence."""
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow: ModuleNotFoundError
    # Forget an earlier import of the builder, which `from sidecar.drift import build` finds
    # on the package as well as in sys.modules.
    monkeypatch.delitem(sys.modules, "sidecar.drift.build", raising=False)
    monkeypatch.delattr(sidecar.drift, "build", raising=False)
    data = tmp_path / "train.csv"
    data.write_text("a,b\n1,2\n")
    assert main(["profile", "build", str(data), "-o", str(tmp_path / "p.json")]) == 2
    assert "pip install 'sidecar[profile]'" in capsys.readouterr().err
