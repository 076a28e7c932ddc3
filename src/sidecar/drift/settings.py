"""The `drift:` section of the config: where the reference comes from, the window, the verdict's
false-alarm rate and severities. Plain settings, so that the config can import them without the
recorder."""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["DriftSettings", "Kind"]

Kind = Literal["numeric", "categorical"]


class DriftSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The drift section of the config. Sizes are rows for a count window, seconds for time."""

    profile: str | None = None  # reference profile JSON; without one the first rows become it
    window: Literal["count", "time"] = "count"
    window_size: float | None = None  # default: 5000 rows, or 3600 s
    min_window: int = 500  # judge no window with fewer rows
    freeze_after: int = 1000  # rows that become the reference when there is no profile
    # Severity, in reference standard deviations of a shift (docs/drift.md, section 4).
    warning_shift: float = 0.1
    critical_shift: float = 0.5
    dataset_drift_share: float = 0.5
    noise_alpha: float = 0.01  # chance that a window with no drift flags any feature of the model
    feature_types: dict[str, Kind] = msgspec.field(default_factory=dict)  # for a frozen reference

    def __post_init__(self) -> None:
        checks = {
            "window_size must be positive": self.window_size is None or self.window_size > 0,
            "min_window must be at least 1": self.min_window >= 1,
            "freeze_after must be at least 1": self.freeze_after >= 1,
            "need 0 <= warning_shift <= critical_shift": (
                0 <= self.warning_shift <= self.critical_shift
            ),
            "dataset_drift_share must be in (0, 1]": 0 < self.dataset_drift_share <= 1,
            "noise_alpha must be in (0, 1)": 0 < self.noise_alpha < 1,
        }
        for problem, ok in checks.items():
            if not ok:
                raise ValueError(problem)

    @property
    def window_length(self) -> float:
        if self.window_size is not None:
            return self.window_size
        return 5000.0 if self.window == "count" else 3600.0
