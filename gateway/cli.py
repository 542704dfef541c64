"""Command line: `mps search IMAGE`, `mps ingest FOLDER --category C`, `mps import MANIFEST`,
`mps delete PRODUCT...`, `mps products list|get|update|purge`, `mps stats`, `mps video FILE|FOLDER|-`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tqdm import tqdm

from common.images import decode_image
from gateway.client import Attributes, Product, VisualSearchClient
from gateway.filter_text import SYNTAX, FilterSyntaxError, parse_filter
from gateway.importer import import_manifest
from gateway.report import CatalogueThumbnails, ThumbnailSource, draw_result, format_table
from mps.common.v1 import common_pb2
from mps.gateway.v1 import gateway_pb2

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
KINDS = {
    "deep": common_pb2.SIGNATURE_KIND_DEEP,
    "bow": common_pb2.SIGNATURE_KIND_BOW,
    "blcf": common_pb2.SIGNATURE_KIND_BLCF,
}
SOURCES = {
    "detector": gateway_pb2.ITEM_SOURCE_DETECTOR,
    "objectness": gateway_pb2.ITEM_SOURCE_OBJECTNESS,
    "salient": gateway_pb2.ITEM_SOURCE_SALIENT,
    "segment": gateway_pb2.ITEM_SOURCE_SEGMENT,
}


def catalogue_files(folder: Path) -> list[tuple[str, str, Path]]:
    """(product id, image id, path) of every image under `folder`: an image directly in it is a
    product of its own (named by the file); a sub-folder is one product with several images."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        relative = path.relative_to(folder)
        if len(relative.parts) == 1:
            out.append((path.stem, "", path))
        else:
            out.append((relative.parts[0], "/".join(relative.with_suffix("").parts[1:]), path))
    return out


def _products(files: list[tuple[str, str, Path]], category: str, progress: tqdm) -> Iterator[Product]:
    for product_id, image_id, path in files:
        yield Product(
            product_id,
            category,
            path.read_bytes(),
            {"path": str(path.resolve()), "title": product_id.replace("_", " ")},
            image_id,
        )
        progress.update(1)


# Images per IndexProducts stream: the gateway takes at most 10 000 per stream (a stream is stored
# only once it ends), and a failed stream is re-sent whole.
STREAM_IMAGES = 2000


def ingest(client: VisualSearchClient, folder: Path, category: str) -> int:
    """Streams every image under `folder` in, STREAM_IMAGES per stream -> the images stored."""
    files = catalogue_files(folder)
    if not files:
        raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    indexed = 0
    with tqdm(total=len(files), unit="img", desc=f"ingest {category}") as progress:
        for first in range(0, len(files), STREAM_IMAGES):
            part = files[first : first + STREAM_IMAGES]
            indexed += client.index_products(_products(part, category, progress), timeout_s=3600).indexed
    return indexed


def parse_region(spec: str) -> tuple[tuple[float, float, float, float], str]:
    """'X0,Y0,X1,Y1[:CATEGORY]' -> ((x0, y0, x1, y1), category or '')."""
    coords, _, category = spec.partition(":")
    try:
        x0, y0, x1, y1 = (float(v) for v in coords.split(","))
    except ValueError:
        raise SystemExit(
            f"--region {spec!r}: expected X0,Y0,X1,Y1[:CATEGORY], e.g. 10,20,200,300:tops "
            "(without a category the catalogue decides)"
        ) from None
    return (x0, y0, x1, y1), category


VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}


def video_frames(source: str) -> tuple[Iterator[tuple[int, np.ndarray | bytes, int]], int, float]:
    """Frames of a video file (OpenCV), of a folder of images (sorted by name), or of standard input
    (concatenated JPEGs, e.g. `ffmpeg -i in.mp4 -f mjpeg -`) -> (iterator of (frame number from 1,
    RGB pixels or JPEG bytes, timestamp ms), frame count or 0 when unknown, frames per second)."""
    import cv2

    if source == "-":
        return _stdin_jpegs(), 0, 25.0
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
        return ((n, f.read_bytes(), round((n - 1) * 40)) for n, f in enumerate(files, 1)), len(files), 25.0
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise SystemExit(f"{path}: OpenCV cannot open it as a video (a file, e.g. {', '.join(sorted(VIDEO_SUFFIXES))})")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    count = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)

    def read() -> Iterator[tuple[int, np.ndarray | bytes, int]]:
        number = 0
        try:
            while True:
                ok, bgr = capture.read()
                if not ok:
                    return
                number += 1
                yield number, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), round((number - 1) * 1000 / fps)
        finally:
            capture.release()

    return read(), count, fps


def _stdin_jpegs() -> Iterator[tuple[int, np.ndarray | bytes, int]]:
    """Concatenated JPEG files on standard input, split at their end-of-image markers."""
    buffer = b""
    number = 0
    while chunk := sys.stdin.buffer.read(1 << 16):
        buffer += chunk
        while True:
            start = buffer.find(b"\xff\xd8")
            end = buffer.find(b"\xff\xd9", start + 2) if start >= 0 else -1
            if end < 0:
                break
            number += 1
            yield number, buffer[start : end + 2], round((number - 1) * 40)
            buffer = buffer[end + 2 :]


def annotate(
    rgb: np.ndarray, result: gateway_pb2.StreamMultiProductSearchResponse, thumbnails: ThumbnailSource | None = None
) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> a copy with each track's box, id, category and top match (with the
    match's thumbnail from `thumbnails`, e.g. CatalogueThumbnails: the gateway's stored one)."""
    import cv2

    from gateway.report import PALETTE

    out = np.ascontiguousarray(rgb).copy()
    scale = max(out.shape[1] / 1000, 0.5)
    for item in result.items:
        colour = PALETTE[item.track_id % len(PALETTE)]
        x0, y0, x1, y1 = (round(v) for v in (item.box.x_min, item.box.y_min, item.box.x_max, item.box.y_max))
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, max(2, int(2 * scale)))
        top = item.matches[0] if item.matches else None
        label = (
            f"#{item.track_id} {item.category or item.class_name or '?'}"
            + (f" {top.product_id} {top.score:.2f}" if top else "")
            + (" *" if item.searched else "")
        )
        cv2.putText(out, label, (x0 + 3, max(y0 - 6, 14)), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, colour, 2)
        thumb = _match_thumbnail(thumbnails, item, top) if top and thumbnails else None
        if thumb is not None:
            h, w = thumb.shape[:2]
            ty, tx = max(min(y0, out.shape[0] - h), 0), max(min(x1 - w, out.shape[1] - w), 0)
            out[ty : ty + h, tx : tx + w] = thumb[: out.shape[0] - ty, : out.shape[1] - tx]
    return out


def _match_thumbnail(
    thumbnails: ThumbnailSource, item: gateway_pb2.VideoItem, match: gateway_pb2.Match, side: int = 64
) -> np.ndarray | None:
    """(h, w, 3) uint8 RGB of the match's picture, at most `side` pixels on its longer side."""
    image = thumbnails(item, match)
    if image is None:
        return None
    image = image.copy()
    image.thumbnail((side, side))
    return np.asarray(image.convert("RGB"))


class _AnnotatedOutput:
    """Annotated frames to a video file (mp4v; MJPG for .avi) or, for a folder, one PNG per frame."""

    def __init__(self, out: Path, fps: float):
        self.out, self.fps = out, fps
        self.writer: Any = None  # cv2.VideoWriter, opened on the first frame (its size)
        self.folder = not out.suffix
        if self.folder:
            out.mkdir(parents=True, exist_ok=True)

    def write(self, number: int, rgb: np.ndarray) -> None:
        import cv2

        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if self.folder:
            cv2.imwrite(str(self.out / f"frame_{number:06d}.png"), bgr)
            return
        if self.writer is None:
            codec = "MJPG" if self.out.suffix.lower() == ".avi" else "mp4v"
            self.writer = cv2.VideoWriter(
                str(self.out), cv2.VideoWriter.fourcc(*codec), self.fps, (bgr.shape[1], bgr.shape[0])
            )
            if not self.writer.isOpened():
                raise SystemExit(f"--out {self.out}: OpenCV cannot write this video (use .mp4, .avi or a folder)")
        self.writer.write(bgr)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


def format_summary(summary: gateway_pb2.VideoSummary) -> str:
    lines = [f"{'track':>5}  {'category':<12} {'class':<10} {'frames':<11} {'searches':>8}  best matches (score)"]
    for t in summary.tracks:
        found = ", ".join(f"{m.product_id} ({m.score:.3f})" for m in t.best_matches[:3]) or "(no match)"
        lines.append(
            f"{t.track_id:>5}  {t.category or '?':<12} {t.class_name or '-':<10} "
            f"{f'{t.first_frame}-{t.last_frame}':<11} {t.searches:>8}  {found}"
        )
    if not summary.tracks:
        lines.append("    (no product seen)")
    lines.append(
        f"frames: {summary.frames_received} received, {summary.frames_processed} processed, "
        f"{summary.frames_skipped} skipped (newer ones arrived), {summary.frames_detected} detected; "
        f"{summary.searches} searches"
    )
    return "\n".join(lines)


def video(client: VisualSearchClient, args: argparse.Namespace) -> int:
    """Streams the frames, shows progress, writes the annotated frames, prints the per-track summary."""
    frames, count, fps = video_frames(args.source)
    output = _AnnotatedOutput(args.out, fps) if args.out else None
    sent: dict[int, np.ndarray | bytes] = {}  # kept until their result comes back, for --out

    def sending() -> Iterator[tuple[int, np.ndarray | bytes, int]]:
        for number, image, timestamp in frames:
            if output is not None:
                sent[number] = image
            yield number, image, timestamp

    summary = None
    thumbnails = CatalogueThumbnails(client)
    with tqdm(total=count or None, unit="frame", desc="video") as progress:
        for result in client.stream(
            sending(),
            top_k=args.top_k,
            signature_kind=KINDS[args.kind] if args.kind else 0,
            categories=args.category,
            min_score=args.min_score,
            detection_interval=args.detection_interval,
            lockstep=not args.live,
            filter=filter_of(args),
        ):
            if result.HasField("summary"):
                summary = result.summary
                break
            progress.update(1 + len(result.skipped_frames))
            if output is not None:
                for number in result.skipped_frames:
                    sent.pop(number, None)
                image = sent.pop(result.frame_number, None)
                if image is not None:
                    rgb = decode_image(image, 10**9) if isinstance(image, bytes) else image
                    output.write(result.frame_number, annotate(rgb, result, thumbnails))
    if output is not None:
        output.close()
        print(f"annotated frames: {args.out}")
    if summary is not None:
        print(format_summary(summary))
    return 0


FILTER_HELP = (
    "filter on the products' labels: " + SYNTAX + "; e.g. 'brand=acme,in_stock=true', 'colour=red|blue', "
    "'brand!=acme'. Combined (AND) with --path and --tag"
)


def add_filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--filter", default="", metavar="EXPRESSION", help=FILTER_HELP)
    parser.add_argument(
        "--path", dest="path_prefix", default="", metavar="PREFIX", help="only products under this taxonomy path"
    )
    parser.add_argument("--tag", action="append", default=[], help="only products with this tag (repeatable: all)")
    parser.add_argument(
        "--any-tag", action="append", default=[], help="only products with one of these tags (repeatable)"
    )


def filter_of(args: argparse.Namespace) -> common_pb2.Filter | None:
    """The --filter, --path, --tag and --any-tag options as one Filter (None when none is given)."""
    try:
        spec = parse_filter(args.filter, args.path_prefix, args.tag, args.any_tag)
    except FilterSyntaxError as exc:
        raise SystemExit(f"--filter {args.filter!r}: {exc}") from None
    return spec if spec.ByteSize() else None


def _label(spec: str) -> tuple[str, str]:
    key, equals, value = spec.partition("=")
    if not equals or not key.strip():
        raise SystemExit(f"--label {spec!r}: write KEY=VALUE, e.g. --label in_stock=false")
    return key.strip(), value.strip()


def update_product(client: VisualSearchClient, args: argparse.Namespace) -> gateway_pb2.Product:
    """`mps products update`: the options given, as attributes and the update mask naming them."""
    mask: list[str] = []
    labels = dict(_label(spec) for spec in args.label)
    mask += [f"labels.{key}" for key in labels]
    mask += [f"labels.{key}" for key in args.unset_label if key not in labels]
    if args.path is not None:
        mask.append("path")
    if args.tag or args.no_tags:
        mask.append("tags")
    if not mask:
        raise SystemExit("nothing to update: give --path, --tag, --no-tags, --label KEY=VALUE or --unset-label KEY")
    attributes = Attributes(args.path or "", args.tag, labels)
    return client.update_product(args.product_id, attributes, mask, args.category)


def format_product(product: gateway_pb2.Product, indent: int | None = 2) -> str:
    """A product as JSON (field names as in the proto)."""
    from google.protobuf.json_format import MessageToDict

    return json.dumps(MessageToDict(product, preserving_proto_field_name=True), indent=indent, ensure_ascii=False)


def format_products(products: list[gateway_pb2.Product], total: int) -> str:
    lines = [f"{'product':<24} {'images':>6}  {'path':<28} tags / labels"]
    for p in products:
        a = p.attributes
        labels = ",".join(f"{k}={v}" for k, v in sorted(a.labels.items()))
        lines.append(
            f"{p.product_id:<24} {len(p.images):>6}  {a.path or '-':<28} "
            f"{' '.join(sorted(a.tags)) or '-'} / {labels or '-'}"
        )
    lines.append(f"{len(products)} of {total} products")
    return "\n".join(lines)


def format_stats(response: gateway_pb2.GetCatalogueStatsResponse) -> str:
    lines = [f"{'category':<24} {'products':>9}  {'kind':<5} {'images':>9} {'memory':>10}  index"]
    for c in response.categories:
        for n, k in enumerate(c.kinds):
            kind = common_pb2.SignatureKind.Name(k.kind).removeprefix("SIGNATURE_KIND_").lower()
            lines.append(
                f"{c.category if n == 0 else '':<24} {c.products if n == 0 else '':>9}  {kind:<5} {k.images:>9} "
                f"{k.memory_bytes / 2**20:>8.1f} MB  {k.index_type}"
            )
    if not response.categories:
        lines.append("    (no category)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mps",
        description="Multi-product visual search client; the "
        "gateway's client token, if it wants one, is read from MPS_TOKEN.",
    )
    parser.add_argument("--address", default="127.0.0.1:50050", help="gateway host:port")
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        help="PEM of the CA that signed the gateway's certificate (default: plaintext)",
    )
    parser.add_argument("--request-id", default="", help="x-request-id of the calls (default: the gateway's)")
    commands = parser.add_subparsers(dest="command", required=True)
    search = commands.add_parser("search", help="find every product in IMAGE and similar items")
    search.add_argument("image", type=Path)
    search.add_argument("--top-k", type=int, default=5)
    search.add_argument("--min-confidence", type=float, default=0.0)
    search.add_argument("--min-score", type=float, default=None, help="drop matches scoring below this")
    search.add_argument("--kind", choices=sorted(KINDS), default=None, help="signature kind (default: the gateway's)")
    search.add_argument("--category", action="append", default=[], help="search only this category (repeatable)")
    search.add_argument(
        "--rerank-k",
        type=int,
        default=None,
        help="re-rank each item's first K matches by local features (default: the gateway's; 0 = off)",
    )
    search.add_argument(
        "--spatial-rerank-k",
        type=int,
        default=None,
        metavar="K",
        help="--kind blcf: re-rank each item's first K matches by their best window in the catalogue photo "
        "(default: the gateway's; 0 = off)",
    )
    search.add_argument(
        "--query-expansion",
        type=int,
        default=None,
        metavar="N",
        help="--kind blcf: average query expansion over the first N re-ranked matches "
        "(default: the gateway's; 0 = off)",
    )
    search.add_argument(
        "--source",
        action="append",
        default=[],
        choices=sorted(SOURCES),
        help="localisation source (repeatable; default: the gateway's)",
    )
    search.add_argument(
        "--region",
        action="append",
        default=[],
        metavar="X0,Y0,X1,Y1[:CATEGORY]",
        help="search this region instead of localising (repeatable)",
    )
    add_filter_options(search)
    search.add_argument(
        "--picture", type=Path, help="write the photo with boxes and matches (thumbnails from the gateway) here"
    )
    ingest_parser = commands.add_parser(
        "ingest", help="index every image under FOLDER (a sub-folder is one product with several images)"
    )
    ingest_parser.add_argument("folder", type=Path)
    ingest_parser.add_argument("--category", required=True)
    importing = commands.add_parser(
        "import",
        help="index the images of a manifest (.jsonl or .csv, one row per image), resumably",
        description="Each row: product_id, category, image (a local path, relative to the manifest, or file:// "
        "URI), and optionally image_uri, image_id, path, tags (CSV: a;b), labels (CSV: k=v;k=v), metadata, box "
        "(x0,y0,x1,y1). Rows acknowledged by the gateway are journaled in MANIFEST.progress: a re-run skips "
        "them (after a crash or Ctrl-C). Failed rows are listed, all of them in MANIFEST.failed.jsonl.",
    )
    importing.add_argument("manifest", type=Path)
    importing.add_argument("--batch", type=int, default=32, help="rows per IndexProducts call (default 32)")
    importing.add_argument("--restart", action="store_true", help="ignore the journal: import every row again")
    importing.add_argument("--limit", type=int, default=0, help="stop after the first N rows of the manifest (0: all)")
    delete = commands.add_parser("delete", help="delete every image of these products")
    delete.add_argument("product_ids", nargs="+")
    delete.add_argument("--category", action="append", default=[], help="only in this category (repeatable)")
    products = commands.add_parser("products", help="the catalogue's products: list, get, update, purge")
    product_commands = products.add_subparsers(dest="products_command", required=True)
    listing = product_commands.add_parser("list", help="a category's products (passing a filter)")
    listing.add_argument("category")
    add_filter_options(listing)
    listing.add_argument("--page-size", type=int, default=0, help="products per page (default: the gateway's, 100)")
    listing.add_argument("--page-token", default="", help="the next page of an earlier listing")
    listing.add_argument("--all", action="store_true", help="every page")
    listing.add_argument("--json", action="store_true", help="one JSON object per product")
    getting = product_commands.add_parser("get", help="one product: its attributes and images")
    getting.add_argument("product_id")
    getting.add_argument("--category", default="", help="(default: the one category holding it)")
    updating = product_commands.add_parser(
        "update", help="change a product's path, tags or labels (its images are not signed again)"
    )
    updating.add_argument("product_id")
    updating.add_argument("--category", default="", help="(default: the one category holding it)")
    updating.add_argument("--path", default=None, help='the taxonomy path ("" removes it)')
    updating.add_argument("--tag", action="append", default=[], help="the tags, replacing them all (repeatable)")
    updating.add_argument("--no-tags", action="store_true", help="remove every tag")
    updating.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="set one label (repeatable)"
    )
    updating.add_argument("--unset-label", action="append", default=[], metavar="KEY", help="remove one label")
    purging = product_commands.add_parser("purge", help="delete every product of a category passing a filter")
    purging.add_argument("category")
    add_filter_options(purging)
    purging.add_argument("--force", action="store_true", help="with no filter: delete every product of the category")
    stats = commands.add_parser("stats", help="per category: products, images per kind, index type, memory")
    stats.add_argument("categories", nargs="*", help="(default: every category)")
    video_parser = commands.add_parser(
        "video", help="track and search every product of a video file, a folder of frames, or - (JPEGs on stdin)"
    )
    video_parser.add_argument("source", help="a video file, a folder of frame images, or - for concatenated JPEGs")
    video_parser.add_argument("--top-k", type=int, default=3)
    video_parser.add_argument("--min-score", type=float, default=None, help="drop matches scoring below this")
    video_parser.add_argument("--kind", choices=sorted(KINDS), default=None, help="signature kind")
    video_parser.add_argument("--category", action="append", default=[], help="search only this category")
    add_filter_options(video_parser)
    video_parser.add_argument(
        "--detection-interval", type=int, default=0, help="detect every Nth frame, track in between (0: gateway's)"
    )
    video_parser.add_argument(
        "--live",
        action="store_true",
        help="send frames as fast as they are read and let the gateway drop those it has no time for "
        "(default: each frame waits for the previous one's result, so every frame is processed)",
    )
    video_parser.add_argument(
        "--out", type=Path, default=None, help="write annotated frames: a video file (.mp4, .avi) or a folder"
    )
    args = parser.parse_args(argv)
    try:
        tls_ca = args.tls_ca.read_bytes() if args.tls_ca else None
        # The token comes from the environment, never a flag (flags show in `ps`).
        with VisualSearchClient(
            args.address, token=os.environ.get("MPS_TOKEN", ""), tls_ca=tls_ca, request_id=args.request_id
        ) as client:
            return _run(client, args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def _run(client: VisualSearchClient, args: argparse.Namespace) -> int:
    if args.command == "ingest":
        print(f"indexed {ingest(client, args.folder, args.category)} images into {args.category!r}")
        return 0
    if args.command == "import":
        return import_manifest(client, args.manifest, args.batch, args.restart, args.limit)
    if args.command == "video":
        return video(client, args)
    if args.command == "delete":
        response = client.delete_products(args.product_ids, args.category)
        print(
            f"deleted {response.images_deleted} images"
            + (f"; not found: {', '.join(response.not_found)}" if response.not_found else "")
        )
        return 0
    if args.command == "products":
        return _products_command(client, args)
    if args.command == "stats":
        print(format_stats(client.catalogue_stats(args.categories)))
        return 0
    regions = [parse_region(spec) for spec in args.region]
    data = args.image.read_bytes()
    result = client.search(
        data,
        top_k=args.top_k,
        min_confidence=args.min_confidence,
        regions=regions,
        signature_kind=KINDS[args.kind] if args.kind else 0,
        categories=args.category,
        min_score=args.min_score,
        sources=[SOURCES[s] for s in args.source],
        filter=filter_of(args),
        rerank_k=args.rerank_k,
        spatial_rerank_k=args.spatial_rerank_k,
        query_expansion=args.query_expansion,
    )
    print(format_table(result, args.top_k))
    if args.picture:
        drawn = draw_result(decode_image(data, 10**9), result, args.picture, args.top_k, CatalogueThumbnails(client))
        print(f"picture: {drawn}")
    return 0


def _products_command(client: VisualSearchClient, args: argparse.Namespace) -> int:
    command = args.products_command
    if command == "get":
        print(format_product(client.get_product(args.product_id, args.category)))
    elif command == "update":
        print(format_product(update_product(client, args)))
    elif command == "purge":
        spec = filter_of(args)
        response = client.purge_products(args.category, spec, force=args.force)
        print(f"deleted {response.products_deleted} products ({response.images_deleted} images) of {args.category!r}")
    else:
        spec, token = filter_of(args), args.page_token
        shown: list[gateway_pb2.Product] = []
        while True:
            page = client.list_products(args.category, spec, args.page_size, token)
            shown += page.products
            token = page.next_page_token
            if not (args.all and token):
                break
        if args.json:
            print("\n".join(format_product(p, indent=None) for p in shown))
        else:
            print(format_products(shown, page.total))
        if token:
            print(f"next page: --page-token {token}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
