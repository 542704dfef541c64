"""What the gateway's pipeline needs from the services behind it, as plain Python (no gRPC here).

`gateway/backends.py` implements these over gRPC; tests may implement them in-process. Every
method takes the seconds it may spend and raises common.errors on failure. `Ports` is all of them,
as the gateway's servicer takes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from common.local_features import Features
from gateway.config import SignatureKind
from index_server.domain import EMPTY_ATTRIBUTES, Filter, ProductAttributes

# A signature is opaque to the pipeline: it is computed by the signer and handed to the index.
Signature = Any
# The metadata key under which an image's image_uri is stored in the index (the caller's metadata
# may not use it; it is never shown as metadata).
IMAGE_URI_KEY = "mps:image_uri"


def item_id_of(product_id: str, image_id: str) -> str:
    """The index item of one image of a product (its group is the product)."""
    return f"{product_id}/{image_id}"


def caller_metadata(stored: dict[str, str]) -> tuple[dict[str, str], str]:
    """An item's stored metadata -> (the caller's metadata, its image_uri or "")."""
    uri = stored.pop(IMAGE_URI_KEY, "")
    return stored, uri


@dataclass
class DetectorOutput:
    """Boxes in pixels of the image that was sent."""

    # (box (4,) float32 xyxy, class name, category ("" when the class is not a product), confidence)
    detections: list[tuple[np.ndarray, str, str, float]]
    objects: list[tuple[np.ndarray, float]]  # (box, objectness)
    inference_ms: float = 0.0


@dataclass
class LocatorOutput:
    """Boxes in pixels of the image that was sent."""

    salient: list[tuple[np.ndarray, float]]
    segments: list[tuple[np.ndarray, float]]
    compute_ms: float = 0.0


@dataclass
class CatalogueMatch:
    """One catalogue image found for a query (the best image of its product when grouped)."""

    product_id: str
    image_id: str
    score: float
    metadata: dict[str, str]  # the caller's, without the gateway's reserved keys
    box: np.ndarray | None  # (4,) float32 xyxy pixels of the catalogue image, when known
    attributes: ProductAttributes = EMPTY_ATTRIBUTES  # the product's
    image_uri: str = ""  # the caller's URI of the image, as given at ingest
    # Re-ranked matches: the geometric verification's inliers and the signature's own first-stage
    # score (`score` is then the fused one, or the best window's); 0 and None when not re-ranked.
    inliers: int = 0
    first_stage_score: float | None = None
    # Verified by local features (gateway/rerank.py), whatever the number of inliers.
    verified: bool = False
    # SIGNATURE_KIND_BLCF, spatially re-ranked by the index: (4,) float32 xyxy pixels of the
    # catalogue image, the window where the product was found (`score` is that window's).
    window: np.ndarray | None = None


@dataclass(frozen=True)
class SpatialRerank:
    """SIGNATURE_KIND_BLCF: the index re-scores each query's first top_k items by their best window
    over the item's assignment map, with average query expansion over the first query_expansion
    re-ranked items (0 = off); mps.index.v1.SpatialRerank."""

    top_k: int
    query_expansion: int = 0


@dataclass
class Degraded:
    """Part of a category's index did not answer; the matches are exact over the rest."""

    reason: str
    missing_word_ranges: list[tuple[int, int]] = field(default_factory=list)
    missing_shards: list[int] = field(default_factory=list)


@dataclass
class BatchAnswer:
    """results[i] answers query i, best first."""

    results: list[list[CatalogueMatch]]
    degraded: Degraded | None = None


@dataclass
class CategoryFailure:
    """A category that could not be searched (or, with category "", an index backend whose
    categories are unknown because it has not answered a listing)."""

    category: str
    code: str  # the grpc.StatusCode name, e.g. "UNAVAILABLE"
    reason: str
    backend: str  # the index address holding the category


@dataclass
class CatalogueEntry:
    """One catalogue image, signed, for the index."""

    product_id: str
    image_id: str
    category: str
    kind: str
    signature: Signature
    box: np.ndarray  # (4,) float32 xyxy original pixels
    metadata: dict[str, str]  # as stored: the caller's and the gateway's reserved keys (image_uri)
    # Set: the product's attributes from now on; None keeps those it has.
    attributes: ProductAttributes | None = None
    # A small JPEG of the image, stored with the entry (sent with one kind only: see Pipeline).
    thumbnail: bytes = b""
    # The crop's local features (re-ranking), stored with the thumbnail's entry.
    local_features: Features | None = None


@dataclass
class CatalogueImageInfo:
    """One image of a catalogue product, as the index holds it (no signature)."""

    image_id: str
    metadata: dict[str, str]  # the caller's, without the gateway's reserved keys
    box: np.ndarray | None  # (4,) float32 xyxy original pixels, when known
    image_uri: str = ""


@dataclass
class CatalogueProduct:
    """A product of one category's database: its attributes and its images (in image id order)."""

    product_id: str
    attributes: ProductAttributes
    images: list[CatalogueImageInfo]


@dataclass
class ProductPage:
    """One page of a database's products (group id order)."""

    products: list[CatalogueProduct]
    next_page_token: str  # "" on the last page
    total: int  # products passing the filter in the whole database


@dataclass
class DatabaseInfo:
    """One index database (a category and kind), as its Stats say."""

    category: str
    kind: SignatureKind
    images: int
    products: int
    index_type: str
    memory_bytes: int
    backend: str


class Detector(Protocol):
    def detect(
        self,
        rgb: np.ndarray,
        min_confidence: float,
        objectness_threshold: float,
        max_objects: int,
        timeout_s: float,
        model: str = "",
    ) -> DetectorOutput:
        """`model`: a detector model by name ("" = the detector service's default)."""
        ...


class Locator(Protocol):
    def locate(self, rgb: np.ndarray, max_salient: int, max_segments: int, timeout_s: float) -> LocatorOutput: ...


class Signer(Protocol):
    def sign(
        self, crops: Sequence[np.ndarray], kinds: Sequence[SignatureKind], timeout_s: float
    ) -> list[list[Signature]]:
        """[crop][kind] signatures; raises common.errors on failure."""
        ...

    def sign_regions(self, rgb: np.ndarray, regions: Sequence[np.ndarray], timeout_s: float) -> list[Signature]:
        """Query by region (SIGNATURE_KIND_BLCF): (H, W, 3) uint8 RGB, described once, and (4,) float
        xyxy boxes in its pixels (at most images_per_call of them) -> one signature per region, made
        of the cells of the image's map inside it."""
        ...

    def covering(self, signature: Signature, width: int, height: int) -> Signature:
        """A SIGNATURE_KIND_BLCF signature of a smaller copy of an image, as covering the image
        itself (width x height pixels, each at most 65535): the same words, so that the windows the
        index finds in it are in pixels of the image."""
        ...

    def images_per_call(self, timeout_s: float) -> int:
        """The most images one `sign` call may carry, as the signature service advertises it;
        0 when it does not say (the caller then uses its own configured limit)."""
        ...


class CatalogueWriter(Protocol):
    """One ingestion's writes. Entries stream to their index backends as they are given, but
    nothing is stored before `commit`; `cancel` stores nothing (a backend stores an Add stream only
    when it ends normally)."""

    def add(self, entries: Sequence[CatalogueEntry]) -> None:
        """Sends the entries on; raises common.errors (nothing of these entries sent) when a
        backend they go to has already failed."""
        ...

    def commit(self) -> dict[str, Exception]:
        """Ends every stream normally and waits for each backend: -> the categories written to
        whose backend failed (and so stored none of them), with its error; {} when all stored."""
        ...

    def cancel(self) -> None: ...


class Index(Protocol):
    def categories(self, kind: str) -> set[str]:
        """The categories whose database of this kind exists (may be cached briefly)."""
        ...

    def unreachable(self) -> list[CategoryFailure]:
        """Categories that may exist but whose index did not answer its last listing (searched only
        when named), with why; one with category "" stands for a backend whose categories are
        unknown (it has not answered a listing yet)."""
        ...

    def backend_of(self, category: str) -> str:
        """The address of the index backend holding the category."""
        ...

    def search_batch(
        self,
        category: str,
        kind: str,
        signatures: Sequence[Signature],
        top_k: int,
        timeout_s: float,
        filter: Filter | None = None,
        spatial: SpatialRerank | None = None,
    ) -> BatchAnswer:
        """Each query's top_k products (one per product, its best image) among those passing
        `filter` in one category's database, the first `spatial.top_k` spatially re-ranked (a BLCF
        database only); raises common.errors.NotFound when that database does not exist."""
        ...

    def writer(self, timeout_s: float) -> CatalogueWriter:
        """A writer for one ingestion; every stream it opens ends within `timeout_s`."""
        ...

    def delete_products(
        self, product_ids: Sequence[str], categories: Sequence[str] | None, timeout_s: float
    ) -> tuple[int, list[str]]:
        """Deletes every image of the products in every kind -> (images deleted, ids not found)."""
        ...

    def list_products(
        self,
        category: str,
        kind: str,
        product_ids: Sequence[str],
        filter: Filter | None,
        page_size: int,
        page_token: str,
        timeout_s: float,
    ) -> ProductPage:
        """A page of the products of one category's database (those named, when `product_ids` is
        not empty; those passing `filter`); NotFound when the database does not exist."""
        ...

    def update_products(
        self, category: str, kind: str, attributes: dict[str, ProductAttributes], timeout_s: float
    ) -> list[str]:
        """Replaces the products' attributes in one database -> the products it does not hold."""
        ...

    def purge_products(
        self, category: str, kind: str, filter: Filter | None, timeout_s: float
    ) -> tuple[list[str], int]:
        """Deletes every product of one database passing `filter` -> (those products, images deleted)."""
        ...

    def thumbnails(self, category: str, kind: str, item_ids: Sequence[str], timeout_s: float) -> dict[str, bytes]:
        """The thumbnails stored with these items (item id -> JPEG bytes; b"" when stored without)."""
        ...

    def local_features(
        self, category: str, kind: str, item_ids: Sequence[str], timeout_s: float
    ) -> dict[str, Features]:
        """The local features stored with these items (those stored without are left out)."""
        ...

    def databases(self, timeout_s: float) -> list[DatabaseInfo]:
        """Every category's databases on every index backend; Unavailable when one does not answer."""
        ...


class Ports(Protocol):
    """Every port the gateway uses, and their release (gateway.backends.Backends over gRPC; tests
    may give in-process ones)."""

    @property
    def detector(self) -> Detector: ...

    @property
    def locator(self) -> Locator: ...

    @property
    def signer(self) -> Signer: ...

    @property
    def index(self) -> Index: ...

    def close(self) -> None: ...
