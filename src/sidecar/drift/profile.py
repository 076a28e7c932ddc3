"""The reference profile: what "no drift" looks like, as a versioned JSON document.

drift/summary.py makes one from columns of data (the drift recorder does, from live windows);
drift/build.py from a training-data file. Profiles are versioned JSON (``"version": 1``);
`content_hash` names one in metric labels.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np

from sidecar.drift.sketches import categorical_labels, numeric_labels
from sidecar.files import write_atomically

__all__ = [
    "CLASS",
    "CONFIDENCE",
    "DEFAULT_TOP_K",
    "MAX_TOP_K",
    "OUTPUT_KINDS",
    "VALUE",
    "VERSION",
    "CategoricalFeature",
    "Feature",
    "Kind",
    "NumericFeature",
    "Profile",
    "ProfileError",
    "content_hash",
    "load",
    "save",
    "validate",
]

VERSION = 1
DEFAULT_TOP_K = 20
MAX_TOP_K = 50

CLASS, CONFIDENCE, VALUE = "__class__", "__confidence__", "__value__"
Kind = Literal["numeric", "categorical"]
OUTPUT_KINDS: Mapping[str, Kind] = {CLASS: "categorical", CONFIDENCE: "numeric", VALUE: "numeric"}


class ProfileError(ValueError):
    """A profile (or the data it is built from) is unusable; the message says where and why."""


# --- the document -------------------------------------------------------------------------------


class NumericFeature(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="numeric", tag_field="kind"
):
    """A numeric column. Counts are rows; `mean`..`max` are over finite values only."""

    name: str
    count: int
    missing: int  # absent or null
    nan: int  # present but not a number
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    edges: list[float]  # B+1 equal-mass edges, min .. max; empty if no finite value
    fractions: dict[str, float]  # bin label -> share of `count`, layout order
    cdf_x: list[float]  # knots, strictly increasing
    cdf_below: list[float]  # F(x-) among values that are numbers
    cdf_at: list[float]  # F(x)


class CategoricalFeature(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="categorical", tag_field="kind"
):
    """A categorical column: its top-K values; everything else shares the `unseen` bin."""

    name: str
    count: int
    missing: int
    values: list[str]
    fractions: dict[str, float]


Feature = NumericFeature | CategoricalFeature


class Profile(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A reference profile. `outputs` uses the names __class__, __confidence__ and __value__."""

    version: int = VERSION
    source: str = ""  # file name it was built from; not part of the content hash
    rows: int
    bins: int
    top_k: int
    features: list[Feature]
    outputs: list[Feature] = msgspec.field(default_factory=list)


class _Header(msgspec.Struct):
    version: int


def content_hash(profile: Profile) -> str:
    """Short stable hash of what the profile says (not where it came from), for metric labels."""
    body = msgspec.json.encode(msgspec.structs.replace(profile, source=""), order="deterministic")
    return hashlib.sha256(body).hexdigest()[:16]


def save(profile: Profile, path: str | os.PathLike[str]) -> None:
    """Write the profile as indented JSON, atomically (a reader never sees half a file)."""
    text = msgspec.json.format(msgspec.json.encode(profile), indent=2) + b"\n"
    write_atomically(Path(path), text)


def load(path: str | os.PathLike[str]) -> Profile:
    """Read and validate a profile; every problem is a ProfileError naming the file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        msg = f"{path}: cannot read profile: {exc.strerror or exc}"
        raise ProfileError(msg) from exc
    if not raw.strip():
        msg = f"profile {path} is empty; make one with `sidecar profile build`"
        raise ProfileError(msg)
    try:
        version = msgspec.json.decode(raw, type=_Header).version
        if version != VERSION:
            msg = f"unsupported profile version {version} (this sidecar reads version {VERSION})"
            raise ProfileError(msg)
        profile = msgspec.json.decode(raw, type=Profile)
        validate(profile)
    except (msgspec.ValidationError, ProfileError) as exc:  # JSON, but not a valid profile
        msg = f"{path}: {exc}"
        raise ProfileError(msg) from exc
    except msgspec.DecodeError as exc:  # not JSON at all, often a copy cut short
        msg = f"profile {path} is truncated or not a profile: {_json_problem(exc, raw)}"
        raise ProfileError(msg) from exc
    return profile


def _json_problem(error: msgspec.DecodeError, raw: bytes) -> str:
    """msgspec's reason, in words where its own would puzzle ("Input data was truncated")."""
    if str(error) == "Input data was truncated":
        return f"its {len(raw)} bytes end in the middle of the JSON document"
    return str(error)


def validate(profile: Profile) -> None:
    """Check what the types cannot: labels, monotone edges and CDFs, fractions summing to 1."""
    if not 1 <= profile.top_k <= MAX_TOP_K:
        msg = f"top_k is {profile.top_k}; it must be between 1 and {MAX_TOP_K}"
        raise ProfileError(msg)
    names = [f.name for f in (*profile.features, *profile.outputs)]
    if len(set(names)) != len(names):
        msg = f"duplicate feature names in {names}"
        raise ProfileError(msg)
    for output in profile.outputs:
        if OUTPUT_KINDS.get(output.name) != _kind(output):
            msg = f"output {output.name!r}: expected one of {dict(OUTPUT_KINDS)}"
            raise ProfileError(msg)
    for feature in (*profile.features, *profile.outputs):
        problem = _problem(feature)
        if problem:
            msg = f"feature {feature.name!r}: {problem}"
            raise ProfileError(msg)


def _kind(feature: Feature) -> Kind:
    return "numeric" if isinstance(feature, NumericFeature) else "categorical"


def _problem(feature: Feature) -> str | None:
    if not 0 <= feature.missing <= feature.count:
        return f"missing count {feature.missing} is outside 0..{feature.count}"
    if isinstance(feature, NumericFeature):
        return _numeric_problem(feature)
    if len(set(feature.values)) != len(feature.values) or len(feature.values) > MAX_TOP_K:
        return f"values must be distinct and at most {MAX_TOP_K}"
    return _fractions_problem(feature, categorical_labels(feature.values))


def _numeric_problem(feature: NumericFeature) -> str | None:
    edges = np.asarray(feature.edges, dtype=np.float64)
    if edges.size == 1 or edges.size > 101:
        return f"has {edges.size} edges; expected 0 or 2..101"
    if edges.size and not (np.all(np.diff(edges[:-1]) > 0) and edges[-1] >= edges[-2]):
        return "edges must increase"
    x, below, at = (
        np.asarray(v, dtype=np.float64) for v in (feature.cdf_x, feature.cdf_below, feature.cdf_at)
    )
    if not x.size == below.size == at.size:
        return "cdf_x, cdf_below and cdf_at must have the same length"
    if np.any(np.diff(x) <= 0) or np.any(below > at) or np.any(np.diff(at) < 0):
        return "the CDF must increase"
    if x.size and (below.min() < 0 or at.max() > 1 + 1e-9):
        return "CDF values must lie in [0, 1]"
    return _fractions_problem(feature, numeric_labels(max(edges.size - 1, 0)))


def _fractions_problem(feature: Feature, labels: list[str]) -> str | None:
    if list(feature.fractions) != labels:
        return f"fractions must have the labels {labels}, in that order"
    values = np.fromiter(feature.fractions.values(), dtype=np.float64)
    total = float(values.sum())
    if np.any(values < 0) or (feature.count and abs(total - 1.0) > 1e-6):
        return f"fractions must be non-negative and sum to 1 (they sum to {total:.9g})"
    return None
