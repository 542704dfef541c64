"""Replicas that heal: a shard replica that was down copies a fellow replica's state before it serves reads.

Design, and why:
- Shipping log records by sequence number needs a shared order, and replicas have none: each
  numbers its own write-ahead log, and the router delivers a write to each replica separately (in
  parallel, so concurrent writes may even interleave differently). "Records after #N" of one
  replica says nothing about what another lacks. So a returning replica (configured with
  `--peers`, its fellow replicas) asks one that is healthy for a consistent copy, over the
  internal RPC `IndexService.Replicate`: every database's state taken under the source's write
  lock at one point of its log, then every record the source logs after that point (the records
  its own WAL gets) until (a) the writes that were in flight at the source when the copy began
  have finished and (b) at least `min_tail` has passed (the router's reconnection backoff to the
  returning replica: writes it could not yet deliver there are in the tail). All of it in chunks
  of at most `replicate_chunk_bytes` (a blob is split; no message nears the message size limit).
  Items' thumbnails and local features (on disk, not in the state) follow each database's state
  as blobs named THUMBNAIL_BLOB + item id (each the item's blob as stored: store.item_blob). The
  copy is complete rather than incremental: incremental would need that shared order (a
  router-assigned write id per write); a return costs one transfer of the shard's state.
- The returning replica takes writes all along (the router sends each write to every replica):
  it writes them ahead (durable), but applies them only after the copy, in their own order: the
  copy is the past, its tail the recent past, the deferred writes the present, so the latest write
  of an item wins. Re-applying a write the copy already has is harmless (an Add replaces, a Delete
  of what is not there does nothing). Such writes are answered UNAVAILABLE "catching up": an
  acknowledgment promises visibility to searches, which this replica cannot give yet; the router
  counts a write done when a replica of each shard acknowledged it (RouterConfig.min_write_replicas).
- It installs the copy (then the deferred writes), writes its own snapshot (durable), and only
  then serves reads. Until then reads are UNAVAILABLE "catching up from <peer>" and the gRPC
  health of mps.index.v1.IndexService (and "") is NOT_SERVING, so a router's health-checked
  round_robin reads the other replicas.
- No source (every peer unreachable for `catch_up_timeout_s`, or every peer catching up itself:
  the whole shard restarted): it applies its deferred writes to what it recovered and serves that.
  A peer that missed writes itself gives a copy without them (replicas carry no version to tell),
  and a replica that stays up after missing a write (a timeout) lags until it restarts.
Replicate hands out the whole index: it is internal (index_server.server.POLICY requires the
internal credential for it, as for the writes), and a replica calls it with that credential.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from common.errors import Unavailable
from index_server import log_codec
from index_server.catalogue import THUMBNAIL_BLOB, Catalogue
from mps.index.v1 import index_pb2, index_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class ReplicaStatus:
    """Whether this replica is still catching up (reads refused), and from which peer."""

    catching_up: bool = False
    source: str = ""

    def read_refusal(self) -> str | None:
        """Why reads are refused now, or None when this replica serves them."""
        if not self.catching_up:
            return None
        return (
            f"this replica is catching up from {self.source or 'its peers'} and does not serve reads "
            "yet: ask another replica of the shard"
        )


class WriteTracker:
    """The write calls in flight on this replica, so that a replication stream can wait for those
    that began before its copy (their records then reach the stream)."""

    def __init__(self) -> None:
        self._tickets = itertools.count(1)
        self._active: set[int] = set()
        self._lock = threading.Lock()

    def mark(self) -> int:
        """A number above every write started so far and below every later one."""
        with self._lock:
            return next(self._tickets)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Counts the block as a write in flight."""
        with self._lock:
            ticket = next(self._tickets)
            self._active.add(ticket)
        try:
            yield
        finally:
            with self._lock:
                self._active.discard(ticket)

    def settled(self, mark: int) -> bool:
        """True when no write started before `mark` is still running."""
        with self._lock:
            return all(ticket > mark for ticket in self._active)


def tracked_write(
    method: Callable[[Any, Any, grpc.ServicerContext], Any],
) -> Callable[[Any, Any, grpc.ServicerContext], Any]:
    """Wraps a shard servicer's write RPC (the servicer has `catalogue`, `writes`, `replica`): it
    counts as in flight for replication streams, and while this replica catches up it is refused
    with Unavailable once logged (applied after the copy; not yet visible to searches)."""

    @functools.wraps(method)
    def write(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        with self.writes.track():
            response = method(self, request, context)
        if self.catalogue.deferring:
            raise Unavailable(
                f"this replica is catching up from {self.replica.source or 'its peers'}: the write "
                "is logged and applied once caught up, but not yet visible to searches"
            )
        return response

    return write


# -- the source's side ----------------------------------------------------------------------------


def replication_stream(
    catalogue: Catalogue,
    writes: WriteTracker,
    min_tail_s: float,
    chunk_bytes: int,
    settle_timeout_s: float,
    active: Callable[[], bool] = lambda: True,
) -> Iterator[index_pb2.ReplicateResponse]:
    """A consistent copy of `catalogue` for a fellow replica: its state now, in chunks of at most
    `chunk_bytes`, then what is logged after, until the writes in flight now have finished (at most
    `settle_timeout_s`) and `min_tail_s` has passed; then done. Stops early when not `active()`."""
    mark = writes.mark()  # the writes in flight now must be in the stream: the copy or its tail
    states, tail = catalogue.follow()
    sent = 0
    try:
        databases = len(states)
        for name in sorted(states):
            blobs = states.pop(name)  # released as it goes: the copy is held once
            # Then its items' thumbnails, read from the store now: any change since the state is
            # in the tail below, and replaying it over them gives the same thumbnails.
            for blob, data in itertools.chain(
                ((blob, blobs.pop(blob)) for blob in sorted(blobs)),
                ((THUMBNAIL_BLOB + item_id, data) for item_id, data in catalogue.thumbnails_of(name)),
            ):
                for start in range(0, max(len(data), 1), chunk_bytes):
                    yield index_pb2.ReplicateResponse(
                        state=index_pb2.StateChunk(database=name, blob=blob, data=data[start : start + chunk_bytes])
                    )
        copied = time.monotonic()
        while active():
            for message in _operations(_drain(tail, wait_s=0.05), chunk_bytes):
                sent += len(message.operations.operations)
                yield message
            now = time.monotonic()
            if now >= copied + min_tail_s and (writes.settled(mark) or now >= copied + settle_timeout_s):
                break
    finally:
        catalogue.unfollow(tail)
    for message in _operations(_drain(tail), chunk_bytes):  # logged before unfollow
        sent += len(message.operations.operations)
        yield message
    yield index_pb2.ReplicateResponse(done=index_pb2.ReplicateDone(databases=databases, operations=sent))


def _drain(tail: queue.SimpleQueue, wait_s: float = 0.0) -> list[bytes]:
    """Every record queued now (waiting up to `wait_s` for the first)."""
    records: list[bytes] = []
    try:
        records.extend(tail.get(timeout=wait_s) if wait_s else tail.get_nowait())
        while True:
            records.extend(tail.get_nowait())
    except queue.Empty:
        return records


def _operations(records: list[bytes], chunk_bytes: int) -> Iterator[index_pb2.ReplicateResponse]:
    """Records as messages of about `chunk_bytes` (a record larger than that goes alone)."""
    batch: list[index_pb2.LoggedOperation] = []
    size = 0
    for record in records:
        if batch and size + len(record) > chunk_bytes:
            yield index_pb2.ReplicateResponse(operations=index_pb2.LoggedOperations(operations=batch))
            batch, size = [], 0
        batch.append(log_codec.to_message(record))
        size += len(record)
    if batch:
        yield index_pb2.ReplicateResponse(operations=index_pb2.LoggedOperations(operations=batch))


# -- the returning replica's side -----------------------------------------------------------------


class IncompleteCopy(Exception):
    """A replication stream ended before its done message."""


def receive_copy(responses: Iterator[index_pb2.ReplicateResponse]) -> tuple[dict[str, dict[str, bytes]], list[bytes]]:
    """(states, records after them) from a replication stream; IncompleteCopy when it is cut short."""
    states: dict[str, dict[str, bytearray]] = {}
    records: list[bytes] = []
    for response in responses:
        part = response.WhichOneof("part")
        if part == "state":
            states.setdefault(response.state.database, {}).setdefault(response.state.blob, bytearray()).extend(
                response.state.data
            )
        elif part == "operations":
            records.extend(log_codec.from_message(operation) for operation in response.operations.operations)
        elif part == "done":
            if response.done.databases != len(states):
                raise IncompleteCopy(f"{len(states)} databases arrived; the source sent {response.done.databases}")
            return {
                name: {blob: bytes(data) for blob, data in blobs.items()} for name, blobs in states.items()
            }, records
    raise IncompleteCopy("the stream ended before its done message")


def catch_up(
    catalogue: Catalogue,
    status: ReplicaStatus,
    peers: list[str],
    stub_for: Callable[[str], index_pb2_grpc.IndexServiceStub],
    request: index_pb2.ReplicateRequest,
    timeout_s: float,
    replicate_timeout_s: float,
    retry_s: float = 0.5,
) -> str | None:
    """Installs a copy from the first peer that gives one (trying them in turn for up to
    `timeout_s`) and returns that peer; None when none could (then the writes deferred meanwhile
    are applied to what this replica has). Ends the catalogue's deferral either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        refused = 0
        for peer in peers:
            status.source = peer
            started = time.monotonic()
            try:
                states, records = receive_copy(stub_for(peer).Replicate(request, timeout=replicate_timeout_s))
                catalogue.install(states, records)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    refused += 1  # catching up itself, or not a replica of this shard
                log.warning("no copy from %s: %s %s", peer, error.code().name, error.details())
                continue
            except Exception:
                log.exception("the copy from %s could not be installed", peer)
                continue
            log.info(
                "caught up from %s: %d databases and %d later operations in %.1f s",
                peer,
                len(states),
                len(records),
                time.monotonic() - started,
            )
            return peer
        if refused == len(peers) or time.monotonic() + retry_s >= deadline:
            break
        time.sleep(retry_s)
    log.warning("no peer of %s could give a copy: serving what this replica holds", peers)
    catalogue.end_deferral()
    return None


def start_catch_up(
    catalogue: Catalogue,
    status: ReplicaStatus,
    peers: list[str],
    stub_for: Callable[[str], index_pb2_grpc.IndexServiceStub],
    request: index_pb2.ReplicateRequest,
    timeout_s: float,
    replicate_timeout_s: float,
    on_done: Callable[[], None],
) -> threading.Thread:
    """Catches up in the background (the server takes writes meanwhile); then lets reads in and
    calls `on_done` (which marks the replica healthy)."""

    def run() -> None:
        try:
            catch_up(catalogue, status, peers, stub_for, request, timeout_s, replicate_timeout_s)
        finally:
            if catalogue.deferring:  # catch_up failed unexpectedly: the deferred writes still apply
                catalogue.end_deferral()
            status.catching_up = False
            on_done()

    thread = threading.Thread(target=run, name="catch-up", daemon=True)
    thread.start()
    return thread
