"""A shard's durable state in LMDB: a write-ahead log of every Add/Delete, and snapshots.

Two LMDB environments under the data directory:
- `log/`: sequence number (u64 big-endian) -> one operation record. A batch of records is one
  transaction, committed with fsync before the operations are applied in memory and acknowledged,
  so every acknowledged operation survives kill -9 (or power loss).
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
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb

_SEQ = struct.Struct(">Q")
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
        self._log = lmdb.open(str(path / "log"), map_size=map_size, subdir=True, sync=True, metasync=True)
        self._snapshot = lmdb.open(str(path / "snapshot"), map_size=map_size, subdir=True, max_dbs=2)
        self._blobs = self._snapshot.open_db(b"blobs")
        with self._log.begin() as txn:
            cursor = txn.cursor()
            self._last = _SEQ.unpack(cursor.key())[0] if cursor.last() else self.snapshot_seq()

    def close(self) -> None:
        self._log.close()
        self._snapshot.close()
        self._lock_file.close()

    @property
    def last_seq(self) -> int:
        return self._last

    def append(self, records: list[bytes]) -> int:
        """Commits records durably, in order; returns the sequence number of the last one."""
        with self._log.begin(write=True) as txn:
            for record in records:
                self._last += 1
                txn.put(_SEQ.pack(self._last), record, append=True)
        return self._last

    def replay(self, after: int) -> Iterator[tuple[int, bytes]]:
        """(sequence, record) of every logged operation after `after`, in order."""
        with self._log.begin(buffers=False) as txn:
            cursor = txn.cursor()
            if cursor.set_range(_SEQ.pack(after + 1)):
                for key, value in cursor:
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
                while cursor.key() and _SEQ.unpack(cursor.key())[0] <= seq and cursor.delete():
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
