"""`sidecar profile build` and `sidecar profile show`: make and read reference profiles."""

from __future__ import annotations

import argparse
import sys

from sidecar.drift import profile as profiles

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `profile build` and `profile show`; argparse sets `handler` to the one chosen."""
    profile = subparsers.add_parser(
        "profile",
        help="build or show a reference profile for drift detection",
        description="Reference profiles describe the training data that drift is measured against.",
    )
    commands = profile.add_subparsers(dest="profile_command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build",
        help="profile a CSV, Parquet or JSON Lines file",
        description=(
            "Read DATA in two streaming passes (files larger than memory work) and write the "
            "profile: up to 20 equal-mass bins (whole values: ties never split), CDF, mean, std "
            "and missing share per numeric column; "
            "the top-K values per categorical column. Types are inferred from the first batch."
        ),
    )
    build.add_argument("data", metavar="DATA", help="training data: .csv, .parquet or .jsonl")
    build.add_argument("-o", "--output", required=True, metavar="FILE", help="profile to write")
    build.add_argument("--categorical", nargs="+", action="extend", default=[], metavar="COL")
    build.add_argument("--numeric", nargs="+", action="extend", default=[], metavar="COL")
    build.add_argument(
        "--ignore",
        nargs="+",
        action="extend",
        default=[],
        metavar="COL",
        help="columns to leave out (ids, labels that are not model outputs)",
    )
    build.add_argument(
        "--top-k",
        type=int,
        default=profiles.DEFAULT_TOP_K,
        metavar="K",
        help=f"values kept per categorical column (default {profiles.DEFAULT_TOP_K}, "
        f"at most {profiles.MAX_TOP_K})",
    )
    build.add_argument("--class-column", metavar="C", help="predicted class -> __class__")
    build.add_argument("--confidence-column", metavar="C", help="confidence -> __confidence__")
    build.add_argument("--value-column", metavar="C", help="regression value -> __value__")
    build.add_argument(
        "--format", choices=("csv", "parquet", "jsonl"), help="when the file name does not say"
    )
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(handler=_build)

    show = commands.add_parser("show", help="print a profile as a table")
    show.add_argument("profile", metavar="PROFILE", help="profile JSON")
    show.set_defaults(handler=_show)


def _build(args: argparse.Namespace) -> int:
    # Imported here: pyarrow is for this command alone, not for `sidecar serve`.
    try:
        from sidecar.drift import build as builder
    except ModuleNotFoundError as exc:
        if exc.name != "pyarrow":
            raise
        print(
            "sidecar: profile build reads files through pyarrow, which is not installed: "
            "pip install 'sidecar[profile]'",
            file=sys.stderr,
        )
        return 2

    try:
        profile = builder.build(
            args.data,
            categorical=args.categorical,
            numeric=args.numeric,
            ignore=args.ignore,
            top_k=args.top_k,
            class_column=args.class_column,
            confidence_column=args.confidence_column,
            value_column=args.value_column,
            fmt=args.format,
            progress=not args.quiet,
        )
        profiles.save(profile, args.output)
    except (profiles.ProfileError, OSError) as exc:
        return _fail(exc)
    features = len(profile.features) + len(profile.outputs)
    print(
        f"wrote {args.output}: {profile.rows} rows, {features} columns, "
        f"hash {profiles.content_hash(profile)}"
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    try:
        profile = profiles.load(args.profile)
    except profiles.ProfileError as exc:
        return _fail(exc)
    print(summary(profile))
    return 0


def _fail(exc: Exception) -> int:
    print(f"sidecar profile: error: {exc}", file=sys.stderr)
    return 2


def summary(profile: profiles.Profile) -> str:
    """A fixed-width table: one line per feature, then one per output."""
    head = (
        f"profile v{profile.version}  hash {profiles.content_hash(profile)}  "
        f"rows {profile.rows}  source {profile.source or '-'}"
    )
    columns = ("feature", "kind", "missing", "bins", "mean", "std", "min", "max / top values")
    rows = [_row(f) for f in (*profile.features, *profile.outputs)]
    widths = [max(len(r[i]) for r in (columns, *rows)) for i in range(len(columns) - 1)]
    lines = [head, ""]
    for row in (columns, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _row(feature: profiles.Feature) -> tuple[str, ...]:
    missing = f"{feature.missing / feature.count:.1%}" if feature.count else "-"
    if isinstance(feature, profiles.NumericFeature):
        return (
            feature.name,
            "numeric",
            missing,
            str(max(len(feature.edges) - 1, 0)),
            _number(feature.mean),
            _number(feature.std),
            _number(feature.min),
            _number(feature.max),
        )
    top = ", ".join(
        f"{v} {feature.fractions[k]:.1%}"
        for v, k in zip(feature.values[:3], feature.fractions, strict=False)
    )
    more = f" (+{len(feature.values) - 3} more)" if len(feature.values) > 3 else ""
    return (feature.name, "categorical", missing, str(len(feature.values)), "", "", "", top + more)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
