"""The HTTP/JSON front as an ASGI app: each gateway RPC at its google.api.http route, called over one
gRPC channel to the gateway (round_robin over its replicas), plus /healthz, /openapi.json and the
search page.

Calls keep the gateway's own checks: the client's `Authorization: Bearer <token>` goes on as gRPC
metadata (the gateway decides, as for any gRPC client), `X-Request-Id` too (a new one when absent;
returned on every response), `X-Server-Timeout` (seconds) sets the call's deadline. A failed call
answers the HTTP form of its status (transcoder.HTTP_STATUS) with Google's error JSON, the status's
google.rpc details included, and `Retry-After` when the gateway asked for one.

Streams (ingest, video) are newline-delimited JSON both ways, read and written as they go: an ingest
of any size passes through in bounded memory, and a video stream's results come back while frames
are still being sent. A bad line cancels the call (nothing of an ingest is stored: the gateway
commits only a stream that ends). Once a streamed response has begun, an error arrives as a last
line {"error": {...}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, message
from google.rpc import error_details_pb2, status_pb2  # noqa: F401  (error_details_pb2: detail types to print)
from grpc_health.v1 import health_pb2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from common.channels import channel_target
from common.security import channel_credentials
from common.serving import channel_options
from common.telemetry import REQUEST_ID_KEY, incoming_request_id
from gateway.http import openapi, transcoder
from gateway.http.config import HttpConfig
from gateway.http.transcoder import BadRequest
from mps.gateway.v1 import gateway_pb2

log = logging.getLogger(__name__)

SERVICES = [gateway_pb2.DESCRIPTOR.services_by_name["VisualSearchService"]]
STATIC_DIR = Path(__file__).resolve().parent / "static"
NDJSON = "application/x-ndjson"
_NDJSON_TYPES = {NDJSON, "application/jsonl", "application/x-jsonlines"}
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class HttpError(Exception):
    """Refused before any call: an HTTP status with the gRPC code it stands for."""

    def __init__(self, code: grpc.StatusCode, text: str, http_status: int | None = None):
        super().__init__(text)
        self.code, self.text = code, text
        self.http_status = http_status or transcoder.http_status(code)


def _error_response(error: HttpError, request_id: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        transcoder.error_body(error.code, error.text, http=error.http_status),
        status_code=error.http_status,
        headers={"x-request-id": request_id, **(headers or {})},
    )


def _rpc_error_parts(error: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Google's error JSON for a failed call (its google.rpc details included) and headers."""
    details: list[dict[str, Any]] = []
    headers: dict[str, str] = {}
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                try:
                    details.append(json_format.MessageToDict(detail))
                except (TypeError, KeyError):  # a detail type this front does not know
                    details.append({"@type": detail.type_url})
        elif key == "retry-after" and isinstance(value, str):
            headers["retry-after"] = value
    return transcoder.error_body(error.code(), error.details() or error.code().name, details), headers


def _rpc_error_response(error: Any, request_id: str) -> JSONResponse:
    body, headers = _rpc_error_parts(error)
    return JSONResponse(
        body,
        status_code=transcoder.http_status(error.code()),
        headers={"x-request-id": request_id, **headers},
    )


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) past `limit` bytes, by its Content-Length or as it arrives."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the body is {int(declared)} bytes, more than the {limit} allowed: send a smaller image, "
            "or stream an ingest as newline-delimited JSON",
            413,
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the body is more than the {limit} bytes allowed", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _lines(request: Request, limit: int) -> AsyncIterator[tuple[int, bytes]]:
    """The body's non-blank lines (numbered from 1) as they arrive; each at most `limit` bytes."""
    pending = b""
    number = 0
    async for chunk in request.stream():
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            number += 1
            if line.strip():
                yield number, line
        if len(pending) > limit:
            raise HttpError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"line {number + 1} is more than the {limit} bytes allowed per message",
                413,
            )
    if pending.strip():
        yield number + 1, pending


class _Replay:
    """An ASGI receive that hands over a body already read (so Starlette's form parser can read it)."""

    def __init__(self, body: bytes):
        self._body: bytes | None = body

    async def __call__(self) -> Message:
        body, self._body = self._body, None
        if body is None:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": body, "more_body": False}


_END = object()


class _Once:
    """Calls `action` the first time it is called, never again."""

    def __init__(self, action: Callable[[], None]):
        self._action: Callable[[], None] | None = action

    def __call__(self) -> None:
        action, self._action = self._action, None
        if action is not None:
            action()


class _RequestPipe:
    """A client stream's messages, from the event loop to gRPC's (synchronous) request iterator,
    which gRPC drains in a thread of its own; bounded, so a fast client waits for a slow gateway.

    Streams use gRPC's synchronous API: in its asyncio API a write that races the server's end of
    the call replaces the server's status with INTERNAL "Internal error from Core"
    (grpc/grpc#36066), which would turn a refusal (UNAUTHENTICATED, a bad frame's
    INVALID_ARGUMENT) into a 500."""

    def __init__(self, size: int = 8):
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=size)

    def __iter__(self) -> Iterator[Any]:
        while (item := self._queue.get()) is not _END:
            yield item

    async def _offer(self, item: Any, call: Any) -> bool:
        while not call.done():
            try:
                self._queue.put_nowait(item)
                return True
            except queue.Full:
                await asyncio.sleep(0.002)
        return False

    async def put(self, msg: message.Message, call: Any) -> bool:
        """Queues a message; False once the call has ended (nothing more is wanted)."""
        return await self._offer(msg, call)

    async def close(self, call: Any) -> None:
        """The client's stream is over (gRPC half-closes once it has sent what was queued)."""
        await self._offer(_END, call)

    def abandon(self) -> None:
        """After a cancel: drop what is queued and let gRPC's thread out of the iterator."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_END)


class Front:
    """The routes' handlers over channels to the gateway (asyncio for unary calls, synchronous in
    threads for streams: see _RequestPipe)."""

    def __init__(self, config: HttpConfig):
        self.config = config
        self.table = transcoder.routes(SERVICES)
        self.channel: grpc.aio.Channel | None = None
        self.stream_channel: grpc.Channel | None = None
        # A stream holds a thread here while it reads the gateway's replies.
        self._stream_threads = ThreadPoolExecutor(max_workers=config.max_streams, thread_name_prefix="http-stream")
        self._streams = asyncio.Semaphore(config.max_streams)
        self._spec: dict[str, Any] | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        options = channel_options(self.config.max_message_bytes) + [
            ("grpc.lb_policy_name", "round_robin"),
        ]
        target = channel_target(self.config.gateway_address)
        credentials = channel_credentials(self.config)
        if credentials is not None:
            self.channel = grpc.aio.secure_channel(target, credentials, options=options)
            self.stream_channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
            self.stream_channel = grpc.insecure_channel(target, options=options)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(grace=self.config.shutdown_grace_s)
        if self.stream_channel is not None:
            self.stream_channel.close()
        self._stream_threads.shutdown(wait=False, cancel_futures=True)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.open()
        try:
            yield
        finally:
            await self.close()

    # --- helpers --------------------------------------------------------------------------------

    def _call_settings(
        self, request: Request, request_id: str, streaming: bool
    ) -> tuple[list[tuple[str, str]], float | None]:
        metadata = [(REQUEST_ID_KEY, request_id)]
        authorization = request.headers.get("authorization")
        if authorization:
            metadata.append(("authorization", authorization))
        timeout: float | None = None if streaming else self.config.timeout_s
        given = request.headers.get("x-server-timeout")
        if given is not None:
            try:
                timeout = float(given)
            except ValueError:
                timeout = -1.0
            if not timeout > 0:
                raise HttpError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"X-Server-Timeout {given!r} is not a number of seconds > 0"
                )
        return metadata, timeout

    def _channel(self) -> grpc.aio.Channel:
        if self.channel is None:
            raise HttpError(grpc.StatusCode.UNAVAILABLE, "the front is starting: try again")
        return self.channel

    # --- endpoints ------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """grpc.health.v1 of the gateway (of one service of it with ?service=NAME)."""
        call = self._channel().unary_unary(
            _HEALTH_CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        service = request.query_params.get("service", "")
        try:
            reply = await call(health_pb2.HealthCheckRequest(service=service), timeout=5.0)
        except grpc.aio.AioRpcError as error:
            return JSONResponse({"status": "UNREACHABLE", "code": error.code().name, "message": error.details()}, 503)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return JSONResponse({"status": status}, 200 if reply.status == health_pb2.HealthCheckResponse.SERVING else 503)

    async def openapi(self, _request: Request) -> Response:
        if self._spec is None:
            self._spec = openapi.build(SERVICES)
        return JSONResponse(self._spec)

    async def page(self, _request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})

    async def api(self, request: Request) -> Response:
        """Any /v1/... request: its route, its request message, the call, the response."""
        request_id = incoming_request_id([(REQUEST_ID_KEY, request.headers.get("x-request-id", ""))])
        try:
            return await self._api(request, request_id)
        except HttpError as error:
            return _error_response(error, request_id)
        except BadRequest as error:
            return _error_response(HttpError(grpc.StatusCode.INVALID_ARGUMENT, str(error)), request_id)
        except grpc.RpcError as error:
            return _rpc_error_response(error, request_id)

    async def _api(self, request: Request, request_id: str) -> Response:
        raw_path = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path
        raw_path = raw_path.split("?", 1)[0]
        found = transcoder.find_route(self.table, request.method, raw_path)
        if found is None:
            verbs = transcoder.allowed_verbs(self.table, raw_path)
            if verbs:
                raise HttpError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"{request.method} is not served at {raw_path}: use {', '.join(verbs)}",
                    405,
                )
            raise HttpError(grpc.StatusCode.NOT_FOUND, f"no API route {request.method} {raw_path}: see /openapi.json")
        route, variables = found
        query = [(k, v) for k, v in request.query_params.multi_items() if k != "alt"]
        alt = request.query_params.get("alt", "json")
        if alt not in ("json", "media"):
            raise BadRequest(f"alt={alt!r}: use json (the default) or media (the response's bytes, e.g. the thumbnail)")
        metadata, timeout = self._call_settings(request, request_id, route.server_streaming)
        channel = self._channel()
        response_class = route.response_class()
        request_class = route.request_class()
        serialize, deserialize = request_class.SerializeToString, response_class.FromString
        headers = {"x-request-id": request_id}

        if not route.client_streaming:
            msg = await self._one_message(request, route, variables, query)
            if route.server_streaming:
                raise HttpError(
                    grpc.StatusCode.UNIMPLEMENTED, f"{route.method.name}: server streams alone are not served"
                )
            reply = await channel.unary_unary(
                route.rpc, request_serializer=serialize, response_deserializer=deserialize
            )(msg, metadata=metadata, timeout=timeout)
            if alt == "media":
                data = transcoder.first_bytes_field(reply)
                if data is None:
                    raise BadRequest(f"{route.method.name} returns no bytes: alt=media does not apply")
                return Response(data, media_type=transcoder.sniff_media_type(data), headers=headers)
            return JSONResponse(transcoder.to_json(reply), headers=headers)

        if variables or query:
            raise BadRequest(f"{route.method.name} is a stream: give each message's fields in the body, not the URL")
        if self._streams.locked():
            raise HttpError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.config.max_streams} streams are in flight through this front: retry shortly",
            )
        await self._streams.acquire()
        slot = _Once(self._streams.release)  # held until the stream is over, its response included
        response: Response | None = None
        try:
            stream_channel = self.stream_channel
            if stream_channel is None:
                raise HttpError(grpc.StatusCode.UNAVAILABLE, "the front is starting: try again")
            pipe = _RequestPipe()
            if route.server_streaming:
                replies = stream_channel.stream_stream(
                    route.rpc, request_serializer=serialize, response_deserializer=deserialize
                )(iter(pipe), metadata=metadata, timeout=timeout)
                response = await self._bidi(request, route, pipe, replies, request_id, slot)
                return response
            call = stream_channel.stream_unary(
                route.rpc, request_serializer=serialize, response_deserializer=deserialize
            ).future(iter(pipe), metadata=metadata, timeout=timeout)
            try:
                await self._feed(request, route, pipe, call)
            except BaseException:
                call.cancel()  # bad input or a client gone: nothing of the stream is stored
                pipe.abandon()
                raise
            reply = await asyncio.get_running_loop().run_in_executor(self._stream_threads, call.result)
            return JSONResponse(transcoder.to_json(reply), headers=headers)
        finally:
            if not isinstance(response, StreamingResponse):
                slot()  # a streamed response gives the slot back when it ends

    async def _one_message(
        self, request: Request, route: transcoder.Route, variables: dict[str, str], query: list[tuple[str, str]]
    ) -> message.Message:
        content_type = _content_type(request)
        if request.method in ("GET", "DELETE") or not route.body:
            return transcoder.build_request(route, variables, query)
        raw = await _read_body(request, self.config.max_body_bytes)
        if content_type == "multipart/form-data":
            return await self._multipart(request, raw, route, variables, query)
        if content_type not in ("application/json", "") and content_type not in _NDJSON_TYPES:
            raise HttpError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Content-Type {content_type!r}: send application/json (the message, images as base64) "
                "or multipart/form-data (the image as a file part)",
                415,
            )
        body = transcoder.decode_json(raw) if raw.strip() else {}
        return transcoder.build_request(route, variables, query, body)

    async def _multipart(
        self,
        request: Request,
        raw: bytes,
        route: transcoder.Route,
        variables: dict[str, str],
        query: list[tuple[str, str]],
    ) -> message.Message:
        replayed = Request(request.scope, _Replay(raw))
        try:
            form = await replayed.form(max_files=4, max_fields=256, max_part_size=self.config.max_body_bytes)
        except Exception as error:  # Starlette raises its own MultiPartException and HTTPException
            raise BadRequest(f"multipart body: {getattr(error, 'detail', None) or error}") from None
        files: dict[str, bytes] = {}
        fields: list[tuple[str, str]] = []
        try:
            for name, value in form.multi_items():
                if isinstance(value, str):
                    fields.append((name, value))
                else:
                    if name in files:
                        raise BadRequest(f"file part {name!r} is given twice")
                    files[name] = await value.read()
        finally:
            await form.close()
        return transcoder.multipart_request(route, variables, query, files, fields)

    async def _requests(self, request: Request, route: transcoder.Route) -> AsyncIterator[message.Message]:
        """A client stream's messages: newline-delimited JSON as it arrives, or a JSON array (or one
        object, or one multipart upload) read whole."""
        cls = route.request_class()
        content_type = _content_type(request)
        if content_type in _NDJSON_TYPES:
            async for number, line in _lines(request, self.config.max_body_bytes):
                yield transcoder.line_message(line, number, cls)
            return
        raw = await _read_body(request, self.config.max_body_bytes)
        if content_type == "multipart/form-data":
            yield await self._multipart(request, raw, route, {}, [])
            return
        if content_type not in ("application/json", ""):
            raise HttpError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Content-Type {content_type!r}: send application/x-ndjson (one message per line), "
                "application/json (an array of messages) or multipart/form-data (one image)",
                415,
            )
        for msg in transcoder.body_messages(raw, cls):
            yield msg

    async def _feed(self, request: Request, route: transcoder.Route, pipe: _RequestPipe, call: Any) -> None:
        """The body's messages into the call, then the end of the client's stream; stops early
        when the call has ended (its status says why)."""
        async for msg in self._requests(request, route):
            if not await pipe.put(msg, call):
                return
        await pipe.close(call)

    async def _bidi(
        self, request: Request, route: transcoder.Route, pipe: _RequestPipe, replies: Any, request_id: str, slot: _Once
    ) -> Response:
        """Frames in as they arrive, results out as they come; the response begins with the first
        result (so a call refused at once gets its own HTTP status)."""
        loop = asyncio.get_running_loop()
        refused: list[BaseException] = []

        async def write() -> None:
            try:
                await self._feed(request, route, pipe, replies)
            except (BadRequest, HttpError) as error:
                refused.append(error)
                replies.cancel()
                pipe.abandon()

        def next_reply() -> Any:
            return next(replies, _END)

        writer = asyncio.create_task(write())
        try:
            first = await loop.run_in_executor(self._stream_threads, next_reply)
        except grpc.RpcError as error:
            if refused:  # the writer cancelled the call over a bad line
                raise refused[0] from None
            writer.cancel()  # refused by the gateway: the rest of the body is not wanted
            pipe.abandon()
            return _rpc_error_response(error, request_id)
        except BaseException:
            replies.cancel()
            writer.cancel()
            pipe.abandon()
            raise

        async def results() -> AsyncIterator[bytes]:
            try:
                item = first
                while item is not _END:
                    yield (json.dumps(transcoder.to_json(item)) + "\n").encode()
                    item = await loop.run_in_executor(self._stream_threads, next_reply)
            except grpc.RpcError as error:
                if refused:
                    text = str(refused[0])
                    yield (json.dumps(transcoder.error_body(grpc.StatusCode.INVALID_ARGUMENT, text)) + "\n").encode()
                else:
                    yield (json.dumps(_rpc_error_parts(error)[0]) + "\n").encode()
            finally:
                replies.cancel()  # the client went away, or the stream ended: nothing left to do
                writer.cancel()
                pipe.abandon()
                slot()

        if first is _END:
            await writer
            if refused:
                raise refused[0]
        return StreamingResponse(results(), media_type=NDJSON, headers={"x-request-id": request_id})


class AccessLog:
    """One log line per HTTP request: method, path, status, milliseconds, request id."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        seen: dict[str, Any] = {"status": 0, "request_id": ""}

        async def sending(event: Message) -> None:
            if event["type"] == "http.response.start":
                seen["status"] = event["status"]
                for key, value in event.get("headers", ()):
                    if key == b"x-request-id":
                        seen["request_id"] = value.decode("latin-1")
            await send(event)

        try:
            await self.app(scope, receive, sending)
        finally:
            log.info(
                "%s %s %d %.1f ms",
                scope["method"],
                scope["path"],
                seen["status"],
                (time.perf_counter() - started) * 1000,
                extra={"fields": {"request_id": seen["request_id"], "client": (scope.get("client") or ("", 0))[0]}},
            )


def create_app(config: HttpConfig) -> Starlette:
    front = Front(config)
    verbs = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    route_list: list[Route | Mount] = [
        Route("/healthz", front.health, methods=["GET"]),
        Route("/openapi.json", front.openapi, methods=["GET"]),
        Route("/v1/{rest:path}", front.api, methods=verbs),
    ]
    if config.page:
        route_list += [
            Route("/", front.page, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ]
    middleware = []
    if config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=config.cors_origins,
                allow_methods=verbs,
                allow_headers=["authorization", "content-type", "x-request-id", "x-server-timeout"],
                expose_headers=["x-request-id", "retry-after"],
            )
        )
    if config.access_log:
        middleware.append(Middleware(AccessLog))

    async def unexpected(request: Request, error: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        text = "the HTTP front failed on this request (its log has the details)"
        return JSONResponse(transcoder.error_body(grpc.StatusCode.INTERNAL, text), status_code=500)

    app = Starlette(
        routes=route_list, middleware=middleware, lifespan=front.lifespan, exception_handlers={Exception: unexpected}
    )
    app.state.front = front
    return app
