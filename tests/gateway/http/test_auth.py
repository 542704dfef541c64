"""The HTTP front keeps the gateway's locks: HTTPS in front, TLS to a gateway with client tokens and
per-client limits; the bearer token goes on as gRPC metadata and the gateway decides."""

from __future__ import annotations

import base64
import json
import ssl

import httpx
import pytest

from common.images import encode_jpeg
from common.photos import load_photo
from common.security import token_digest
from tests.gateway.http.conftest import start_front
from tests.helpers import start_gateway
from tests.tls import Authority

READER, WRITER = "http-reader-token", "http-writer-token"


@pytest.fixture(scope="module")
def locked(front, tmp_path_factory):
    """A second gateway over the suite's back ends, with TLS, tokens and a rate limit; an HTTPS front."""
    folder = tmp_path_factory.mktemp("http-tls")
    ca = Authority(folder)
    server = ca.issue("server", server=True)
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
    gateway, port = start_gateway(
        front.suite.addresses,
        tls_cert=str(server.cert),
        tls_key=str(server.key),
        auth_tokens_file=str(tokens),
        rate_limit_per_s=0.2,
        rate_burst=4,
    )
    running = start_front(
        f"localhost:{port}", tls_ca=str(ca.pem.cert), tls_cert=str(server.cert), tls_key=str(server.key)
    )
    try:
        trust = ssl.create_default_context(cafile=str(ca.pem.cert))
        with httpx.Client(base_url=running.url, verify=trust, timeout=60) as client:
            yield client
    finally:
        running.stop()
        gateway.stop(None)


def test_tokens_and_scopes_over_https(locked):
    anonymous = locked.get("/v1/products/coffee-cup")
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.json()["error"]["status"] == "UNAUTHENTICATED"
    wrong = locked.get("/v1/products/coffee-cup", headers={"authorization": "Bearer not-a-token"})
    assert wrong.status_code == 401
    reader = {"authorization": f"Bearer {READER}"}
    found = locked.get("/v1/products/coffee-cup", headers=reader)
    assert found.status_code == 200 and found.json()["product"]["category"] == "tableware"
    image = base64.b64encode(encode_jpeg(load_photo("coffee"))).decode()
    write = [{"productId": "locked-0", "category": "http-locked", "image": {"encoded": image}}]
    refused = locked.post("/v1/products:index", json=write, headers=reader)
    assert refused.status_code == 403 and refused.json()["error"]["status"] == "PERMISSION_DENIED"
    stored = locked.post("/v1/products:index", json=write, headers={"authorization": f"Bearer {WRITER}"})
    assert stored.status_code == 200 and stored.json()["indexed"] == "1"
    purged = locked.post(
        "/v1/categories/http-locked/products:purge", json={"force": True}, headers={"authorization": f"Bearer {WRITER}"}
    )
    assert purged.status_code == 200


def test_a_client_over_its_rate_is_429_with_retry_after(locked):
    reader = {"authorization": f"Bearer {READER}"}
    replies = [locked.get("/v1/stats", headers=reader) for _ in range(8)]
    limited = [r for r in replies if r.status_code == 429]
    assert limited, [r.status_code for r in replies]
    assert limited[0].json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert float(limited[0].headers["retry-after"]) > 0
    assert any(d["@type"].endswith("google.rpc.QuotaFailure") for d in limited[0].json()["error"]["details"])


def test_streams_are_locked_too(locked):
    image = base64.b64encode(encode_jpeg(load_photo("coffee"))).decode()
    frame = json.dumps({"frameNumber": 1, "image": {"encoded": image}}).encode()
    ndjson = {"content-type": "application/x-ndjson"}
    anonymous = locked.post("/v1/video:search", content=frame, headers=ndjson)
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.json()["error"]["status"] == "UNAUTHENTICATED"
    allowed = locked.post("/v1/video:search", content=frame, headers={**ndjson, "authorization": f"Bearer {WRITER}"})
    assert allowed.status_code == 200 and "summary" in allowed.text.splitlines()[-1]
