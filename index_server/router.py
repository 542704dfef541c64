"""The router: IndexService in front of several shards, the one place where shard answers merge.

Layouts (RouterConfig.layout):
- "item": an item lives on shard hash(group_id or id) % N, so every image of a product is on one
  shard; a Search asks every shard for its top k and keeps the best k. A dead or late shard drops
  its items (missing_shards). An item moved to another group through an Add should be deleted
  first: its old copy stays on its old group's shard otherwise.
- "word": every bag-of-words item is sent to every shard, each keeping a contiguous range of words
  (seed 000, 3.2); a Search sums the shards' streamed partial scores per item and takes the exact
  top k. A dead or late shard drops its words (missing_word_ranges): every item is still ranked,
  on the other words. Dense databases are spread by item as in the item layout.
Each shard may have replicas: searches are spread over them by gRPC round_robin, writes go to all.
Partial failure is never an error for a Search: the answer is flagged `degraded` instead.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, NoReturn, TypeVar

import grpc
import numpy as np

from common.bow_codec import BagOfWords
from common.serving import channel_options, timeout_from
from index_server.catalogue import Value, item_value, signature_value
from index_server.config import RouterConfig
from index_server.convert import hit_of, scored_item
from index_server.inverted import Hit, SignatureError
from index_server.merge import best_of_groups, merge_top_k, shard_of, sum_partials, top_with_ties, word_range_of
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

# A shard's answer that is the caller's fault, not the shard's: passed on, never a degradation.
_CALLER_ERRORS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                  grpc.StatusCode.FAILED_PRECONDITION)


def read_target(addresses: list[str]) -> str:
    """One channel target over all replicas of a shard, for round_robin."""
    if len(addresses) == 1:
        return addresses[0]
    hosts = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        try:
            hosts.append(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            raise ValueError(f"replica address {address!r}: several replicas must be given as IP:port "
                             "(or as one dns:///name:port resolving to all of them)") from None
        if not port.isdigit():
            raise ValueError(f"replica address {address!r} has no port")
    scheme = "ipv4" if all(h.version == 4 for h in hosts) else "ipv6"
    return f"{scheme}:" + ",".join(addresses)


@dataclass
class Shard:
    number: int
    addresses: list[str]
    read: index_pb2_grpc.IndexServiceStub            # round_robin over the replicas
    replicas: list[index_pb2_grpc.IndexServiceStub]  # one per replica, for writes


@dataclass
class Outcome:
    """One shard's answer to a fan-out: a value, or the error that made it missing."""

    shard: Shard
    value: object = None
    error: grpc.RpcError | None = None


class Router(index_pb2_grpc.IndexServiceServicer):
    def __init__(self, config: RouterConfig):
        if config.layout not in ("item", "word"):
            raise ValueError(f"layout {config.layout!r} is not 'item' or 'word'")
        if not config.shards or not all(config.shards):
            raise ValueError("shards must list at least one shard, each with at least one address")
        self.config = config
        options = channel_options(config.max_message_bytes)
        self._channels: list[grpc.Channel] = []

        def stub(target: str, extra: list[tuple[str, object]]) -> index_pb2_grpc.IndexServiceStub:
            channel = grpc.insecure_channel(target, options=options + extra)
            self._channels.append(channel)
            return index_pb2_grpc.IndexServiceStub(channel)

        self.shards = [Shard(i, list(addresses), stub(read_target(addresses), [("grpc.lb_policy_name", "round_robin")]),
                             [stub(a, []) for a in addresses])
                       for i, addresses in enumerate(config.shards)]
        replicas = sum(len(s.addresses) for s in self.shards)
        self._pool = ThreadPoolExecutor(max_workers=max(4, 4 * replicas), thread_name_prefix="router")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for channel in self._channels:
            channel.close()

    def _fan_out(self, calls: list[tuple[Shard, Callable[[], T]]]) -> list[Outcome]:
        """Runs the calls in parallel (each carries its own deadline) and collects every outcome."""
        futures = [(shard, self._pool.submit(call)) for shard, call in calls]
        outcomes = []
        for shard, future in futures:
            try:
                outcomes.append(Outcome(shard, future.result()))
            except grpc.RpcError as exc:
                outcomes.append(Outcome(shard, error=exc))
        return outcomes

    def _word_layout(self, kind: int) -> bool:
        return self.config.layout == "word" and kind == common_pb2.SIGNATURE_KIND_BOW

    # -- writes -----------------------------------------------------------------------------------

    def Add(self, request_iterator: Iterator[index_pb2.AddRequest], context: grpc.ServicerContext
            ) -> index_pb2.AddResponse:
        added = replaced = 0
        requests = iter(request_iterator)
        while batch := list(itertools.islice(requests, self.config.write_batch)):
            problem = None
            for position, request in enumerate(batch):
                try:
                    if not request.item_id or not request.database:
                        raise SignatureError("item_id and database are required")
                    item_value(request)
                except SignatureError as exc:
                    problem = (request.item_id, exc)
                    batch = batch[:position]
                    break
            replaced += self._forward_adds(batch, added, context)
            added += len(batch)
            if problem is not None:  # the items before it are added, and the message says so
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"item #{added} ({problem[0]!r}): {problem[1]}; the {added} items before "
                              "it were added")
        return index_pb2.AddResponse(added=added, replaced=replaced)

    def _forward_adds(self, batch: list[index_pb2.AddRequest], before: int,
                      context: grpc.ServicerContext) -> int:
        """Sends a batch to every replica of the shards that hold its items; returns how many
        items replaced existing ones. Any failure aborts: the caller re-sends from `before`."""
        # Word-layout bag-of-words items go to every shard; the rest to their item's shard.
        everywhere = [r for r in batch if self._word_layout(r.signature.kind)]
        own: dict[int, list[index_pb2.AddRequest]] = {}
        for request in batch:
            if not self._word_layout(request.signature.kind):
                own.setdefault(shard_of(request.item_id, len(self.shards), request.group_id), []).append(request)
        groups = [(shard, everywhere, shard.number == 0) for shard in self.shards if everywhere] + \
                 [(self.shards[number], adds, True) for number, adds in own.items()]
        timeout = timeout_from(context, self.config.default_timeout_s)
        calls, counted = [], []
        for shard, adds, counts in groups:
            for replica, stub in enumerate(shard.replicas):
                calls.append((shard, lambda stub=stub, adds=adds: stub.Add(iter(adds), timeout=timeout)))
                counted.append(counts and replica == 0)
        replaced = 0
        for outcome, counts in zip(self._fan_out(calls), counted):
            if outcome.error is not None:
                self._abort_write(context, outcome, f"the {before} items before this batch were added; "
                                  "re-send from there (an Add of an existing id replaces it)")
            if counts:
                replaced += outcome.value.replaced  # type: ignore[attr-defined]
        return replaced

    def _abort_write(self, context: grpc.ServicerContext, outcome: Outcome, tail: str) -> NoReturn:
        error = outcome.error
        assert error is not None
        where = f"shard {outcome.shard.number} ({', '.join(outcome.shard.addresses)})"
        if error.code() in _CALLER_ERRORS:
            context.abort(error.code(), f"{where}: {error.details()}")
        context.abort(grpc.StatusCode.UNAVAILABLE, f"{where} failed ({error.code().name}): "
                                                   f"{error.details()}; {tail}")
        raise AssertionError("context.abort returns only by raising")

    def Delete(self, request: index_pb2.DeleteRequest, context: grpc.ServicerContext
               ) -> index_pb2.DeleteResponse:
        if not request.database:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "database is required")
        timeout = timeout_from(context, self.config.default_timeout_s)
        # Group deletes go everywhere too: a group lives on one item-range shard, but on every
        # word-range shard, and the router does not know which items a group has.
        calls = [(shard, lambda stub=stub: stub.Delete(request, timeout=timeout))
                 for shard in self.shards for stub in shard.replicas]
        found_ids: set[str] = set()
        found_groups: set[str] = set()
        per_shard: dict[int, int] = {}  # items deleted, from one replica of each shard
        for outcome in self._fan_out(calls):
            if outcome.error is not None and outcome.error.code() == grpc.StatusCode.NOT_FOUND:
                continue
            if outcome.error is not None:
                self._abort_write(context, outcome, "deletes are idempotent: re-send this one")
            response: index_pb2.DeleteResponse = outcome.value  # type: ignore[assignment]
            per_shard.setdefault(outcome.shard.number, response.deleted)
            missing, missing_groups = set(response.not_found), set(response.groups_not_found)
            found_ids.update(i for i in request.item_ids if i not in missing)
            found_groups.update(g for g in request.group_ids if g not in missing_groups)
        if not per_shard:
            context.abort(grpc.StatusCode.NOT_FOUND, f"database {request.database!r} does not exist on any shard")
        if not request.group_ids:
            deleted = len(found_ids)  # by id alone the router knows exactly which ones went
        elif self.config.layout == "word" and self._kind(request.database, timeout) in (
                common_pb2.SIGNATURE_KIND_BOW, common_pb2.SIGNATURE_KIND_UNSPECIFIED):
            # Every shard held (and deleted) the same bag-of-words items; a kind no shard could
            # tell counts the same way, so the count never exceeds what went.
            deleted = max(per_shard.values())
        else:
            deleted = sum(per_shard.values())  # each item on one shard (its group's)
        return index_pb2.DeleteResponse(
            deleted=deleted, not_found=[i for i in dict.fromkeys(request.item_ids) if i not in found_ids],
            groups_not_found=[g for g in dict.fromkeys(request.group_ids) if g not in found_groups])

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

    def _top_k(self, requested: int, context: grpc.ServicerContext) -> int:
        top_k = requested or 10
        if top_k > self.config.max_top_k:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"top_k {top_k} is above the router's limit of {self.config.max_top_k}")
        return top_k

    def _value(self, signature: common_pb2.Signature, context: grpc.ServicerContext, prefix: str = "") -> Value:
        try:
            return signature_value(signature)
        except SignatureError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, prefix + str(exc))
        raise AssertionError("context.abort returns only by raising")

    def _flag(self, response: index_pb2.SearchResponse | index_pb2.SearchBatchResponse, missing: list[Outcome],
              database: str, kind: int, vocabulary: int) -> None:
        """Sets the degraded flags (the same fields in both responses) for the shards missing."""
        if not missing:
            return
        response.degraded = True
        response.degraded_reason = "; ".join(
            f"shard {o.shard.number} ({', '.join(o.shard.addresses)}): {o.error.code().name} "  # type: ignore[union-attr]
            f"{o.error.details()}" for o in missing)  # type: ignore[union-attr]
        if self._word_layout(kind):
            for o in missing:
                lo, hi = word_range_of(o.shard.number, len(self.shards), vocabulary)
                response.missing_word_ranges.add(first=lo, end=hi)
        else:
            response.missing_shards.extend(o.shard.number for o in missing)
        log.warning("degraded search in %s: %s", database, response.degraded_reason)

    def Search(self, request: index_pb2.SearchRequest, context: grpc.ServicerContext
               ) -> Iterator[index_pb2.SearchResponse]:
        top_k = self._top_k(request.top_k, context)
        if not request.database:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "database is required")
        value = self._value(request.signature, context)
        timeout = timeout_from(context, self.config.default_timeout_s, self.config.reply_reserve_s)
        if self._word_layout(request.signature.kind):
            assert isinstance(value, BagOfWords)
            hits, missing = self._search_words(request.database, request.signature, value, top_k,
                                               request.one_per_group, timeout, context)
        else:
            results, missing = self._search_items(request.database, [request.signature], top_k,
                                                  request.one_per_group, timeout, context)
            hits = results[0]
        first = index_pb2.SearchResponse()
        self._flag(first, missing, request.database, request.signature.kind, getattr(value, "vocabulary", 0))
        chunks = [hits[i:i + self.config.chunk_size] for i in range(0, len(hits), self.config.chunk_size)] or [[]]
        for number, chunk in enumerate(chunks):
            response = first if number == 0 else index_pb2.SearchResponse()
            response.items.extend(scored_item(h) for h in chunk)
            yield response

    def SearchBatch(self, request: index_pb2.SearchBatchRequest, context: grpc.ServicerContext
                    ) -> index_pb2.SearchBatchResponse:
        top_k = self._top_k(request.top_k, context)
        if not request.database:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "database is required")
        if not request.signatures:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "signatures is empty: send at least one query")
        if len(request.signatures) > self.config.max_batch:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{len(request.signatures)} queries are above the router's batch limit of "
                          f"{self.config.max_batch}: split the batch")
        several = len(request.signatures) > 1
        values = [self._value(s, context, f"signature #{i}: " if several else "")
                  for i, s in enumerate(request.signatures)]
        kinds = {s.kind for s in request.signatures}
        if len(kinds) > 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "the signatures of a batch are of several kinds: every query must be of the database's kind")
        kind = request.signatures[0].kind
        response = index_pb2.SearchBatchResponse()
        if self._word_layout(kind):
            # Per query (partial scores are per query); each gets what is left of the caller's time.
            deadline = time.monotonic() + timeout_from(context, self.config.default_timeout_s,
                                                       self.config.reply_reserve_s)
            missed: dict[int, Outcome] = {}
            for signature, bag in zip(request.signatures, values):
                assert isinstance(bag, BagOfWords)
                hits, missing = self._search_words(request.database, signature, bag, top_k, request.one_per_group,
                                                   max(deadline - time.monotonic(), 0.001), context)
                response.results.add().items.extend(scored_item(h) for h in hits)
                missed.update((o.shard.number, o) for o in missing)
            self._flag(response, [missed[n] for n in sorted(missed)], request.database, kind,
                       values[0].vocabulary)  # type: ignore[union-attr]
            return response
        timeout = timeout_from(context, self.config.default_timeout_s, self.config.reply_reserve_s)
        results, missing = self._search_items(request.database, list(request.signatures), top_k,
                                              request.one_per_group, timeout, context)
        for hits in results:
            response.results.add().items.extend(scored_item(h) for h in hits)
        self._flag(response, missing, request.database, kind, 0)
        return response

    def _answered(self, outcomes: list[Outcome], request_database: str, context: grpc.ServicerContext
                  ) -> tuple[list[Outcome], list[Outcome]]:
        """Splits outcomes into answers and missing shards; the caller's own errors abort, and a
        database that no answering shard has is NOT_FOUND."""
        answered, missing, absent = [], [], 0
        for outcome in outcomes:
            if outcome.error is None:
                answered.append(outcome)
            elif outcome.error.code() in _CALLER_ERRORS:
                context.abort(outcome.error.code(), outcome.error.details())
            elif outcome.error.code() == grpc.StatusCode.NOT_FOUND:
                absent += 1
            else:
                missing.append(outcome)
        if not answered and not missing:
            context.abort(grpc.StatusCode.NOT_FOUND, f"database {request_database!r} does not exist on any shard "
                                                     "(a database is created by its first Add)")
        if not answered and absent == 0:
            context.abort(grpc.StatusCode.UNAVAILABLE, "no shard answered: " + "; ".join(
                f"shard {o.shard.number}: {o.error.code().name} {o.error.details()}" for o in missing))  # type: ignore[union-attr]
        return answered, missing

    def _search_items(self, database: str, signatures: list[common_pb2.Signature], top_k: int,
                      one_per_group: bool, timeout: float, context: grpc.ServicerContext
                      ) -> tuple[list[list[Hit]], list[Outcome]]:
        """Per query, the merged top k of every shard's top k (with one_per_group: top k groups);
        one Search (one query) or one SearchBatch (several) per shard."""
        def search(shard: Shard) -> list[list[Hit]]:
            if len(signatures) == 1:
                return [[hit_of(i) for chunk in shard.read.Search(index_pb2.SearchRequest(
                    database=database, signature=signatures[0], top_k=top_k, one_per_group=one_per_group),
                    timeout=timeout) for i in chunk.items]]
            response = shard.read.SearchBatch(index_pb2.SearchBatchRequest(
                database=database, signatures=signatures, top_k=top_k, one_per_group=one_per_group), timeout=timeout)
            return [[hit_of(i) for i in hits.items] for hits in response.results]

        answered, missing = self._answered(self._fan_out([(s, lambda s=s: search(s)) for s in self.shards]),
                                           database, context)
        return [merge_top_k([o.value[query] for o in answered], top_k, one_per_group)  # type: ignore[index]
                for query in range(len(signatures))], missing

    def _search_words(self, database: str, signature: common_pb2.Signature, bag: BagOfWords, top_k: int,
                      one_per_group: bool, timeout: float, context: grpc.ServicerContext
                      ) -> tuple[list[Hit], list[Outcome]]:
        partial = index_pb2.PartialScoresRequest(database=database, signature=signature, with_groups=one_per_group)

        def scores(shard: Shard) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            keys, sums, groups = [], [], []
            for number, chunk in enumerate(shard.read.PartialScores(partial, timeout=timeout)):
                if number == 0:
                    expected = word_range_of(shard.number, len(self.shards), bag.vocabulary)
                    if (chunk.word_range.first, chunk.word_range.end) != expected:
                        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                      f"shard {shard.number} holds words [{chunk.word_range.first}, "
                                      f"{chunk.word_range.end}) but the router expects {list(expected)}: "
                                      "list the shards in word_shard_index order, with word_shard_count "
                                      f"{len(self.shards)}")
                keys.append(np.frombuffer(chunk.keys, "<u8"))
                sums.append(np.frombuffer(chunk.sums, "<f4"))
                groups.append(np.frombuffer(chunk.groups, "<u8"))
                if one_per_group and len(groups[-1]) != len(keys[-1]):
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"shard {shard.number} sent no group keys: it predates one_per_group "
                                  "searches; upgrade it")
            return np.concatenate(keys), np.concatenate(sums), np.concatenate(groups)

        # Only the shards holding some of the query's words have anything to add (with a large
        # vocabulary and few words per query, that is the word layout's saving).
        ranges = [word_range_of(s.number, len(self.shards), bag.vocabulary) for s in self.shards]
        needed = [s for s, (lo, hi) in zip(self.shards, ranges) if np.any((bag.words >= lo) & (bag.words < hi))]
        answered, missing = self._answered(self._fan_out([(s, lambda s=s: scores(s)) for s in needed]),
                                           database, context)
        values: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [o.value for o in answered]  # type: ignore[misc]
        if one_per_group:
            keys, totals, groups = sum_partials([v[0] for v in values], [v[1] for v in values],
                                                [v[2] for v in values])
            # Each group's best item(s) first, then the top k groups: the lookup names only those.
            best = best_of_groups(totals, groups, top_k)
        else:
            keys, totals = sum_partials([v[0] for v in values], [v[1] for v in values])
            best = top_with_ties(totals, top_k)
        found = self._lookup(database, keys[best], answered, timeout, context)
        hits = [dataclasses.replace(found[int(k)], score=float(t) / 2.0)
                for k, t in zip(keys[best], totals[best]) if int(k) in found]
        return merge_top_k([hits], top_k, one_per_group), missing

    def _lookup(self, database: str, keys: np.ndarray, answered: list[Outcome], timeout: float,
                context: grpc.ServicerContext) -> dict[int, Hit]:
        """Ids, metadata, groups and boxes of the winning keys (as Hits scoring 0), from the first
        answering shard that gives them (every word-range shard holds every item)."""
        if len(keys) == 0:
            return {}
        request = index_pb2.LookupRequest(database=database, keys=keys.tolist())
        errors = []
        for outcome in answered:
            try:
                response = outcome.shard.read.Lookup(request, timeout=timeout)
                return {i.key: hit_of(i, 0.0) for i in response.items}
            except grpc.RpcError as exc:
                errors.append(f"shard {outcome.shard.number}: {exc.code().name} {exc.details()}")
        context.abort(grpc.StatusCode.UNAVAILABLE, "no shard could name the results: " + "; ".join(errors))
        raise AssertionError("context.abort returns only by raising")

    def PartialScores(self, request: index_pb2.PartialScoresRequest, context: grpc.ServicerContext
                      ) -> Iterator[index_pb2.PartialScoresResponse]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "PartialScores is a shard's RPC: a router's Search already merges them")

    def Lookup(self, request: index_pb2.LookupRequest, context: grpc.ServicerContext
               ) -> index_pb2.LookupResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Lookup is a shard's RPC: a router's Search already names items")

    def Stats(self, request: index_pb2.StatsRequest, context: grpc.ServicerContext
              ) -> index_pb2.StatsResponse:
        timeout = timeout_from(context, self.config.default_timeout_s)
        outcomes = self._fan_out([(s, lambda s=s: s.read.Stats(request, timeout=timeout)) for s in self.shards])
        merged: dict[str, index_pb2.DatabaseStats] = {}
        for outcome in outcomes:
            if outcome.error is not None:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"shard {outcome.shard.number} "
                              f"({', '.join(outcome.shard.addresses)}): {outcome.error.details()}")
            for database in outcome.value.databases:  # type: ignore[attr-defined]
                held = merged.setdefault(database.name, index_pb2.DatabaseStats(
                    name=database.name, kind=database.kind, dimension=database.dimension))
                # Word layout: every shard holds every bag-of-words item.
                held.items = max(held.items, database.items) if self._word_layout(database.kind) \
                    else held.items + database.items
        return index_pb2.StatsResponse(databases=[merged[name] for name in sorted(merged)])
