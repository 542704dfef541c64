"""Bag-of-visual-words signatures: the bit-encoded wire format.

Wire format, version 1 (all integers little-endian; 5 + 2 + 1 + ceil(V / 8) + (1 to 5 per count) bytes:
1.9 kB at most for the 5000-word codebook hard-assigned from 512 keypoints; the soft-assigned
vocabularies (signature_server/bow.py) cut a bag to fit the paper's 3.5 kB):

    byte  0       format version (1)
    bytes 1-4     codebook fingerprint (uint32): signatures of different codebooks never mix
    bytes 5-6     vocabulary size V (uint16)
    varint        n, the number of distinct words present
    ceil(V/8) B   presence bitmap, bit w (LSB first) set when word w occurs
    n varints     the count of each present word, in increasing word order

Normalisation (what the index's distance sees, index_server/inverted.py): counts are L1-normalised,
h_w = count_w / sum(counts) (`BagOfWords.histogram`), and chi2(x, y) = sum_w (x_w - y_w)^2 / (x_w + y_w)
over words in either, which lies in [0, 2] and for L1-normalised histograms equals 2 - sum over words
in both of 4 x_w y_w / (x_w + y_w). Similarity scores reported to users are 1 - chi2 / 2, in [0, 1],
higher is more similar.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

FORMAT_VERSION = 1
_HEADER = 7


class BowFormatError(ValueError):
    """Bytes that are not a valid bag-of-words signature; the message says what is wrong."""


@dataclass(frozen=True)
class BagOfWords:
    """Sorted distinct word ids (n,) int32 with their counts (n,) uint32."""

    words: np.ndarray
    counts: np.ndarray
    vocabulary: int
    codebook: int

    @staticmethod
    def from_words(assigned: np.ndarray, vocabulary: int, codebook: int) -> BagOfWords:
        """(K,) int word per descriptor -> the bag."""
        words, counts = np.unique(np.asarray(assigned, np.int64), return_counts=True)
        return BagOfWords(words.astype(np.int32), counts.astype(np.uint32), vocabulary, codebook)

    def histogram(self) -> np.ndarray:
        """(n,) float32 L1-normalised weights of self.words."""
        return (self.counts / max(1, int(self.counts.sum()))).astype(np.float32)


# One bag has one encoding: a number padded with empty continuation bytes (0x81 0x00 for 1) is
# refused, so equal bags are equal bytes (signatures may be compared or hashed as bytes).
_NOT_MINIMAL = "signature holds a number not in its shortest form: it is corrupt"


def _varint(value: int, out: bytearray) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise BowFormatError("signature ends inside a number: it is truncated")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and shift:
                raise BowFormatError(_NOT_MINIMAL)
            return value, pos
        shift += 7
        if shift > 35:
            raise BowFormatError("signature holds a number longer than 5 bytes: it is corrupt")


def _read_varints(data: bytes, pos: int, count: int) -> tuple[np.ndarray, int]:
    """`count` varints from data[pos:] (compiled: a Python loop per count would dominate ingest)."""
    values = np.empty(count, np.uint32)
    end = _varints(np.frombuffer(data, np.uint8), pos, values)
    if end == -1:
        raise BowFormatError("signature ends inside a number: it is truncated")
    if end == -2:
        raise BowFormatError("signature holds a number longer than 5 bytes: it is corrupt")
    if end == -3:
        raise BowFormatError("signature holds a count above 2**32: it is corrupt")
    if end == -4:
        raise BowFormatError(_NOT_MINIMAL)
    return values, end


@numba.njit(cache=True, nogil=True)
def _varints(data, pos, out):  # pragma: no cover
    """Fills out from data[pos:]; the end position, or -1 truncated, -2 too long, -3 too large,
    -4 not in its shortest form."""
    for i in range(out.shape[0]):
        value = np.uint64(0)
        shift = 0
        while True:
            if pos >= data.shape[0]:
                return -1
            byte = data[pos]
            pos += 1
            value |= np.uint64(byte & 0x7F) << np.uint64(shift)
            if byte < 0x80:
                if byte == 0 and shift > 0:
                    return -4
                break
            shift += 7
            if shift >= 35:
                return -2
        if value > np.uint64(0xFFFFFFFF):
            return -3
        out[i] = value
    return pos


def encode(bag: BagOfWords) -> bytes:
    if not 0 < bag.vocabulary < 1 << 16:
        raise ValueError(f"vocabulary of {bag.vocabulary} words does not fit the format (1..65535)")
    out = bytearray([FORMAT_VERSION])
    out += int(bag.codebook).to_bytes(4, "little") + int(bag.vocabulary).to_bytes(2, "little")
    _varint(len(bag.words), out)
    bitmap = np.zeros(bag.vocabulary, np.uint8)
    bitmap[bag.words] = 1
    out += np.packbits(bitmap, bitorder="little").tobytes()
    for count in bag.counts.tolist():
        _varint(count, out)
    return bytes(out)


def decode(data: bytes) -> BagOfWords:
    if len(data) < _HEADER + 1:
        raise BowFormatError(f"signature is {len(data)} bytes; a bag-of-words signature has at least {_HEADER + 1}")
    if data[0] != FORMAT_VERSION:
        raise BowFormatError(f"signature format version {data[0]}; this build reads version {FORMAT_VERSION}")
    codebook = int.from_bytes(data[1:5], "little")
    vocabulary = int.from_bytes(data[5:7], "little")
    if vocabulary == 0:
        raise BowFormatError("signature says its vocabulary has 0 words")
    count, pos = _read_varint(data, _HEADER)
    bitmap_bytes = (vocabulary + 7) // 8
    if pos + bitmap_bytes > len(data):
        raise BowFormatError("signature ends inside its word bitmap: it is truncated")
    bits = np.unpackbits(np.frombuffer(data, np.uint8, bitmap_bytes, pos), bitorder="little")
    if bits[vocabulary:].any():
        raise BowFormatError("signature sets words beyond its vocabulary: it is corrupt")
    words = np.flatnonzero(bits).astype(np.int32)
    if len(words) != count:
        raise BowFormatError(f"signature says {count} words but its bitmap holds {len(words)}")
    if count == 0:
        raise BowFormatError("signature holds no words (an empty bag cannot be compared)")
    counts, pos = _read_varints(data, pos + bitmap_bytes, count)
    if pos != len(data):
        raise BowFormatError(f"signature has {len(data) - pos} bytes after its last count: it is corrupt")
    if not counts.all():
        raise BowFormatError("signature gives a present word a count of 0: it is corrupt")
    return BagOfWords(words, counts, vocabulary, codebook)
