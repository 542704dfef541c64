"""The multi-product search and the catalogue ingestion, as plain Python (no gRPC here).

A search (the paper, section 4, widened beyond the detector's classes):
1. localise: the detector's product classes and class-agnostic objectness boxes, and the deep
   descriptor's salient objects (SCDA) and ranked segments, asked for in parallel on downscaled
   copies of the photo decoded once; merged across sources (near-duplicates are one region) and
   capped; the whole image is a candidate too, kept only when nothing else qualifies;
2. select: every candidate is signed with the cheap selection kind and searched in its category,
   or, when the detector gave none (or the category has no catalogue), in every category in
   parallel; a class-agnostic candidate becomes an item only when one category is clearly best
   and its best match is good enough; overlapping items of one category or one product are one
   item; mutually exclusive categories keep the more confident;
3. match: the items are signed with the requested kind (when it is not the selection kind) and
   searched in their categories; matches below min_score are dropped.
An ingested catalogue image is localised the same way (unless it comes with a box) and only its
product's region is signed, so a product shot in a room or on a model is not its background.

Bags of local convolutional features (SIGNATURE_KIND_BLCF) are signed differently on both sides: a
query photo is described once and each item is the cells of its map inside the item's box (query
by region: one ComputeSignatures call with every box), and a catalogue image is signed whole, so
that the index's spatial re-ranking may find the product in any window of the catalogue photo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from common import local_features
from common.errors import Cancelled, InvalidArgument, NotFound, ResourceExhausted, ServiceError, Unavailable, quote
from common.images import ImageError, Photo, decode_photo, encode_jpeg, raw_photo, shrink
from common.limits import check_id, check_metadata
from common.local_features import Features
from common.names import check_name
from common.serving import Deadline
from detector_server.nms import iou_matrix
from gateway import rerank
from gateway.catalogue import check_image_uri
from gateway.config import GatewayConfig, SignatureKind
from gateway.crops import crop, plain_background, valid_box
from gateway.exclusive import resolve_exclusive
from gateway.ports import (
    IMAGE_URI_KEY,
    BatchAnswer,
    CatalogueEntry,
    CatalogueMatch,
    CatalogueWriter,
    CategoryFailure,
    Degraded,
    Detector,
    DetectorOutput,
    Index,
    Locator,
    Signature,
    Signer,
    SpatialRerank,
)
from gateway.proposals import LOCALISING, Proposal, Source, clip_box, merge_proposals, overlap_of_smaller
from gateway.rerank import RerankSettings
from index_server.domain import Filter, ProductAttributes


@dataclass
class SearchOptions:
    """One MultiProductSearch, in domain terms; boxes in original pixels."""

    kind: SignatureKind
    top_k: int
    min_confidence: float = 0.0
    regions: Sequence[tuple[np.ndarray, str]] = ()
    categories: Sequence[str] = ()
    min_score: float | None = None
    sources: frozenset[Source] | None = None
    max_items: int = 0
    # Only products passing it are matched (and so chosen as candidates' best): the index applies
    # it while it collects each search's top k.
    filter: Filter | None = None
    # Two-stage retrieval: the first rerank_k matches of each item re-scored by local features
    # (gateway/rerank.py); 0 = off.
    rerank_k: int = 0
    # SIGNATURE_KIND_BLCF only: the index re-scores each item's first spatial_rerank_k candidates
    # by their best window, with average query expansion over the first query_expansion; 0 = off.
    spatial_rerank_k: int = 0
    query_expansion: int = 0


@dataclass
class FoundItem:
    """One product found in a photo, with its catalogue matches."""

    box: np.ndarray  # (4,) float32 xyxy original pixels
    source: Source
    confidence: float
    class_name: str
    category: str
    matches: list[CatalogueMatch] = field(default_factory=list)
    warning: str = ""
    degraded: Degraded | None = None
    category_margin: float = 0.0
    reranked: bool = False


@dataclass
class Timings:
    decode_ms: float = 0.0
    detect_ms: float = 0.0
    locate_ms: float = 0.0
    sign_ms: float = 0.0
    search_ms: float = 0.0
    rerank_ms: float = 0.0


@dataclass
class SearchOutcome:
    items: list[FoundItem]
    width: int
    height: int
    proposals: int
    timings: Timings
    # Categories that should have been searched but could not be, by name ("" first when a backend's
    # categories are unknown).
    failed: list[CategoryFailure] = field(default_factory=list)


@dataclass
class CatalogueImage:
    """One image of IndexProducts, not decoded yet."""

    product_id: str
    category: str
    image_id: str
    encoded: bytes | None
    raw: tuple[int, int, bytes] | None  # (width, height, RGB bytes)
    box: np.ndarray | None  # (4,) float32 xyxy original pixels, when the caller gave one
    metadata: dict[str, str]
    # The product's attributes from now on (every kind's database); None keeps those it has.
    attributes: ProductAttributes | None = None
    image_uri: str = ""  # the caller's URI of the image ("" = none)
    # Why the servicer could not convert it (e.g. bad attributes): refused in its turn, as
    # check_image's refusals are, so that the images before it are stored and it is named.
    refusal: InvalidArgument | None = None


@dataclass
class IndexedImage:
    product_id: str
    image_id: str
    category: str
    box: np.ndarray  # (4,) float32 xyxy original pixels
    source: Source


class IngestError(ServiceError):
    """Ingestion stopped by `cause` (a refused image, a failing back end, the client's cancel), with
    the cause's code, reason, quota and retry advice. `indexed` holds what was stored before it;
    the message says where and how many; `info` gives the counts (stored_images, stored_products)
    and, for a refused image, its place (refused_request); a refused image is also a BadRequest
    violation `requests[N]` (the Nth message of the stream, from 0), its own fields under it
    (`requests[N].box`)."""

    def __init__(self, message: str, cause: ServiceError, indexed: list[IndexedImage], refused: int | None = None):
        info = {
            **cause.info,
            "stored_images": str(len(indexed)),
            "stored_products": str(len({i.product_id for i in indexed})),
        }
        violations: list[tuple[str, str]] = []
        if refused is not None:
            info["refused_request"] = str(refused)
            violations = [(f"requests[{refused}]", cause.message[:300])]
            violations += [(f"requests[{refused}].{f}", d) for f, d in cause.violations]
        super().__init__(
            message,
            violations=violations,
            quota=cause.quota,
            info=info,
            reason=cause.reason,
            retry_after_s=cause.retry_after_s,
        )
        self.status = cause.status
        self.indexed = indexed


@dataclass
class _Candidate:
    """A proposal while it is being judged."""

    proposal: Proposal
    categories: list[str]  # where it is searched
    fixed: bool  # its category is given (detector class, region), not decided
    # category -> its answer, a warning (no catalogue there), or why it could not be searched
    answers: dict[str, BatchAnswer | str | CategoryFailure] = field(default_factory=dict)
    # Categories it would have been compared over but whose index did not answer the listing.
    unsearched: list[CategoryFailure] = field(default_factory=list)
    category: str = ""
    margin: float = 0.0
    ambiguous: str = ""
    best: float = -np.inf  # its best match's score over the categories searched
    product: str = ""  # and that match's product
    reranked: bool = False  # its first matches were re-scored by local features
    rerank_warning: str = ""  # why they could not be


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def split_calls(crops: list[np.ndarray], limit: int, max_bytes: int) -> list[list[np.ndarray]]:
    """Crops in as few calls as `limit` images per call allows, of even sizes (40 crops under a
    limit of 32: 20 + 20, not 32 + 8, so parallel calls end together), each under `max_bytes`
    unless a single crop is larger."""
    calls = -(-len(crops) // max(limit, 1))
    bounds = [len(crops) * i // calls for i in range(calls + 1)]
    chunks: list[list[np.ndarray]] = []
    for first, end in itertools.pairwise(bounds):
        chunk: list[np.ndarray] = []
        size = 0
        for image in crops[first:end]:
            if chunk and size + image.nbytes > max_bytes:
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append(image)
            size += image.nbytes
        chunks.append(chunk)
    return chunks


def _unsearchable(failed: list[CategoryFailure]) -> str:
    """Why a search failed as a whole: no category could be searched (bounded, whatever the number
    of categories)."""
    by_backend: dict[str, list[CategoryFailure]] = {}
    for failure in failed:
        by_backend.setdefault(failure.backend, []).append(failure)
    parts = []
    for backend, failures in list(by_backend.items())[:3]:
        names = [quote(f.category) for f in failures if f.category]
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        parts.append(
            f"the index at {backend} ({failures[0].code}{'; categories ' + listed if names else ''}): "
            f"{failures[0].reason[:300]}"
        )
    return "no catalogue category could be searched: " + "; ".join(parts) + "; retry when the index is back"


def _stored(images: Iterable[IndexedImage]) -> str:
    """'3 images of 2 products were stored' (exact: what the index holds from this call)."""
    images = list(images)
    products = len({i.product_id for i in images})
    return (
        f"{len(images)} image{'s' if len(images) != 1 else ''} of {products} "
        f"product{'s' if products != 1 else ''} {'were' if len(images) != 1 else 'was'} stored"
    )


def merge_detections(
    outputs: list[DetectorOutput], same_iou: float, objects_iou: float, max_objects: int
) -> DetectorOutput:
    """Several detector models' answers about one image as one: of detections of one category (or,
    for a class that is not a product, of one class) overlapping by IoU >= same_iou, the most
    confident stays (two models seeing one object make one item, named by that model's class);
    of class-agnostic boxes overlapping by IoU >= objects_iou, the most object-like stays, at most
    max_objects (0 = no cap), best first. One answer is returned as it is."""
    if len(outputs) == 1:
        return outputs[0]
    detections = sorted((d for output in outputs for d in output.detections), key=lambda d: -d[3])
    kept: list[tuple[np.ndarray, str, str, float]] = []
    for detection in detections:
        box, name, category, _ = detection
        same = [k[0] for k in kept if (k[2] == category if category else not k[2] and k[1] == name)]
        if same and _overlaps(box, same, same_iou):
            continue
        kept.append(detection)
    objects: list[tuple[np.ndarray, float]] = []
    for candidate in sorted((o for output in outputs for o in output.objects), key=lambda o: -o[1]):
        if max_objects and len(objects) >= max_objects:
            break
        if not (objects and _overlaps(candidate[0], [o[0] for o in objects], objects_iou)):
            objects.append(candidate)
    return DetectorOutput(kept, objects, max(output.inference_ms for output in outputs))


def _overlaps(box: np.ndarray, others: list[np.ndarray], threshold: float) -> bool:
    """Whether (4,) xyxy `box` overlaps any of `others` by IoU >= threshold."""
    ious = iou_matrix(box[None].astype(np.float64), np.stack(others).astype(np.float64))[0]
    return bool((ious >= threshold).any())


def image_id_of(data: bytes) -> str:
    """A catalogue image's id when the caller gives none: its content, so a re-send replaces it."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class Pipeline:
    def __init__(
        self,
        config: GatewayConfig,
        detector: Detector,
        locator: Locator,
        signer: Signer,
        index: Index,
        pool: ThreadPoolExecutor,
    ):
        self.config = config
        self.detector, self.locator, self.signer, self.index = detector, locator, signer, index
        self.pool = pool
        self.default_sources = frozenset(Source(s) for s in config.default_sources)
        self.rerank_settings = RerankSettings.of(config)

    # -- decoding ------------------------------------------------------------------------------------

    def decode(self, encoded: bytes | None, raw: tuple[int, int, bytes] | None) -> Photo:
        """The photo, decoded once and at most decode_max_side on its longer side."""
        try:
            if encoded is not None:
                return decode_photo(encoded, self.config.max_pixels, self.config.decode_max_side)
            if raw is not None:
                return raw_photo(*raw, self.config.max_pixels, self.config.decode_max_side)
        except ImageError as exc:
            raise InvalidArgument(f"image: {exc}") from None
        raise InvalidArgument("image: no image given: set image.encoded (file bytes) or image.raw (RGB pixels)")

    # -- search --------------------------------------------------------------------------------------

    def search(
        self, photo: Photo, options: SearchOptions, deadline: Deadline, timings: Timings | None = None
    ) -> SearchOutcome:
        timings = timings or Timings()
        config = self.config
        width, height = photo.rgb.shape[1], photo.rgb.shape[0]
        if options.regions:
            proposals = []
            for box, category in options.regions:
                clipped = photo.to_shrunk(clip_box(box, photo.width, photo.height))
                proposals.append(Proposal(clipped.astype(np.float32), Source.USER_REGION, 1.0, "", category))
        else:
            proposals = self._localise(
                photo.rgb, options.sources or self.default_sources, options.min_confidence, deadline, timings
            )
            proposals.append(Proposal(np.array([0, 0, width, height], np.float32), Source.WHOLE_IMAGE, 1.0))
        # Regions that all name their category leave nothing to select: sign them once, as asked.
        named = bool(options.regions) and all(category for _, category in options.regions)
        selection = options.kind if named else config.selection_kind
        candidates = self._plan(proposals, selection, options.categories)

        same_kind = options.kind == selection
        # Enough matches per item for the second stage to choose from.
        depth = max(options.top_k, options.rerank_k)
        spatial = None
        if options.kind == "blcf" and options.spatial_rerank_k:
            spatial = SpatialRerank(options.spatial_rerank_k, options.query_expansion)
        signatures = self._sign_boxes(photo, [c.proposal.box for c in candidates], selection, deadline, timings)
        answered: set[str] = set()
        self._search(
            candidates,
            signatures,
            selection,
            depth if same_kind else 1,
            deadline,
            timings,
            answered,
            options.filter,
            spatial if same_kind else None,
        )
        for candidate in candidates:
            self._decide(candidate)
        chosen = self._select(candidates, options)

        if not same_kind and chosen:
            final = [self._replan(c, options.kind) for c in chosen]
            signatures = self._sign_boxes(photo, [c.proposal.box for c in chosen], options.kind, deadline, timings)
            self._search(final, signatures, options.kind, depth, deadline, timings, answered, options.filter, spatial)
            chosen = final
        if options.rerank_k and chosen:
            self._rerank(chosen, photo, options.rerank_k, deadline, timings)
        failed = self._failures(candidates + chosen)
        if failed and not answered:
            raise Unavailable(_unsearchable(failed))
        items = [self._item(c, options, photo) for c in chosen]
        return SearchOutcome(
            items, photo.width, photo.height, len(proposals) - (0 if options.regions else 1), timings, failed
        )

    @staticmethod
    def _failures(candidates: list[_Candidate]) -> list[CategoryFailure]:
        """Every category that could not be searched for some candidate, once (the latest failure
        of each); a category unsearched only matters to candidates that would have been compared
        over it (not to a region or a detector class that names its own)."""
        failed: dict[str, CategoryFailure] = {}
        for candidate in candidates:
            failed.update((f.category, f) for f in candidate.unsearched)
            failed.update((c, a) for c, a in candidate.answers.items() if isinstance(a, CategoryFailure))
        return [failed[c] for c in sorted(failed)]

    def _localise(
        self, rgb: np.ndarray, sources: frozenset[Source], min_confidence: float, deadline: Deadline, timings: Timings
    ) -> list[Proposal]:
        """Proposals of every source asked for, in pixels of `rgb`, merged and capped."""
        config = self.config
        calls: dict[str, Future] = {}
        detect_calls: list[Future] = []
        small = rgb
        if sources & {Source.DETECTOR, Source.OBJECTNESS}:
            small = shrink(rgb, config.detector_side)
            objectness = config.objectness_threshold if Source.OBJECTNESS in sources else 0.0
            detect_calls = self._detect_calls(small, min_confidence, objectness, config.max_objects, deadline)
        if sources & {Source.SALIENT, Source.SEGMENT}:
            small_l = shrink(rgb, config.locate_side)
            salient = config.max_salient if Source.SALIENT in sources else 0
            segments = config.max_segments if Source.SEGMENT in sources else 0

            def locate():
                start = time.perf_counter()
                return self.locator.locate(small_l, salient, segments, deadline.remaining()), small_l, _ms(start)

            calls["locate"] = self.pool.submit(locate)
        proposals: list[Proposal] = []
        height, width = rgb.shape[:2]
        if detect_calls:
            found, timings.detect_ms = self._detected(detect_calls, config.max_objects)
            factor = width / small.shape[1]
            if Source.DETECTOR in sources:
                proposals += [
                    Proposal(clip_box(box * factor, width, height), Source.DETECTOR, confidence, name, category)
                    for box, name, category, confidence in found.detections
                    if category
                ]
            proposals += [
                Proposal(clip_box(box * factor, width, height), Source.OBJECTNESS, score)
                for box, score in found.objects
            ]
        if "locate" in calls:
            located, small_l, ms = calls["locate"].result()
            timings.locate_ms = ms
            factor = width / small_l.shape[1]
            proposals += [
                Proposal(clip_box(box * factor, width, height), Source.SALIENT, score) for box, score in located.salient
            ]
            proposals += [
                Proposal(clip_box(box * factor, width, height), Source.SEGMENT, score)
                for box, score in located.segments
            ]
        proposals = [p for p in proposals if p.box[2] - p.box[0] >= 2 and p.box[3] - p.box[1] >= 2]
        return merge_proposals(proposals, config.proposal_iou, config.max_proposals)

    def _detect_calls(
        self, rgb: np.ndarray, min_confidence: float, objectness: float, max_objects: int, deadline: Deadline
    ) -> list[Future]:
        """One Detect per model of detector_models, started in parallel -> their futures, each of
        (DetectorOutput, milliseconds)."""

        def detect(model: str) -> tuple[DetectorOutput, float]:
            start = time.perf_counter()
            found = self.detector.detect(
                rgb, min_confidence, objectness, max_objects, deadline.remaining(), model=model
            )
            return found, _ms(start)

        return [self.pool.submit(detect, model) for model in self.config.detector_models]

    def _detected(self, calls: list[Future], max_objects: int) -> tuple[DetectorOutput, float]:
        """The detector models' answers as one (merge_detections), and the slowest call's
        milliseconds; a model that failed fails the whole (the others are cancelled if not started)."""
        try:
            answers = [call.result() for call in calls]
        except BaseException:
            for call in calls:
                call.cancel()
            raise
        found = merge_detections(
            [output for output, _ in answers], self.config.item_iou, self.config.proposal_iou, max_objects
        )
        return found, max(ms for _, ms in answers)

    def _plan(self, proposals: list[Proposal], kind: str, restrict: Sequence[str]) -> list[_Candidate]:
        """Where each proposal is searched: its own category when it has a catalogue (or is a
        region's), else every category (the request's, when it restricts them). A category whose
        index did not answer its listing is searched only when named (a backend that is down or
        silent must not hold every query up); a candidate compared over every category keeps it
        as unsearched."""
        reachable = self.index.categories(kind)
        down = self.index.unreachable()
        unreachable = {f.category for f in down if f.category}
        available = reachable | unreachable
        wanted = set(restrict)
        allowed = sorted(available & wanted) if restrict else sorted(reachable)
        # In scope: what the request names (a named category that is nowhere known may be on a
        # backend whose categories are unknown), else every category.
        unsearched = [
            f
            for f in down
            if (f.category and f.category not in allowed and (not restrict or f.category in wanted))
            or (not f.category and (not restrict or wanted - available))
        ]
        candidates = []
        for proposal in proposals:
            own = proposal.category
            user_drawn = own and proposal.source is Source.USER_REGION
            if user_drawn or (own and own in available and (not restrict or own in restrict)):
                candidates.append(_Candidate(proposal, [own], True))
            else:
                candidates.append(_Candidate(proposal, list(allowed), False, unsearched=list(unsearched)))
        return candidates

    def _replan(self, chosen: _Candidate, kind: str) -> _Candidate:
        """The chosen item, to be searched with another kind: in its category, or (ambiguous) in
        the categories it was compared over."""
        categories = (
            [chosen.category] if chosen.category else [c for c in chosen.categories if c in self.index.categories(kind)]
        )
        again = _Candidate(chosen.proposal, categories, True, unsearched=chosen.unsearched)
        again.category, again.margin, again.ambiguous = chosen.category, chosen.margin, chosen.ambiguous
        # Why the choice of category may be wrong stays with the item.
        again.answers.update(
            (c, a) for c, a in chosen.answers.items() if isinstance(a, CategoryFailure) and c not in categories
        )
        return again

    def _sign(
        self, crops: list[np.ndarray], kinds: Sequence[SignatureKind], deadline: Deadline, timings: Timings
    ) -> list[list[Signature]]:
        """Signatures [crop][kind], in calls of at most the signature service's limit (as its
        ListKinds advertises it, else signature_call_images), in parallel, all within the request's
        deadline."""
        if not crops:
            return []
        start = time.perf_counter()
        limit = self.signer.images_per_call(deadline.remaining()) or self.config.signature_call_images
        chunks = split_calls(crops, limit, self.config.signature_call_bytes)
        futures = [
            self.pool.submit(lambda chunk: self.signer.sign(chunk, kinds, deadline.remaining()), chunk)
            for chunk in chunks
        ]
        try:
            out = [signatures for future in futures for signatures in future.result()]
        except BaseException:
            for future in futures:
                future.cancel()  # the chunks not started yet: the request has failed
            raise
        timings.sign_ms += _ms(start)
        return out

    def _sign_boxes(
        self, photo: Photo, boxes: list[np.ndarray], kind: SignatureKind, deadline: Deadline, timings: Timings
    ) -> list[Signature]:
        """One signature of `kind` per (4,) xyxy box in pixels of `photo.rgb`: its crop signed, or,
        for SIGNATURE_KIND_BLCF, the cells of the photo's map inside it (_sign_regions)."""
        if kind == "blcf":
            return self._sign_regions(photo, boxes, deadline, timings)
        crops = [crop(photo.rgb, box, self.config.crop_max_side) for box in boxes]
        return [signed[0] for signed in self._sign(crops, [kind], deadline, timings)]

    def _sign_regions(
        self, photo: Photo, boxes: list[np.ndarray], deadline: Deadline, timings: Timings
    ) -> list[Signature]:
        """Query by region: the photo, shrunk to blcf_side, described once with every box as a
        region (in calls of at most the signature service's limit of images, which bounds regions
        too, in parallel) -> one BLCF signature per box."""
        if not boxes:
            return []
        start = time.perf_counter()
        small = Photo(shrink(photo.rgb, self.config.blcf_side), photo.width, photo.height)
        regions = [small.to_shrunk(photo.to_original(box)).astype(np.float32) for box in boxes]
        limit = self.signer.images_per_call(deadline.remaining()) or self.config.signature_call_images
        calls = -(-len(regions) // max(limit, 1))
        bounds = [len(regions) * i // calls for i in range(calls + 1)]
        futures = [
            self.pool.submit(self.signer.sign_regions, small.rgb, regions[first:end], deadline.remaining())
            for first, end in itertools.pairwise(bounds)
        ]
        try:
            out = [signature for future in futures for signature in future.result()]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        timings.sign_ms += _ms(start)
        return out

    def _search(
        self,
        candidates: list[_Candidate],
        signatures: list[Signature],
        kind: str,
        top_k: int,
        deadline: Deadline,
        timings: Timings,
        answered: set[str],
        filter: Filter | None = None,
        spatial: SpatialRerank | None = None,
    ) -> None:
        """One SearchBatch per category holding every candidate searched there, all in parallel,
        among the products passing `filter` (BLCF: the first `spatial.top_k` spatially re-ranked,
        all of them returned); the categories whose index answered (a missing database is an
        answer) join `answered`."""
        start = time.perf_counter()
        if spatial is not None:
            # Every re-ranked candidate comes back, whatever the index's first stage keeps beyond
            # top_k: the re-ordering is among them all.
            top_k = max(top_k, spatial.top_k)
        by_category: dict[str, list[int]] = {}
        for number, candidate in enumerate(candidates):
            for category in candidate.categories:
                by_category.setdefault(category, []).append(number)
        timeout = deadline.remaining(self.config.reply_reserve_s)

        def run(category: str, numbers: list[int]) -> BatchAnswer | str | CategoryFailure:
            try:
                return self.index.search_batch(
                    category, kind, [signatures[n] for n in numbers], top_k, timeout, filter=filter, spatial=spatial
                )
            except NotFound:
                return f"no catalogue for category {quote(category)} yet"
            except ServiceError as exc:
                return CategoryFailure(category, exc.status, str(exc), self.index.backend_of(category))

        futures = {category: self.pool.submit(run, category, numbers) for category, numbers in by_category.items()}
        for category, future in futures.items():
            answer = future.result()
            if not isinstance(answer, CategoryFailure):
                answered.add(category)
            for position, number in enumerate(by_category[category]):
                if isinstance(answer, (str, CategoryFailure)):
                    candidates[number].answers[category] = answer
                else:
                    candidates[number].answers[category] = BatchAnswer([answer.results[position]], answer.degraded)
        timings.search_ms += _ms(start)

    def _rerank(self, chosen: list[_Candidate], photo: Photo, k: int, deadline: Deadline, timings: Timings) -> None:
        """The second stage: each chosen item's first k matches in every category it was searched
        in, re-scored by local features (gateway/rerank.py). The candidates' features come from
        the index, one call per category (from the database of the first indexed kind, where
        ingest stores them with the thumbnail), while the items' crops are described here."""
        start = time.perf_counter()
        stored_kind = self.config.index_kinds[0]
        wanted: dict[str, set[str]] = {}
        for candidate in chosen:
            for category, answer in candidate.answers.items():
                if isinstance(answer, BatchAnswer) and answer.results[0]:
                    wanted.setdefault(category, set()).update(rerank.candidates(answer.results[0], k))
        if not wanted:
            return
        timeout = deadline.remaining(self.config.reply_reserve_s)

        def fetch(category: str, item_ids: list[str]) -> dict[str, Features] | ServiceError:
            try:
                return self.index.local_features(category, stored_kind, item_ids, timeout)
            except ServiceError as exc:
                return exc

        # The fetches go first: each item's task (describe its crop, then verify) waits only on
        # fetches already taken from the pool's queue, never on a task queued behind it.
        fetches = {category: self.pool.submit(fetch, category, sorted(ids)) for category, ids in wanted.items()}
        settings = self.rerank_settings

        def second_stage(candidate: _Candidate) -> None:
            features = local_features.extract(
                crop(photo.rgb, candidate.proposal.box, self.config.crop_max_side), settings.extractor
            )
            for category, answer in candidate.answers.items():
                if not isinstance(answer, BatchAnswer) or not answer.results[0] or category not in fetches:
                    continue
                got = fetches[category].result()
                if isinstance(got, ServiceError):
                    candidate.rerank_warning = f"not re-ranked in {quote(category)}: {got}"
                    continue
                answer.results[0] = rerank.rerank(answer.results[0], features, got, k, settings)
                # Re-ranked when some candidate had features (ingested without: nothing verified).
                candidate.reranked |= any(m.verified for m in answer.results[0])

        for job in [self.pool.submit(second_stage, c) for c in chosen]:
            job.result()
        timings.rerank_ms += _ms(start)

    def _decide(self, candidate: _Candidate) -> None:
        """Its category (given, or the one whose best match is clearly best) and best score."""
        firsts = {
            c: a.results[0][0] for c, a in candidate.answers.items() if isinstance(a, BatchAnswer) and a.results[0]
        }
        bests = {c: match.score for c, match in firsts.items()}
        if firsts:
            top = max(firsts.values(), key=lambda m: m.score)
            candidate.best, candidate.product = top.score, top.product_id
        if candidate.fixed:
            candidate.category = candidate.categories[0]
            return
        ranked = sorted(bests.items(), key=lambda kv: -kv[1])
        if not ranked:
            return
        if len(ranked) == 1:
            candidate.category = ranked[0][0]
            return
        (first, s1), (second, s2) = ranked[0], ranked[1]
        candidate.margin = s1 - s2
        if candidate.margin >= self.config.category_margin:
            candidate.category = first
        else:
            candidate.ambiguous = (
                f"no category is clearly best: {first!r} ({s1:.3f}) and {second!r} "
                f"({s2:.3f}) are within {self.config.category_margin}"
            )

    def _select(self, candidates: list[_Candidate], options: SearchOptions) -> list[_Candidate]:
        """The candidates that are items: regions and detector classes always; class-agnostic ones
        with a clear category and a good best match; one item per product and place; exclusive
        categories settled by confidence; the whole image only when nothing else qualifies."""
        config = self.config
        regions = [c for c in candidates if c.proposal.source is Source.USER_REGION]
        if regions:
            return regions
        pool = [
            c
            for c in candidates
            if c.proposal.source is Source.DETECTOR
            or (
                c.proposal.source in LOCALISING
                and c.category
                and not c.ambiguous
                and c.best >= config.proposal_min_score
            )
        ]
        # Detector classes first (they carry a class), then the best matches.
        pool.sort(
            key=lambda c: (
                c.proposal.source is not Source.DETECTOR,
                -(c.proposal.confidence if c.proposal.source is Source.DETECTOR else c.best),
            )
        )
        kept: list[_Candidate] = []
        for candidate in pool:
            if not any(self._same_item(candidate, other) for other in kept):
                kept.append(candidate)
        if config.box_vote_sharpness > 0:
            kept = [self._voted(c, candidates) for c in kept]
        if kept:
            labels = [c.proposal.class_name or c.category for c in kept]
            order_score = np.array([len(kept) - i for i in range(len(kept))], np.float64)
            keep = resolve_exclusive(
                np.stack([c.proposal.box for c in kept]),
                order_score,
                labels,
                config.exclusive_groups,
                config.exclusive_iou,
            )
            kept = [kept[i] for i in sorted(keep)]
        kept = kept[: options.max_items or config.max_items]
        if not kept:
            kept = [c for c in candidates if c.proposal.source is Source.WHOLE_IMAGE]
        return kept

    def _voted(self, item: _Candidate, candidates: list[_Candidate]) -> _Candidate:
        """A class-agnostic item's box as the vote of every candidate that found the same product
        around it (box voting, Gidaris & Komodakis 2015), weighted by exp(sharpness x (score - the
        item's score)): the best-scoring box alone is often too loose or too tight, the weighted
        mean of its neighbours is closer to the object."""
        if item.proposal.source is Source.DETECTOR:
            return item
        voters = [
            c
            for c in candidates
            if c.proposal.source in LOCALISING
            and c.product == item.product
            and overlap_of_smaller(c.proposal.box, item.proposal.box) >= self.config.same_product_overlap
        ]
        if len(voters) < 2:
            return item
        weights = np.exp(self.config.box_vote_sharpness * (np.array([c.best for c in voters]) - item.best))
        box = (np.stack([c.proposal.box for c in voters]) * weights[:, None]).sum(axis=0) / weights.sum()
        return dataclasses.replace(item, proposal=dataclasses.replace(item.proposal, box=box.astype(np.float32)))

    def _same_item(self, candidate: _Candidate, other: _Candidate) -> bool:
        """Two candidates that are one product in one place: one category and a large overlap, or
        the same best product on overlapping boxes (one product shown twice in a photo would be
        two separate places; two looser or tighter boxes of one object overlap)."""
        a, b = candidate.proposal, other.proposal
        if a.source is Source.DETECTOR and b.source is Source.DETECTOR:
            return False  # the detector's own NMS and the exclusive groups settle these
        iou = float(iou_matrix(a.box[None].astype(np.float64), b.box[None].astype(np.float64))[0, 0])
        if candidate.category and candidate.category == other.category and iou >= self.config.item_iou:
            return True
        return bool(
            candidate.product
            and candidate.product == other.product
            and overlap_of_smaller(a.box, b.box) >= self.config.same_product_overlap
        )

    def _item(self, candidate: _Candidate, options: SearchOptions, photo: Photo) -> FoundItem:
        proposal = candidate.proposal
        item = FoundItem(
            photo.to_original(proposal.box).astype(np.float32),
            proposal.source,
            proposal.confidence,
            proposal.class_name,
            candidate.category,
            category_margin=candidate.margin,
        )
        if proposal.source is Source.USER_REGION and proposal.category:
            item.category = proposal.category
        item.reranked = candidate.reranked
        warnings = [a for a in candidate.answers.values() if isinstance(a, str)]
        if candidate.rerank_warning:
            warnings.append(candidate.rerank_warning)
        failures = [a for a in candidate.answers.values() if isinstance(a, CategoryFailure)] + candidate.unsearched
        answers = [
            a
            for c, a in candidate.answers.items()
            if isinstance(a, BatchAnswer) and (not candidate.category or c == candidate.category)
        ]
        if candidate.ambiguous:
            warnings.insert(0, candidate.ambiguous)
        matches = sorted((m for a in answers for m in a.results[0]), key=lambda m: (-m.score, m.product_id))
        floor = self._min_score(item.category, options)
        item.matches = [m for m in matches if m.score >= floor][: options.top_k]
        if matches and not item.matches:
            warnings.append(
                f"no catalogue product scores {floor:.3f} or more (min_score): the best is "
                f"{matches[0].product_id!r} at {matches[0].score:.3f}"
            )
        degraded = [a.degraded for a in answers if a.degraded is not None]
        if degraded:
            item.degraded = degraded[0]
            warnings.append(
                f"part of the {item.category or 'catalogue'!r} index did not answer "
                f"({degraded[0].reason}); matches are exact over the rest"
            )
        if failures:
            # Its category could not be searched, or (class-agnostic) its category was chosen
            # without some: see the response's failed_categories.
            names = sorted({quote(f.category) if f.category else f"the categories at {f.backend}" for f in failures})
            reason = (
                f"{', '.join(names[:5])}{f' and {len(names) - 5} more' if len(names) > 5 else ''} "
                f"could not be searched ({failures[0].code})"
            )
            if item.degraded is None:
                item.degraded = Degraded(reason)
            warnings.append(reason + ": matches are over the rest only")
        own = candidate.answers.get(candidate.category) if candidate.category else None
        if isinstance(own, str):  # no catalogue in its own category: that says it all
            warnings = [own]
        item.warning = "; ".join(dict.fromkeys(warnings))
        return item

    def _min_score(self, category: str, options: SearchOptions) -> float:
        if options.min_score is not None:
            return options.min_score
        return self.config.category_min_score.get(category, {}).get(
            options.kind, self.config.min_score.get(options.kind, 0.0)
        )

    # -- ingestion -----------------------------------------------------------------------------------

    def localise_product(self, photo: Photo, category: str, deadline: Deadline) -> tuple[np.ndarray, Source]:
        """Where a catalogue image's product is, in pixels of `photo.rgb`: the detector's most
        confident box of the product's category; else, on a plain backdrop (a catalogue shot), the
        salient object; else (a product in a room or on a model) the most object-like box; else the
        salient object, when it is big enough to be the product; else the whole image.

        Measured on bench/scenes.py's catalogue: on white, the salient object covers the product
        best (median IoU 0.90, the best objectness box 0.69); in a room the objectness box does
        (0.53 against 0.39)."""
        config = self.config
        rgb = photo.rgb
        height, width = rgb.shape[:2]
        small, small_l = shrink(rgb, config.detector_side), shrink(rgb, config.locate_side)
        detected = self._detect_calls(small, 0.0, config.ingest_min_objectness, 5, deadline)
        located = self.pool.submit(self.locator.locate, small_l, 1, 0, deadline.remaining())
        found, _ = self._detected(detected, 5)
        ours = [(confidence, box) for box, _, box_category, confidence in found.detections if box_category == category]
        if ours:
            box = max(ours, key=lambda pair: pair[0])[1] * (width / small.shape[1])
            return clip_box(box, width, height), Source.DETECTOR

        def big(boxes: list[np.ndarray]) -> list[np.ndarray]:
            # A catalogue image is about its product: a small box is a detail (a label, a light).
            return [b for b in boxes if (b[2] - b[0]) * (b[3] - b[1]) >= config.ingest_min_area * width * height]

        salient = big(
            [clip_box(box * (width / small_l.shape[1]), width, height) for box, _ in located.result().salient]
        )
        if salient and plain_background(rgb):
            return salient[0], Source.SALIENT
        objects = big([clip_box(box * (width / small.shape[1]), width, height) for box, _ in found.objects])
        if objects:
            return objects[0], Source.OBJECTNESS
        if salient:
            return salient[0], Source.SALIENT
        return np.array([0, 0, width, height], np.float32), Source.WHOLE_IMAGE

    def check_image(self, image: CatalogueImage) -> None:
        """Raises InvalidArgument (what to fix) for a catalogue image the index would refuse, so that
        it is refused before anything of it is written."""
        config = self.config
        check_id("product_id", image.product_id, config.max_id_bytes, required=True)
        check_id("image_id", image.image_id, config.max_id_bytes, required=False)
        check_name("category", image.category)
        if IMAGE_URI_KEY in image.metadata:
            raise InvalidArgument(
                f"metadata key {IMAGE_URI_KEY!r} is the gateway's own (where image_uri is kept): "
                "use another key, and set image_uri for the image's URI",
                violations=[("metadata", f"key {IMAGE_URI_KEY!r} is reserved")],
            )
        check_metadata(image.metadata, config)
        if image.image_uri:
            check_image_uri(image.image_uri, config.max_image_uri_bytes)
            try:
                check_metadata({**image.metadata, IMAGE_URI_KEY: image.image_uri}, config)
            except InvalidArgument as exc:
                raise InvalidArgument(
                    f"{exc.message} (image_uri is stored with the metadata and counts in its limits)",
                    violations=[("metadata", "with image_uri, over the metadata limits")],
                ) from None
        if image.refusal is not None:
            raise image.refusal

    def ingest(self, images: Iterable[CatalogueImage], deadline: Deadline) -> list[IndexedImage]:
        """Localises, signs (the product's crop with every index kind in one call; BLCF signs the
        whole image) and adds catalogue images in batches -> the distinct images stored, in the
        order of their first appearance (an image sent twice is stored once: the last one sent).

        Nothing is stored before the end: the index streams stay open and are ended normally (so
        the index stores them) only when the images end normally. `images` raising Cancelled (the
        client went away) stores nothing: IngestError with its message. A refused image
        (InvalidArgument, ResourceExhausted) or a failing back end raises IngestError after the
        images before it are stored; its message says exactly how many were, and its details name
        the refused image (see IngestError)."""
        config = self.config
        writer = self.index.writer(deadline.remaining())
        # Sent to the index, by (category, product, image): the last one sent, at its first place.
        sent: dict[tuple[str, str, str], IndexedImage] = {}
        batch: list[tuple[CatalogueImage, Photo]] = []

        def flush() -> None:
            if batch:
                for report in self._ingest_batch(batch, writer, deadline):
                    sent[(report.category, report.product_id, report.image_id)] = report
                batch.clear()

        def stored(failed: dict[str, Exception]) -> list[IndexedImage]:
            return [report for (category, _, _), report in sent.items() if category not in failed]

        where = ""
        refused: int | None = None
        try:
            for position, image in enumerate(images):
                try:
                    if position >= config.max_images_per_stream:
                        raise ResourceExhausted(
                            f"send at most {config.max_images_per_stream} images per "
                            "IndexProducts stream: split the ingest into several streams",
                            quota=[("images", f"at most {config.max_images_per_stream} per IndexProducts stream")],
                        )
                    self.check_image(image)
                    photo = self.decode(image.encoded, image.raw)
                    if "blcf" in config.index_kinds and max(photo.width, photo.height) > 0xFFFF:
                        raise InvalidArgument(
                            f"image is {photo.width}x{photo.height} pixels; a catalogue indexed with "
                            "SIGNATURE_KIND_BLCF takes at most 65535 a side (its assignment map's format): "
                            "downscale it",
                            violations=[("image", f"{photo.width}x{photo.height}, above 65535 a side")],
                        )
                    if image.box is not None:
                        problem = valid_box(image.box, photo.width, photo.height)
                        if problem:
                            raise InvalidArgument(f"box {problem}", violations=[("box", problem)])
                except (InvalidArgument, ResourceExhausted):
                    flush()  # every image before the refused one is stored, and the error says so
                    where = f"product #{position} ({quote(image.product_id)}): "
                    refused = position
                    raise
                if not image.image_id:  # (decode() has refused an image with neither encoded nor raw bytes)
                    raw = image.raw[2] if image.raw is not None else b""
                    image.image_id = image_id_of(image.encoded if image.encoded is not None else raw)
                batch.append((image, photo))
                if len(batch) >= config.ingest_batch:
                    flush()
            flush()
        except Cancelled as exc:
            writer.cancel()
            raise IngestError(exc.message, exc, []) from None
        except ServiceError as exc:
            failed = writer.commit()
            kept = stored(failed)
            lost = f", none of categories {sorted(failed)[:5]} (their index failed too)" if failed else ""
            raise IngestError(
                f"{where}{exc}; {_stored(kept)} (those before it in the stream{lost}): fix it and "
                "re-send from there (a re-sent image replaces itself)",
                exc,
                kept,
                refused,
            ) from None
        except BaseException:
            writer.cancel()
            raise
        failed = writer.commit()
        if failed:
            kept = stored(failed)
            error = next(iter(failed.values()))
            cause = error if isinstance(error, ServiceError) else Unavailable(str(error))
            raise IngestError(
                f"{error}; {_stored(kept)}: none of categories {sorted(failed)[:5]}, whose index failed: re-send those",
                cause,
                kept,
            )
        return list(sent.values())

    def _ingest_batch(
        self, batch: list[tuple[CatalogueImage, Photo]], writer: CatalogueWriter, deadline: Deadline
    ) -> list[IndexedImage]:
        """Localises and signs a batch and sends it to the index -> what was sent."""
        config = self.config

        def place(pair: tuple[CatalogueImage, Photo]) -> tuple[np.ndarray, Source]:
            image, photo = pair
            if image.box is not None:
                return photo.to_shrunk(clip_box(image.box, photo.width, photo.height)), Source.USER_REGION
            return self.localise_product(photo, image.category, deadline)

        # Thumbnails (~15 ms each from a 2000-px photo) and local features (the whole image: a
        # localised box that misses part of the product must not cost the verification its
        # keypoints) are made beside the localisation.
        thumbnails = [self.pool.submit(self.thumbnail, photo.rgb) for _, photo in batch]
        described = [
            self.pool.submit(local_features.extract, photo.rgb, self.rerank_settings.extractor)
            if config.ingest_local_features
            else None
            for _, photo in batch
        ]
        placed = list(self.pool.map(place, batch))
        kinds = list(config.index_kinds)
        # Every kind but BLCF signs the product's crop, all in one call; BLCF signs the whole image
        # (the index's windows find the product in it), its map covering the original's pixels.
        of_crops = [kind for kind in kinds if kind != "blcf"]
        signed_crops: list[list[Signature]] = [[] for _ in batch]
        if of_crops:
            crops = [crop(photo.rgb, box, config.crop_max_side) for (_, photo), (box, _) in zip(batch, placed)]
            signed_crops = self._sign(crops, of_crops, deadline, Timings())
        maps: list[Signature] = [None] * len(batch)
        if "blcf" in kinds:
            wholes = [shrink(photo.rgb, config.blcf_side) for _, photo in batch]
            maps = [
                self.signer.covering(signed[0], photo.width, photo.height)
                for signed, (_, photo) in zip(self._sign(wholes, ["blcf"], deadline, Timings()), batch)
            ]
        signatures = []  # [image][kind], in index_kinds order
        for whole, of_crop in zip(maps, signed_crops):
            by_crop = iter(of_crop)
            signatures.append([whole if kind == "blcf" else next(by_crop) for kind in kinds])
        entries, report = [], []
        for (image, photo), (box, source), signed, made, features in zip(
            batch, placed, signatures, thumbnails, described
        ):
            original = photo.to_original(box).astype(np.float32)
            report.append(IndexedImage(image.product_id, image.image_id, image.category, original, source))
            metadata = {**image.metadata, IMAGE_URI_KEY: image.image_uri} if image.image_uri else image.metadata
            # The thumbnail and the local features go with the first kind only (GetProductImage and
            # the re-ranking read them there): every kind's database holds the same images, and
            # once is enough on disk.
            thumbnail = made.result()
            entries += [
                CatalogueEntry(
                    image.product_id,
                    image.image_id,
                    image.category,
                    kind,
                    signature,
                    original,
                    metadata,
                    image.attributes,
                    thumbnail if number == 0 else b"",
                    features.result() if features is not None and number == 0 else None,
                )
                for number, (kind, signature) in enumerate(zip(kinds, signed))
            ]
        writer.add(entries)
        return report

    def thumbnail(self, rgb: np.ndarray) -> bytes:
        """(H, W, 3) uint8 RGB of a whole catalogue image -> the JPEG kept with it: the whole image
        (its box is returned beside it), at most thumbnail_side pixels on its longer side."""
        return encode_jpeg(shrink(rgb, self.config.thumbnail_side), quality=self.config.thumbnail_quality)

    def delete_products(
        self, product_ids: Sequence[str], categories: Sequence[str], deadline: Deadline
    ) -> tuple[int, list[str]]:
        config = self.config
        if not product_ids:
            raise InvalidArgument(
                "product_ids is empty: name the products to delete", violations=[("product_ids", "empty")]
            )
        if len(product_ids) > config.max_delete_ids:
            raise ResourceExhausted(
                f"{len(product_ids)} product_ids in one call, above the limit of "
                f"{config.max_delete_ids}: delete at most {config.max_delete_ids} per call",
                quota=[("product_ids", f"at most {config.max_delete_ids} per DeleteProducts call")],
            )
        for i, product_id in enumerate(product_ids):
            if not product_id:
                raise InvalidArgument(
                    f"product_ids[{i}] is empty: every id must name a product",
                    violations=[(f"product_ids[{i}]", "empty")],
                )
            size = len(product_id.encode("utf-8", "surrogatepass"))
            if size > config.max_id_bytes:
                raise InvalidArgument(
                    f"product_ids[{i}] is {size} UTF-8 bytes, above the limit of "
                    f"{config.max_id_bytes}: no product id is longer",
                    violations=[(f"product_ids[{i}]", f"{size} UTF-8 bytes, above the limit of {config.max_id_bytes}")],
                )
        if len(categories) > config.max_categories:
            raise ResourceExhausted(
                f"{len(categories)} categories in one call, above the limit of "
                f"{config.max_categories}: name at most {config.max_categories}",
                quota=[("categories", f"at most {config.max_categories} per DeleteProducts call")],
            )
        for category in categories:
            check_name("category", category)
        return self.index.delete_products(
            list(dict.fromkeys(product_ids)), list(categories) or None, deadline.remaining()
        )
