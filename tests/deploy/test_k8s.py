"""The Kubernetes manifests (deploy/k8s/), offline: every document against the Kubernetes schemas
(kubernetes-validate, strict: an unknown or misspelt field fails), then what the schemas cannot
say: each service's settings loaded by its own config class as the process loads them, probes on
grpc.health.v1, resources, a non-root and unprivileged pod, autoscalers, the index shards'
volumes, and every address the router and the gateway are given resolved to a workload, pod and
port of the manifests."""

from __future__ import annotations

import json
import re
from typing import Any

import kubernetes_validate
import pytest

from common.config import ConfigError, load_config
from index_server.config import RouterConfig
from tests.deploy import parse
from tests.deploy.parse import Doc, Running

# The oldest Kubernetes these manifests are for (gRPC probes, autoscaling/v2 and the fields used are
# all older), and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", f"{kubernetes_validate.latest_version()}.0")

# Stateless services: a Deployment each, scaled by a HorizontalPodAutoscaler.
# Deployment -> the Dockerfile target its image is built from.
STATELESS = {
    "detector": "detector",
    "signature": "signature",
    "index-router": "router",
    "gateway": "gateway",
    "http": "http",
}
# Index shards: StatefulSets with a volume per pod.
SHARDS = {"index", "index-furniture"}


def _ids(docs: tuple[Doc, ...]) -> list[str]:
    return [d.id for d in docs]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", parse.documents(), ids=_ids(parse.documents()))
def test_every_document_validates_against_the_kubernetes_schema(doc: Doc, version: str) -> None:
    kubernetes_validate.validate(doc.body, version, strict=True)


def test_kustomization_lists_every_manifest_and_image() -> None:
    kustomization = parse.kustomization()
    assert sorted(kustomization["resources"]) == [p.name for p in parse.manifest_files()]
    assert kustomization["namespace"] == parse.NAMESPACE
    images = {c["image"].partition(":")[0] for w in parse.workloads().values() for c in parse.containers(w)}
    assert {i["name"] for i in kustomization["images"]} == images


def test_everything_is_in_the_suites_namespace() -> None:
    assert set(parse.of_kind("Namespace")) == {parse.NAMESPACE}
    for doc in parse.documents():
        if doc.kind != "Namespace":
            assert doc.body["metadata"].get("namespace") == parse.NAMESPACE, doc.id


def test_names_are_unique_per_kind() -> None:
    seen = [(d.kind, d.name) for d in parse.documents()]
    assert len(seen) == len(set(seen)), seen


def test_the_workloads_are_the_suites_services() -> None:
    assert set(parse.of_kind("Deployment")) == set(STATELESS)
    assert set(parse.of_kind("StatefulSet")) == SHARDS
    for name, workload in parse.workloads().items():
        spec = workload.body["spec"]
        assert parse.selects(spec["selector"]["matchLabels"], workload), f"{name}: selector misses its pods"
    targets = {r.workload.name: parse.target_of(r.container) for r in parse.running()}
    assert targets == {**STATELESS, "index": "index", "index-furniture": "index"}


def test_every_configmap_is_used_and_every_setting_is_a_field_of_its_service() -> None:
    """load_config ignores an MPS_ variable that names no field: a misspelt setting would be lost,
    and so would one meant for another service."""
    maps = parse.of_kind("ConfigMap")
    used: set[str] = set()
    for run in parse.running():
        names = [s["configMapRef"]["name"] for s in run.container.get("envFrom", [])]
        used |= set(names)
        keys = [k for n in names for k in maps[n].body.get("data", {})] + [
            v["name"] for v in run.container.get("env", [])
        ]
        if run.service.config is None:
            continue
        fields = parse.field_names(run.service.config)
        for key in keys:
            assert key.startswith(run.service.prefix), f"{run.workload.id}: {key} is not {run.service.prefix}*"
            assert key.removeprefix(run.service.prefix) in fields, f"{run.workload.id}: {key} is no setting"
    assert used == set(maps)


# Every container of every workload, as "<workload>/<container>"; its Running is loaded in the test.
RUNS = [f"{w.name}/{c['name']}" for w in parse.workloads().values() for c in parse.containers(w)]


def _run(run_id: str) -> Running:
    (run,) = [r for r in parse.running() if f"{r.workload.name}/{r.container['name']}" == run_id]
    return run


@pytest.mark.parametrize("run_id", RUNS)
def test_each_service_loads_its_settings_and_listens_on_its_container_port(run_id: str) -> None:
    """The settings are loaded by the service's own class in parse.running() (a refused one raises);
    here: it listens on every interface, on the port the container declares."""
    run = _run(run_id)
    if run.config is None:
        pytest.skip(f"{run.service.module}'s config class does not import yet")
    assert run.config.host == "0.0.0.0", f"{run_id} listens on {run.config.host} only"
    port_name = "grpc" if run.service.grpc else "http"
    assert run.config.port == run.port(port_name)
    if getattr(run.config, "metrics_port", 0):
        assert run.config.metrics_port == run.port("metrics")
        annotations = run.workload.body["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/port") == str(run.config.metrics_port)


@pytest.mark.parametrize("run_id", RUNS)
def test_probes_ask_grpc_health_of_the_service(run_id: str) -> None:
    run = _run(run_id)
    container = run.container
    readiness, liveness = container.get("readinessProbe"), container.get("livenessProbe")
    assert readiness and liveness, f"{run_id} needs readiness and liveness probes"
    if not run.service.grpc:
        assert readiness["httpGet"]["path"] == "/healthz"
        assert readiness["httpGet"]["port"] in ("http", run.port("http"))
        # A gateway that is down makes /healthz 503: that must take this front out of rotation,
        # not restart it.
        assert "httpGet" not in liveness
        return
    grpc_port = run.port("grpc")
    assert readiness["grpc"] == {"port": grpc_port, "service": run.service.health}
    for probe in (liveness, container.get("startupProbe")):
        if probe is None:
            continue
        if "grpc" in probe:
            assert probe["grpc"]["port"] == grpc_port
            assert probe["grpc"].get("service", "") in ("", run.service.health)
        else:  # a shard catching up is NOT_SERVING for as long as its copy takes, and alive
            assert run.workload.kind == "StatefulSet", f"{run_id}: not a grpc.health.v1 probe: {probe}"
            assert probe["tcpSocket"]["port"] in ("grpc", grpc_port)


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
            "Ti": 2**40}  # fmt: skip


def quantity(value: Any) -> float:
    match = _QUANTITY.match(str(value))
    assert match, f"{value!r} is not a quantity these manifests use"
    return float(match.group(1)) * _FACTORS[match.group(2)]


@pytest.mark.parametrize("run_id", RUNS)
def test_every_container_requests_and_limits_resources(run_id: str) -> None:
    run = _run(run_id)
    resources = run.container.get("resources", {})
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    for key in ("cpu", "memory"):
        assert key in requests and key in limits, f"{run_id}: {key} request and limit"
        assert quantity(limits[key]) >= quantity(requests[key]), f"{run_id}: {key} limit below request"
    threads = getattr(run.config, "intra_op_threads", None)
    if threads is not None:  # ONNX Runtime: 0 = every core of the node, far more than the limit
        assert 1 <= threads <= quantity(limits["cpu"]), f"{run_id}: intra_op_threads {threads}"


@pytest.mark.parametrize("run_id", RUNS)
def test_pods_run_as_the_images_non_root_user_without_privileges(run_id: str) -> None:
    run = _run(run_id)
    pod = parse.pod_spec(run.workload)
    security = pod["securityContext"]
    user = parse.image_user(parse.target_of(run.container))
    assert user is not None
    uid, _, gid = user.partition(":")
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == int(uid) != 0
    if gid:
        assert security["runAsGroup"] == int(gid)
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod.get("automountServiceAccountToken") is False
    container = run.container["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    if container.get("readOnlyRootFilesystem"):
        # Numba's cache and temporary files: a writable /tmp.
        mounts = {m["mountPath"]: m["name"] for m in run.container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert run.env.get("NUMBA_CACHE_DIR", "/tmp").startswith("/tmp/")
    if run.config is not None:
        # Time to drain in-flight calls (and, for a shard, write its snapshot) before a kill.
        assert pod.get("terminationGracePeriodSeconds", 30) > run.config.shutdown_grace_s


def test_stateless_services_scale_with_an_autoscaler() -> None:
    autoscalers = parse.of_kind("HorizontalPodAutoscaler")
    targets = {}
    for hpa in autoscalers.values():
        assert hpa.body["apiVersion"] == "autoscaling/v2"
        spec = hpa.body["spec"]
        ref = spec["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment"), hpa.id
        assert ref["name"] in parse.of_kind("Deployment"), f"{hpa.id} scales a Deployment that does not exist"
        targets[ref["name"]] = spec
    assert set(targets) == set(STATELESS)
    for name, spec in targets.items():
        assert 2 <= spec["minReplicas"] <= spec["maxReplicas"], name
        assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in spec["metrics"]), (
            f"{name}: scales on CPU"
        )
        deployment = parse.of_kind("Deployment")[name]
        # Re-applying the manifests must not reset the count the autoscaler chose.
        assert "replicas" not in deployment.body["spec"], f"{name}: the autoscaler owns replicas"
        for container in parse.containers(deployment):  # utilisation is relative to the request
            assert "cpu" in container["resources"]["requests"]


def test_grpc_services_are_headless_and_the_http_front_is_not() -> None:
    """A gRPC client keeps its connections: behind a virtual IP every call would go to the pod that
    connection reached. Headless, DNS gives every pod and the client balances (round_robin)."""
    for doc in parse.of_kind("Service").values():
        spec = doc.body["spec"]
        (workload,) = [w for w in parse.workloads().values() if parse.selects(spec["selector"], w)]
        for port in spec["ports"]:
            named = {p["name"]: p["containerPort"] for c in parse.containers(workload) for p in c["ports"]}
            target = port["targetPort"]
            assert target in named or target in named.values(), f"{doc.id}: targetPort {target}"
            if port.get("appProtocol") == "grpc":
                assert spec.get("clusterIP") == "None", f"{doc.id} is a gRPC Service: headless"
                # Clients dial the pods' addresses, at the number in their settings: the pods' port.
                assert port["port"] == named.get(target, target), doc.id
    assert parse.of_kind("Service")["http"].body["spec"].get("clusterIP") != "None"


@pytest.mark.parametrize("name", sorted(SHARDS))
def test_index_shards_keep_their_data_on_their_own_volume(name: str) -> None:
    statefulset = parse.of_kind("StatefulSet")[name]
    spec = statefulset.body["spec"]
    templates = {t["metadata"]["name"]: t for t in spec["volumeClaimTemplates"]}
    assert templates, f"{name}: no volumeClaimTemplates"
    for template in templates.values():
        assert "ReadWriteOnce" in template["spec"]["accessModes"]
        assert quantity(template["spec"]["resources"]["requests"]["storage"]) >= 2**30
    (run,) = [r for r in parse.running() if r.workload.name == name]
    data_dir = run.config.data_dir
    assert data_dir, f"{name}: data_dir '' keeps the index in memory only"
    mounts = [m for m in run.container["volumeMounts"] if m["name"] in templates]
    assert any(data_dir == m["mountPath"] or data_dir.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), (
        f"{name}: data_dir {data_dir} is not on a persistent volume ({[m['mountPath'] for m in mounts]})"
    )
    # The governing Service gives each pod its stable DNS name.
    governing = parse.of_kind("Service")[spec["serviceName"]]
    assert governing.body["spec"]["clusterIP"] == "None"
    assert parse.selects(governing.body["spec"]["selector"], statefulset)
    # The volume is writable by the image's group.
    user = parse.image_user("index") or ""
    uid, _, gid = user.partition(":")
    assert parse.pod_spec(statefulset)["securityContext"]["fsGroup"] == int(gid or uid)


def _config(name: str) -> Any:
    (run,) = [r for r in parse.running() if r.workload.name == name]
    return run.config


def test_router_shards_name_every_pod_of_the_statefulset_once_on_its_port() -> None:
    router: RouterConfig = _config("index-router")
    assert router.layout == "item", (
        "word layout: each shard needs its own word_shard_index, which one StatefulSet's pods (one "
        "template) cannot be given"
    )
    seen: list[tuple[str, int]] = []
    for i, replicas in enumerate(router.shards):
        for address in replicas:
            resolved = parse.resolve(address)
            assert resolved.pod_ordinal is not None, f"shards[{i}] {address}: one pod, not a Service"
            assert resolved.workload.name == "index", f"shards[{i}] {address}: {resolved.workload.id}"
            assert resolved.port == _config("index").port, f"shards[{i}] {address}: not the shard's port"
            seen.append((resolved.workload.name, resolved.pod_ordinal))
    assert len(seen) == len(set(seen)), f"a pod is listed twice: {seen}"
    statefulset = parse.of_kind("StatefulSet")["index"]
    pods = {("index", n) for n in range(statefulset.body["spec"]["replicas"])}
    assert set(seen) == pods, "every pod of the StatefulSet holds a shard the router knows"


def test_gateway_addresses_reach_the_services_they_name() -> None:
    gateway = _config("gateway")
    expected = {"detector_address": "detector", "signature_address": "signature"}
    for field, target in expected.items():
        resolved = parse.resolve(getattr(gateway, field))
        assert getattr(gateway, field).startswith("dns:///"), f"{field}: dns:/// gives every replica"
        assert resolved.pod_ordinal is None and resolved.service is not None
        assert parse.target_of(parse.containers(resolved.workload)[0]) == target, field
        assert resolved.port == _config(resolved.workload.name).port, field
    indexes = {"index_address": gateway.index_address} | {
        f"index_routes[{c!r}]": a for c, a in gateway.index_routes.items()
    }
    assert gateway.index_routes, "the layout routes at least one category to its own index"
    for field, address in indexes.items():
        resolved = parse.resolve(address)
        target = parse.target_of(parse.containers(resolved.workload)[0])
        # A router (its replicas behind a headless Service) or one shard pod: never several shard
        # replicas round_robin, which would spread writes (GatewayConfig refuses a list; a Service
        # over a StatefulSet's pods would do the same through DNS).
        if target == "router":
            assert address.startswith("dns:///") and resolved.service is not None, field
        else:
            assert target == "index" and resolved.pod_ordinal is not None, f"{field}: {address}"
        assert resolved.port == _config(resolved.workload.name).port, field
    assert parse.resolve(gateway.index_address).workload.name == "index-router"


def test_http_front_reaches_the_gateway() -> None:
    config = _config("http")
    if config is None:
        pytest.skip("gateway.http.config does not import yet")
    resolved = parse.resolve(config.gateway_address)
    assert resolved.workload.name == "gateway" and resolved.service is not None
    assert resolved.port == _config("gateway").port


def test_every_index_shard_the_settings_name_is_used() -> None:
    """No StatefulSet pod sits idle: each is a shard of the router or a category's route."""
    named = {parse.resolve(a).workload.name for r in _config("index-router").shards for a in r}
    named |= {parse.resolve(a).workload.name for a in _config("gateway").index_routes.values()}
    assert named >= SHARDS


@pytest.mark.xfail(
    strict=True,
    raises=ConfigError,
    reason="RouterConfig takes several replicas of a shard only as IP:port; the manifests run one "
    "replica per shard until a shard's replicas can be named by their pods' DNS names",
)
def test_a_shard_could_list_its_replicas_by_pod_name() -> None:
    """When this passes (and so fails, being strict), raise index.yaml's replicas to two per shard
    and list them in layout.yaml: [["index-0...", "index-1..."], ["index-2...", "index-3..."]]."""
    shards = [[f"index-{2 * i + r}.index.mps.svc.cluster.local:50053" for r in range(2)] for i in range(2)]
    load_config(RouterConfig, "index_router", environ={"MPS_INDEX_ROUTER_SHARDS": json.dumps(shards)})
