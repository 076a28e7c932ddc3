"""What the serving process loads: `sidecar serve --preset kserve-v1 --profile P`, started for
real with Python's import-time report (PYTHONPROFILEIMPORTTIME, i.e. `-X importtime`), must not
import the packages that only other commands need. Each costs megabytes of RSS in every pod
(benchmarks/footprint.sh measures it; RSS is not asserted here, benchmarks are not tests)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np

from sidecar.drift import profile, summary
from tests.conftest import StartServe

FEATURES = 20
# Package -> what it serves instead: the serving process must do without each.
NOT_SERVING = {
    "pyarrow": "sidecar profile build",
    "tqdm": "sidecar profile build",
    "scipy": "tests and offline checks",
    "pandas": "nothing of ours",
    "aiohttp": "demo and loadtest (admin port: admin_http.py; probe: proxy/pool.py)",
    "psycopg": "a feedback.store that is a postgresql:// URL",
}


def profile_file(path: Path) -> Path:
    """A reference profile of FEATURES numeric features, as `sidecar profile build` makes."""
    rows, rng = 2_000, np.random.default_rng(0)
    names = [f"f{j}" for j in range(FEATURES)]
    columns: dict[str, summary.Column] = {
        name: summary.NumericColumn(rng.normal(size=rows), np.zeros(rows, bool)) for name in names
    }
    features: list[tuple[str, profile.Kind]] = [(name, "numeric") for name in names]
    built = summary.build_from_batches(lambda: [(rows, columns)], features)
    profile.save(built, path)
    return path


def imported(lines: list[str]) -> set[str]:
    """Top-level package names from `import time: self | cumulative | name` lines."""
    names = set()
    for line in lines:
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            names.add(name.split(".", 1)[0])
    return names


async def test_serve_does_not_import_offline_packages(serve: StartServe, tmp_path: Path) -> None:
    """Serving kserve-v1 with a 20-feature profile, then draining on SIGTERM, imports none of
    pyarrow, tqdm, scipy, pandas or aiohttp."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "SIDECAR_SHUTDOWN_DELAY": "0"}
    served = await serve(
        *("--upstream", "http://127.0.0.1:9", "--host", "127.0.0.1"),
        *("--port", "0", "--metrics-port", "0", "--preset", "kserve-v1"),
        *("--profile", str(profile_file(tmp_path / "p20.json"))),
        env=env,
    )
    await served.logged("serving")
    served.process.send_signal(signal.SIGTERM)
    code, lines = await served.exited()
    assert code == 0
    names = imported([line["text"] for line in lines if "text" in line])
    assert "sidecar" in names, "no import-time report: PYTHONPROFILEIMPORTTIME was not honoured"
    loaded = {name: why for name, why in NOT_SERVING.items() if name in names}
    assert loaded == {}, f"the serving process imported {sorted(loaded)}"
