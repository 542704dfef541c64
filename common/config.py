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
from pathlib import Path
from typing import Any, Sequence, TypeVar

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


def load_config(cls: type[C], service: str, argv: Sequence[str] | None = None,
                environ: typing.Mapping[str, str] | None = None, **overrides: Any) -> C:
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
        parser = argparse.ArgumentParser(prog=f"python -m {service}",
                                         description=(cls.__doc__ or "").strip())
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            kind = hints[field.name]
            default = field.default if field.default is not dataclasses.MISSING else None
            parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, default=None,
                                type=lambda raw, k=kind: _parse_value(raw, k),
                                help=f"default: {default!r}; env {prefix}{field.name.upper()}")
        parsed = parser.parse_args(list(argv))
        values.update({k: v for k, v in vars(parsed).items() if v is not None})
    values.update(overrides)
    return cls(**values)
