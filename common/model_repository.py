"""A versioned model repository with hot swap, as Triton's, for the detector and signature services.

On disk (Triton's layout):

    models/<name>/config.json          the model's config, shared by its versions
    models/<name>/<version>/           one folder per version, a positive integer: the model file(s)
    models/<name>/<version>/config.json  optional: keys that differ for this version (e.g. classes)

A version's settings are the model's config.json updated with its own. Keys every model has (the
services read the rest, e.g. input size, preprocessing, classes, thresholds):

- `version_policy`: which versions on disk serve: {"latest": N} (the N highest, default 1),
  {"all": {}}, or {"specific": ["1", "3"]};
- `max_batch` (default 1) and `dynamic_batching` ({"max_queue_delay_ms", "preferred_batch_sizes"},
  common/batching.py; absent: off);
- `providers`: ONNX Runtime execution providers in order of preference, each {"name", "options"}
  (e.g. TensorRT's engine and timing caches and fp16, CUDA's options); an option ending in `_path`
  that is relative is a folder under the version's folder (created on load). Absent: TensorRT >
  CUDA > CPU without options.

Serving: `use(name, version)` lends the named version (empty: the model's default, the one loaded
last) for one request and counts it in flight. `load(name, version)` builds the new version beside
the serving ones (the service's loader, then its `warm_up()`, so its first request is not cold),
then swaps it in atomically: requests already in flight finish on the old one, which is drained
(no new requests, then its in-flight count reaches 0) and released (`close()`) in the background.
A version that fails to build or warm up is FAILED with the reason and nothing that served before
changes (FailedPrecondition to the caller). Control calls (load, unload) run one at a time;
`close()` (the server is stopping) releases every version at once, draining ones included.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

from common.batching import BatchPolicy
from common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, quote

log = logging.getLogger(__name__)

State = Literal["LOADING", "READY", "DRAINING", "UNLOADED", "FAILED"]
# The providers tried when a model's config names none (common/onnx_session.py keeps the first
# that really starts).
DEFAULT_PROVIDERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("TensorrtExecutionProvider", {}),
    ("CUDAExecutionProvider", {}),
    ("CPUExecutionProvider", {}),
)


class ServedModel(Protocol):
    """What a service's loader builds: one loaded version of a model."""

    @property
    def provider(self) -> str:
        """Where it runs (an ONNX Runtime provider, or "cpu"/"cuda" for kernels)."""
        ...

    @property
    def max_batch(self) -> int: ...

    def warm_up(self) -> None:
        """Runs every compiled path once (raises when the model is unusable: wrong shapes...)."""
        ...

    def close(self) -> None:
        """Releases its sessions and threads; called once no request uses it."""
        ...


M = TypeVar("M", bound=ServedModel)


@dataclass(frozen=True)
class VersionPolicy:
    kind: Literal["latest", "all", "specific"] = "latest"
    count: int = 1
    versions: tuple[str, ...] = ()

    @staticmethod
    def parse(raw: Any) -> VersionPolicy:
        if raw is None:
            return VersionPolicy()
        if not isinstance(raw, dict) or len(raw) != 1:
            raise ValueError(
                f'version_policy {raw!r} is not one of {{"latest": N}}, {{"all": {{}}}}, {{"specific": [...]}}'
            )
        ((kind, value),) = raw.items()
        if kind == "latest":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"version_policy latest {value!r} is not an integer >= 1")
            return VersionPolicy("latest", value)
        if kind == "all":
            return VersionPolicy("all")
        if kind == "specific":
            if not isinstance(value, list) or not value:
                raise ValueError(f"version_policy specific {value!r} is not a non-empty list of versions")
            return VersionPolicy("specific", versions=tuple(str(v) for v in value))
        raise ValueError(f"version_policy {kind!r} is not 'latest', 'all' or 'specific'")

    def select(self, on_disk: Sequence[str]) -> list[str]:
        """The versions of `on_disk` (ascending) this policy serves, ascending."""
        if self.kind == "latest":
            return list(on_disk[-self.count :])
        if self.kind == "all":
            return list(on_disk)
        return [v for v in on_disk if v in self.versions]


@dataclass(frozen=True)
class ModelSource:
    """One version on disk, as a loader gets it."""

    name: str
    version: str
    folder: Path  # models/<name>/<version>/
    settings: dict[str, Any]  # the model's config.json updated with the version's own
    batching: BatchPolicy
    providers: tuple[tuple[str, dict[str, Any]], ...]

    def path(self, key: str) -> Path:
        """The file a setting names, relative to the version's folder; FileNotFoundError if absent."""
        if key not in self.settings:
            raise ValueError(f"config.json of {self.name} has no {key!r}")
        path = self.folder / str(self.settings[key])
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        return path


def version_key(version: str) -> int:
    return int(version)


def versions_on_disk(folder: Path) -> list[str]:
    """The version folders of a model, ascending (positive integers; anything else is ignored)."""
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0]
    return sorted(found, key=version_key)


def read_source(root: Path, name: str, version: str) -> ModelSource:
    """Reads a version's settings; ValueError saying what is wrong with them."""
    folder = root / name
    settings: dict[str, Any] = {}
    for path in (folder / "config.json", folder / version / "config.json"):
        if path == folder / version / "config.json" and not path.is_file():
            continue  # a version's own config is optional
        try:
            part = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} cannot be read: {exc}") from None
        if not isinstance(part, dict):
            raise ValueError(f"{path} is not a JSON object")
        settings.update(part)
    max_batch = settings.get("max_batch", 1)
    if not isinstance(max_batch, int) or isinstance(max_batch, bool):
        raise ValueError(f"config.json of {name}: max_batch {max_batch!r} is not an integer")
    batching = BatchPolicy.from_config(max_batch, settings.get("dynamic_batching"))
    providers = _providers(settings.get("providers"), folder / version)
    return ModelSource(name, version, folder / version, settings, batching, providers)


def _providers(raw: Any, folder: Path) -> tuple[tuple[str, dict[str, Any]], ...]:
    if raw is None:
        return DEFAULT_PROVIDERS
    if not isinstance(raw, list) or not all(isinstance(p, dict) and isinstance(p.get("name"), str) for p in raw):
        raise ValueError('providers is not a list of {"name": "...", "options": {...}}')
    chosen = []
    for entry in raw:
        if not isinstance(entry.get("options", {}), dict):
            raise ValueError(f"providers: options of {entry['name']} is not an object")
        options = dict(entry.get("options", {}))
        for key, value in options.items():
            if key.endswith("_path") and isinstance(value, str) and not Path(value).is_absolute():
                options[key] = str(folder / value)
        chosen.append((entry["name"], options))
    return tuple(chosen)


@dataclass
class _Version(Generic[M]):
    name: str
    version: str
    state: State
    model: M | None = None
    reason: str = ""
    in_flight: int = 0
    load_ms: float = 0.0
    chosen_at: int = 0  # the load sequence that last made it the default (higher = more recent)
    policy: VersionPolicy = field(default_factory=VersionPolicy)  # its config's, read when it was built


@dataclass(frozen=True)
class VersionStatus:
    """One version of a model, as ListModels reports it."""

    name: str
    version: str
    state: State
    provider: str
    reason: str
    is_default: bool
    max_batch: int
    in_flight: int
    load_ms: float


@dataclass
class _Model(Generic[M]):
    # READY, LOADING, FAILED, UNLOADED (an UNLOADED row is not shown while a copy of its version drains)
    versions: dict[str, _Version[M]] = field(default_factory=dict)
    draining: list[_Version[M]] = field(default_factory=list)
    default: str = ""  # the READY version requests get when they name none


class ModelRepository(Generic[M]):
    """The served versions of a service's models (see the module).

    `names`: the models served from the start, each with the versions its policy selects; the
    first is the service's default model. `any_model`: whether LoadModel may also load other
    folders of the repository (the detector's), or only these (the signature service's, whose
    models each back one signature kind)."""

    def __init__(
        self,
        root: Path,
        names: Sequence[str],
        loader: Callable[[ModelSource], M],
        any_model: bool = False,
        drain_timeout_s: float = 120.0,
    ):
        if not names:
            raise ValueError("a model repository serves at least one model")
        self.root = Path(root)
        self.default_model = names[0]
        self._names = list(names)
        self._loader = loader
        self._any_model = any_model
        self._drain_timeout_s = drain_timeout_s
        self._models: dict[str, _Model[M]] = {}
        self._changed = threading.Condition()
        self._control = threading.Lock()
        self._sequence = 0
        self._drainers: list[threading.Thread] = []
        self._closed = False
        for name in names:
            try:
                self.load(name)
            except Exception:
                self.close()
                raise

    # --- serving --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, name: str = "", version: str = "") -> Iterator[tuple[str, str, M]]:
        """(name, version, model) for one request; the version cannot be released until it ends."""
        name = name or self.default_model
        with self._changed:
            entry = self._ready(name, version)
            entry.in_flight += 1
            model = entry.model  # read here: a drain that times out sets it to None
        try:
            assert model is not None
            yield name, entry.version, model
        finally:
            with self._changed:
                entry.in_flight -= 1
                if entry.in_flight == 0:
                    self._changed.notify_all()

    def _ready(self, name: str, version: str) -> _Version[M]:
        if self._closed:
            raise Unavailable("this server is stopping: send the request to another replica")
        model = self._models.get(name)
        if model is None or not (model.default or any(v.state == "READY" for v in model.versions.values())):
            if model is None and name not in self._names:
                raise NotFound(f"model {quote(name)} is not served here: {self._listing()}")
            # Not UNAVAILABLE: a client retrying that would retry until an operator acts.
            raise FailedPrecondition(
                f"model {quote(name)} has no version loaded: LoadModel one (ListModels lists them)"
            )
        if not version:
            return model.versions[model.default]
        entry = model.versions.get(version)
        if entry is None or entry.state != "READY":
            ready = sorted((v for v, e in model.versions.items() if e.state == "READY"), key=version_key)
            raise NotFound(
                f"version {quote(version)} of model {quote(name)} is not loaded: use one of {ready} "
                "(ListModels lists them), or leave the version empty for the default"
            )
        return entry

    def _listing(self) -> str:
        served = sorted(n for n, m in self._models.items() if m.default)
        return f"use one of {[*served]} (ListModels lists them), or leave the model empty for the default"

    # --- status ---------------------------------------------------------------------------------

    def status(self, name: str = "") -> list[VersionStatus]:
        """Every version of `name` (or of every model), draining ones included, by name then version.
        A replaced or unloaded copy is DRAINING until released, then UNLOADED; a reloaded version
        shows its DRAINING old copy beside its READY new one."""
        with self._changed:
            rows = []
            for model_name, model in sorted(self._models.items()):
                if name and model_name != name:
                    continue
                draining = {e.version for e in model.draining}
                # a version being drained is DRAINING until released, not also UNLOADED already
                shown = [e for e in model.versions.values() if not (e.state == "UNLOADED" and e.version in draining)]
                entries = [*shown, *model.draining]
                for entry in sorted(entries, key=lambda e: (version_key(e.version), e.state != "DRAINING")):
                    rows.append(self._row(entry, model))
            return rows

    def _row(self, entry: _Version[M], model: _Model[M]) -> VersionStatus:
        served = entry.model if entry.state in ("READY", "DRAINING") else None
        return VersionStatus(
            entry.name,
            entry.version,
            entry.state,
            served.provider if served is not None else "",
            entry.reason,
            entry.state == "READY" and model.default == entry.version,
            served.max_batch if served is not None else 0,
            entry.in_flight,
            entry.load_ms,
        )

    # --- control --------------------------------------------------------------------------------

    def load(self, name: str, version: str = "") -> list[VersionStatus]:
        """Loads `version` of `name` (empty: the versions its policy selects on disk now) beside
        the serving ones, warms it up and swaps it in; see the module. Returns the model's status."""
        self._check_name(name)
        with self._control:
            self._refuse_if_closed()
            folder = self.root / name
            if not (folder / "config.json").is_file():
                raise NotFound(f"model {quote(name)} has no folder with a config.json in the model repository")
            on_disk = versions_on_disk(folder)
            if version:
                if version not in on_disk:
                    raise NotFound(
                        f"model {quote(name)} has no version {quote(version)} on disk: its versions are {on_disk}"
                    )
                wanted = [version]
            else:
                try:
                    policy = (
                        VersionPolicy.parse(read_source(self.root, name, on_disk[-1]).settings.get("version_policy"))
                        if on_disk
                        else VersionPolicy()
                    )
                except ValueError as exc:
                    raise FailedPrecondition(f"model {quote(name)}: {exc}") from None
                wanted = policy.select(on_disk)
                if not wanted:
                    raise NotFound(
                        f"model {quote(name)}: its version policy selects none of the versions on disk {on_disk}"
                    )
            built = self._build_all(name, wanted)
            self._swap_in(name, built, replace_policy=not version)
            return self.status(name)

    def _build_all(self, name: str, versions: list[str]) -> list[_Version[M]]:
        """Builds and warms every version, or none: on a failure the ones built are released and
        FailedPrecondition says which failed and what keeps serving."""
        built: list[_Version[M]] = []
        replaced: dict[str, _Version[M] | None] = {}  # the rows LOADING placeholders stand in for
        for version in versions:
            with self._changed:
                model = self._models.setdefault(name, _Model())
                if version not in model.versions or model.versions[version].state != "READY":
                    replaced[version] = model.versions.get(version)
                    model.versions[version] = _Version(name, version, "LOADING")
            start = time.perf_counter()
            try:
                source = read_source(self.root, name, version)
                policy = VersionPolicy.parse(source.settings.get("version_policy"))
                loaded = self._loader(source)
                try:
                    loaded.warm_up()
                except BaseException:
                    _close_quietly(loaded, name, version)  # the warm-up's error is the one to report
                    raise
            except Exception as exc:
                reason = (
                    f"{type(exc).__name__}: {exc}" if not isinstance(exc, (ValueError, FileNotFoundError)) else str(exc)
                )
                for done in built:
                    assert done.model is not None
                    _close_quietly(done.model, name, done.version)
                with self._changed:
                    model = self._models[name]
                    for done in built:  # built, never swapped in: the rows they stood in for come back
                        previous = replaced.get(done.version)
                        if previous is not None:
                            model.versions[done.version] = previous
                        elif done.version in replaced:
                            del model.versions[done.version]
                    current = model.versions.get(version)
                    if current is None or current.state != "READY":
                        model.versions[version] = _Version(name, version, "FAILED", reason=reason)
                    serving = model.default
                log.warning("model %s version %s failed to load: %s", name, version, reason)
                keeps = f"version {serving} keeps serving" if serving else "no version of it is serving"
                raise FailedPrecondition(
                    f"model {quote(name)} version {version} cannot be loaded ({reason[:400]}); {keeps}",
                    info={"model": name, "version": version},
                ) from None
            load_ms = (time.perf_counter() - start) * 1000
            log.info("model %s version %s loaded and warmed in %.0f ms on %s", name, version, load_ms, loaded.provider)
            built.append(_Version(name, version, "READY", loaded, load_ms=load_ms, policy=policy))
        return built

    def _swap_in(self, name: str, built: list[_Version[M]], replace_policy: bool) -> None:
        """Makes `built` READY atomically (the last one the default) and drains what they replace:
        a reloaded version's old copy, and versions the policy no longer selects (a policy load),
        or beyond the policy's count (a `latest: N` policy after a single-version load)."""
        with self._changed:
            model = self._models[name]
            retired: list[_Version[M]] = []
            for entry in built:
                old = model.versions.get(entry.version)
                if old is not None and old.state == "READY":
                    retired.append(old)
                self._sequence += 1
                entry.chosen_at = self._sequence
                model.versions[entry.version] = entry
            model.default = built[-1].version
            fresh = {e.version for e in built}
            ready = [e for e in model.versions.values() if e.state == "READY" and e.version not in fresh]
            if replace_policy:
                retired += ready
            else:
                policy = built[-1].policy  # read when built: nothing here can fail half-way
                if policy.kind == "latest":
                    keep = policy.count - len(built)
                    by_recency = sorted(ready, key=lambda e: e.chosen_at, reverse=True)
                    retired += by_recency[max(keep, 0) :]
            for entry in retired:
                if model.versions.get(entry.version) is entry:
                    model.versions[entry.version] = _Version(name, entry.version, "UNLOADED", reason="replaced")
                self._drain(model, entry, "replaced")

    def unload(self, name: str, version: str = "") -> list[VersionStatus]:
        """Drains then releases `version` of `name` (empty: every version)."""
        self._check_name(name)
        with self._control, self._changed:
            self._refuse_if_closed()
            model = self._models.get(name)
            ready = [e for e in model.versions.values() if e.state == "READY"] if model else []
            if model is None or not ready:
                raise NotFound(f"model {quote(name)} has no version loaded (ListModels lists them)")
            going = ready if not version else [e for e in ready if e.version == version]
            if not going:
                loaded = sorted((e.version for e in ready), key=version_key)
                raise NotFound(f"version {quote(version)} of model {quote(name)} is not loaded: loaded are {loaded}")
            if name == self.default_model and len(going) == len(ready):
                raise FailedPrecondition(
                    f"model {quote(name)} is this server's default: it keeps at least one version; "
                    "load another version first, or unload one version of several"
                )
            for entry in going:
                model.versions[entry.version] = _Version(name, entry.version, "UNLOADED", reason="unloaded on request")
                self._drain(model, entry, "unloaded on request")
            rest = [e for e in model.versions.values() if e.state == "READY"]
            model.default = max(rest, key=lambda e: e.chosen_at).version if rest else ""
        return self.status(name)

    def _drain(self, model: _Model[M], entry: _Version[M], why: str) -> None:
        """Held: self._changed. Takes `entry` out of service and releases it once idle, in the
        background (a LoadModel returns once the new version serves)."""
        entry.state = "DRAINING"
        entry.reason = why
        model.draining.append(entry)
        drainer = threading.Thread(target=self._release, args=(model, entry), name=f"drain-{entry.name}", daemon=True)
        self._drainers = [t for t in self._drainers if t.is_alive()] + [drainer]
        drainer.start()

    def _release(self, model: _Model[M], entry: _Version[M]) -> None:
        """A drainer thread: waits for `entry` to be idle (or the repository to close), closes it,
        and only then takes it off the draining list (so `wait_drained` means released)."""
        with self._changed:
            idle = self._changed.wait_for(lambda: entry.in_flight == 0 or self._closed, self._drain_timeout_s)
            if not idle:
                log.warning(
                    "model %s version %s still had %d requests after %.0f s of draining: released anyway",
                    entry.name,
                    entry.version,
                    entry.in_flight,
                    self._drain_timeout_s,
                )
            released, entry.model = entry.model, None  # None: close() of the repository took it
        if released is not None:
            _close_quietly(released, entry.name, entry.version)
        with self._changed:
            model.draining.remove(entry)
            entry.state = "UNLOADED"
            self._changed.notify_all()
        log.info("model %s version %s released (%s)", entry.name, entry.version, entry.reason)

    def wait_drained(self, timeout_s: float = 60.0) -> bool:
        """Blocks until no version is draining (tests, shutdown); whether that happened in time."""
        with self._changed:
            return self._changed.wait_for(lambda: not any(m.draining for m in self._models.values()), timeout_s)

    def _check_name(self, name: str) -> None:
        if not name:
            raise InvalidArgument("name is empty: name a model (ListModels lists them)", violations=[("name", "empty")])
        if not self._any_model and name not in self._names:
            raise NotFound(f"model {quote(name)} is not one this server serves ({', '.join(self._names)})")
        if "/" in name or "\\" in name or name.startswith("."):
            raise InvalidArgument(
                f"model name {quote(name)} is a folder name under the repository: no '/', '\\\\' or leading '.'",
                violations=[("name", "not a plain folder name")],
            )

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise Unavailable("this server is stopping: it loads and unloads no more models")

    def close(self) -> None:
        """Releases every version, draining ones at once (the server is stopping: its requests
        are over); later calls are refused (Unavailable). Returns once every model is closed."""
        with self._control:
            with self._changed:
                self._closed = True
                released: list[tuple[M, _Version[M]]] = []
                for m in self._models.values():
                    for e in [*m.versions.values(), *m.draining]:
                        if e.model is not None:
                            released.append((e.model, e))
                            e.model = None
                        if e.state == "READY":
                            e.state, e.reason = "UNLOADED", "the server stopped"
                    m.default = ""
                drainers = list(self._drainers)
                self._changed.notify_all()  # drainers stop waiting for idle
            for served, entry in released:
                _close_quietly(served, entry.name, entry.version)
            for drainer in drainers:
                if drainer is not threading.current_thread():
                    drainer.join()


def _close_quietly(model: ServedModel, name: str, version: str) -> None:
    """Closes a version; a failure is logged (releasing the others matters more)."""
    try:
        model.close()
    except Exception:
        log.exception("model %s version %s failed to close", name, version)
