"""`sidecar demo` and `sidecar demo-model`: the demo's commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

import uvloop

from sidecar import logs

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `demo` and `demo-model`; argparse sets `handler` to the command's function."""
    commands = subparsers
    demo = commands.add_parser(
        "demo",
        help="run a bundled toy model with the sidecar in front and send it traffic",
        description=(
            "Start an iris model server (a real MLServer with --mlserver, else the bundled toy "
            "model), put the sidecar in front of it, send traffic, print a metrics excerpt, "
            "then keep serving until Ctrl-C or SIGTERM, which stop everything it started."
        ),
    )
    demo.add_argument("--port", type=int, default=8080, help="proxy port (default 8080)")
    demo.add_argument("--metrics-port", type=int, default=9101, help="admin port (default 9101)")
    demo.add_argument("--requests", type=int, default=200, help="requests to send (default 200)")
    demo.add_argument(
        "--once", action="store_true", help="exit after the traffic instead of serving"
    )
    demo.add_argument(
        "--mlserver",
        type=Path,
        metavar="PATH",
        help="the `mlserver` script of a venv with mlserver-sklearn (scripts/install-mlserver "
        "makes one): serve a real MLServer iris model instead of the bundled toy model",
    )

    demo.set_defaults(handler=_demo)

    model = commands.add_parser(
        "demo-model",
        help="run only the bundled toy iris model server (KServe V1 and V2 protocols)",
    )
    model.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    model.add_argument("--port", type=int, default=9000, help="listen port (default 9000)")
    model.set_defaults(handler=_demo_model)


def _demo(args: argparse.Namespace) -> int:
    logs.configure("warning")
    from sidecar.demo.run import run_demo, until_signalled

    # Ctrl-C before until_signalled is in place surfaces as KeyboardInterrupt: nothing started yet.
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(
            until_signalled(
                run_demo(
                    port=args.port,
                    metrics_port=args.metrics_port,
                    requests=args.requests,
                    once=args.once,
                    mlserver=args.mlserver,
                )
            )
        )
    return 0


def _demo_model(args: argparse.Namespace) -> int:
    logs.configure("info")
    from sidecar.demo.model import serve_model
    from sidecar.demo.run import until_signalled

    with contextlib.suppress(KeyboardInterrupt):  # as in _demo
        asyncio.run(until_signalled(serve_model(args.host, args.port)))
    return 0
