"""`sidecar serve` flags come from the config schema: every scalar key has a typed, explained
flag; --preset and --log-level offer their choices; --class-names and --feature-names name the
classes and columns of index-only models."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sidecar.app import build_routes
from sidecar.cli import FLAG_HELP, build_parser, config_overrides, main
from sidecar.config import SCALAR_KEYS, Config, load
from sidecar.extract.presets import PRESETS
from sidecar.extract.types import Message

UPSTREAM = "http://127.0.0.1:9000"
JSON = {"content-type": "application/json"}


def serve_options() -> dict[str, argparse.Action]:
    """`sidecar serve`'s options, by flag."""
    commands = next(
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    serve = commands.choices["serve"]
    return {flag: action for action in serve._actions for flag in action.option_strings}


def config_from(*flags: str, file: Path | None = None) -> Config:
    """The Config `sidecar serve FLAGS` would run with (the environment left out)."""
    args = build_parser().parse_args(["serve", "--upstream", UPSTREAM, *flags])
    return load(file, environ={}, overrides=config_overrides(args))


def test_every_scalar_key_has_help_text():
    """A new scalar key cannot ship without a line in FLAG_HELP, and none is left stale."""
    assert set(SCALAR_KEYS) - set(FLAG_HELP) == set(), "add these keys to cli.FLAG_HELP"
    assert set(FLAG_HELP) - set(SCALAR_KEYS) == set(), "these FLAG_HELP keys are not settings"


@pytest.mark.parametrize("key", SCALAR_KEYS)
def test_every_scalar_key_has_an_explained_flag(key):
    """metrics_port -> --metrics-port, stored under the key, its help and variable shown."""
    action = serve_options()["--" + key.replace("_", "-")]
    assert action.dest == key
    assert action.help is not None
    assert FLAG_HELP[key] in action.help
    assert f"SIDECAR_{key.upper()}" in action.help


def test_flags_take_the_type_of_their_key():
    """A flag converts its value to the key's type (`int | None` to int), so argparse rejects
    `--port eighty` itself; defaults are shown in the help."""
    options = serve_options()
    for field in msgspec.structs.fields(Config):
        if field.name in SCALAR_KEYS and field.default not in (None, msgspec.NODEFAULT):
            action = options["--" + field.name.replace("_", "-")]
            assert "(default " in str(action.help), field.name
            if isinstance(field.default, bool):  # --key and --no-key, no value
                assert isinstance(action, argparse.BooleanOptionalAction), field.name
                continue
            converter: object = action.type  # argparse's own type hint is too wide to compare
            assert converter is type(field.default), field.name
    assert options["--no-reply-request-id"].dest == "reply_request_id"
    assert options["--grpc-port"].type is int
    assert options["--grpc-upstream"].type is str


@pytest.mark.parametrize(
    ("flags", "key", "expected"),
    [
        (["--connect-timeout", "2"], "connect_timeout", 2.0),
        (["--client-send-timeout", "7.5"], "client_send_timeout", 7.5),
        (["--client-body-timeout", "9"], "client_body_timeout", 9.0),
        (["--upstream-keepalive-timeout", "3"], "upstream_keepalive_timeout", 3.0),
        (["--health-interval", "1"], "health_interval", 1.0),
        (["--shutdown-delay", "0"], "shutdown_delay", 0.0),
        (["--framework", "sklearn"], "framework", "sklearn"),
        (["--label-cap", "7"], "label_cap", 7),
        (["--low-confidence-threshold", "0.4"], "low_confidence_threshold", 0.4),
        (["--record-queue-size", "99"], "record_queue_size", 99),
        (["--large-body-queue-bytes", "4096"], "large_body_queue_bytes", 4096),
        (["--config-watch-interval", "0"], "config_watch_interval", 0.0),
        (["--log-level", "debug"], "log_level", "debug"),
        (["--preset", "mlflow"], "preset", "mlflow"),
        (["--grpc-port", "9500", "--grpc-upstream", "127.0.0.1:8001"], "grpc_port", 9500),
        (["--grpc-port", "9500", "--grpc-upstream", "m:8001"], "grpc_upstream", "m:8001"),
        (["--grpc-max-message-bytes", "2048"], "grpc_max_message_bytes", 2048),
    ],
)
def test_a_flag_reaches_the_config(flags, key, expected):
    config = config_from(*flags)
    assert getattr(config, key) == expected


def test_profile_flag_sets_drift_profile():
    assert config_from("--profile", "p.json").drift.profile == "p.json"


def usage_error(capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    """Run `sidecar serve FLAGS`, expect argparse's exit 2, and return its message."""
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--upstream", UPSTREAM, *flags])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_misspelt_preset_is_a_usage_error_naming_the_presets(capsys):
    message = usage_error(capsys, "--preset", "mlfow")
    assert "argument --preset: invalid choice: 'mlfow'" in message
    for name in PRESETS:
        assert repr(name) in message


def test_log_level_choices_come_from_the_literal(capsys):
    message = usage_error(capsys, "--log-level", "loud")
    assert "choose from 'debug', 'info', 'warning', 'error'" in message


def test_a_number_flag_rejects_text(capsys):
    message = usage_error(capsys, "--connect-timeout", "soon")
    assert "argument --connect-timeout: invalid float value: 'soon'" in message


def test_an_empty_name_is_a_usage_error(capsys):
    message = usage_error(capsys, "--class-names", "a,,c")
    assert "argument --class-names: 'a,,c' has an empty name" in message


def extract(config: Config, request: bytes, response: bytes) -> Any:
    """What the route for POST /invocations reads from one exchange."""
    route, _ = build_routes(config).match("POST", "/invocations")
    assert route.extractor is not None
    return route.extractor(Message(request, JSON), Message(response, JSON))


def test_class_and_feature_names_name_an_index_only_model():
    """Without a config file, the flags give MLflow's class indices and columns their names."""
    config = config_from(
        "--preset", "mlflow", "--class-names", "a, b,c", "--feature-names", "x,y,z"
    )
    assert config.mapping is not None
    assert config.mapping.class_names == ("a", "b", "c")
    assert config.mapping.feature_names == ("x", "y", "z")
    result = extract(config, b'{"inputs": [[1, 2, 3], [4, 5, 6]]}', b'{"predictions": [0, 2]}')
    assert result.outputs.classes.tolist() == ["a", "c"]
    assert result.features.columns == ("x", "y", "z")


def test_without_the_flags_classes_stay_indices():
    config = config_from("--preset", "mlflow")
    assert config.mapping is None
    result = extract(config, b'{"inputs": [[1, 2, 3]]}', b'{"predictions": [2]}')
    assert result.outputs.classes.tolist() == ["2"]


def test_name_flags_replace_only_those_fields_of_the_files_mapping(tmp_path):
    file = tmp_path / "sidecar.yaml"
    file.write_text(
        "preset: mlflow\n"
        "mapping:\n"
        "  class_names: [setosa, versicolor, virginica]\n"
        "  feature_names: [p, q, r]\n"
        "  model_name: model\n"
    )
    config = config_from("--class-names", "a,b,c", file=file)
    assert config.mapping is not None
    assert config.mapping.class_names == ("a", "b", "c")
    assert config.mapping.feature_names == ("p", "q", "r")
    assert config.mapping.model_name == "model"
