"""Byte encodings of the arrays and strings a database snapshot is made of (DenseDatabase.state,
BowIndex.state, GroupTable.state and their from_state readers)."""

from __future__ import annotations

import numpy as np


def pack_strings(strings: list[str]) -> bytes:
    """UTF-8 strings -> (n+1) int64 offsets then the concatenated bytes (any character allowed)."""
    encoded = [s.encode() for s in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.int64(len(encoded)).tobytes() + offsets.tobytes() + b"".join(encoded)


def unpack_strings(blob: bytes) -> list[str]:
    count = int(np.frombuffer(blob[:8], np.int64)[0])
    offsets = np.frombuffer(blob[8 : 8 + 8 * (count + 1)], np.int64)
    data = blob[8 + 8 * (count + 1) :]
    return [data[offsets[i] : offsets[i + 1]].decode() for i in range(count)]


def array_from(blob: bytes, dtype: type, spare: int = 0) -> np.ndarray:
    """A writable copy of a little-endian array, with `spare` zeroed elements after it."""
    values: np.ndarray = np.frombuffer(blob, dtype)
    out: np.ndarray = np.zeros(len(values) + spare, dtype)
    out[: len(values)] = values
    return out
