"""Model-output metrics: predicted classes, confidence, low-confidence counts, regression values
and batch size, recorded per batch."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Mapping, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from sidecar.buckets import DEFAULT_BUCKETS
from sidecar.extract.types import Outputs
from sidecar.recorders.batch import observe_many
from sidecar.recorders.labels import Children, LabelCap, OverflowCounter
from sidecar.recorders.red import MODEL_LABELS


class OutputRecorder:
    """Counts what the model answered. Class names come from payloads, so they are capped."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        overflow: OverflowCounter,
        label_cap: int,
        low_confidence_threshold: float,
        buckets: Mapping[str, Sequence[float]] = DEFAULT_BUCKETS,
    ) -> None:
        self._overflow = overflow
        self._label_cap = label_cap
        self.low_confidence_threshold = low_confidence_threshold
        self._classes: dict[tuple[str, str], LabelCap] = {}
        self._predictions = Children(
            Counter(
                "ml_predictions_total",
                "Predicted rows by class, one per row; classes beyond the cap count as __other__.",
                [*MODEL_LABELS, "class"],
                registry=registry,
            )
        )
        self._confidence = Children(
            Histogram(
                "ml_prediction_confidence",
                "Confidence of the predicted class (the highest probability), per row.",
                MODEL_LABELS,
                buckets=buckets["ml_prediction_confidence"],
                registry=registry,
            )
        )
        self._low_confidence = Children(
            Counter(
                "ml_low_confidence_predictions_total",
                "Rows with confidence below low_confidence_threshold "
                f"({low_confidence_threshold}).",
                MODEL_LABELS,
                registry=registry,
            )
        )
        self._value = Children(
            Histogram(
                "ml_prediction_value",
                "Regression outputs, per row.",
                MODEL_LABELS,
                buckets=buckets["ml_prediction_value"],
                registry=registry,
            )
        )
        self._batch = Children(
            Histogram(
                "ml_batch_size",
                "Rows per request.",
                [*MODEL_LABELS, "route"],
                buckets=buckets["ml_batch_size"],
                registry=registry,
            )
        )

    def record(
        self, model: tuple[str, str], route: str, outputs: Outputs, batch_sizes: Sequence[int]
    ) -> None:
        """Record the outputs of one exchange, or of several read as one (sidecar.extract.batch):
        `batch_sizes` holds the rows of each (a 0, nothing read, is not a batch size)."""
        if len(batch_sizes) == 1:
            if batch_sizes[0]:
                self._batch(*model, route).observe(batch_sizes[0])
        elif batch_sizes:
            sizes = np.asarray(batch_sizes, dtype=np.float64)
            observe_many(self._batch(*model, route), sizes[sizes > 0])
        if outputs.classes is not None and outputs.classes.size:
            self._count_classes(model, outputs.classes)
        if outputs.confidence is not None and outputs.confidence.size:
            observe_many(self._confidence(*model), outputs.confidence)
            low = int(np.count_nonzero(outputs.confidence < self.low_confidence_threshold))
            if low:
                self._low_confidence(*model).inc(low)
        if outputs.value is not None and outputs.value.size:
            observe_many(self._value(*model), outputs.value)

    def _count_classes(self, model: tuple[str, str], classes: np.ndarray) -> None:
        cap = self._classes.get(model)
        if cap is None:
            cap = self._classes[model] = LabelCap(
                "class", limit=self._label_cap, overflow=self._overflow
            )
        # Labels are Python objects (str, or None for a row without one): counted in C, a few
        # distinct values.
        for name, count in Tally(classes.tolist()).items():
            self._predictions(*model, cap.fold(str(name))).inc(count)
