"""Products' attributes, filters and management on a real shard over loopback: attributes set at
Add and by UpdateGroups come back with hits and survive restarts, filters select exactly (the full
top k among the passing items, whatever their share), Delete by `where`, ListGroups paging, and
thumbnails stored on disk with their items."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from common.bow_codec import BagOfWords
from common.config import load_config
from common.proto_convert import dense_to_proto
from common.status import details_of
from index_server import log_codec
from index_server.catalogue import Catalogue
from index_server.config import IndexConfig
from index_server.convert import filter_to_proto
from index_server.domain import Deletion, Filter, Item, LabelClause, ProductAttributes, Update, item_key
from index_server.replication import WriteTracker, receive_copy, replication_stream
from index_server.server import create_bundle
from index_server.store import ShardStore
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.index_server.helpers import add_request, bow, bow_scores, dense_scores, random_bags

VOCABULARY = 500


class Shard:
    """A shard server in this process (data_dir "" = in memory), and a stub to it."""

    def __init__(self, data_dir: Path | str = "", **config: Any):
        self.bundle = create_bundle(
            load_config(IndexConfig, "index", environ={}, port=0, data_dir=str(data_dir), **config)
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.bundle.port}")
        self.stub = index_pb2_grpc.IndexServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.bundle.server.stop(None)
        if self.bundle.on_stop is not None:
            self.bundle.on_stop()  # closes the catalogue: a snapshot


@pytest.fixture()
def shard():
    running = Shard()
    yield running
    running.close()


def attributes(path: str = "", tags: tuple[str, ...] = (), **labels: str) -> common_pb2.ProductAttributes:
    return common_pb2.ProductAttributes(path=path, tags=tags, labels=labels)


def with_attributes(
    request: index_pb2.AddRequest, message: common_pb2.ProductAttributes | None = None, thumbnail: bytes = b""
):
    if message is not None:
        request.attributes.CopyFrom(message)
    request.thumbnail = thumbnail
    return request


def search(stub, database: str, bag: BagOfWords, top_k: int = 10, one_per_group: bool = False, filter=None):
    request = index_pb2.SearchRequest(database=database, signature=bow(bag), top_k=top_k, one_per_group=one_per_group)
    if filter is not None:
        request.filter.CopyFrom(filter if isinstance(filter, common_pb2.Filter) else filter_to_proto(filter))
    return [i for chunk in stub.Search(request, timeout=10) for i in chunk.items]


def as_domain(message: common_pb2.ProductAttributes) -> ProductAttributes:
    return ProductAttributes(message.path, frozenset(message.tags), dict(message.labels))


# -- attributes with hits, UpdateGroups -----------------------------------------------------------


def test_attributes_set_at_add_come_back_with_hits_and_lookups(shard):
    rng = np.random.default_rng(1)
    bags = random_bags(rng, 3, VOCABULARY)
    shard.stub.Add(
        iter(
            [
                with_attributes(
                    add_request("shirt-1", "tops", bags[0], "shirt"),
                    attributes("fashion/tops/shirt", ("striped", "cotton"), brand="acme"),
                ),
                add_request("shirt-2", "tops", bags[1], "shirt"),  # unset: the group keeps them
                add_request("plain", "tops", bags[2]),  # no attributes at all
            ]
        ),
        timeout=10,
    )
    hits = {h.item_id: h for h in search(shard.stub, "tops", bags[0], 10)}
    for item_id in ("shirt-1", "shirt-2"):
        assert as_domain(hits[item_id].attributes) == ProductAttributes(
            "fashion/tops/shirt", frozenset({"striped", "cotton"}), {"brand": "acme"}
        )
    assert not hits["plain"].HasField("attributes")
    # A later Add with attributes replaces the group's (every item of the group shares them).
    shard.stub.Add(
        iter(
            [
                with_attributes(
                    add_request("shirt-3", "tops", bags[2], "shirt"), attributes("fashion/tops", brand="zeta")
                )
            ]
        ),
        timeout=10,
    )
    hits = {h.item_id: h for h in search(shard.stub, "tops", bags[0], 10)}
    assert all(hits[i].attributes.labels["brand"] == "zeta" for i in ("shirt-1", "shirt-2", "shirt-3"))


def test_update_groups_is_visible_at_once_and_reports_unknown_groups(shard):
    rng = np.random.default_rng(2)
    bags = random_bags(rng, 4, VOCABULARY)
    shard.stub.Add(iter([add_request(f"i{n}", "db", bag, f"g{n % 2}") for n, bag in enumerate(bags)]), timeout=10)
    response = shard.stub.UpdateGroups(
        index_pb2.UpdateGroupsRequest(
            database="db",
            groups=[
                index_pb2.GroupAttributes(group_id="g0", attributes=attributes("a/b", ("new",), colour="red")),
                index_pb2.GroupAttributes(group_id="nobody", attributes=attributes("x")),
            ],
        ),
        timeout=10,
    )
    assert response.updated == 1 and list(response.not_found) == ["nobody"]
    only_red = filter_to_proto(Filter(labels=(LabelClause("colour", frozenset({"red"})),)))
    hits = search(shard.stub, "db", bags[1], 10, filter=only_red)
    assert sorted(h.item_id for h in hits) == ["i0", "i2"]
    assert all(h.attributes.path == "a/b" for h in hits)
    # "nobody" was not created: a filter on its attributes finds nothing, ListGroups does not list it.
    listed = shard.stub.ListGroups(index_pb2.ListGroupsRequest(database="db"), timeout=10)
    assert [g.group_id for g in listed.groups] == ["g0", "g1"] and listed.total == 2
    with pytest.raises(grpc.RpcError) as error:
        shard.stub.UpdateGroups(index_pb2.UpdateGroupsRequest(database="absent", groups=[]), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_attributes_survive_a_restart_from_the_log_and_from_a_snapshot(tmp_path):
    rng = np.random.default_rng(3)
    bags = random_bags(rng, 6, VOCABULARY)
    running = Shard(tmp_path / "shard")
    stub = running.stub
    stub.Add(
        iter(
            [
                with_attributes(
                    add_request(f"i{n}", "db", bag, f"g{n % 3}"), attributes(f"p/{n % 3}", brand=f"b{n % 3}")
                )
                for n, bag in enumerate(bags)
            ]
        ),
        timeout=10,
    )
    stub.UpdateGroups(
        index_pb2.UpdateGroupsRequest(
            database="db", groups=[index_pb2.GroupAttributes(group_id="g1", attributes=attributes("q", ("late",)))]
        ),
        timeout=10,
    )
    stub.Delete(index_pb2.DeleteRequest(database="db", group_ids=["g2"]), timeout=10)

    def check(stub) -> None:
        hits = {h.item_id: h for h in search(stub, "db", bags[0], 20)}
        assert sorted(hits) == ["i0", "i1", "i3", "i4"]
        assert as_domain(hits["i0"].attributes) == ProductAttributes("p/0", labels={"brand": "b0"})
        assert as_domain(hits["i4"].attributes) == ProductAttributes("q", frozenset({"late"}))

    check(stub)
    running.close()  # with a snapshot
    running = Shard(tmp_path / "shard")
    check(running.stub)
    running.close()


@pytest.mark.parametrize("snapshot_every", [1, 100_000])
def test_updates_and_where_deletes_replay_from_the_log_as_they_were_applied(tmp_path, snapshot_every):
    """Reopened without a snapshot at close (kill -9): the log alone, or a snapshot after each
    write, gives back the same attributes; a Delete by where replays as the groups it matched,
    even when a later update makes other groups match it."""
    rng = np.random.default_rng(11)
    bags = random_bags(rng, 8, VOCABULARY)
    catalogue = Catalogue(store=ShardStore(tmp_path, 1 << 30), snapshot_every=snapshot_every)
    catalogue.add(
        [Item("db", f"i{n}", bag, {}, f"g{n % 4}", None, ProductAttributes(f"p{n % 4}")) for n, bag in enumerate(bags)]
    )
    assert catalogue.delete("db", [], [], Filter(path_prefix="p0")).groups_deleted == ["g0"]
    assert catalogue.update("db", {"g1": ProductAttributes("p0", frozenset({"now"})), "g0": ProductAttributes()}) == (
        1,
        ["g0"],
    )
    catalogue.close(snapshot=False)
    reopened = Catalogue(store=ShardStore(tmp_path, 1 << 30))
    _, database = reopened.get("db")
    assert sorted(database.group_names()) == ["g1", "g2", "g3"]
    assert database.attributes_of_group("g1") == ProductAttributes("p0", frozenset({"now"}))
    assert database.attributes_of_group("g2") == ProductAttributes("p2")
    reopened.close()


# -- filters --------------------------------------------------------------------------------------


def test_a_filter_keeping_one_percent_still_returns_the_full_top_k(shard):
    """3000 items in 1500 groups, 100 brands: a brand keeps 1%; the top k among its items is the
    brute-force top k over them, for Search, SearchBatch and grouped search."""
    rng = np.random.default_rng(4)
    bags = {f"i{n}": bag for n, bag in enumerate(random_bags(rng, 3000, VOCABULARY))}
    group_of = {item_id: f"g{n // 2}" for n, item_id in enumerate(bags)}
    brand_of = {f"g{g}": f"b{g % 100}" for g in range(1500)}
    requests = []
    for item_id, bag in bags.items():
        group = group_of[item_id]
        requests.append(with_attributes(add_request(item_id, "big", bag, group), attributes(brand=brand_of[group])))
    for start in range(0, len(requests), 1000):
        shard.stub.Add(iter(requests[start : start + 1000]), timeout=30)
    brand = Filter(labels=(LabelClause("brand", frozenset({"b7"})),))
    passing = {i: b for i, b in bags.items() if brand_of[group_of[i]] == "b7"}
    assert len(passing) == 30
    queries = random_bags(rng, 3, VOCABULARY)
    for query in queries:
        expected = sorted(bow_scores(query, passing).items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        hits = search(shard.stub, "big", query, 10, filter=brand)
        assert [h.item_id for h in hits] == [i for i, _ in expected]
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-5)
        grouped = search(shard.stub, "big", query, 10, one_per_group=True, filter=brand)
        best_of: dict[str, tuple[float, str]] = {}
        for item_id, score in bow_scores(query, passing).items():
            group = group_of[item_id]
            if group not in best_of or (-score, item_id) < (-best_of[group][0], best_of[group][1]):
                best_of[group] = (score, item_id)
        expected_groups = sorted(best_of.values(), key=lambda si: (-si[0], si[1]))[:10]
        assert [h.item_id for h in grouped] == [i for _, i in expected_groups]
    batch = shard.stub.SearchBatch(
        index_pb2.SearchBatchRequest(
            database="big", signatures=[bow(q) for q in queries], top_k=10, filter=filter_to_proto(brand)
        ),
        timeout=10,
    )
    for query, result in zip(queries, batch.results, strict=True):
        assert [h.item_id for h in result.items] == [
            h.item_id for h in search(shard.stub, "big", query, 10, filter=brand)
        ]
    # Partial scores (a word-range router's path) keep only the passing items too.
    chunks = list(
        shard.stub.PartialScores(
            index_pb2.PartialScoresRequest(database="big", signature=bow(queries[0]), filter=filter_to_proto(brand)),
            timeout=10,
        )
    )
    keys = np.concatenate([np.frombuffer(c.keys, "<u8") for c in chunks])
    assert set(keys.tolist()) == {item_key(i) for i in bow_scores(queries[0], passing)}


PATHS = ["", "fashion", "fashion/tops", "fashion/tops/shirt", "fashion/topshop", "home/kitchen"]
TAGS = ["striped", "cotton", "red", "sale"]
LABELS = {"brand": ["acme", "zeta", "nova"], "colour": ["red", "blue"]}


def test_every_kind_of_filter_selects_exactly_the_groups_it_describes(shard):
    """One item per group, every item the same bag (all score alike): a search with a large top k
    returns exactly the groups the filter passes, as Filter.matches says one group at a time."""
    rng = random.Random(5)
    bag = BagOfWords.from_words(np.array([1, 2, 3]), VOCABULARY, 1)
    groups: dict[str, ProductAttributes] = {}
    requests = []
    for n in range(120):
        labels = {key: rng.choice(values) for key, values in LABELS.items() if rng.random() < 0.7}
        a = ProductAttributes(rng.choice(PATHS), frozenset(t for t in TAGS if rng.random() < 0.4), labels)
        groups[f"g{n}"] = a
        requests.append(
            with_attributes(add_request(f"i{n}", "f", bag, f"g{n}"), attributes(a.path, tuple(a.tags), **a.labels))
        )
    shard.stub.Add(iter(requests), timeout=10)
    acme, red = LabelClause("brand", frozenset({"acme"})), LabelClause("colour", frozenset({"red"}))
    filters = [
        Filter(labels=(acme,)),  # equality
        Filter(labels=(LabelClause("brand", frozenset({"acme", "zeta"})),)),  # set membership
        Filter(labels=(LabelClause("brand", frozenset({"acme"}), negate=True),)),  # negate: also those without
        Filter(labels=(LabelClause("colour"),)),  # has the label
        Filter(labels=(LabelClause("colour", negate=True),)),  # has it not
        Filter(labels=(acme, red)),  # AND over clauses
        Filter(all_tags=frozenset({"striped", "cotton"})),
        Filter(any_tags=frozenset({"red", "sale"})),
        Filter(path_prefix="fashion/tops"),  # not fashion/topshop
        Filter(path_prefix="fashion"),
        Filter(any_of=(Filter(labels=(acme,)), Filter(path_prefix="home"))),  # OR
        Filter(  # (a AND (b OR c)) nested
            any_tags=frozenset({"cotton"}),
            any_of=(
                Filter(labels=(red,)),
                Filter(any_of=(Filter(path_prefix="fashion/tops/shirt"), Filter(all_tags=frozenset({"sale"})))),
            ),
        ),
    ]
    for f in filters:
        hits = search(shard.stub, "f", bag, 1000, filter=f)
        assert sorted(h.group_id for h in hits) == sorted(g for g, a in groups.items() if f.matches(a)), f
        for hit in hits:
            assert as_domain(hit.attributes) == groups[hit.group_id]
    assert len(search(shard.stub, "f", bag, 1000, filter=common_pb2.Filter())) == 120  # empty: everything


@pytest.mark.parametrize(
    "message, field",
    [
        (common_pb2.Filter(labels=[common_pb2.LabelClause(key="")]), "filter.labels[0].key"),
        (
            common_pb2.Filter(
                any_of=[common_pb2.Filter(), common_pb2.Filter(labels=[common_pb2.LabelClause(key="a b")])]
            ),
            None,  # valid: a single inner space is allowed
        ),
        (
            common_pb2.Filter(
                any_of=[common_pb2.Filter(), common_pb2.Filter(labels=[common_pb2.LabelClause(key="a\tb")])]
            ),
            "filter.any_of[1].labels[0].key",
        ),
        (common_pb2.Filter(path_prefix="fashion//tops"), "filter.path_prefix"),
        (common_pb2.Filter(path_prefix="/fashion"), "filter.path_prefix"),
        (common_pb2.Filter(all_tags=["ok", "x" * 129]), "filter.all_tags[1]"),
        (common_pb2.Filter(labels=[common_pb2.LabelClause(key="k", values=["v", ""])]), "filter.labels[0].values[1]"),
        (common_pb2.Filter(any_tags=[f"t{n}" for n in range(257)]), "filter"),
    ],
)
def test_bad_filters_are_invalid_argument_naming_the_field(shard, message, field):
    bag = BagOfWords.from_words(np.array([1, 2]), VOCABULARY, 1)
    shard.stub.Add(iter([add_request("x", "db", bag)]), timeout=10)
    if field is None:
        search(shard.stub, "db", bag, filter=message)
        return
    with pytest.raises(grpc.RpcError) as error:
        search(shard.stub, "db", bag, filter=message)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(field), error.value.details()
    violations = [f for f, _ in details_of(error.value).violations]
    assert violations == [field]


def test_filters_nested_too_deep_are_refused(shard):
    bag = BagOfWords.from_words(np.array([1, 2]), VOCABULARY, 1)
    shard.stub.Add(iter([add_request("x", "db", bag)]), timeout=10)
    deep = common_pb2.Filter(path_prefix="a")
    for _ in range(4):
        deep = common_pb2.Filter(any_of=[deep])
    search(shard.stub, "db", bag, filter=deep)  # 4 levels of any_of: the limit
    with pytest.raises(grpc.RpcError) as error:
        search(shard.stub, "db", bag, filter=common_pb2.Filter(any_of=[deep]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filter.any_of[0].any_of[0].any_of[0].any_of[0].any_of" in error.value.details()


def test_bad_attributes_at_add_and_update_name_the_field(shard):
    bag = BagOfWords.from_words(np.array([1, 2]), VOCABULARY, 1)
    for message, field in [
        (attributes("a//b"), "item #0 ('x'): attributes.path"),
        (attributes("ok", ("fine", "two  spaces")), "item #0 ('x'): attributes.tags[1]"),
        (attributes("x" * 257), "item #0 ('x'): attributes.path"),
        (common_pb2.ProductAttributes(tags=[f"t{n}" for n in range(65)]), "item #0 ('x'): attributes.tags"),
    ]:
        with pytest.raises(grpc.RpcError) as error:
            shard.stub.Add(iter([with_attributes(add_request("x", "db", bag), message)]), timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith(field), error.value.details()
    shard.stub.Add(iter([add_request("x", "db", bag)]), timeout=10)
    with pytest.raises(grpc.RpcError) as error:
        shard.stub.UpdateGroups(
            index_pb2.UpdateGroupsRequest(
                database="db",
                groups=[
                    index_pb2.GroupAttributes(group_id="x", attributes=common_pb2.ProductAttributes(labels={"k": ""}))
                ],
            ),
            timeout=10,
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("groups[0].attributes.labels['k']"), error.value.details()


# -- Delete where, ListGroups -----------------------------------------------------------------------


def test_delete_where_deletes_every_item_of_the_matching_groups(shard):
    rng = np.random.default_rng(6)
    bags = random_bags(rng, 12, VOCABULARY)
    shard.stub.Add(
        iter(
            [
                with_attributes(
                    add_request(f"i{n}", "db", bag, f"g{n % 4}"),
                    attributes("old" if n % 4 < 2 else "new"),
                    thumbnail=b"jpeg" + bytes([n]),
                )
                for n, bag in enumerate(bags)
            ]
        ),
        timeout=10,
    )
    response = shard.stub.Delete(
        index_pb2.DeleteRequest(database="db", where=common_pb2.Filter(path_prefix="old"), item_ids=["i2", "zz"]),
        timeout=10,
    )
    assert (
        list(response.groups_deleted) == ["g0", "g1"] and response.deleted == 7 and list(response.not_found) == ["zz"]
    )
    listed = shard.stub.ListGroups(index_pb2.ListGroupsRequest(database="db"), timeout=10).groups
    left = sorted(i.item_id for g in listed for i in g.items)
    assert left == sorted(f"i{n}" for n in range(12) if n % 4 >= 2 and n != 2)
    images = shard.stub.GetItemImages(index_pb2.GetItemImagesRequest(database="db", item_ids=["i0", "i3", "i2"]))
    assert [(i.item_id, i.thumbnail) for i in images.images] == [("i3", b"jpeg\x03")]
    # An empty `where` passes every group: it empties the database.
    response = shard.stub.Delete(index_pb2.DeleteRequest(database="db", where=common_pb2.Filter()), timeout=10)
    assert list(response.groups_deleted) == ["g2", "g3"] and response.deleted == 5
    assert search(shard.stub, "db", bags[0], 100) == []
    assert not shard.stub.ListGroups(index_pb2.ListGroupsRequest(database="db"), timeout=10).groups


def test_list_groups_pages_without_gap_or_duplicate(shard):
    rng = np.random.default_rng(7)
    bags = random_bags(rng, 250, VOCABULARY)
    shard.stub.Add(
        iter(
            [
                with_attributes(
                    add_request(f"i{n:03d}", "db", bag, f"g{n % 97:02d}", None, n=str(n)),
                    attributes(tags=("even",) if n % 97 % 2 == 0 else ("odd",)),
                )
                for n, bag in enumerate(bags)
            ]
        ),
        timeout=10,
    )

    def pages(**request: Any) -> tuple[list[index_pb2.GroupInfo], list[int]]:
        seen, totals, token = [], [], ""
        while True:
            page = shard.stub.ListGroups(
                index_pb2.ListGroupsRequest(database="db", page_token=token, **request), timeout=10
            )
            seen += list(page.groups)
            totals.append(page.total)
            token = page.next_page_token
            if not token:
                return seen, totals

    listed, totals = pages(page_size=10)
    assert [g.group_id for g in listed] == sorted(f"g{n:02d}" for n in range(97)) and set(totals) == {97}
    assert len(totals) == 10
    g05 = next(g for g in listed if g.group_id == "g05")
    assert [i.item_id for i in g05.items] == ["i005", "i102", "i199"] and g05.items[1].metadata["n"] == "102"
    assert list(g05.attributes.tags) == ["odd"]
    even, totals = pages(page_size=7, filter=common_pb2.Filter(all_tags=["even"]))
    assert [g.group_id for g in even] == sorted(f"g{n:02d}" for n in range(0, 97, 2)) and set(totals) == {49}
    chosen, totals = pages(group_ids=["g50", "g01", "nope", "g02"], filter=common_pb2.Filter(all_tags=["even"]))
    assert [g.group_id for g in chosen] == ["g02", "g50"] and totals == [2]
    default = shard.stub.ListGroups(index_pb2.ListGroupsRequest(database="db"), timeout=10)
    assert len(default.groups) == 97 and not default.next_page_token
    for request, code in [
        (index_pb2.ListGroupsRequest(database="db", page_size=1001), grpc.StatusCode.INVALID_ARGUMENT),
        (index_pb2.ListGroupsRequest(database="db", page_token="%%%"), grpc.StatusCode.INVALID_ARGUMENT),
        (index_pb2.ListGroupsRequest(database="absent"), grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.RpcError) as error:
            shard.stub.ListGroups(request, timeout=10)
        assert error.value.code() == code


def test_stats_count_groups_and_say_how_the_database_is_searched(shard):
    rng = np.random.default_rng(8)
    shard.stub.Add(
        iter([add_request(f"i{n}", "db", bag, f"g{n % 3}") for n, bag in enumerate(random_bags(rng, 9, VOCABULARY))]),
        timeout=10,
    )
    (stats,) = shard.stub.Stats(index_pb2.StatsRequest(), timeout=10).databases
    assert (stats.items, stats.groups, stats.index_type) == (9, 3, "inverted") and stats.memory_bytes > 0


# -- thumbnails -----------------------------------------------------------------------------------


def test_thumbnails_are_stored_returned_replaced_deleted_and_survive_a_snapshot(tmp_path):
    rng = np.random.default_rng(9)
    bags = random_bags(rng, 5, VOCABULARY)
    running = Shard(tmp_path / "shard", snapshot_every=3)
    stub = running.stub
    stub.Add(
        iter(
            [
                with_attributes(
                    add_request(f"i{n}", "db", bag, "g" if n < 2 else ""), thumbnail=f"img{n}".encode() * 100
                )
                for n, bag in enumerate(bags)
            ]
        ),
        timeout=10,
    )

    def images(stub, *ids: str) -> dict[str, bytes]:
        answer = stub.GetItemImages(index_pb2.GetItemImagesRequest(database="db", item_ids=list(ids)), timeout=10)
        return {i.item_id: i.thumbnail for i in answer.images}

    assert images(stub, "i0", "i4", "nope") == {"i0": b"img0" * 100, "i4": b"img4" * 100}
    stub.Add(iter([add_request("i4", "db", bags[4])]), timeout=10)  # replaced without one: gone
    stub.Delete(index_pb2.DeleteRequest(database="db", group_ids=["g"]), timeout=10)  # i0, i1
    assert images(stub, "i0", "i1", "i2", "i4") == {"i2": b"img2" * 100, "i4": b""}
    running.close()  # a snapshot, which truncates the log: the thumbnails are kept
    running = Shard(tmp_path / "shard")
    assert images(running.stub, "i2", "i3", "i4") == {"i2": b"img2" * 100, "i3": b"img3" * 100, "i4": b""}
    with pytest.raises(grpc.RpcError) as error:
        running.stub.Add(
            iter([with_attributes(add_request("big", "db", bags[0]), thumbnail=b"x" * (64 * 1024 + 1))]), timeout=10
        )
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    running.close()


def test_a_replica_copy_carries_thumbnails_attributes_and_where_deletes(tmp_path):
    """A fellow replica's copy (index_server.replication) brings the thumbnails with the state, and
    the writes logged after it (an UpdateGroups, a Delete by where) apply to it as to the source."""
    rng = np.random.default_rng(10)
    bags = random_bags(rng, 6, VOCABULARY)
    source = Catalogue(store=ShardStore(tmp_path / "source", 1 << 30))
    source.add(
        [
            Item("db", f"i{n}", bag, {}, f"g{n % 3}", None, ProductAttributes(f"p{n % 3}"), f"t{n}".encode())
            for n, bag in enumerate(bags)
        ]
    )
    stream = replication_stream(source, WriteTracker(), 0.0, 1 << 20, 1.0)
    first = next(stream)  # the state is taken: what follows is the tail
    source.update("db", {"g1": ProductAttributes("moved")})
    source.delete("db", [], [], Filter(path_prefix="p2"))
    replica = Catalogue(store=ShardStore(tmp_path / "replica", 1 << 30))
    replica.begin_deferral()
    states, records = receive_copy(iter([first, *stream]))
    replica.install(states, records)
    assert [i for i, _ in replica.thumbnails("db", [f"i{n}" for n in range(6)])] == ["i0", "i1", "i3", "i4"]
    assert dict(replica.thumbnails("db", ["i0", "i4"])) == {"i0": b"t0", "i4": b"t4"}
    _, database = replica.get("db")
    assert database.attributes_of_group("g1") == ProductAttributes("moved")
    assert database.attributes_of_group("g0") == ProductAttributes("p0")
    replica.close()
    source.close()


def test_log_records_of_updates_where_deletes_and_thumbnails_round_trip():
    update = Update("db", {"g": ProductAttributes("a/b", frozenset({"t"}), {"k": "v"}), "h": ProductAttributes()})
    where = Deletion("db", ("i",), ("g",), Filter(path_prefix="a", any_of=(Filter(all_tags=frozenset({"x"})),)))
    everything = Deletion("db", where=Filter())  # an empty where: every group, kept apart from none
    for operation in (update, where, everything):
        record = log_codec.encode(operation)
        assert log_codec.database_of(record) == "db"
        for again in (record, log_codec.from_message(log_codec.to_message(record))):
            assert log_codec.decode(again) == operation
    assert log_codec.decode(log_codec.encode(Deletion("db", ("i",)))) == Deletion("db", ("i",))
    bag = BagOfWords.from_words(np.array([1, 2]), VOCABULARY, 1)
    added = Item("db", "i", bag, {}, "g", None, ProductAttributes("p"), b"jpeg")
    record = log_codec.encode(added)
    stored = log_codec.decode(log_codec.without_thumbnail(record))
    assert isinstance(stored, Item) and stored.thumbnail == b"" and stored.attributes == ProductAttributes("p")
    full = log_codec.decode(record)
    assert isinstance(full, Item) and full.thumbnail == b"jpeg"
    plain = log_codec.encode(Item("db", "j", bag))
    assert log_codec.without_thumbnail(plain) is plain
    unset = log_codec.decode(plain)
    assert isinstance(unset, Item) and unset.attributes is None  # unset: the group keeps its attributes


def test_filtered_searches_during_updates_only_return_passing_items(shard):
    """Searches under a filter run while UpdateGroups flips groups in and out of it: every hit's
    attributes (read with the mask, under one hold of the lock) pass the filter."""
    bag = BagOfWords.from_words(np.array([1, 2, 3]), VOCABULARY, 1)
    shard.stub.Add(
        iter([with_attributes(add_request(f"i{n}", "db", bag, f"g{n}"), attributes(colour="red")) for n in range(200)]),
        timeout=10,
    )
    red = filter_to_proto(Filter(labels=(LabelClause("colour", frozenset({"red"})),)))
    stop = threading.Event()
    failures: list[str] = []

    def searcher() -> None:
        while not stop.is_set():
            for hit in search(shard.stub, "db", bag, 50, filter=red):
                if hit.attributes.labels.get("colour") != "red":
                    failures.append(hit.item_id)

    threads = [threading.Thread(target=searcher) for _ in range(2)]
    for thread in threads:
        thread.start()
    rng = random.Random(12)
    for _ in range(40):
        groups = [f"g{n}" for n in rng.sample(range(200), 50)]
        colour = rng.choice(["red", "blue"])
        shard.stub.UpdateGroups(
            index_pb2.UpdateGroupsRequest(
                database="db",
                groups=[index_pb2.GroupAttributes(group_id=g, attributes=attributes(colour=colour)) for g in groups],
            ),
            timeout=10,
        )
    stop.set()
    for thread in threads:
        thread.join()
    assert not failures


def test_dense_databases_take_attributes_filters_and_management_too(shard):
    """The same through a deep (dense) database: 1% filter top k equals brute force over the
    passing items, UpdateGroups, ListGroups, Delete where, thumbnails and Stats."""
    rng = np.random.default_rng(13)
    vectors = {f"d{n}": rng.normal(size=16).astype(np.float32) for n in range(2000)}
    group_of = {item_id: f"g{n // 2}" for n, item_id in enumerate(vectors)}
    shard.stub.Add(
        iter(
            [
                with_attributes(
                    add_request(item_id, "deep", vector, group_of[item_id]),
                    attributes(shop=f"s{int(group_of[item_id][1:]) % 100}"),
                    thumbnail=item_id.encode(),
                )
                for item_id, vector in vectors.items()
            ]
        ),
        timeout=30,
    )
    shop = Filter(labels=(LabelClause("shop", frozenset({"s42"})),))
    passing = {i: v for i, v in vectors.items() if int(group_of[i][1:]) % 100 == 42}
    assert len(passing) == 20
    query = rng.normal(size=16).astype(np.float32)
    request = index_pb2.SearchRequest(database="deep", signature=dense_to_proto(query), top_k=10)
    request.filter.CopyFrom(filter_to_proto(shop))
    hits = [i for chunk in shard.stub.Search(request, timeout=10) for i in chunk.items]
    expected = sorted(dense_scores(query, passing).items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    assert [h.item_id for h in hits] == [i for i, _ in expected]
    assert all(h.attributes.labels["shop"] == "s42" for h in hits)
    updated = shard.stub.UpdateGroups(
        index_pb2.UpdateGroupsRequest(
            database="deep", groups=[index_pb2.GroupAttributes(group_id="g42", attributes=attributes(shop="moved"))]
        ),
        timeout=10,
    )
    assert updated.updated == 1
    hits = [i for chunk in shard.stub.Search(request, timeout=10) for i in chunk.items]
    assert "g42" not in {h.group_id for h in hits} and len(hits) == 10
    listed = shard.stub.ListGroups(
        index_pb2.ListGroupsRequest(
            database="deep", filter=common_pb2.Filter(labels=[{"key": "shop", "values": ["moved"]}])
        ),
        timeout=10,
    )
    assert [(g.group_id, [i.item_id for i in g.items]) for g in listed.groups] == [("g42", ["d84", "d85"])]
    deleted = shard.stub.Delete(index_pb2.DeleteRequest(database="deep", where=filter_to_proto(shop)), timeout=10)
    assert len(deleted.groups_deleted) == 9 and deleted.deleted == 18
    images = shard.stub.GetItemImages(index_pb2.GetItemImagesRequest(database="deep", item_ids=["d84", "d284"]))
    assert [(i.item_id, i.thumbnail) for i in images.images] == [("d84", b"d84")]  # d284 (g142, s42) is gone
    (stats,) = [d for d in shard.stub.Stats(index_pb2.StatsRequest(), timeout=10).databases if d.name == "deep"]
    assert (stats.items, stats.groups) == (1982, 991) and stats.index_type and stats.memory_bytes > 0


def test_update_groups_needs_the_internal_credential_as_the_other_writes():
    running = Shard(internal_token="internal-secret")
    try:
        bag = BagOfWords.from_words(np.array([1, 2]), VOCABULARY, 1)
        internal = [("authorization", "Bearer internal-secret")]
        running.stub.Add(iter([add_request("x", "db", bag)]), timeout=10, metadata=internal)
        update = index_pb2.UpdateGroupsRequest(
            database="db", groups=[index_pb2.GroupAttributes(group_id="x", attributes=attributes("p"))]
        )
        with pytest.raises(grpc.RpcError) as error:
            running.stub.UpdateGroups(update, timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert running.stub.UpdateGroups(update, timeout=10, metadata=internal).updated == 1
        # Reads stay open: ListGroups and GetItemImages need no token here.
        assert running.stub.ListGroups(index_pb2.ListGroupsRequest(database="db"), timeout=10).total == 1
        running.stub.GetItemImages(index_pb2.GetItemImagesRequest(database="db", item_ids=["x"]), timeout=10)
    finally:
        running.close()
