"""Human-readable output of a search: a text table and a picture with boxes and match thumbnails."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mps.gateway.v1 import gateway_pb2

THUMB = 96
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
]


def source_name(item: gateway_pb2.Item) -> str:
    """'cup' for a detector class, else the source: 'objectness', 'salient', 'region'..."""
    if item.class_name:
        return item.class_name
    name = gateway_pb2.ItemSource.Name(item.source).removeprefix("ITEM_SOURCE_").lower()
    return {"user_region": "region", "whole_image": "whole image", "unspecified": "?"}.get(name, name)


def format_table(result: gateway_pb2.MultiProductSearchResponse, matches_shown: int = 3) -> str:
    lines = [f"{'#':>2}  {'category':<12} {'found by':<12} {'conf':>5}  {'box (x0,y0,x1,y1)':<22} matches (score)"]
    for n, item in enumerate(result.items):
        b = item.box
        box = f"{b.x_min:.0f},{b.y_min:.0f},{b.x_max:.0f},{b.y_max:.0f}"
        found = ", ".join(
            f"{m.product_id} ({m.score:.3f}{f', {m.inliers} inliers' if m.inliers else ''}{_window(m)})"
            for m in item.matches[:matches_shown]
        )
        note = f"  [{item.warning}]" if item.warning and found else ""
        lines.append(
            f"{n:>2}  {item.category or '?':<12} {source_name(item):<12} "
            f"{item.confidence:>5.2f}  {box:<22} {found or item.warning}{note}"
        )
    if not result.items:
        lines.append("    (no product found)")
    for failure in result.failed_categories:
        lines.append(
            f"not searched: {failure.category or '(unknown categories)'} at {failure.backend} ({failure.code})"
        )
    t = result.timings
    lines.append(
        f"time: decode {t.decode_ms:.0f} ms | detect {t.detect_ms:.0f} ms | locate {t.locate_ms:.0f} ms"
        f" | sign {t.sign_ms:.0f} ms | search {t.search_ms:.0f} ms | total {t.total_ms:.0f} ms"
        f" ({result.proposals} candidate regions)"
    )
    return "\n".join(lines)


def _window(match: gateway_pb2.Match) -> str:
    """', in 10,20,110,90' where a BLCF match was found in its catalogue image (spatial re-ranking)."""
    if not match.HasField("window"):
        return ""
    w = match.window
    return f", in {w.x_min:.0f},{w.y_min:.0f},{w.x_max:.0f},{w.y_max:.0f}"


# A match's picture: (the item, its match) -> an RGB image, or None when there is none.
ThumbnailSource = Callable[[Any, gateway_pb2.Match], Image.Image | None]


def local_thumbnail(item: Any, match: gateway_pb2.Match) -> Image.Image | None:
    """The match's picture read from the file its `path` metadata names, on this machine (the
    catalogue's own files: for runs beside the catalogue, e.g. the benchmarks)."""
    try:
        return Image.open(match.metadata.get("path", "")).convert("RGB")
    except (OSError, ValueError):
        return None


class CatalogueThumbnails:
    """Match pictures from the gateway (GetProductImage: the thumbnail stored at ingest), cached:
    what a client away from the catalogue's files can show. A match without one shows none."""

    def __init__(self, client: Any):
        """`client`: a gateway.client.VisualSearchClient."""
        self.client = client
        self._cache: dict[tuple[str, str, str], Image.Image | None] = {}

    def __call__(self, item: Any, match: gateway_pb2.Match) -> Image.Image | None:
        key = (item.category, match.product_id, match.image_id)
        if key not in self._cache:
            self._cache[key] = None
            try:
                stored = self.client.product_image(match.product_id, match.image_id, item.category)
                if stored.thumbnail:
                    self._cache[key] = Image.open(io.BytesIO(stored.thumbnail)).convert("RGB")
            except grpc.RpcError:
                pass  # no picture for it (deleted since, or indexed without one)
            except (OSError, ValueError):
                pass
        return self._cache[key]


def _thumbnail(source: ThumbnailSource, item: Any, match: gateway_pb2.Match, side: int) -> Image.Image | None:
    image = source(item, match)
    if image is None:
        return None
    image = image.copy()
    image.thumbnail((side, side))
    return image


def draw_result(
    photo: np.ndarray,
    result: gateway_pb2.MultiProductSearchResponse,
    out: Path,
    matches_shown: int = 3,
    thumbnails: ThumbnailSource = local_thumbnail,
) -> Path:
    """Writes the photo with numbered boxes and, on the right, each item's top match thumbnails
    (from `thumbnails`: CatalogueThumbnails(client) asks the gateway)."""
    base = Image.fromarray(photo)
    rows = max(len(result.items), 1)
    panel_w = 40 + matches_shown * (THUMB + 8)
    # Labels readable at any photo size: the font grows with the photo, on a filled patch.
    font = ImageFont.load_default(size=max(14, base.width // 60))
    small = ImageFont.load_default(size=14)
    row_h = THUMB + 40
    canvas = Image.new("RGB", (base.width + panel_w, max(base.height, rows * row_h + 8)), "white")
    canvas.paste(base, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for n, item in enumerate(result.items):
        colour = PALETTE[n % len(PALETTE)]
        b = item.box
        draw.rectangle([b.x_min, b.y_min, b.x_max, b.y_max], outline=colour, width=max(3, base.width // 400))
        label = f"{n} {item.category or '?'} ({source_name(item)})"
        left, top, right, bottom = draw.textbbox((b.x_min + 3, b.y_min + 3), label, font=font)
        draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=colour)
        draw.text((b.x_min + 3, b.y_min + 3), label, fill="white", font=font)
        y = 8 + n * row_h
        draw.text((base.width + 8, y), f"{n} {item.category or '?'}", fill=colour, font=small)
        for m, match in enumerate(item.matches[:matches_shown]):
            x = base.width + 8 + m * (THUMB + 8)
            thumb = _thumbnail(thumbnails, item, match, THUMB)
            if thumb is not None:
                canvas.paste(thumb, (x, y + 20))
            draw.text((x, y + 22 + THUMB), f"{match.score:.2f}", fill=(0, 0, 0), font=small)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
