"""Command line: `mps search IMAGE` and `mps ingest FOLDER --category C`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

import grpc
from tqdm import tqdm

from common.images import decode_image
from gateway.client import Product, VisualSearchClient
from gateway.report import draw_result, format_table

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _products(files: list[Path], category: str, progress: tqdm) -> Iterator[Product]:
    for path in files:
        yield Product(path.stem, category, path.read_bytes(),
                      {"path": str(path.resolve()), "title": path.stem.replace("_", " ")})
        progress.update(1)


def ingest(client: VisualSearchClient, folder: Path, category: str) -> int:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    with tqdm(total=len(files), unit="img", desc=f"ingest {category}") as progress:
        response = client.index_products(_products(files, category, progress), timeout_s=3600)
    return int(response.indexed)


def parse_region(spec: str) -> tuple[tuple[float, float, float, float], str]:
    """'X0,Y0,X1,Y1:CATEGORY' -> ((x0, y0, x1, y1), category)."""
    coords, _, category = spec.partition(":")
    try:
        x0, y0, x1, y1 = (float(v) for v in coords.split(","))
    except ValueError:
        raise SystemExit(f"--region {spec!r}: expected X0,Y0,X1,Y1:CATEGORY, e.g. 10,20,200,300:tops") from None
    return (x0, y0, x1, y1), category


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mps", description="Multi-product visual search client.")
    parser.add_argument("--address", default="127.0.0.1:50050", help="gateway host:port")
    commands = parser.add_subparsers(dest="command", required=True)
    search = commands.add_parser("search", help="find every product in IMAGE and similar items")
    search.add_argument("image", type=Path)
    search.add_argument("--top-k", type=int, default=5)
    search.add_argument("--min-confidence", type=float, default=0.0)
    search.add_argument("--region", action="append", default=[], metavar="X0,Y0,X1,Y1:CATEGORY",
                        help="search this region instead of detecting (repeatable)")
    search.add_argument("--picture", type=Path, help="write the photo with boxes and matches here")
    ingest_parser = commands.add_parser("ingest", help="index every image under FOLDER")
    ingest_parser.add_argument("folder", type=Path)
    ingest_parser.add_argument("--category", required=True)
    args = parser.parse_args(argv)
    try:
        with VisualSearchClient(args.address) as client:
            if args.command == "ingest":
                print(f"indexed {ingest(client, args.folder, args.category)} images into {args.category!r}")
                return 0
            regions = [parse_region(spec) for spec in args.region]
            data = args.image.read_bytes()
            result = client.search(data, top_k=args.top_k, min_confidence=args.min_confidence,
                                   regions=regions)
            print(format_table(result, args.top_k))
            if args.picture:
                print(f"picture: {draw_result(decode_image(data, 10**9), result, args.picture, args.top_k)}")
            return 0
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
