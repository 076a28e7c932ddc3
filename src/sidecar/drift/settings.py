"""The `drift:` section of the config: where the reference comes from, the window, thresholds.
Plain settings, so that the config can import them without the recorder."""

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
    psi_warning: float = 0.1
    psi_critical: float = 0.25
    ks_warning: float = 0.1
    ks_critical: float = 0.15
    dataset_drift_share: float = 0.5
    noise_alpha: float = 0.01  # no-drift false-alarm rate the noise floors allow per statistic
    feature_types: dict[str, Kind] = msgspec.field(default_factory=dict)  # for a frozen reference

    def __post_init__(self) -> None:
        checks = {
            "window_size must be positive": self.window_size is None or self.window_size > 0,
            "min_window must be at least 1": self.min_window >= 1,
            "freeze_after must be at least 1": self.freeze_after >= 1,
            "need 0 < psi_warning <= psi_critical": 0 < self.psi_warning <= self.psi_critical,
            "need 0 < ks_warning <= ks_critical": 0 < self.ks_warning <= self.ks_critical,
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
