"""Bags of local convolutional features (SIGNATURE_KIND_BLCF): the assignment map's wire format.

A BLCF signature is the word of every cell of a feature map (the assignment map), with the size of
the image it covers; its bag (the word histogram that the inverted index searches) is the count of
each word over the map's cells, so it is never sent twice. A query may hold several maps of one
image described at several scales (a pyramid: the scale of a product in a catalogue photo is not
known at query time); its bag counts the cells of all of them, and the first is the map a window
refers to. A catalogue item is one map. Format version 1, integers little-endian, 12 + per level
2 + 2 x rows x columns bytes (1,582 bytes for one 28 x 28 map):

    byte  0       format version (1)
    bytes 1-4     vocabulary fingerprint (uint32): signatures of different vocabularies never mix
    bytes 5-6     vocabulary size V (uint16, 1..65535)
    bytes 7-8     image width in pixels (uint16, >= 1)
    bytes 9-10    image height in pixels (uint16, >= 1)
    byte  11      levels L (1..8), then per level:
      byte        map rows (1..255)
      byte        map columns (1..255)
      2 x rows x columns bytes
                  the word of each cell (uint16, < V), row-major; 0xFFFF = no word (a cell
                  outside a query's region)

Cell (r, c) of a level covers the pixels [c W / columns, (c + 1) W / columns) x [r H / rows,
(r + 1) H / rows) of the image: `cell_box` turns a window of the first level's cells into a box in
pixels. A signature holds at least one word.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.bow_codec import BagOfWords

FORMAT_VERSION = 1
EMPTY = 0xFFFF
MAX_LEVELS = 8
_HEADER = 12


class BlcfFormatError(ValueError):
    """Bytes that are not a valid BLCF signature; the message says what is wrong."""


@dataclass(frozen=True)
class AssignmentMap:
    """(rows, columns) uint16 word per cell (EMPTY = none) of an image of width x height pixels;
    `pyramid`: a query's further maps of the same image at other scales (empty for an item)."""

    words: np.ndarray
    vocabulary: int
    fingerprint: int
    width: int
    height: int
    pyramid: tuple[np.ndarray, ...] = ()

    @property
    def levels(self) -> int:
        return 1 + len(self.pyramid)

    @property
    def rows(self) -> int:
        return int(self.words.shape[0])

    @property
    def columns(self) -> int:
        return int(self.words.shape[1])

    def bag(self) -> BagOfWords:
        """The word histogram of the cells of every level (EMPTY cells left out), codebook = fingerprint."""
        cells = np.concatenate([level.reshape(-1) for level in (self.words, *self.pyramid)])
        return BagOfWords.from_words(cells[cells != EMPTY], self.vocabulary, self.fingerprint)

    def cell_box(self, row0: int, column0: int, row1: int, column1: int) -> tuple[float, float, float, float]:
        """Cells [row0, row1) x [column0, column1) -> (x_min, y_min, x_max, y_max) in pixels."""
        sx, sy = self.width / self.columns, self.height / self.rows
        return (column0 * sx, row0 * sy, column1 * sx, row1 * sy)

    def region(self, box: tuple[float, float, float, float]) -> AssignmentMap:
        """The map with every cell (of every level) whose centre lies outside `box` (x_min, y_min,
        x_max, y_max in pixels) emptied; in a level where the box holds no cell's centre, the cell
        under its own centre stays. ValueError for a box that does not overlap the image."""
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (x1 > x0 and y1 > y0 and x1 > 0 and y1 > 0 and x0 < self.width and y0 < self.height):
            raise ValueError(
                f"region ({x0:g}, {y0:g}, {x1:g}, {y1:g}) does not overlap the {self.width}x{self.height} image"
            )
        levels = [self._inside(level, (x0, y0, x1, y1)) for level in (self.words, *self.pyramid)]
        if not any((level != EMPTY).any() for level in levels):
            raise ValueError("region holds only cells without a word")
        return AssignmentMap(levels[0], self.vocabulary, self.fingerprint, self.width, self.height, tuple(levels[1:]))

    def _inside(self, words: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """`words` (one level) with the cells whose centres lie outside the box emptied."""
        inside = region_cells(words.shape, self.width, self.height, box)
        return np.where(inside, words, np.uint16(EMPTY)).astype(np.uint16)


def region_cells(shape: tuple[int, ...], width: int, height: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """(rows, columns) bool: the cells of a map of `shape` over a width x height image whose
    centres lie inside `box` (x_min, y_min, x_max, y_max pixels); when none does, the cell under the
    box's centre."""
    x0, y0, x1, y1 = box
    rows, columns = shape[0], shape[1]
    sx, sy = width / columns, height / rows
    cx = (np.arange(columns) + 0.5) * sx
    cy = (np.arange(rows) + 0.5) * sy
    inside = ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]
    if not inside.any():
        row = min(max(int(((y0 + y1) / 2) / sy), 0), rows - 1)
        column = min(max(int(((x0 + x1) / 2) / sx), 0), columns - 1)
        inside[row, column] = True
    return inside


def encode(assignment: AssignmentMap) -> bytes:
    levels = [np.asarray(level) for level in (assignment.words, *assignment.pyramid)]
    if len(levels) > MAX_LEVELS:
        raise ValueError(f"{len(levels)} levels do not fit the format (at most {MAX_LEVELS})")
    for words in levels:
        if words.ndim != 2 or not (0 < words.shape[0] < 256 and 0 < words.shape[1] < 256):
            raise ValueError(f"a map of shape {words.shape} does not fit the format (1..255 rows and columns)")
    if not 0 < assignment.vocabulary <= EMPTY:
        raise ValueError(f"vocabulary of {assignment.vocabulary} words does not fit the format (1..65535)")
    if not (0 < assignment.width <= 0xFFFF and 0 < assignment.height <= 0xFFFF):
        raise ValueError(f"image size {assignment.width}x{assignment.height} does not fit the format")
    out = bytearray([FORMAT_VERSION]) + int(assignment.fingerprint).to_bytes(4, "little")
    out += int(assignment.vocabulary).to_bytes(2, "little")
    out += int(assignment.width).to_bytes(2, "little") + int(assignment.height).to_bytes(2, "little")
    out.append(len(levels))
    for words in levels:
        out += bytes([words.shape[0], words.shape[1]]) + words.astype("<u2").tobytes()
    return bytes(out)


def decode(data: bytes) -> AssignmentMap:
    if len(data) < _HEADER + 4:
        raise BlcfFormatError(f"signature is {len(data)} bytes; a BLCF signature has at least {_HEADER + 4}")
    if data[0] != FORMAT_VERSION:
        raise BlcfFormatError(f"signature format version {data[0]}; this build reads version {FORMAT_VERSION}")
    fingerprint = int.from_bytes(data[1:5], "little")
    vocabulary = int.from_bytes(data[5:7], "little")
    width, height = int.from_bytes(data[7:9], "little"), int.from_bytes(data[9:11], "little")
    count = data[11]
    if vocabulary == 0:
        raise BlcfFormatError("signature says its vocabulary has 0 words")
    if width == 0 or height == 0:
        raise BlcfFormatError(f"signature says its image is {width}x{height} pixels")
    if not 1 <= count <= MAX_LEVELS:
        raise BlcfFormatError(f"signature says it holds {count} maps; a BLCF signature holds 1 to {MAX_LEVELS}")
    levels, pos = [], _HEADER
    for level in range(count):
        if pos + 2 > len(data):
            raise BlcfFormatError(f"signature ends before map {level} of {count}: it is truncated")
        rows, columns = data[pos], data[pos + 1]
        if rows == 0 or columns == 0:
            raise BlcfFormatError(f"signature says map {level} has {rows}x{columns} cells")
        end = pos + 2 + 2 * rows * columns
        if end > len(data):
            raise BlcfFormatError(f"signature ends inside map {level} ({rows}x{columns} cells): it is truncated")
        levels.append(np.frombuffer(data, "<u2", rows * columns, pos + 2).astype(np.uint16).reshape(rows, columns))
        pos = end
    if pos != len(data):
        raise BlcfFormatError(f"signature has {len(data) - pos} bytes after its last map: it is corrupt")
    cells = np.concatenate([level.reshape(-1) for level in levels])
    present = cells[cells != EMPTY]
    if len(present) == 0:
        raise BlcfFormatError("signature holds no words (an empty map cannot be compared)")
    if int(present.max()) >= vocabulary:
        raise BlcfFormatError(f"signature holds word {int(present.max())}, beyond its {vocabulary}-word vocabulary")
    return AssignmentMap(levels[0], vocabulary, fingerprint, width, height, tuple(levels[1:]))
