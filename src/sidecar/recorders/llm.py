"""LLM metrics (openai preset): time to first token, inter-token latency, tokens from `usage`,
finish reasons, aborted streams, and prompt and completion lengths.

`model_name` here is the model the request asked for, capped by the pipeline like every
payload-derived label; `route` tells chat, completions and embeddings apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram

from sidecar.buckets import DEFAULT_BUCKETS
from sidecar.extract.types import Generation
from sidecar.recorders.batch import observe_many
from sidecar.recorders.labels import LabelCap, OverflowCounter
from sidecar.recorders.red import MODEL_LABELS

ABORT_REASONS = ("client_disconnect", "upstream_reset", "upstream_timeout")


class LlmRecorder:
    """Owns the LLM series; children are bound once per (model, route) and reused."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        overflow: OverflowCounter,
        label_cap: int,
        buckets: Mapping[str, Sequence[float]] = DEFAULT_BUCKETS,
    ) -> None:
        labels = [*MODEL_LABELS, "route"]
        self._ttft = Histogram(
            "ml_time_to_first_token_seconds",
            "Streamed replies: from the request's arrival at the sidecar to the first event that "
            "carried output (text, reasoning or a tool call).",
            labels,
            buckets=buckets["ml_time_to_first_token_seconds"],
            unit="seconds",
            registry=registry,
        )
        self._gap = Histogram(
            "ml_time_per_output_token_seconds",
            "Streamed replies: time between consecutive output events (inter-token latency; "
            "one observation per event, and an event usually carries one token).",
            labels,
            buckets=buckets["ml_time_per_output_token_seconds"],
            unit="seconds",
            registry=registry,
        )
        self._tokens = Counter(
            "ml_tokens_total",
            "Tokens as the server's usage reported them, by kind (prompt, completion).",
            [*labels, "kind"],
            registry=registry,
        )
        self._unreported = Counter(
            "ml_tokens_unreported_total",
            "Replies without a usage report (e.g. streams whose client did not ask for "
            "stream_options.include_usage); their tokens are not estimated.",
            labels,
            registry=registry,
        )
        self._finish = Counter(
            "ml_finish_reason_total",
            "Choices that finished, by finish_reason (stop, length, tool_calls, content_filter; "
            "error for an error event in a stream); beyond the cap: __other__.",
            [*labels, "reason"],
            registry=registry,
        )
        self._aborted = Counter(
            "ml_stream_aborted_total",
            "Streamed calls that did not finish: client_disconnect (the client went away), "
            "upstream_reset or upstream_timeout (the model server cut the stream).",
            [*labels, "reason"],
            registry=registry,
        )
        self._lengths = {
            name: Histogram(
                f"ml_{name}",
                f"{what} per call: {unit}.",
                labels,
                buckets=buckets[f"ml_{name}"],
                registry=registry,
            )
            for name, what, unit in (
                ("prompt_length_chars", "Prompt length", "characters of text in the request"),
                ("prompt_length_tokens", "Prompt length", "usage.prompt_tokens"),
                ("completion_length_chars", "Completion length", "characters generated"),
                ("completion_length_tokens", "Completion length", "usage.completion_tokens"),
            )
        }
        self._reasons = LabelCap("finish_reason", limit=label_cap, overflow=overflow)
        self._children: dict[tuple[str, str, str], _Children] = {}
        self._finish_children: dict[tuple[str, str, str, str], Counter] = {}

    def record(self, model: tuple[str, str], route: str, generation: Generation) -> None:
        """One finished call."""
        children = self._bind(model, route)
        if generation.ttft is not None:
            children.ttft.observe(generation.ttft)
        if generation.token_gaps.size:
            observe_many(children.gap, generation.token_gaps)
        if generation.usage_known:
            _count_tokens(children, generation)
        else:
            children.unreported.inc()
        for reason in generation.finish_reasons:
            self._finished(model, route, reason).inc()
        if generation.prompt_chars is not None:
            children.prompt_chars.observe(generation.prompt_chars)
        if generation.completion_chars is not None:
            children.completion_chars.observe(generation.completion_chars)

    def aborted(self, model: tuple[str, str], route: str, reason: str) -> None:
        """One streamed call cut short; `reason` is the exchange's error."""
        self._aborted.labels(*model, route, reason).inc()

    def _finished(self, model: tuple[str, str], route: str, reason: str) -> Counter:
        key = (*model, route, self._reasons.fold(reason))
        child = self._finish_children.get(key)
        if child is None:
            child = self._finish_children[key] = self._finish.labels(*key)
        return child

    def _bind(self, model: tuple[str, str], route: str) -> _Children:
        key = (*model, route)
        children = self._children.get(key)
        if children is None:
            lengths = {name: histogram.labels(*key) for name, histogram in self._lengths.items()}
            children = self._children[key] = _Children(
                ttft=self._ttft.labels(*key),
                gap=self._gap.labels(*key),
                prompt_tokens=self._tokens.labels(*key, "prompt"),
                completion_tokens=self._tokens.labels(*key, "completion"),
                unreported=self._unreported.labels(*key),
                prompt_chars=lengths["prompt_length_chars"],
                prompt_length=lengths["prompt_length_tokens"],
                completion_chars=lengths["completion_length_chars"],
                completion_length=lengths["completion_length_tokens"],
            )
        return children


class _Children(NamedTuple):
    ttft: Histogram
    gap: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter
    unreported: Counter
    prompt_chars: Histogram
    prompt_length: Histogram
    completion_chars: Histogram
    completion_length: Histogram


def _count_tokens(children: _Children, generation: Generation) -> None:
    if generation.prompt_tokens is not None:
        children.prompt_tokens.inc(generation.prompt_tokens)
        children.prompt_length.observe(generation.prompt_tokens)
    if generation.completion_tokens is not None:
        children.completion_tokens.inc(generation.completion_tokens)
        children.completion_length.observe(generation.completion_tokens)
