import grpc
import pytest

from common.proto_convert import image_to_proto
from detector_server.service import DetectorService
from mps.common.v1 import common_pb2
from mps.detector.v1 import detector_pb2
from tests.conftest import bad_images
from tests.servicer import unary

SERVICE = detector_pb2.DESCRIPTOR.services_by_name["DetectorService"]


@pytest.fixture(scope="module")
def servicer(detector_model):
    return DetectorService({"yolov3-tiny": detector_model}, "yolov3-tiny", 50_000_000, max_objects=200)


def test_detect_encoded_and_raw(servicer, coffee, coffee_png):
    for image in (common_pb2.Image(encoded=coffee_png), image_to_proto(coffee)):
        response, code, _ = unary(servicer, SERVICE, "Detect", detector_pb2.DetectRequest(image=image))
        assert code == grpc.StatusCode.OK
        assert (response.image_width, response.image_height) == (600, 400)
        assert response.detections[0].class_name == "cup"
        assert response.detections[0].box.x_max <= 600


@pytest.mark.parametrize("name", ["empty", "truncated", "random", "zero_size_header", "bomb"])
def test_bad_images_are_invalid_argument(servicer, coffee_png, name):
    request = detector_pb2.DetectRequest(image=common_pb2.Image(encoded=bad_images(coffee_png)[name]))
    _, code, details = unary(servicer, SERVICE, "Detect", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "image" in details


def test_unknown_model_is_not_found(servicer, coffee_png):
    request = detector_pb2.DetectRequest(image=common_pb2.Image(encoded=coffee_png), model="rfcn")
    _, code, details = unary(servicer, SERVICE, "Detect", request)
    assert code == grpc.StatusCode.NOT_FOUND and "yolov3-tiny" in details


def test_out_of_range_threshold_is_invalid(servicer, coffee_png):
    request = detector_pb2.DetectRequest(image=common_pb2.Image(encoded=coffee_png), min_confidence=2)
    assert unary(servicer, SERVICE, "Detect", request)[1] == grpc.StatusCode.INVALID_ARGUMENT


def test_list_models_reports_the_real_provider(servicer):
    response, code, _ = unary(servicer, SERVICE, "ListModels", detector_pb2.ListModelsRequest())
    model = response.models[0]
    assert model.is_default and model.execution_provider == "CPUExecutionProvider"
    assert len(model.class_names) == 80 and model.categories["cup"] == "tableware"


def test_objects_come_back_in_original_pixels(servicer, coffee_png):
    request = detector_pb2.DetectRequest(image=common_pb2.Image(encoded=coffee_png), objectness_threshold=0.01,
                                         max_objects=5)
    response, code, _ = unary(servicer, SERVICE, "Detect", request)
    assert code == grpc.StatusCode.OK and 0 < len(response.objects) <= 5
    best = response.objects[0]
    assert best.objectness > 0.5 and 140 < best.box.x_min < 160 and 420 < best.box.x_max < 440
    # Without the threshold, no objects.
    plain, _, _ = unary(servicer, SERVICE, "Detect", detector_pb2.DetectRequest(image=request.image))
    assert not plain.objects


@pytest.mark.parametrize("field, value, code", [("objectness_threshold", 1.5, grpc.StatusCode.INVALID_ARGUMENT),
                                                ("objectness_threshold", -0.1, grpc.StatusCode.INVALID_ARGUMENT),
                                                ("max_objects", 10_000, grpc.StatusCode.RESOURCE_EXHAUSTED)])
def test_bad_object_requests(servicer, coffee_png, field, value, code):
    request = detector_pb2.DetectRequest(image=common_pb2.Image(encoded=coffee_png), objectness_threshold=0.1)
    setattr(request, field, value)
    _, got, details = unary(servicer, SERVICE, "Detect", request)
    assert got == code and field in details
