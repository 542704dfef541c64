"""The router: IndexService in front of several shards, the one place where shard answers merge.

Layouts (RouterConfig.layout):
- "item": an item lives on shard hash(group_id or id) % N, so every image of a product is on one
  shard; a Search asks every shard for its top k and keeps the best k. A dead or late shard drops
  its items (missing_shards). An item moved to another group through an Add should be deleted
  first: its old copy stays on its old group's shard otherwise.
- "word": every bag-of-words or BLCF item is sent to every shard, each keeping a contiguous range of
  words (the paper, section 3.2); a Search sums the shards' streamed partial scores per item and
  takes the exact top k. A dead or late shard drops its words (missing_word_ranges): every item is
  still ranked, on the other words. Dense databases are spread by item as in the item layout.
BLCF databases (tf-idf cosine) are exact in the word layout, where every shard holds every item's
whole map and the database's df: a spatial re-ranking goes to one shard with the summed first
stage's top K as candidates. In the item layout each shard weighs words by its own items' idf, so
scores differ from one shard's by as much as the shards' word statistics differ; each shard
re-ranks its own top K, and the merge re-ranks exactly the global first stage's top K.
Product attributes (a group's path, tags and labels) live with the group's items: on its item-range
shard, or on every word-range shard (each filters by its own copy). So a filtered search is filtered
inside every shard while it collects its top k (or its partial sums), and the merge stays exact; an
UpdateGroups goes where the groups are, a Delete by `where` everywhere (each shard resolves it over
its own groups), a ListGroups merges the shards' pages by group id.
Each shard may have replicas: searches are spread by gRPC round_robin over those whose health is
SERVING (one catching up is not: index_server.replication), writes go to all. A write succeeds once
min_write_replicas of each shard's replicas acknowledged it (default 1); a replica that missed it
copies a fellow replica when it returns.
Partial failure is never an error for a Search: the answer is flagged `degraded` instead.
Refusals are domain errors (common.errors) raised in the servicer's thread (a fan-out's worker
returns its shard's outcome, or raises); a shard's refusal that is the caller's fault is passed on
with its code and google.rpc details (common.status.error_from_rpc), and the server's interceptor
(common.interceptors) turns each error into its status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import itertools
import json
import logging
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
import numpy as np

from common.blcf_codec import AssignmentMap
from common.bow_codec import BagOfWords
from common.channels import channel_target, open_channel
from common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    Unimplemented,
    quote,
)
from common.limits import check_id
from common.proto_convert import kind_name
from common.serving import timeout_from
from common.status import error_from_rpc
from common.streams import client_stream
from common.telemetry import ContextThreadPoolExecutor
from index_server.config import RouterConfig
from index_server.convert import (
    after_token,
    attributes_of,
    filter_of,
    hit_of,
    item_value,
    page_size_of,
    page_token,
    request_filter,
    scored_item,
    signature_value,
    spatial_rerank_of,
)
from index_server.domain import Hit, Rerank, Value, item_key, word_range_of
from index_server.limits import check_stream_length, check_top_k, limits_of
from index_server.merge import best_of_groups, merge_reranked, merge_top_k, shard_of, sum_partials, top_with_ties
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

# A shard's answer that is the caller's fault, not the shard's: passed on, never a degradation.
_CALLER_ERRORS = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
)


def filter_in(
    request: index_pb2.SearchRequest | index_pb2.SearchBatchRequest,
) -> common_pb2.Filter | None:
    """The request's filter as the shards get it, checked here first (a bad one is refused whichever
    shards the query reaches): None when it has none or an empty one (it keeps everything), so such
    a request reaches the shards as it did before filters existed."""
    return request.filter if request_filter(request) is not None else None


def read_options(replicas: int) -> list[tuple[str, object]]:
    """Channel options for a shard's reads: round_robin over the replicas whose gRPC health for
    IndexService is SERVING, so one catching up (index_server.replication) or draining gets no
    reads; with several replicas, a read refused UNAVAILABLE (a replica just killed, or not yet
    seen as catching up) is tried again on another."""
    service = index_pb2.DESCRIPTOR.services_by_name["IndexService"].full_name
    config: dict[str, object] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": service},
    }
    if replicas > 1:
        config["methodConfig"] = [
            {
                "name": [{"service": service}],
                "retryPolicy": {
                    "maxAttempts": min(replicas + 1, 5),
                    "initialBackoff": "0.01s",
                    "maxBackoff": "0.1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return [("grpc.service_config", json.dumps(config))]


@dataclass
class Shard:
    number: int
    addresses: list[str]
    read: index_pb2_grpc.IndexServiceStub  # round_robin over the healthy replicas
    replicas: list[index_pb2_grpc.IndexServiceStub]  # one per replica, for writes

    @property
    def where(self) -> str:
        """The shard as messages name it: its number and its replicas' addresses."""
        return f"shard {self.number} ({', '.join(self.addresses)})"


@dataclass(frozen=True)
class Outcome(Generic[T_co]):
    """One shard's answer to a call: its value, or the error that made it missing."""

    shard: Shard
    value: T_co | None = None
    error: grpc.RpcError | None = None

    @property
    def answer(self) -> T_co:
        """The value of a call that answered (error is None)."""
        assert self.error is None and self.value is not None, f"shard {self.shard.number} did not answer"
        return self.value

    @property
    def failure(self) -> grpc.RpcError:
        """The error of a call that failed."""
        assert self.error is not None, f"shard {self.shard.number} answered"
        return self.error


# The kinds whose databases the word layout spreads by word range (each shard holds every item).
_WORD_KINDS = (common_pb2.SIGNATURE_KIND_BOW, common_pb2.SIGNATURE_KIND_BLCF)

# Items queued per forwarded Add stream: a slow shard slows the caller's stream down (flow control).
_QUEUED_ITEMS = 256


class _Downstream:
    """One forwarded Add stream to one shard replica, fed from a bounded queue as items arrive."""

    def __init__(self, shard: Shard, stub: index_pb2_grpc.IndexServiceStub, timeout: float):
        self.shard = shard
        self._queue: queue.Queue[index_pb2.AddRequest | None] = queue.Queue(maxsize=_QUEUED_ITEMS)
        self.future = stub.Add.future(self._requests(), timeout=timeout)

    def _requests(self) -> Iterator[index_pb2.AddRequest]:
        while (request := self._queue.get()) is not None:
            yield request

    def send(self, request: index_pb2.AddRequest | None) -> None:
        """Queues an item (None ends the stream); drops it once the call is over (a failed call
        reads no more: Router._check_forwarding reports it)."""
        while not self.future.done():
            try:
                self._queue.put(request, timeout=0.05)
                return
            except queue.Full:
                continue

    def cancel(self) -> None:
        """Cancels the call (the shard then stores nothing of it) and frees the thread feeding it."""
        if self.future.done():
            return
        self.future.cancel()
        while True:
            try:
                self._queue.put_nowait(None)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()

    def outcome(self) -> Outcome[index_pb2.AddResponse]:
        try:
            return Outcome(self.shard, self.future.result())
        except grpc.RpcError as exc:
            return Outcome(self.shard, error=exc)


class _ForwardedAdd:
    """The forwarded streams of one Add, by ("own", shard) or, for word-layout bag-of-words
    items, ("all", shard): each a list of one _Downstream per replica, opened by its first item."""

    def __init__(self, router: Router, timeout: float):
        self.router = router
        self.timeout = timeout
        self.groups: dict[tuple[str, int], list[_Downstream]] = {}

    def send(self, request: index_pb2.AddRequest) -> None:
        router = self.router
        if router._word_layout(request.signature.kind):
            keys = [("all", shard.number) for shard in router.shards]
        else:
            keys = [("own", shard_of(request.item_id, len(router.shards), request.group_id))]
        for key in keys:
            group = self.groups.get(key)
            if group is None:
                shard = router.shards[key[1]]
                group = self.groups[key] = [_Downstream(shard, stub, self.timeout) for stub in shard.replicas]
            for downstream in group:
                downstream.send(request)

    def finish(self) -> list[tuple[tuple[str, int], list[Outcome[index_pb2.AddResponse]]]]:
        """Ends every stream (each shard replica commits its own) and waits for the answers."""
        for group in self.groups.values():
            for downstream in group:
                downstream.send(None)
        return [(key, [d.outcome() for d in group]) for key, group in self.groups.items()]

    def cancel(self) -> None:
        for group in self.groups.values():
            for downstream in group:
                downstream.cancel()


class Router(index_pb2_grpc.IndexServiceServicer):
    def __init__(self, config: RouterConfig):
        self.config = config
        self.limits = limits_of(config)
        self._channels: list[grpc.Channel] = []

        def stub(target: str, extra: list[tuple[str, object]]) -> index_pb2_grpc.IndexServiceStub:
            channel = open_channel(target, config, extra)
            self._channels.append(channel)
            return index_pb2_grpc.IndexServiceStub(channel)

        self.shards = [
            Shard(
                i,
                list(addresses),
                stub(channel_target(addresses), read_options(len(addresses))),
                [stub(a, []) for a in addresses],
            )
            for i, addresses in enumerate(config.shards)
        ]
        replicas = sum(len(s.addresses) for s in self.shards)
        # Context-copying: calls made for a request carry its request id.
        self._pool = ContextThreadPoolExecutor(max_workers=max(4, 4 * replicas), thread_name_prefix="router")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for channel in self._channels:
            channel.close()

    def _fan_out(self, calls: Sequence[tuple[Shard, Callable[[], T]]]) -> list[Outcome[T]]:
        """Runs the calls in parallel (each carries its own deadline) and collects every outcome: a
        call that failed with grpc.RpcError is a missing shard; a domain error a call raises (e.g. a
        shard holding other words than the router expects) is raised here, in the caller's thread."""
        futures = [(shard, self._pool.submit(call)) for shard, call in calls]
        outcomes: list[Outcome[T]] = []
        for shard, future in futures:
            try:
                outcomes.append(Outcome(shard, future.result()))
            except grpc.RpcError as exc:
                outcomes.append(Outcome(shard, error=exc))
        return outcomes

    def _word_layout(self, kind: int) -> bool:
        """Whether a database of this kind is spread by word range: bag-of-words and BLCF databases
        in the word layout (dense ones are spread by item in both)."""
        return self.config.layout == "word" and kind in _WORD_KINDS

    # -- writes -----------------------------------------------------------------------------------

    def Add(
        self, request_iterator: Iterator[index_pb2.AddRequest], context: grpc.ServicerContext
    ) -> index_pb2.AddResponse:
        """Forwards the stream as it arrives, each item checked as a shard checks it: one stream
        per shard replica for the items the shard holds, and in the word layout one more to every
        shard for the bag-of-words items. A shard commits a stream when it ends (all or nothing),
        so the router ends them only once the caller ended its own; a refused item, a cancel
        (client_stream raises Cancelled) or a failing shard before then cancels them all, and
        nothing is stored anywhere. Attributes, thumbnails and local features travel in the items
        as sent: a word-range shard stores every bag-of-words item's thumbnail and local features
        too (on disk), so that any shard answers GetItemImages, at the cost of one copy per shard."""
        forward = _ForwardedAdd(self, timeout_from(context, self.config.add_timeout_s))
        try:
            for position, request in enumerate(client_stream(request_iterator, context, self.config.cancel_settle_s)):
                check_stream_length(position + 1, self.limits)
                try:
                    item_value(request, self.limits)
                except ServiceError as exc:
                    raise exc.reworded(
                        f"item #{position} ({quote(request.item_id)}): {exc}; nothing of this stream was added"
                    ) from None
                forward.send(request)
                self._check_forwarding(forward)
            results = forward.finish()
            stored = any(o.error is None for _, outcomes in results for o in outcomes)
            partial = (
                (
                    "; the other shards stored their items of this stream: fix it and re-send the whole "
                    "stream (an Add of an existing id replaces it)"
                )
                if stored
                else ""
            )
            for _, outcomes in results:
                for outcome in outcomes:
                    if outcome.error is not None and outcome.error.code() in _CALLER_ERRORS:
                        raise error_from_rpc(
                            outcome.error, f"{outcome.shard.where}: {outcome.error.details()}{partial}"
                        )
            acknowledged = self._acknowledged(
                [outcomes for _, outcomes in results],
                "the shards that answered stored their items of this stream: re-send the whole stream (an Add "
                "of an existing id replaces it)"
                if stored
                else "nothing of this stream was added: re-send it",
            )
            added = replaced = 0
            for (key, _), outcome in zip(results, acknowledged):
                # Word layout: every shard holds every bag-of-words item; count them on shard 0.
                if key[0] == "own" or key[1] == 0:
                    added += outcome.answer.added
                    replaced += outcome.answer.replaced
            return index_pb2.AddResponse(added=added, replaced=replaced)
        finally:
            forward.cancel()  # whatever is still open: a refusal, a cancel, an error

    def _check_forwarding(self, forward: _ForwardedAdd) -> None:
        """Raises (the caller's finally cancels every stream) once a shard refused an item, or too
        few of a shard's replicas are left to acknowledge: a forwarded stream that is over before
        it was ended has failed."""
        for group in forward.groups.values():
            failed = [d.outcome() for d in group if d.future.done()]
            if not failed:
                continue
            for outcome in failed:
                if outcome.error is not None and outcome.error.code() in _CALLER_ERRORS:
                    raise self._write_error(outcome, "")
            if len(group) - len(failed) < max(1, min(self.config.min_write_replicas, len(group))):
                raise self._write_error(failed[0], "nothing of this stream was added: re-send it")

    def _acknowledged(self, writes: list[list[Outcome[T]]], tail: str) -> list[Outcome[T]]:
        """Per write to one shard (its outcomes on each of the shard's replicas), the answer of an
        acknowledging replica (NOT_FOUND acknowledges a Delete: the database is not there).
        A refusal that is the caller's fault is raised with its code and details; fewer
        acknowledgments than min_write_replicas (or the shard's replica count, if fewer) raise
        Unavailable, ending with `tail`. A replica that missed the write (down, or catching up) is
        only logged: it copies a fellow replica when it is back (IndexConfig.peers,
        index_server.replication)."""
        chosen = []
        for outcomes in writes:
            for outcome in outcomes:
                if outcome.error is not None and outcome.error.code() in _CALLER_ERRORS:
                    raise self._write_error(outcome, tail)
            acked = [o for o in outcomes if o.error is None or o.error.code() == grpc.StatusCode.NOT_FOUND]
            missed = [o for o in outcomes if not (o.error is None or o.error.code() == grpc.StatusCode.NOT_FOUND)]
            if not acked or len(acked) < min(self.config.min_write_replicas, len(outcomes)):
                raise self._write_error(missed[0], tail)
            for outcome in missed:
                log.warning(
                    "a replica of shard %d (%s) missed a write, acknowledged by %d of %d replicas: %s %s",
                    outcome.shard.number,
                    ", ".join(outcome.shard.addresses),
                    len(acked),
                    len(outcomes),
                    outcome.failure.code().name,
                    outcome.failure.details(),
                )
            chosen.append(min(acked, key=lambda o: o.error is not None))  # an answer over a NOT_FOUND
        return chosen

    def _write_error(self, outcome: Outcome[T], tail: str) -> ServiceError:
        """The error for a write that a shard replica failed: its own refusal, passed on with its
        code and details, when it is the caller's fault; Unavailable otherwise, ending with `tail`."""
        error = outcome.failure
        if error.code() in _CALLER_ERRORS:
            return error_from_rpc(error, f"{outcome.shard.where}: {error.details()}")
        return Unavailable(f"{outcome.shard.where} failed ({error.code().name}): {error.details()}; {tail}")

    def _write(
        self, calls: Sequence[tuple[Shard, Callable[[index_pb2_grpc.IndexServiceStub], T]]], tail: str
    ) -> list[Outcome[T]]:
        """Runs each shard's write on every replica of it, in parallel, and returns one
        acknowledging replica's outcome per shard (an answer, or NOT_FOUND: the database is not
        there), in the order of `calls`; raises as _acknowledged does (`tail` ends its message)."""
        outcomes: list[Outcome[T]] = self._fan_out(
            [(shard, functools.partial(call, stub)) for shard, call in calls for stub in shard.replicas]
        )
        starts = list(itertools.accumulate((len(shard.replicas) for shard, _ in calls), initial=0))
        return self._acknowledged([outcomes[start:end] for start, end in itertools.pairwise(starts)], tail)

    def _absent(self, acknowledged: Sequence[Outcome[object]], database: str) -> ServiceError:
        """NotFound for a write that every shard answered NOT_FOUND: the shard's status, passed on
        with the router's message."""
        return error_from_rpc(
            acknowledged[0].failure,
            f"database {quote(database)} does not exist on any shard; a database is created by the first "
            "Add of an item to it",
        )

    def Delete(self, request: index_pb2.DeleteRequest, context: grpc.ServicerContext) -> index_pb2.DeleteResponse:
        if not request.database:
            raise InvalidArgument("database is required")
        if request.HasField("where"):
            filter_of(request.where, "where")  # refused here, before any shard deletes anything
        timeout = timeout_from(context, self.config.default_timeout_s)
        # Group deletes go everywhere too: a group lives on one item-range shard, but on every
        # word-range shard, and the router does not know which items a group has. So does a
        # `where`: each shard resolves it over the groups it holds (on a word-range shard, every
        # bag-of-words group with its attributes).
        acknowledged: list[Outcome[index_pb2.DeleteResponse]] = self._write(
            [(shard, lambda stub: stub.Delete(request, timeout=timeout)) for shard in self.shards],
            "deletes are idempotent: re-send this one",
        )
        found_ids: set[str] = set()
        found_groups: set[str] = set()
        matched: set[str] = set()  # groups the `where` deleted, on any shard
        per_shard: dict[int, int] = {}  # items deleted, from one replica of each shard
        for outcome in acknowledged:
            if outcome.error is not None:  # NOT_FOUND: the database is not on this shard
                continue
            response = outcome.answer
            per_shard.setdefault(outcome.shard.number, response.deleted)
            missing, missing_groups = set(response.not_found), set(response.groups_not_found)
            found_ids.update(i for i in request.item_ids if i not in missing)
            found_groups.update(g for g in request.group_ids if g not in missing_groups)
            matched.update(response.groups_deleted)
        if not per_shard:  # every shard answered NOT_FOUND
            raise self._absent(acknowledged, request.database)
        if not request.group_ids and not request.HasField("where"):
            deleted = len(found_ids)  # by id alone the router knows exactly which ones went
        elif self.config.layout == "word" and self._kind(request.database, timeout) in (
            *_WORD_KINDS,
            common_pb2.SIGNATURE_KIND_UNSPECIFIED,
        ):
            # Every shard held (and deleted) the same bag-of-words items; a kind no shard could
            # tell counts the same way, so the count never exceeds what went.
            deleted = max(per_shard.values())
        else:
            deleted = sum(per_shard.values())  # each item on one shard (its group's)
        return index_pb2.DeleteResponse(
            deleted=deleted,
            not_found=[i for i in dict.fromkeys(request.item_ids) if i not in found_ids],
            groups_not_found=[g for g in dict.fromkeys(request.group_ids) if g not in found_groups],
            groups_deleted=sorted(matched),
        )

    def UpdateGroups(
        self, request: index_pb2.UpdateGroupsRequest, context: grpc.ServicerContext
    ) -> index_pb2.UpdateGroupsResponse:
        """Each group's attributes go where its items are: in the item layout (and for a dense
        database in the word layout) to the shard its name hashes to, as Add places its items; for a
        bag-of-words database in the word layout to every shard (each holds every group, and filters
        by its own copy of the attributes: all must apply the update, as all take an Add)."""
        if not request.database:
            raise InvalidArgument("database is required")
        # Refused here, as a shard refuses it, before any shard stores anything (each shard may get
        # only its share of the groups).
        if len(request.groups) > self.limits.max_items_per_stream:
            raise ResourceExhausted(
                f"{len(request.groups)} groups are above the limit of {self.limits.max_items_per_stream} per "
                "UpdateGroups: split the update (nothing of this one was stored)",
                quota=[("max_items_per_stream", f"at most {self.limits.max_items_per_stream} groups per UpdateGroups")],
            )
        for i, group in enumerate(request.groups):
            check_id(f"groups[{i}].group_id", group.group_id, self.limits.max_id_bytes, required=True)
            attributes_of(group.attributes, f"groups[{i}].attributes")
        timeout = timeout_from(context, self.config.default_timeout_s)
        everywhere = self.config.layout == "word" and self._kind(request.database, timeout) in (
            *_WORD_KINDS,
            common_pb2.SIGNATURE_KIND_UNSPECIFIED,  # no shard could tell: every shard, to be sure
        )
        parts: list[tuple[Shard, index_pb2.UpdateGroupsRequest]]
        if everywhere or not request.groups:
            parts = [(shard, request) for shard in self.shards]
        else:
            by_shard: dict[int, list[index_pb2.GroupAttributes]] = {}
            for group in request.groups:
                by_shard.setdefault(shard_of(group.group_id, len(self.shards)), []).append(group)
            parts = [
                (self.shards[n], index_pb2.UpdateGroupsRequest(database=request.database, groups=groups))
                for n, groups in sorted(by_shard.items())
            ]

        def update(
            part: index_pb2.UpdateGroupsRequest,
        ) -> Callable[[index_pb2_grpc.IndexServiceStub], index_pb2.UpdateGroupsResponse]:
            return lambda stub: stub.UpdateGroups(part, timeout=timeout)

        acknowledged: list[Outcome[index_pb2.UpdateGroupsResponse]] = self._write(
            [(shard, update(part)) for shard, part in parts],
            "an update replaces the groups' attributes whole, so re-sending it is safe: re-send this one",
        )
        found: set[str] = set()
        answered = False
        for (_, part), outcome in zip(parts, acknowledged):
            if outcome.error is not None:  # NOT_FOUND: the database is not on this shard
                continue
            answered = True
            missing = set(outcome.answer.not_found)
            found.update(g.group_id for g in part.groups if g.group_id not in missing)
        if not answered and (
            len(parts) == len(self.shards)
            or self._kind(request.database, timeout) == common_pb2.SIGNATURE_KIND_UNSPECIFIED
        ):
            raise self._absent(acknowledged, request.database)
        return index_pb2.UpdateGroupsResponse(
            updated=len(found),
            not_found=[g for g in dict.fromkeys(g.group_id for g in request.groups) if g not in found],
        )

    def _kind(self, database: str, timeout: float) -> int:
        """The signature kind of a database, from the first shard that can say."""
        for shard in self.shards:
            try:
                for held in shard.read.Stats(index_pb2.StatsRequest(), timeout=timeout).databases:
                    if held.name == database:
                        return held.kind
            except grpc.RpcError:
                continue
        return common_pb2.SIGNATURE_KIND_UNSPECIFIED

    # -- search -----------------------------------------------------------------------------------

    def _value(self, signature: common_pb2.Signature, prefix: str = "") -> Value:
        """The query's decoded signature; a signature that does not decode is refused, its message
        led by `prefix` (which query of a batch)."""
        try:
            return signature_value(signature)
        except ServiceError as exc:
            raise exc.reworded(prefix + exc.message) from None

    def _flag(
        self,
        response: index_pb2.SearchResponse | index_pb2.SearchBatchResponse,
        missing: Sequence[Outcome[object]],
        database: str,
        kind: int,
        vocabulary: int,
    ) -> None:
        """Sets the degraded flags (the same fields in both responses) for the shards missing."""
        if not missing:
            return
        response.degraded = True
        response.degraded_reason = "; ".join(
            f"{o.shard.where}: {o.failure.code().name} {o.failure.details()}" for o in missing
        )
        if self._word_layout(kind):
            for o in missing:
                lo, hi = word_range_of(o.shard.number, len(self.shards), vocabulary)
                response.missing_word_ranges.add(first=lo, end=hi)
        else:
            response.missing_shards.extend(o.shard.number for o in missing)
        log.warning("degraded search in %s: %s", database, response.degraded_reason)

    def Search(
        self, request: index_pb2.SearchRequest, context: grpc.ServicerContext
    ) -> Iterator[index_pb2.SearchResponse]:
        top_k = check_top_k(request.top_k, self.config.max_top_k)
        if not request.database:
            raise InvalidArgument("database is required")
        value = self._value(request.signature)
        rerank = self._spatial_rerank(request, request.signature.kind)
        product_filter = filter_in(request)
        timeout = timeout_from(context, self.config.default_timeout_s, self.config.reply_reserve_s)
        missing: Sequence[Outcome[object]]
        if self._word_layout(request.signature.kind):
            assert isinstance(value, BagOfWords | AssignmentMap)  # such signatures decode to a bag or a map
            hits, missing = self._search_words(
                request.database,
                request.signature,
                value,
                top_k,
                request.one_per_group,
                timeout,
                product_filter,
                rerank,
            )
        else:
            results, missing = self._search_items(
                request.database, [request.signature], top_k, request.one_per_group, timeout, product_filter, rerank
            )
            hits = results[0]
        first = index_pb2.SearchResponse()
        vocabulary = value.vocabulary if isinstance(value, BagOfWords | AssignmentMap) else 0
        self._flag(first, missing, request.database, request.signature.kind, vocabulary)
        chunks = [hits[i : i + self.config.chunk_size] for i in range(0, len(hits), self.config.chunk_size)] or [[]]
        for number, chunk in enumerate(chunks):
            response = first if number == 0 else index_pb2.SearchResponse()
            response.items.extend(scored_item(h) for h in chunk)
            yield response

    def SearchBatch(
        self, request: index_pb2.SearchBatchRequest, context: grpc.ServicerContext
    ) -> index_pb2.SearchBatchResponse:
        top_k = check_top_k(request.top_k, self.config.max_top_k)
        if not request.database:
            raise InvalidArgument("database is required")
        if not request.signatures:
            raise InvalidArgument("signatures is empty: send at least one query")
        if len(request.signatures) > self.config.max_batch:
            raise ResourceExhausted(
                f"{len(request.signatures)} queries are above the router's batch limit of "
                f"{self.config.max_batch}: split the batch",
                quota=[("max_batch", f"at most {self.config.max_batch} queries per SearchBatch")],
            )
        several = len(request.signatures) > 1
        values = [self._value(s, f"signature #{i}: " if several else "") for i, s in enumerate(request.signatures)]
        kinds = {s.kind for s in request.signatures}
        if len(kinds) > 1:
            raise InvalidArgument(
                "the signatures of a batch are of several kinds: every query must be of the database's kind"
            )
        kind = request.signatures[0].kind
        rerank = self._spatial_rerank(request, kind)
        product_filter = filter_in(request)
        response = index_pb2.SearchBatchResponse()
        if self._word_layout(kind):
            # Per query (partial scores are per query); each gets what is left of the caller's time.
            deadline = time.monotonic() + timeout_from(
                context, self.config.default_timeout_s, self.config.reply_reserve_s
            )
            missed: dict[int, Outcome[object]] = {}
            vocabulary = 0
            for signature, bag in zip(request.signatures, values):
                assert isinstance(bag, BagOfWords | AssignmentMap)  # such signatures decode to a bag or a map
                vocabulary = bag.vocabulary
                hits, missing = self._search_words(
                    request.database,
                    signature,
                    bag,
                    top_k,
                    request.one_per_group,
                    max(deadline - time.monotonic(), 0.001),
                    product_filter,
                    rerank,
                )
                response.results.add().items.extend(scored_item(h) for h in hits)
                missed.update((o.shard.number, o) for o in missing)
            self._flag(response, [missed[n] for n in sorted(missed)], request.database, kind, vocabulary)
            self._check_size(response)
            return response
        timeout = timeout_from(context, self.config.default_timeout_s, self.config.reply_reserve_s)
        results, missed_items = self._search_items(
            request.database, list(request.signatures), top_k, request.one_per_group, timeout, product_filter, rerank
        )
        for hits in results:
            response.results.add().items.extend(scored_item(h) for h in hits)
        self._flag(response, missed_items, request.database, kind, 0)
        self._check_size(response)
        return response

    def _spatial_rerank(
        self, request: index_pb2.SearchRequest | index_pb2.SearchBatchRequest, kind: int
    ) -> Rerank | None:
        """The request's spatial re-ranking, checked as a shard checks it (within the router's
        max_rerank_k), for BLCF signatures only; candidate_keys are a router's to send, not its
        caller's."""
        if not request.HasField("spatial_rerank"):
            return None
        batch = isinstance(request, index_pb2.SearchBatchRequest)
        rerank = spatial_rerank_of(request.spatial_rerank, self.config.max_rerank_k, in_batch=batch)
        if rerank is None:
            return None
        if kind != common_pb2.SIGNATURE_KIND_BLCF:
            raise InvalidArgument(
                "spatial_rerank applies to SIGNATURE_KIND_BLCF signatures and databases, not "
                f"{kind_name(kind)}: "
                "leave spatial_rerank unset",
                violations=[("spatial_rerank", "only for SIGNATURE_KIND_BLCF databases")],
            )
        if rerank.candidates is not None:
            raise InvalidArgument(
                "spatial_rerank.candidate_keys are what a router sends a shard; a router re-ranks its own "
                "first stage: send top_k and query_expansion only",
                violations=[("spatial_rerank.candidate_keys", "not accepted by a router")],
            )
        return rerank

    def _check_size(self, response: index_pb2.SearchBatchResponse) -> None:
        """ResourceExhausted when the answer would be above max_message_bytes (it would fail in
        transit), saying how to ask for less."""
        size = response.ByteSize()
        if size > self.config.max_message_bytes:
            raise ResourceExhausted(
                f"the answer is {size} bytes, above the message limit of {self.config.max_message_bytes}: "
                "send fewer queries per batch or ask for a smaller top_k",
                quota=[("max_message_bytes", f"answers of at most {self.config.max_message_bytes} bytes")],
            )

    def _answered(self, outcomes: list[Outcome[T]], request_database: str) -> tuple[list[Outcome[T]], list[Outcome[T]]]:
        """Splits outcomes into answers and missing shards. A shard's refusal that is the caller's
        fault is raised with its code and details, and a database that no answering shard has is
        NotFound; no answer at all is Unavailable."""
        answered, missing, absent = [], [], []
        for outcome in outcomes:
            if outcome.error is None:
                answered.append(outcome)
            elif outcome.error.code() in _CALLER_ERRORS:
                raise error_from_rpc(outcome.error)
            elif outcome.error.code() == grpc.StatusCode.NOT_FOUND:
                absent.append(outcome)
            else:
                missing.append(outcome)
        if not answered and not missing:
            message = (
                f"database {quote(request_database)} does not exist on any "
                "shard; a database is created by the first Add of an item to it"
            )
            raise error_from_rpc(absent[0].failure, message) if absent else NotFound(message)
        if not answered and not absent:
            raise Unavailable(
                "no shard answered: "
                + "; ".join(f"shard {o.shard.number}: {o.failure.code().name} {o.failure.details()}" for o in missing)
            )
        return answered, missing

    def _search_items(
        self,
        database: str,
        signatures: list[common_pb2.Signature],
        top_k: int,
        one_per_group: bool,
        timeout: float,
        product_filter: common_pb2.Filter | None = None,
        rerank: Rerank | None = None,
    ) -> tuple[list[list[Hit]], list[Outcome[list[list[Hit]]]]]:
        """Per query, the merged top k of every shard's top k (with one_per_group: top k groups);
        one Search (one query) or one SearchBatch (several) per shard. With a filter, each shard
        collects its own top k among the items that pass it (it holds their groups' attributes), so
        the merge stays exact: every item of the global filtered top k is in its shard's. With
        spatial re-ranking (BLCF), each shard re-ranks its own first-stage top K and returns
        max(top_k, K) items, and merge_reranked re-ranks exactly the global first stage's top K, as
        one shard would; query expansion is then each shard's (over its own best windows)."""
        spatial = None
        depth = top_k
        if rerank is not None:
            spatial = index_pb2.SpatialRerank(top_k=rerank.top_k, query_expansion=rerank.query_expansion)
            depth = max(top_k, rerank.top_k)

        def search(shard: Shard) -> list[list[Hit]]:
            if len(signatures) == 1:
                return [
                    [
                        hit_of(i)
                        for chunk in shard.read.Search(
                            index_pb2.SearchRequest(
                                database=database,
                                signature=signatures[0],
                                top_k=depth,
                                one_per_group=one_per_group,
                                filter=product_filter,
                                spatial_rerank=spatial,
                            ),
                            timeout=timeout,
                        )
                        for i in chunk.items
                    ]
                ]
            response = shard.read.SearchBatch(
                index_pb2.SearchBatchRequest(
                    database=database,
                    signatures=signatures,
                    top_k=depth,
                    one_per_group=one_per_group,
                    filter=product_filter,
                    spatial_rerank=spatial,
                ),
                timeout=timeout,
            )
            return [[hit_of(i) for i in hits.items] for hits in response.results]

        answered, missing = self._answered(
            self._fan_out([(s, functools.partial(search, s)) for s in self.shards]), database
        )
        if rerank is not None:
            return [
                merge_reranked([o.answer[query] for o in answered], top_k, rerank.top_k, one_per_group)
                for query in range(len(signatures))
            ], missing
        return [
            merge_top_k([o.answer[query] for o in answered], top_k, one_per_group) for query in range(len(signatures))
        ], missing

    def _search_words(
        self,
        database: str,
        signature: common_pb2.Signature,
        value: BagOfWords | AssignmentMap,
        top_k: int,
        one_per_group: bool,
        timeout: float,
        product_filter: common_pb2.Filter | None = None,
        rerank: Rerank | None = None,
    ) -> tuple[list[Hit], list[Outcome[tuple[np.ndarray, np.ndarray, np.ndarray]]]]:
        """The exact top k of the query over every answering shard's words: the shards' streamed
        partial scores summed per item, the winners named by a Lookup (which gives their groups'
        attributes). With a filter, every shard leaves out the items whose group fails it: each
        word-range shard holds every group's attributes, so such an item is absent from every
        shard's partial sums, and the top k is the filtered one. A bag-of-words item's sums make
        its chi2 (score = sums / 2), a BLCF item's its cosine (score = sums). With spatial
        re-ranking (BLCF), the first stage's top K are sent to one answering shard (each holds every
        item's whole map) as candidates, and come back re-ranked, first; the rest follow. When no
        shard can re-rank, the first stage's order stands (its hits say reranked false)."""
        deadline = time.monotonic() + timeout
        bag = value.bag() if isinstance(value, AssignmentMap) else value
        blcf = isinstance(value, AssignmentMap)
        depth = max(top_k, rerank.top_k) if rerank is not None else top_k
        partial = index_pb2.PartialScoresRequest(
            database=database, signature=signature, with_groups=one_per_group, filter=product_filter
        )

        def scores(shard: Shard) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            # Runs in a worker thread: a shard that cannot be merged raises (for the caller's thread).
            keys, sums, groups = [], [], []
            for number, chunk in enumerate(shard.read.PartialScores(partial, timeout=timeout)):
                if number == 0:
                    expected = word_range_of(shard.number, len(self.shards), bag.vocabulary)
                    if (chunk.word_range.first, chunk.word_range.end) != expected:
                        raise FailedPrecondition(
                            f"shard {shard.number} holds words [{chunk.word_range.first}, "
                            f"{chunk.word_range.end}) but the router expects [{expected[0]}, {expected[1]}): "
                            "list the shards in word_shard_index order, with word_shard_count "
                            f"{len(self.shards)}"
                        )
                keys.append(np.frombuffer(chunk.keys, "<u8"))
                sums.append(np.frombuffer(chunk.sums, "<f4"))
                groups.append(np.frombuffer(chunk.groups, "<u8"))
                if one_per_group and len(groups[-1]) != len(keys[-1]):
                    raise FailedPrecondition(
                        f"shard {shard.number} sent no group keys: it predates one_per_group searches; upgrade it"
                    )
            return np.concatenate(keys), np.concatenate(sums), np.concatenate(groups)

        # Only the shards holding some of the query's words have anything to add (with a large
        # vocabulary and few words per query, that is the word layout's saving).
        ranges = [word_range_of(s.number, len(self.shards), bag.vocabulary) for s in self.shards]
        needed = [s for s, (lo, hi) in zip(self.shards, ranges) if np.any((bag.words >= lo) & (bag.words < hi))]
        answered, missing = self._answered(self._fan_out([(s, functools.partial(scores, s)) for s in needed]), database)
        values = [o.answer for o in answered]
        if one_per_group:
            keys, totals, groups = sum_partials([v[0] for v in values], [v[1] for v in values], [v[2] for v in values])
            # Each group's best item(s) first, then the top k groups: the lookup names only those.
            best = best_of_groups(totals, groups, depth)
        else:
            keys, totals = sum_partials([v[0] for v in values], [v[1] for v in values])
            best = top_with_ties(totals, depth)
        found = self._lookup(database, keys[best], [o.shard for o in answered], timeout)
        hits = [
            dataclasses.replace(found[int(k)], score=float(t) if blcf else float(t) / 2.0)
            for k, t in zip(keys[best], totals[best])
            if int(k) in found
        ]
        ranked = merge_top_k([hits], depth, one_per_group)
        if rerank is None or rerank.top_k == 0 or not ranked:
            return ranked[:top_k], missing
        head, rest = ranked[: rerank.top_k], ranked[rerank.top_k :]
        request = index_pb2.SearchRequest(
            database=database,
            signature=signature,
            top_k=len(head),
            one_per_group=one_per_group,
            filter=product_filter,
            spatial_rerank=index_pb2.SpatialRerank(
                top_k=rerank.top_k,
                query_expansion=rerank.query_expansion,
                candidate_keys=[item_key(hit.item_id) for hit in head],
                candidate_scores=[hit.score for hit in head],
            ),
        )
        answering = [o.shard for o in answered]
        shards = answering + [shard for shard in self.shards if shard not in answering]
        remaining = max(deadline - time.monotonic(), 0.001)
        try:
            reranked = self._from_shards(
                shards,
                lambda stub: [
                    hit_of(item) for chunk in stub.Search(request, timeout=remaining) for item in chunk.items
                ],
            )
        except Unavailable as exc:
            # The first stage stands (its hits say reranked false) rather than no answer at all.
            log.warning("spatial re-ranking in %s failed, first-stage order kept: %s", database, exc.message)
            return ranked[:top_k], missing
        return (reranked + rest)[:top_k], missing

    def _lookup(self, database: str, keys: np.ndarray, shards: list[Shard], timeout: float) -> dict[int, Hit]:
        """Ids, metadata, groups and boxes of the winning keys (as Hits scoring 0), from the first
        of `shards` (those that answered) that gives them (every word-range shard holds every item)."""
        if len(keys) == 0:
            return {}
        request = index_pb2.LookupRequest(database=database, keys=keys.tolist())
        errors = []
        for shard in shards:
            try:
                response = shard.read.Lookup(request, timeout=timeout)
                return {i.key: hit_of(i, 0.0) for i in response.items}
            except grpc.RpcError as exc:
                errors.append(f"shard {shard.number}: {exc.code().name} {exc.details()}")
        raise Unavailable("no shard could name the results: " + "; ".join(errors))

    # -- management reads -------------------------------------------------------------------------

    def ListGroups(
        self, request: index_pb2.ListGroupsRequest, context: grpc.ServicerContext
    ) -> index_pb2.ListGroupsResponse:
        """One page of groups in group id order. Where each shard holds some of the groups (the
        item layout, dense databases in both), every shard gives its page after the token and the
        pages merge by id, cut at page_size: the next token is the last id returned, so no group is
        skipped or repeated across pages. A bag-of-words database in the word layout is listed by
        one shard, as each holds every group. No shard's answer may be missing from a page (the
        answer has no degraded flag, and a listing that silently skipped a shard's groups would
        look complete): a dead shard is Unavailable."""
        if not request.database:
            raise InvalidArgument("database is required")
        if request.HasField("filter"):
            filter_of(request.filter)
        page_size = page_size_of(request.page_size)
        after_token(request.page_token)  # a token no page gave is refused here, as by a shard
        timeout = timeout_from(context, self.config.default_timeout_s)
        if self._word_layout(self._kind(request.database, timeout)):
            return self._from_any_shard(lambda stub: stub.ListGroups(request, timeout=timeout))
        outcomes = self._fan_out(
            [(s, functools.partial(s.read.ListGroups, request, timeout=timeout)) for s in self.shards]
        )
        answered, missing = self._answered(outcomes, request.database)
        if missing:
            raise Unavailable(
                "; ".join(f"{o.shard.where}: {o.failure.code().name} {o.failure.details()}" for o in missing)
                + ": the groups it holds cannot be listed; retry once it is back"
            )
        pages = [o.answer for o in answered]
        groups: list[index_pb2.GroupInfo] = []
        for group in heapq.merge(*(page.groups for page in pages), key=lambda g: g.group_id):
            if groups and groups[-1].group_id == group.group_id:
                continue  # never expected (a group's items all hash to its shard), but listed once
            groups.append(group)
        more = len(groups) > page_size or any(page.next_page_token for page in pages)
        groups = groups[:page_size]
        return index_pb2.ListGroupsResponse(
            groups=groups,
            next_page_token=page_token(groups[-1].group_id) if more and groups else "",
            total=sum(page.total for page in pages),
        )

    def GetItemImages(
        self, request: index_pb2.GetItemImagesRequest, context: grpc.ServicerContext
    ) -> index_pb2.GetItemImagesResponse:
        """Every shard is asked (the router knows an item's id, not the group that placed it), and
        each item's thumbnail and local features come from a shard that holds them. In the word
        layout every shard holds every bag-of-words item with its thumbnail and local features (an
        Add reaches each shard as sent), so any one answering shard is enough. A shard that did not
        answer is an error only when some asked item was found nowhere else (it may be there: the
        answer cannot say so). The request goes to the shards as sent (local_features,
        no_thumbnails)."""
        if not request.database:
            raise InvalidArgument("database is required")
        timeout = timeout_from(context, self.config.default_timeout_s)
        outcomes = self._fan_out(
            [(s, functools.partial(s.read.GetItemImages, request, timeout=timeout)) for s in self.shards]
        )
        answered, missing = self._answered(outcomes, request.database)
        found: dict[str, index_pb2.ItemImage] = {}
        for outcome in answered:
            for image in outcome.answer.images:
                held = found.setdefault(image.item_id, image)
                if held is not image:  # what one shard has and another has not (never expected)
                    if image.thumbnail and not held.thumbnail:
                        held.thumbnail = image.thumbnail
                    if image.HasField("local_features") and not held.HasField("local_features"):
                        held.local_features.CopyFrom(image.local_features)
        unresolved = [i for i in dict.fromkeys(request.item_ids) if i not in found]
        if missing and unresolved:
            raise Unavailable(
                f"{len(unresolved)} item(s) (first {quote(unresolved[0])}) are on no shard that answered, and "
                + "; ".join(f"{o.shard.where}: {o.failure.code().name} {o.failure.details()}" for o in missing)
                + ": retry once it is back"
            )
        return index_pb2.GetItemImagesResponse(images=[found[i] for i in dict.fromkeys(request.item_ids) if i in found])

    def _from_any_shard(self, call: Callable[[index_pb2_grpc.IndexServiceStub], T]) -> T:
        """The answer of the first shard that gives one, for what every shard holds (a word-range
        layout's bag-of-words groups); a refusal (the caller's fault, or NOT_FOUND) is passed on."""
        return self._from_shards(self.shards, call)

    def _from_shards(self, shards: list[Shard], call: Callable[[index_pb2_grpc.IndexServiceStub], T]) -> T:
        """_from_any_shard over these shards, in this order."""
        errors = []
        for shard in shards:
            try:
                return call(shard.read)
            except grpc.RpcError as exc:
                if exc.code() in _CALLER_ERRORS or exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise error_from_rpc(exc) from None
                errors.append(f"{shard.where}: {exc.code().name} {exc.details()}")
        raise Unavailable("no shard answered: " + "; ".join(errors))

    def PartialScores(
        self, request: index_pb2.PartialScoresRequest, context: grpc.ServicerContext
    ) -> Iterator[index_pb2.PartialScoresResponse]:
        raise Unimplemented("PartialScores is a shard's RPC: a router's Search already merges them")

    def Lookup(self, request: index_pb2.LookupRequest, context: grpc.ServicerContext) -> index_pb2.LookupResponse:
        raise Unimplemented("Lookup is a shard's RPC: a router's Search already names items")

    def Replicate(
        self, request: index_pb2.ReplicateRequest, context: grpc.ServicerContext
    ) -> Iterator[index_pb2.ReplicateResponse]:
        raise Unimplemented(
            "Replicate is a shard replica's RPC: give a replica's --peers the other replicas' addresses"
        )

    def Stats(self, request: index_pb2.StatsRequest, context: grpc.ServicerContext) -> index_pb2.StatsResponse:
        timeout = timeout_from(context, self.config.default_timeout_s)
        outcomes = self._fan_out([(s, functools.partial(s.read.Stats, request, timeout=timeout)) for s in self.shards])
        merged: dict[str, index_pb2.DatabaseStats] = {}
        index_types: dict[str, dict[int, str]] = {}  # per database, each shard's index type
        for outcome in outcomes:
            if outcome.error is not None:
                raise Unavailable(f"{outcome.shard.where}: {outcome.error.details()}")
            for database in outcome.answer.databases:
                held = merged.setdefault(
                    database.name,
                    index_pb2.DatabaseStats(name=database.name, kind=database.kind, dimension=database.dimension),
                )
                # Word layout: every shard holds every bag-of-words item (and group), each its own
                # range of their words (so memory adds up).
                if self._word_layout(database.kind):
                    held.items = max(held.items, database.items)
                    held.groups = max(held.groups, database.groups)
                else:
                    held.items += database.items
                    held.groups += database.groups
                held.memory_bytes += database.memory_bytes
                if database.index_type:
                    index_types.setdefault(database.name, {})[outcome.shard.number] = database.index_type
                # A shard that could not load it reports no kind or dimension, and why.
                held.kind = held.kind or database.kind
                held.dimension = max(held.dimension, database.dimension)
                if database.broken_reason:
                    held.broken_reason = "; ".join(
                        filter(None, [held.broken_reason, f"shard {outcome.shard.number}: {database.broken_reason}"])
                    )
        for name, types in index_types.items():
            # Shards choose their index by the size of what they hold, so they may differ.
            distinct = set(types.values())
            merged[name].index_type = (
                distinct.pop() if len(distinct) == 1 else "; ".join(f"shard {n}: {t}" for n, t in sorted(types.items()))
            )
        return index_pb2.StatsResponse(databases=[merged[name] for name in sorted(merged)])
