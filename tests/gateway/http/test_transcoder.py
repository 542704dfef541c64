"""HTTP <-> gRPC from the protos, without servers: routes from the google.api.http options, request
messages from paths, queries and bodies, and the HTTP form of every gRPC status."""

from __future__ import annotations

import grpc
import pytest

from gateway.http import transcoder
from gateway.http.app import SERVICES
from gateway.http.transcoder import BadRequest
from mps.common.v1 import common_pb2
from mps.gateway.v1 import gateway_pb2

TABLE = transcoder.routes(SERVICES)


def route_of(name: str) -> transcoder.Route:
    (route,) = [r for r in TABLE if r.method.name == name]
    return route


def test_every_gateway_rpc_has_a_route():
    service = gateway_pb2.DESCRIPTOR.services_by_name["VisualSearchService"]
    assert sorted(r.method.name for r in TABLE) == sorted(m.name for m in service.methods)
    assert route_of("GetProduct").verb == "GET"
    assert route_of("GetProduct").rpc == "/mps.gateway.v1.VisualSearchService/GetProduct"
    assert route_of("IndexProducts").client_streaming and not route_of("IndexProducts").server_streaming
    assert (
        route_of("StreamMultiProductSearch").client_streaming and route_of("StreamMultiProductSearch").server_streaming
    )


def test_paths_match_their_routes_only():
    found = transcoder.find_route(TABLE, "GET", "/v1/products/cup-1/images/ab12/thumbnail")
    assert found is not None and found[0].method.name == "GetProductImage"
    assert found[1] == {"product_id": "cup-1", "image_id": "ab12"}
    # An id with "/" or spaces travels percent-encoded and arrives whole.
    found = transcoder.find_route(TABLE, "GET", "/v1/products/shoes%2Fred%20boot")
    assert found is not None and found[1] == {"product_id": "shoes/red boot"}
    # The custom verb is part of the path: POST /v1/products:index is not a product named ":index".
    found = transcoder.find_route(TABLE, "POST", "/v1/products:index")
    assert found is not None and found[0].method.name == "IndexProducts"
    assert transcoder.find_route(TABLE, "GET", "/v1/products/a/b") is None
    assert transcoder.find_route(TABLE, "DELETE", "/v1/stats") is None
    assert transcoder.allowed_verbs(TABLE, "/v1/products/x") == ["GET", "PATCH"]
    assert transcoder.allowed_verbs(TABLE, "/v1/nothing") == []


def test_templates_compile_variables_and_refuse_what_they_cannot_serve():
    variables, pattern = transcoder.compile_template("/v1/a/{x}/b/{y.z}:go")
    assert variables == ("x", "y.z")
    assert pattern.fullmatch("/v1/a/1/b/2:go") and not pattern.fullmatch("/v1/a/1/b/2")
    with pytest.raises(ValueError, match="start with /"):
        transcoder.compile_template("v1/a")
    with pytest.raises(ValueError, match="only"):
        transcoder.compile_template("/v1/{a=**}")


def test_path_variables_win_over_the_body():
    route = route_of("UpdateProduct")
    msg = transcoder.build_request(
        route, {"product_id": "from-path"}, [], {"productId": "from-body", "attributes": {"tags": ["red"]}}
    )
    assert msg.product_id == "from-path" and list(msg.attributes.tags) == ["red"]


def test_query_parameters_fill_scalars_enums_repeated_nested_and_messages():
    route = route_of("ListProducts")
    msg = transcoder.build_request(
        route,
        {"category": "shoes"},
        [
            ("page_size", "5"),
            ("pageToken", "abc"),
            ("filter.path_prefix", "fashion/tops"),
            ("filter.all_tags", "red"),
            ("filter.all_tags", "cotton"),
            ("filter.labels", '{"key": "brand", "values": ["acme"]}'),
        ],
    )
    assert msg.category == "shoes" and msg.page_size == 5 and msg.page_token == "abc"
    assert msg.filter.path_prefix == "fashion/tops" and list(msg.filter.all_tags) == ["red", "cotton"]
    assert msg.filter.labels[0].key == "brand" and list(msg.filter.labels[0].values) == ["acme"]
    search = transcoder.build_request(
        route_of("MultiProductSearch"),
        {},
        [("signature_kind", "SIGNATURE_KIND_BOW"), ("top_k", "3"), ("min_score", "0.5"), ("categories", "a")],
    )
    assert search.signature_kind == common_pb2.SIGNATURE_KIND_BOW and search.top_k == 3
    assert search.HasField("min_score") and search.min_score == pytest.approx(0.5)
    by_number = transcoder.build_request(route_of("MultiProductSearch"), {}, [("signature_kind", "2")])
    assert by_number.signature_kind == common_pb2.SIGNATURE_KIND_BOW
    forced = transcoder.build_request(route_of("PurgeProducts"), {"category": "c"}, [("force", "true")])
    assert forced.force


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ([("colour", "red")], "has no field 'colour'"),
        ([("page_size", "many")], "not an integer"),
        ([("filter.nope", "x")], "Filter has no field 'nope'"),
        ([("filter", "{not json")], "takes its JSON"),
        ([("page_size", "-1")], "page_size"),
        ([("filter.labels.key", "x")], "labels is repeated"),
    ],
)
def test_bad_query_parameters_say_what_to_fix(query, says):
    with pytest.raises(BadRequest, match=says):
        transcoder.build_request(route_of("ListProducts"), {"category": "c"}, query)


def test_bodies_are_checked_against_the_message():
    route = route_of("MultiProductSearch")
    with pytest.raises(BadRequest, match="topKay"):
        transcoder.build_request(route, {}, [], {"topKay": 3})
    with pytest.raises(BadRequest, match="expected a JSON object"):
        transcoder.build_request(route, {}, [], [1, 2])
    with pytest.raises(BadRequest, match="takes no body"):
        transcoder.build_request(route_of("GetProduct"), {"product_id": "p"}, [], {"category": "c"})
    with pytest.raises(BadRequest, match="not JSON"):
        transcoder.decode_json(b'{"topK": ')
    with pytest.raises(BadRequest, match="path: product_id is empty"):
        transcoder.build_request(route_of("GetProduct"), {"product_id": ""}, [])


def test_client_streams_are_arrays_or_lines():
    cls = gateway_pb2.IndexProductsRequest
    lines = [b'{"productId": "a", "category": "c"}', b'{"product_id": "b", "category": "c"}']
    assert [transcoder.line_message(line, n, cls).product_id for n, line in enumerate(lines, 1)] == ["a", "b"]
    array = b'[{"productId": "a"}, {"productId": "b"}]'
    assert [m.product_id for m in transcoder.body_messages(array, cls)] == ["a", "b"]
    assert [m.product_id for m in transcoder.body_messages(b'{"productId": "c"}', cls)] == ["c"]
    assert transcoder.body_messages(b"  ", cls) == []
    with pytest.raises(BadRequest, match="line 2"):
        transcoder.line_message(b'{"productId": 5, "nope": 1}', 2, cls)
    with pytest.raises(BadRequest, match="expected a JSON array"):
        transcoder.body_messages(b"7", cls)


def test_multipart_puts_the_file_in_the_image_field():
    route = route_of("MultiProductSearch")
    msg = transcoder.multipart_request(
        route, {}, [], {"image": b"\xff\xd8\xffjpeg"}, [("top_k", "4"), ("request", '{"categories": ["shoes"]}')]
    )
    assert msg.image.encoded == b"\xff\xd8\xffjpeg" and msg.top_k == 4 and list(msg.categories) == ["shoes"]
    with pytest.raises(BadRequest, match="named image"):
        transcoder.multipart_request(route, {}, [], {"photo": b"x"}, [])
    with pytest.raises(BadRequest, match="empty"):
        transcoder.multipart_request(route, {}, [], {"image": b""}, [])
    with pytest.raises(BadRequest, match="takes no image"):
        transcoder.multipart_request(route_of("DeleteProducts"), {}, [], {"image": b"x"}, [])
    assert transcoder.image_fields(gateway_pb2.IndexProductsRequest.DESCRIPTOR) == ["image"]


def test_every_status_has_an_http_status_and_googles_error_shape():
    for code in grpc.StatusCode:
        assert 200 <= transcoder.http_status(code) < 600
    assert transcoder.http_status(grpc.StatusCode.INVALID_ARGUMENT) == 400
    assert transcoder.http_status(grpc.StatusCode.UNAUTHENTICATED) == 401
    assert transcoder.http_status(grpc.StatusCode.PERMISSION_DENIED) == 403
    assert transcoder.http_status(grpc.StatusCode.NOT_FOUND) == 404
    assert transcoder.http_status(grpc.StatusCode.RESOURCE_EXHAUSTED) == 429
    assert transcoder.http_status(grpc.StatusCode.UNAVAILABLE) == 503
    assert transcoder.http_status(grpc.StatusCode.DEADLINE_EXCEEDED) == 504
    body = transcoder.error_body(grpc.StatusCode.NOT_FOUND, "no such product")
    assert body == {"error": {"code": 404, "status": "NOT_FOUND", "message": "no such product", "details": []}}


def test_bytes_responses_and_media_types():
    reply = gateway_pb2.GetProductImageResponse(thumbnail=b"\xff\xd8\xff\xe0data", image_uri="s3://x")
    assert transcoder.first_bytes_field(reply) == b"\xff\xd8\xff\xe0data"
    assert transcoder.first_bytes_field(gateway_pb2.GetProductResponse()) is None
    assert transcoder.sniff_media_type(b"\xff\xd8\xff\xe0") == "image/jpeg"
    assert transcoder.sniff_media_type(b"\x89PNG\r\n\x1a\nrest") == "image/png"
    assert transcoder.sniff_media_type(b"what") == "application/octet-stream"
    json_form = transcoder.to_json(gateway_pb2.IndexProductsResponse(indexed=3))
    assert json_form["indexed"] == "3" and json_form["perCategory"] == {} and json_form["imagesTruncated"] is False
