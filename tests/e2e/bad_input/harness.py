"""The bad-input corpus: hostile or mistaken calls over every RPC of every service, as cases.

A case is one call that must fail with a given status code and a message that says what to fix
(or, with `code=OK`, one that must now succeed: inputs that used to break a service). Each service
has a module `test_<service>.py` holding `CASES`, run by

    @pytest.mark.parametrize("case", CASES, ids=case_id)
    def test_case(hostile, case):
        hostile.check(case)

    def test_every_service_unchanged_afterwards(hostile):   # last in the module
        hostile.assert_unchanged()

`hostile` (conftest.py) is the four services as their own processes on loopback, the index with a
data directory, holding a small reference catalogue. After every case each service must still be
healthy; after each module every service must answer the reference queries exactly as before the
corpus ran; test_zz_corpus.py then restarts the shard (a bad input must not keep it from starting)
and checks that the corpus covers every RPC of every service with at least 150 cases.

Writing a case:

    Case("search-top-k-over-limit", GATEWAY_SEARCH,
         lambda s: s.gateway.MultiProductSearch(gateway_pb2.MultiProductSearchRequest(
             image=s.photo, top_k=10**6), timeout=s.timeout),
         grpc.StatusCode.INVALID_ARGUMENT, says=("top_k", "at most"))

- `rpc` is the full method name (`rpc_name(...)` builds it); the coverage check reads it.
- `call` gets the `Stubs` and makes exactly one call with `timeout=s.timeout`; a streaming
  response must be drained inside it (e.g. `list(s.index.Search(...))`).
- `says`: lower-case fragments the status message must all contain, naming what is wrong and how
  to fix it (the field, the limit, the allowed form): not just "invalid".
- `expecting(case, info=..., fields=..., quota=...)`: what the status's google.rpc details must
  hold besides (common.status.details_of): ErrorInfo metadata entries, the fields of the
  BadRequest violations and the subjects of the QuotaFailure violations, in order.
- A case must not change the reference catalogue (the reference products and the `reference`
  databases): write to your own category or database names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from mps.common.v1 import common_pb2
from mps.detector.v1 import detector_pb2_grpc
from mps.gateway.v1 import gateway_pb2_grpc
from mps.index.v1 import index_pb2_grpc
from mps.signature.v1 import signature_pb2_grpc

# The most a status message may be: a message that echoes unbounded input is a defect too.
MAX_MESSAGE_CHARS = 2048


def rpc_name(pb2_module: Any, service: str, method: str) -> str:
    """'/package.Service/Method', checked against the generated descriptor (e.g.
    rpc_name(index_pb2, "IndexService", "Add"))."""
    descriptor = pb2_module.DESCRIPTOR.services_by_name[service]
    assert descriptor.methods_by_name[method], f"{service} has no RPC {method}"
    return f"/{descriptor.full_name}/{method}"


@dataclass
class Stubs:
    """Typed stubs of the four services, the raw channels (for hand-made bytes), and inputs."""

    channels: dict[str, grpc.Channel]
    detector: detector_pb2_grpc.DetectorServiceStub
    signature: signature_pb2_grpc.SignatureServiceStub
    index: index_pb2_grpc.IndexServiceStub
    gateway: gateway_pb2_grpc.VisualSearchServiceStub
    # A real photo (JPEG bytes) and a small real crop, as Image messages.
    photo: common_pb2.Image
    crop: common_pb2.Image
    # A valid deep and bag-of-words signature of `crop`, from the signature server.
    deep: common_pb2.Signature
    bow: common_pb2.Signature
    # Index databases the reference catalogue filled, by kind ("deep", "bow"); do not write to them.
    databases: dict[str, str] = field(default_factory=dict)
    timeout: float = 30.0


@dataclass(frozen=True)
class Case:
    id: str
    rpc: str
    call: Callable[[Stubs], Any]
    code: grpc.StatusCode
    says: tuple[str, ...] = ()
    # The status's details, where given (see `expecting`).
    info: tuple[tuple[str, str], ...] = ()
    fields: tuple[str, ...] | None = None
    quota: tuple[str, ...] | None = None


def expecting(
    case: Case,
    *,
    info: dict[str, str] | None = None,
    fields: tuple[str, ...] | None = None,
    quota: tuple[str, ...] | None = None,
) -> Case:
    """The case, whose refusal must also carry these details (ErrorInfo metadata entries, BadRequest
    fields, QuotaFailure subjects)."""
    return dataclasses.replace(case, info=tuple((info or {}).items()), fields=fields, quota=quota)


def case_id(case: Case) -> str:
    return case.id
