"""The suite locked down, as its own processes: TLS on every port, mTLS between the services, client
tokens with read and write scopes on the gateway, the internal token on the index's writes."""

from __future__ import annotations

import json

import grpc
import pytest

from common.images import encode_jpeg
from common.local_suite import start_local_suite
from common.photos import load_photo
from common.security import token_digest
from gateway.client import Product, VisualSearchClient
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.tls import Authority

READER, WRITER = "shop-reader-token", "ops-writer-token"


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    ca = Authority(folder)
    server, client = ca.issue("server", server=True), ca.issue("service", server=False)
    tokens = folder / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "tokens": [
                    {"client": "shop", "sha256": token_digest(READER), "scopes": ["read"]},
                    {"client": "ops", "sha256": token_digest(WRITER), "scopes": ["read", "write"]},
                ]
            }
        )
    )
    serve = ["--tls-cert", str(server.cert), "--tls-key", str(server.key)]
    mtls = serve + ["--tls-client-ca", str(ca.pem.cert)]
    dial = ["--tls-ca", str(ca.pem.cert), "--tls-client-cert", str(client.cert), "--tls-client-key", str(client.key)]
    health = grpc.ssl_channel_credentials(ca.pem.cert.read_bytes(), client.key.read_bytes(), client.cert.read_bytes())
    suite = start_local_suite(
        {
            "detector": mtls,
            "signature": mtls,
            "index": mtls + ["--data-dir", ""],
            "gateway": serve + dial + ["--auth-tokens-file", str(tokens)],
        },
        environment={"MPS_INDEX_INTERNAL_TOKEN": "s3cret", "MPS_GATEWAY_INTERNAL_TOKEN": "s3cret"},
        credentials=health,
    )
    try:
        yield suite, ca, client
    finally:
        suite.stop()


def gateway(locked, token):
    suite, ca, _ = locked
    return VisualSearchClient(suite.addresses["gateway"], token=token, tls_ca=ca.pem.cert.read_bytes())


def test_scopes_decide_who_searches_and_who_ingests(locked):
    cup = load_photo("coffee")[23:310, 150:429]
    product = [Product("cup", "tableware", encode_jpeg(cup), box=(0, 0, cup.shape[1], cup.shape[0]))]
    with gateway(locked, READER) as reader, gateway(locked, WRITER) as writer, gateway(locked, "") as nobody:
        with pytest.raises(grpc.RpcError) as error:
            reader.index_products(product)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error.value.details() == (
            "/mps.gateway.v1.VisualSearchService/IndexProducts needs the 'write' scope; "
            "the token of 'shop' has ['read']"
        )
        assert writer.index_products(product).indexed == 1  # over mTLS to the back ends, with the internal token
        found = reader.search(encode_jpeg(cup), top_k=1, regions=[((0, 0, cup.shape[1], cup.shape[0]), "tableware")])
        assert found.items[0].matches[0].product_id == "cup"
        with pytest.raises(grpc.RpcError) as error:
            nobody.search(encode_jpeg(cup))
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error.value.details() == (
            "/mps.gateway.v1.VisualSearchService/MultiProductSearch needs a token with the 'read' scope: "
            "send metadata authorization: Bearer <token>"
        )


def test_a_plaintext_client_and_a_client_of_another_ca_are_refused(locked, tmp_path):
    suite, _, _ = locked
    with (
        VisualSearchClient(suite.addresses["gateway"], token=READER, timeout_s=5) as plaintext,
        pytest.raises(grpc.RpcError) as error,
    ):
        plaintext.search(b"x")
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    stranger = Authority(tmp_path, "stranger-ca")
    with (
        VisualSearchClient(
            suite.addresses["gateway"], token=READER, tls_ca=stranger.pem.cert.read_bytes(), timeout_s=5
        ) as fooled,
        pytest.raises(grpc.RpcError) as error,
    ):
        fooled.search(b"x")
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_index_refuses_a_caller_without_the_suites_client_certificate(locked):
    suite, ca, _ = locked
    credentials = grpc.ssl_channel_credentials(ca.pem.cert.read_bytes())  # TLS, but no client certificate
    with grpc.secure_channel(suite.addresses["index"], credentials) as channel, pytest.raises(grpc.RpcError) as error:
        index_pb2_grpc.IndexServiceStub(channel).Stats(index_pb2.StatsRequest(), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
