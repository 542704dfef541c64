"""HTTP/JSON <-> gRPC, from the protos: each RPC's `google.api.http` option gives its method and path
template, the proto3 JSON mapping (protobuf's json_format) gives its bodies. No gRPC or HTTP server
here: routes, requests built from a path, a query string, a JSON or multipart body, and the HTTP
form of a gRPC status. gateway/http/app.py serves them.

How a request message is filled (as Google's HTTP transcoding does):
- path variables (`{product_id}`) set those fields;
- the body (`body: "*"`) is the request message as JSON; a client stream takes a JSON array or
  newline-delimited JSON, one message per line;
- query parameters set the remaining fields: `top_k=5`, dotted names for nested fields
  (`filter.path_prefix=a/b`), a repeated field by repeating the parameter, enums by name or number,
  a message field by its JSON (`filter={"tags": {"all": ["red"]}}`);
- a multipart/form-data body (for a request with an mps.common.v1.Image field): a file part named
  after that field (`image`) fills its encoded bytes; the `request` part, if any, is the message's
  JSON; every other part is read as a query parameter.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, json_format, message, message_factory
from google.protobuf.descriptor import FieldDescriptor

IMAGE_MESSAGE = "mps.common.v1.Image"

# google.rpc.Code -> HTTP, as Google's APIs map them (google/rpc/code.proto).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


class BadRequest(ValueError):
    """The HTTP request cannot become the RPC's request message (INVALID_ARGUMENT); the message
    says which part and why."""


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def error_body(
    code: grpc.StatusCode, message_text: str, details: Sequence[dict[str, Any]] = (), http: int | None = None
) -> dict[str, Any]:
    """Google's JSON error shape: {"error": {"code": 400, "status": "INVALID_ARGUMENT", ...}}; `code`
    is the HTTP status (`http` where the front refused the request itself, e.g. 405, 413, 415)."""
    return {
        "error": {
            "code": http or http_status(code),
            "status": code.name,
            "message": message_text,
            "details": list(details),
        }
    }


def to_json(msg: message.Message) -> dict[str, Any]:
    """A message as proto3 JSON (lowerCamelCase names, every field present, enums by name)."""
    return json_format.MessageToDict(msg, always_print_fields_with_no_presence=True)


# --- routes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One RPC at one HTTP method and path template."""

    method: descriptor.MethodDescriptor
    verb: str  # GET, POST, PATCH, PUT, DELETE
    template: str  # "/v1/products/{product_id}"
    body: str  # "" (no body), "*" (the whole message) or a field name
    variables: tuple[str, ...]  # field paths bound by the template, in order
    pattern: re.Pattern[str]

    @property
    def rpc(self) -> str:
        """The gRPC method path, e.g. /mps.gateway.v1.VisualSearchService/GetProduct."""
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def client_streaming(self) -> bool:
        return bool(self.method.client_streaming)

    @property
    def server_streaming(self) -> bool:
        return bool(self.method.server_streaming)

    def request_class(self) -> type[message.Message]:
        return message_factory.GetMessageClass(self.method.input_type)

    def response_class(self) -> type[message.Message]:
        return message_factory.GetMessageClass(self.method.output_type)

    def match(self, verb: str, raw_path: str) -> dict[str, str] | None:
        """The path variables when `raw_path` (still percent-encoded) fits; None otherwise. Each
        variable is one path segment, decoded, so an id may hold any character ("/" as %2F)."""
        if verb != self.verb:
            return None
        found = self.pattern.fullmatch(raw_path)
        if found is None:
            return None
        return {name: urllib.parse.unquote(found.group(f"v{i}")) for i, name in enumerate(self.variables)}


_VARIABLE = re.compile(r"\{([a-z_][a-z0-9_.]*)(?:=\*)?\}")


def compile_template(template: str) -> tuple[tuple[str, ...], re.Pattern[str]]:
    """`/v1/products/{product_id}:verb` -> (("product_id",), its regex). Variables match one segment."""
    if not template.startswith("/"):
        raise ValueError(f"path template {template!r} must start with /")
    variables: list[str] = []
    parts: list[str] = []
    position = 0
    for found in _VARIABLE.finditer(template):
        parts.append(re.escape(template[position : found.start()]))
        parts.append(f"(?P<v{len(variables)}>[^/]+)")
        variables.append(found.group(1))
        position = found.end()
    parts.append(re.escape(template[position:]))
    leftover = _VARIABLE.sub("", template)
    if "{" in leftover or "}" in leftover:
        raise ValueError(f"path template {template!r}: only {{field}} variables are supported")
    return tuple(variables), re.compile("".join(parts))


def _rules(rule: http_pb2.HttpRule) -> Iterator[http_pb2.HttpRule]:
    yield rule
    yield from rule.additional_bindings


def routes(services: Iterable[descriptor.ServiceDescriptor]) -> list[Route]:
    """Every RPC with a google.api.http option, as routes (additional_bindings included)."""
    found: list[Route] = []
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            for rule in _rules(options.Extensions[annotations_pb2.http]):
                pattern_kind = rule.WhichOneof("pattern")
                if pattern_kind is None or pattern_kind == "custom":
                    raise ValueError(f"{method.full_name}: only get/post/put/patch/delete routes are supported")
                template = getattr(rule, pattern_kind)
                variables, pattern = compile_template(template)
                for name in variables:
                    _field_path(method.input_type, name)  # raises when the template names no field
                found.append(Route(method, pattern_kind.upper(), template, rule.body, variables, pattern))
    return found


def find_route(table: Sequence[Route], verb: str, raw_path: str) -> tuple[Route, dict[str, str]] | None:
    for route in table:
        variables = route.match(verb, raw_path)
        if variables is not None:
            return route, variables
    return None


def allowed_verbs(table: Sequence[Route], raw_path: str) -> list[str]:
    """The verbs some route serves at this path (for 405 and its Allow header)."""
    return sorted({route.verb for route in table if route.pattern.fullmatch(raw_path)})


# --- building request messages --------------------------------------------------------------------


def _field_path(message_type: descriptor.Descriptor, path: str) -> list[FieldDescriptor]:
    """The fields along a dotted path (proto or JSON names); BadRequest naming it otherwise."""
    fields: list[FieldDescriptor] = []
    current: descriptor.Descriptor | None = message_type
    for part in path.split("."):
        if current is None:
            raise BadRequest(f"{path!r}: {fields[-1].name} is not a message, it has no field {part!r}")
        field = current.fields_by_name.get(part) or current.fields_by_camelcase_name.get(part)
        if field is None:
            known = ", ".join(sorted(f.name for f in current.fields))
            raise BadRequest(f"{path!r}: {current.full_name} has no field {part!r} (fields: {known})")
        fields.append(field)
        current = field.message_type if field.type == FieldDescriptor.TYPE_MESSAGE else None
    return fields


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type is not None
        and field.message_type.GetOptions().map_entry
    )


_INTEGER_TYPES = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
}


def _scalar_json(field: FieldDescriptor, text: str, where: str) -> Any:
    """A query or form value as the JSON value json_format expects for the field."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        lowered = text.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise BadRequest(f"{where}: {text!r} is not a boolean (true or false)")
    if field.type in _INTEGER_TYPES:
        try:
            return int(text)
        except ValueError:
            raise BadRequest(f"{where}: {text!r} is not an integer") from None
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        try:
            return float(text)
        except ValueError:
            raise BadRequest(f"{where}: {text!r} is not a number") from None
    if field.type == FieldDescriptor.TYPE_ENUM:
        return int(text) if text.lstrip("-").isdigit() else text
    return text  # string; bytes as base64, checked by json_format


def _set_in(tree: dict[str, Any], fields: Sequence[FieldDescriptor], value: Any, append: bool) -> None:
    node = tree
    for field in fields[:-1]:
        child = node.setdefault(field.name, {})
        if not isinstance(child, dict):
            raise BadRequest(f"{field.name} is given both whole and by its fields")
        node = child
    last = fields[-1].name
    if append:
        node.setdefault(last, []).append(value)
    else:
        node[last] = value


def parameters_json(message_type: descriptor.Descriptor, pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Query (or form) parameters -> the JSON object json_format parses into `message_type`."""
    tree: dict[str, Any] = {}
    for name, text in pairs:
        fields = _field_path(message_type, name)
        field = fields[-1]
        for step in fields[:-1]:
            if _is_repeated(step):
                raise BadRequest(f"{name!r}: {step.name} is repeated; give it whole as JSON ({step.name}=[...])")
        if field.type == FieldDescriptor.TYPE_MESSAGE or _is_map(field):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise BadRequest(f"{name!r}: a message field takes its JSON ({error.msg})") from None
            if _is_repeated(field) and not _is_map(field) and isinstance(value, dict):
                _set_in(tree, fields, value, append=True)
            else:
                _set_in(tree, fields, value, append=False)
        else:
            _set_in(tree, fields, _scalar_json(field, text, repr(name)), append=_is_repeated(field))
    return tree


_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")


def _check_base64(data: Any, message_type: descriptor.Descriptor, where: str) -> None:
    """Refuses bytes fields whose text is not base64 (json_format would drop the stray characters
    and decode what is left, silently giving other bytes)."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        field = message_type.fields_by_name.get(key) or message_type.fields_by_camelcase_name.get(key)
        if field is None or value is None:
            continue  # json_format names unknown fields
        values = value if field.is_repeated and isinstance(value, list) else [value]
        if field.type == FieldDescriptor.TYPE_BYTES:
            for text in values:
                if isinstance(text, str) and not _BASE64.fullmatch(text.strip()):
                    raise BadRequest(f"{where}: {field.containing_type.name}.{field.name} ({key}) is not base64 text")
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not _is_map(field):
            for item in values:
                _check_base64(item, field.message_type, where)


def parse_json_message(data: Any, cls: type[message.Message], where: str = "body") -> message.Message:
    """A JSON value (already decoded) as a message of `cls`; BadRequest saying what is wrong."""
    if not isinstance(data, dict):
        raise BadRequest(f"{where}: expected a JSON object ({cls.DESCRIPTOR.full_name}), got {type(data).__name__}")
    _check_base64(data, cls.DESCRIPTOR, where)
    msg = cls()
    try:
        json_format.ParseDict(data, msg)
    except json_format.ParseError as error:
        raise BadRequest(f"{where}: {error}") from None
    return msg


def decode_json(raw: bytes, where: str = "body") -> Any:
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise BadRequest(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise BadRequest(f"{where}: not JSON ({error.msg} at line {error.lineno} column {error.colno})") from None


def build_request(
    route: Route,
    variables: Mapping[str, str],
    query: Sequence[tuple[str, str]],
    body: Any = None,
) -> message.Message:
    """One request message: `body` (decoded JSON or None), then query parameters, then path
    variables (which win: they are the resource the URL names)."""
    cls = route.request_class()
    msg = cls()
    if body is not None:
        if route.body == "*":
            msg.MergeFrom(parse_json_message(body, cls))
        elif route.body:
            msg.MergeFrom(parse_json_message({route.body: body}, cls))
        else:
            raise BadRequest(f"{route.verb} {route.template} takes no body; give the fields as query parameters")
    if query:
        msg.MergeFrom(parse_json_message(parameters_json(cls.DESCRIPTOR, query), cls, "query"))
    for name, value in variables.items():
        if not value:
            raise BadRequest(f"path: {name} is empty")
        fields = _field_path(cls.DESCRIPTOR, name)
        _set_scalar_path(msg, fields, value)
    return msg


def _set_scalar_path(msg: message.Message, fields: Sequence[FieldDescriptor], value: str) -> None:
    target = msg
    for field in fields[:-1]:
        target = getattr(target, field.name)
    last = fields[-1]
    json_value = _scalar_json(last, value, f"path {'.'.join(f.name for f in fields)}")
    partial = last.containing_type
    holder = message_factory.GetMessageClass(partial)()
    try:
        json_format.ParseDict({last.name: json_value}, holder)
    except json_format.ParseError as error:
        raise BadRequest(f"path {last.name}: {error}") from None
    setattr(target, last.name, getattr(holder, last.name))


def line_message(line: bytes, number: int, cls: type[message.Message]) -> message.Message:
    """Line `number` of a newline-delimited JSON stream as a message of `cls`."""
    return parse_json_message(decode_json(line, f"line {number}"), cls, f"line {number}")


def body_messages(raw: bytes, cls: type[message.Message]) -> list[message.Message]:
    """A client stream's messages from a whole JSON body: an array of them, or one (empty: none)."""
    body = decode_json(raw) if raw.strip() else []
    if isinstance(body, dict):
        body = [body]
    if not isinstance(body, list):
        raise BadRequest(f"body: expected a JSON array of {cls.DESCRIPTOR.full_name}, got {type(body).__name__}")
    return [parse_json_message(item, cls, f"body[{i}]") for i, item in enumerate(body)]


def image_fields(message_type: descriptor.Descriptor) -> list[str]:
    """Top-level fields holding an mps.common.v1.Image: where a multipart upload's file goes."""
    return [
        field.name
        for field in message_type.fields
        if field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type.full_name == IMAGE_MESSAGE
        and not _is_repeated(field)
    ]


def multipart_request(
    route: Route,
    variables: Mapping[str, str],
    query: Sequence[tuple[str, str]],
    files: Mapping[str, bytes],
    fields: Sequence[tuple[str, str]],
) -> message.Message:
    """A request from a multipart form: `files` by part name (each an Image field), the `request`
    part as the message's JSON, other parts as parameters."""
    cls = route.request_class()
    targets = image_fields(cls.DESCRIPTOR)
    if not targets:
        raise BadRequest(f"{route.method.name} takes no image: send JSON, not multipart/form-data")
    unknown = sorted(set(files) - set(targets))
    if unknown:
        raise BadRequest(f"file part {unknown[0]!r}: the image goes in a part named {' or '.join(targets)}")
    body = None
    params: list[tuple[str, str]] = []
    for name, value in fields:
        if name == "request":
            if body is not None:
                raise BadRequest("the 'request' part is given twice")
            body = decode_json(value.encode(), "part 'request'")
        else:
            params.append((name, value))
    msg = build_request(route, variables, [*query, *params], body if route.body else None)
    for name, content in files.items():
        if not content:
            raise BadRequest(f"file part {name!r} is empty")
        getattr(msg, name).encoded = content
    return msg


def first_bytes_field(msg: message.Message) -> bytes | None:
    """The response's first bytes field (for `alt=media`: the thumbnail itself, not JSON)."""
    for field in msg.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_BYTES and not _is_repeated(field):
            return bytes(getattr(msg, field.name))
    return None


def sniff_media_type(data: bytes) -> str:
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"
