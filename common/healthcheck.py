"""One health check of a running service, for container HEALTHCHECKs and people: exit 0 when healthy.

    python -m common.healthcheck ADDRESS [--service NAME] [--timeout S] [TLS flags]

A gRPC ADDRESS (`host:port`, `dns:///name:port`, any target gRPC resolves) gets one
grpc.health.v1 `Check` for `--service` ("" = the server as a whole; each server also answers for
its own service, e.g. mps.index.v1.IndexService, which a replica still catching up reports
NOT_SERVING). An `http://` or `https://` ADDRESS (the HTTP/JSON front's /healthz) gets one GET,
healthy on 200. Either way it prints one line saying what it got, and exits 0 when healthy, 1
otherwise (unreachable, NOT_SERVING, an unknown service, a timeout), 2 for bad arguments.

TLS mirrors ServerConfig's client side: `--tls-ca` (the server's CA; plaintext without it), and
`--tls-client-cert`/`--tls-client-key` for a server that requires mTLS; `--tls-server-name` (gRPC
only) when the certificate names the service (e.g. `detector.mps.svc`) and the check dials
127.0.0.1. Each flag
defaults to MPS_HEALTHCHECK_<FLAG> (e.g. MPS_HEALTHCHECK_TLS_CA), so a container's HEALTHCHECK
line stays the same with TLS on.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ENV_PREFIX = "MPS_HEALTHCHECK_"


@dataclass(frozen=True)
class Result:
    healthy: bool
    line: str


@dataclass(frozen=True)
class Tls:
    ca: str = ""
    client_cert: str = ""
    client_key: str = ""
    server_name: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.ca)


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def check_grpc(address: str, service: str = "", timeout_s: float = 3.0, tls: Tls | None = None) -> Result:
    """One grpc.health.v1 Check of `service` at `address`."""
    tls = tls or Tls()
    what = f"{address} service {service!r}" if service else address
    options: list[tuple[str, str | int]] = []
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    if tls.enabled:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(tls.ca),
            private_key=_read(tls.client_key) if tls.client_key else None,
            certificate_chain=_read(tls.client_cert) if tls.client_cert else None,
        )
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    with channel:
        try:
            # No wait_for_ready: a closed port fails at once (UNAVAILABLE), not after the timeout.
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            if code == grpc.StatusCode.NOT_FOUND:
                return Result(False, f"{what}: unknown service (NOT_FOUND: {details})")
            name = code.name if code is not None else "error"
            said = "unreachable" if code == grpc.StatusCode.UNAVAILABLE else "no answer"
            return Result(False, f"{what}: {said} ({name}: {details})")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return Result(response.status == health_pb2.HealthCheckResponse.SERVING, f"{what}: {status}")


def check_http(url: str, timeout_s: float = 3.0, tls: Tls | None = None) -> Result:
    """One GET of `url`: healthy on 200."""
    tls = tls or Tls()
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=tls.ca or None)
        if tls.client_cert:
            context.load_cert_chain(tls.client_cert, tls.client_key or None)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as response:
            status, reason = response.status, response.reason
    except urllib.error.HTTPError as error:  # 4xx/5xx: an answer, not healthy
        status, reason = error.code, error.reason
    except (urllib.error.URLError, OSError) as error:
        cause = error.reason if isinstance(error, urllib.error.URLError) else error
        return Result(False, f"{url}: unreachable ({cause})")
    return Result(status == 200, f"{url}: {status} {reason}")


def check(address: str, service: str = "", timeout_s: float = 3.0, tls: Tls | None = None) -> Result:
    """check_http for an http(s):// address, else check_grpc."""
    if address.startswith(("http://", "https://")):
        return check_http(address, timeout_s, tls)
    return check_grpc(address, service, timeout_s, tls)


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    def env(name: str) -> str:
        return environ.get(ENV_PREFIX + name.upper(), "")

    parser = argparse.ArgumentParser(
        prog="python -m common.healthcheck",
        description="One grpc.health.v1 Check (or GET of an http(s):// URL): exit 0 when healthy, 1 otherwise.",
    )
    parser.add_argument("address", help="host:port, dns:///name:port, or http(s)://host:port/healthz")
    parser.add_argument("--service", default=env("service"), help='grpc.health.v1 service name ("" = the server)')
    parser.add_argument("--timeout", type=float, default=float(env("timeout") or 3.0), help="seconds (default 3)")
    parser.add_argument("--tls-ca", default=env("tls_ca"), help="the server's CA (PEM); plaintext without it")
    parser.add_argument("--tls-client-cert", default=env("tls_client_cert"), help="client certificate for mTLS")
    parser.add_argument("--tls-client-key", default=env("tls_client_key"), help="its private key")
    parser.add_argument(
        "--tls-server-name", default=env("tls_server_name"), help="the name the server's certificate holds (gRPC)"
    )
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = _parser(os.environ if environ is None else environ)
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout {args.timeout} is not > 0")
    if bool(args.tls_client_cert) != bool(args.tls_client_key):
        parser.error("--tls-client-cert and --tls-client-key go together: give both or neither")
    if args.tls_client_cert and not args.tls_ca and not args.address.startswith("https://"):
        parser.error("--tls-client-cert needs --tls-ca (the server's CA)")
    tls = Tls(args.tls_ca, args.tls_client_cert, args.tls_client_key, args.tls_server_name)
    try:
        result = check(args.address, args.service, args.timeout, tls)
    except OSError as error:  # a TLS file that cannot be read
        result = Result(False, f"{args.address}: {error}")
    print(result.line, flush=True)
    return 0 if result.healthy else 1


if __name__ == "__main__":
    sys.exit(main())
