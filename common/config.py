"""Typed service configuration: a dataclass per service, overridable by environment and flags.

Precedence, lowest first: the dataclass defaults, `MPS_<SERVICE>_<FIELD>` environment variables,
command-line flags (`--field-name`). Lists and dicts are given as JSON in both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"

C = TypeVar("C")


@dataclasses.dataclass
class ServerConfig:
    """Settings every gRPC server shares."""

    host: str = "127.0.0.1"
    # 0 picks a free port (tests); services have their own fixed defaults.
    port: int = 0
    max_workers: int = 16
    # Lets a 20 MB image through with room for the rest of the message.
    max_message_bytes: int = 32 * 1024 * 1024
    # Seconds in-flight calls get to finish after SIGTERM.
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"
    # "json": one JSON object per line (time, level, service, request_id, message, fields);
    # "text": the same fields for a terminal.
    log_format: str = "json"
    # One log line per RPC (method, status, milliseconds, client, request id).
    access_log: bool = True
    # Prometheus metrics at http://host:metrics_port/metrics; 0 = off.
    metrics_port: int = 0
    # Server reflection (lets grpcurl and friends list the API); off hides the schema.
    reflection: bool = True

    # --- TLS. PEM files; "" = plaintext. See common/security.py.
    # This server's certificate chain and private key (both or neither).
    tls_cert: str = ""
    tls_key: str = ""
    # mTLS: clients must present a certificate signed by this CA; such a client counts as an
    # internal caller (another service of the suite).
    tls_client_ca: str = ""
    # As a client of the other services: the CA their certificates are signed by ("" = plaintext),
    # and this service's own certificate and key for their mTLS.
    tls_ca: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""

    # --- Credentials. Give secrets by environment (MPS_<SERVICE>_INTERNAL_TOKEN), not by flag.
    # Shared secret of the suite's services: sent on every call to another service; where set,
    # required on this service's internal RPCs (the index's writes and replication).
    internal_token: str = ""
    # Client tokens and their scopes ("read": search; "write": ingest and delete), as a JSON file
    # {"tokens": [{"client": "shop-a", "sha256": "<hex digest of the token>", "scopes": ["read"]}]};
    # "" = no client authentication (anyone may call the public RPCs).
    auth_tokens_file: str = ""
    # Per-client limits (a client is its token's name, else its address); 0 = none.
    # Requests per second (token bucket of `rate_burst` requests) and calls in flight at once.
    rate_limit_per_s: float = 0.0
    rate_burst: int = 0
    max_concurrent_per_client: int = 0


def _parse_value(raw: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if kind in (int, float, str):
        return kind(raw)
    if kind is Path:
        return Path(raw)
    if origin in (list, dict, tuple) or kind in (list, dict):
        return json.loads(raw)
    return raw


def load_config(
    cls: type[C],
    service: str,
    argv: Sequence[str] | None = None,
    environ: typing.Mapping[str, str] | None = None,
    **overrides: Any,
) -> C:
    """Builds `cls` from defaults, then `MPS_<SERVICE>_<FIELD>` variables, then flags, then overrides."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    prefix = f"MPS_{service.upper()}_"
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        env_name = prefix + field.name.upper()
        if env_name in environ:
            values[field.name] = _parse_value(environ[env_name], hints[field.name])
    if argv is not None:
        parser = argparse.ArgumentParser(prog=f"python -m {service}", description=(cls.__doc__ or "").strip())
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            kind = hints[field.name]
            default = field.default if field.default is not dataclasses.MISSING else None
            parser.add_argument(
                "--" + field.name.replace("_", "-"),
                dest=field.name,
                default=None,
                type=lambda raw, k=kind: _parse_value(raw, k),
                help=f"default: {default!r}; env {prefix}{field.name.upper()}",
            )
        parsed = parser.parse_args(list(argv))
        values.update({k: v for k, v in vars(parsed).items() if v is not None})
    values.update(overrides)
    return cls(**values)
