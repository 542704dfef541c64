"""The model repository (common/model_repository.py) on temporary folders: version policies, merged
configs, hot swap with drain, failed loads that change nothing, unload rules, and a swap storm under
concurrent use in which no model is closed while a request holds it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from common.batching import BatchPolicy
from common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from common.model_repository import (
    DEFAULT_PROVIDERS,
    ModelRepository,
    ModelSource,
    read_source,
    versions_on_disk,
)


class FakeModel:
    """A ServedModel whose 'weights' are a text file: "corrupt" fails the loader, "wrong shapes"
    fails warm_up. It records how often it is closed and whether a request held it then."""

    def __init__(self, source: ModelSource):
        weights = source.path("file").read_text()
        if weights == "corrupt":
            raise ValueError(f"{source.path('file')} is not a model")
        self.source = source
        self.version = source.version
        self.weights = weights
        self.provider = "FakeExecutionProvider"
        self.max_batch = source.batching.max_batch
        self.closed = 0
        self.closed_in_use = False
        self.in_use = 0
        self.lock = threading.Lock()

    def warm_up(self) -> None:
        if self.weights == "wrong shapes":
            raise RuntimeError("output 0 has shape (1, 3), expected (1, 4)")

    def close(self) -> None:
        with self.lock:
            self.closed += 1
            self.closed_in_use |= self.in_use > 0
        if self.weights == "fails to close":
            raise RuntimeError("the device is gone")

    def serve(self) -> str:
        """One request's work on it; fails if it was closed before the request ended."""
        with self.lock:
            assert not self.closed, f"version {self.version} was closed before a request on it"
            self.in_use += 1
        time.sleep(0.0005)
        with self.lock:
            self.in_use -= 1
        return self.version


class Loader:
    """The service's loader: builds FakeModels and keeps every one it built."""

    def __init__(self) -> None:
        self.built: list[FakeModel] = []
        self.lock = threading.Lock()

    def __call__(self, source: ModelSource) -> FakeModel:
        model = FakeModel(source)
        with self.lock:
            self.built.append(model)
        return model


def add_model(root: Path, name: str, config: dict[str, Any] | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"file": "model.txt", **(config or {})}))
    return folder


def add_version(root: Path, name: str, version: str, weights: str = "weights", own: dict | None = None) -> Path:
    folder = root / name / version
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.txt").write_text(weights)
    if own is not None:
        (folder / "config.json").write_text(json.dumps(own))
    return folder


def use_once(repository: ModelRepository, name: str = "", version: str = "") -> None:
    with repository.use(name, version):
        pass


def states(repository: ModelRepository, name: str = "m") -> list[tuple[str, str, bool]]:
    """(version, state, is_default) of every row of `name`."""
    return [(row.version, row.state, row.is_default) for row in repository.status(name)]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def loader() -> Loader:
    return Loader()


# --- the layout on disk --------------------------------------------------------------------------


def test_versions_on_disk_are_positive_integer_folders_ascending(root):
    add_model(root, "m")
    for version in ("10", "2", "1", "0", "tmp", "3a"):
        add_version(root, "m", version)
    (root / "m" / "4").write_text("a file, not a folder")
    assert versions_on_disk(root / "m") == ["1", "2", "10"]
    assert versions_on_disk(root / "absent") == []


@pytest.mark.parametrize(
    ("policy", "served"),
    [(None, ["3"]), ({"latest": 2}, ["2", "3"]), ({"all": {}}, ["1", "2", "3"]), ({"specific": [1, "3"]}, ["1", "3"])],
)
def test_the_version_policy_chooses_what_serves_at_start(root, loader, policy, served):
    add_model(root, "m", {"version_policy": policy} if policy else {})
    for version in ("1", "2", "3", "tmp"):
        add_version(root, "m", version)
    repository = ModelRepository(root, ["m"], loader)
    try:
        assert states(repository) == [(v, "READY", v == served[-1]) for v in served]
        with repository.use() as (name, version, model):
            assert (name, version, model.version) == ("m", served[-1], served[-1])
    finally:
        repository.close()


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"latest": 0}, "latest 0 is not an integer >= 1"),
        ({"newest": 1}, "'newest' is not 'latest', 'all' or 'specific'"),
        ({"specific": []}, "is not a non-empty list"),
        ("latest", "is not one of"),
    ],
)
def test_a_wrong_version_policy_is_refused_with_what_is_wrong(root, loader, policy, message):
    add_model(root, "m", {"version_policy": policy})
    add_version(root, "m", "1")
    with pytest.raises(FailedPrecondition, match=message):
        ModelRepository(root, ["m"], loader)


def test_a_versions_config_updates_the_models(root):
    add_model(root, "m", {"classes": ["cat"], "max_batch": 4, "threshold": 0.5})
    add_version(root, "m", "1")
    add_version(root, "m", "2", own={"classes": ["cat", "dog"], "dynamic_batching": {"max_queue_delay_ms": 3}})
    one, two = read_source(root, "m", "1"), read_source(root, "m", "2")
    assert one.settings == {"file": "model.txt", "classes": ["cat"], "max_batch": 4, "threshold": 0.5}
    assert two.settings["classes"] == ["cat", "dog"] and two.settings["threshold"] == 0.5
    assert one.batching == BatchPolicy(4) and two.batching == BatchPolicy(4, True, 3.0)
    assert two.folder == root / "m" / "2"
    assert two.path("file") == root / "m" / "2" / "model.txt"
    assert one.providers == DEFAULT_PROVIDERS
    with pytest.raises(ValueError, match="has no 'labels'"):
        two.path("labels")


def test_relative_provider_paths_are_under_the_versions_folder(root):
    providers = [
        {
            "name": "TensorrtExecutionProvider",
            "options": {
                "trt_engine_cache_path": "trt",
                "trt_timing_cache_path": "/abs/timing",
                "trt_fp16_enable": True,
            },
        },
        {"name": "CPUExecutionProvider"},
    ]
    add_model(root, "m", {"providers": providers})
    add_version(root, "m", "2")
    source = read_source(root, "m", "2")
    assert source.providers == (
        (
            "TensorrtExecutionProvider",
            {
                "trt_engine_cache_path": str(root / "m" / "2" / "trt"),
                "trt_timing_cache_path": "/abs/timing",
                "trt_fp16_enable": True,
            },
        ),
        ("CPUExecutionProvider", {}),
    )


@pytest.mark.parametrize(
    ("model_config", "own", "message"),
    [
        ({"providers": "CPUExecutionProvider"}, None, "providers is not a list"),
        ({"providers": [{"name": "CPUExecutionProvider", "options": []}]}, None, "options of CPUExecutionProvider"),
        ({"max_batch": "8"}, None, "max_batch '8' is not an integer"),
        ({"dynamic_batching": {"delay": 1}}, None, "unknown keys"),
        ({}, ["not", "an", "object"], "is not a JSON object"),
    ],
)
def test_a_wrong_config_says_what_is_wrong(root, model_config, own, message):
    add_model(root, "m", model_config)
    folder = add_version(root, "m", "1")
    if own is not None:
        (folder / "config.json").write_text(json.dumps(own))
    with pytest.raises(ValueError, match=message):
        read_source(root, "m", "1")


# --- hot swap ------------------------------------------------------------------------------------


def test_a_new_version_swaps_in_while_requests_finish_on_the_old(root, loader):
    add_model(root, "m")
    add_version(root, "m", "1")
    repository = ModelRepository(root, ["m"], loader)
    try:
        with repository.use("m") as (_, version, old):
            assert version == "1"
            add_version(root, "m", "2")
            repository.load("m", "2")
            rows = {row.version: row for row in repository.status("m")}
            assert (rows["1"].state, rows["1"].in_flight, rows["1"].is_default) == ("DRAINING", 1, False)
            assert (rows["2"].state, rows["2"].is_default, rows["2"].provider) == ("READY", True, old.provider)
            with repository.use() as (_, version, new):  # new requests get the new version
                assert (version, new.version) == ("2", "2")
            assert not repository.wait_drained(0.2)
            assert old.closed == 0  # still in use
            old.serve()
        assert repository.wait_drained(5)
        assert old.closed == 1 and not old.closed_in_use and new.closed == 0
        assert states(repository) == [("1", "UNLOADED", False), ("2", "READY", True)]
        assert repository.status("m")[0].reason == "replaced"
    finally:
        repository.close()


def test_reloading_the_serving_version_swaps_in_a_fresh_copy(root, loader):
    add_model(root, "m")
    add_version(root, "m", "1")
    repository = ModelRepository(root, ["m"], loader)
    try:
        with repository.use() as (_, _, first):
            repository.load("m", "1")
            assert states(repository) == [("1", "DRAINING", False), ("1", "READY", True)]
            with repository.use() as (_, version, second):
                assert version == "1" and second is not first
        assert repository.wait_drained(5)
        assert states(repository) == [("1", "READY", True)]
        assert (first.closed, second.closed) == (1, 0)
    finally:
        repository.close()


@pytest.mark.parametrize(("weights", "reason"), [("corrupt", "is not a model"), ("wrong shapes", "expected (1, 4)")])
def test_a_version_that_fails_to_load_leaves_the_old_one_serving(root, loader, weights, reason):
    add_model(root, "m")
    add_version(root, "m", "1")
    repository = ModelRepository(root, ["m"], loader)
    try:
        add_version(root, "m", "2", weights)
        with pytest.raises(
            FailedPrecondition, match=r"version 2 cannot be loaded .*; version 1 keeps serving"
        ) as error:
            repository.load("m", "2")
        assert reason in str(error.value)
        assert error.value.info == {"model": "m", "version": "2"}
        rows = repository.status("m")
        assert states(repository) == [("1", "READY", True), ("2", "FAILED", False)]
        assert reason in rows[1].reason and rows[1].provider == ""
        with repository.use() as (_, version, _):
            assert version == "1"
        with pytest.raises(NotFound, match="version '2' of model 'm' is not loaded: use one of \\['1'\\]"):
            use_once(repository, "m", "2")
        assert [model.closed for model in loader.built] == [0] + [1] * (len(loader.built) - 1)
        add_version(root, "m", "2")  # fixed: it loads
        repository.load("m", "2")
        assert states(repository)[-1] == ("2", "READY", True)
    finally:
        repository.close()


def test_a_policy_load_that_fails_half_way_changes_nothing(root, loader):
    add_model(root, "m", {"version_policy": {"all": {}}})
    add_version(root, "m", "1")
    repository = ModelRepository(root, ["m"], loader)
    try:
        add_version(root, "m", "2", "corrupt")
        with pytest.raises(FailedPrecondition):
            repository.load("m", "2")
        before = repository.status("m")
        add_version(root, "m", "2")  # now good, but 3 is not
        add_version(root, "m", "3", "wrong shapes")
        with pytest.raises(FailedPrecondition, match="version 3 cannot be loaded"):
            repository.load("m")
        after = repository.status("m")
        assert after[:2] == before  # 1 still READY and the default, 2 still FAILED as it was
        assert states(repository) == [("1", "READY", True), ("2", "FAILED", False), ("3", "FAILED", False)]
        assert not any(row.state == "LOADING" for row in after)
        serving = [model for model in loader.built if not model.closed]
        assert [model.version for model in serving] == ["1"]  # the 2 built for the failed load is released
    finally:
        repository.close()


def test_latest_two_keeps_the_two_most_recent_after_a_third_load(root, loader):
    add_model(root, "m", {"version_policy": {"latest": 2}})
    add_version(root, "m", "1")
    add_version(root, "m", "2")
    repository = ModelRepository(root, ["m"], loader)
    try:
        assert states(repository) == [("1", "READY", False), ("2", "READY", True)]
        add_version(root, "m", "3")
        repository.load("m", "3")
        assert repository.wait_drained(5)
        assert states(repository) == [("1", "UNLOADED", False), ("2", "READY", False), ("3", "READY", True)]
        with repository.use("m", "2") as (_, version, _):
            assert version == "2"
    finally:
        repository.close()


def test_a_policy_load_serves_what_the_policy_selects_now(root, loader):
    add_model(root, "m")
    add_version(root, "m", "1")
    repository = ModelRepository(root, ["m"], loader)
    try:
        add_version(root, "m", "2")
        assert [row.state for row in repository.load("m")] in (["DRAINING", "READY"], ["UNLOADED", "READY"])
        assert repository.wait_drained(5)
        assert states(repository) == [("1", "UNLOADED", False), ("2", "READY", True)]
    finally:
        repository.close()


def test_a_drain_that_times_out_releases_anyway(root, loader):
    add_model(root, "m")
    add_version(root, "m", "1")
    repository = ModelRepository(root, ["m"], loader, drain_timeout_s=0.1)
    try:
        with repository.use() as (_, _, old):
            repository.load("m", "1")
            assert repository.wait_drained(5)
            assert old.closed == 1
    finally:
        repository.close()


# --- control rules -------------------------------------------------------------------------------


def test_load_refuses_what_it_cannot_find_or_name(root, loader):
    add_model(root, "m")
    add_version(root, "m", "1")
    add_model(root, "empty")
    repository = ModelRepository(root, ["m"], loader, any_model=True)
    try:
        with pytest.raises(NotFound, match="model 'm' has no version '7' on disk: its versions are \\['1'\\]"):
            repository.load("m", "7")
        with pytest.raises(NotFound, match=r"has no folder with a config\.json"):
            repository.load("absent")
        with pytest.raises(NotFound, match="selects none of the versions on disk \\[\\]"):
            repository.load("empty")
        with pytest.raises(InvalidArgument, match="name is empty"):
            repository.load("")
        for name in ("../m", "a/b", ".hidden"):
            with pytest.raises(InvalidArgument, match="is a folder name under the repository"):
                repository.load(name)
    finally:
        repository.close()
    only = ModelRepository(root, ["m"], loader)  # any_model False: only its own models
    try:
        with pytest.raises(NotFound, match="is not one this server serves \\(m\\)"):
            only.load("empty")
    finally:
        only.close()


def test_use_of_what_is_not_served_is_not_found(root, loader):
    add_model(root, "m")
    add_version(root, "m", "1")
    repository = ModelRepository(root, ["m"], loader, any_model=True)
    try:
        with pytest.raises(NotFound, match="model 'other' is not served here: use one of \\['m'\\]"):
            use_once(repository, "other")
        with pytest.raises(NotFound, match="version '9' of model 'm' is not loaded"):
            use_once(repository, "m", "9")
    finally:
        repository.close()


def test_unload_rules(root, loader):
    add_model(root, "m", {"version_policy": {"all": {}}})
    add_model(root, "other")
    for version in ("1", "2", "3"):
        add_version(root, "m", version)
    add_version(root, "other", "1")
    repository = ModelRepository(root, ["m"], loader, any_model=True)
    try:
        repository.load("m", "1")
        repository.load("m", "2")  # loaded last: the default; 1 is the most recent before it
        assert repository.wait_drained(5)
        assert [row.version for row in repository.status("m") if row.is_default] == ["2"]
        repository.unload("m", "2")
        assert [row.version for row in repository.status("m") if row.is_default] == ["1"]  # not 3, the highest
        with repository.use() as (_, version, _):
            assert version == "1"
        with pytest.raises(NotFound, match="version '2' of model 'm' is not loaded: loaded are \\['1', '3'\\]"):
            repository.unload("m", "2")
        with pytest.raises(NotFound, match="model 'absent' has no version loaded"):
            repository.unload("absent")
        with pytest.raises(FailedPrecondition, match="model 'm' is this server's default"):
            repository.unload("m")
        repository.unload("m", "3")
        with pytest.raises(FailedPrecondition, match="keeps at least one version"):
            repository.unload("m", "1")

        repository.load("other")  # any other model may go entirely
        repository.unload("other")
        assert repository.wait_drained(5)
        assert [(row.state, row.reason) for row in repository.status("other")] == [("UNLOADED", "unloaded on request")]
        with pytest.raises(FailedPrecondition, match="model 'other' has no version loaded: LoadModel one"):
            use_once(repository, "other")
        assert states(repository) == [("1", "READY", True), ("2", "UNLOADED", False), ("3", "UNLOADED", False)]
    finally:
        repository.close()
    assert all(model.closed == 1 for model in loader.built)


def test_a_service_that_serves_several_models_refuses_others(root, loader):
    for name in ("a", "b"):
        add_model(root, name)
        add_version(root, name, "1")
    add_model(root, "c")
    add_version(root, "c", "1")
    repository = ModelRepository(root, ["a", "b"], loader)
    try:
        assert [(row.name, row.is_default) for row in repository.status()] == [("a", True), ("b", True)]
        assert repository.default_model == "a"
        with pytest.raises(NotFound, match="is not one this server serves \\(a, b\\)"):
            repository.unload("c")
        repository.unload("b")  # not the server's default: it may go
    finally:
        repository.close()


def test_a_model_that_cannot_load_at_start_releases_the_others(root, loader):
    add_model(root, "a")
    add_version(root, "a", "1")
    add_model(root, "b")
    add_version(root, "b", "1", "corrupt")
    with pytest.raises(
        FailedPrecondition, match=r"model 'b' version 1 cannot be loaded .*; no version of it is serving"
    ):
        ModelRepository(root, ["a", "b"], loader)
    assert [(model.source.name, model.closed) for model in loader.built] == [("a", 1)]


def test_close_releases_everything_once_and_refuses_later_calls(root, loader):
    add_model(root, "m")
    add_version(root, "m", "1")
    add_version(root, "m", "2")
    repository = ModelRepository(root, ["m"], loader)
    with repository.use() as (_, _, held):
        repository.load("m", "2")  # the held copy drains...
        started = time.monotonic()
    repository.close()  # ...and close() does not wait for the drain timeout
    assert time.monotonic() - started < 5
    assert [model.closed for model in loader.built] == [1, 1]
    assert not any(row.state in ("READY", "DRAINING") for row in repository.status())
    repository.close()
    assert [model.closed for model in loader.built] == [1, 1]
    with pytest.raises(Unavailable, match="stopping"):
        use_once(repository)
    with pytest.raises(Unavailable, match="stopping"):
        repository.load("m", "1")
    assert held.closed == 1


def test_a_model_that_fails_to_close_does_not_keep_the_others_open(root, loader):
    add_model(root, "a")
    add_version(root, "a", "1", "fails to close")
    add_model(root, "b")
    add_version(root, "b", "1")
    repository = ModelRepository(root, ["a", "b"], loader)
    repository.load("a", "1")  # its drained copy fails to close too
    assert repository.wait_drained(5)
    repository.close()
    assert [(model.source.name, model.closed) for model in loader.built] == [("a", 1), ("b", 1), ("a", 1)]


def test_close_during_a_drain_closes_the_draining_model_once(root, loader):
    add_model(root, "m")
    add_version(root, "m", "1")
    repository = ModelRepository(root, ["m"], loader, drain_timeout_s=60)
    with repository.use() as (_, _, old):
        repository.load("m", "1")
        closer = threading.Thread(target=repository.close)
        closer.start()
        closer.join(5)
        assert not closer.is_alive()  # it did not wait for the request: the server is stopping
    assert [model.closed for model in loader.built] == [1, 1]
    assert old.closed == 1


# --- under load ----------------------------------------------------------------------------------


def test_versions_swap_twenty_times_under_concurrent_use(root, loader):
    add_model(root, "m", {"version_policy": {"all": {}}})
    for version in ("1", "2", "3"):
        add_version(root, "m", version)
    repository = ModelRepository(root, ["m"], loader)
    stop = threading.Event()
    errors: list[BaseException] = []
    served: list[str] = []

    def user() -> None:
        while not stop.is_set():
            try:
                with repository.use() as (_, version, model):
                    assert model.serve() == version
                served.append(version)
                for wanted in ("1", "2", "3"):  # READY throughout: a reload swaps copies atomically
                    with repository.use("m", wanted) as (_, version, model):
                        assert model.serve() == version == wanted
            except BaseException as exc:
                errors.append(exc)
                return

    users = [threading.Thread(target=user, daemon=True) for _ in range(6)]
    for thread in users:
        thread.start()
    try:
        for i in range(20):
            repository.load("m", ("1", "2")[i % 2])  # a fresh copy, the default; the old one drains
            time.sleep(0.005)
    finally:
        stop.set()
        for thread in users:
            thread.join(10)
    assert not any(thread.is_alive() for thread in users)
    assert errors == []
    assert set(served) <= {"1", "2", "3"} and len(served) > 20
    assert repository.wait_drained(10)
    assert states(repository) == [("1", "READY", False), ("2", "READY", True), ("3", "READY", False)]
    repository.close()
    assert len(loader.built) == 3 + 20
    assert [model.closed for model in loader.built] == [1] * len(loader.built)
    assert not any(model.closed_in_use for model in loader.built)
