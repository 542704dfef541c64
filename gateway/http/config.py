"""Configuration of the HTTP/JSON front (`python -m gateway.http`; env MPS_HTTP_<FIELD>)."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.channels import channel_target
from common.config import ConfigError, LogFormat, Validated, check_log_level


@dataclass
class HttpConfig(Validated):
    """The HTTP/JSON front of the gateway: every gateway RPC at its google.api.http route, the
    OpenAPI description at /openapi.json, the search page at /, health at /healthz."""

    host: str = "127.0.0.1"
    # 0 picks a free port (tests).
    port: int = 8080
    # The gateway (one address, dns:///name:port for several replicas: round_robin over them).
    gateway_address: str = "127.0.0.1:50050"
    # Deadline of a call when the client sets none (header X-Server-Timeout, seconds); a video
    # stream has none unless the client sets one.
    timeout_s: float = 60.0
    # A request body larger than this is refused (413) before it is read whole; newline-delimited
    # streams (ingest, video) apply it to each line instead, so they may be of any length.
    max_body_bytes: int = 32 * 1024 * 1024
    # gRPC message limit on the channel to the gateway.
    max_message_bytes: int = 32 * 1024 * 1024
    # Streams (ingest, video) in flight at once; more are refused (429) until one ends.
    max_streams: int = 64
    # The search page at / (off: the API only).
    page: bool = True
    # Origins allowed to call the API from a browser page of theirs (CORS); ["*"] = any.
    cors_origins: list[str] = field(default_factory=list)
    # Seconds in-flight requests get to finish after SIGTERM.
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"
    log_format: LogFormat = "json"
    access_log: bool = True

    # --- TLS. PEM files; "" = plain.
    # HTTPS for this front (both or neither).
    tls_cert: str = ""
    tls_key: str = ""
    # As a client of the gateway: its CA ("" = plaintext), and this front's certificate for mTLS.
    tls_ca: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""

    def _check(self) -> None:
        super()._check()
        self._within("port", 0, 65535)
        self._above(0, "timeout_s")
        self._at_least(1024, "max_body_bytes", "max_message_bytes")
        self._at_least(1, "max_streams")
        self._at_least(0, "shutdown_grace_s")
        check_log_level(self.log_level)
        try:
            channel_target(self.gateway_address)
        except ValueError as error:
            raise ConfigError(f"gateway_address: {error}") from None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together: give both or neither")
        if not self.tls_ca and (self.tls_client_cert or self.tls_client_key):
            raise ConfigError("tls_client_cert/tls_client_key need tls_ca (the gateway's CA)")
        if bool(self.tls_client_cert) != bool(self.tls_client_key):
            raise ConfigError("tls_client_cert and tls_client_key go together: give both or neither")
