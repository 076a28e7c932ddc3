"""The import rule of docs/architecture.md, checked on the source: dependencies point one way
(proxy -> extraction -> recorders -> exposition), and the serving process never loads what only
`sidecar profile build`, `sidecar loadtest` or `sidecar demo` need."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sidecar"

# Modules that only a command other than `serve` runs, and the libraries only they need.
COMMAND_ONLY = ("sidecar.demo", "sidecar.loadtest", "sidecar.drift.build", "sidecar.drift.sources")
BUILD_ONLY_LIBRARIES = ("pyarrow", "tqdm", "scipy", "pandas")
# Who may import what: (modules, forbidden imports, why).
RULES = (
    (
        ("sidecar.proxy",),
        ("sidecar.recorders", "sidecar.drift", "sidecar.feedback", "sidecar.pipeline"),
        "the proxy hands exchanges to an observer; it knows no recorder",
    ),
    (
        ("sidecar.extract",),
        ("sidecar.proxy", "sidecar.recorders", "sidecar.drift", "sidecar.feedback", "aiohttp"),
        "extraction turns payloads into plain data; it neither relays nor records",
    ),
    (
        ("sidecar.recorders", "sidecar.drift", "sidecar.feedback"),
        ("sidecar.proxy.http1", "sidecar.proxy.server", "sidecar.app", "sidecar.cli"),
        "recorders get plain data, not connections",
    ),
    (
        ("sidecar.config",),
        ("sidecar.recorders", "sidecar.drift.recorder", "sidecar.feedback.recorder"),
        "settings live with their capability; the config imports settings only",
    ),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, top_only: bool = False) -> Iterator[str]:
    """Every module `path` imports, at the top or inside a function (or at the top only)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body if top_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize(("owners", "forbidden", "why"), RULES, ids=lambda v: str(v)[:30])
def test_dependencies_point_one_way(owners, forbidden, why):
    broken = [
        f"{name} imports {imported}"
        for name, path in MODULES.items()
        if within(name, owners)
        for imported in imports(path)
        if within(imported, forbidden)
    ]
    assert broken == [], why


def test_the_serving_modules_never_load_a_command_only_module():
    """Not even inside a function: cli.py (which dispatches every command) and the commands'
    own packages are the only ones that may."""
    serving = {
        name: path
        for name, path in MODULES.items()
        if not within(name, (*COMMAND_ONLY, "sidecar.cli", "sidecar.drift.cli"))
    }
    assert "sidecar.app" in serving
    assert "sidecar.workers.supervisor" in serving
    broken = [
        f"{name} imports {imported}"
        for name, path in serving.items()
        for imported in imports(path)
        if within(imported, COMMAND_ONLY + BUILD_ONLY_LIBRARIES)
    ]
    assert broken == []


def test_command_entry_points_load_their_heavy_parts_lazily():
    """cli.py imports every command's parser; those modules import pyarrow & co. only inside
    the command, so `sidecar serve` and `--help` stay light."""
    for name in ("sidecar.cli", "sidecar.drift.cli", "sidecar.loadtest.cli", "sidecar.demo.cli"):
        heavy = [
            imported
            for imported in imports(MODULES[name], top_only=True)
            if within(imported, (*BUILD_ONLY_LIBRARIES, "sidecar.drift.build", "sidecar.demo.run"))
        ]
        assert heavy == [], name


# grpcio and protobuf (about 14 MB of RSS together) are for processes that speak gRPC: loaded at
# the top only by these modules, which the others import inside the function that needs them
# (app.start_grpc, body._from_grpc, readiness's gRPC question).
GRPC_AT_THE_TOP = {"sidecar.proxy.grpc_relay", "sidecar.extract.oip_grpc", "sidecar.oip.oip_pb2"}
GRPC_MODULES = ("grpc", "google.protobuf", *GRPC_AT_THE_TOP)


def test_grpc_and_protobuf_are_loaded_only_where_grpc_is_spoken():
    loading_at_the_top = {
        name
        for name, path in MODULES.items()
        if any(within(imported, GRPC_MODULES) for imported in imports(path, top_only=True))
    }
    assert loading_at_the_top == GRPC_AT_THE_TOP
