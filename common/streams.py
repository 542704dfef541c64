"""Telling a client's end of a request stream from its cancel, for the Adds that commit at the end.

grpc python (1.85, checked by tests/index_server/test_cancel.py) ends a servicer's request iterator
on a client's cancel in one of two ways: it raises grpc.RpcError, or, when the "no more messages"
event is handled before the cancel event, it simply stops, exactly as after a normal end of the
stream, and the cancel is reported a moment later (context.is_active() turns False; measured: 20 to
30 % of mid-stream cancels, the cancel reported within 0.2 ms). Both events are queued together,
so waiting a few milliseconds for the call's termination callback tells the two apart: a cancelled
call terminates within them, a completed stream is still waiting for its answer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TypeVar

import grpc

from common.errors import Cancelled

T = TypeVar("T")


class StreamEnd:
    """Created before a servicer reads its request stream; says, once the stream has ended,
    whether the client completed it (and still waits for the answer) or cancelled it."""

    def __init__(self, context: grpc.ServicerContext):
        self._context = context
        self._terminated = threading.Event()
        if not context.add_callback(self._terminated.set):
            self._terminated.set()  # already over

    def completed(self, settle_s: float) -> bool:
        """True when the stream ended normally and the caller still waits; waits up to settle_s
        for a cancel that grpc reports after the end of the stream (returns as soon as one is)."""
        self._terminated.wait(settle_s)
        return self._context.is_active()


def client_stream(requests: Iterator[T], context: grpc.ServicerContext, settle_s: float) -> Iterator[T]:
    """The client's request stream, for a method that acts only once the stream is whole (an Add
    commits at its end): yields each message, and raises Cancelled, instead of ending, when the
    client cancelled the stream or its deadline passed; ends normally only when the client ended
    the stream and still waits for the answer (see StreamEnd for the `settle_s` wait)."""
    end = StreamEnd(context)
    try:
        yield from requests
    except grpc.RpcError:
        raise Cancelled("the client cancelled the stream or its deadline passed: nothing of it was stored") from None
    if not end.completed(settle_s):
        raise Cancelled("the client cancelled the stream or its deadline passed: nothing of it was stored")
