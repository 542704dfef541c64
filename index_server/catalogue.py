"""The databases of one shard, by name, each holding one signature kind; durable through a ShardStore.

It takes domain values (index_server.domain: an Add stream's Items, a delete's ids, groups and
filter, an update's groups' attributes): the servicer converts messages to them
(index_server.convert). Every change goes through here: checked against its database, written
ahead to the store's log (one fsync per Add stream, Delete or UpdateGroups; records encoded by
index_server.log_codec), then applied in memory by `_apply`, all under one write lock so the log
order is the memory order. A Delete's `where` is resolved to the groups it matches before it is
logged, so a replay deletes exactly those. Items' thumbnails and local features are not in memory:
they change in the store, in the log's transaction, as one blob per item (store.item_blob; a shard
without a store keeps the blobs in a dict), and a replica's copy carries them (as state blobs named
THUMBNAIL_BLOB + item id). Start-up loads the last snapshot and replays the log after it through
that same `_apply`, as does a replica installing a copy (replication).
A database that cannot be loaded (a damaged snapshot blob, a logged operation that fails) does not
keep the shard from starting: it is set aside, answered with FAILED_PRECONDITION and reported by
Stats, and its stored data is written back verbatim by every snapshot, so nothing of it is lost.
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from common.blcf_codec import AssignmentMap
from common.bow_codec import BagOfWords
from common.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError, quote
from index_server import log_codec
from index_server.blcf import BlcfIndex
from index_server.config import WindowSpec
from index_server.dense import DenseDatabase, DenseTuning
from index_server.domain import (
    EMPTY_ATTRIBUTES,
    Deletion,
    Filter,
    Hit,
    Item,
    Operation,
    ProductAttributes,
    SignatureError,
    Update,
    Value,
    check_value,
)
from index_server.inverted import BowIndex
from index_server.limits import ItemLimits
from index_server.store import ShardStore, ThumbnailChange, blob_parts, item_blob
from mps.common.v1 import common_pb2

log = logging.getLogger(__name__)

Database = DenseDatabase | BowIndex | BlcfIndex

# The snapshot blob of a database set aside at start-up that holds its logged operations since its
# snapshot (u32 little-endian length + record, repeated), replayed after its state once it loads.
PENDING_BLOB = "unreplayed_log"
# How much of an exception's text a "could not be loaded" reason keeps.
_REASON_CHARS = 400
# A replica's copy (replication) carries each item's blob (store.item_blob: its thumbnail and local
# features) as a state blob named this + its id.
THUMBNAIL_BLOB = "thumbnail:"


class UnknownDatabase(NotFound):
    def __init__(self, name: str):
        super().__init__(
            f"database {quote(name)} does not exist on this shard; a database is created by "
            "the first Add of an item to it"
        )
        self.name = name


class BrokenDatabase(FailedPrecondition):
    """A call on a database that could not be loaded at start-up."""

    def __init__(self, name: str, reason: str):
        super().__init__(
            f"database {quote(name)} could not be loaded at start-up: {reason}; its stored data "
            "is kept as it was (nothing is lost): repair the cause and restart the shard, or "
            "restore the database from a fellow replica or a backup"
        )


@dataclass
class Unloadable:
    """A database set aside at start-up: why, its snapshot blobs exactly as stored, and its logged
    operations since that snapshot (neither applied nor dropped)."""

    reason: str
    blobs: dict[str, bytes]
    pending: list[bytes] = field(default_factory=list)

    def carried(self) -> dict[str, bytes]:
        """What a snapshot writes for it: the blobs verbatim, the pending operations appended to
        those an earlier start-up set aside."""
        if not self.pending:
            return dict(self.blobs)
        return {**self.blobs, PENDING_BLOB: self.blobs.get(PENDING_BLOB, b"") + log_codec.pack(self.pending)}

    def kind(self) -> int:
        try:
            return int(self.blobs["kind"])
        except (KeyError, ValueError):
            return common_pb2.SIGNATURE_KIND_UNSPECIFIED


class Deleted(NamedTuple):
    """What a Delete did: items deleted (by id or by group, each once), what was not there, and
    the groups its `where` matched (sorted)."""

    deleted: int
    not_found: list[str]
    groups_not_found: list[str]
    groups_deleted: list[str]


class GroupPage(NamedTuple):
    """One page of ListGroups: (group id, attributes, its live items in item id order) in group id
    order, the last group id when more follow ("" on the last page), and how many groups match."""

    groups: list[tuple[str, ProductAttributes, list[Hit]]]
    last: str
    total: int


@dataclass
class DatabaseInfo:
    name: str
    kind: int
    dimension: int
    items: int
    # Set when the database could not be loaded at start-up (and is not served): why.
    broken_reason: str = ""
    # Groups with a live item, how the database is searched, and its bytes in memory.
    groups: int = 0
    index_type: str = ""
    memory_bytes: int = 0


@dataclass(frozen=True)
class DatabaseSettings:
    """How this shard builds new databases."""

    # Bag-of-words and BLCF databases keep the postings of words [V*index/count, V*(index+1)/count)
    # of a V-word vocabulary.
    word_shard_index: int = 0
    word_shard_count: int = 1
    dense_factory: str = "auto"
    dense_train_size: int = 50_000
    # Bag-of-words stop-word variant (see BowIndex.max_word_share); 1.0 = exact.
    max_word_share: float = 1.0
    # When a dense database turns approximate and how it searches then.
    dense_tuning: DenseTuning = field(default_factory=DenseTuning)
    # The windows of BLCF spatial re-ranking (configuration, not data: applied to loaded databases too).
    windows: WindowSpec = field(default_factory=WindowSpec)

    def word_range(self, vocabulary: int) -> tuple[int, int]:
        return (
            vocabulary * self.word_shard_index // self.word_shard_count,
            vocabulary * (self.word_shard_index + 1) // self.word_shard_count,
        )


def kind_of(value: Value) -> int:
    """The signature kind (mps.common.v1.SignatureKind, as stored and reported by Stats) of a value."""
    if isinstance(value, BagOfWords):
        return common_pb2.SIGNATURE_KIND_BOW
    if isinstance(value, AssignmentMap):
        return common_pb2.SIGNATURE_KIND_BLCF
    return common_pb2.SIGNATURE_KIND_DEEP


def _shape(value: Value) -> tuple[int, int, int]:
    """What every item of one database shares: (kind, dimension or vocabulary, codebook or
    vocabulary fingerprint)."""
    if isinstance(value, BagOfWords):
        return common_pb2.SIGNATURE_KIND_BOW, value.vocabulary, value.codebook
    if isinstance(value, AssignmentMap):
        return common_pb2.SIGNATURE_KIND_BLCF, value.vocabulary, value.fingerprint
    return common_pb2.SIGNATURE_KIND_DEEP, value.size, 0


def _describe(shape: tuple[int, int, int]) -> str:
    kind, size, codebook = shape
    if kind == common_pb2.SIGNATURE_KIND_BOW:
        return f"a bag-of-words signature of a {size}-word vocabulary and codebook {codebook:08x}"
    if kind == common_pb2.SIGNATURE_KIND_BLCF:
        return f"a BLCF signature of the {size}-word vocabulary {codebook:08x}"
    return f"a deep signature of {size} values"


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS] + "..."


def refused_item(position: int, item_id: str, error: ServiceError) -> ServiceError:
    """`error` as the refusal of a stream's item #position: naming it, and saying that nothing of
    the stream was added."""
    return error.reworded(f"item #{position} ({quote(item_id)}): {error}; nothing of this stream was added")


class AddStream:
    """The items of one Add stream, each checked as it arrives, committed together by
    Catalogue.commit (all or nothing), so a stream that fails or is cancelled stores nothing."""

    def __init__(self, catalogue: Catalogue):
        self.catalogue = catalogue
        # Each item with its log record (log_codec), made when it is committed where None.
        self.items: list[tuple[Item, bytes | None]] = []
        # Databases this stream would create, by the shape of their first item here.
        self.shapes: dict[str, tuple[int, int, int]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def stage(self, item: Item, record: bytes | None = None) -> None:
        """Checks the next item against its database; raises a ServiceError naming it (and saying
        nothing was added). `record`: its log record when the caller has it already (the servicer:
        log_codec.add_record of the request it came in), else encoded at commit."""
        try:
            self.catalogue.check_add(item, self.shapes)
        except ServiceError as exc:
            raise refused_item(len(self.items), item.item_id, exc) from None
        self.items.append((item, record))


class Catalogue:
    def __init__(
        self,
        settings: DatabaseSettings = DatabaseSettings(),
        store: ShardStore | None = None,
        snapshot_every: int = 100_000,
        limits: ItemLimits = ItemLimits(),
    ):
        self.settings = settings
        self.store = store
        self.snapshot_every = snapshot_every
        self.limits = limits
        self._databases: dict[str, tuple[int, Database]] = {}
        # Databases set aside at start-up, by name (see Unloadable).
        self._broken: dict[str, Unloadable] = {}
        self._write = threading.Lock()  # log order == apply order
        self._snapshotting = threading.Lock()
        self._since_snapshot = 0
        self._snapshot_thread: threading.Thread | None = None
        # While catching up from a fellow replica (index_server.replication): the records logged
        # since, applied only once the copy is installed; None otherwise.
        self._deferred: list[bytes] | None = None
        # Replication streams to fellow replicas: each gets every batch of records logged.
        self._followers: list[queue.SimpleQueue[list[bytes]]] = []
        # Items' blobs (store.item_blob) by (database, item id) when there is no store (else the
        # store holds them).
        self._thumbnails: dict[tuple[str, str], bytes] = {}
        if store is not None:
            self._recover(store)

    # -- reads ------------------------------------------------------------------------------------

    def get(self, name: str) -> tuple[int, Database]:
        """(kind, database); raises UnknownDatabase (NOT_FOUND) or BrokenDatabase (FAILED_PRECONDITION)."""
        try:
            return self._databases[name]
        except KeyError:
            broken = self._broken.get(name)
            if broken is not None:
                raise BrokenDatabase(name, broken.reason) from None
            raise UnknownDatabase(name) from None

    def holds(self, name: str) -> bool:
        """Whether a database of this name is stored here (served, or set aside at start-up)."""
        return name in self._databases or name in self._broken

    def names(self) -> list[str]:
        return sorted(self._databases)

    def stats(self) -> list[DatabaseInfo]:
        infos = [
            DatabaseInfo(name, kind, db.dimension, len(db), "", db.groups_count(), db.index_type, db.memory_bytes)
            for name, (kind, db) in self._databases.items()
        ]
        infos += [DatabaseInfo(name, broken.kind(), 0, 0, broken.reason) for name, broken in self._broken.items()]
        return sorted(infos, key=lambda info: info.name)

    # -- writes -----------------------------------------------------------------------------------

    def stream(self) -> AddStream:
        return AddStream(self)

    def add(self, items: Iterable[Item]) -> tuple[int, int]:
        """Adds items durably, all or nothing: returns (added, replaced) as commit() counts them;
        a refused item raises a ServiceError naming it, and nothing is added."""
        stream = self.stream()
        for item in items:
            stream.stage(item)
        return self.commit(stream)

    def check_add(self, item: Item, shapes: dict[str, tuple[int, int, int]]) -> None:
        """Raises a ServiceError unless the item fits its database, as held here or as `shapes`
        says (the databases a stream would create: the first item for a new one sets its shape
        there). The item itself is well formed (index_server.convert.item_of checked it)."""
        name, kind = item.database, kind_of(item.value)
        if name in self._broken:
            raise BrokenDatabase(name, self._broken[name].reason)
        if name in self._databases:
            held_kind, database = self._databases[name]
            if held_kind != kind:
                raise InvalidArgument(
                    f"database {quote(name)} holds {common_pb2.SignatureKind.Name(held_kind)} "
                    f"signatures, not {common_pb2.SignatureKind.Name(kind)}"
                )
            database.check(item.value)  # type: ignore[arg-type]  # the kind matches: the value is of its type
            return
        check_value(item.value)  # what the database created for it would refuse (it would be logged first)
        shape = _shape(item.value)
        first = shapes.setdefault(name, shape)
        if first != shape:
            raise InvalidArgument(
                f"database {quote(name)} is new, and this stream's first item for it has "
                f"{_describe(first)}, this one {_describe(shape)}: every item of a database "
                "has the same kind and shape"
            )

    def commit(self, stream: AddStream) -> tuple[int, int]:
        """Stores a stream's items in one durable log transaction, then in memory; returns
        (added, replaced): added counts each (database, item_id) once, replaced those of them that
        overwrote an item (one from before the stream, or the same id earlier in it). Nothing is
        stored when an item no longer fits (another stream created its database meanwhile)."""
        with self._write:
            shapes: dict[str, tuple[int, int, int]] = {}
            for position, (item, _) in enumerate(stream.items):
                try:
                    self.check_add(item, shapes)
                except ServiceError as exc:
                    raise refused_item(position, item.item_id, exc) from None
            if stream.items:
                records = [log_codec.encode(item) if record is None else record for item, record in stream.items]
                self._log(
                    records,
                    [change for item, _ in stream.items for change in self._thumbnail_changes(item)],
                    # The store holds thumbnails and local features beside the log: its records
                    # leave them out.
                    [
                        log_codec.without_thumbnail(record) if item.thumbnail or item.local_features else record
                        for (item, _), record in zip(stream.items, records, strict=True)
                    ],
                )
            stored: set[tuple[str, str]] = set()
            replaced: set[tuple[str, str]] = set()
            for item, _ in stream.items:
                key = (item.database, item.item_id)
                # Catching up (replication): logged now, applied once the copy is installed.
                if self._deferred is None and self._apply(item):
                    replaced.add(key)
                stored.add(key)
            self._since_snapshot += len(stream.items)
        self._maybe_snapshot()
        return len(stored), len(replaced)

    def delete(
        self,
        name: str,
        item_ids: list[str],
        group_ids: list[str] | tuple[str, ...] = (),
        where: Filter | None = None,
    ) -> Deleted:
        """Deletes items, every item of groups and (where given) every item of the groups passing
        `where` (an empty Filter: every group), durably; says how many items went, which ids and
        groups were not there, and which groups `where` matched."""
        with self._write:
            if name in self._broken:
                raise BrokenDatabase(name, self._broken[name].reason)
            if self._deferred is not None:
                # Catching up: what is held here is stale, so the whole request is logged, and
                # applied (what of it is there) once the copy is installed.
                deletion = Deletion(name, tuple(item_ids), tuple(group_ids), where)
                self._log([log_codec.encode(deletion)], [(name, i, None) for i in item_ids])
                return Deleted(0, list(item_ids), list(group_ids), [])
            _, database = self.get(name)
            present = [i for i in dict.fromkeys(item_ids) if i in database]
            groups = [g for g in dict.fromkeys(group_ids) if database.group_size(g) > 0]
            matched = sorted(database.group_names(where)) if where is not None else []
            # Only what is there is logged, `where` as the groups it matched: a replay then does
            # exactly what was acknowledged.
            deletion = Deletion(name, tuple(present), tuple(dict.fromkeys(groups + matched)))
            if deletion.item_ids or deletion.group_ids:
                self._log([log_codec.encode(deletion)], self._thumbnail_changes(deletion))
            deleted = self._apply(deletion)
            self._since_snapshot += deleted
        self._maybe_snapshot()
        present_set, groups_set = set(present), set(groups)
        return Deleted(
            deleted,
            [i for i in dict.fromkeys(item_ids) if i not in present_set],
            [g for g in dict.fromkeys(group_ids) if g not in groups_set],
            matched,
        )

    def update(self, name: str, attributes: dict[str, ProductAttributes]) -> tuple[int, list[str]]:
        """Replaces groups' attributes, durably; returns how many groups were updated and those
        that have no item in the database (nothing is stored for them)."""
        with self._write:
            if name in self._broken:
                raise BrokenDatabase(name, self._broken[name].reason)
            if self._deferred is not None:  # catching up: logged whole, applied to what is there
                self._log([log_codec.encode(Update(name, dict(attributes)))])
                return 0, list(attributes)
            _, database = self.get(name)
            present = {group: a for group, a in attributes.items() if database.group_size(group) > 0}
            if present:
                self._log([log_codec.encode(Update(name, present))])
                self._apply(Update(name, present))
                self._since_snapshot += len(present)
        self._maybe_snapshot()
        return len(present), [group for group in attributes if group not in present]

    # -- management reads -------------------------------------------------------------------------

    def list_groups(
        self, name: str, group_ids: list[str], filter: Filter | None, page_size: int, after: str = ""
    ) -> GroupPage:
        """The groups with an item that pass the filter (and are among group_ids, when given), in
        group id order after `after`, at most page_size of them, with their attributes and items."""
        _, database = self.get(name)
        names = database.group_names(filter)
        if group_ids:
            wanted = set(group_ids)
            names = [group for group in names if group in wanted]
        following = [group for group in names if group > after] if after else names
        page = heapq.nsmallest(page_size, following)
        items = database.group_items(page)
        # A group deleted since it was listed is left out; its items carry its attributes.
        groups = [
            (group, items[group][0].attributes or EMPTY_ATTRIBUTES, items[group]) for group in page if group in items
        ]
        more = len(following) > len(page)
        return GroupPage(groups, page[-1] if more and page else "", len(names))

    def thumbnails(self, name: str, item_ids: list[str]) -> list[tuple[str, bytes]]:
        """(item id, thumbnail or b"") of the items of `item_ids` in the database, in that order."""
        return [(item_id, thumbnail) for item_id, thumbnail, _ in self.images(name, item_ids)]

    def images(
        self, name: str, item_ids: list[str], thumbnails: bool = True, local_features: bool = False
    ) -> list[tuple[str, bytes, bytes]]:
        """(item id, thumbnail, local features: a serialized mps.common.v1.LocalFeatures) of the
        items of `item_ids` in the database, in that order; b"" for what an item has not, or was
        not asked for. One read transaction of the store."""
        _, database = self.get(name)
        present = [item_id for item_id in item_ids if item_id in database]
        if self.store is not None:
            parts = self.store.images(name, present, thumbnails, local_features)
        else:
            held = [self._thumbnails.get((name, item_id)) for item_id in present]
            parts = [(b"", b"") if blob is None else blob_parts(blob, thumbnails, local_features) for blob in held]
        return [(item_id, thumbnail, features) for item_id, (thumbnail, features) in zip(present, parts, strict=True)]

    def thumbnails_of(self, name: str) -> Iterator[tuple[str, bytes]]:
        """(item id, blob: store.item_blob) of every item of the database that has one (for a
        replica's copy)."""
        if self.store is not None:
            yield from self.store.thumbnails_of(name)
            return
        with self._write:
            held = [(item_id, data) for (database, item_id), data in self._thumbnails.items() if database == name]
        yield from held

    # -- the one apply path -----------------------------------------------------------------------

    def _thumbnail_changes(self, operation: Operation) -> list[ThumbnailChange]:
        """The thumbnail changes an operation makes, as the state before it says (a group's items
        are those it holds then): an Item sets its blob of thumbnail and local features (with
        neither: deletes the one it replaces), a Deletion deletes those of the items it deletes."""
        if isinstance(operation, Item):
            return [(operation.database, operation.item_id, item_blob(operation.thumbnail, operation.local_features))]
        if isinstance(operation, Update) or operation.database not in self._databases:
            return []
        _, database = self._databases[operation.database]
        groups = list(operation.group_ids)
        if operation.where is not None:
            groups += database.group_names(operation.where)
        members = [hit.item_id for hits in database.group_items(groups).values() for hit in hits] if groups else []
        return [(operation.database, item_id, None) for item_id in [*operation.item_ids, *members]]

    def _change_thumbnails(self, changes: list[ThumbnailChange]) -> None:
        """Thumbnail changes outside a log append (replaying a replica's records)."""
        if self.store is not None:
            if changes:
                self.store.change_thumbnails(changes)
            return
        for database, item_id, thumbnail in changes:
            if thumbnail:
                self._thumbnails[(database, item_id)] = thumbnail
            else:
                self._thumbnails.pop((database, item_id), None)

    def _apply(self, operation: Operation) -> int:
        """One logged operation, in memory: the one apply path of live writes (commit, delete,
        update), of start-up (_recover, _load_states) and of a replica's copy (install,
        end_deferral). An Item: 1 when it replaced an item, else 0 (its database is created by its
        first item; its attributes, when set, replace its group's first). A Deletion: the items
        deleted, each counted once (ids go first, so a group counts only what is left of it); 0 for
        a database not held (one logged while catching up). An Update: the groups updated (those
        with an item)."""
        if isinstance(operation, Item):
            database = self._get_or_create(operation.database, kind_of(operation.value), operation.value)
            if operation.attributes is not None:
                database.set_attributes(operation.group, operation.attributes)
            replaced = database.add(
                operation.item_id,
                operation.value,  # type: ignore[arg-type]  # _get_or_create checked its kind
                operation.metadata,
                operation.group_id,
                operation.box,
            )
            return int(replaced)
        if not self.holds(operation.database):
            return 0
        _, database = self.get(operation.database)
        if isinstance(operation, Update):
            updated = 0
            for group, attributes in operation.attributes.items():
                if database.group_size(group) > 0:  # one a replica's stale request names may be gone
                    database.set_attributes(group, attributes)
                    updated += 1
            return updated
        deleted = sum(database.delete(item_id) for item_id in operation.item_ids)
        groups = list(operation.group_ids)
        if operation.where is not None:  # logged as received by a replica catching up
            groups += database.group_names(operation.where)
        return deleted + database.delete_groups(groups)

    def _get_or_create(self, name: str, kind: int, value: Value) -> Database:
        """The database `name`, created for this signature's kind and shape by its first item."""
        if name not in self._databases:
            database: Database
            if isinstance(value, BagOfWords):
                database = BowIndex(
                    value.vocabulary,
                    value.codebook,
                    self.settings.word_range(value.vocabulary),
                    max_word_share=self.settings.max_word_share,
                )
            elif isinstance(value, AssignmentMap):
                database = BlcfIndex(
                    value.vocabulary,
                    value.fingerprint,
                    self.settings.word_range(value.vocabulary),
                    windows=self.settings.windows,
                )
            else:
                database = DenseDatabase(
                    value.size, self.settings.dense_factory, self.settings.dense_train_size, self.settings.dense_tuning
                )
            self._databases[name] = (kind, database)
        held_kind, database = self._databases[name]
        if held_kind != kind:
            raise SignatureError(
                f"database {quote(name)} holds {common_pb2.SignatureKind.Name(held_kind)} "
                f"signatures, not {common_pb2.SignatureKind.Name(kind)}"
            )
        return database

    # -- durability -------------------------------------------------------------------------------

    def _recover(self, store: ShardStore) -> None:
        """Loads the snapshot and replays the log after it. A database whose state or logged
        operations fail is set aside (Unloadable) with all its stored data; the rest is served."""
        seq, snapshot = store.read_snapshot()
        self._load_states(snapshot)
        replayed = 0
        failed: dict[str, str] = {}  # databases whose replay failed here -> why
        for number, record in store.replay(seq):
            replayed += 1
            name = log_codec.database_of(record)
            if name in failed:
                continue  # collected with the rest of its records below
            if name in self._broken:
                self._broken[name].pending.append(record)
                continue
            try:
                self._apply(log_codec.decode(record))
            except Exception as exc:
                failed[name] = f"replaying logged operation #{number}: {_reason(exc)}"
                self._databases.pop(name, None)
        for name, reason in failed.items():
            # Its snapshot blobs and every operation logged for it since, in order, as stored.
            pending = [r for _, r in store.replay(seq) if log_codec.database_of(r) == name]
            self._set_aside(name, reason, snapshot.get(name, {}), pending)
        self._since_snapshot = replayed
        log.info(
            "recovered %d databases from the snapshot at #%d and %d logged operations",
            len(self._databases),
            seq,
            replayed,
        )

    def _set_aside(self, name: str, reason: str, blobs: dict[str, bytes], pending: list[bytes]) -> None:
        self._broken[name] = Unloadable(reason, dict(blobs), pending)
        log.error(
            "database %s could not be loaded and is not served (its stored data is kept): %s", quote(name), reason
        )

    def _load_states(self, states: dict[str, dict[str, bytes]]) -> None:
        """Adds the databases of a snapshot (name -> blob name -> bytes, "kind" among the blobs,
        and PENDING_BLOB for one an earlier start-up set aside); one that fails is set aside."""
        for name, stored in states.items():
            blobs = dict(stored)
            pending = log_codec.unpack(blobs.pop(PENDING_BLOB, b""))
            try:
                if "kind" in blobs or not pending:  # else it was created by its pending operations
                    kind = int(blobs.pop("kind"))
                    database: Database
                    if kind == common_pb2.SIGNATURE_KIND_BOW:
                        database = BowIndex.from_state(blobs)
                        database.max_word_share = self.settings.max_word_share  # configuration, not data
                    elif kind == common_pb2.SIGNATURE_KIND_BLCF:
                        database = BlcfIndex.from_state(blobs)
                        database.windows = self.settings.windows  # configuration, not data
                    else:
                        database = DenseDatabase.from_state(blobs, self.settings.dense_tuning)
                    self._databases[name] = (kind, database)
                reason = "its snapshot state"
                for record in pending:
                    reason = "replaying an operation logged before it was set aside"
                    self._apply(log_codec.decode(record))
            except Exception as exc:
                self._databases.pop(name, None)
                self._set_aside(name, f"{reason}: {_reason(exc)}", stored, [])

    def _replay(self, records: Iterable[bytes]) -> int:
        """Applies logged records in order, with their thumbnail changes (the caller holds the
        write lock or owns the catalogue); returns how many. A record that no longer fits (one
        logged while catching up, against a database the copy holds with another kind or shape,
        or does not hold) is skipped."""
        replayed = 0
        changes: list[ThumbnailChange] = []
        for record in records:
            name = log_codec.database_of(record)
            if name in self._broken:  # kept with it, as start-up does
                self._broken[name].pending.append(record)
                replayed += 1
                continue
            try:
                operation = log_codec.decode(record)
                changes += self._thumbnail_changes(operation)
                self._apply(operation)
            except ServiceError as exc:
                log.warning("skipped a logged operation on %s that does not apply here: %s", quote(name), exc)
            replayed += 1
        self._change_thumbnails(changes)
        return replayed

    def _log(
        self,
        records: list[bytes],
        thumbnails: list[ThumbnailChange] | None = None,
        stored: list[bytes] | None = None,
    ) -> None:
        """Writes records ahead (durably; `stored`: the records as the log keeps them, when they
        differ) with the thumbnail changes they make, in one transaction, and hands the records to
        the replication streams; called under the write lock, so every reader sees the log order."""
        if self.store is not None:
            self.store.append(stored or records, thumbnails or ())
        else:
            self._change_thumbnails(thumbnails or [])
        if self._deferred is not None:
            self._deferred.extend(records)
        for follower in self._followers:
            follower.put(records)

    # -- replication (index_server.replication drives these) -------------------------------------

    @property
    def deferring(self) -> bool:
        """True while catching up: writes are logged but not applied until install()."""
        return self._deferred is not None

    def begin_deferral(self) -> None:
        """From now on writes are logged (so acknowledged ones survive a crash) and kept for
        install(), but not applied: what is held here is about to be replaced by a copy."""
        with self._write:
            if self._deferred is None:
                self._deferred = []

    def follow(self) -> tuple[dict[str, dict[str, bytes]], queue.SimpleQueue[list[bytes]]]:
        """Every database's state (the snapshot format) and a queue that receives every batch of
        records logged after it: together, a consistent copy that stays current. unfollow() ends it."""
        with self._write:
            if self._deferred is not None:
                raise RuntimeError("this replica is catching up itself: it cannot be copied")
            states = {
                name: {**database.state(), "kind": str(kind).encode()}
                for name, (kind, database) in self._databases.items()
            }
            # Set aside here: copied as stored (the copy then sets them aside too), never dropped.
            states.update((name, broken.carried()) for name, broken in self._broken.items())
            tail: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
            self._followers.append(tail)
        return states, tail

    def unfollow(self, tail: queue.SimpleQueue[list[bytes]]) -> None:
        """No more records go to `tail` (those already in it stay)."""
        with self._write:
            self._followers.remove(tail)

    def install(self, states: dict[str, dict[str, bytes]], records: Iterable[bytes]) -> None:
        """Replaces every database with a copy (states, then records logged after them), then
        applies the writes deferred here meanwhile, in their order, and ends the deferral; writes
        it durably (a snapshot) before returning. Re-applying a write the copy has is harmless:
        an Add replaces, a Delete of what is not there does nothing."""
        fresh = Catalogue(self.settings, limits=self.limits)  # in memory: built off the write lock
        for name, blobs in states.items():  # the thumbnails travel as blobs of their own
            for blob in [b for b in blobs if b.startswith(THUMBNAIL_BLOB)]:
                fresh._thumbnails[(name, blob[len(THUMBNAIL_BLOB) :])] = blobs.pop(blob)
        fresh._load_states(states)
        fresh._replay(records)
        with self._write:
            fresh._replay(self._deferred or [])
            self._databases = fresh._databases
            self._broken = fresh._broken  # the copy replaces what was set aside here too
            if self.store is not None:
                changes = [(name, item_id, data) for (name, item_id), data in fresh._thumbnails.items()]
                self.store.change_thumbnails(changes, replace=True)
            else:
                self._thumbnails = fresh._thumbnails
            self._deferred = None
            self._since_snapshot = 0
        self.snapshot()

    def end_deferral(self) -> None:
        """Ends a deferral without a copy (no source could give one): applies the deferred writes
        to what is held here."""
        with self._write:
            self._replay(self._deferred or [])
            self._deferred = None

    def _maybe_snapshot(self) -> None:
        if (
            self.store is not None
            and self._since_snapshot >= self.snapshot_every
            and self._deferred is None
            and not self._snapshotting.locked()
        ):
            self._snapshot_thread = threading.Thread(target=self.snapshot, name="snapshot", daemon=True)
            self._snapshot_thread.start()

    def snapshot(self) -> None:
        """Writes every database to the store as of the last logged operation, then drops that log."""
        if self.store is None:
            return
        with self._snapshotting:
            with self._write:  # no change between the sequence number and the states
                if self._deferred is not None:
                    return  # logged writes are not applied yet: the log must stay as it is
                seq = self.store.last_seq
                for _, database in self._databases.values():
                    if isinstance(database, BowIndex | BlcfIndex) and database.dead_rows() > len(database) // 4:
                        database.compact()
                states = {
                    name: {**database.state(), "kind": str(kind).encode()}
                    for name, (kind, database) in self._databases.items()
                }
                # Set aside at start-up: written back as stored, never dropped.
                states.update((name, broken.carried()) for name, broken in self._broken.items())
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
