"""Several detector models in the gateway (GatewayConfig.detector_models): the pipeline asks each
one about a photo, in parallel, and merges their answers (gateway.pipeline.merge_detections);
the merge itself on hand-made answers, then a real detector service on loopback serving three
models of a temporary repository (one COCO network under different category maps)."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from common.config import MODELS_DIR, ConfigError, load_config
from common.errors import FailedPrecondition
from common.photos import load_photo
from common.serving import Deadline
from detector_server.config import DetectorConfig
from gateway.backends import Backends
from gateway.config import GatewayConfig
from gateway.pipeline import Pipeline, SearchOptions, Timings, merge_detections
from gateway.ports import BatchAnswer, CatalogueMatch, CategoryFailure, DetectorOutput, LocatorOutput, Signature
from gateway.proposals import Source

# -- the merge, on hand-made answers -----------------------------------------------------------------


def box(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([x0, y0, x1, y1], np.float32)


def test_one_answer_is_kept_as_it_is() -> None:
    answer = DetectorOutput([(box(0, 0, 10, 10), "cup", "tableware", 0.5)], [(box(0, 0, 5, 5), 0.2)], 3.0)
    assert merge_detections([answer], 0.5, 0.7, 1) is answer


def test_one_object_seen_by_two_models_in_one_category_is_one_detection() -> None:
    a = DetectorOutput([(box(0, 0, 100, 100), "cup", "tableware", 0.6)], [], 4.0)
    b = DetectorOutput(
        [
            (box(2, 2, 100, 98), "mug", "tableware", 0.8),  # the same cup, more confident: stays
            (box(200, 0, 300, 100), "cup", "tableware", 0.3),  # another cup: stays
            (box(0, 0, 100, 100), "cup", "kitchen", 0.4),  # the same box in another category: stays
            (box(0, 0, 100, 100), "person", "", 0.9),  # not a product
        ],
        [],
        7.0,
    )
    c = DetectorOutput([(box(1, 1, 99, 99), "person", "", 0.5)], [], 1.0)  # the same person: dropped
    merged = merge_detections([a, b, c], 0.5, 0.7, 10)
    assert [(name, category, confidence) for _, name, category, confidence in merged.detections] == [
        ("person", "", 0.9),
        ("mug", "tableware", 0.8),
        ("cup", "kitchen", 0.4),
        ("cup", "tableware", 0.3),
    ]
    assert merged.inference_ms == 7.0  # the slowest model


def test_class_agnostic_boxes_are_merged_best_first_and_capped() -> None:
    a = DetectorOutput([], [(box(0, 0, 100, 100), 0.3), (box(300, 300, 400, 400), 0.1)])
    b = DetectorOutput([], [(box(1, 1, 100, 100), 0.6), (box(150, 0, 250, 100), 0.2)])
    merged = merge_detections([a, b], 0.5, 0.7, 0)
    assert [score for _, score in merged.objects] == [0.6, 0.2, 0.1]
    assert [score for _, score in merge_detections([a, b], 0.5, 0.7, 2).objects] == [0.6, 0.2]


# -- configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"detector_models": []}, r"detector_models \[\] is empty"),
        ({"detector_models": ["a", "b", "a"]}, r"detector_models names \['a'\] more than once"),
        ({"detector_address": "a.internal:1,b.internal:1"}, "detector_address: replica address 'a.internal:1'"),
        ({"signature_address": "10.0.0.1:1,[::1]:2"}, "signature_address: replica addresses .* mix IPv4 and IPv6"),
        ({"index_address": "10.0.0.1:1,10.0.0.2:1"}, "index_address '10.0.0.1:1,10.0.0.2:1' is not one address"),
        ({"index_routes": {"shoes": "10.0.0.1:1,10.0.0.2:1"}}, "index_routes\\['shoes'\\] .* put a router"),
    ],
)
def test_config_refuses_what_cannot_be_served(fields: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_config(GatewayConfig, "gateway", environ={}, **fields)


def test_config_takes_replicas_and_models() -> None:
    config = load_config(
        GatewayConfig,
        "gateway",
        [
            "--detector-address",
            "127.0.0.1:1,127.0.0.1:2",
            "--signature-address",
            "dns:///signature.internal:50052",
            "--detector-models",
            '["yolo-a", "yolo-b"]',
        ],
        environ={},
    )
    assert config.detector_models == ["yolo-a", "yolo-b"]
    assert GatewayConfig().detector_models == [""]


# -- over loopback, against a real detector service ---------------------------------------------------

STOCK = MODELS_DIR / "yolov3-tiny"
# Category maps of the three models: "yolo-b" calls a cup a mug and knows no other product.
MODELS = {"yolo-a": None, "yolo-b": {"cup": "mugs"}, "yolo-c": None}


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A detector service serving "yolo-a" (its default), "yolo-b" and "yolo-c" from a temporary
    repository: models/<name>/config.json, models/<name>/1/{model.onnx, classes.txt}."""
    from detector_server.server import create_server

    root = tmp_path_factory.mktemp("models")
    stock = json.loads((STOCK / "config.json").read_text())
    for name, categories in MODELS.items():
        version = root / name / "1"
        version.mkdir(parents=True)
        (version / "model.onnx").symlink_to(STOCK / "1" / "model.onnx")
        shutil.copy(STOCK / "1" / "classes.txt", version / "classes.txt")
        config = {
            **stock,
            "name": name,
            "categories": categories or stock["categories"],
            "providers": [{"name": "CPUExecutionProvider", "options": {}}],
        }
        (root / name / "config.json").write_text(json.dumps(config))
    server, port = create_server(
        load_config(
            DetectorConfig,
            "detector",
            environ={},
            port=0,
            models_dir=str(root),
            models=list(MODELS),
            intra_op_threads=2,
            access_log=False,
        )
    )
    yield f"127.0.0.1:{port}"
    server.stop(None)


class Recording:
    """The gateway's real detector port, recording the models each call names."""

    def __init__(self, detector: object):
        self.detector = detector
        self.models: list[str] = []
        self.lock = threading.Lock()

    def detect(self, *args: object, model: str = "") -> DetectorOutput:
        with self.lock:
            self.models.append(model)
        return self.detector.detect(*args, model=model)  # type: ignore[attr-defined]  # a GrpcDetector


class NoLocator:
    def locate(self, rgb: np.ndarray, max_salient: int, max_segments: int, timeout_s: float) -> LocatorOutput:
        return LocatorOutput([], [])


class ShapeSigner:
    def images_per_call(self, timeout_s: float) -> int:
        return 0

    def sign(self, crops: Sequence[np.ndarray], kinds: Sequence[str], timeout_s: float) -> list[list[Signature]]:
        return [[crop.shape for _ in kinds] for crop in crops]


class Catalogue:
    """Categories "tableware" and "mugs", each answering one product named after it."""

    def categories(self, kind: str) -> set[str]:
        return {"tableware", "mugs"}

    def unreachable(self) -> list[CategoryFailure]:
        return []

    def backend_of(self, category: str) -> str:
        return "in-process"

    def search_batch(
        self,
        category: str,
        kind: str,
        signatures: Sequence[Signature],
        top_k: int,
        timeout_s: float,
        filter=None,
        spatial=None,
    ) -> BatchAnswer:
        return BatchAnswer([[CatalogueMatch(f"{category}-1", "", 0.9, {}, None)] for _ in signatures])

    def local_features(self, category: str, kind: str, item_ids: Sequence[str], timeout_s: float) -> dict:
        return {}  # stored without: nothing to re-rank by


def pipeline_for(address: str, models: list[str]) -> tuple[Pipeline, Recording, Backends]:
    config = load_config(GatewayConfig, "gateway", environ={}, detector_models=models, box_vote_sharpness=0.0)
    backends = Backends(address, "127.0.0.1:9", "127.0.0.1:9", {}, config)
    recording = Recording(backends.detector)
    pool = ThreadPoolExecutor(8)
    return Pipeline(config, recording, NoLocator(), ShapeSigner(), Catalogue(), pool), recording, backends  # type: ignore[arg-type]  # a partial index: searches only


def detected(address: str, models: list[str]) -> tuple[list[tuple[str, str, tuple[float, ...]]], list[str]]:
    """The detector proposals for the coffee photo -> ((class, category, box) sorted, models asked)."""
    pipeline, recording, backends = pipeline_for(address, models)
    try:
        proposals = pipeline._localise(load_photo("coffee"), frozenset({Source.DETECTOR}), 0.0, Deadline(30), Timings())
    finally:
        pipeline.pool.shutdown()
        backends.close()
    found = sorted((p.class_name, p.category, tuple(np.round(p.box, 1))) for p in proposals)
    return found, sorted(recording.models)


def test_every_model_is_asked_and_each_category_map_applies(detector: str) -> None:
    found, asked = detected(detector, ["yolo-a", "yolo-b"])
    assert asked == ["yolo-a", "yolo-b"]
    pairs = {(name, category) for name, category, _ in found}
    assert {("cup", "tableware"), ("cup", "mugs")} <= pairs  # the one cup, under both maps
    only_b, _ = detected(detector, ["yolo-b"])
    assert {(name, category) for name, category, _ in only_b} == {("cup", "mugs")}


def test_the_default_model_is_the_services_default(detector: str) -> None:
    default, asked = detected(detector, [""])
    assert asked == [""]
    assert default == detected(detector, ["yolo-a"])[0]
    assert ("cup", "tableware") in {(name, category) for name, category, _ in default}


def test_two_models_seeing_the_same_objects_give_each_once(detector: str) -> None:
    one, _ = detected(detector, ["yolo-a"])
    both, asked = detected(detector, ["yolo-a", "yolo-c"])
    assert asked == ["yolo-a", "yolo-c"]
    assert one and both == one  # same network, same map: every object once, same box


def test_items_name_their_class(detector: str) -> None:
    pipeline, _, backends = pipeline_for(detector, ["yolo-a", "yolo-b"])
    try:
        rgb = load_photo("coffee")
        photo = pipeline.decode(None, (rgb.shape[1], rgb.shape[0], rgb.tobytes()))
        options = SearchOptions("deep", 3, sources=frozenset({Source.DETECTOR}))
        outcome = pipeline.search(photo, options, Deadline(30))
    finally:
        pipeline.pool.shutdown()
        backends.close()
    cups = [item for item in outcome.items if item.source is Source.DETECTOR and item.class_name == "cup"]
    # The cup under both maps overlaps itself: the exclusive rule (cup/bowl/vase...) keeps one.
    assert len(cups) == 1
    assert cups[0].category in ("tableware", "mugs")
    assert cups[0].matches[0].product_id == f"{cups[0].category}-1"


def test_a_model_the_detector_does_not_serve_is_a_configuration_error(detector: str) -> None:
    pipeline, _, backends = pipeline_for(detector, ["yolo-a", "nope"])
    try:
        # Not NOT_FOUND: the caller named no model; the gateway's configuration is what to fix.
        with pytest.raises(FailedPrecondition, match="the gateway's detector_models names 'nope'"):
            pipeline._localise(load_photo("coffee"), frozenset({Source.DETECTOR}), 0.0, Deadline(30), Timings())
    finally:
        pipeline.pool.shutdown()
        backends.close()
