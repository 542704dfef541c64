"""Command line: `mps search IMAGE`, `mps ingest FOLDER --category C`, `mps delete PRODUCT...`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
from tqdm import tqdm

from common.images import decode_image
from gateway.client import Product, VisualSearchClient
from gateway.report import draw_result, format_table
from mps.common.v1 import common_pb2
from mps.gateway.v1 import gateway_pb2

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
KINDS = {"deep": common_pb2.SIGNATURE_KIND_DEEP, "bow": common_pb2.SIGNATURE_KIND_BOW}
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
    search.add_argument("--picture", type=Path, help="write the photo with boxes and matches here")
    ingest_parser = commands.add_parser(
        "ingest", help="index every image under FOLDER (a sub-folder is one product with several images)"
    )
    ingest_parser.add_argument("folder", type=Path)
    ingest_parser.add_argument("--category", required=True)
    delete = commands.add_parser("delete", help="delete every image of these products")
    delete.add_argument("product_ids", nargs="+")
    delete.add_argument("--category", action="append", default=[], help="only in this category (repeatable)")
    args = parser.parse_args(argv)
    try:
        tls_ca = args.tls_ca.read_bytes() if args.tls_ca else None
        # The token comes from the environment, never a flag (flags show in `ps`).
        with VisualSearchClient(
            args.address, token=os.environ.get("MPS_TOKEN", ""), tls_ca=tls_ca, request_id=args.request_id
        ) as client:
            if args.command == "ingest":
                print(f"indexed {ingest(client, args.folder, args.category)} images into {args.category!r}")
                return 0
            if args.command == "delete":
                response = client.delete_products(args.product_ids, args.category)
                print(
                    f"deleted {response.images_deleted} images"
                    + (f"; not found: {', '.join(response.not_found)}" if response.not_found else "")
                )
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
            )
            print(format_table(result, args.top_k))
            if args.picture:
                print(f"picture: {draw_result(decode_image(data, 10**9), result, args.picture, args.top_k)}")
            return 0
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
