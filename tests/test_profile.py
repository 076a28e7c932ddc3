"""Reference profiles: streaming builds from CSV, Parquet and JSON Lines, save/load, the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pv
import pyarrow.parquet as pq
import pytest

from sidecar.drift import build as builder
from sidecar.drift import cli as profile_cli
from sidecar.drift import profile as profiles
from sidecar.drift import sources as profile_io
from sidecar.drift import summary

ROWS = 6000


def training_table(rows: int = ROWS, seed: int = 0) -> pa.Table:
    """Mixed training data: nulls, ties, a long-tailed categorical, outputs."""
    rng = np.random.default_rng(seed)
    age = rng.normal(40, 12, rows).round(2)
    users = np.minimum(rng.zipf(1.3, rows), 3000)
    return pa.table(
        {
            "age": pa.array(age, mask=rng.random(rows) < 0.05),
            "spend": np.where(rng.random(rows) < 0.4, 0.0, rng.exponential(50, rows).round(2)),
            "visits": pa.array(rng.poisson(3, rows), mask=rng.random(rows) < 0.02),
            "city": pa.array(
                rng.choice(["paris", "lyon", "nice"], rows), mask=rng.random(rows) < 0.1
            ),
            "user": [f"u{u}" for u in users],
            "member": rng.random(rows) < 0.3,
            "pred": rng.choice(["yes", "no"], rows, p=[0.3, 0.7]),
            "conf": rng.random(rows).round(4),
        }
    )


def write(table: pa.Table, path: Path) -> Path:
    if path.suffix == ".csv":
        pv.write_csv(table, path)
    elif path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=1000)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    return path


def build(path: Path, **options: object) -> profiles.Profile:
    kwargs = {"class_column": "pred", "confidence_column": "conf", "progress": False}
    return builder.build(path, **{**kwargs, **options})  # type: ignore[arg-type]


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force many small batches, so the streaming (multi-batch) path is what runs."""
    monkeypatch.setattr(profile_io, "CSV_BLOCK", 8192)
    monkeypatch.setattr(profile_io, "PARQUET_BATCH", 700)
    monkeypatch.setattr(profile_io, "JSONL_CHUNK", 8192)


@pytest.mark.usefixtures("small_batches")
def test_csv_parquet_and_jsonl_stream_to_the_same_profile(tmp_path):
    """Small batches in three formats give one profile, and the same as one big batch."""
    table = training_table()
    built = [build(write(table, tmp_path / f"train.{ext}")) for ext in ("csv", "parquet", "jsonl")]
    assert built[0].features == built[1].features == built[2].features
    assert built[0].outputs == built[1].outputs == built[2].outputs
    assert len({profiles.content_hash(p) for p in built}) == 1
    single = summary.build_from_batches(
        lambda: [(ROWS, {n: builder._convert(table[n], k, ROWS) for n, k in kinds(built[1])})],
        [(f.name, kind(f)) for f in built[1].features],
        [(o.name, kind(o)) for o in built[1].outputs],
    )
    assert [f.fractions for f in single.features] == [f.fractions for f in built[1].features]


def kind(feature: profiles.Feature) -> profiles.Kind:
    return "numeric" if isinstance(feature, profiles.NumericFeature) else "categorical"


def kinds(profile: profiles.Profile) -> list[tuple[str, profiles.Kind]]:
    names = {"__class__": "pred", "__confidence__": "conf"}
    return [(names.get(f.name, f.name), kind(f)) for f in (*profile.features, *profile.outputs)]


def test_types_are_inferred_from_the_data(tmp_path):
    """Numbers are numeric, text and booleans categorical, outputs take their own names."""
    profile = build(write(training_table(), tmp_path / "train.parquet"))
    assert [(f.name, kind(f)) for f in profile.features] == [
        ("age", "numeric"),
        ("spend", "numeric"),
        ("visits", "numeric"),
        ("city", "categorical"),
        ("user", "categorical"),
        ("member", "categorical"),
    ]
    assert [(o.name, kind(o)) for o in profile.outputs] == [
        ("__class__", "categorical"),
        ("__confidence__", "numeric"),
    ]


def test_numeric_fractions_and_moments_are_exact(tmp_path):
    """Bin shares are exact counts over the whole file; missing share and moments too."""
    table = training_table()
    profile = build(write(table, tmp_path / "train.csv"))
    age = next(f for f in profile.features if f.name == "age")
    assert isinstance(age, profiles.NumericFeature)
    values = table["age"].to_numpy(zero_copy_only=False).astype(float)
    present = values[~np.isnan(values)]
    edges = np.asarray(age.edges)
    counts = np.histogram(present, bins=edges)[0]  # numpy closes the last bin as we do
    assert list(age.fractions.values())[1:21] == pytest.approx(counts / ROWS, abs=1e-12)
    assert age.fractions["missing"] == pytest.approx(np.isnan(values).mean())
    assert age.mean == pytest.approx(present.mean(), rel=1e-9)
    assert age.std == pytest.approx(present.std(), rel=1e-9)
    assert age.min == present.min()
    assert age.max == present.max()


def test_heavily_tied_numeric_gets_discrete_bins(tmp_path):
    """A Poisson count column has a bin per value, cut half-way between values; zero-inflated
    spend has a bin for the zeros alone, cut half-way to the smallest positive spend."""
    data = training_table()
    profile = build(write(data, tmp_path / "train.parquet"))
    spend = next(f for f in profile.features if f.name == "spend")
    visits = next(f for f in profile.features if f.name == "visits")
    assert isinstance(spend, profiles.NumericFeature)
    assert isinstance(visits, profiles.NumericFeature)
    zero = np.asarray(data["spend"]) == 0
    assert spend.fractions["b00"] == zero.mean()  # exactly the zeros
    assert spend.edges[1] == np.asarray(data["spend"])[~zero].min() / 2
    assert np.all(np.asarray(visits.edges[1:-1]) % 1 == 0.5)


@pytest.mark.usefixtures("small_batches")
def test_categorical_with_many_values_keeps_the_top_k(tmp_path, monkeypatch):
    """600 users stream through a 200-value summary; the exact top 10 survive, the rest is
    unseen."""
    monkeypatch.setattr(summary, "SUMMARY_SIZE", 200)
    table = training_table()
    assert len(set(table["user"].to_pylist())) > 3 * summary.SUMMARY_SIZE
    profile = build(write(table, tmp_path / "train.csv"), top_k=10)
    user = next(f for f in profile.features if f.name == "user")
    assert isinstance(user, profiles.CategoricalFeature)
    values, counts = np.unique(np.array(table["user"].to_pylist()), return_counts=True)
    order = np.lexsort((values, -counts))[:10]
    assert user.values == values[order].tolist()
    assert [user.fractions[v] for v in user.values] == pytest.approx(counts[order] / ROWS)
    assert user.fractions["unseen"] == pytest.approx(1 - counts[order].sum() / ROWS)


def test_overrides_change_inferred_types(tmp_path):
    """--categorical turns numbers into labels ("3", not "3.0"); --numeric parses text, and text
    that is not a number counts in the `nan` bin."""
    path = tmp_path / "t.csv"
    path.write_text("code,size\n3,1.5\n4,big\n3,2.5\n,3\n")
    profile = builder.build(path, categorical=["code"], numeric=["size"], progress=False)
    code, size = profile.features
    assert isinstance(code, profiles.CategoricalFeature)
    assert isinstance(size, profiles.NumericFeature)
    assert code.values == ["3", "4"]
    assert code.fractions["missing"] == 0.25
    assert size.nan == 1
    assert size.fractions["nan"] == 0.25


def test_profile_survives_save_and_load(tmp_path):
    """Saved JSON carries version 1 and loads back equal; the hash ignores the source name."""
    profile = build(write(training_table(800), tmp_path / "train.parquet"))
    profiles.save(profile, tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["version"] == 1
    loaded = profiles.load(tmp_path / "p.json")
    assert loaded == profile
    renamed = msgspec.structs.replace(profile, source="elsewhere.csv")
    assert profiles.content_hash(renamed) == profiles.content_hash(profile)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(version=2), "unsupported profile version 2"),
        (lambda d: d.update(colour="red"), "unknown field `colour`"),
        (lambda d: d["features"][0]["fractions"].update(b00=0.9), "sum to 1"),
        (lambda d: d["features"][0]["fractions"].pop("nan"), "labels"),
        (lambda d: d["features"][0]["edges"].reverse(), "edges must increase"),
        (lambda d: d.update(top_k=99), "top_k is 99"),
    ],
)
def test_load_names_what_is_wrong(tmp_path, change, message):
    """A damaged profile fails to load with a ProfileError naming the file and the problem."""
    profile = build(write(training_table(500), tmp_path / "train.parquet"))
    document = json.loads(msgspec.json.encode(profile))
    change(document)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(profiles.ProfileError, match=message) as error:
        profiles.load(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"categorical": ["nope"]}, "no column named 'nope'"),
        ({"categorical": ["age"], "numeric": ["age"]}, "both categorical and numeric"),
        ({"top_k": 51}, "top-k must be between 1 and 50"),
    ],
)
def test_build_rejects_bad_options(tmp_path, options, message):
    """Unknown columns, contradictory types and a top-k over 50 are errors that say so."""
    path = write(training_table(300), tmp_path / "train.parquet")
    with pytest.raises(profiles.ProfileError, match=message):
        builder.build(path, progress=False, **options)


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="sidecar")
    profile_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_cli_builds_then_shows_a_profile(tmp_path, capsys):
    """`profile build` writes the file and reports its hash; `profile show` prints a table."""
    data = write(training_table(1000), tmp_path / "train.jsonl")
    out = tmp_path / "p.json"
    assert (
        cli(
            "profile",
            "build",
            str(data),
            "-o",
            str(out),
            "--class-column",
            "pred",
            "--categorical",
            "visits",
            "--top-k",
            "5",
            "--quiet",
        )
        == 0
    )
    assert profiles.content_hash(profiles.load(out)) in capsys.readouterr().out
    assert cli("profile", "show", str(out)) == 0
    shown = capsys.readouterr().out
    assert "age" in shown
    assert "numeric" in shown
    assert "__class__" in shown
    assert "categorical" in shown


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    """A missing file or column prints one `error:` line on stderr and returns 2."""
    assert cli("profile", "show", str(tmp_path / "none.json")) == 2
    assert cli("profile", "build", str(tmp_path / "none.csv"), "-o", str(tmp_path / "p")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert all(line.startswith("sidecar profile: error: ") for line in lines)
