"""Who may call what: TLS credentials, client tokens with scopes, the internal credential, limits.

Each service names the access each of its RPCs needs (`Access`):
- READ / WRITE: a client token with the "read" / "write" scope (search vs. ingest and delete),
  checked only where the service has client tokens (`auth_tokens_file`);
- INTERNAL: the suite's own services only (the index's writes and replication): the shared
  `internal_token`, or a client certificate the server verified (mTLS with `tls_client_ca`).
The internal credential is accepted wherever a client token is. grpc's health and reflection
services stay open (load balancers and grpcurl). Tokens travel as `authorization: Bearer <token>`;
the server keeps only their SHA-256, so a leaked token file gives no token away.

A client without a token is UNAUTHENTICATED; one whose token lacks the scope, PERMISSION_DENIED.
Per-client limits (a token bucket of requests per second, and calls in flight) answer
RESOURCE_EXHAUSTED with `retry-after` (seconds) in the trailing metadata, and QuotaFailure and
RetryInfo details. The layers raise these as domain errors (common.errors); the interceptor that
runs them (common.interceptors) turns them into the status.

`python -m common.security new-token --client NAME --scopes read,write` prints a fresh token and
the entry for the tokens file.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import hashlib
import hmac
import json
import math
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from common.config import ServerConfig
from common.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from common.interceptors import Call, Layer, is_infrastructure

SCOPES = ("read", "write")
INTERNAL = "internal"


class Access(enum.Enum):
    READ = "read"
    WRITE = "write"
    INTERNAL = "internal"


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None


def method_policy(service: Any, default: Access = Access.READ, **access: Access) -> dict[str, Access]:
    """The access each RPC of a service descriptor needs: `default`, or as named (e.g. Add=INTERNAL)."""
    unknown = set(access) - {m.name for m in service.methods}
    if unknown:
        raise ValueError(f"{service.full_name} has no RPC {sorted(unknown)}")
    return {f"/{service.full_name}/{m.name}": access.get(m.name, default) for m in service.methods}


# --- TLS ----------------------------------------------------------------------------------------


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (and mTLS with tls_client_ca) for the server's port; None for plaintext."""
    if not config.tls_cert:  # ServerConfig checks that the TLS settings go together
        return None
    client_ca = _read(config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(_read(config.tls_key), _read(config.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class TlsClientSettings(Protocol):
    """What a caller of the suite's services needs for TLS (ServerConfig, the HTTP front's config)."""

    tls_ca: str
    tls_client_cert: str
    tls_client_key: str


def channel_credentials(config: TlsClientSettings) -> grpc.ChannelCredentials | None:
    """TLS for calls to the other services (with this service's certificate for their mTLS)."""
    if not config.tls_ca:  # the configurations check that the TLS settings go together
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(config.tls_ca),
        private_key=_read(config.tls_client_key) if config.tls_client_key else None,
        certificate_chain=_read(config.tls_client_cert) if config.tls_client_cert else None,
    )


# --- tokens -------------------------------------------------------------------------------------


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Client:
    name: str
    scopes: frozenset[str]


def load_tokens(path: str) -> dict[str, Client]:
    """The tokens file: SHA-256 hex digest -> client; raises ValueError saying what is wrong."""
    try:
        entries = json.loads(_read(path))["tokens"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f'{path}: expected JSON {{"tokens": [{{"client", "sha256", "scopes"}}, ...]}}') from None
    tokens: dict[str, Client] = {}
    for i, entry in enumerate(entries):
        try:
            digest, name, scopes = str(entry["sha256"]).lower(), str(entry["client"]), frozenset(entry["scopes"])
        except (KeyError, TypeError):
            raise ValueError(f"{path}: token #{i} needs client, sha256 and scopes") from None
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{path}: token #{i} ({name}): sha256 must be 64 hex digits")
        if not scopes <= set(SCOPES):
            raise ValueError(f"{path}: token #{i} ({name}): scopes must be among {list(SCOPES)}")
        tokens[digest] = Client(name, scopes)
    return tokens


def peer_host(context: grpc.ServicerContext) -> str:
    """The caller's address without its port ("ipv4:10.0.0.7"): one client over many connections."""
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


def _bearer(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def _verified_client_certificate(context: grpc.ServicerContext) -> bool:
    """True when TLS authenticated the caller by its certificate (only a server that requires
    client certificates of its CA gets here with one)."""
    return bool(context.peer_identities())


class Gatekeeper:
    """Decides who a caller is and whether it may call a method."""

    def __init__(
        self,
        policy: Mapping[str, Access],
        internal_token: str = "",
        tokens: Mapping[str, Client] | None = None,
        mtls: bool = False,
    ):
        self.policy = dict(policy)
        self._internal = internal_token.encode()
        self._tokens = dict(tokens or {})
        self._mtls = mtls

    @classmethod
    def from_config(cls, config: ServerConfig, policy: Mapping[str, Access]) -> Gatekeeper:
        tokens = load_tokens(config.auth_tokens_file) if config.auth_tokens_file else None
        return cls(policy, config.internal_token, tokens, bool(config.tls_client_ca))

    def layer(self) -> Layer:
        @contextlib.contextmanager
        def authenticate(call: Call) -> Iterator[None]:
            call.principal = self.admit(call.method, call.context)
            yield

        return authenticate

    def admit(self, method: str, context: grpc.ServicerContext) -> str:
        """The caller's name ("internal", a client's, or its address); raises Unauthenticated (no
        or an unknown credential) or PermissionDenied (one that does not give this access)."""
        token = _bearer(context)
        internal = (self._internal and token is not None and hmac.compare_digest(token.encode(), self._internal)) or (
            self._mtls and _verified_client_certificate(context)
        )
        if internal:
            return INTERNAL
        client = self._tokens.get(token_digest(token)) if token else None
        needed = None if is_infrastructure(method) else self.policy.get(method)
        if needed is None:
            return client.name if client else peer_host(context)
        if needed is Access.INTERNAL:
            if not self._internal and not self._mtls:
                return peer_host(context)  # an open deployment (loopback, tests)
            if token is None and not self._mtls:
                raise Unauthenticated(
                    f"{method} is internal to the suite: call it with the internal token "
                    "(authorization: Bearer <internal_token>)"
                )
            raise PermissionDenied(
                f"{method} is internal to the suite: only its services (the internal token "
                "or a client certificate of the suite's CA) may call it"
            )
        if not self._tokens:
            return client.name if client else peer_host(context)
        if token is None:
            raise Unauthenticated(
                f"{method} needs a token with the {needed.value!r} scope: send metadata authorization: Bearer <token>"
            )
        if client is None:
            raise Unauthenticated("the token is not known here: check it, or ask for a new one")
        if needed.value not in client.scopes:
            raise PermissionDenied(
                f"{method} needs the {needed.value!r} scope; the token of {client.name!r} has {sorted(client.scopes)}"
            )
        return client.name


# --- limits -------------------------------------------------------------------------------------


class _Bucket:
    def __init__(self, rate: float, burst: int, now: float):
        self.rate, self.burst, self.tokens, self.updated = rate, burst, float(burst), now

    def take(self, now: float) -> float:
        """0 when a request may go now, else the seconds until it may."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class ClientLimits:
    """Per-client request rate and concurrency; the suite's own services are not limited."""

    def __init__(self, rate_per_s: float = 0.0, burst: int = 0, max_concurrent: int = 0):
        self.rate, self.burst, self.max_concurrent = rate_per_s, max(burst, 1), max_concurrent
        self._buckets: dict[str, _Bucket] = {}
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.rate or self.max_concurrent)

    def layer(self) -> Layer:
        @contextlib.contextmanager
        def limit(call: Call) -> Iterator[None]:
            if call.principal == INTERNAL or is_infrastructure(call.method):
                yield
                return
            key = call.principal or peer_host(call.context)
            self._acquire(key)
            try:
                yield
            finally:
                with self._lock:
                    self._in_flight[key] -= 1
                    if not self._in_flight[key]:
                        del self._in_flight[key]

        return limit

    def _acquire(self, key: str) -> None:
        """Counts a call of client `key` in; raises ResourceExhausted (with when to retry) when it is
        over its rate or its calls in flight."""
        now = time.monotonic()
        with self._lock:
            if self.max_concurrent and self._in_flight.get(key, 0) >= self.max_concurrent:
                wait, why = 1.0, f"{self.max_concurrent} calls in flight is this client's limit"
            else:
                wait = self._bucket(key, now).take(now) if self.rate else 0.0
                why = f"{self.rate:g} requests per second (bursts of {self.burst}) is this client's limit"
            if not wait:
                self._in_flight[key] = self._in_flight.get(key, 0) + 1
                return
        retry_after = max(1, math.ceil(wait))
        # common.status.abort_with adds the `retry-after` trailer (whole seconds) from retry_after_s.
        raise ResourceExhausted(
            f"{why}: retry after {retry_after} s", quota=[(f"client:{key}", why)], retry_after_s=retry_after
        )

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) > 100_000:  # forget clients whose bucket has refilled: idle ones
                self._buckets = {
                    k: b for k, b in self._buckets.items() if b.tokens + (now - b.updated) * b.rate < b.burst
                }
            bucket = self._buckets[key] = _Bucket(self.rate, self.burst, now)
        return bucket


# --- new tokens ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.security")
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new-token", help="print a fresh token and its entry for the tokens file")
    new.add_argument("--client", required=True)
    new.add_argument("--scopes", default="read", help="comma-separated, among " + ",".join(SCOPES))
    args = parser.parse_args(argv)
    scopes = [s for s in args.scopes.split(",") if s]
    if not set(scopes) <= set(SCOPES):
        parser.error(f"scopes must be among {list(SCOPES)}")
    token = secrets.token_urlsafe(32)
    print(f"token (give it to {args.client}; it is not stored): {token}")
    print(json.dumps({"client": args.client, "sha256": token_digest(token), "scopes": scopes}))


if __name__ == "__main__":
    main()
