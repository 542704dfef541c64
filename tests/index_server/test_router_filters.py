"""Product attributes and filters through the router, over real shards on loopback, in both layouts:
a filtered search (bag of words and deep, a 1% filter included) equals the same search on one shard
holding everything and the brute-force reference, results carry their group's attributes, and the
management RPCs (UpdateGroups, Delete by `where`, ListGroups paged across shards, GetItemImages,
Stats) answer as one shard does; a dead shard fails what it cannot answer, and only that."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest

from common.bow_codec import BagOfWords
from common.config import load_config
from common.proto_convert import dense_to_proto
from index_server.config import IndexConfig
from index_server.merge import shard_of
from index_server.server import create_bundle
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.index_server import helpers
from tests.index_server.helpers import Cluster, bow

VOCABULARY = 300
PATHS = ["fashion/tops/shirt", "fashion/tops/tshirt", "fashion/topshop", "fashion/shoes", "home/kitchen/cup", ""]
TAGS = ["striped", "cotton", "wool", "red", "blue"]
BRANDS = ["acme", "zeta", "nova", "orbit"]


@dataclass
class Catalogue:
    """Both kinds' databases of the same products: their adds, signatures and attributes."""

    adds: list[index_pb2.AddRequest]
    bags: dict[str, BagOfWords]
    vectors: dict[str, np.ndarray]
    group_of: dict[str, str]  # item id -> group name (its own id when it has no group)
    attributes: dict[str, common_pb2.ProductAttributes]  # group name -> attributes
    rare: set[str]  # the groups labelled sale=yes: about 1% of the items


def make_catalogue(rng: np.random.Generator, products: int = 500) -> Catalogue:
    """Products of 1 to 3 images each (every 25th an image without a group: its own group), with a
    path, tags and labels; some give their attributes on the first image only (the others keep
    them). Just enough products to reach 10 items are labelled sale=yes: about 1% of the items."""
    adds, bags, vectors, group_of, attributes = [], {}, {}, {}, {}
    rare: set[str] = set()
    rare_items = 0
    for p in range(products):
        solo = p % 25 == 0
        images = 1 if solo else int(rng.integers(1, 4))
        group = f"solo{p:03d}-0" if solo else f"p{p:03d}"
        labels = {"brand": BRANDS[p % len(BRANDS)], "in_stock": "true" if p % 3 else "false"}
        if rare_items < 10 and p % 7 == 3:
            labels["sale"] = "yes"
            rare.add(group)
            rare_items += images
        tags = sorted(str(t) for t in rng.choice(TAGS, int(rng.integers(0, 3)), replace=False))
        attributes[group] = common_pb2.ProductAttributes(path=PATHS[p % len(PATHS)], tags=tags, labels=labels)
        for n in range(images):
            item_id = group if solo else f"{group}-{n}"
            bags[item_id] = helpers.random_bags(rng, 1, VOCABULARY, codebook=7, longest=120)[0]
            vectors[item_id] = rng.normal(size=16).astype(np.float32)
            group_of[item_id] = group
            for database, value in (("bags", bags[item_id]), ("dense", vectors[item_id])):
                request = helpers.add_request(item_id, database, value, "" if solo else group, n=str(n))
                if n == 0 or p % 2:
                    request.attributes.CopyFrom(attributes[group])
                request.thumbnail = f"jpeg of {item_id}".encode()
                adds.append(request)
    return Catalogue(adds, bags, vectors, group_of, attributes, rare)


def passes(attributes: common_pb2.ProductAttributes, f: common_pb2.Filter) -> bool:
    """The reference semantics of a Filter (common.proto's comment), one product at a time."""
    path, tags, labels = attributes.path, set(attributes.tags), dict(attributes.labels)
    if f.path_prefix and not (path == f.path_prefix or path.startswith(f.path_prefix + "/")):
        return False
    if not set(f.all_tags) <= tags or (f.any_tags and not set(f.any_tags) & tags):
        return False
    for clause in f.labels:
        found = clause.key in labels and (not clause.values or labels[clause.key] in clause.values)
        if found == clause.negate:
            return False
    return not f.any_of or any(passes(attributes, part) for part in f.any_of)


def label(key: str, *values: str, negate: bool = False) -> common_pb2.LabelClause:
    return common_pb2.LabelClause(key=key, values=values, negate=negate)


RARE = common_pb2.Filter(labels=[label("sale", "yes")])
FILTERS = [
    RARE,
    common_pb2.Filter(path_prefix="fashion/tops"),  # not "fashion/topshop"
    common_pb2.Filter(all_tags=["cotton"], any_tags=["red", "blue"]),
    common_pb2.Filter(labels=[label("brand", "acme", "zeta"), label("in_stock", "false", negate=True)]),
    common_pb2.Filter(
        any_of=[common_pb2.Filter(path_prefix="home"), common_pb2.Filter(all_tags=["wool"], labels=[label("sale")])]
    ),
]


def single_shard() -> tuple[Any, index_pb2_grpc.IndexServiceStub, grpc.Channel]:
    bundle = create_bundle(load_config(IndexConfig, "index", environ={}, port=0, data_dir=""))
    channel = grpc.insecure_channel(f"127.0.0.1:{bundle.port}")
    return bundle, index_pb2_grpc.IndexServiceStub(channel), channel


@dataclass
class Loaded:
    layout: str
    cluster: Cluster
    single: index_pb2_grpc.IndexServiceStub
    catalogue: Catalogue


@pytest.fixture(scope="module", params=["item", "word"])
def loaded(request: pytest.FixtureRequest) -> Iterator[Loaded]:
    """The same catalogue through a 2-shard router (of the layout) and on one shard."""
    catalogue = make_catalogue(np.random.default_rng(41))
    cluster = Cluster(request.param, shards=2)
    bundle, single, channel = single_shard()
    try:
        assert cluster.stub.Add(iter(catalogue.adds), timeout=60).added == len(catalogue.adds)
        assert single.Add(iter(catalogue.adds), timeout=60).added == len(catalogue.adds)
        yield Loaded(request.param, cluster, single, catalogue)
    finally:
        channel.close()
        bundle.server.stop(None)
        cluster.close()


def search(stub, database, signature, top_k, one_per_group=False, product_filter=None):
    chunks = list(
        stub.Search(
            index_pb2.SearchRequest(
                database=database,
                signature=signature,
                top_k=top_k,
                one_per_group=one_per_group,
                filter=product_filter,
            ),
            timeout=10,
        )
    )
    assert not chunks[0].degraded, chunks[0].degraded_reason
    return [i for c in chunks for i in c.items]


def reference(catalogue: Catalogue, database: str, query, product_filter, top_k: int, one_per_group: bool):
    """(id, score) of the filtered top k by brute force over the items whose group passes."""
    kept = {i for i, g in catalogue.group_of.items() if passes(catalogue.attributes[g], product_filter)}
    if database == "bags":
        scores = helpers.bow_scores(query, {i: catalogue.bags[i] for i in kept})
    else:
        scores = helpers.dense_scores(query, {i: catalogue.vectors[i] for i in kept})
    if one_per_group:
        return helpers.grouped_reference(scores, catalogue.group_of, top_k)
    return helpers.ungrouped_reference(scores, top_k)


def assert_attributes(items, catalogue: Catalogue) -> None:
    """Every result carries its group's attributes (tags as a set)."""
    for item in items:
        expected = catalogue.attributes[catalogue.group_of[item.item_id]]
        got = item.attributes
        assert (got.path, set(got.tags), dict(got.labels)) == (
            expected.path,
            set(expected.tags),
            dict(expected.labels),
        ), item.item_id


def test_a_one_percent_filter_returns_the_full_exact_top_k(loaded: Loaded) -> None:
    """The filter is applied inside each shard while it collects: 10 results of the ~1% that pass,
    not the few of them a global top k would have held."""
    catalogue, stub = loaded.catalogue, loaded.cluster.stub
    passing = [i for i, g in catalogue.group_of.items() if g in catalogue.rare]
    assert 10 <= len(passing) <= 0.015 * len(catalogue.group_of)
    rng = np.random.default_rng(5)
    for database in ("bags", "dense"):
        for n in range(3):
            query: BagOfWords | np.ndarray
            if database == "bags":
                query = BagOfWords.from_words(np.arange(n, VOCABULARY, 3), VOCABULARY, 7)  # shares a word with most
                signature = bow(query)
            else:
                query = rng.normal(size=16).astype(np.float32)
                signature = dense_to_proto(query)
            got = search(stub, database, signature, 10, product_filter=RARE)
            expected = reference(catalogue, database, query, RARE, 10, False)
            assert len(got) == len(expected) == 10
            assert [i.item_id for i in got] == [e[0] for e in expected]
            np.testing.assert_allclose([i.score for i in got], [e[1] for e in expected], atol=1e-5)
            assert {catalogue.group_of[i.item_id] for i in got} <= catalogue.rare
            assert_attributes(got, catalogue)


def test_filtered_searches_and_batches_equal_one_shard_and_brute_force(loaded: Loaded) -> None:
    catalogue, stub = loaded.catalogue, loaded.cluster.stub
    rng = np.random.default_rng(6)
    queries = {
        "bags": [catalogue.bags["p001-0"], *helpers.random_bags(rng, 2, VOCABULARY, codebook=7, longest=120)],
        "dense": [catalogue.vectors["p001-0"], *rng.normal(size=(2, 16)).astype(np.float32)],
    }
    for database, values in queries.items():
        signatures = [bow(v) if database == "bags" else dense_to_proto(v) for v in values]
        for product_filter in FILTERS:
            for grouped in (False, True):
                batch = stub.SearchBatch(
                    index_pb2.SearchBatchRequest(
                        database=database, signatures=signatures, top_k=12, one_per_group=grouped, filter=product_filter
                    ),
                    timeout=10,
                )
                assert not batch.degraded
                for value, signature, hits in zip(values, signatures, batch.results):
                    got = search(stub, database, signature, 12, grouped, product_filter)
                    assert_same_items(hits.items, got)
                    assert_same_items(got, search(loaded.single, database, signature, 12, grouped, product_filter))
                    expected = reference(catalogue, database, value, product_filter, 12, grouped)
                    assert [i.item_id for i in got] == [e[0] for e in expected], (database, product_filter, grouped)
                    assert_attributes(got, catalogue)
    # Unfiltered results carry attributes too (an empty filter keeps everything).
    got = search(stub, "bags", bow(catalogue.bags["p002-0"]), 30, product_filter=common_pb2.Filter())
    assert got == search(stub, "bags", bow(catalogue.bags["p002-0"]), 30)
    assert_attributes(got, catalogue)


def assert_same_items(got, expected) -> None:
    """Same ids, groups, metadata and attributes in the same order; scores to float32 rounding."""
    assert [(i.item_id, i.group_id, dict(i.metadata)) for i in got] == [
        (i.item_id, i.group_id, dict(i.metadata)) for i in expected
    ]
    assert [(i.attributes.path, set(i.attributes.tags), dict(i.attributes.labels)) for i in got] == [
        (i.attributes.path, set(i.attributes.tags), dict(i.attributes.labels)) for i in expected
    ]
    np.testing.assert_allclose([i.score for i in got], [i.score for i in expected], atol=1e-5)


def test_a_bad_filter_is_refused_by_the_router(loaded: Loaded) -> None:
    bad = common_pb2.Filter(path_prefix="fashion//tops")
    signature = bow(loaded.catalogue.bags["p001-0"])
    for call in (
        lambda: search(loaded.cluster.stub, "bags", signature, 5, product_filter=bad),
        lambda: loaded.cluster.stub.SearchBatch(
            index_pb2.SearchBatchRequest(database="bags", signatures=[signature], filter=bad), timeout=5
        ),
        lambda: loaded.cluster.stub.ListGroups(index_pb2.ListGroupsRequest(database="bags", filter=bad), timeout=5),
        lambda: loaded.cluster.stub.Delete(index_pb2.DeleteRequest(database="bags", where=bad), timeout=5),
    ):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "path_prefix" in error.value.details()


def list_all(stub, database, page_size, product_filter=None, group_ids=()) -> tuple[list[list[str]], list[int]]:
    """Every page's group ids, and each page's total, following the tokens to the end."""
    pages, totals, token = [], [], ""
    while True:
        response = stub.ListGroups(
            index_pb2.ListGroupsRequest(
                database=database, page_size=page_size, page_token=token, filter=product_filter, group_ids=group_ids
            ),
            timeout=10,
        )
        pages.append([g.group_id for g in response.groups])
        totals.append(response.total)
        token = response.next_page_token
        if not token:
            return pages, totals
        assert len(pages) < 1000


def test_list_groups_pages_across_shards_without_gap_or_repeat(loaded: Loaded) -> None:
    catalogue, stub = loaded.catalogue, loaded.cluster.stub
    groups = sorted(set(catalogue.group_of.values()))
    for database in ("bags", "dense"):
        pages, totals = list_all(stub, database, 37)
        assert [len(p) for p in pages[:-1]] == [37] * (len(pages) - 1) and 0 < len(pages[-1]) <= 37
        assert [g for page in pages for g in page] == groups  # in id order, each group once
        assert set(totals) == {len(groups)}
        assert (pages, totals) == list_all(loaded.single, database, 37)  # the pages one shard gives
        for product_filter in FILTERS:
            expected = [g for g in groups if passes(catalogue.attributes[g], product_filter)]
            pages, totals = list_all(stub, database, 5, product_filter)
            assert [g for page in pages for g in page] == expected and set(totals) == {len(expected)}
            assert (pages, totals) == list_all(loaded.single, database, 5, product_filter)
        wanted = ["p499", "p001", "nope", groups[3]]
        pages, totals = list_all(stub, database, 2, group_ids=wanted)
        assert [g for page in pages for g in page] == sorted(set(wanted) & set(groups))
    # A page holds the groups' attributes and items (ids in order, metadata), as one shard's does.
    response = stub.ListGroups(index_pb2.ListGroupsRequest(database="dense", group_ids=["p001", "p004"]), timeout=5)
    assert response == loaded.single.ListGroups(
        index_pb2.ListGroupsRequest(database="dense", group_ids=["p001", "p004"]), timeout=5
    )
    for group in response.groups:
        assert [i.item_id for i in group.items] == sorted(
            i for i, g in catalogue.group_of.items() if g == group.group_id
        )
        assert dict(group.attributes.labels) == dict(catalogue.attributes[group.group_id].labels)
    with pytest.raises(grpc.RpcError) as error:
        stub.ListGroups(index_pb2.ListGroupsRequest(database="shoes"), timeout=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_item_images_and_stats_through_the_router(loaded: Loaded) -> None:
    catalogue, stub = loaded.catalogue, loaded.cluster.stub
    wanted = ["p001-0", "nope", "solo000-0", "p004-1", "p002-0"]
    for database in ("bags", "dense"):
        response = stub.GetItemImages(index_pb2.GetItemImagesRequest(database=database, item_ids=wanted), timeout=5)
        present = [i for i in wanted if i in catalogue.group_of]
        assert [(i.item_id, i.thumbnail) for i in response.images] == [(i, f"jpeg of {i}".encode()) for i in present]
        assert response == loaded.single.GetItemImages(
            index_pb2.GetItemImagesRequest(database=database, item_ids=wanted), timeout=5
        )
    stats = {d.name: d for d in stub.Stats(index_pb2.StatsRequest(), timeout=5).databases}
    one = {d.name: d for d in loaded.single.Stats(index_pb2.StatsRequest(), timeout=5).databases}
    for name in ("bags", "dense"):
        assert (stats[name].items, stats[name].groups) == (one[name].items, one[name].groups)
        assert stats[name].groups == len(set(catalogue.group_of.values()))
        assert stats[name].index_type == one[name].index_type and stats[name].memory_bytes > 0
    # Each shard's share of memory is summed.
    shards = [
        {d.name: d for d in loaded.cluster.direct(a[0]).Stats(index_pb2.StatsRequest(), timeout=5).databases}
        for a in loaded.cluster.addresses
    ]
    assert stats["bags"].memory_bytes == sum(s["bags"].memory_bytes for s in shards)


# -- writes (each test its own, small catalogue) -------------------------------------------------------


@pytest.fixture(params=["item", "word"])
def small(request: pytest.FixtureRequest) -> Iterator[Loaded]:
    catalogue = make_catalogue(np.random.default_rng(42), products=60)
    cluster = Cluster(request.param, shards=2)
    bundle, single, channel = single_shard()
    try:
        cluster.stub.Add(iter(catalogue.adds), timeout=30)
        single.Add(iter(catalogue.adds), timeout=30)
        yield Loaded(request.param, cluster, single, catalogue)
    finally:
        channel.close()
        bundle.server.stop(None)
        cluster.close()


def test_update_groups_through_the_router_then_search_by_the_new_label(small: Loaded) -> None:
    catalogue, stub = small.catalogue, small.cluster.stub
    chosen = ["p001", "p002", "p005", "solo025-0"]  # on both shards in the item layout
    assert len({shard_of(g, 2) for g in chosen}) == 2
    new = common_pb2.ProductAttributes(path="promo/summer", tags=["hot"], labels={"campaign": "summer"})
    request = index_pb2.UpdateGroupsRequest(
        database="bags",
        groups=[index_pb2.GroupAttributes(group_id=g, attributes=new) for g in [*chosen, "p-none", "p001"]],
    )
    response = stub.UpdateGroups(request, timeout=10)
    assert response == small.single.UpdateGroups(request, timeout=10)
    assert list(response.not_found) == ["p-none"] and response.updated >= len(chosen)
    by_label = common_pb2.Filter(labels=[label("campaign", "summer")])
    query = BagOfWords.from_words(np.arange(0, VOCABULARY), VOCABULARY, 7)
    got = search(stub, "bags", bow(query), 50, product_filter=by_label)
    expected = sorted(i for i, g in catalogue.group_of.items() if g in chosen)
    assert sorted(i.item_id for i in got) == expected
    assert all(i.attributes.path == "promo/summer" and list(i.attributes.tags) == ["hot"] for i in got)
    # The old attributes are gone whole: p001's old brand no longer finds it.
    old = common_pb2.Filter(labels=[label("brand", catalogue.attributes["p001"].labels["brand"])])
    assert not {i.item_id for i in search(stub, "bags", bow(query), 300, product_filter=old)} & set(expected)
    if small.layout == "word":  # every word-range shard filters by the new attributes
        for replicas in small.cluster.addresses:
            shard = small.cluster.direct(replicas[0])
            listed = shard.ListGroups(index_pb2.ListGroupsRequest(database="bags", filter=by_label), timeout=5)
            assert sorted(g.group_id for g in listed.groups) == sorted(chosen)
    # The dense database of the same products is another database: untouched.
    assert not search(stub, "dense", dense_to_proto(catalogue.vectors["p001-0"]), 50, product_filter=by_label)
    with pytest.raises(grpc.RpcError) as error:
        stub.UpdateGroups(index_pb2.UpdateGroupsRequest(database="shoes", groups=request.groups[:1]), timeout=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "shoes" in error.value.details()
    bad = index_pb2.UpdateGroupsRequest(
        database="bags",
        groups=[
            index_pb2.GroupAttributes(group_id="p003", attributes=new),
            index_pb2.GroupAttributes(group_id="p004", attributes=common_pb2.ProductAttributes(path="/x")),
        ],
    )
    with pytest.raises(grpc.RpcError) as error:
        stub.UpdateGroups(bad, timeout=5)
    assert (
        error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "groups[1].attributes.path" in error.value.details()
    )
    # Refused before any shard stored anything: p003 (another shard than p004's, or not) unchanged.
    listed = stub.ListGroups(index_pb2.ListGroupsRequest(database="bags", group_ids=["p003"]), timeout=5)
    assert listed.groups[0].attributes.path == catalogue.attributes["p003"].path


def test_delete_where_through_the_router(small: Loaded) -> None:
    catalogue, stub = small.catalogue, small.cluster.stub
    where = common_pb2.Filter(path_prefix="fashion/tops", labels=[label("in_stock", "false")])
    gone = sorted(g for g, a in catalogue.attributes.items() if passes(a, where))
    assert len({shard_of(g, 2) for g in gone}) == 2  # on both shards in the item layout
    for database in ("bags", "dense"):
        request = index_pb2.DeleteRequest(database=database, item_ids=["p-none-0"], where=where)
        response = stub.Delete(request, timeout=10)
        assert response == small.single.Delete(request, timeout=10)
        assert list(response.groups_deleted) == gone and list(response.not_found) == ["p-none-0"]
        assert response.deleted == sum(g in gone for g in catalogue.group_of.values())  # each item once
        pages, _ = list_all(stub, database, 100)
        assert not set(gone) & {g for page in pages for g in page}
        query = bow(BagOfWords.from_words(np.arange(0, VOCABULARY), VOCABULARY, 7))
        if database == "dense":
            query = dense_to_proto(catalogue.vectors[gone[0] + ("" if gone[0].startswith("solo") else "-0")])
        assert not {catalogue.group_of[i.item_id] for i in search(stub, database, query, 300)} & set(gone)
    # Nothing passes any more: an empty list, nothing deleted.
    again = stub.Delete(index_pb2.DeleteRequest(database="bags", where=where), timeout=10)
    assert (again.deleted, list(again.groups_deleted)) == (0, [])


@pytest.mark.parametrize("layout", ["item", "word"])
def test_a_dead_shard_fails_only_the_reads_it_must_answer(layout: str) -> None:
    """Item layout: with shard 1 down, ListGroups cannot be complete (UNAVAILABLE, naming it);
    GetItemImages serves the items found on shard 0 and is UNAVAILABLE only for an item it cannot
    find; a filtered search is flagged degraded, exact over shard 0. Word layout: any shard lists
    a bag-of-words database and serves its thumbnails."""
    catalogue = make_catalogue(np.random.default_rng(43), products=40)
    on_zero = sorted(i for i, g in catalogue.group_of.items() if shard_of(g, 2) == 0)
    on_one = sorted(i for i, g in catalogue.group_of.items() if shard_of(g, 2) == 1)
    cluster = Cluster(layout, shards=2)

    def images(ids: list[str]) -> list[str]:
        request = index_pb2.GetItemImagesRequest(database="bags", item_ids=ids)
        return [i.item_id for i in cluster.stub.GetItemImages(request, timeout=5).images]

    try:
        cluster.stub.Add(iter(catalogue.adds), timeout=30)
        cluster.bundles[1].server.stop(None)
        if layout == "word":
            pages, _ = list_all(cluster.stub, "bags", 10)
            assert [g for page in pages for g in page] == sorted(set(catalogue.group_of.values()))
            assert images(on_one[:2] + on_zero[:1]) == on_one[:2] + on_zero[:1]
            return
        with pytest.raises(grpc.RpcError) as error:
            cluster.stub.ListGroups(index_pb2.ListGroupsRequest(database="bags"), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "shard 1" in error.value.details()
        assert images(on_zero[:3]) == on_zero[:3]
        with pytest.raises(grpc.RpcError) as error:
            images([on_zero[0], on_one[0]])
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "shard 1" in error.value.details()
        request = index_pb2.SearchRequest(
            database="dense",
            signature=dense_to_proto(catalogue.vectors[on_zero[0]]),
            top_k=5,
            filter=common_pb2.Filter(labels=[label("brand")]),
        )
        first = next(iter(cluster.stub.Search(request, timeout=5)))
        assert first.degraded and list(first.missing_shards) == [1] and first.items[0].item_id == on_zero[0]
    finally:
        cluster.close()
