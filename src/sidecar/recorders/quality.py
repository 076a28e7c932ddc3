"""Data-quality metrics on request features: missing, NaN, infinite, wrongly typed, out of range.

Counts come from column-wise numpy reductions over the whole batch. Feature names can come from
payloads (record keys), so they are capped like any other payload-derived label.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry, Counter

from sidecar.config import FeatureRule
from sidecar.extract.types import FeatureTable
from sidecar.recorders.labels import LabelCap, OverflowCounter
from sidecar.recorders.red import MODEL_LABELS


class QualityRecorder:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        rules: Mapping[str, FeatureRule],
        overflow: OverflowCounter,
        label_cap: int,
    ) -> None:
        self.rules = rules
        self._overflow = overflow
        self._label_cap = label_cap
        self._features: dict[tuple[str, str], LabelCap] = {}
        self._missing = Counter(
            "ml_feature_missing_total",
            "Feature cells absent or null in requests.",
            [*MODEL_LABELS, "feature"],
            registry=registry,
        )
        self._invalid = Counter(
            "ml_feature_invalid_total",
            "Feature cells present but unusable, by reason: nan, inf, wrong_type (not a number "
            "for a numeric feature), out_of_range (outside the configured min/max).",
            [*MODEL_LABELS, "feature", "reason"],
            registry=registry,
        )

    def record(self, model: tuple[str, str], table: FeatureTable) -> None:
        if table.n_rows == 0:
            return
        numeric = table.numeric
        present = ~table.missing
        counts = {
            "missing": table.missing.sum(axis=0),
            "nan": (np.isnan(numeric) & present & ~table.non_numeric).sum(axis=0),
            "inf": np.isinf(numeric).sum(axis=0),
            "wrong_type": table.non_numeric.sum(axis=0),
            "out_of_range": self._out_of_range(table.columns, numeric),
        }
        names = self._fold_names(model, table.columns)
        for reason, per_column in counts.items():
            for column in np.flatnonzero(per_column):
                name = names[column]
                if reason == "wrong_type" and self._is_categorical(table.columns[column]):
                    continue
                amount = int(per_column[column])
                if reason == "missing":
                    self._missing.labels(*model, name).inc(amount)
                else:
                    self._invalid.labels(*model, name, reason).inc(amount)

    def _out_of_range(
        self, columns: tuple[str, ...], numeric: NDArray[np.float64]
    ) -> NDArray[np.int64]:
        counts = np.zeros(len(columns), dtype=np.int64)
        for index, column in enumerate(columns):
            rule = self.rules.get(column)
            if rule is not None and rule.type == "numeric":
                values = numeric[:, index]
                with np.errstate(invalid="ignore"):
                    counts[index] = np.count_nonzero((values < rule.min) | (values > rule.max))
        return counts

    def _is_categorical(self, column: str) -> bool:
        rule = self.rules.get(column)
        return rule is not None and rule.type == "categorical"

    def _fold_names(self, model: tuple[str, str], columns: tuple[str, ...]) -> list[str]:
        cap = self._features.get(model)
        if cap is None:
            cap = self._features[model] = LabelCap(
                "feature", limit=self._label_cap, overflow=self._overflow
            )
        return [cap.fold(column) for column in columns]
