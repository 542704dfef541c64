"""The databases of one shard, by name, each holding one signature kind; durable through a ShardStore.

Every change goes through here: validated, written ahead to the store's log (one fsync per batch),
then applied in memory, all under one write lock so the log order is the memory order. Start-up
loads the last snapshot and replays the log after it through the same apply path.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import NamedTuple, Union

import numpy as np

from common.bow_codec import BagOfWords, BowFormatError, decode
from index_server.convert import box_of
from index_server.dense import DenseDatabase
from index_server.inverted import BowIndex, SignatureError
from index_server.store import ShardStore
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2

log = logging.getLogger(__name__)

Database = Union[DenseDatabase, BowIndex]
Value = Union[np.ndarray, BagOfWords]

# Log record tags; the payload is the request message itself.
_ADD, _DELETE = b"A", b"D"


class UnknownDatabase(KeyError):
    pass


class Deleted(NamedTuple):
    """What a Delete did: items deleted (by id or by group, each once), and what was not there."""

    deleted: int
    not_found: list[str]
    groups_not_found: list[str]


@dataclass
class DatabaseInfo:
    name: str
    kind: int
    dimension: int
    items: int


@dataclass(frozen=True)
class DatabaseSettings:
    """How this shard builds new databases."""

    # Bag-of-words databases keep words [V*index/count, V*(index+1)/count) of a V-word vocabulary.
    word_shard_index: int = 0
    word_shard_count: int = 1
    dense_factory: str = "Flat"
    dense_train_size: int = 50_000
    # Bag-of-words stop-word variant (see BowIndex.max_word_share); 1.0 = exact.
    max_word_share: float = 1.0

    def word_range(self, vocabulary: int) -> tuple[int, int]:
        return (vocabulary * self.word_shard_index // self.word_shard_count,
                vocabulary * (self.word_shard_index + 1) // self.word_shard_count)


def signature_value(signature: common_pb2.Signature) -> Value:
    """A deep signature's dense vector or a bag-of-words signature's decoded bag; raises
    SignatureError when the signature is empty, malformed or of an unknown kind."""
    if signature.kind == common_pb2.SIGNATURE_KIND_DEEP:
        if signature.WhichOneof("value") != "dense" or not signature.dense.values:
            raise SignatureError("signature is empty: a deep signature carries dense.values")
        return np.asarray(signature.dense.values, dtype=np.float32)
    if signature.kind == common_pb2.SIGNATURE_KIND_BOW:
        if signature.WhichOneof("value") != "bow" or not signature.bow:
            raise SignatureError("signature is empty: a bag-of-words signature carries bow bytes")
        try:
            return decode(signature.bow)
        except BowFormatError as exc:
            raise SignatureError(f"bag-of-words signature: {exc}") from None
    if signature.kind == common_pb2.SIGNATURE_KIND_UNSPECIFIED:
        raise SignatureError("signature kind is unspecified: set SIGNATURE_KIND_DEEP or SIGNATURE_KIND_BOW")
    raise SignatureError(f"signature kind {signature.kind} is unknown")


def item_value(request: index_pb2.AddRequest) -> Value:
    """An Add's signature value, once the item is known to be well formed (its signature, its box);
    raises SignatureError otherwise. The router checks with it too, before forwarding."""
    value = signature_value(request.signature)
    box = box_of(request)
    if box is not None and not np.all(np.isfinite(box)):
        raise SignatureError("box has NaN or infinite coordinates")
    return value


class AddFailed(Exception):
    """Item `position` of a batch was refused; the items before it were added (and logged)."""

    def __init__(self, position: int, added: int, replaced: int, error: SignatureError):
        super().__init__(str(error))
        self.position, self.added, self.replaced, self.error = position, added, replaced, error


def _apply_add(database: Database, request: index_pb2.AddRequest, value: Value) -> bool:
    """One logged Add, in memory (live or replayed); True when it replaced an item."""
    return database.add(request.item_id, value, dict(request.metadata), request.group_id,  # type: ignore[arg-type]
                        box_of(request))


def _apply_delete(database: Database, item_ids: list[str], group_ids: list[str]) -> int:
    """One logged Delete, in memory (live or replayed): items deleted, each counted once (ids go
    first, so a group counts only what is left of it)."""
    return sum(database.delete(item_id) for item_id in item_ids) + database.delete_groups(group_ids)


class Catalogue:
    def __init__(self, settings: DatabaseSettings = DatabaseSettings(), store: ShardStore | None = None,
                 snapshot_every: int = 100_000):
        self.settings = settings
        self.store = store
        self.snapshot_every = snapshot_every
        self._databases: dict[str, tuple[int, Database]] = {}
        self._write = threading.Lock()       # log order == apply order
        self._snapshotting = threading.Lock()
        self._since_snapshot = 0
        self._snapshot_thread: threading.Thread | None = None
        if store is not None:
            self._recover(store)

    # -- reads ------------------------------------------------------------------------------------

    def get(self, name: str) -> tuple[int, Database]:
        try:
            return self._databases[name]
        except KeyError:
            raise UnknownDatabase(name) from None

    def names(self) -> list[str]:
        return sorted(self._databases)

    def stats(self) -> list[DatabaseInfo]:
        return [DatabaseInfo(name, kind, db.dimension, len(db))
                for name, (kind, db) in sorted(self._databases.items())]

    # -- writes -----------------------------------------------------------------------------------

    def add(self, requests: list[index_pb2.AddRequest]) -> tuple[int, int]:
        """Adds a batch durably: returns (added, replaced). A refused item raises AddFailed after
        the items before it have been added."""
        with self._write:
            valid: list[tuple[index_pb2.AddRequest, Database, Value]] = []
            failure: tuple[int, SignatureError] | None = None
            for position, request in enumerate(requests):
                try:
                    value = item_value(request)
                    database = self._get_or_create(request.database, request.signature.kind, value)
                    database.check(value)  # type: ignore[arg-type]
                except SignatureError as exc:
                    failure = (position, exc)
                    break
                valid.append((request, database, value))
            if valid and self.store is not None:
                self.store.append([_ADD + r.SerializeToString() for r, _, _ in valid])
            replaced = sum(_apply_add(database, r, value) for r, database, value in valid)
            self._since_snapshot += len(valid)
        self._maybe_snapshot()
        if failure is not None:
            raise AddFailed(failure[0], len(valid), replaced, failure[1])
        return len(valid), replaced

    def delete(self, name: str, item_ids: list[str], group_ids: list[str] | tuple[str, ...] = ()) -> Deleted:
        """Deletes items and every item of groups, durably; says how many items went and which
        ids and groups were not there."""
        with self._write:
            _, database = self.get(name)
            present = [i for i in dict.fromkeys(item_ids) if i in database]
            groups = [g for g in dict.fromkeys(group_ids) if database.group_size(g) > 0]
            if (present or groups) and self.store is not None:
                # Only what is there is logged: a replay then does exactly what was acknowledged.
                self.store.append([_DELETE + index_pb2.DeleteRequest(database=name, item_ids=present,
                                                                     group_ids=groups).SerializeToString()])
            deleted = _apply_delete(database, present, groups)
            self._since_snapshot += deleted
        self._maybe_snapshot()
        present_set, groups_set = set(present), set(groups)
        return Deleted(deleted, [i for i in item_ids if i not in present_set],
                       [g for g in group_ids if g not in groups_set])

    def _get_or_create(self, name: str, kind: int, value: Value) -> Database:
        """The database `name`, created for this signature's kind and shape by its first item."""
        if name not in self._databases:
            database: Database
            if isinstance(value, BagOfWords):
                database = BowIndex(value.vocabulary, value.codebook, self.settings.word_range(value.vocabulary),
                                    max_word_share=self.settings.max_word_share)
            else:
                database = DenseDatabase(value.size, self.settings.dense_factory, self.settings.dense_train_size)
            self._databases[name] = (kind, database)
        held_kind, database = self._databases[name]
        if held_kind != kind:
            raise SignatureError(f"database {name!r} holds {common_pb2.SignatureKind.Name(held_kind)} "
                                 f"signatures, not {common_pb2.SignatureKind.Name(kind)}")
        return database

    # -- durability -------------------------------------------------------------------------------

    def _recover(self, store: ShardStore) -> None:
        seq, snapshot = store.read_snapshot()
        for name, blobs in snapshot.items():
            kind = int(blobs.pop("kind"))
            database: Database = BowIndex.from_state(blobs) if kind == common_pb2.SIGNATURE_KIND_BOW \
                else DenseDatabase.from_state(blobs)
            if isinstance(database, BowIndex):
                database.max_word_share = self.settings.max_word_share  # configuration, not data
            self._databases[name] = (kind, database)
        replayed = 0
        for _, record in store.replay(seq):
            tag, payload = record[:1], record[1:]
            # The same apply functions as live writes, so a replay does what was acknowledged.
            if tag == _ADD:
                request = index_pb2.AddRequest.FromString(payload)
                value = signature_value(request.signature)
                _apply_add(self._get_or_create(request.database, request.signature.kind, value), request, value)
            elif tag == _DELETE:
                delete = index_pb2.DeleteRequest.FromString(payload)
                _apply_delete(self.get(delete.database)[1], list(delete.item_ids), list(delete.group_ids))
            replayed += 1
        self._since_snapshot = replayed
        log.info("recovered %d databases from the snapshot at #%d and %d logged operations",
                 len(self._databases), seq, replayed)

    def _maybe_snapshot(self) -> None:
        if (self.store is not None and self._since_snapshot >= self.snapshot_every
                and not self._snapshotting.locked()):
            self._snapshot_thread = threading.Thread(target=self.snapshot, name="snapshot", daemon=True)
            self._snapshot_thread.start()

    def snapshot(self) -> None:
        """Writes every database to the store as of the last logged operation, then drops that log."""
        if self.store is None:
            return
        with self._snapshotting:
            with self._write:  # no change between the sequence number and the states
                seq = self.store.last_seq
                for _, database in self._databases.values():
                    if isinstance(database, BowIndex) and database.dead_rows() > len(database) // 4:
                        database.compact()
                states = {name: {**database.state(), "kind": str(kind).encode()}
                          for name, (kind, database) in self._databases.items()}
                self._since_snapshot = 0
            self.store.write_snapshot(seq, states)
            log.info("snapshot of %d databases at #%d", len(states), seq)

    def close(self, snapshot: bool = True) -> None:
        """Snapshots (so the next start-up replays nothing) and closes the store."""
        if self.store is None:
            return
        if self._snapshot_thread is not None:
            self._snapshot_thread.join()
        if snapshot:
            self.snapshot()
        with self._write, self._snapshotting:
            self.store.close()
            self.store = None

