"""Reading the container recipe and the Kubernetes manifests as the tests check them: the Dockerfile's
stages (dockerfile-parse), the manifests' documents (PyYAML), each container's effective settings
(the image's ENV, then its ConfigMaps, then its own env: what the process sees), and the addresses in
those settings resolved to the workloads and ports they name, as cluster DNS would."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from dockerfile_parse import DockerfileParser

from common.config import REPO_ROOT, load_config
from detector_server.config import DetectorConfig
from gateway.config import GatewayConfig
from index_server.config import IndexConfig, RouterConfig
from signature_server.config import SignatureConfig

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
NAMESPACE = "mps"
CLUSTER_DOMAIN = "cluster.local"
# A value standing in for a Secret's in a container's settings (the secrets are not in the manifests).
SECRET_PLACEHOLDER = "secret-from-the-cluster"

# --- the Dockerfile -------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[dict[str, Any]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [i["value"] for i in self.instructions if i["instruction"] == instruction]

    def last(self, instruction: str) -> str | None:
        values = self.all(instruction)
        return values[-1] if values else None


@cache
def stages() -> tuple[Stage, ...]:
    """The Dockerfile's stages in order (instructions before the first FROM, i.e. ARGs, dropped)."""
    found: list[Stage] = []
    for instruction in DockerfileParser(str(DOCKERFILE)).structure:
        if instruction["instruction"] == "FROM":
            words = instruction["value"].split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(found))
            found.append(Stage(name, words[0]))
        elif found and instruction["instruction"] != "COMMENT":
            found[-1].instructions.append(instruction)
    return tuple(found)


def stage(name: str) -> Stage:
    for candidate in stages():
        if candidate.name == name:
            return candidate
    raise KeyError(f"the Dockerfile has no stage {name!r}")


def lineage(name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, base first."""
    chain = [stage(name)]
    names = {s.name for s in stages()}
    while chain[0].base in names:
        chain.insert(0, stage(chain[0].base))
    return chain


def image_env(target: str) -> dict[str, str]:
    """The ENV a target's image carries (its own and its base stages'), unexpanded."""
    env: dict[str, str] = {}
    for s in lineage(target):
        for value in s.all("ENV"):
            for word in shlex.split(value):
                key, _, val = word.partition("=")
                env[key] = val
    return env


def image_user(target: str) -> str | None:
    """The USER a target's image runs as (its own or inherited)."""
    users = [u for s in lineage(target) for u in s.all("USER")]
    return users[-1] if users else None


def entrypoint(target: str) -> list[str]:
    """A target's ENTRYPOINT (exec form, a JSON list)."""
    for s in reversed(lineage(target)):
        value = s.last("ENTRYPOINT")
        if value is not None:
            parsed = json.loads(value)
            assert isinstance(parsed, list), f"{target}: ENTRYPOINT is not in exec form: {value}"
            return [str(word) for word in parsed]
    raise AssertionError(f"target {target!r} has no ENTRYPOINT")


# --- what each service is ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Service:
    """A service as `python -m <module> [sub]` starts it: its config class and env prefix name."""

    module: str
    argv: tuple[str, ...]  # what follows the module before the flags (the router's "router")
    config: Any  # its config dataclass; None: the class cannot be imported (yet)
    name: str  # load_config's service name: MPS_<NAME>_<FIELD>
    health: str  # the grpc.health.v1 service it reports ("" for the HTTP front)

    @property
    def prefix(self) -> str:
        return f"MPS_{self.name.upper()}_"

    @property
    def grpc(self) -> bool:
        return bool(self.health)


def _http_config() -> Any:
    try:
        from gateway.http.config import HttpConfig
    except ImportError:  # the HTTP front not written yet
        return None
    return HttpConfig


def services() -> dict[tuple[str, ...], Service]:
    """Every service, by the words after `python -m`."""
    from mps.detector.v1 import detector_pb2
    from mps.gateway.v1 import gateway_pb2
    from mps.index.v1 import index_pb2
    from mps.signature.v1 import signature_pb2

    index = index_pb2.DESCRIPTOR.services_by_name["IndexService"].full_name
    listed = [
        Service(
            "detector_server",
            (),
            DetectorConfig,
            "detector",
            detector_pb2.DESCRIPTOR.services_by_name["DetectorService"].full_name,
        ),
        Service(
            "signature_server",
            (),
            SignatureConfig,
            "signature",
            signature_pb2.DESCRIPTOR.services_by_name["SignatureService"].full_name,
        ),
        Service("index_server", (), IndexConfig, "index", index),
        Service("index_server", ("router",), RouterConfig, "index_router", index),
        Service(
            "gateway",
            (),
            GatewayConfig,
            "gateway",
            gateway_pb2.DESCRIPTOR.services_by_name["VisualSearchService"].full_name,
        ),
        Service("gateway.http", (), _http_config(), "http", ""),
    ]
    return {(s.module, *s.argv): s for s in listed}


def service_of_target(target: str) -> tuple[Service, list[str]]:
    """The service a Dockerfile target starts, and the flags its ENTRYPOINT adds."""
    words = entrypoint(target)
    assert words[:2] in (["python", "-m"], ["/opt/venv/bin/python", "-m"]), f"{target}: ENTRYPOINT {words}"
    rest = words[2:]
    for key, service in sorted(services().items(), key=lambda item: -len(item[0])):  # longest first
        if tuple(rest[: len(key)]) == key:
            return service, rest[len(key) :]
    raise AssertionError(f"target {target!r} starts {rest}, which is none of the suite's services")


def load(cls: Any, name: str, argv: list[str], environ: dict[str, str]) -> Any:
    """load_config for any of the suite's config classes (HttpConfig is no ServerConfig)."""
    return load_config(cls, name, argv or None, environ)  # no flags: a refusal raises ConfigError


def field_names(cls: Any) -> set[str]:
    """A config class's settings, as their variables name them (upper case)."""
    return {f.name.upper() for f in dataclasses.fields(cls)}


def default(cls: Any, name: str) -> Any:
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


# --- the manifests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    file: str
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def id(self) -> str:
        return f"{self.file}:{self.kind}/{self.name}"


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


@cache
def documents() -> tuple[Doc, ...]:
    docs = []
    for path in manifest_files():
        for body in yaml.safe_load_all(path.read_text()):
            if body is not None:
                docs.append(Doc(path.name, body))
    return tuple(docs)


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())


def of_kind(kind: str) -> dict[str, Doc]:
    return {d.name: d for d in documents() if d.kind == kind}


def workloads() -> dict[str, Doc]:
    return {**of_kind("Deployment"), **of_kind("StatefulSet")}


def pod_spec(workload: Doc) -> dict[str, Any]:
    return workload.body["spec"]["template"]["spec"]


def containers(workload: Doc) -> list[dict[str, Any]]:
    return list(pod_spec(workload)["containers"])


def target_of(container: dict[str, Any]) -> str:
    """The Dockerfile target a container's image was built from: mps-<target>[:tag]."""
    image = str(container["image"]).rpartition("/")[2].partition(":")[0].partition("@")[0]
    assert image.startswith("mps-"), f"image {container['image']!r} is not one of the suite's (mps-<target>)"
    return image.removeprefix("mps-")


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """What the container's process sees: the image's ENV, then its ConfigMaps, then its env."""
    env = dict(image_env(target_of(container)))
    maps = of_kind("ConfigMap")
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in maps, f"envFrom names ConfigMap {ref!r}, which no manifest defines"
        env.update({k: str(v) for k, v in maps[ref].body.get("data", {}).items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "secretKeyRef" in var.get("valueFrom", {}):
            env[var["name"]] = SECRET_PLACEHOLDER
    return env


@dataclass
class Running:
    """One container of a workload: the service it runs and its effective configuration."""

    workload: Doc
    container: dict[str, Any]
    service: Service
    env: dict[str, str]
    argv: list[str]
    config: Any  # the service's config class, loaded as the process loads it (None: class missing)

    def port(self, name: str) -> int:
        for port in self.container.get("ports", []):
            if port.get("name") == name:
                return int(port["containerPort"])
        raise KeyError(f"{self.workload.id}: container {self.container['name']} has no port named {name!r}")


@cache
def running() -> tuple[Running, ...]:
    """Every container of every workload, with its configuration loaded by the real config class."""
    found = []
    for workload in workloads().values():
        for container in containers(workload):
            assert "command" not in container, f"{workload.id}: `command` overrides the image's ENTRYPOINT"
            service, flags = service_of_target(target_of(container))
            argv = flags + [str(a) for a in container.get("args", [])]
            env = container_env(container)
            config = None if service.config is None else load(service.config, service.name, argv, env)
            found.append(Running(workload, container, service, env, argv, config))
    return tuple(found)


# --- addresses --------------------------------------------------------------------------------------


@dataclass
class Resolved:
    """What an address in a setting reaches: a Service (every ready pod of a workload) or one pod."""

    address: str
    workload: Doc
    port: int
    pod_ordinal: int | None = None  # one pod of a StatefulSet
    service: Doc | None = None


def selects(selector: dict[str, str], workload: Doc) -> bool:
    labels = workload.body["spec"]["template"]["metadata"].get("labels", {})
    return all(labels.get(k) == v for k, v in selector.items())


def _container_port(workload: Doc, port: int) -> int:
    """The container port a pod-level address (headless DNS gives pod IPs) reaches: it must be one."""
    numbers = {int(p["containerPort"]) for c in containers(workload) for p in c.get("ports", [])}
    assert port in numbers, f"port {port} is none of {workload.id}'s container ports {sorted(numbers)}"
    return port


def resolve(address: str) -> Resolved:
    """The workload (and pod) an address names, as cluster DNS resolves it, checked on the way:
    `[dns:///]<service>.<namespace>.svc.<domain>:<port>` is a Service of the manifests (headless, so
    that a client reaches each pod; its selector picks exactly one workload), `<pod>.<service>...`
    one pod of the StatefulSet that Service governs (its ordinal below the replicas). The port is
    one the pod listens on, and the Service's port of that number."""
    target = address.removeprefix("dns:///")
    host, _, port_text = target.rpartition(":")
    assert port_text.isdigit(), f"{address!r} has no port"
    port = int(port_text)
    suffix = f".{NAMESPACE}.svc.{CLUSTER_DOMAIN}"
    assert host.endswith(suffix), f"{address!r} is not a Service of namespace {NAMESPACE!r} ({suffix})"
    labels = host.removesuffix(suffix).split(".")
    services = of_kind("Service")
    if len(labels) == 1:
        (service_name,) = labels
        assert service_name in services, f"{address!r}: no Service {service_name!r}"
        service = services[service_name]
        spec = service.body["spec"]
        assert spec.get("clusterIP") == "None", f"{address!r}: Service {service_name} is not headless"
        assert port in {int(p["port"]) for p in spec["ports"]}, f"{address!r}: Service has no port {port}"
        selected = [w for w in workloads().values() if selects(spec["selector"], w)]
        assert len(selected) == 1, f"{address!r}: Service {service_name} selects {[w.id for w in selected]}"
        return Resolved(address, selected[0], _container_port(selected[0], port), service=service)
    assert len(labels) == 2, f"{address!r} is neither <service>{suffix} nor <pod>.<service>{suffix}"
    pod, service_name = labels
    assert service_name in services, f"{address!r}: no Service {service_name!r}"
    governed = [s for s in of_kind("StatefulSet").values() if s.body["spec"]["serviceName"] == service_name]
    assert len(governed) == 1, f"{address!r}: Service {service_name} governs {[s.id for s in governed]}"
    statefulset = governed[0]
    match = re.fullmatch(rf"{re.escape(statefulset.name)}-(\d+)", pod)
    assert match, f"{address!r}: {pod!r} is not a pod of StatefulSet {statefulset.name} ({statefulset.name}-<n>)"
    ordinal = int(match.group(1))
    replicas = int(statefulset.body["spec"].get("replicas", 1))
    assert ordinal < replicas, f"{address!r}: StatefulSet {statefulset.name} runs {replicas} pods, not pod {ordinal}"
    spec = services[service_name].body["spec"]
    assert spec.get("clusterIP") == "None", f"{address!r}: governing Service {service_name} is not headless"
    assert selects(spec["selector"], statefulset), f"{address!r}: Service {service_name} does not select its pods"
    return Resolved(address, statefulset, _container_port(statefulset, port), ordinal, services[service_name])
