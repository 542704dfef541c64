"""The stream engine's parts that need no service: the newest-wins frame slot, frame checks, the
cancellable deadline."""

import threading
import time

import pytest

from common.errors import Cancelled, InvalidArgument
from gateway.stream import Frame, FrameSlot, StreamDeadline, frame_of
from mps.common.v1 import common_pb2
from mps.gateway.v1 import gateway_pb2


def _frame(number: int) -> Frame:
    return Frame(number, 0, b"jpeg", None)


def test_the_newest_frame_wins_and_the_others_are_reported_skipped():
    slot, stop = FrameSlot(), threading.Event()
    for n in (1, 2, 3):
        slot.put(_frame(n))
    frame, skipped = slot.take(stop)
    assert frame.number == 3 and skipped == [1, 2]
    slot.put(_frame(4))
    slot.end()
    frame, skipped = slot.take(stop)
    assert frame.number == 4 and skipped == []
    assert slot.take(stop) is None  # ended, nothing left
    assert (slot.received, slot.skipped_total) == (4, 2)


def test_a_thousand_frames_hold_one_in_memory():
    slot, stop = FrameSlot(), threading.Event()
    for n in range(1000):
        slot.put(Frame(n, 0, bytes(10_000), None))
    frame, skipped = slot.take(stop)
    assert frame.number == 999 and len(skipped) == 999
    assert slot._frame is None  # nothing else held but the numbers


def test_take_waits_for_a_frame_and_stops_on_cancel():
    slot, stop = FrameSlot(), threading.Event()
    threading.Timer(0.05, slot.put, args=(_frame(7),)).start()
    frame, _ = slot.take(stop)
    assert frame.number == 7
    threading.Timer(0.05, stop.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        slot.take(stop)
    assert time.monotonic() - started < 1


def test_the_readers_error_wins_over_a_waiting_frame():
    slot, stop = FrameSlot(), threading.Event()
    slot.put(_frame(1))
    slot.end(InvalidArgument("frame #2 has no image"))
    with pytest.raises(InvalidArgument, match="frame #2 has no image"):
        slot.take(stop)


def test_a_cancel_leaves_downstream_calls_no_time():
    stop = threading.Event()
    deadline = StreamDeadline(60, stop)
    frame = deadline.within(5)
    assert 4 < frame.remaining() <= 5 and deadline.remaining() > 59
    stop.set()
    assert frame.remaining() == deadline.remaining() == 0.001


LIMIT = 10**6  # pixels


def test_frame_checks():
    raw = common_pb2.Image(raw=common_pb2.RawImage(width=2, height=2, rgb=bytes(12)))
    ok = frame_of(
        gateway_pb2.StreamMultiProductSearchRequest(frame_number=5, timestamp_ms=9, image=raw), 0, None, LIMIT
    )
    assert (ok.number, ok.timestamp_ms, ok.raw, ok.encoded) == (5, 9, (2, 2, bytes(12)), None)
    with pytest.raises(InvalidArgument, match="frame numbers must increase"):
        frame_of(gateway_pb2.StreamMultiProductSearchRequest(frame_number=5, image=raw), 1, 5, LIMIT)
    with pytest.raises(InvalidArgument, match=r"has no image"):
        frame_of(gateway_pb2.StreamMultiProductSearchRequest(frame_number=6), 1, 5, LIMIT)
    short = common_pb2.Image(raw=common_pb2.RawImage(width=2, height=2, rgb=bytes(11)))
    with pytest.raises(InvalidArgument, match="raw image of 2x2 needs 12 RGB bytes"):
        frame_of(gateway_pb2.StreamMultiProductSearchRequest(frame_number=6, image=short), 1, 5, LIMIT)
    with pytest.raises(InvalidArgument, match=r"image\.encoded is empty"):
        frame_of(
            gateway_pb2.StreamMultiProductSearchRequest(frame_number=6, image=common_pb2.Image(encoded=b"")),
            1,
            5,
            LIMIT,
        )
    for width, height, says in ((0, 0, "zero size"), (2000, 1000, "above the limit of 1000000 pixels")):
        bad = common_pb2.Image(raw=common_pb2.RawImage(width=width, height=height, rgb=b"\0"))
        with pytest.raises(InvalidArgument, match=says):
            frame_of(gateway_pb2.StreamMultiProductSearchRequest(frame_number=6, image=bad), 1, 5, LIMIT)
