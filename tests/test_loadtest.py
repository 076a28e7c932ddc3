"""`sidecar loadtest` against the real toy model server: counts, body shapes, replay order,
drift, comparison, output and exit codes. Counts are asserted; timings never are."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from sidecar.demo.model import FEATURES, make_model_app
from sidecar.loadtest import cli as loadtest_cli
from sidecar.loadtest.engine import Histogram


@dataclass
class ModelServer:
    """The toy iris model, plus record-only routes for the presets it does not speak."""

    url: str = ""
    seen: list[tuple[str, str, Any]] = field(default_factory=list)  # (server, path, body)

    def bodies(self, path: str | None = None) -> list[Any]:
        return [body for _, seen_path, body in self.seen if path in (None, seen_path)]


async def _start(name: str, log: ModelServer) -> web.AppRunner:
    app = make_model_app()

    @web.middleware
    async def record(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        log.seen.append((name, request.path, json.loads(await request.read())))
        response: web.StreamResponse = await handler(request)
        return response

    async def accept(request: web.Request) -> web.Response:
        return web.json_response({"predictions": [0]})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.json_response({"predictions": [0]})

    app.middlewares.append(record)
    for path in ("/invocations", "/predictions/iris", "/api/v1.0/predictions"):
        app.router.add_post(path, accept)
    app.router.add_post("/v1/models/slow:predict", slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


@pytest.fixture
async def model() -> AsyncIterator[ModelServer]:
    server = ModelServer()
    runner = await _start("a", server)
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield server
    await runner.cleanup()


@pytest.fixture
async def second_model(model: ModelServer) -> AsyncIterator[str]:
    """Another model server that logs into the first one's `seen`, so order across both shows."""
    runner = await _start("b", model)
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar")
    loadtest_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _main(*argv: str) -> int:
    args = _parser().parse_args(["loadtest", *argv, "--quiet"])
    code: int = args.handler(args)
    return code


async def loadtest(*argv: str) -> int:
    """Run the command as the CLI does (its own uvloop), in a thread: the server runs here."""
    return await asyncio.to_thread(_main, *argv)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


V1 = "/v1/models/iris:predict"
SHAPE_CHECKS: dict[str, tuple[str, Callable[[Any], list[Any]]]] = {
    "kserve-v1": (V1, lambda body: body["instances"]),
    "open-inference-v2": (
        "/v2/models/iris/infer",
        lambda body: np.reshape(body["inputs"][0]["data"], body["inputs"][0]["shape"]).tolist(),
    ),
    "mlflow": ("/invocations", lambda body: body["dataframe_split"]["data"]),
    "torchserve": ("/predictions/iris", lambda body: body["instances"]),
    "seldon-v1": ("/api/v1.0/predictions", lambda body: body["data"]["ndarray"]),
}


@pytest.mark.parametrize("preset", sorted(SHAPE_CHECKS))
async def test_closed_loop_sends_exactly_the_requested_count_in_the_preset_shape(
    model: ModelServer, preset: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--concurrency 3 --requests 7 --batch 2 sends 7 bodies of 2 iris rows, shaped per preset."""
    code = await loadtest(
        model.url, "--concurrency", "3", "--requests", "7", "--batch", "2", "--preset", preset
    )
    assert code == 0
    path, rows_of = SHAPE_CHECKS[preset]
    bodies = model.bodies()
    assert len(bodies) == 7
    assert {seen_path for _, seen_path, _ in model.seen} == {path}
    assert all(np.shape(rows_of(body)) == (2, 4) for body in bodies)
    if preset == "open-inference-v2":
        assert bodies[0]["inputs"][0]["datatype"] == "FP64"
        assert bodies[0]["inputs"][0]["shape"] == [2, 4]
    if preset == "mlflow":
        assert bodies[0]["dataframe_split"]["columns"] == list(FEATURES)
    if preset == "seldon-v1":
        assert bodies[0]["data"]["names"] == list(FEATURES)
    assert re.search(r"^requests sent +7$", capsys.readouterr().out, re.MULTILINE)


async def test_open_loop_sends_about_rate_times_duration(model: ModelServer) -> None:
    """--rate 40 --duration 1s sends about 40 requests whatever the answers do."""
    assert await loadtest(model.url, "--rate", "40", "--duration", "1s") == 0
    assert 32 <= len(model.seen) <= 48


async def test_open_loop_skips_sends_beyond_the_inflight_cap(
    model: ModelServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """With one request in flight at most and a slow model, due sends are skipped and counted."""
    argv = ("--rate", "40", "--requests", "12", "--max-inflight", "1", "--model", "slow")
    assert await loadtest(model.url, *argv, "--json") == 0
    target = json.loads(capsys.readouterr().out)["targets"][0]
    assert target["sent"] + target["skipped"] == 12
    assert target["skipped"] > 0
    assert len(model.seen) == target["sent"]


async def test_csv_rows_are_replayed_in_order_and_cycle(
    model: ModelServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """CSV rows go out in file order, cycling; a numbers-only preset leaves text columns out."""
    data = _write(tmp_path / "rows.csv", "a,b,name,c,d\n1,2.5,x,3,4\n5,6,y,7,8\n9,10,z,11,\n")
    assert (
        await loadtest(model.url, "--concurrency", "1", "--requests", "5", "--data", str(data)) == 0
    )
    assert [body["instances"] for body in model.bodies()] == [
        [[1, 2.5, 3, 4]],
        [[5, 6, 7, 8]],
        [[9, 10, 11, None]],
        [[1, 2.5, 3, 4]],
        [[5, 6, 7, 8]],
    ]
    assert "left out: name" in capsys.readouterr().err


async def test_jsonl_rows_keep_text_columns_when_the_preset_can_carry_them(
    model: ModelServer, tmp_path: Path
) -> None:
    """JSON Lines replay in order; MLflow's dataframe_split carries the column names and text."""
    lines = [{"x": 1.5, "kind": "a"}, {"x": 2, "kind": "b"}, {"kind": "c"}]
    data = _write(tmp_path / "rows.jsonl", "\n".join(json.dumps(line) for line in lines))
    argv = ("--concurrency", "1", "--requests", "2", "--batch", "2", "--preset", "mlflow")
    assert await loadtest(model.url, *argv, "--data", str(data)) == 0
    first, second = (body["dataframe_split"] for body in model.bodies())
    assert first == {"columns": ["x", "kind"], "data": [[1.5, "a"], [2, "b"]]}
    assert second["data"] == [[None, "c"], [1.5, "a"]]


async def test_drift_shifts_the_column_from_the_switch_point(
    model: ModelServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Drift applies from half-way: +1std (std of [1, 3] is 1), +3 absolute, *2 scale."""
    data = _write(tmp_path / "rows.csv", "a,b,c\n1,10,5\n3,10,5\n")
    drifts = ("--drift", "a=+1std", "--drift", "b=+3", "--drift", "c=*2")
    # torchserve: a record-only route here (the iris model wants exactly 4 columns)
    argv = ("--concurrency", "1", "--requests", "8", "--data", str(data), "--preset", "torchserve")
    assert await loadtest(model.url, *argv, *drifts) == 0
    rows = [body["instances"][0] for body in model.bodies()]
    plain = [[1, 10, 5], [3, 10, 5]] * 2
    assert rows == [*plain, *([[a + 1.0, b + 3.0, c * 2.0] for a, b, c in plain])]
    assert "drift from request 4: a +1 (+1 x std 1)" in capsys.readouterr().out


async def test_drift_at_a_time_in_an_open_loop_follows_the_schedule(
    model: ModelServer, tmp_path: Path
) -> None:
    """--drift-at 0.25s at 20 req/s drifts request 5 onwards (scheduled at 0.25 s)."""
    data = _write(tmp_path / "rows.csv", "a\n1\n")
    argv = ("--rate", "20", "--requests", "8", "--data", str(data), "--preset", "torchserve")
    assert await loadtest(model.url, *argv, "--drift", "a=-1", "--drift-at", "0.25s") == 0
    values = sorted(body["instances"][0][0] for body in model.bodies())
    assert values == [0.0] * 3 + [1] * 5


async def test_compare_alternates_targets_with_the_same_bodies(
    model: ModelServer, second_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Open-loop --compare sends URL, URL2, URL, URL2 ... and the k-th body is the same for both."""
    argv = ("--rate", "10", "--requests", "3", "--compare", second_model)
    assert await loadtest(model.url, *argv, "--json") == 0
    assert [server for server, _, _ in model.seen] == ["a", "b"] * 3
    bodies = [body for _, _, body in model.seen]
    assert bodies[0::2] == bodies[1::2]
    document = json.loads(capsys.readouterr().out)
    assert [target["sent"] for target in document["targets"]] == [3, 3]
    assert set(document["comparison"]) == {
        "throughput_ratio",
        "latency_ratio",
        "latency_difference_ms",
    }
    assert document["comparison"]["latency_ratio"]["p50"] > 0


async def test_closed_loop_compare_drives_each_target_with_its_own_workers(
    model: ModelServer, second_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Closed-loop --compare: N requests to each target, the same body sequence, two columns."""
    argv = ("--concurrency", "1", "--requests", "4", "--compare", second_model)
    assert await loadtest(model.url, *argv) == 0
    by_server = {s: [b for name, _, b in model.seen if name == s] for s in ("a", "b")}
    assert by_server["a"] == by_server["b"]
    assert len(by_server["a"]) == 4
    out = capsys.readouterr().out
    assert "URL/URL2" in out
    assert f"URL2 = {second_model}{V1}" in out


async def test_json_output_parses_and_has_the_fields(
    model: ModelServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints one document: config, per-target counts, latencies, status codes, errors."""
    assert await loadtest(model.url, "--concurrency", "2", "--requests", "6", "--json") == 0
    document = json.loads(capsys.readouterr().out)
    assert document["config"]["preset"] == "kserve-v1"
    assert document["comparison"] is None
    (target,) = document["targets"]
    assert target["url"] == model.url + V1
    assert (target["sent"], target["completed"], target["ok"]) == (6, 6, 6)
    assert target["status_codes"] == {"200": 6}
    assert target["errors"] == {}
    assert set(target["latency_ms"]) == {"p50", "p90", "p99", "p99.9", "max", "mean"}
    assert target["throughput_rps"] > 0


async def test_unreachable_target_counts_errors_and_exits_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Connection refused is counted per kind, the run completes, and the exit status is 1."""
    with socket.socket() as bound:  # bound, never listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}"
        assert await loadtest(url, "--concurrency", "2", "--requests", "4", "--json") == 1
    captured = capsys.readouterr()
    target = json.loads(captured.out)["targets"][0]
    assert target["errors"] == {"refused": 4}
    assert target["completed"] == 0
    assert "every request to" in captured.err


async def test_compare_exits_1_when_one_target_fails(model: ModelServer) -> None:
    """A comparison against a dead target is not a result."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{bound.getsockname()[1]}"
        assert (
            await loadtest(model.url, "--concurrency", "1", "--requests", "2", "--compare", dead)
            == 1
        )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rate", "0", "--requests", "3"], "argument --rate: invalid value '0'"),
        (
            ["--concurrency", "two", "--requests", "3"],
            "argument --concurrency: invalid value 'two'",
        ),
        (["--rate", "5", "--duration", "3x"], "argument --duration: invalid value '3x'"),
        (["--rate", "5", "--concurrency", "2"], "not allowed with argument"),
        (["--requests", "3"], "one of the arguments --rate --concurrency is required"),
        (["--rate", "5", "--duration", "1s", "--drift", "a+1"], "--drift: invalid value 'a+1'"),
        (["--rate", "5", "--duration", "1s", "--drift-at", "150%"], "--drift-at: invalid value"),
        (["--rate", "5", "--duration", "1s", "--preset", "grpc"], "--preset: invalid choice"),
        (["--rate", "5", "--duration", "1s", "--batch", "-1"], "--batch: invalid value '-1'"),
    ],
)
def test_bad_flags_exit_2_naming_flag_and_value(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse rejects the value with the flag, the value and what was expected."""
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["loadtest", "http://127.0.0.1:1", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rate", "5"], "give --duration"),
        (["--rate", "5", "--requests", "1", "--drift", "petal=+1"], "column 'petal' is not in"),
        (
            ["--rate", "5", "--duration", "2s", "--drift", "sepal_length=+1", "--drift-at", "3s"],
            "--drift-at 3s",
        ),
        (
            ["--rate", "5", "--requests", "1", "--data", "/nonexistent.csv"],
            "--data /nonexistent.csv: cannot read it",
        ),
    ],
)
def test_inconsistent_arguments_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Errors found after parsing (bounds, data, drift columns) also exit 2 and say why."""
    assert _main("http://127.0.0.1:1", *argv) == 2
    assert message in capsys.readouterr().err


def test_histogram_percentiles_are_within_one_percent() -> None:
    """The log-bucket histogram agrees with exact percentiles to within its 1 % bucket width."""
    latencies = np.random.default_rng(0).lognormal(mean=-7, sigma=1.0, size=20_000)
    histogram = Histogram()
    for value in latencies:
        histogram.record(float(value))
    for q in (50, 90, 99, 99.9):
        exact = float(np.percentile(latencies, q, method="inverted_cdf"))
        assert histogram.percentile(q) == pytest.approx(exact, rel=0.01)
    assert histogram.percentile(100) == latencies.max()
    assert Histogram().percentile(50) is None
