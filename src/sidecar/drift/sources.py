"""Training data files (CSV, Parquet, JSON Lines) read as batches of arrow arrays, streaming: a
file larger than memory is read a block at a time, with a progress bar on large files."""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import pyarrow as pa
from tqdm import tqdm

from sidecar.drift.profile import ProfileError

__all__ = ["READERS", "Format", "ProfileError", "Reader", "format_of", "progress_bar"]

LARGE_FILE = 16 * 1024 * 1024  # show progress bars from this size on
CSV_BLOCK = 4 << 20  # bytes per CSV batch
PARQUET_BATCH = 65_536  # rows per Parquet batch
JSONL_CHUNK = 8 << 20  # bytes per JSON Lines batch (cut at a line end)

Format = Literal["csv", "parquet", "jsonl"]


Reader = Callable[[Path, "tqdm[Any] | None"], Generator[tuple[int, dict[str, Any]]]]


def format_of(path: Path) -> Format:
    suffixes = [s.lower() for s in path.suffixes]
    if ".csv" in suffixes or ".tsv" in suffixes:
        return "csv"
    if ".parquet" in suffixes or ".pq" in suffixes:
        return "parquet"
    if ".jsonl" in suffixes or ".ndjson" in suffixes or ".json" in suffixes:
        return "jsonl"
    msg = f"{path}: cannot tell the format from the name; expected .csv, .parquet or .jsonl"
    raise ProfileError(msg)


def progress_bar(path: Path, desc: str, progress: bool) -> tqdm[Any]:
    size = path.stat().st_size
    return tqdm(
        total=size,
        unit="B",
        unit_scale=True,
        desc=f"profile {desc}",
        leave=False,
        disable=not progress or size < LARGE_FILE,
    )


def _read_csv(path: Path, bar: tqdm[Any] | None) -> Generator[tuple[int, dict[str, Any]]]:
    from pyarrow import csv

    # Every column is read as text and parsed here: pyarrow infers types from the first block
    # only, and a later "1.5" in an int column would abort the read.
    with csv.open_csv(path) as probe:
        names = probe.schema.names
    convert = csv.ConvertOptions(
        column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=True
    )
    with (
        pa.OSFile(str(path)) as handle,
        csv.open_csv(
            handle, read_options=csv.ReadOptions(block_size=CSV_BLOCK), convert_options=convert
        ) as reader,
    ):
        done = 0
        for batch in reader:
            if bar is not None:
                bar.update(handle.tell() - done)
                done = handle.tell()
            yield batch.num_rows, dict(zip(batch.schema.names, batch.columns, strict=True))


def _read_parquet(path: Path, bar: tqdm[Any] | None) -> Generator[tuple[int, dict[str, Any]]]:
    from pyarrow import parquet

    with parquet.ParquetFile(path) as file:
        share = path.stat().st_size / max(file.metadata.num_rows, 1)
        for batch in file.iter_batches(batch_size=PARQUET_BATCH):
            if bar is not None:
                bar.update(batch.num_rows * share)
            yield batch.num_rows, dict(zip(batch.schema.names, batch.columns, strict=True))


def _read_jsonl(path: Path, bar: tqdm[Any] | None) -> Generator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as handle:
        tail = b""
        while block := handle.read(JSONL_CHUNK):
            if bar is not None:
                bar.update(len(block))
            data = tail + block
            cut = data.rfind(b"\n") + 1
            tail, data = data[cut:], data[:cut]
            if data.strip():
                yield _parse_jsonl(data, path)
        if tail.strip():
            yield _parse_jsonl(tail, path)


def _parse_jsonl(data: bytes, path: Path) -> tuple[int, dict[str, Any]]:
    from pyarrow import json

    try:
        table = json.read_json(
            pa.BufferReader(data), read_options=json.ReadOptions(block_size=len(data) + 1)
        )
        return table.num_rows, {name: table.column(name) for name in table.column_names}
    except pa.ArrowInvalid:
        pass  # a column changes type inside this chunk: read it line by line, as text
    try:
        rows = [msgspec.json.decode(line) for line in data.splitlines() if line.strip()]
    except msgspec.DecodeError as exc:
        msg = f"{path}: not JSON Lines: {exc}"
        raise ProfileError(msg) from exc
    if not all(isinstance(row, dict) for row in rows):
        msg = f"{path}: every line must be a JSON object"
        raise ProfileError(msg)
    names = list(dict.fromkeys(key for row in rows for key in row))
    return len(rows), {name: _mixed([row.get(name) for row in rows]) for name in names}


def _mixed(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array(
            [
                v if v is None or isinstance(v, str) else msgspec.json.encode(v).decode()
                for v in values
            ],
            pa.string(),
        )


READERS: Mapping[Format, Reader] = {
    "csv": _read_csv,
    "parquet": _read_parquet,
    "jsonl": _read_jsonl,
}
