"""Who may call what, over real servers on loopback: the internal credential, client tokens and
scopes, per-client limits, TLS and mTLS, reflection off, malformed requests."""

from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.channels import OutgoingMetadata
from common.config import load_config
from common.proto_convert import dense_to_proto
from common.security import load_tokens, token_digest
from common.security import main as security_main
from common.status import details_of
from index_server.config import IndexConfig
from index_server.server import create_server
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.tls import Authority

INTERNAL = "internal-secret"
READER, WRITER = "reader-token", "writer-token"


def tokens_file(tmp_path, *entries):
    path = tmp_path / "tokens.json"
    path.write_text(
        json.dumps({"tokens": [{"client": c, "sha256": token_digest(t), "scopes": s} for c, t, s in entries]})
    )
    return str(path)


@pytest.fixture
def start(tmp_path):
    servers = []

    def start_index(**overrides):
        config = load_config(IndexConfig, "index", environ={}, port=0, data_dir="", **overrides)
        server, port = create_server(config)
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start_index
    for server in servers:
        server.stop(None)


def stub(address, token="", credentials=None):
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    return index_pb2_grpc.IndexServiceStub(grpc.intercept_channel(channel, OutgoingMetadata(token)))


def add(index, item_id="a", **kwargs):
    return index.Add(
        iter([index_pb2.AddRequest(item_id=item_id, database="d", signature=dense_to_proto(np.ones(4, np.float32)))]),
        timeout=10,
        **kwargs,
    )


def code_of(call):
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code(), error.value.details()


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def test_index_writes_need_the_internal_token_and_reads_stay_open(start):
    address = start(internal_token=INTERNAL)
    error = refusal(lambda: add(stub(address)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "internal token" in error.details()
    assert details_of(error).reason == "UNAUTHENTICATED"
    error = refusal(lambda: add(stub(address, "guess")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "only its services" in error.details()
    assert details_of(error).reason == "PERMISSION_DENIED"
    assert add(stub(address, INTERNAL)).added == 1
    assert [d.items for d in stub(address).Stats(index_pb2.StatsRequest(), timeout=5).databases] == [1]


def test_client_tokens_have_scopes_and_health_stays_open(start, tmp_path):
    address = start(
        auth_tokens_file=tokens_file(tmp_path, ("shop", READER, ["read"]), ("ops", WRITER, ["read", "write"])),
        internal_token=INTERNAL,
    )
    code, details = code_of(lambda: stub(address).Stats(index_pb2.StatsRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: bearer" in details.lower()
    assert (
        code_of(lambda: stub(address, "nope").Stats(index_pb2.StatsRequest(), timeout=5))[0]
        == grpc.StatusCode.UNAUTHENTICATED
    )
    stub(address, READER).Stats(index_pb2.StatsRequest(), timeout=5)
    # A client token never opens an internal RPC, whatever its scopes.
    assert code_of(lambda: add(stub(address, WRITER)))[0] == grpc.StatusCode.PERMISSION_DENIED
    with grpc.insecure_channel(address) as channel:
        assert (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )


def test_a_bad_tokens_file_says_what_is_wrong(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"tokens": [{"client": "x", "sha256": "abc", "scopes": ["read"]}]}))
    with pytest.raises(ValueError, match="64 hex digits"):
        load_tokens(str(path))
    path.write_text(json.dumps({"tokens": [{"client": "x", "sha256": "a" * 64, "scopes": ["admin"]}]}))
    with pytest.raises(ValueError, match="scopes must be among"):
        load_tokens(str(path))


def test_new_token_prints_a_token_whose_digest_is_the_entry(capsys):
    security_main(["new-token", "--client", "shop", "--scopes", "read,write"])
    lines = capsys.readouterr().out.splitlines()
    token, entry = lines[0].rsplit(" ", 1)[1], json.loads(lines[1])
    assert entry == {"client": "shop", "sha256": token_digest(token), "scopes": ["read", "write"]}


def test_rate_limit_answers_resource_exhausted_with_retry_after(start):
    address = start(rate_limit_per_s=0.5, rate_burst=2, internal_token=INTERNAL)
    index = stub(address)
    index.Stats(index_pb2.StatsRequest(), timeout=5)
    index.Stats(index_pb2.StatsRequest(), timeout=5)
    error = refusal(lambda: index.Stats(index_pb2.StatsRequest(), timeout=5))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "0.5 requests per second (bursts of 2) is this client's limit: retry after" in error.details()
    retry_after = int(dict(error.trailing_metadata())["retry-after"])
    assert retry_after >= 1 and f"retry after {retry_after} s" in error.details()
    details = details_of(error)
    assert details.retry_after_s == retry_after
    assert details.quota == [("client:ipv4:127.0.0.1", "0.5 requests per second (bursts of 2) is this client's limit")]
    # The suite's own services are not limited.
    for _ in range(5):
        stub(address, INTERNAL).Stats(index_pb2.StatsRequest(), timeout=5)


def test_concurrency_limit_counts_calls_in_flight_per_client(start):
    address = start(max_concurrent_per_client=1)
    index = stub(address)
    started, release = threading.Event(), threading.Event()

    def slow():
        yield index_pb2.AddRequest(item_id="a", database="d", signature=dense_to_proto(np.ones(4, np.float32)))
        started.set()
        release.wait(10)

    future = index.Add.future(slow(), timeout=20)
    assert started.wait(5)
    time.sleep(0.2)
    error = refusal(lambda: stub(address).Stats(index_pb2.StatsRequest(), timeout=5))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 calls in flight" in error.details()
    details = details_of(error)
    assert details.quota == [("client:ipv4:127.0.0.1", "1 calls in flight is this client's limit")]
    assert details.retry_after_s == 1.0 and dict(error.trailing_metadata())["retry-after"] == "1"
    release.set()
    assert future.result().added == 1
    index.Stats(index_pb2.StatsRequest(), timeout=5)  # the slot is free again


def test_reflection_can_be_turned_off(start):
    address = start(reflection=False)
    with grpc.insecure_channel(address) as channel:
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        with pytest.raises(grpc.RpcError) as error:
            list(responses)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_garbage_bytes_are_invalid_argument_not_internal(start):
    address = start()
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/mps.index.v1.IndexService/Stats")
        with pytest.raises(grpc.RpcError) as error:
            call(b"\xff\xff\xff\xff garbage", timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in error.value.details()


def test_tls_refuses_plaintext_and_mtls_refuses_a_client_without_a_certificate(start, tmp_path):
    ca = Authority(tmp_path)
    server, client = ca.issue("index", server=True), ca.issue("gateway", server=False)
    root = ca.pem.cert.read_bytes()
    tls = start(tls_cert=str(server.cert), tls_key=str(server.key))
    stub(tls, credentials=grpc.ssl_channel_credentials(root)).Stats(index_pb2.StatsRequest(), timeout=5)
    assert code_of(lambda: stub(tls).Stats(index_pb2.StatsRequest(), timeout=3))[0] == grpc.StatusCode.UNAVAILABLE
    stranger = Authority(tmp_path, "other-ca")
    assert (
        code_of(
            lambda: stub(tls, credentials=grpc.ssl_channel_credentials(stranger.pem.cert.read_bytes())).Stats(
                index_pb2.StatsRequest(), timeout=3
            )
        )[0]
        == grpc.StatusCode.UNAVAILABLE
    )

    mtls = start(
        tls_cert=str(server.cert), tls_key=str(server.key), tls_client_ca=str(ca.pem.cert), internal_token=INTERNAL
    )
    assert (
        code_of(
            lambda: stub(mtls, credentials=grpc.ssl_channel_credentials(root)).Stats(
                index_pb2.StatsRequest(), timeout=3
            )
        )[0]
        == grpc.StatusCode.UNAVAILABLE
    )
    with_certificate = grpc.ssl_channel_credentials(root, client.key.read_bytes(), client.cert.read_bytes())
    # A certificate of the suite's CA is the internal credential: writes are allowed without a token.
    assert add(stub(mtls, credentials=with_certificate)).added == 1


def test_tls_settings_must_come_in_pairs(start, tmp_path):
    ca = Authority(tmp_path)
    server = ca.issue("index", server=True)
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        start(tls_cert=str(server.cert))
    with pytest.raises(ValueError, match="cannot read"):
        start(tls_cert=str(tmp_path / "missing.crt"), tls_key=str(server.key))
