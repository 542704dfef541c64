"""Command line: `mps search IMAGE`, `mps ingest FOLDER --category C`, `mps delete PRODUCT...`,
`mps video FILE|FOLDER|-`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
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


def annotate(rgb: np.ndarray, result: gateway_pb2.StreamMultiProductSearchResponse) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> a copy with each track's box, id, category and top match (with a
    thumbnail of the match when its `path` metadata names a readable image)."""
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
        thumb = _match_thumbnail(top.metadata.get("path", "")) if top else None
        if thumb is not None:
            h, w = thumb.shape[:2]
            ty, tx = max(min(y0, out.shape[0] - h), 0), max(min(x1 - w, out.shape[1] - w), 0)
            out[ty : ty + h, tx : tx + w] = thumb[: out.shape[0] - ty, : out.shape[1] - tx]
    return out


_THUMBNAILS: dict[str, np.ndarray | None] = {}


def _match_thumbnail(path: str, side: int = 64) -> np.ndarray | None:
    if not path:
        return None
    if path not in _THUMBNAILS:
        try:
            _THUMBNAILS[path] = np.asarray(decode_image(Path(path).read_bytes(), 10**8))
        except (OSError, ValueError):
            _THUMBNAILS[path] = None
    image = _THUMBNAILS[path]
    if image is None:
        return None
    import cv2

    factor = side / max(image.shape[:2])
    return cv2.resize(image, (max(1, int(image.shape[1] * factor)), max(1, int(image.shape[0] * factor))))


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
    with tqdm(total=count or None, unit="frame", desc="video") as progress:
        for result in client.stream(
            sending(),
            top_k=args.top_k,
            signature_kind=KINDS[args.kind] if args.kind else 0,
            categories=args.category,
            min_score=args.min_score,
            detection_interval=args.detection_interval,
            lockstep=not args.live,
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
                    output.write(result.frame_number, annotate(rgb, result))
    if output is not None:
        output.close()
        print(f"annotated frames: {args.out}")
    if summary is not None:
        print(format_summary(summary))
    return 0


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
    video_parser = commands.add_parser(
        "video", help="track and search every product of a video file, a folder of frames, or - (JPEGs on stdin)"
    )
    video_parser.add_argument("source", help="a video file, a folder of frame images, or - for concatenated JPEGs")
    video_parser.add_argument("--top-k", type=int, default=3)
    video_parser.add_argument("--min-score", type=float, default=None, help="drop matches scoring below this")
    video_parser.add_argument("--kind", choices=sorted(KINDS), default=None, help="signature kind")
    video_parser.add_argument("--category", action="append", default=[], help="search only this category")
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
            if args.command == "ingest":
                print(f"indexed {ingest(client, args.folder, args.category)} images into {args.category!r}")
                return 0
            if args.command == "video":
                return video(client, args)
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
