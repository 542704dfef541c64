"""`mps import` without a server (gateway/importer.py): reading rows, the checks that fail a row
before anything is sent, the journal, and how a batch refused part-way is isolated."""

from __future__ import annotations

import json

import grpc
import pytest

import gateway.importer as importer
from common.errors import InvalidArgument, Unavailable
from common.images import encode_jpeg, encode_png
from common.photos import load_photo
from common.status import to_status
from gateway.config import GatewayConfig
from gateway.importer import Importer, Journal, Row, local_image, prepare, read_rows


@pytest.fixture
def folder(tmp_path):
    coffee = load_photo("coffee")
    (tmp_path / "a.jpg").write_bytes(encode_jpeg(coffee[:100, :100]))
    (tmp_path / "b.png").write_bytes(encode_png(coffee[100:200, :100]))
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return tmp_path


def row(**fields) -> Row:
    return Row(1, "0" * 16, {"product_id": "p", "category": "c", "image": "a.jpg", **fields})


def test_a_good_row_becomes_the_product_to_send(folder):
    ready = prepare(
        row(image="b.png", tags="x;y", labels="brand=acme; size = m", box="1,2,30,40", image_uri="https://e.x/b"),
        folder,
        GatewayConfig(),
    )
    product = ready.product
    assert (product.product_id, product.category, product.box) == ("p", "c", (1.0, 2.0, 30.0, 40.0))
    assert product.attributes is not None and list(product.attributes.tags) == ["x", "y"]
    assert dict(product.attributes.labels) == {"brand": "acme", "size": "m"}
    assert product.image_uri == "https://e.x/b" and product.image == (folder / "b.png").read_bytes()
    assert prepare(row(), folder, GatewayConfig()).product.attributes is None  # none given: kept


@pytest.mark.parametrize(
    "fields, says",
    [
        ({"image": "missing.jpg"}, "cannot be read"),
        ({"image": "junk.jpg"}, "cannot be decoded"),
        ({"image": "https://cdn.example/a.jpg"}, "put a local copy's path in `image` and this URI in `image_uri`"),
        ({"image": ""}, "image is required"),
        ({"product_id": ""}, "product_id is required"),
        ({"category": "a  b"}, "second space"),
        ({"tags": ["ok", "bad\n"]}, "attributes.tags[1]"),
        ({"path": "a//b"}, "attributes.path"),
        ({"labels": "novalue"}, "is not k=v"),
        ({"labels": {"k": 1}}, "every key and value must be a string"),
        ({"box": "1,2,3"}, "x0,y0,x1,y1"),
        ({"box": [50, 50, 10, 10]}, "box is empty"),
        ({"image_uri": "no scheme"}, "not an absolute uri"),
        ({"colour": "red"}, "unknown fields ['colour']"),
    ],
)
def test_a_bad_row_fails_with_its_reason(folder, fields, says):
    with pytest.raises(ValueError) as error:
        prepare(row(**fields), folder, GatewayConfig())
    assert says.lower() in str(error.value).lower()


def test_images_are_local_paths_or_file_uris(folder):
    assert local_image("a.jpg", folder) == folder / "a.jpg"
    assert local_image(f"file://{folder.as_posix()}/a%20b.jpg", folder) == folder / "a b.jpg"
    with pytest.raises(ValueError, match="another host"):
        local_image("file://server/share/a.jpg", folder)


def test_rows_of_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"product_id": "a"}\n\nnot json\n[1]\n')
    rows = list(read_rows(jsonl))
    assert [(r.number, bool(r.problem)) for r in rows] == [(1, False), (2, True), (3, True)]
    csv_file = tmp_path / "m.csv"
    csv_file.write_text('product_id,category,box\na,c,"1,2,3,4"\nb,c,\n')
    assert [r.fields for r in read_rows(csv_file)] == [
        {"product_id": "a", "category": "c", "box": "1,2,3,4"},
        {"product_id": "b", "category": "c"},
    ]
    csv_file.write_text("product_id,colour\n")
    with pytest.raises(SystemExit, match="unknown columns"):
        list(read_rows(csv_file))


def test_the_journal_survives_a_cut_line_and_restart_empties_it(tmp_path):
    path = tmp_path / "m.jsonl.progress"
    path.write_text("1 0123456789abcdef\n2 01234")  # the second line was cut by a crash
    journal = Journal(path, restart=False)
    assert journal.done == {(1, "0123456789abcdef")}
    journal.record([Row(3, "fedcba9876543210", {})])
    journal.close()
    assert Journal(path, restart=False).done == {(1, "0123456789abcdef"), (3, "fedcba9876543210")}
    assert Journal(path, restart=True).done == set()


class Refusal(grpc.RpcError, grpc.Call):
    """A failed call as a client sees it, with the gateway's google.rpc details."""

    def __init__(self, error):
        self._status = to_status(error)

    def code(self):
        return self._status.code

    def details(self):
        return self._status.details

    def trailing_metadata(self):
        return self._status.trailing_metadata

    def initial_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False


def _manifest(tmp_path, folder, ids):
    manifest = tmp_path / "m.jsonl"
    rows = [{"product_id": i, "category": "c", "image": str(folder / "a.jpg"), "image_id": i} for i in ids]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_a_batch_refused_part_way_stores_those_before_and_sends_the_rest(tmp_path, folder, monkeypatch):
    """The gateway refuses "bad" (request 2 of the batch) after storing the two before it."""
    stored: list[str] = []

    def gateway(client, products, timeout_s):
        for position, product in enumerate(products):
            if product.product_id == "bad":
                error = InvalidArgument(f"product #{position} ('bad'): nope", info={"stored_images": str(position)})
                error.info["refused_request"] = str(position)
                raise Refusal(error)
        stored.extend(p.product_id for p in products)

    monkeypatch.setattr(importer, "send", gateway)
    manifest = _manifest(tmp_path, folder, ["a", "b", "bad", "c", "d"])
    summary = Importer(None, manifest, batch=5).run()
    assert [f.product_id for f in summary.failed] == ["bad"] and "nope" in summary.failed[0].reason
    assert summary.imported == 4 and stored == ["c", "d"]  # a and b were stored by the refused call
    assert len(Journal(tmp_path / "m.jsonl.progress", restart=False).done) == 4


def test_a_refusal_that_names_no_row_is_isolated_one_by_one(tmp_path, folder, monkeypatch):
    def gateway(client, products, timeout_s):
        if any(p.product_id == "bad" for p in products):
            raise Refusal(InvalidArgument("something in this batch"))

    monkeypatch.setattr(importer, "send", gateway)
    summary = Importer(None, _manifest(tmp_path, folder, ["a", "bad", "c"]), batch=3).run()
    assert [f.number for f in summary.failed] == [2] and summary.imported == 2


def test_a_server_failure_stops_the_import_resumably(tmp_path, folder, monkeypatch):
    calls = []

    def gateway(client, products, timeout_s):
        calls.append(len(products))
        if len(calls) == 2:
            raise Refusal(Unavailable("index at x failed"))

    monkeypatch.setattr(importer, "send", gateway)
    summary = Importer(None, _manifest(tmp_path, folder, list("abcde")), batch=2).run()
    assert summary.imported == 2 and not summary.failed and "UNAVAILABLE" in summary.stopped
    assert "re-run" in summary.stopped and calls == [2, 2]
