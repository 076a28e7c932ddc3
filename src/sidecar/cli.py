"""Command line: `sidecar serve | check-config | profile | loadtest | demo | demo-model`.

The only module that prints or decides exit codes (0 ok, 1 runtime failure, 2 bad configuration
or usage)."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import uvloop

from sidecar import __version__, logs
from sidecar.config import Config, ConfigError, load
from sidecar.demo import cli as demo_cli
from sidecar.drift import cli as profile_cli
from sidecar.drift.profile import ProfileError
from sidecar.drift.profile import load as load_profile
from sidecar.extract.presets import PRESETS
from sidecar.loadtest import cli as loadtest_cli
from sidecar.memory import freeze_startup, pin_mmap_threshold

log = logging.getLogger("sidecar")

# (key, type, help). Each is also a YAML key and a SIDECAR_<KEY> environment variable.
SERVE_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("upstream", str, "base URL of the model server, e.g. http://127.0.0.1:9000 (required)"),
    ("host", str, "address the proxy port listens on (default 0.0.0.0)"),
    ("port", int, "proxy port: clients send model traffic here (default 8080; 0 = any free)"),
    ("metrics_host", str, "address of the admin port (default: same as --host)"),
    ("metrics_port", int, "admin port with /metrics, /healthz, /readyz (default 8081)"),
    ("preset", str, "protocol preset: " + ", ".join(PRESETS)),
    ("model_name", str, "model_name label when the path does not carry one (default 'model')"),
    ("model_version", str, "model_version label (default 'unknown')"),
    ("upstream_timeout", float, "seconds to wait for upstream bytes before 504 (default 60)"),
    ("health_path", str, "upstream path whose 2xx means ready, e.g. /v2/health/ready"),
    ("drain_timeout", float, "seconds in-flight requests get to finish on SIGTERM (default 30)"),
    ("max_body_bytes", int, "bodies above this pass through unparsed (default 10 MiB)"),
    (
        "workers",
        int,
        "proxy processes sharing --port, one core each; above 1 a supervisor "
        "serves the admin port with their merged metrics (default 1)",
    ),
    ("profile", str, "reference profile for drift (`sidecar profile build`); key drift.profile"),
    ("log_level", str, "debug, info, warning or error (default info)"),
)


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
            "Every option is also a config-file key and a SIDECAR_* environment variable "
            "(e.g. --metrics-port = metrics_port = SIDECAR_METRICS_PORT); "
            "flags win over the environment, which wins over the file."
        ),
    )
    serve.set_defaults(handler=_serve)
    serve.add_argument("--config", "-c", metavar="FILE", help="YAML config file")
    # How a --workers supervisor starts its workers (sidecar.workers); not for people.
    serve.add_argument("--worker-dir", type=Path, help=argparse.SUPPRESS)
    for key, kind, text in SERVE_FLAGS:
        serve.add_argument(
            "--" + key.replace("_", "-"),
            dest=key,
            type=kind,
            metavar=key.upper(),
            help=f"{text} [env SIDECAR_{key.upper()}]",
        )

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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler  # set by each command's parser
    try:
        return handler(args)
    except (ConfigError, ProfileError) as exc:
        print(f"sidecar: configuration error: {exc}", file=sys.stderr)
        return 2


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key, _, _ in SERVE_FLAGS}


def _serve(args: argparse.Namespace) -> int:
    pin_mmap_threshold()  # RSS stays flat under load (sidecar.memory says why)
    if args.worker_dir is not None:
        return _serve_worker(args.worker_dir)
    config = load(args.config, overrides=_overrides(args))
    logs.configure(config.log_level)
    reload: Callable[[], Config] | None = None
    if args.config:
        path, overrides = Path(args.config), _overrides(args)
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
