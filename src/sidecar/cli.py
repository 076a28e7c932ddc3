"""Command line: `sidecar serve | check-config | profile | loadtest | demo | demo-model`.

The only module that prints or decides exit codes (0 ok, 1 runtime failure, 2 bad configuration
or usage, 141 when the reader of stdout left early, as for a process ended by SIGPIPE)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import textwrap
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, cast, get_args, get_origin

import msgspec
import uvloop

from sidecar import __version__, logs
from sidecar.config import SCALAR_KEYS, Config, ConfigError, load
from sidecar.demo import cli as demo_cli
from sidecar.drift import cli as profile_cli
from sidecar.drift.profile import ProfileError
from sidecar.drift.profile import load as load_profile
from sidecar.extract.presets import PRESETS
from sidecar.loadtest import cli as loadtest_cli
from sidecar.memory import freeze_startup, pin_mmap_threshold

log = logging.getLogger("sidecar")

# What a shell reports for a writer ended by SIGPIPE (128 + 13), as in `seq 100000 | head -1`.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

# What each scalar config key's flag does. The flags themselves (name, type, choices, default)
# come from Config; a key missing here fails tests/test_cli_flags.py, so none ships unexplained.
FLAG_HELP: dict[str, str] = {
    "upstream": "base URL of the model server, e.g. http://127.0.0.1:9000 (required)",
    "inject_usage": "openai preset: ask streamed calls for token usage and hide it from clients "
    "(docs/llm.md)",
    "reply_request_id": "add X-Request-ID (the id the sidecar sent upstream) to replies that "
    "carry none; the prediction log keys rows by the id the client receives",
    "host": "address the proxy port listens on",
    "port": "proxy port: clients send model traffic here; 0 = any free port",
    "metrics_host": "address of the admin port (default: same as --host)",
    "metrics_port": "admin port with /metrics, /healthz, /readyz",
    "upstream_timeout": "seconds to wait for upstream bytes (the headers, then each chunk); "
    "before the headers it means a 504",
    "connect_timeout": "seconds to open a connection to the upstream; failing means a 502",
    "client_send_timeout": "seconds a client may leave reply bytes unread before its "
    "connection is cut",
    "client_body_timeout": "seconds a client may send no byte of a request body before it gets 408",
    "upstream_keepalive_timeout": "seconds an idle upstream connection is kept for reuse; keep "
    "it below the model server's own keep-alive timeout",
    "health_path": "upstream path whose 2xx means ready, e.g. /v2/health/ready (default: what "
    "the preset asks, about the model when its name is known; else /)",
    "health_interval": "seconds between readiness probes of the upstream",
    "upstream_metrics": "the model server's own metrics URL, e.g. http://127.0.0.1:8082/metrics: "
    "fetched on each scrape and exposed after the sidecar's on /metrics",
    "upstream_metrics_timeout": "seconds each fetch of --upstream-metrics may take",
    "drain_timeout": "on SIGTERM, seconds what was accepted gets to finish",
    "shutdown_delay": "on SIGTERM, seconds to keep serving with /readyz failing before the port "
    "closes",
    "log_level": "least severe log lines written (JSON lines on stderr)",
    "model_name": "model_name label when the path does not carry one; unless left at `model`, "
    "also the model readiness asks the server about",
    "model_version": "model_version label when the path does not carry one",
    "framework": "framework label on ml_model_info",
    "preset": "protocol preset: its routes, health path and payload reading",
    "max_body_bytes": "bodies larger than this are relayed but not parsed",
    "label_cap": "most distinct values per label taken from payloads (classes, features, "
    "model names); the rest count as __other__",
    "low_confidence_threshold": "predictions with a confidence below it count as low-confidence",
    "record_queue_size": "exchanges waiting to be parsed; beyond it they are dropped and counted",
    "large_body_queue_bytes": "body bytes of large exchanges waiting to be read; beyond it they "
    "are dropped and counted",
    "config_watch_interval": "seconds between checks of --config for changes; 0 = no watch "
    "(SIGHUP still reloads)",
    "workers": "proxy processes sharing --port, one core each; above 1 a supervisor serves the "
    "admin port with their merged metrics",
    "grpc_port": "port of a gRPC listener relaying to --grpc-upstream (default: no gRPC)",
    "grpc_upstream": "the model server's gRPC address, host:port (with --grpc-port)",
    "grpc_max_message_bytes": "largest gRPC message relayed, each way",
}

# Flags for the two name lists of the top-level `mapping`: they name the classes and feature
# columns of models that answer with indices, without a config file.
MAPPING_NAME_HELP: dict[str, str] = {
    "class_names": "comma-separated class names by index, e.g. setosa,versicolor,virginica "
    "(key mapping.class_names)",
    "feature_names": "comma-separated names of the feature columns, in order "
    "(key mapping.feature_names)",
}


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help text between words only: preset names and --flags are never cut at a hyphen."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description=(
            "Observability proxy for ML model servers. Put it in front of an unmodified model "
            "server: it relays every request byte for byte and exports Prometheus metrics "
            "(requests, errors, latency, predictions, data quality) on its own admin port."
        ),
        epilog="Run 'sidecar COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the proxy in front of a model server",
        description=(
            "Relay all traffic on --port to --upstream and serve metrics on --metrics-port. "
            "Each option after --config is also a config-file key, and those marked [env] a "
            "SIDECAR_* environment variable (e.g. --metrics-port = metrics_port = "
            "SIDECAR_METRICS_PORT); flags win over the environment, which wins over the file."
        ),
        formatter_class=_HelpFormatter,
    )
    serve.set_defaults(handler=_serve)
    serve.add_argument("--config", "-c", metavar="FILE", help="YAML config file")
    # How a --workers supervisor starts its workers (sidecar.workers); not for people.
    serve.add_argument("--worker-dir", type=Path, help=argparse.SUPPRESS)
    _add_config_flags(serve)
    serve.add_argument(
        "--profile",
        metavar="PROFILE",
        help="reference profile for drift (`sidecar profile build`) [key drift.profile, "
        "env SIDECAR_PROFILE]",
    )
    for key, text in MAPPING_NAME_HELP.items():
        serve.add_argument(_flag(key), dest=key, type=_names, metavar="NAMES", help=text)

    check = commands.add_parser(
        "check-config",
        help="validate a config file and exit",
        description="Validate FILE (with SIDECAR_* variables applied); exit 0 if valid, 2 if not.",
    )
    check.add_argument("file", metavar="FILE")

    check.set_defaults(handler=_check_config)
    # Each capability adds its own commands.
    profile_cli.register(commands)
    loadtest_cli.register(commands)
    demo_cli.register(commands)

    return parser


def _add_config_flags(serve: argparse.ArgumentParser) -> None:
    """A flag per scalar config key, typed from Config: `metrics_port` -> `--metrics-port`."""
    for field in msgspec.structs.fields(Config):
        if field.name in SCALAR_KEYS and field.type is bool:  # --key / --no-key
            serve.add_argument(
                _flag(field.name),
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=_flag_help(field, None),
            )
        elif field.name in SCALAR_KEYS:
            value_type, choices = _flag_type(field.name, field.type)
            serve.add_argument(
                _flag(field.name),
                dest=field.name,
                type=value_type,
                choices=choices,
                metavar=field.name.upper(),
                help=_flag_help(field, choices),
            )


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _flag_type(key: str, kind: Any) -> tuple[type, tuple[str, ...] | None]:
    """What a key's flag converts its value to, and the values it allows (None: any)."""
    if get_origin(kind) is types.UnionType:  # `int | None`: the flag takes an int
        (kind,) = (arg for arg in get_args(kind) if arg is not types.NoneType)
    if key == "preset":  # a str in the schema, checked against the registry
        return str, tuple(PRESETS)
    if get_origin(kind) is Literal:  # e.g. LogLevel
        return str, tuple(map(str, get_args(kind)))
    if kind in (str, int, float):
        return cast(type, kind), None
    msg = f"config key {key} has type {kind}; a flag takes str, int, float or a Literal"
    raise TypeError(msg)


def _flag_help(field: msgspec.structs.FieldInfo, choices: tuple[str, ...] | None) -> str:
    """FLAG_HELP's text, then the choices, the default and the environment variable."""
    parts = [FLAG_HELP[field.name]]
    if choices:
        parts.append(f"; one of {', '.join(choices)}")
    if field.default not in (None, msgspec.NODEFAULT):
        parts.append(f" (default {_shown(field.default)})")
    parts.append(f" [env SIDECAR_{field.name.upper()}]")
    return "".join(parts)


def _shown(default: object) -> str:
    """A default as one would type it: 60.0 -> 60, 0.7 -> 0.7."""
    return f"{default:g}" if isinstance(default, float) else str(default)


def _names(text: str) -> tuple[str, ...]:
    """`a,b,c` -> ("a", "b", "c"), for --class-names and --feature-names."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        msg = f"{text!r} has an empty name; expected comma-separated names, e.g. cat,dog,bird"
        raise argparse.ArgumentTypeError(msg)
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code."""
    try:
        try:
            return _run(argv)
        finally:
            # Flushed here, where a reader that left early (`sidecar --help | head -1`) can be
            # caught, rather than at interpreter exit, where it would print a BrokenPipeError.
            sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler  # set by each command's parser
    try:
        return handler(args)
    except (ConfigError, ProfileError) as exc:
        print(f"sidecar: configuration error: {exc}", file=sys.stderr)
        return 2


def _discard_stdout() -> None:
    """Point stdout at /dev/null: the output still buffered would meet the closed pipe again at
    exit (Python's documentation of the signal module, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys `serve`'s flags set, for `load` (None where a flag is not given)."""
    names = {key: getattr(args, key) for key in MAPPING_NAME_HELP if getattr(args, key)}
    return {
        **{key: getattr(args, key) for key in SCALAR_KEYS},
        "profile": args.profile,
        "mapping": names or None,
    }


def _serve(args: argparse.Namespace) -> int:
    pin_mmap_threshold()  # RSS stays flat under load (sidecar.memory says why)
    if args.worker_dir is not None:
        return _serve_worker(args.worker_dir)
    config = load(args.config, overrides=config_overrides(args))
    logs.configure(config.log_level)
    reload: Callable[[], Config] | None = None
    if args.config:
        path, overrides = Path(args.config), config_overrides(args)
        reload = functools.partial(load, path, overrides=overrides)
    watch = Path(args.config) if args.config else None
    if config.workers > 1:
        return _supervise(config, reload, watch)
    from sidecar.app import Sidecar  # imported late: `check-config` and `--help` stay light

    try:
        uvloop.run(Sidecar(config).serve_until_signalled(reload, watch, on_start=freeze_startup))
    except OSError as exc:
        log.error("cannot serve", extra={"error": str(exc)})
        return 1
    return 0


def _supervise(config: Config, reload: Callable[[], Config] | None, watch: Path | None) -> int:
    from sidecar.workers.supervisor import Supervisor, WorkersFailed

    if config.drift.profile is not None:
        load_profile(config.drift.profile)  # a bad profile exits 2 here, before any worker runs
    try:
        uvloop.run(Supervisor(config, reload, watch).serve_until_signalled())
    except (OSError, WorkersFailed) as exc:
        log.error("cannot serve", extra={"error": str(exc)})
        return 1
    return 0


def _serve_worker(directory: Path) -> int:
    from sidecar.workers.supervisor import read_worker_config, serve_worker

    config = read_worker_config(directory)
    logs.configure(config.log_level)
    try:
        uvloop.run(serve_worker(directory, config))
    except OSError as exc:
        log.error("cannot serve", extra={"error": str(exc)})
        return 1
    return 0


def _check_config(args: argparse.Namespace) -> int:
    config = load(args.file)
    from sidecar.app import build_routes

    routes = ", ".join(
        f"{route.method} {route.template} ({route.name})" for route in build_routes(config)
    )
    print(f"{args.file}: ok")
    workers = f"; {config.workers} workers" if config.workers > 1 else ""
    print(
        f"  upstream {config.upstream}; proxy port {config.port}; "
        f"admin port {config.metrics_port}{workers}"
    )
    print(f"  routes: {routes or 'none (every request is counted under route=other)'}")
    return 0
