"""The examples in README.md and docs/*.md work as shown.

YAML: every ```yaml block is a sidecar config and must pass `sidecar check-config`. A block
without `upstream` is a fragment showing a few keys: it is checked with SIDECAR_UPSTREAM set, so
it must still load once an upstream is given. A block that is not a sidecar config says what it
is in an HTML comment on the line just before its fence, which renders as nothing:

    <!-- yaml: prometheus-rules -->

`prometheus-rules` blocks are lists of rules, and each rule must be one that
deploy/prometheus/rules/ ships (PromQL compared with whitespace collapsed), so the docs never show
a rule Prometheus does not run. Any other kind fails until this file learns how to check it.

Commands: every shell command README.md shows (lines of ```bash and ```sh blocks, `$ ` lines of
```text blocks, and inline code that runs `sidecar` or a script of scripts/ or benchmarks/) is
listed in README_COMMANDS with the tests that run it, or in NOT_RUN with the reason. Each named
test must exist and hold the text given as evidence that it runs the command.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecar.cli import build_parser, main
from sidecar.config import Config
from sidecar.demo.mlserver import send_v2_traffic
from sidecar.demo.model import CLASSES
from sidecar.extract.spec import MappingSpec
from tests.conftest import StartServe, StartSidecar, free_port, sample, scrape_until

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
RULES = ROOT / "deploy" / "prometheus" / "rules"

_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<info>\S*)\s*$")
_MARKER = re.compile(r"^\s*<!-- yaml: (?P<kind>[\w-]+) -->\s*$")
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_ENV_PREFIX = re.compile(r"^(?:[A-Z_]+=\S+\s+)*")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Block:
    """A fenced code block: where it starts, its info string, its text and its marker, if any."""

    path: Path
    line: int
    info: str
    text: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> Iterator[Block]:
    """Every fenced block of a Markdown file, indented ones (inside list items) included."""
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        indent, end = len(fence["indent"]), index + 1
        while lines[end].strip() != "```":
            end += 1
        marker = _MARKER.match(lines[index - 1]) if index else None
        yield Block(
            path,
            index + 1,
            fence["info"],
            "\n".join(line[indent:] for line in lines[index + 1 : end]) + "\n",
            marker["kind"] if marker else None,
        )
        index = end + 1


def yaml_blocks(kind: str | None) -> list[Block]:
    """The ```yaml blocks of README.md and docs/ that carry this marker (None: no marker)."""
    return [
        block
        for path in DOCS
        for block in blocks(path)
        if block.info in ("yaml", "yml") and block.marker == kind
    ]


def collapsed(rule: dict[str, Any]) -> dict[str, Any]:
    """A rule with its PromQL on one line: the docs may wrap an expression differently."""
    return {**rule, "expr": " ".join(str(rule["expr"]).split())}


def shipped_rules() -> list[dict[str, Any]]:
    return [
        collapsed(rule)
        for path in sorted(RULES.glob("*.yml"))
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
    ]


@pytest.mark.parametrize("block", yaml_blocks(None), ids=lambda b: b.where)
def test_yaml_example_passes_check_config(
    block: Block,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The block, saved as a file, passes `sidecar check-config` (given an upstream if it has
    none)."""
    path = tmp_path / "example.yaml"
    path.write_text(block.text, encoding="utf-8")
    content = yaml.safe_load(block.text)
    if isinstance(content, dict) and "upstream" not in content:
        monkeypatch.setenv("SIDECAR_UPSTREAM", "http://127.0.0.1:9000")
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("block", yaml_blocks("prometheus-rules"), ids=lambda b: b.where)
def test_prometheus_rules_example_shows_shipped_rules(block: Block) -> None:
    shipped = shipped_rules()
    shown = yaml.safe_load(block.text)
    assert [
        rule.get("record") or rule.get("alert") for rule in shown if collapsed(rule) not in shipped
    ] == []


def test_every_yaml_marker_is_a_kind_this_file_checks() -> None:
    checked = {None, "prometheus-rules"}
    markers = {
        b.where: b.marker for path in DOCS for b in blocks(path) if b.info in ("yaml", "yml")
    }
    assert {where: kind for where, kind in markers.items() if kind not in checked} == {}
    assert yaml_blocks(None), "no sidecar config example found: is the fence parsing broken?"


# --- README commands -----------------------------------------------------------------------


@dataclass(frozen=True)
class RunBy:
    """A test that runs a README command: "file.py::test" or "file.py::Class::test", and text its
    source holds that shows it runs that command."""

    test: str
    evidence: str


_DEMO_SHIM = "test_docs_examples.py::test_scripts_demo_hands_over_to_sidecar_demo"
_CHECK_CONFIG = RunBy("test_config.py::test_shipped_configs_are_valid", '"check-config"')
_PROFILE = RunBy("test_profile.py::test_cli_builds_then_shows_a_profile", '"build"')
_LOADTEST = RunBy(
    "test_loadtest.py::test_compare_alternates_targets_with_the_same_bodies", "--compare"
)
_TOY_DEMO = RunBy("test_demo_signals.py::test_toy_demo_exits_0_on_signal", "serving(run_demo)")
_MLSERVER_DEMO = RunBy(
    "test_demo_signals.py::TestMLServerDemo::test_signal_stops_mlserver_and_exits_0", '"--mlserver"'
)
_CI = RunBy(
    "test_docs_examples.py::test_ci_runs_scripts_test_which_hands_its_options_to_pytest",
    "scripts/test",
)

README_COMMANDS: dict[str, tuple[RunBy, ...]] = {
    "./scripts/demo": (RunBy(_DEMO_SHIM, "install-mlserver"), _MLSERVER_DEMO),
    "./scripts/demo --toy": (RunBy(_DEMO_SHIM, "--toy"), _TOY_DEMO),
    "./scripts/test": (_CI,),
    "./scripts/test -k proxy -x": (_CI,),
    "COMPILED=0 ./scripts/test": (_CI,),
    "curl -s localhost:9101/metrics | grep -E '^ml_(requests|predictions)_total'": (
        RunBy(
            "test_docs_examples.py::test_readme_metrics_excerpt_is_what_the_demo_setup_serves",
            "grep",
        ),
    ),
    "sidecar check-config bad.yaml": (
        RunBy(
            "test_docs_examples.py::test_readme_check_config_example_prints_what_it_shows",
            "bad.yaml",
        ),
    ),
    "sidecar check-config FILE": (_CHECK_CONFIG,),
    "sidecar serve --upstream http://127.0.0.1:9000 --preset open-inference-v2 --model-name iris": (
        RunBy("test_docs_examples.py::test_readme_serve_command_serves", "readme_command"),
    ),
    "sidecar COMMAND --help": (
        RunBy("test_docs_examples.py::test_every_command_has_help", "--help"),
    ),
    "sidecar profile build DATA -o profile.json": (_PROFILE,),
    "sidecar profile show profile.json": (RunBy(_PROFILE.test, '"show"'),),
    "sidecar profile build": (_PROFILE,),
    "sidecar loadtest URL --rate R --duration 30s --preset kserve-v1 [--compare URL2]": (
        _LOADTEST,
        RunBy("test_loadtest.py::test_open_loop_sends_about_rate_times_duration", '"--duration"'),
    ),
    "sidecar loadtest": (_LOADTEST,),
    "sidecar demo [--mlserver PATH]": (_TOY_DEMO, _MLSERVER_DEMO),
    "sidecar demo-model --port 9000": (
        RunBy("test_docs_examples.py::test_demo_model_serves_the_toy_model", '"demo-model"'),
    ),
}

# Commands no test runs, and why. Each script is at least parsed (test_unrun_scripts_parse).
NOT_RUN: dict[str, str] = {
    "DUR=6s benchmarks/throughput.sh": "a measurement: wrk and nginx on both cores, pinned",
    "benchmarks/compare.sh REV": "a measurement: another revision's build against this one, loaded",
    "benchmarks/compare.sh": "a measurement: builds side by side, loaded",
    "ROUNDS=8 DUR=4s benchmarks/compare.sh": "a measurement: builds side by side, loaded",
    "benchmarks/side_by_side.sh": "a measurement: nginx, the naive proxy and the sidecar, loaded",
    "DUR=30s benchmarks/latency.sh": "a measurement: 1,000 requests/s on both cores",
    "scripts/build-compiled DIR": "a build: scripts/test runs it, and the suite on what it builds",
    "benchmarks/latency.sh": "a measurement: a minute of 1,000 requests/s on both cores",
    "benchmarks/soak.sh": "a measurement: ten minutes of 2,000 requests/s",
}


def is_command(code: str) -> bool:
    """Inline code that runs something: `sidecar ...`, or a script of scripts/ or benchmarks/."""
    program = _ENV_PREFIX.sub("", code).split(" ", 1)[0]
    if program == "sidecar":
        return True
    path = ROOT / program.removeprefix("./")
    return program.startswith(("./scripts/", "scripts/", "benchmarks/")) and path.is_file()


def readme_commands() -> set[str]:
    """Every command README.md shows, in fenced shell blocks, after `$ ` or as inline code."""
    text = README.read_text(encoding="utf-8")
    commands: set[str] = set()
    for block in blocks(README):
        lines = [line.strip() for line in block.text.splitlines()]
        if block.info in ("bash", "sh"):
            commands.update(line for line in lines if line and not line.startswith("#"))
        commands.update(line.removeprefix("$ ") for line in lines if line.startswith("$ "))
    prose = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.MULTILINE | re.DOTALL)
    commands.update(code for code in _INLINE_CODE.findall(prose) if is_command(code))
    return commands


def test_every_readme_command_is_run_by_a_test_or_says_why_not() -> None:
    accounted = README_COMMANDS.keys() | NOT_RUN.keys()
    commands = readme_commands()
    assert {"missing": commands - accounted, "stale": accounted - commands} == {
        "missing": set(),
        "stale": set(),
    }


def function_source(test: str) -> str:
    """The source of the test `file.py::name` or `file.py::Class::name`, decorators included."""
    file, *scope = test.split("::")
    source = (TESTS / file).read_text(encoding="utf-8")
    node: ast.AST = ast.parse(source)
    for name in scope:
        found = [
            child
            for child in ast.iter_child_nodes(node)
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and child.name == name
        ]
        assert len(found) == 1, f"{file} has no single {name}"
        node = found[0]
    assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef), f"{test} is no test"
    first = min(line.lineno for line in [node, *node.decorator_list])  # parametrize counts
    return "\n".join(source.splitlines()[first - 1 : node.end_lineno])


@pytest.mark.parametrize(
    ("command", "run_by"),
    [(command, run_by) for command, tests in README_COMMANDS.items() for run_by in tests],
    ids=lambda value: value.test if isinstance(value, RunBy) else value,
)
def test_the_test_named_for_a_readme_command_runs_it(command: str, run_by: RunBy) -> None:
    assert run_by.evidence in function_source(run_by.test), command


@pytest.mark.parametrize("command", sorted(NOT_RUN))
def test_unrun_scripts_parse(command: str) -> None:
    script = ROOT / _ENV_PREFIX.sub("", command).split(" ", 1)[0]
    result = subprocess.run(
        ["bash", "-n", str(script)], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_readme_check_config_example_prints_what_it_shows(tmp_path: Path) -> None:
    """README.md's bad.yaml gets the error README.md prints, word for word, and exit code 2."""
    (shown,) = (
        b.text for b in blocks(README) if b.text.startswith("$ sidecar check-config bad.yaml")
    )
    expected = shown.splitlines()[1]
    (tmp_path / "bad.yaml").write_text("upstream: http://127.0.0.1:9000\nport: eighty\n")
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", "bad.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stderr.strip()) == (2, expected)


def series(lines: list[str]) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    """The (name, labels) of each sample line: what stays when the counts differ."""
    found = set()
    for line in lines:
        name, labels = line.split("{", 1)
        found.add((name, frozenset(_LABEL.findall(labels.rsplit("}", 1)[0]))))
    return found


async def test_readme_metrics_excerpt_is_what_the_demo_setup_serves(
    toy_model: str, start_sidecar: StartSidecar
) -> None:
    """README.md's `curl ... | grep` shows the series a sidecar set up as the demo sets one up
    (Open Inference Protocol, iris class names) serves after traffic, on the default admin port."""
    (shown,) = (b.text for b in blocks(README) if b.text.startswith("$ curl "))
    command, *shown_lines = shown.splitlines()
    curl = re.fullmatch(r"\$ curl -s (\S+) \| grep -E '(.+)'", command)
    assert curl is not None, command
    url, pattern = curl.groups()
    assert url == f"localhost:{Config(upstream='http://127.0.0.1:9000').metrics_port}/metrics"
    sidecar = await start_sidecar(
        toy_model,
        preset="open-inference-v2",
        model_name="iris",
        mapping=MappingSpec(class_names=CLASSES),
    )
    await send_v2_traffic(sidecar.proxy_url, 12, rows_per_request=(1, 4, 8))
    text = await scrape_until(
        sidecar, lambda text: sum(predicted(text).values()) == 4 * (1 + 4 + 8)
    )
    grepped = [line for line in text.splitlines() if re.search(pattern, line)]
    assert series(grepped) == series(shown_lines)


def predicted(text: str) -> dict[str, float]:
    """ml_predictions_total by class."""
    return {
        metric.labels["class"]: metric.value
        for family in text_string_to_metric_families(text)
        for metric in family.samples
        if metric.name == "ml_predictions_total"
    }


async def test_readme_serve_command_serves(serve: StartServe) -> None:
    """README.md's `sidecar serve` line, on free ports, serves and labels the model it names."""
    (readme_command,) = (c for c in readme_commands() if c.startswith("sidecar serve "))
    args = readme_command.split()[2:]
    served = await serve(*args, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0")
    _, admin_port = await served.ports()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin_port}/metrics") as response,
    ):
        text = await response.text()
    assert sample(text, "ml_model_info", model_name="iris") == 1


def subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every command path of the CLI: ("serve",), ("profile", "build"), ..."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name)
                yield from subcommands(child, (*path, name))


@pytest.mark.parametrize("command", list(subcommands(build_parser())), ids=" ".join)
def test_every_command_has_help(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    """`sidecar COMMAND --help` prints the command's usage and exits 0."""
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: sidecar {' '.join(command)}")


async def test_demo_model_serves_the_toy_model() -> None:
    """`sidecar demo-model --port P` answers its readiness path on P (9000 in README.md)."""
    for _ in range(3):  # another process may take the free port first
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "demo-model", "--port", str(port),
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            if await answers(f"http://127.0.0.1:{port}/v2/health/ready", process):
                return
        finally:
            process.kill()
            await process.wait()
    pytest.fail("sidecar demo-model never answered")


async def answers(url: str, process: asyncio.subprocess.Process) -> bool:
    """Whether `url` answers 200 while `process` runs (it gets about 20 s to start)."""
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            if process.returncode is not None:
                return False
            try:
                async with session.get(url) as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
    return False


def shim(path: Path, script: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


@pytest.mark.parametrize(
    ("argv", "hands_over"),
    [
        ((), "demo --mlserver /venv/bin/mlserver"),
        (("--toy",), "demo"),
        (("--toy", "--requests", "5"), "demo --requests 5"),
    ],
)
def test_scripts_demo_hands_over_to_sidecar_demo(
    tmp_path: Path, argv: tuple[str, ...], hands_over: str
) -> None:
    """./scripts/demo, with the sidecar installed: `sidecar demo` against the MLServer that
    scripts/install-mlserver installs, or with --toy against the toy model, extra arguments
    passed on. Shims stand in for the venv and the installer (test_demo_signals runs both demos,
    test_mlserver_integration the installer)."""
    shim(tmp_path / ".venv" / "bin" / "python", "exit 0")
    shim(tmp_path / ".venv" / "bin" / "sidecar", 'echo "$*" > handed-over')
    shim(tmp_path / "scripts" / "install-mlserver", "echo installing >&2; echo /venv/bin/mlserver")
    shutil.copy(ROOT / "scripts" / "demo", tmp_path / "scripts" / "demo")
    # The stamp of an install from this pyproject.toml: nothing to (re)install.
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / ".venv" / ".demo-pyproject.toml")
    result = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "demo"), *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "handed-over").read_text().strip() == hands_over


def test_ci_runs_scripts_test_which_hands_its_options_to_pytest() -> None:
    """CI's entry point (.ci/run) runs ./scripts/test, which runs pytest with the options it
    was given (README.md: `./scripts/test -k proxy -x`): on the plain package, then, unless
    COMPILED=0, on the compiled build that scripts/build-compiled makes."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    script = [
        line.strip()
        for line in (ROOT / "scripts" / "test").read_text(encoding="utf-8").splitlines()
    ]
    assert ci[-1] == "exec ./scripts/test"
    plain = script.index('.venv/bin/pytest "$@"')
    compiled = script.index('if [ "${COMPILED:-1}" != 0 ]; then')
    assert plain < compiled
    assert script[compiled + 1 : compiled + 6] == [
        "compiled=$(mktemp -d /tmp/sidecar-compiled.XXXXXX)",
        """trap 'rm -rf "$compiled"' EXIT""",
        './scripts/build-compiled "$compiled"',
        'SIDECAR_EXPECT_COMPILED=1 PYTHONPATH="$compiled/src" .venv/bin/pytest "$@"',
        "fi",
    ]
