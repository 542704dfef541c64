"""One StreamMultiProductSearch stream: frames in, tracked products with their matches out.

A reader thread takes the client's frames off the request stream into a one-slot buffer where the
newest frame wins (FrameSlot): the worker (the servicer's own thread, iterating VideoStream.run)
always processes the newest frame, and the frames it had no time for are reported as skipped, so
memory holds two frames at most however fast the client sends. Per processed frame: decode; a
scene cut resets the tracker; every detection_interval-th frame (and after a cut) the detector
models run (product classes and class-agnostic objectness boxes, as a photo's search asks them)
and the tracker is updated, in between it predicts; the tracks due for a search (gateway.video:
new, grown, sharper or drifted) are searched in one Pipeline.search with their boxes as regions;
the others keep their last matches. A cancel (or the stream's deadline) stops the worker at
once: the frame's deadline drops to nothing, so the downstream calls still to come fail at once
and those in flight end within their own (already short) timeouts.

No gRPC here: the servicer hands over the request iterator, a way to register for the call's end,
and converts the results (FrameResult, StreamSummary) to protobuf.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import Cancelled, DeadlineExceeded, InvalidArgument, ServiceError
from common.images import ImageError, Photo, raw_to_array, shrink
from common.serving import Deadline
from gateway.config import GatewayConfig
from gateway.pipeline import Pipeline, SearchOptions, merge_detections
from gateway.ports import CatalogueMatch, DetectorOutput
from gateway.tracker import Observation, Track, Tracker, cut_detected, iou_matrix
from gateway.video import ReSearch, TrackSummary, VideoSession

__all__ = ["Frame", "FrameResult", "FrameSlot", "StreamDeadline", "StreamSummary", "TrackedItem", "VideoStream"]


@dataclass
class StreamSettings:
    """A stream's options, checked (from the first message's VideoOptions)."""

    search: SearchOptions
    detection_interval: int
    search_every_frame: bool = False


@dataclass
class Frame:
    """One frame as received, not decoded yet."""

    number: int
    timestamp_ms: int
    encoded: bytes | None
    raw: tuple[int, int, bytes] | None  # (width, height, RGB bytes)


@dataclass
class TrackedItem:
    track_id: int
    box: np.ndarray  # (4,) float32 xyxy pixels of the frame
    category: str
    class_name: str
    confidence: float
    matches: list[CatalogueMatch]
    searched: bool
    last_searched_frame: int
    warning: str = ""


@dataclass
class FrameResult:
    number: int
    timestamp_ms: int
    skipped: list[int]
    items: list[TrackedItem]
    searched: bool
    detected: bool
    cut: bool
    width: int
    height: int
    process_ms: float


@dataclass
class StreamSummary:
    tracks: list[TrackSummary]
    received: int
    processed: int
    skipped: int
    detected: int
    searches: int


class StreamDeadline(Deadline):
    """The stream's deadline, which a cancel brings forward to now: every downstream call asked for
    after it gets no time and fails at once."""

    def __init__(self, seconds: float, cancelled: threading.Event):
        super().__init__(seconds)
        self._cancelled = cancelled

    def remaining(self, reserve_s: float = 0.0) -> float:
        if self._cancelled.is_set():
            return 0.001
        return super().remaining(reserve_s)

    def expired(self) -> bool:
        return super().remaining() <= 0.001

    def within(self, seconds: float) -> Deadline:
        """A deadline for one frame: `seconds` from now, or the stream's end if sooner (cancel too)."""
        return StreamDeadline(min(seconds, super().remaining()), self._cancelled)


class FrameSlot:
    """A one-frame buffer between the reader and the worker, the newest frame winning: put()
    replaces a frame not taken yet (its number joins the skipped list); take() waits for a frame
    and returns it with the numbers skipped since the last take."""

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._frame: Frame | None = None
        self._skipped: list[int] = []
        self._ended = False
        self._error: ServiceError | None = None
        self.received = 0
        self.skipped_total = 0

    def put(self, frame: Frame) -> None:
        with self._ready:
            if self._frame is not None:
                self._skipped.append(self._frame.number)
                self.skipped_total += 1
            self._frame = frame
            self.received += 1
            self._ready.notify()

    def end(self, error: ServiceError | None = None) -> None:
        """The request stream ended (normally, or with the error to raise in the worker)."""
        with self._ready:
            self._ended = True
            if error is not None and self._error is None:
                self._error = error
            self._ready.notify()

    def take(self, stop: threading.Event, poll_s: float = 0.05) -> tuple[Frame, list[int]] | None:
        """The newest frame and the frames skipped before it; None when the stream ended and every
        frame was taken. Raises the reader's error, or Cancelled once `stop` is set."""
        with self._ready:
            while True:
                if stop.is_set():
                    raise Cancelled("the client cancelled the stream or its deadline passed")
                if self._error is not None:
                    raise self._error
                if self._frame is not None:
                    frame, skipped = self._frame, self._skipped
                    self._frame, self._skipped = None, []
                    return frame, skipped
                if self._ended:
                    return None
                self._ready.wait(poll_s)


def frame_of(request: Any, position: int, previous: int | None, max_pixels: int) -> Frame:
    """A StreamMultiProductSearchRequest -> Frame, or InvalidArgument naming the frame and what to fix
    (checked as it arrives, so a bad frame is refused even when it would have been dropped)."""
    where = f"frame #{position} (frame_number {request.frame_number})"
    if previous is not None and request.frame_number <= previous:
        raise InvalidArgument(
            f"{where}: frame numbers must increase within a stream; it follows frame_number {previous}",
            violations=[(f"requests[{position}].frame_number", f"not above {previous}")],
        )
    source = request.image.WhichOneof("source") if request.HasField("image") else None
    if source is None:
        raise InvalidArgument(
            f"{where} has no image: set image.encoded (JPEG, PNG... bytes) or image.raw (RGB pixels) on every frame",
            violations=[(f"requests[{position}].image", "no image")],
        )
    if source == "encoded":
        if not request.image.encoded:
            raise InvalidArgument(
                f"{where}: image.encoded is empty: send the encoded frame bytes",
                violations=[(f"requests[{position}].image.encoded", "empty")],
            )
        return Frame(request.frame_number, request.timestamp_ms, request.image.encoded, None)
    raw = request.image.raw
    try:
        raw_to_array(raw.width, raw.height, raw.rgb, max_pixels)  # the checks only (a view, no copy)
    except ImageError as exc:
        raise InvalidArgument(f"{where}: {exc}", violations=[(f"requests[{position}].image.raw", str(exc))]) from None
    return Frame(request.frame_number, request.timestamp_ms, None, (raw.width, raw.height, raw.rgb))


@dataclass
class _TrackState:
    """What the stream knows of a track beyond the tracker and the session."""

    confidence: float = 0.0
    category: str = ""  # the catalogue's choice at its last search, for a class-agnostic track
    warning: str = ""
    last_searched: int = 0
    matches: list[CatalogueMatch] = field(default_factory=list)


class VideoStream:
    def __init__(
        self,
        config: GatewayConfig,
        pipeline: Pipeline,
        settings_of: Callable[[Any], StreamSettings],
        deadline_s: float,
    ):
        """`settings_of`: the first message's options (None when unset) -> StreamSettings, raising
        InvalidArgument for bad ones; `deadline_s`: the stream's whole time."""
        self.config = config
        self.pipeline = pipeline
        self._settings_of = settings_of
        self.stop = threading.Event()
        self.deadline = StreamDeadline(deadline_s, self.stop)
        self.slot = FrameSlot()
        self.settings: StreamSettings | None = None
        self._settings_ready = threading.Event()
        self.tracker = Tracker(config.video_iou_threshold, config.video_max_age, config.video_min_hits)
        self.session = VideoSession(
            ReSearch(config.video_growth, config.video_sharper, config.video_drift, config.video_min_frames_between)
        )
        self._tracks: dict[int, _TrackState] = {}
        self._previous_rgb: np.ndarray | None = None
        self.processed = 0
        self.detected = 0
        self.searches = 0
        self._since_detection: int | None = None
        self._detected_at = 0

    def cancel(self) -> None:
        """The call ended (the client cancelled, or the deadline passed): stop at once."""
        self.stop.set()

    # -- reading ------------------------------------------------------------------------------------

    def read(self, requests: Iterator[Any]) -> None:
        """The reader thread's body: every request into the slot until the stream ends or is cancelled."""
        previous: int | None = None
        try:
            for position, request in enumerate(requests):
                if self.stop.is_set():
                    return
                if position == 0:
                    self.settings = self._settings_of(request.options if request.HasField("options") else None)
                    self._settings_ready.set()
                elif request.HasField("options"):
                    raise InvalidArgument(
                        f"frame #{position} carries options: only the first message of a stream may",
                        violations=[(f"requests[{position}].options", "set after the first message")],
                    )
                frame = frame_of(request, position, previous, self.config.max_pixels)
                previous = frame.number
                self.slot.put(frame)
        except ServiceError as exc:
            self.slot.end(exc)
            return
        except Exception:  # grpc.RpcError: the client cancelled or the deadline passed
            self.stop.set()
            self.slot.end(Cancelled("the client cancelled the stream or its deadline passed"))
            return
        self.slot.end()

    # -- the worker ---------------------------------------------------------------------------------

    def run(self, requests: Iterator[Any]) -> Iterator[FrameResult | StreamSummary]:
        """Starts the reader and yields a FrameResult per processed frame, then the StreamSummary."""
        reader = threading.Thread(target=self.read, args=(requests,), name="video-reader", daemon=True)
        reader.start()
        try:
            while True:
                if self.deadline.expired():
                    raise DeadlineExceeded(
                        f"the stream's deadline passed after {self.processed} processed frames: "
                        "set a longer deadline for long videos"
                    )
                taken = self.slot.take(self.stop)
                if taken is None:
                    break
                frame, skipped = taken
                yield self.process(frame, skipped)
            yield self.summary()
        finally:
            self.stop.set()

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Cancelled("the client cancelled the stream or its deadline passed")

    def process(self, frame: Frame, skipped: list[int]) -> FrameResult:
        start = time.perf_counter()
        settings = self.settings
        assert settings is not None  # set by the reader before the first frame is put
        config = self.config
        deadline = self.deadline.within(config.video_frame_timeout_s)
        try:
            photo = self.pipeline.decode(frame.encoded, frame.raw)
        except InvalidArgument as exc:
            raise InvalidArgument(
                f"frame_number {frame.number}: {exc.message}",
                violations=[(f"frame_number {frame.number}.image", exc.message)],
            ) from None
        rgb = photo.rgb
        cut = False
        if config.video_cut_detection and self._previous_rgb is not None and cut_detected(self._previous_rgb, rgb):
            self.tracker.reset()
            cut = True
        self._previous_rgb = rgb
        due_detection = cut or self._since_detection is None or self._since_detection + 1 >= settings.detection_interval
        self._check_stop()
        if due_detection:
            observations = self._observe(rgb, settings.search, deadline)
            tracks = self.tracker.update(frame.number, observations)
            self._since_detection = 0
            self._detected_at = frame.number
            self.detected += 1
        else:
            tracks = self.tracker.predict(frame.number)
            self._since_detection = (self._since_detection or 0) + 1
        # Shown: the tracks the latest detection saw (as SORT reports only matched tracks); those
        # it missed coast in the tracker, unseen, until they are found again or expire.
        tracks = [t for t in tracks if t.last_frame >= self._detected_at]
        if due_detection:
            self._confidences(tracks, observations)
        self._check_stop()
        if settings.search_every_frame:
            due = [t.id for t in tracks if _inside(t.box, rgb) is not None]
        else:
            due = self.session.due(frame.number, rgb, tracks)
        due = self._first_due(due)
        if due:
            self._search(frame.number, photo, [t for t in tracks if t.id in set(due)], settings.search, deadline)
        self.processed += 1
        items = []
        for track in tracks:
            state = self._tracks.setdefault(track.id, _TrackState())
            items.append(
                TrackedItem(
                    track.id,
                    photo.to_original(track.box).astype(np.float32),
                    track.category or state.category,
                    track.class_name,
                    state.confidence,
                    state.matches,
                    track.id in due,
                    state.last_searched,
                    state.warning,
                )
            )
        return FrameResult(
            frame.number,
            frame.timestamp_ms,
            skipped,
            items,
            bool(due),
            due_detection,
            cut,
            photo.width,
            photo.height,
            (time.perf_counter() - start) * 1000,
        )

    def _first_due(self, due: list[int]) -> list[int]:
        """At most video_max_searches_per_frame of the due tracks, those never searched first."""
        limit = min(self.config.video_max_searches_per_frame, self.config.max_regions)
        ordered = sorted(due, key=lambda i: (self.session.searches(i) > 0, i))
        return ordered[:limit]

    def _observe(self, rgb: np.ndarray, options: SearchOptions, deadline: Deadline) -> list[Observation]:
        """Every detector model's product classes and class-agnostic objects, in pixels of `rgb`:
        an object box on a product detection (IoU >= proposal_iou) is that detection, not another
        observation (its objectness would outvote the class)."""
        config = self.config
        small = shrink(rgb, config.detector_side)
        min_confidence = config.video_min_confidence

        def detect(model: str) -> DetectorOutput:
            return self.pipeline.detector.detect(
                small,
                min_confidence,
                config.video_objectness_threshold if config.video_max_objects else 0.0,
                config.video_max_objects,
                deadline.remaining(),
                model=model,
            )

        calls = [self.pipeline.pool.submit(detect, model) for model in config.detector_models]
        try:
            outputs = [call.result() for call in calls]
        except BaseException:
            for call in calls:
                call.cancel()
            raise
        found = merge_detections(outputs, config.item_iou, config.proposal_iou, config.video_max_objects)
        factor = rgb.shape[1] / small.shape[1]
        restrict = set(options.categories)
        products = [
            Observation((box * factor).astype(np.float32), category, name, float(confidence))
            for box, name, category, confidence in found.detections
            if category and (not restrict or category in restrict)
        ]
        objects = [Observation((box * factor).astype(np.float32), "", "", float(score)) for box, score in found.objects]
        if products and objects:
            overlap = iou_matrix(np.stack([o.box for o in objects]), np.stack([p.box for p in products]))
            objects = [o for o, row in zip(objects, overlap) if row.max() < config.proposal_iou]
        return products + objects

    def _confidences(self, tracks: list[Track], observations: list[Observation]) -> None:
        """Each track matched at this frame takes the confidence of the observation it overlaps most."""
        if not tracks or not observations:
            return
        overlap = iou_matrix(np.stack([t.box for t in tracks]), np.stack([o.box for o in observations]))
        for track, row in zip(tracks, overlap):
            if row.max() > 0:
                self._tracks.setdefault(track.id, _TrackState()).confidence = observations[int(row.argmax())].confidence

    def _search(
        self, number: int, photo: Photo, tracks: list[Track], options: SearchOptions, deadline: Deadline
    ) -> None:
        """One Pipeline.search over the tracks' boxes: a track whose class is a catalogue category is
        searched there, another lets the catalogue pick."""
        catalogue = self.pipeline.index.categories(options.kind)
        restrict = set(options.categories)
        regions = []
        inside = [(t, _inside(t.box, photo.rgb)) for t in tracks]
        tracks = [t for t, box in inside if box is not None]
        for track, box in inside:
            if box is None:
                continue
            own = track.category if track.category in catalogue and (not restrict or track.category in restrict) else ""
            regions.append((photo.to_original(box).astype(np.float32), own))
        if not regions:
            return
        outcome = self.pipeline.search(photo, _with_regions(options, regions), deadline)
        for track, item in zip(tracks, outcome.items):
            state = self._tracks.setdefault(track.id, _TrackState())
            state.matches = list(item.matches)
            state.category = item.category
            state.warning = item.warning
            state.last_searched = number
            self.session.searched(track.id, number, photo.rgb, track.box, item.matches)
            self.searches += 1

    def summary(self) -> StreamSummary:
        top_k = self.settings.search.top_k if self.settings else 10
        # A track the detector saw on fewer than min_hits frames (a track born on the first frames
        # is confirmed at once) was a passing false detection, not a product in the video.
        seen = [t for t in self.tracker.seen() if t.hits >= self.config.video_min_hits]
        tracks = self.session.summary(seen)
        for line in tracks:
            state = self._tracks.get(line.track_id)
            if not line.category and state is not None:
                line.category = state.category
            line.best_matches = line.best_matches[:top_k]
        return StreamSummary(
            tracks, self.slot.received, self.processed, self.slot.skipped_total, self.detected, self.searches
        )


def _with_regions(options: SearchOptions, regions: list[tuple[np.ndarray, str]]) -> SearchOptions:
    return SearchOptions(
        options.kind,
        options.top_k,
        options.min_confidence,
        regions,
        options.categories,
        options.min_score,
        filter=options.filter,
        spatial_rerank_k=options.spatial_rerank_k,
        query_expansion=options.query_expansion,
    )


def _inside(box: np.ndarray, rgb: np.ndarray) -> np.ndarray | None:
    """(4,) xyxy clipped to the frame, or None when less than 2 pixels of it a side are inside."""
    height, width = rgb.shape[:2]
    clipped = np.clip(np.asarray(box, np.float32), 0, [width, height, width, height]).astype(np.float32)
    if clipped[2] - clipped[0] < 2 or clipped[3] - clipped[1] < 2:
        return None
    return clipped
