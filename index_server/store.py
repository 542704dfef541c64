"""A shard's durable state in LMDB: a write-ahead log of every Add/Delete/Update, items' thumbnails
and local features, and snapshots.

Two LMDB environments under the data directory:
- `log/`: sequence number (u64 big-endian) -> one operation record. A batch of records is one
  transaction, committed with fsync before the operations are applied in memory and acknowledged,
  so every acknowledged operation survives kill -9 (or power loss). Its named sub-database
  `thumbnails` holds items' thumbnails and local features (key: blake2b of the database name, 8
  bytes, then of the item id, 16 bytes; value: u32 little-endian id length, the id, the item's
  blob: see item_blob), changed in the same transaction as the records that add or delete the
  items: on disk only, never in memory, and never truncated with the log (a snapshot does not hold
  them). The sub-database's name is a key of the main database too (LMDB keeps it there), which is
  not a sequence number: every walk over the records skips keys that are not 8 bytes.
- `snapshot/`: the in-memory databases at some sequence number, as named byte strings, written in
  one transaction (all or nothing). After it commits, the log up to that number is deleted.
  A blob's key is the database's number (u64 big-endian, its place in the meta's `databases` list)
  then the blob's name, so a database name of any length or character makes a valid, unambiguous
  key (LMDB keys are at most 511 bytes); the names live in the meta record, JSON. Snapshots
  written before (meta without "format") keyed blobs `name NUL blob`, and are still read.
Start-up loads the snapshot and replays only the log after it. An fcntl lock on the directory
keeps a second process from opening the same shard.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lmdb

_SEQ = struct.Struct(">Q")
_ID_SIZE = struct.Struct("<I")
# (database, item id, its blob (item_blob) or None to delete it): one change of the thumbnails.
ThumbnailChange = tuple[str, str, bytes | None]

# An item's blob is its thumbnail as given (all that stores held before local features), or,
# when it has local features (or a thumbnail that starts with this), this magic, the thumbnail's
# length (u32 little-endian), the thumbnail, then the local features (a serialized
# mps.common.v1.LocalFeatures) to the end. No image format starts with 0xff 0x4d (JPEG starts with
# 0xff 0xd8, a JPEG XL codestream with 0xff 0x0a), so a stored thumbnail never reads as one.
ITEM_BLOB_MAGIC = b"\xffMPSitem"
_HEADER = len(ITEM_BLOB_MAGIC) + _ID_SIZE.size


def item_blob(thumbnail: bytes, local_features: bytes) -> bytes | None:
    """What the store keeps of an item's thumbnail and local features; None when it has neither."""
    if not local_features:
        if not thumbnail:
            return None
        if not thumbnail.startswith(ITEM_BLOB_MAGIC):
            return thumbnail
    return ITEM_BLOB_MAGIC + _ID_SIZE.pack(len(thumbnail)) + thumbnail + local_features


def blob_parts(blob: bytes | memoryview, thumbnail: bool = True, local_features: bool = True) -> tuple[bytes, bytes]:
    """(thumbnail, local features) of an item_blob (b"" for each one not asked for or not held),
    copying only what is asked for (`blob` may be a buffer of a read transaction)."""
    if bytes(blob[: len(ITEM_BLOB_MAGIC)]) != ITEM_BLOB_MAGIC:
        return (bytes(blob) if thumbnail else b""), b""
    (size,) = _ID_SIZE.unpack_from(blob, len(ITEM_BLOB_MAGIC))
    return (
        bytes(blob[_HEADER : _HEADER + size]) if thumbnail else b"",
        bytes(blob[_HEADER + size :]) if local_features else b"",
    )


def thumbnail_key(database: str, item_id: str) -> bytes:
    """The thumbnail's LMDB key (24 bytes, whatever the lengths of the names: keys are at most 511)."""
    return (
        hashlib.blake2b(database.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        + hashlib.blake2b(item_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    )


def _thumbnail_value(item_id: str, thumbnail: bytes) -> bytes:
    encoded = item_id.encode("utf-8", "surrogatepass")
    return _ID_SIZE.pack(len(encoded)) + encoded + thumbnail


def _split_value(value: bytes) -> tuple[str, bytes]:
    (size,) = _ID_SIZE.unpack_from(value)
    return value[4 : 4 + size].decode("utf-8", "surrogatepass"), value[4 + size :]


# The snapshot layout written by write_snapshot (see the module docstring); 1 = `name NUL blob` keys.
SNAPSHOT_FORMAT = 2


class StoreLocked(RuntimeError):
    """Another process holds this data directory."""


class ShardStore:
    def __init__(self, path: Path, map_size: int):
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock_file = open(path / "LOCK", "a+")  # noqa: SIM115 - held (and locked) while the store is open
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StoreLocked(f"data directory {path} is in use by another index shard process") from None
        # sync + metasync (the defaults): a committed transaction is on disk.
        self._log = lmdb.open(str(path / "log"), map_size=map_size, subdir=True, sync=True, metasync=True, max_dbs=1)
        self._thumbnails = self._log.open_db(b"thumbnails")
        self._snapshot = lmdb.open(str(path / "snapshot"), map_size=map_size, subdir=True, max_dbs=2)
        self._blobs = self._snapshot.open_db(b"blobs")
        self._last = self.snapshot_seq()
        with self._log.begin() as txn:
            cursor = txn.cursor()
            found = cursor.last()
            while found and len(cursor.key()) != _SEQ.size:  # the sub-database's name
                found = cursor.prev()
            if found:
                self._last = _SEQ.unpack(cursor.key())[0]

    def close(self) -> None:
        self._log.close()
        self._snapshot.close()
        self._lock_file.close()

    @property
    def last_seq(self) -> int:
        return self._last

    def append(self, records: list[bytes], thumbnails: Iterable[ThumbnailChange] = ()) -> int:
        """Commits records durably, in order, and the thumbnail changes they make, in one
        transaction; returns the sequence number of the last record."""
        with self._log.begin(write=True) as txn:
            for record in records:
                self._last += 1
                txn.put(_SEQ.pack(self._last), record)
            self._change(txn, thumbnails)
        return self._last

    def _change(self, txn: lmdb.Transaction, thumbnails: Iterable[ThumbnailChange]) -> None:
        for database, item_id, thumbnail in thumbnails:
            key = thumbnail_key(database, item_id)
            if thumbnail:
                txn.put(key, _thumbnail_value(item_id, thumbnail), db=self._thumbnails)
            else:
                txn.delete(key, db=self._thumbnails)

    def change_thumbnails(self, thumbnails: Iterable[ThumbnailChange], replace: bool = False) -> None:
        """Applies thumbnail changes durably (replace: after dropping every thumbnail held)."""
        with self._log.begin(write=True) as txn:
            if replace:
                txn.drop(self._thumbnails, delete=False)
            self._change(txn, thumbnails)

    def thumbnails(self, database: str, item_ids: list[str]) -> list[bytes]:
        """Each item's thumbnail, b"" where it has none."""
        return [thumbnail for thumbnail, _ in self.images(database, item_ids)]

    def images(
        self, database: str, item_ids: list[str], thumbnails: bool = True, local_features: bool = False
    ) -> list[tuple[bytes, bytes]]:
        """Each item's (thumbnail, local features), b"" for what it has not or was not asked for,
        read in one transaction, copying only what is asked for."""
        out = []
        with self._log.begin(db=self._thumbnails, buffers=True) as txn:
            for item_id in item_ids:
                value = txn.get(thumbnail_key(database, item_id))
                if value is None:
                    out.append((b"", b""))
                    continue
                (size,) = _ID_SIZE.unpack_from(value)
                out.append(blob_parts(value[_ID_SIZE.size + size :], thumbnails, local_features))
        return out

    def thumbnails_of(self, database: str, batch_bytes: int = 4 << 20) -> Iterator[tuple[str, bytes]]:
        """(item id, blob as stored: item_blob) of every item of a database that has one, read in
        transactions of about `batch_bytes` each (none is held while the caller works on what it got)."""
        prefix = thumbnail_key(database, "")[:8]
        start = prefix
        while True:
            batch: list[tuple[bytes, bytes]] = []
            size = 0
            with self._log.begin(db=self._thumbnails, buffers=False) as txn:
                cursor = txn.cursor()
                if cursor.set_range(start):
                    for key, value in cursor:
                        if key[:8] != prefix or size >= batch_bytes:
                            break
                        batch.append((key, value))
                        size += len(value)
            for _, value in batch:
                yield _split_value(value)
            if size < batch_bytes:
                return
            start = batch[-1][0] + b"\0"  # the next key after the last one read

    def replay(self, after: int) -> Iterator[tuple[int, bytes]]:
        """(sequence, record) of every logged operation after `after`, in order."""
        with self._log.begin(buffers=False) as txn:
            cursor = txn.cursor()
            if cursor.set_range(_SEQ.pack(after + 1)):
                for key, value in cursor:
                    if len(key) != _SEQ.size:  # the thumbnails sub-database's name: no record
                        break
                    yield _SEQ.unpack(key)[0], value

    def snapshot_seq(self) -> int:
        with self._snapshot.begin() as txn:
            raw = txn.get(b"meta")
        return json.loads(raw)["seq"] if raw else 0

    def write_snapshot(self, seq: int, databases: dict[str, dict[str, bytes]]) -> None:
        """Replaces the snapshot with `databases` (name -> blob name -> bytes) as of `seq`, then
        drops the log up to `seq`. A crash in between leaves a log the next start-up skips."""
        names = sorted(databases)
        with self._snapshot.begin(write=True) as txn:
            txn.drop(self._blobs, delete=False)
            for number, name in enumerate(names):
                for blob, value in databases[name].items():
                    txn.put(_SEQ.pack(number) + blob.encode(), value, db=self._blobs)
            txn.put(b"meta", json.dumps({"format": SNAPSHOT_FORMAT, "seq": seq, "databases": names}).encode())
        with self._log.begin(write=True) as txn:
            cursor = txn.cursor()
            if cursor.first():
                while len(cursor.key()) == _SEQ.size and _SEQ.unpack(cursor.key())[0] <= seq and cursor.delete():
                    pass

    def read_snapshot(self) -> tuple[int, dict[str, dict[str, bytes]]]:
        with self._snapshot.begin() as txn:
            raw = txn.get(b"meta")
        meta: dict[str, Any] = json.loads(raw) if raw else {"seq": 0, "databases": []}
        databases: dict[str, dict[str, bytes]] = {name: {} for name in meta["databases"]}
        with self._snapshot.begin(db=self._blobs) as txn:
            for key, value in txn.cursor():
                if "format" in meta:
                    name = meta["databases"][_SEQ.unpack(key[:8])[0]]
                    blob = key[8:].decode()
                else:
                    # Format 1: blob names never hold a NUL, database names might: split on the last.
                    name, blob = key.decode().rsplit("\0", 1)
                databases.setdefault(name, {})[blob] = value
        return meta["seq"], databases
