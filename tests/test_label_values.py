"""Every label value the shipped rules and dashboards match on is pinned by a behavioural test.

A rule such as `ml_errors_total{error_type=~"upstream_.*"}` or a panel on
`sidecar_dropped_observations_total{reason="queue_full"}` goes silently empty if the sidecar
renames the value. So each value a deploy file matches on is listed here with the test that makes
a real sidecar produce it (a request through the proxy, or labels posted to /feedback) and asserts
it by name: renaming the value in src/ fails that test. This file checks the list both ways: the
deploy files match on nothing that is not in it, and each test named does name its value.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TESTS = ROOT / "tests"

_5XX = "test_proxy_failures.py::test_the_model_servers_error_answers_are_relayed_and_counted"
_QUEUE = "test_pipeline.py::test_payloads_beyond_the_record_queue_are_dropped_and_counted"
_INSTRUMENTATION = (
    "test_pipeline.py::test_unparseable_or_misshapen_answers_count_instrumentation_errors"
)
_DUPLICATE = "test_feedback.py::test_duplicate_labels_replace_the_earlier_ones"
_MATRIX = "test_feedback.py::test_labels_for_10000_predictions_give_the_reference_figures"
_REGRESSION = "test_feedback_quality.py::test_regression_mae_and_rmse_overall_and_per_segment"
_DRIFT = "test_drift_e2e.py::test_shifted_feature_is_flagged_and_others_are_not"

# Values pinned by behavioural tests: label -> value -> the test that produces it and names it.
PINNED: dict[str, dict[str, str]] = {
    # ml_errors_total. The rules match upstream_.*: every value is listed, those that must not
    # match it as much as those that must.
    "error_type": {
        "upstream_5xx": _5XX,
        "upstream_timeout": "test_proxy_failures.py::test_slow_upstream_gives_504",
        "upstream_unreachable": "test_proxy_failures.py::test_upstream_down_gives_502_json",
        "upstream_reset": "test_proxy_failures.py::test_reset_mid_body_closes_client_connection",
        "upstream_invalid": "test_hardening.py::test_a_reply_framed_two_ways_is_a_502",
        "client_4xx": _5XX,
        "client_disconnect": (
            "test_proxy_failures.py::test_client_hanging_up_mid_stream_cancels_upstream"
        ),
        "client_body_timeout": "test_hardening.py::test_a_body_that_stops_coming_gets_408",
        "request_parse": "test_pipeline.py::test_unparseable_success_counts_a_parse_error",
        "response_parse": _INSTRUMENTATION,
        "mapping": _INSTRUMENTATION,
    },
    # sidecar_dropped_observations_total
    "reason": {
        "queue_full": _QUEUE,
        "large_body_queue_full": (
            "test_big_bodies.py::test_large_payloads_beyond_the_queue_are_dropped_and_counted"
        ),
        "body_too_large": "test_pipeline.py::test_body_over_parse_limit_passes_unparsed",
    },
    # ml_feedback_total
    "result": {
        "matched": _DUPLICATE,
        "duplicate": _DUPLICATE,
        "unmatched": "test_feedback.py::test_row_bound_evicts_the_oldest_and_counts_them",
    },
    # ml_labelled_total
    "correct": {"true": _MATRIX},
    # ml_regression_labelled_total, then ml_drift_score
    "stat": {
        "rows": _REGRESSION,
        "absolute_error": _REGRESSION,
        "squared_error": _REGRESSION,
        "psi": _DRIFT,
        "ks": _DRIFT,
        "js": _DRIFT,
        "wasserstein": _DRIFT,
        "shift": _DRIFT,
    },
    # ml_drift_pit_bucket: the KS rules read each bound by name
    "le": {
        bound: _DRIFT
        for bound in (
            *("0.05", "0.1", "0.15", "0.2", "0.25", "0.3", "0.35", "0.4", "0.45", "0.5"),
            *("0.55", "0.6", "0.65", "0.7", "0.75", "0.8", "0.85", "0.9", "0.95"),
        )
    },
}

# What availability counts (deploy/prometheus/rules/recording.yml): the model server answered 5xx,
# or the sidecar got no complete answer from it. Clients and the instrumentation are not its fault.
SERVER_SIDE = {
    "upstream_5xx",
    "upstream_timeout",
    "upstream_unreachable",
    "upstream_reset",
    "upstream_invalid",
}

# Labels whose values come from elsewhere than the sidecar, and where.
NOT_THE_SIDECARS = {
    "job": "the scrape job: prometheus.yml, and the Service label the ServiceMonitor takes",
    "container": "cAdvisor's container name: deploy/kubernetes/base/deployment.yaml",
}
# Labels only the recording rules write (sidecar:slo_objective:ratio, ...:quantile5m): a value
# matched on must be one that a rule writes.
RULES_OWN = {"slo", "quantile"}

_SELECTOR = re.compile(r"\{([^{}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"')
_WORDS = re.compile(r"\w+(?:\|\w+)*")


def matchers(text: str) -> Iterator[tuple[str, str, str]]:
    """The (label, operator, value) of every label matcher with a literal value in `text`.

    >>> list(matchers('rate(a{x="1", y=~"b|c"}[5m]) / b{model_name=~"$model_name"}'))
    [('x', '=', '1'), ('y', '=~', 'b|c')]
    """
    for selector in _SELECTOR.findall(text):
        for label, operator, value in _MATCHER.findall(selector):
            if not value.startswith("$"):  # a Grafana variable
                yield label, operator, value


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def deploy_documents() -> dict[str, list[Any]]:
    """Rule files (Prometheus's and the PrometheusRule) and dashboards, parsed, by path."""
    prometheus = DEPLOY / "prometheus"
    rules = [
        path
        for path in prometheus.rglob("*.yml")
        if path.name != "prometheus.yml" and "tests" not in path.relative_to(prometheus).parts
    ]
    rules.append(DEPLOY / "kubernetes" / "base" / "prometheusrule.yaml")
    documents = {
        str(path.relative_to(ROOT)): [
            doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc
        ]
        for path in rules
    }
    for path in (DEPLOY / "grafana" / "dashboards").glob("*.json"):
        documents[str(path.relative_to(ROOT))] = [json.loads(path.read_text(encoding="utf-8"))]
    return documents


def used() -> dict[tuple[str, str, str], set[str]]:
    """Every (label, operator, value) matched on, with the deploy files that do."""
    found: dict[tuple[str, str, str], set[str]] = {}
    for path, documents in deploy_documents().items():
        for text in _strings(documents):
            for matcher in matchers(text):
                found.setdefault(matcher, set()).add(path)
    return found


def _rules(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if "record" in node or "alert" in node:
            yield node
        for value in node.values():
            yield from _rules(value)
    elif isinstance(node, list):
        for value in node:
            yield from _rules(value)


def written_by_rules() -> set[tuple[str, str]]:
    """(label, value) pairs the recording rules attach themselves, such as slo="latency"."""
    return {
        (label, str(value))
        for documents in deploy_documents().values()
        for rule in _rules(documents)
        if "record" in rule
        for label, value in (rule.get("labels") or {}).items()
    }


def test_matchers_are_read_with_their_operator_and_without_grafana_variables() -> None:
    """Literal matchers come out as (label, operator, value); `$variables` and templates not."""
    text = 'sum(rate(m{a="x", b !~ "y|z", c=~"$c"}[5m])) and on () n{d="{{ w }}"}'
    assert list(matchers(text)) == [("a", "=", "x"), ("b", "!~", "y|z")]
    assert list(matchers("{{ $labels.instance }}: {{ $value | humanize }}")) == []


def test_the_deploy_files_match_on_the_values_this_file_knows() -> None:
    """The extraction finds what the rules do match on (so that an empty result cannot pass)."""
    matched = used()
    assert ("error_type", "=~", "upstream_.*") in matched
    assert ("reason", "=~", "queue_full|large_body_queue_full") in matched
    assert ("result", "=~", "matched|duplicate") in matched


def test_every_value_matched_on_is_pinned_or_not_the_sidecars() -> None:
    """Literal values must be pinned; an alternation of words must be pinned word by word; any
    other regular expression must match at least one pinned value. Labels the rules write
    (slo, quantile) must match what they write; those of other systems (job, container) are
    not the sidecar's to pin."""
    by_rules = written_by_rules()
    problems = []
    for (label, operator, value), paths in sorted(used().items()):
        pinned = PINNED.get(label, {})
        where = ", ".join(sorted(paths))
        if label in NOT_THE_SIDECARS:
            continue
        if label in RULES_OWN:
            missing = set() if (label, value) in by_rules else {f"{value} (no rule writes it)"}
        elif operator in ("=", "!="):
            missing = set() if value in pinned else {value}
        elif _WORDS.fullmatch(value):
            missing = set(value.split("|")) - pinned.keys()
        else:
            matching = {v for v in pinned if re.fullmatch(value, v)}
            missing = set() if matching else {f"anything matching {value!r}"}
        if missing:
            problems.append(f'{label}{operator}"{value}" in {where}: {sorted(missing)} not pinned')
    assert problems == [], "\n".join(problems)


def test_availability_counts_exactly_the_server_side_error_types() -> None:
    """Each error_type regex of the rules matches exactly the server-side error types among
    those pinned: no client's and no instrumentation failure counts against availability."""
    regexes = [value for (label, op, value) in used() if label == "error_type" and op == "=~"]
    assert regexes
    for regex in regexes:
        assert {v for v in PINNED["error_type"] if re.fullmatch(regex, v)} == SERVER_SIDE, regex


def _test_strings(reference: str) -> set[str]:
    """The string literals in one test function (decorators included) and in the module-level
    constants it names."""
    file, name = reference.split("::")
    module = ast.parse((TESTS / file).read_text(encoding="utf-8"))
    functions = [
        node
        for node in module.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name
    ]
    assert functions, f"{reference}: no such test"
    names = {node.id for node in ast.walk(functions[0]) if isinstance(node, ast.Name)}
    constants = [
        node
        for node in module.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id in names for t in node.targets)
    ]
    return {
        node.value
        for tree in (functions[0], *constants)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


@pytest.mark.parametrize(
    ("label", "value"), [(label, value) for label, values in PINNED.items() for value in values]
)
def test_the_test_named_for_a_value_names_it(label: str, value: str) -> None:
    """The claim above holds at least on paper: the named test exists and spells the value."""
    reference = PINNED[label][value]
    assert value in _test_strings(reference), f"{reference} never spells {value!r}"
