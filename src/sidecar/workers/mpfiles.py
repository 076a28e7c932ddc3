"""The multiprocess files of exited workers, folded into one "retired" file per type and mode.

prometheus_client keeps each process's values in `<type>_<pid>.db` (counter, histogram, summary)
or `gauge_<mode>_<pid>.db`, and `MultiProcessCollector` reads every *.db file of the directory on
each scrape, taking the type and the gauge mode from the name. Its `mark_process_dead` removes
only a dead pid's live gauges, so every restart would leave files behind for good. retire()
folds them instead into `<type>_retired.db` or `gauge_<mode>_retired.db`, which the collector
reads like any process's file ("retired" stands where the pid would).

Both the file layout above and `prometheus_client.mmap_dict.MmapedDict` (the file format: its
constructor, `write_value(key, value, timestamp)`, `close()` and the static
`read_all_values_from_file`, which yields (key, value, timestamp, position)) are prometheus_client
internals. tests/test_prometheus_internals.py checks them against the installed version;
pyproject.toml pins the versions it passed with.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict

RETIRED = "retired"

Entry = tuple[float, float]  # value, timestamp (only "mostrecent" gauges set one)
Fold = Callable[[Entry, Entry], Entry]


def _add(held: Entry, dead: Entry) -> Entry:
    return held[0] + dead[0], 0.0


# What a dead process's values become, by file prefix. Counters, histograms and summaries add
# up: they must never go down. Gauges in "sum", "max", "min" and "mostrecent" mode outlive their
# process in prometheus_client, so their folded value keeps taking part as the file did: the
# merged output is the same. Any other prefix holds values of its process alone, which go with
# it: the "live*" gauges (as mark_process_dead does) and "all", whose samples carry the pid.
# Sidecar's own gauges use live modes and "max" (ml_model_info, the same 1 in every worker).
_FOLDS: dict[str, Fold] = {
    "counter": _add,
    "histogram": _add,
    "summary": _add,
    "gauge_sum": _add,
    "gauge_max": lambda held, dead: max(held, dead, key=lambda entry: entry[0]),
    "gauge_min": lambda held, dead: min(held, dead, key=lambda entry: entry[0]),
    "gauge_mostrecent": lambda held, dead: max(held, dead, key=lambda entry: entry[1]),
}


def retire(directory: Path, pid: int) -> None:
    """Fold the *.db files of `pid`, which has exited, into the retired files and delete them.

    An OSError (a full disk) leaves the file being folded, and those not reached yet, as they
    were: still counted, once, just not compacted."""
    suffix = f"_{pid}.db"
    dead = {path.name.removesuffix(suffix): path for path in directory.glob("*" + suffix)}
    # Files only to delete go first, so a fold that fails does not keep a dead live gauge.
    for prefix in sorted(dead, key=lambda prefix: prefix in _FOLDS):
        fold = _FOLDS.get(prefix)
        if fold is not None:
            _fold(dead[prefix], directory / f"{prefix}_{RETIRED}.db", fold)
        dead[prefix].unlink()


def _fold(dead: Path, retired: Path, fold: Fold) -> None:
    # The new retired file is written aside and renamed over the old one; the caller then
    # deletes the dead file. Between the two, the dead values are in both files, but no scrape
    # sees that: scrapes run on the supervisor's event loop, as this does, and a supervisor that
    # dies here abandons the directory (the next one makes a new one, with totals from zero, as
    # after any restart of a process that exports counters).
    entries = _read(retired) if retired.exists() else {}
    for key, entry in _read(dead).items():
        held = entries.get(key)
        entries[key] = entry if held is None else fold(held, entry)
    temporary = retired.with_name(retired.name + ".tmp")  # not *.db: the collector skips it
    temporary.unlink(missing_ok=True)  # left by a fold that failed
    store = MmapedDict(str(temporary))  # type: ignore[no-untyped-call]
    try:
        for key, (value, timestamp) in entries.items():
            store.write_value(key, value, timestamp)  # type: ignore[no-untyped-call]
    finally:
        store.close()  # type: ignore[no-untyped-call]
    os.replace(temporary, retired)


def _read(path: Path) -> dict[str, Entry]:
    values = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
    return {key: (value, timestamp) for key, value, timestamp, _ in values}
