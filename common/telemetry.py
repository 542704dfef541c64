"""Observability of every service: request ids, structured logs, Prometheus metrics.

- Request ids: the gateway takes the caller's `x-request-id` (or makes one), every service keeps it
  in a context variable for the call, writes it on each log line, sends it back in the trailing
  metadata, and `common.channels` passes it on every call made on the request's behalf (thread
  pools that serve a request copy the context: `ContextThreadPoolExecutor`).
- Logs: one JSON object per line (or text), with the service and the request id; an access line
  per RPC (method, status, milliseconds, client).
- Metrics (names as go-grpc-prometheus has them, so existing dashboards work):
  `grpc_server_handled_total`, `grpc_server_handling_seconds`, `grpc_server_queue_seconds`,
  `grpc_server_in_flight`, plus `mps_batch_size`, `mps_index_items` and
  `mps_router_replica_up` fed by the services; the process collector gives RSS and CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from common.config import LogFormat
from common.interceptors import Call, Layer, add_trailing_metadata

log = logging.getLogger(__name__)
access_log = logging.getLogger("mps.access")

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = contextvars.ContextVar("request_id", default="")
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed, by status code",
    ["server", "grpc_service", "grpc_method", "grpc_code"],
)
HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of a method to its last message",
    ["server", "grpc_service", "grpc_method"],
    buckets=_LATENCY_BUCKETS,
)
QUEUED = Histogram(
    "grpc_server_queue_seconds", "Time a call waited for a worker thread", ["server"], buckets=_LATENCY_BUCKETS
)
IN_FLIGHT = Gauge("grpc_server_in_flight", "Calls being served", ["server"])
BATCH_SIZE = Histogram(
    "mps_batch_size",
    "Items per batch (images per call, queries per search, items per write)",
    ["server", "what"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)


def current_request_id() -> str:
    return _REQUEST_ID.get()


@contextlib.contextmanager
def request_id_scope(request_id: str) -> Iterator[None]:
    token = _REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        _REQUEST_ID.reset(token)


def incoming_request_id(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The caller's request id when it is a sane one, else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _VALID_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


class ContextThreadPoolExecutor(ThreadPoolExecutor):
    """A thread pool whose tasks run in the submitter's contextvars context (its request id)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        context = contextvars.copy_context()
        return super().submit(context.run, fn, *args, **kwargs)


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def telemetry_layer(server: str, access: bool) -> Layer:
    """Request id, metrics and the access log of each call of `server` (a service's name)."""
    queued, in_flight = QUEUED.labels(server), IN_FLIGHT.labels(server)

    @contextlib.contextmanager
    def layer(call: Call) -> Iterator[None]:
        started = time.monotonic()
        queued.observe(started - call.arrived)
        request_id = incoming_request_id(call.context.invocation_metadata())
        add_trailing_metadata(call.context, (REQUEST_ID_KEY, request_id))
        in_flight.inc()
        failed = False
        with request_id_scope(request_id):
            try:
                yield
            except BaseException:
                failed = True
                raise
            finally:
                in_flight.dec()
                elapsed = time.monotonic() - started
                code = call.context.code()
                if code is None or (failed and code == grpc.StatusCode.OK):
                    # No status set: it finished, the client went away, or the method raised.
                    code = (
                        grpc.StatusCode.OK
                        if not failed
                        else grpc.StatusCode.CANCELLED
                        if not call.context.is_active()
                        else grpc.StatusCode.UNKNOWN
                    )
                service, name = _split(call.method)
                HANDLED.labels(server, service, name, code.name).inc()
                HANDLING.labels(server, service, name).observe(elapsed)
                if access:
                    level = (
                        logging.WARNING if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) else logging.INFO
                    )
                    access_log.log(
                        level,
                        "%s %s %.1f ms",
                        call.method,
                        code.name,
                        elapsed * 1000,
                        extra={
                            "fields": {
                                "method": call.method,
                                "code": code.name,
                                "ms": round(elapsed * 1000, 2),
                                "queue_ms": round((started - call.arrived) * 1000, 2),
                                "client": call.principal or call.context.peer(),
                            }
                        },
                    )

    return layer


# --- metrics the services feed ----------------------------------------------------------------


class _GaugeSources(Collector):
    """Gauges computed at scrape time from live objects (e.g. the items of each index database)."""

    def __init__(self) -> None:
        self._sources: dict[str, tuple[str, str, list[str], Callable[[], Iterable[tuple[list[str], float]]]]] = {}
        self._lock = threading.Lock()

    def add(
        self,
        key: str,
        name: str,
        documentation: str,
        labels: list[str],
        read: Callable[[], Iterable[tuple[list[str], float]]],
    ) -> None:
        with self._lock:
            self._sources[key] = (name, documentation, labels, read)

    def remove(self, key: str) -> None:
        with self._lock:
            self._sources.pop(key, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        with self._lock:
            sources = list(self._sources.values())
        for name, documentation, labels, read in sources:
            family = families.setdefault(name, GaugeMetricFamily(name, documentation, labels=labels))
            for values, number in read():
                family.add_metric(values, number)
        yield from families.values()

    def describe(self) -> list:
        return []


GAUGE_SOURCES = _GaugeSources()
REGISTRY.register(GAUGE_SOURCES)


def start_metrics_server(host: str, port: int) -> Callable[[], None] | None:
    """Serves /metrics on host:port (0 = off); returns a function that stops it."""
    if not port:
        return None
    server, _thread = start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server.shutdown


# --- logs -------------------------------------------------------------------------------------

_make_record = logging.getLogRecordFactory()


def _record_with_request_id(*args: Any, **kwargs: Any) -> logging.LogRecord:
    """Every log record carries the request id of the call it was written for ("" outside one)."""
    record = _make_record(*args, **kwargs)
    record.request_id = _REQUEST_ID.get()
    return record


logging.setLogRecordFactory(_record_with_request_id)


class _Formatter(logging.Formatter):
    def __init__(self, service: str, as_json: bool):
        super().__init__()
        self.service, self.as_json = service, as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = dict(getattr(record, "fields", {}))
        request_id = getattr(record, "request_id", "")
        if self.as_json:
            entry: dict[str, Any] = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname,
                "service": self.service,
                "logger": record.name,
                "message": record.getMessage(),
            }
            if request_id:
                entry["request_id"] = request_id
            entry.update(fields)
            if record.exc_info:
                entry["exception"] = self.formatException(record.exc_info)
            return json.dumps(entry, default=str)
        text = f"{self.formatTime(record)} {record.levelname} {self.service} {record.name}: {record.getMessage()}"
        if request_id:
            text += f" request_id={request_id}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(service: str, level: str, log_format: LogFormat = "json") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter(service, log_format == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
