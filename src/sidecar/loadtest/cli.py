"""`sidecar loadtest`: replay rows (or generated iris rows) against a model server, open loop at a
fixed rate or closed loop at a fixed concurrency, and print throughput and latency percentiles."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar

from sidecar.loadtest.bodies import (
    SHAPES,
    Bodies,
    DataError,
    Drift,
    Table,
    apply_drifts,
    generated_table,
    load_table,
    parse_drift,
    request_path,
)

if TYPE_CHECKING:
    from sidecar.loadtest.engine import Plan, Progress, TargetReport

__all__ = ["format_table", "register", "to_json"]

Number = TypeVar("Number", int, float)
_DURATION: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)?")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `loadtest`; its handler (`args.handler`, also `run_command`) returns the exit code."""
    cmd = subparsers.add_parser(
        "loadtest",
        help="send model traffic to a server and report throughput and latency",
        description=(
            "Send prediction requests to URL (the sidecar's proxy port or the model server) at a "
            "fixed rate (open loop: latency counts from the intended send time) or with a fixed "
            "number of workers (closed loop), then print throughput, latency percentiles, status "
            "codes and errors. Rows come from --data (CSV with a header, or JSON Lines), replayed "
            "in order, or from the bundled iris generator."
        ),
        epilog="Exit status: 0 run completed, 1 every request to a target failed, 2 bad usage.",
    )
    cmd.add_argument("url", type=_url, metavar="URL", help="base URL, e.g. http://127.0.0.1:8080")
    load = cmd.add_mutually_exclusive_group(required=True)
    load.add_argument(
        "--rate",
        type=_positive(float, "requests per second"),
        metavar="R",
        help="open loop: R requests per second to each target",
    )
    load.add_argument(
        "--concurrency",
        type=_positive(int, "workers"),
        metavar="C",
        help="closed loop: C workers per target, each waits for its answer",
    )
    for flags, options in _FLAGS:
        cmd.add_argument(*flags, **options)
    cmd.set_defaults(handler=run_command)


# -- argument types: argparse turns ArgumentTypeError into "argument --flag: <message>", exit 2 ---


def _invalid(value: str, expected: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"invalid value {value!r} (expected {expected})")


def _positive(kind: Callable[[str], Number], what: str) -> Callable[[str], Number]:
    def parse(text: str) -> Number:
        try:
            value = kind(text)
        except ValueError:
            raise _invalid(text, f"a number of {what} > 0") from None
        if not 0 < value < math.inf:
            raise _invalid(text, f"a number of {what} > 0")
        return value

    parse.__name__ = what
    return parse


def _duration(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if match is None or float(match[1]) <= 0:
        raise _invalid(text, "a duration > 0 such as 30s, 2m, 1h, 500ms or a number of seconds")
    return float(match[1]) * _UNITS[match[2]]


class DriftAt(NamedTuple):
    """When --drift starts: a share of the run, or seconds after the start."""

    share: float | None = None
    seconds: float | None = None


def _drift_at(text: str) -> DriftAt:
    if not text.endswith("%"):
        return DriftAt(seconds=_duration(text))
    try:
        share = float(text[:-1]) / 100.0
    except ValueError:
        share = -1.0
    if not 0 <= share < 1:
        raise _invalid(text, "a share of the run from 0% to 99%, or a time like 15s")
    return DriftAt(share=share)


def _drift(text: str) -> Drift:
    try:
        return parse_drift(text)
    except DataError:
        raise _invalid(text, "COL=+0.5std, COL=-3 or COL=*1.2") from None


def _url(text: str) -> str:
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", text):
        raise _invalid(text, "a base URL such as http://127.0.0.1:8080")
    return text.rstrip("/")


# (flags, argparse options) of everything but the URL and the load shape, in --help order.
_FLAGS: Final[tuple[tuple[tuple[str, ...], dict[str, Any]], ...]] = (
    (("--duration",), {"type": _duration, "metavar": "D",
                       "help": "how long to send: 30s, 2m, 1h, 500ms or seconds"}),
    (("--requests",), {"type": _positive(int, "requests"), "metavar": "N",
                       "help": "requests per target (with --duration: whichever ends first)"}),
    (("--preset",), {"choices": sorted(SHAPES), "default": "kserve-v1",
                     "help": "protocol: decides the path (the preset's first route) and body "
                     "shape (default kserve-v1); the presets that carry rows of features"}),
    (("--data",), {"type": Path, "metavar": "FILE",
                   "help": "rows to replay: .csv with a header, or .jsonl objects (default: "
                   "generated iris rows)"}),
    (("--model",), {"default": "iris", "help": "model name in the path (default iris)"}),
    (("--batch",), {"type": _positive(int, "rows per request"), "default": 1, "metavar": "N",
                    "help": "rows per request (default 1)"}),
    (("--drift",), {"type": _drift, "action": "append", "default": [], "metavar": "COL=SPEC",
                    "help": "shift a column mid-run: COL=+0.5std, COL=-3 (absolute) or "
                    "COL=*1.2 (scale); repeatable"}),
    (("--drift-at",), {"type": _drift_at, "default": DriftAt(share=0.5), "metavar": "WHEN",
                       "help": "when drift starts: a share of the run (default 50%%) or a "
                       "time (15s)"}),
    (("--compare",), {"type": _url, "metavar": "URL2",
                      "help": "also load URL2 with the same bodies, interleaved; print both "
                      "and the URL/URL2 ratios"}),
    (("--max-inflight",), {"type": _positive(int, "requests"), "default": 1000, "metavar": "N",
                           "help": "open loop: cap on requests in flight; sends due beyond it "
                           "are skipped and counted (default 1000)"}),
    (("--timeout",), {"type": _duration, "default": 10.0, "metavar": "D",
                      "help": "per request (default 10s)"}),
    (("--seed",), {"type": int, "default": 0, "help": "seed of the iris generator (default 0)"}),
    (("--json",), {"action": "store_true", "help": "print one JSON document, not a table"}),
    (("--quiet", "-q"), {"action": "store_true", "help": "no progress bar"}),
)  # fmt: skip


# -- the command ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setup:
    """A checked run: the plan, plus what the report says about it."""

    plan: Plan
    config: dict[str, Any]


def run_command(args: argparse.Namespace) -> int:
    """Run `sidecar loadtest`; the exit status."""
    try:
        setup = build(args)
    except DataError as exc:
        print(f"sidecar loadtest: error: {exc}", file=sys.stderr)
        return 2
    import uvloop

    bar = _bar(setup.plan, quiet=args.quiet)
    with bar:
        reports = uvloop.run(_drive(setup, lambda p: _show(bar, setup.plan, p)))
    print(to_json(setup.config, reports) if args.json else format_table(setup.config, reports))
    failed = [r for r in reports if r.ok == 0]
    for report in failed:
        why = ", ".join(f"{k} {n}" for k, n in report.errors.items()) or "no answer below 400"
        print(f"sidecar loadtest: every request to {report.url} failed ({why})", file=sys.stderr)
    return 1 if failed else 0


def build(args: argparse.Namespace) -> Setup:
    """Check the arguments against each other and the data; DataError names the flag."""
    if args.duration is None and args.requests is None:
        msg = "give --duration (e.g. 30s) or --requests (e.g. 1000), or both"
        raise DataError(msg)
    table, source = _rows(args)
    drifted, notes = apply_drifts(table, args.drift) if args.drift else (None, [])
    drift_after, drift_from = _drift_point(args) if args.drift else (None, None)
    path = request_path(args.preset, args.model)
    from sidecar.loadtest.engine import Plan  # aiohttp and numpy: imported when a run starts

    plan = Plan(
        urls=tuple(base + path for base in (args.url, args.compare) if base),
        bodies=Bodies(args.preset, table, drifted, args.batch),
        rate=args.rate,
        concurrency=args.concurrency,
        duration=args.duration,
        requests=args.requests,
        drift_after=drift_after,
        drift_from=drift_from,
        max_inflight=args.max_inflight,
        timeout=args.timeout,
    )
    config = {
        "preset": args.preset,
        "path": path,
        "rows": source,
        "batch": args.batch,
        "mode": "open" if args.rate else "closed",
        "rate": args.rate,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "requests": args.requests,
        "drift": notes,
        "drift_after_s": drift_after,
        "drift_from_request": drift_from,
        "interrupted": False,
    }
    return Setup(plan, config)


def _rows(args: argparse.Namespace) -> tuple[Table, str]:
    if args.data is None:
        table, source = generated_table(args.seed), f"iris generator (seed {args.seed})"
    else:
        try:
            table = load_table(args.data)
        except OSError as exc:
            msg = f"--data {args.data}: cannot read it ({exc.strerror or exc})"
            raise DataError(msg) from None
        source = f"{args.data} ({len(table.rows)} rows)"
    numeric = [name for name in table.columns if name in table.numeric]
    if SHAPES[args.preset].strings or len(numeric) == len(table.columns):
        return table, source
    if not numeric:
        msg = (
            f"--data {args.data}: no numeric column, and --preset {args.preset} sends numbers only"
        )
        raise DataError(msg)
    dropped = ", ".join(name for name in table.columns if name not in table.numeric)
    print(
        f"sidecar loadtest: {args.preset} sends numbers only; left out: {dropped}", file=sys.stderr
    )
    return table.only(numeric), source


def _drift_point(args: argparse.Namespace) -> tuple[float | None, int | None]:
    """Drift from a time (seconds) or from a request number; a share needs a bound to apply to."""
    at: DriftAt = args.drift_at
    if at.seconds is not None:
        if args.duration is not None and at.seconds >= args.duration:
            msg = (
                f"--drift-at {at.seconds:g}s is not inside the run (--duration {args.duration:g}s)"
            )
            raise DataError(msg)
        return at.seconds, None
    share = at.share or 0.0
    if args.duration is not None:
        return share * args.duration, None
    return None, math.ceil(share * args.requests)


async def _drive(setup: Setup, progress: Callable[[Progress], None]) -> list[TargetReport]:
    from sidecar.loadtest.engine import run

    # Ctrl-C ends the run early but still prints the table (in-flight requests are abandoned).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread (tests)
        return await run(setup.plan, progress)
    try:
        return await run(setup.plan, progress, stop)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        setup.config["interrupted"] = stop.is_set()


def _bar(plan: Plan, *, quiet: bool) -> Any:
    from tqdm import tqdm

    by_time = plan.duration is not None
    total = plan.duration if by_time else (plan.requests or 0) * len(plan.urls)
    return tqdm(
        total=total,
        unit="s" if by_time else "req",
        desc="loadtest",
        file=sys.stderr,
        disable=quiet or not sys.stderr.isatty(),
        leave=False,
        dynamic_ncols=True,
        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}",
    )


def _show(bar: Any, plan: Plan, progress: Progress) -> None:
    done = progress.completed + progress.errors
    bar.n = min(progress.elapsed, bar.total) if plan.duration is not None else done
    rate = progress.completed / progress.elapsed if progress.elapsed > 0 else 0.0
    bar.set_postfix_str(
        f"{rate:.0f} answers/s, {progress.errors} errors, {progress.inflight} in flight",
        refresh=False,
    )
    bar.refresh()


# -- output ---------------------------------------------------------------------------------------

_NAMES: Final = ("URL", "URL2")
_LATENCIES: Final = ("p50", "p90", "p99", "p99.9", "max", "mean")  # loadtest.PERCENTILES + 2


def format_table(config: dict[str, Any], reports: list[TargetReport]) -> str:
    """Plain aligned text: one column per target and, with --compare, URL/URL2 and URL-URL2."""
    table = [["", *_NAMES[: len(reports)], *(["URL/URL2", "URL-URL2"] if len(reports) > 1 else [])]]
    table += _count_rows(reports)
    table.append(_compared("throughput (answers/s)", [r.throughput for r in reports], 1.0))
    table += [
        _compared(f"latency {name} (ms)", [r.latency[name] for r in reports], 1e3)
        for name in _LATENCIES
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [*_heading(config, reports), ""]
    for row in table:
        cells = [cell.rjust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join([row[0].ljust(widths[0]), *cells[1:]]).rstrip())
    return "\n".join(lines)


def _heading(config: dict[str, Any], reports: list[TargetReport]) -> list[str]:
    if config["mode"] == "open":
        load = f"open loop at {config['rate']:g} req/s"
    else:
        load = f"closed loop with {config['concurrency']} workers"
    at = config["drift_after_s"]
    when = f"from {at:g} s" if at is not None else f"from request {config['drift_from_request']}"
    return [
        f"{config['preset']}: POST {config['path']}, {config['batch']} row(s) per request, "
        f"{load} per target; rows from {config['rows']}",
        *(f"drift {when}: {note}" for note in config["drift"]),
        *(f"{name:<4} = {r.url}" for name, r in zip(_NAMES, reports, strict=False)),
        *(["stopped early by Ctrl-C; requests in flight were abandoned"] * config["interrupted"]),
    ]


def _count_rows(reports: list[TargetReport]) -> list[list[str]]:
    extra = [""] * (2 if len(reports) > 1 else 0)
    rows = [
        ["requests sent", *(str(r.sent) for r in reports), *extra],
        ["answered", *(str(r.completed) for r in reports), *extra],
        ["skipped (in-flight cap)", *(str(r.skipped) for r in reports), *extra],
        ["elapsed (s)", *(f"{r.elapsed:.2f}" for r in reports), *extra],
    ]
    statuses = sorted({status for r in reports for status in r.statuses})
    rows += [
        [f"status {s}", *(str(r.statuses.get(s, 0)) for r in reports), *extra] for s in statuses
    ]
    kinds = sorted({kind for r in reports for kind in r.errors})
    rows += [[f"errors: {k}", *(str(r.errors.get(k, 0)) for r in reports), *extra] for k in kinds]
    if not kinds:
        rows.append(["errors", *("0" for _ in reports), *extra])
    return rows


def _compared(label: str, values: list[float | None], unit: float) -> list[str]:
    cells = [label, *("-" if v is None else f"{v * unit:.3f}" for v in values)]
    if len(values) == 2:
        first, second = values
        if first is None or second is None:
            return [*cells, "-", "-"]
        cells.append(f"{first / second:.3f}" if second else "-")
        cells.append(f"{(first - second) * unit:+.3f}")
    return cells


def to_json(config: dict[str, Any], reports: list[TargetReport]) -> str:
    """One JSON document: the config, one entry per target, and the URL/URL2 comparison."""
    document = {
        "config": config,
        "targets": [_target_json(r) for r in reports],
        "comparison": _comparison_json(*reports) if len(reports) == 2 else None,
    }
    return json.dumps(document, indent=2)


def _target_json(report: TargetReport) -> dict[str, Any]:
    return {
        "url": report.url,
        "sent": report.sent,
        "completed": report.completed,
        "ok": report.ok,
        "skipped": report.skipped,
        "elapsed_s": report.elapsed,
        "throughput_rps": report.throughput,
        "latency_ms": {k: None if v is None else v * 1e3 for k, v in report.latency.items()},
        "status_codes": {str(k): v for k, v in report.statuses.items()},
        "errors": report.errors,
    }


def _comparison_json(first: TargetReport, second: TargetReport) -> dict[str, Any]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    latency = {name: (first.latency[name], second.latency[name]) for name in _LATENCIES}
    return {
        "throughput_ratio": ratio(first.throughput, second.throughput),
        "latency_ratio": {name: ratio(a, b) for name, (a, b) in latency.items()},
        "latency_difference_ms": {
            name: (a - b) * 1e3 if a is not None and b is not None else None
            for name, (a, b) in latency.items()
        },
    }
