"""Bounds on what callers may store with an item (ids, metadata): one check for the gateway and
the index, so both refuse the same thing with the same words.

No gRPC here: the checks raise common.errors.InvalidArgument naming the field, the limit and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from common.errors import InvalidArgument, quote


class MetadataLimits(Protocol):
    """Fields of the configs that bound metadata (index_server.limits.ItemLimits, GatewayConfig)."""

    max_metadata_keys: int
    max_metadata_key_bytes: int
    max_metadata_value_bytes: int
    max_metadata_bytes: int


def check_id(field: str, value: str, limit: int, required: bool) -> None:
    if not value and required:
        raise InvalidArgument(f"{field} is required")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise InvalidArgument(
            f"{field} {quote(value)} is {size} UTF-8 bytes, above the limit of {limit}: "
            f"use an id of at most {limit} bytes"
        )


def check_metadata(metadata: Mapping[str, str], limits: MetadataLimits) -> None:
    """Raises InvalidArgument naming the key and the limit when metadata is over any bound."""
    if len(metadata) > limits.max_metadata_keys:
        raise InvalidArgument(
            f"metadata has {len(metadata)} keys, above the limit of "
            f"{limits.max_metadata_keys}: send at most {limits.max_metadata_keys}"
        )
    total = 0
    for key, value in metadata.items():
        key_bytes = len(key.encode("utf-8", "surrogatepass"))
        value_bytes = len(value.encode("utf-8", "surrogatepass"))
        if key_bytes > limits.max_metadata_key_bytes:
            raise InvalidArgument(
                f"metadata key {quote(key)} is {key_bytes} UTF-8 bytes, above the limit of "
                f"{limits.max_metadata_key_bytes}: use shorter keys"
            )
        if value_bytes > limits.max_metadata_value_bytes:
            raise InvalidArgument(
                f"metadata value of key {quote(key)} is {value_bytes} UTF-8 bytes, above the "
                f"limit of {limits.max_metadata_value_bytes}: keep large data elsewhere and "
                "store a reference to it"
            )
        total += key_bytes + value_bytes
    if total > limits.max_metadata_bytes:
        raise InvalidArgument(
            f"metadata is {total} UTF-8 bytes in all (keys and values), above the limit of "
            f"{limits.max_metadata_bytes} per item: keep large data elsewhere and store a "
            "reference to it"
        )
