"""Typed service configuration: a dataclass per service, overridable by environment and flags.

Precedence, lowest first: the dataclass defaults, `MPS_<SERVICE>_<FIELD>` environment variables,
command-line flags (`--field-name`). Lists and dicts are given as JSON in both.

Every configuration is validated in one place, when it is built (`__post_init__`): each field's
value against its annotation (a `Literal` field, or a list or dict of them, holds only the listed
values; numbers, strings, lists and dicts are what they say), then the class's own `_check()`
(ranges, and fields that go together). A refused value raises ConfigError naming the field and
what it allows; from the command line, the same message as an argparse error (exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, cast

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"

LogFormat = Literal["json", "text"]

C = TypeVar("C", bound="Validated")


class ConfigError(ValueError):
    """A setting its field does not allow; the message names the field and what it allows."""


def allowed_values(kind: Any) -> tuple[Any, ...]:
    """The values a `Literal[...]` annotation allows; () for any other annotation."""
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else ()


def _listed(options: tuple[Any, ...]) -> str:
    return ", ".join(repr(option) for option in options)


_SCALARS: dict[Any, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "a boolean (true or false)"),
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
}


def check_value(name: str, value: Any, kind: Any) -> None:
    """Raises ConfigError unless `value` fits the annotation `kind`: one of a Literal's values, a
    list or dict whose elements fit theirs, or a bool, int, float (an int will do) or str."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        options = typing.get_args(kind)
        if value not in options:
            raise ConfigError(f"{name} {value!r} is not one of {_listed(options)}")
    elif origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name} {value!r} is not a list (JSON [...])")
        (element,) = typing.get_args(kind)
        for i, item in enumerate(value):
            check_value(f"{name}[{i}]", item, element)
    elif origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} {value!r} is not a dict (JSON {{...}})")
        key_kind, value_kind = typing.get_args(kind)
        for key, item in value.items():
            check_value(f"{name} key", key, key_kind)
            check_value(f"{name}[{key!r}]", item, value_kind)
    elif kind in _SCALARS:
        types, described = _SCALARS[kind]
        # bool is an int to Python, not to a configuration.
        if not isinstance(value, types) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(f"{name} {value!r} is not {described}")


def validate(config: Any) -> None:
    """Checks every field of a configuration against its annotation, then the class's `_check()`."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        check_value(field.name, getattr(config, field.name), hints[field.name])
    config._check()


# Python's own levels (a library may register more, e.g. uvicorn's TRACE: not a setting of ours).
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def check_log_level(level: str) -> None:
    if level.upper() not in LOG_LEVELS:
        raise ConfigError(f"log_level {level!r} is not one of {_listed(LOG_LEVELS)} (any case)")


class Validated:
    """Base of the configurations: validated once built. A subclass's `_check()` holds its ranges
    and the fields that go together, and starts with `super()._check()`."""

    def __post_init__(self) -> None:
        validate(self)

    def _check(self) -> None:
        pass

    def _at_least(self, low: float, *names: str, note: str = "") -> None:
        """Each of `names` is `low` or more (`note` says what the low end means, e.g. "0 = off")."""
        for name in names:
            value = getattr(self, name)
            if not value >= low:  # NaN too
                raise ConfigError(f"{name} {value!r} is not >= {low}" + (f" ({note})" if note else ""))

    def _above(self, low: float, *names: str) -> None:
        """Each of `names` is more than `low`."""
        for name in names:
            value = getattr(self, name)
            if not value > low:  # NaN too
                raise ConfigError(f"{name} {value!r} is not > {low}")

    def _within(self, name: str, low: float, high: float, *, low_open: bool = False) -> None:
        """`name` lies in [low, high], or (low, high] with `low_open`."""
        value = getattr(self, name)
        if not low <= value <= high or (low_open and value == low):  # NaN too
            raise ConfigError(f"{name} {value!r} is not in {'(' if low_open else '['}{low}, {high}]")


@dataclasses.dataclass
class ServerConfig(Validated):
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
    log_format: LogFormat = "json"
    # One log line per RPC (method, status, milliseconds, client, request id).
    access_log: bool = True
    # Prometheus metrics at http://host:metrics_port/metrics; 0 = off.
    metrics_port: int = 0
    # Server reflection (lets grpcurl and friends list the API); off hides the schema.
    reflection: bool = True
    # Each client connection is closed after about this long (gracefully: calls in flight finish,
    # streams included), so clients resolve the service's name again and reach replicas added
    # since (an autoscaler's); 0 = never.
    max_connection_age_s: float = 300.0

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

    def _check(self) -> None:
        super()._check()
        self._within("port", 0, 65535)
        self._within("metrics_port", 0, 65535)
        self._at_least(1, "max_workers", "max_message_bytes")
        self._at_least(0, "shutdown_grace_s")
        self._at_least(0, "max_connection_age_s", note="0 = never")
        check_log_level(self.log_level)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls_client_ca (mTLS) needs the server's own tls_cert and tls_key")
        if not self.tls_ca and (self.tls_client_cert or self.tls_client_key):
            raise ConfigError("tls_client_cert/tls_client_key need tls_ca (the servers' CA)")
        if bool(self.tls_client_cert) != bool(self.tls_client_key):
            raise ConfigError("tls_client_cert and tls_client_key go together: give both or neither")
        self._at_least(0, "rate_limit_per_s", "rate_burst", "max_concurrent_per_client", note="0 = none")


def parse_value(name: str, raw: str, kind: Any) -> Any:
    """A field's value from its text in a flag or environment variable (JSON for lists and dicts),
    checked against its annotation; ConfigError naming the field otherwise."""
    value: Any = raw
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            value = True
        elif raw.lower() in ("0", "false", "no", "off"):
            value = False
    elif kind in (int, float):
        with contextlib.suppress(ValueError):  # check_value says what it should be
            value = kind(raw)
    elif typing.get_origin(kind) in (list, dict):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{name} {raw!r} is not JSON ({error.msg})") from None
    check_value(name, value, kind)
    return value


def _flag_type(name: str, kind: Any) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            return parse_value(name, raw, kind)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _allowed_text(kind: Any) -> str:
    """For --help: the values a Literal field (or the elements or keys of a list or dict) may take."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if allowed_values(kind):
        return f"; one of {_listed(allowed_values(kind))}"
    if origin is list and allowed_values(args[0]):
        return f"; each one of {_listed(allowed_values(args[0]))}"
    if origin is dict and allowed_values(args[0]):
        return f"; keys among {_listed(allowed_values(args[0]))}"
    return ""


def _parser(cls: type, prog: str, hints: dict[str, Any], prefix: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip())
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        # Lists and dicts are given as JSON: their defaults are shown so.
        shown = json.dumps(default) if isinstance(default, (list, dict)) else repr(default)
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            default=None,
            type=_flag_type(field.name, hints[field.name]),
            help=f"default: {shown}; env {prefix}{field.name.upper()}{_allowed_text(hints[field.name])}",
        )
    return parser


def load_config(
    cls: type[C],
    service: str,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    prog: str = "",
    **overrides: Any,
) -> C:
    """Builds `cls` from defaults, then `MPS_<SERVICE>_<FIELD>` variables, then flags, then overrides.

    A value its field does not allow raises ConfigError; with `argv` (a command line) it is an
    argparse error instead: the usage and the message on stderr, exit status 2. `prog` names the
    command in the usage (default "python -m <service>").
    """
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    prefix = f"MPS_{service.upper()}_"
    parser = None if argv is None else _parser(cls, prog or f"python -m {service}", hints, prefix)

    def fail(message: str) -> NoReturn:
        if parser is not None:
            parser.error(message)
        raise ConfigError(message)

    values: dict[str, Any] = {}
    for field in dataclasses.fields(cast(Any, cls)):  # every configuration is a dataclass
        env_name = prefix + field.name.upper()
        if env_name in environ:
            try:
                values[field.name] = parse_value(field.name, environ[env_name], hints[field.name])
            except ConfigError as error:
                fail(f"{env_name}: {error}")
    if parser is not None and argv is not None:
        parsed = parser.parse_args(list(argv))
        values.update({k: v for k, v in vars(parsed).items() if v is not None})
    values.update(overrides)
    try:
        return cls(**values)
    except ConfigError as error:
        fail(str(error))
