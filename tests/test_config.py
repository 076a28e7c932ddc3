"""Configuration: precedence, and errors that name the key, the value and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.config import ConfigError, load

CONFIGS = Path(__file__).resolve().parents[1] / "config"
UPSTREAM = "upstream: http://127.0.0.1:9000\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    return path


def test_flags_win_over_environment_over_file(tmp_path):
    """A flag beats SIDECAR_* which beats the file, key by key."""
    path = write(tmp_path, UPSTREAM + "port: 1111\nmetrics_port: 2222\nmodel_name: from-file\n")
    environ = {"SIDECAR_PORT": "3333", "SIDECAR_METRICS_PORT": "4444"}
    config = load(path, environ=environ, overrides={"port": 5555, "model_name": None})
    assert config.port == 5555
    assert config.metrics_port == 4444
    assert config.model_name == "from-file"


def test_environment_alone_is_enough():
    """With no file, SIDECAR_UPSTREAM is all it takes; the rest are defaults."""
    config = load(
        environ={"SIDECAR_UPSTREAM": "http://model:8080", "SIDECAR_UPSTREAM_TIMEOUT": "2.5"}
    )
    assert (config.upstream, config.port, config.metrics_port) == ("http://model:8080", 8080, 9101)
    assert config.upstream_timeout == 2.5
    assert config.client_send_timeout == 60.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (UPSTREAM + "port: eighty\n", "key `port` has value 'eighty'; expected `int`, got `str`"),
        (UPSTREAM + "prot: 80\n", "key `prot` is not a known setting"),
        (
            UPSTREAM + "drift:\n  ks_critical: 0.2\n",
            "key `drift.ks_critical` was replaced: a window is flagged when",
        ),
        ("port: 80\n", "key `upstream` is required"),
        ("upstream: ftp://x\n", "upstream 'ftp://x' must be an http:// or https:// URL"),
        (UPSTREAM + "metrics_port: 70000\n", "metrics_port must be a TCP port between 0 and 65535"),
        (UPSTREAM + "log_level: loud\n", "key `log_level` has value 'loud'; expected one of"),
        (
            UPSTREAM + "client_send_timeout: 0\n",
            "key `client_send_timeout` has value 0; client_send_timeout must be a positive number "
            "of seconds, got 0",
        ),
        (UPSTREAM + "upstream_timeout: .nan\n", "upstream_timeout must be a positive number"),
        (UPSTREAM + "routes:\n  - name: a\n    path: nope\n", "path 'nope' must start with '/'"),
        (
            UPSTREAM + "routes:\n  - name: a\n    path: /a\n    mapping: {class: 'x[*'}\n",
            "'x[*' is not a valid JMESPath expression",
        ),
        (
            UPSTREAM + "routes:\n  - name: a\n    path: /a\n    mapping: {clas: x}\n",
            "key `routes[0].mapping.clas` is not a known setting",
        ),
        ("- just\n- a list\n", "must hold a mapping of keys, got list"),
        ("port: [\n", "is not valid YAML"),
    ],
)
def test_bad_files_say_what_is_wrong(tmp_path, text, expected):
    """Each mistake yields one message with the key, the value and the expectation."""
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text), environ={})
    assert expected in str(caught.value)


def test_error_names_the_environment_variable():
    """A bad value from the environment says which variable it came from."""
    with pytest.raises(ConfigError, match="environment variable SIDECAR_METRICS_PORT"):
        load(environ={"SIDECAR_UPSTREAM": "http://m:1", "SIDECAR_METRICS_PORT": "x"})


def test_check_config_exit_codes(tmp_path, capsys):
    """check-config exits 0 for a good file; for a bad one it names the problem and exits 2."""
    good = write(tmp_path, UPSTREAM + "preset: kserve-v1\n")
    assert main(["check-config", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(UPSTREAM + "port: eighty\n")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "key `port` has value 'eighty'" in err


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path, capsys):
    """Every ready-made config in config/ passes check-config and lists its routes."""
    assert main(["check-config", str(path)]) == 0
    assert "routes: POST /" in capsys.readouterr().out


def test_unknown_preset_is_a_config_error(tmp_path):
    """A preset that does not exist is named, with the ones that do."""
    with pytest.raises(ConfigError, match="preset 'kserve' is not one of"):
        load(write(tmp_path, UPSTREAM + "preset: kserve\n"), environ={})


def test_missing_file_is_a_config_error(tmp_path):
    """A config path that does not exist is reported, not a traceback."""
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "absent.yaml", environ={})
