"""Settings: one typed, frozen Config, merged from a YAML file, SIDECAR_* variables and flags.

Precedence is flags over environment over file over defaults. Every error names the key, the value
and what was expected, and says where the value came from.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec
import msgspec.inspect

from sidecar.buckets import check_buckets
from sidecar.drift.settings import DriftSettings
from sidecar.extract.presets import PRESETS
from sidecar.extract.spec import MappingSpec
from sidecar.feedback.settings import FeedbackSettings

LogLevel = Literal["debug", "info", "warning", "error"]

ENV_PREFIX = "SIDECAR_"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "*"})


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong kind."""


class RouteConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One entry of the route table: a name for the `route` label and how to read its payloads."""

    name: str
    path: str
    method: str = "*"
    preset: str | None = None
    mapping: MappingSpec | None = None
    inject_usage: bool | None = None  # generative presets only; None: the top-level one

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            msg = f"path {self.path!r} must start with '/'"
            raise ValueError(msg)
        if self.method.upper() not in HTTP_METHODS:
            msg = f"method {self.method!r} is not one of {sorted(HTTP_METHODS)}"
            raise ValueError(msg)
        _check_preset(self.preset)
        _check_generative_mapping(self.preset, self.mapping)
        if self.inject_usage and not _generative(self.preset):
            msg = f"inject_usage applies to routes with preset {_GENERATIVE} only"
            raise ValueError(msg)


class FeatureRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Data-quality expectations for one feature: values outside [min, max] are out of range."""

    min: float = -math.inf
    max: float = math.inf
    type: Literal["numeric", "categorical"] = "numeric"


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Every setting of `sidecar serve`. Field names are the YAML keys and the SIDECAR_* names."""

    upstream: str
    host: str = "0.0.0.0"  # a sidecar listens on the pod's interfaces by design
    port: int = 8080  # the model servers' usual port, taken on purpose: docs/deploy.md#5-ports
    metrics_host: str | None = None
    # 9101 is no supported model server's port, nor Prometheus's, nor a KServe/Knative pod's
    # (docs/deploy.md#5-ports); 8081 was MLServer's and KServe's gRPC, TorchServe's management.
    metrics_port: int = 9101
    upstream_timeout: float = 60.0
    connect_timeout: float = 5.0
    client_send_timeout: float = 60.0
    client_body_timeout: float = 60.0
    upstream_keepalive_timeout: float = 4.0
    health_path: str | None = None
    health_interval: float = 5.0
    upstream_metrics: str | None = None  # the model server's metrics URL, re-exposed on ours
    upstream_metrics_timeout: float = 2.0  # for each fetch of it, within a scrape of ours
    drain_timeout: float = 30.0
    shutdown_delay: float = 5.0  # Kubernetes takes a few seconds to drop a pod's endpoints
    log_level: LogLevel = "info"
    model_name: str = "model"
    model_version: str = "unknown"
    framework: str = "unknown"
    preset: str | None = None
    routes: tuple[RouteConfig, ...] = ()
    mapping: MappingSpec | None = None
    inject_usage: bool = False  # openai: ask streams for usage, hide it from clients (docs/llm.md)
    max_body_bytes: int = 10 * 1024 * 1024
    reply_request_id: bool = True  # add X-Request-ID to replies that carry none
    label_cap: int = 50
    model_names: tuple[str, ...] = ()
    low_confidence_threshold: float = 0.7
    features: dict[str, FeatureRule] = msgspec.field(default_factory=dict)
    # Histogram bounds per metric, overriding the defaults (sidecar.buckets, docs/metrics.md).
    buckets: dict[str, tuple[float, ...]] = msgspec.field(default_factory=dict)
    record_queue_size: int = 10_000
    large_body_queue_bytes: int = 64 * 1024 * 1024  # large payloads waiting to be read
    config_watch_interval: float = 5.0
    workers: int = 1  # proxy processes sharing the port (sidecar.workers); 1 = no supervisor
    grpc_port: int | None = None  # a gRPC listener (docs/grpc.md); off when unset
    grpc_upstream: str | None = None  # the model server's gRPC address, host:port
    grpc_max_message_bytes: int = 64 * 1024 * 1024  # each way; gRPC's own default is 4 MiB
    feedback: FeedbackSettings = msgspec.field(default_factory=FeedbackSettings)
    drift: DriftSettings = msgspec.field(default_factory=DriftSettings)

    def __post_init__(self) -> None:
        _check_upstream(self.upstream)
        if self.upstream_metrics is not None:
            _check_upstream_metrics(self.upstream_metrics)
        _check_preset(self.preset)
        _check_generative_mapping(self.preset, self.mapping)
        presets = (self.preset, *(route.preset for route in self.routes))
        if self.inject_usage and not any(map(_generative, presets)):
            msg = f"inject_usage is set, but no route uses the {_GENERATIVE} preset"
            raise ValueError(msg)
        _check_grpc(self.grpc_port, self.grpc_upstream)
        check_buckets(self.buckets)
        for key in ("port", "metrics_port", "grpc_port"):
            value = getattr(self, key)
            if value is not None and not 0 <= value <= 65535:
                msg = f"{key} must be a TCP port between 0 and 65535, got {value}"
                raise ValueError(msg)
        for key in (
            "upstream_timeout",
            "connect_timeout",
            "client_send_timeout",
            "client_body_timeout",
            "upstream_keepalive_timeout",
            "health_interval",
            "upstream_metrics_timeout",
        ):
            if not getattr(self, key) > 0:  # NaN too: no timeout would ever fire
                msg = f"{key} must be a positive number of seconds, got {getattr(self, key)}"
                raise ValueError(msg)
        if self.health_path is not None and not self.health_path.startswith("/"):
            msg = f"health_path {self.health_path!r} must start with '/'"
            raise ValueError(msg)
        if not 0.0 <= self.low_confidence_threshold <= 1.0:
            threshold = self.low_confidence_threshold
            msg = f"low_confidence_threshold must be within [0, 1], got {threshold}"
            raise ValueError(msg)
        if self.label_cap < 1:
            msg = f"label_cap must be at least 1, got {self.label_cap}"
            raise ValueError(msg)
        if self.grpc_max_message_bytes < 1024:
            value = self.grpc_max_message_bytes
            msg = f"grpc_max_message_bytes must be at least 1024, got {value}"
            raise ValueError(msg)
        if self.large_body_queue_bytes < 1:
            msg = f"large_body_queue_bytes must be at least 1, got {self.large_body_queue_bytes}"
            raise ValueError(msg)
        if self.workers < 1:
            msg = f"workers must be at least 1, got {self.workers}"
            raise ValueError(msg)
        if self.workers > 1 and self.grpc_port == 0:
            msg = (
                f"workers is {self.workers}, but grpc_port is 0 (any free port): each worker "
                "would get a port of its own; set grpc_port"
            )
            raise ValueError(msg)
        if self.workers > 1 and self.port == 0:
            msg = (
                f"workers is {self.workers}, but port is 0 (any free port): each worker would "
                "get a port of its own; set port"
            )
            raise ValueError(msg)

    @property
    def admin_host(self) -> str:
        return self.metrics_host if self.metrics_host is not None else self.host


def _check_upstream(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        msg = f"upstream {url!r} must be an http:// or https:// URL with a host"
        raise ValueError(msg)
    if parts.path not in ("", "/") or parts.query:
        msg = f"upstream {url!r} must not carry a path or query: every path is forwarded as is"
        raise ValueError(msg)


def _check_upstream_metrics(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        msg = (
            f"upstream_metrics {url!r} must be an http:// or https:// URL with a host, "
            "e.g. http://127.0.0.1:8082/metrics"
        )
        raise ValueError(msg)


def _check_grpc(port: int | None, upstream: str | None) -> None:
    if (port is None) != (upstream is None):
        given, missing = (
            ("grpc_port", "grpc_upstream") if upstream is None else ("grpc_upstream", "grpc_port")
        )
        msg = f"{given} is set but {missing} is not: the gRPC relay needs both"
        raise ValueError(msg)
    if upstream is None:
        return
    host, _, port_text = upstream.rpartition(":")
    if not host or "/" in upstream or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        msg = f"grpc_upstream {upstream!r} must be host:port, e.g. 127.0.0.1:8001"
        raise ValueError(msg)


def _check_preset(preset: str | None) -> None:
    if preset is not None and preset not in PRESETS:
        msg = f"preset {preset!r} is not one of {', '.join(sorted(PRESETS))}"
        raise ValueError(msg)


# The generative presets' names, for messages: "openai", or "a or b".
_GENERATIVE = " or ".join(sorted(name for name, preset in PRESETS.items() if preset.generative))


def _generative(preset: str | None) -> bool:
    return preset is not None and preset in PRESETS and PRESETS[preset].generative


def _check_generative_mapping(preset: str | None, mapping: MappingSpec | None) -> None:
    """A generative preset reads its payloads itself: a mapping may only name request fields."""
    if not _generative(preset) or mapping is None:
        return
    if mapping.expressions() or mapping.class_names is not None:
        msg = (
            f"the {preset} preset takes only feature_names from mapping (the request fields to "
            "record as features, e.g. [model, temperature])"
        )
        raise ValueError(msg)


# Keys that can come from SIDECAR_* variables and flags: the scalar ones.
SCALAR_KEYS: tuple[str, ...] = tuple(
    name
    for name, kind in Config.__annotations__.items()
    if kind in ("str", "int", "float", "bool", "str | None", "int | None", "LogLevel")
)


def load(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Merge file < environment < overrides into a Config, or raise ConfigError saying why not.

    >>> load(environ={"SIDECAR_UPSTREAM": "http://127.0.0.1:9000"}).port
    8080
    """
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        raw.update(_read_file(Path(path)))
        sources.update(dict.fromkeys(raw, f"config file {path}"))
    for key, value in _from_environ(os.environ if environ is None else environ).items():
        raw[key] = value
        sources[key] = f"environment variable {ENV_PREFIX}{key.upper()}"
    token = (os.environ if environ is None else environ).get(f"{ENV_PREFIX}FEEDBACK_TOKEN")
    if token is not None and isinstance(raw.get("feedback", {}), dict):
        # The one nested key with a variable of its own: a secret belongs in the environment.
        raw["feedback"] = {**raw.get("feedback", {}), "token": token}
    profile = (os.environ if environ is None else environ).get(f"{ENV_PREFIX}PROFILE")
    if profile is not None:
        _set_profile(raw, profile)
        sources["drift"] = f"environment variable {ENV_PREFIX}PROFILE"
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "profile":
            _set_profile(raw, value)
            sources["drift"] = "flag --profile"
            continue
        if key == "mapping":
            _set_mapping_names(raw, value)
            # A file's mapping keeps naming the file: names given as flags are always well formed.
            flags = " and ".join(f"--{name.replace('_', '-')}" for name in value)
            sources.setdefault("mapping", f"flag {flags}")
            continue
        raw[key] = value
        sources[key] = f"flag --{key.replace('_', '-')}"
    return _convert(raw, sources)


def _set_profile(raw: dict[str, Any], path: str) -> None:
    """--profile and SIDECAR_PROFILE stand for the nested key drift.profile."""
    drift = raw.get("drift")
    raw["drift"] = {**(drift if isinstance(drift, dict) else {}), "profile": path}


def _set_mapping_names(raw: dict[str, Any], names: Mapping[str, Any]) -> None:
    """--class-names and --feature-names replace those fields of the file's mapping, not all."""
    mapping = raw.get("mapping")
    raw["mapping"] = {**(mapping if isinstance(mapping, dict) else {}), **names}


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"cannot read config file {path}: {exc.strerror or exc}"
        raise ConfigError(msg) from exc
    import yaml  # here: PyYAML stays out of a process started without a file (~1 MB)

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        msg = f"config file {path} is not valid YAML: {exc}"
        raise ConfigError(msg) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        msg = f"config file {path} must hold a mapping of keys, got {type(data).__name__}"
        raise ConfigError(msg)
    return data


def _from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    found = {}
    for key in SCALAR_KEYS:
        value = environ.get(ENV_PREFIX + key.upper())
        if value is not None:
            found[key] = value
    return found


_PATH_IN_MESSAGE = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_PATH_PART = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\d+)\]")


def _convert(raw: dict[str, Any], sources: Mapping[str, str]) -> Config:
    # Lax conversion lets "8080" from an environment variable become an int.
    try:
        return msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc), raw, sources)) from exc


def _explain(message: str, raw: Mapping[str, Any], sources: Mapping[str, str]) -> str:
    """Turn msgspec's "Expected `int`, got `str` - at `$.port`" into key, value and source."""
    if message.startswith("Object missing required field `upstream`"):
        return (
            "key `upstream` is required: the model server's base URL, e.g. http://127.0.0.1:9000 "
            "(flag --upstream, variable SIDECAR_UPSTREAM or config key upstream)"
        )
    unknown = re.match(r"Object contains unknown field `(?P<field>[^`]+)`", message)
    match = _PATH_IN_MESSAGE.search(message)
    path = match["path"] if match else ""
    detail = _PATH_IN_MESSAGE.sub("", message)
    if unknown:
        key = _join(path, unknown["field"])
        if key in _REPLACED:
            return f"key `{key}` was replaced: {_REPLACED[key]} ({_where(key, sources)})"
        return f"key `{key}` is not a known setting ({_where(key, sources)}); check its spelling"
    key = path.lstrip(".") or _leading_key(detail)
    value = _lookup(raw, path) if path else raw.get(key, _MISSING)
    choices = _choices(key)
    if choices:
        detail = f"expected one of {', '.join(map(str, choices))}"
    shown = "" if value is _MISSING else f" has value {value!r};"
    return f"key `{key}`{shown} {_lower_first(detail)} ({_where(key, sources)})"


_MISSING = object()
# Keys of earlier releases, and what took their place.
_REPLACED = dict.fromkeys(
    ("drift.psi_warning", "drift.psi_critical", "drift.ks_warning", "drift.ks_critical"),
    "a window is flagged when a statistic passes its noise floor, and its severity is read "
    "from drift.warning_shift and drift.critical_shift (shifts in standard deviations, "
    "docs/drift.md)",
)


def _leading_key(detail: str) -> str:
    """The setting a whole-config check names first ("workers must be ..."), else a placeholder."""
    word = detail.split(" ", 1)[0]
    return word if word in Config.__struct_fields__ else "(top level)"


def _choices(key: str) -> tuple[object, ...]:
    """The allowed values of a top-level Literal setting such as log_level, else ()."""
    for field in msgspec.inspect.type_info(Config).fields:  # type: ignore[attr-defined]
        if field.name == key and isinstance(field.type, msgspec.inspect.LiteralType):
            return tuple(field.type.values)
    return ()


def _lookup(raw: Any, path: str) -> Any:
    node = raw
    for name, index in _PATH_PART.findall(path):
        try:
            node = node[name] if name else node[int(index)]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return node


def _join(path: str, field: str) -> str:
    return f"{path.lstrip('.')}.{field}" if path else field


def _where(key: str, sources: Mapping[str, str]) -> str:
    top = re.split(r"[.\[]", key, maxsplit=1)[0]
    return f"from {sources.get(top, 'defaults')}"


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]
