"""`mps import MANIFEST.jsonl|.csv`: a catalogue from a manifest, one row per image, resumable.

Columns (a JSON object per line, or a CSV header):
    product_id, category      required
    image                     a local file: a path (relative to the manifest's folder) or a file:// URI
    image_uri                 where the caller keeps the image (https://, gs://...), returned with matches
    image_id                  optional (default: from the image's bytes, so a re-sent image replaces itself)
    path, tags, labels        the product's attributes (tags: a JSON list, or "a;b" in CSV; labels: a
                              JSON object, or "k=v;k=v" in CSV); a row with none keeps the product's own
    metadata                  optional (a JSON object, or "k=v;k=v" in CSV)
    box                       optional "x0,y0,x1,y1" (or a JSON list) in the image's pixels
An http(s) `image` cannot be fetched here (the import reads local files only): give a local copy in
`image` and the URI in `image_uri`.

Rows are checked before anything is sent (a missing or undecodable file, bad attributes or box:
that row fails, with its reason, not the import), then streamed `batch` rows per IndexProducts call.
A call that returns has stored its rows; they are appended to a journal beside the manifest
(MANIFEST.progress), so a re-run after a crash or Ctrl-C skips them. Image ids are deterministic,
so a row sent again (the journal lags a batch behind a crash) replaces itself: no duplicate. A batch
refused part-way says which request it refused and how many images were stored: those before it
are journaled, the refused row fails, the rest are sent again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tqdm import tqdm

from common.errors import InvalidArgument
from common.images import ImageError, decode_photo
from common.limits import check_id, check_metadata
from common.names import check_name
from common.status import details_of
from gateway.catalogue import check_image_uri
from gateway.client import Attributes, Product, VisualSearchClient
from gateway.config import GatewayConfig
from gateway.crops import valid_box
from index_server.convert import attributes_of

COLUMNS = (
    "product_id",
    "category",
    "image",
    "image_uri",
    "image_id",
    "path",
    "tags",
    "labels",
    "metadata",
    "box",
)
# Codes that blame the batch's content (a row is at fault): the row is isolated and the rest go on.
# Any other failure (the gateway or the index unavailable, a deadline) stops the import: re-run it.
ROW_FAULTS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
_REMOTE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")
SHOWN_FAILURES = 20


class ImportStopped(Exception):
    """The import cannot go on (the server failed, not a row); what was acknowledged is journaled."""


@dataclass
class Row:
    number: int  # from 1, data rows only (a CSV header is not counted)
    key: str  # a digest of the row's content: a row edited since it was journaled is sent again
    fields: dict[str, Any]
    problem: str = ""  # why it cannot be read (a line that is not JSON)


@dataclass
class Ready:
    """A row, checked and read, ready to send."""

    row: Row
    product: Product
    image_key: tuple[str, str, str]  # (category, product, image id or content digest): one stored image


@dataclass
class Failure:
    number: int
    product_id: str
    reason: str


@dataclass
class Summary:
    imported: int = 0
    skipped: int = 0
    failed: list[Failure] = field(default_factory=list)
    stopped: str = ""  # why the import stopped early ("" when it ran to the end)


def sidecar(manifest: Path, suffix: str) -> Path:
    """MANIFEST.progress, MANIFEST.failed.jsonl: beside the manifest, named after it."""
    return manifest.with_name(manifest.name + suffix)


# -- reading the manifest ----------------------------------------------------------------------------


def _digest(fields: Any) -> str:
    return hashlib.blake2b(json.dumps(fields, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def read_rows(manifest: Path) -> Iterator[Row]:
    """The manifest's rows, in order (JSON lines: blank lines skipped; CSV: a header row first)."""
    if manifest.suffix.lower() == ".csv":
        with manifest.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            unknown = [c for c in reader.fieldnames or [] if c not in COLUMNS]
            if unknown:
                raise SystemExit(f"{manifest}: unknown columns {unknown}; the columns are {', '.join(COLUMNS)}")
            for number, record in enumerate(reader, 1):
                fields = {k: v for k, v in record.items() if k is not None and v not in (None, "")}
                yield Row(number, _digest(fields), fields)
        return
    with manifest.open(encoding="utf-8") as file:
        number = 0
        for line in file:
            if not line.strip():
                continue
            number += 1
            try:
                fields = json.loads(line)
            except ValueError as exc:
                yield Row(number, _digest(line), {}, f"not a JSON object ({exc})")
                continue
            if not isinstance(fields, dict):
                yield Row(number, _digest(line), {}, "not a JSON object")
                continue
            yield Row(number, _digest(fields), fields)


def count_rows(manifest: Path) -> int:
    if manifest.suffix.lower() == ".csv":
        with manifest.open(newline="", encoding="utf-8-sig") as file:
            return max(sum(1 for _ in csv.reader(file)) - 1, 0)
    with manifest.open(encoding="utf-8") as file:
        return sum(1 for line in file if line.strip())


def _text(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name, "")
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    return value.strip()


def _pairs(value: Any, name: str) -> dict[str, str]:
    """A JSON object of strings, or "k=v;k=v" -> {k: v}."""
    if isinstance(value, dict):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ValueError(f"{name}: every key and value must be a string")
        return dict(value)
    if not isinstance(value, str):
        raise ValueError(f'{name} must be an object or "k=v;k=v", got {type(value).__name__}')
    out = {}
    for part in filter(None, (p.strip() for p in value.split(";"))):
        key, equals, item = part.partition("=")
        if not equals or not key.strip():
            raise ValueError(f'{name}: {part!r} is not k=v (write "k=v;k=v")')
        out[key.strip()] = item.strip()
    return out


def _tags(value: Any) -> list[str]:
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return value
    if isinstance(value, str):
        return [t.strip() for t in value.split(";") if t.strip()]
    raise ValueError('tags must be a list of strings or "a;b;c"')


def _box(value: Any) -> tuple[float, float, float, float]:
    parts = value.split(",") if isinstance(value, str) else value
    try:
        x0, y0, x1, y1 = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise ValueError(f'box {value!r} is not "x0,y0,x1,y1" in pixels') from None
    return x0, y0, x1, y1


def local_image(image: str, folder: Path) -> Path:
    """`image` as a local file: a path (relative to `folder`) or a file:// URI; ValueError for a
    remote URI (nothing is downloaded)."""
    if image.lower().startswith("file://"):
        parsed = urllib.parse.urlparse(image)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"image {image!r}: a file:// URI on another host cannot be read")
        return Path(urllib.request.url2pathname(parsed.path))
    if _REMOTE.match(image):
        raise ValueError(
            f"image {image[:200]!r} is remote: mps import reads local files only (it downloads nothing); "
            "put a local copy's path in `image` and this URI in `image_uri`"
        )
    path = Path(image).expanduser()
    return path if path.is_absolute() else folder / path


def prepare(row: Row, folder: Path, limits: GatewayConfig) -> Ready:
    """The row checked as the gateway checks an image (ids, category, metadata, attributes, box),
    its file read and decoded -> ready to send; ValueError saying what is wrong otherwise."""
    if row.problem:
        raise ValueError(row.problem)
    fields = row.fields
    unknown = sorted(set(fields) - set(COLUMNS))
    if unknown:
        raise ValueError(f"unknown fields {unknown}; the fields are {', '.join(COLUMNS)}")
    try:
        product_id, category = _text(fields, "product_id"), _text(fields, "category")
        check_id("product_id", product_id, limits.max_id_bytes, required=True)
        check_name("category", category)
        image_id = _text(fields, "image_id")
        check_id("image_id", image_id, limits.max_id_bytes, required=False)
        uri = _text(fields, "image_uri")
        if uri:
            check_image_uri(uri, limits.max_image_uri_bytes)
        metadata = _pairs(fields.get("metadata", {}), "metadata")
        check_metadata(metadata, limits)
        attributes = None
        if any(fields.get(name) for name in ("path", "tags", "labels")):
            attributes = Attributes(
                _text(fields, "path"), _tags(fields.get("tags", [])), _pairs(fields.get("labels", {}), "labels")
            )
            attributes_of(attributes.to_proto(), "attributes")
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None
    image = _text(fields, "image")
    if not image:
        raise ValueError("image is required: a local file's path (relative to the manifest) or file:// URI")
    path = local_image(image, folder)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"image {str(path)[:300]!r} cannot be read ({exc.strerror or exc})") from None
    try:
        # A reduced decode (JPEG draft) proves the file is an image without paying for all its pixels.
        photo = decode_photo(data, limits.max_pixels, 256)
    except ImageError as exc:
        raise ValueError(f"image {str(path)[:300]!r}: {exc}") from None
    box = None
    if "box" in fields:
        box = _box(fields["box"])
        problem = valid_box(np.array(box, np.float32), photo.width, photo.height)
        if problem:
            raise ValueError(f"box {problem}")
    product = Product(product_id, category, data, metadata, image_id, box, attributes, uri)
    content = image_id or hashlib.blake2b(data, digest_size=8).hexdigest()
    return Ready(row, product, (category, product_id, content))


# -- the journal -----------------------------------------------------------------------------------


class Journal:
    """Rows acknowledged by the gateway, one "NUMBER KEY" line each, appended and synced per batch."""

    def __init__(self, path: Path, restart: bool):
        self.path = path
        if restart and path.exists():
            path.unlink()
        self.done: set[tuple[int, str]] = set()
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        for line in text.splitlines():
            number, _, key = line.partition(" ")
            if number.isdigit() and len(key) == 16:  # a line cut by a crash is not a record
                self.done.add((int(number), key))
        self._file = path.open("a", encoding="utf-8")
        if text and not text.endswith("\n"):
            self._file.write("\n")  # the next record on a line of its own, after a cut one

    def __contains__(self, row: Row) -> bool:
        return (row.number, row.key) in self.done

    def record(self, rows: Sequence[Row]) -> None:
        if not rows:
            return
        self._file.write("".join(f"{row.number} {row.key}\n" for row in rows))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.update((row.number, row.key) for row in rows)

    def close(self) -> None:
        self._file.close()


# -- sending -----------------------------------------------------------------------------------------


def send(client: VisualSearchClient, products: list[Product], timeout_s: float) -> Any:
    """One IndexProducts stream of these products (a function of its own: tests interrupt it)."""
    return client.index_products(products, timeout_s=timeout_s)


class Importer:
    def __init__(
        self,
        client: VisualSearchClient,
        manifest: Path,
        batch: int = 32,
        restart: bool = False,
        limit: int = 0,
        timeout_s: float = 600.0,
        limits: GatewayConfig | None = None,
        progress: Callable[[int], None] | None = None,
    ):
        self.client = client
        self.manifest = manifest
        self.folder = manifest.resolve().parent
        self.batch = max(batch, 1)
        self.limit = limit
        self.timeout_s = timeout_s
        self.limits = limits or GatewayConfig()
        self.journal = Journal(sidecar(manifest, ".progress"), restart)
        self.summary = Summary()
        self.progress = progress or (lambda n: None)

    def run(self) -> Summary:
        """Imports every row not journaled yet; KeyboardInterrupt propagates after the summary is
        complete up to the last acknowledged batch."""
        pending: list[Ready] = []
        handled = 0
        try:
            for row in read_rows(self.manifest):
                if self.limit and handled >= self.limit:
                    break
                handled += 1
                if row in self.journal:
                    self.summary.skipped += 1
                    self.progress(1)
                    continue
                try:
                    pending.append(prepare(row, self.folder, self.limits))
                except ValueError as exc:
                    self._fail(row, str(exc))
                    continue
                if len(pending) >= self.batch:
                    self._send(pending)
                    pending = []
            self._send(pending)
        except ImportStopped as exc:
            self.summary.stopped = str(exc)
        finally:
            self.journal.close()
        return self.summary

    def _fail(self, row: Row, reason: str) -> None:
        product_id = row.fields.get("product_id", "")
        self.summary.failed.append(Failure(row.number, product_id if isinstance(product_id, str) else "", reason))
        self.progress(1)

    def _done(self, ready: Sequence[Ready]) -> None:
        self.journal.record([r.row for r in ready])
        self.summary.imported += len(ready)
        self.progress(len(ready))

    def _send(self, batch: list[Ready]) -> None:
        """Sends a batch; on a refusal, journals what was stored, fails the refused row and sends
        the rest again (one by one when the refusal does not say which row it was)."""
        while batch:
            try:
                send(self.client, [r.product for r in batch], self.timeout_s)
            except grpc.RpcError as exc:
                code, message = exc.code(), exc.details() or ""
                if code not in ROW_FAULTS:
                    raise ImportStopped(
                        f"{code.name}: {message[:500]}; re-run the same command to resume (the rows acknowledged "
                        "so far are journaled)"
                    ) from None
                details = details_of(exc)
                refused = details.info.get("refused_request", "")
                if not refused.isdigit() or int(refused) >= len(batch):
                    if len(batch) == 1:
                        self._fail(batch[0].row, f"{code.name}: {message}")
                        return
                    for one in batch:  # which row? each alone says
                        self._send([one])
                    return
                n = int(refused)
                before = batch[:n]
                stored = details.info.get("stored_images", "")
                # Exactly the images before the refused one were stored (not, say, none of a category
                # whose index failed too): journal them; otherwise they go again with the rest.
                if stored == str(len({r.image_key for r in before})):
                    self._done(before)
                    before = []
                self._fail(batch[n].row, f"{code.name}: {message}")
                batch = before + batch[n + 1 :]
                continue
            self._done(batch)
            return


def write_failures(manifest: Path, failures: list[Failure]) -> Path | None:
    """Every failed row to MANIFEST.failed.jsonl (removed when none failed) -> its path, or None."""
    path = sidecar(manifest, ".failed.jsonl")
    if not failures:
        path.unlink(missing_ok=True)
        return None
    with path.open("w", encoding="utf-8") as file:
        for failure in failures:
            record = {"row": failure.number, "product_id": failure.product_id, "reason": failure.reason}
            file.write(json.dumps(record) + "\n")
    return path


def format_summary(manifest: Path, summary: Summary, failed_file: Path | None) -> str:
    lines = [
        f"imported {summary.imported} rows, skipped {summary.skipped} (already imported), failed {len(summary.failed)}"
    ]
    for failure in summary.failed[:SHOWN_FAILURES]:
        lines.append(f"  row {failure.number} ({failure.product_id or 'no product_id'}): {failure.reason[:300]}")
    if len(summary.failed) > SHOWN_FAILURES:
        lines.append(f"  ... and {len(summary.failed) - SHOWN_FAILURES} more")
    if failed_file is not None:
        lines.append(
            f"every failed row: {failed_file}; fix them and re-run (imported rows are skipped, "
            f"see {sidecar(manifest, '.progress')})"
        )
    if summary.stopped:
        lines.append(f"stopped: {summary.stopped}")
    return "\n".join(lines)


def import_manifest(
    client: VisualSearchClient, manifest: Path, batch: int = 32, restart: bool = False, limit: int = 0
) -> int:
    """The `mps import` command: progress bar, summary -> exit status (0: every row imported; 1:
    some failed or the import stopped; 130: interrupted, resumable)."""
    if not manifest.is_file():
        raise SystemExit(f"{manifest}: no such manifest (a .jsonl or .csv file)")
    total = count_rows(manifest)
    with tqdm(total=min(total, limit) if limit else total, unit="row", desc=f"import {manifest.name}") as bar:
        importer = Importer(client, manifest, batch, restart, limit, progress=bar.update)
        interrupted = False
        try:
            summary = importer.run()
        except KeyboardInterrupt:
            interrupted = True
            summary = importer.summary
            summary.stopped = "interrupted; re-run the same command to resume (acknowledged rows are skipped)"
    failed_file = write_failures(manifest, summary.failed)
    print(format_summary(manifest, summary, failed_file))
    if interrupted:
        return 130
    return 1 if summary.failed or summary.stopped else 0
