"""The OpenAPI 3.1 description of the HTTP/JSON front, generated from the protos: paths from each
RPC's google.api.http option, schemas from its messages under the proto3 JSON mapping, descriptions
from the protos' comments (kept in mps/descriptors.binpb, which `make proto` writes with source info).

`python -m gateway.http.openapi [FILE]` writes it (stdout without FILE); the front serves it at
/openapi.json.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import descriptor, descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor

from common.config import REPO_ROOT
from gateway.http import transcoder

DESCRIPTOR_SET = REPO_ROOT / "mps" / "descriptors.binpb"
NDJSON = "application/x-ndjson"

_INT32 = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32}
_UINT32 = {FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32}
_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64}
_UINT64 = {FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64}

# Well-known types have their own JSON forms.
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?\d+(\.\d+)?s$"},
    "google.protobuf.FieldMask": {"type": "string", "description": "Field paths, comma-separated."},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {"type": "object", "properties": {"@type": {"type": "string"}}},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.DoubleValue": {"type": "number"},
    "google.protobuf.FloatValue": {"type": "number"},
    "google.protobuf.Int32Value": {"type": "integer", "format": "int32"},
    "google.protobuf.UInt32Value": {"type": "integer", "format": "int32", "minimum": 0},
    "google.protobuf.Int64Value": {"type": ["string", "integer"], "format": "int64"},
    "google.protobuf.UInt64Value": {"type": ["string", "integer"], "format": "uint64"},
    "google.protobuf.BytesValue": {"type": "string", "contentEncoding": "base64"},
}


def _unwrap(comment: str) -> str:
    """A proto comment as prose: its lines joined, blank lines kept as paragraph breaks."""
    paragraphs = [" ".join(line.strip() for line in block.splitlines()) for block in comment.strip().split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def _file_comments(file: descriptor_pb2.FileDescriptorProto) -> dict[str, str]:
    """One .proto file's comments by full name (source locations: 4 message, 2 field, 3 nested
    message, 4/5 enum in a message / at the top, 2 enum value, 6 service, 2 method)."""
    by_path = {
        tuple(location.path): _unwrap(location.leading_comments)
        for location in file.source_code_info.location
        if location.leading_comments.strip()
    }
    comments: dict[str, str] = {}

    def enum(e: descriptor_pb2.EnumDescriptorProto, prefix: str, where: tuple[int, ...]) -> None:
        name = f"{prefix}.{e.name}"
        comments[name] = by_path.get(where, "")
        for k, value in enumerate(e.value):
            comments[f"{name}.{value.name}"] = by_path.get((*where, 2, k), "")

    def walk(m: descriptor_pb2.DescriptorProto, prefix: str, where: tuple[int, ...]) -> None:
        name = f"{prefix}.{m.name}"
        comments[name] = by_path.get(where, "")
        for j, field in enumerate(m.field):
            comments[f"{name}.{field.name}"] = by_path.get((*where, 2, j), "")
        for j, nested in enumerate(m.nested_type):
            walk(nested, name, (*where, 3, j))
        for j, e in enumerate(m.enum_type):
            enum(e, name, (*where, 4, j))

    for i, m in enumerate(file.message_type):
        walk(m, file.package, (4, i))
    for i, e in enumerate(file.enum_type):
        enum(e, file.package, (5, i))
    for i, service in enumerate(file.service):
        comments[f"{file.package}.{service.name}"] = by_path.get((6, i), "")
        for j, method in enumerate(service.method):
            comments[f"{file.package}.{service.name}.{method.name}"] = by_path.get((6, i, 2, j), "")
    return comments


def load_comments(path: Path = DESCRIPTOR_SET) -> dict[str, str]:
    """Full name (message, field, enum, enum value, service, method) -> its leading comment."""
    if not path.exists():
        return {}
    comments: dict[str, str] = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file:
        comments.update(_file_comments(file))
    return {name: text for name, text in comments.items() if text}


def _ref(full_name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{full_name}"}


class _Schemas:
    """The components/schemas of every message and enum reached from the routes."""

    def __init__(self, comments: dict[str, str]):
        self.comments = comments
        self.schemas: dict[str, dict[str, Any]] = {}

    def _described(self, schema: dict[str, Any], full_name: str) -> dict[str, Any]:
        text = self.comments.get(full_name)
        return {**schema, "description": text} if text else schema

    def message(self, message_type: descriptor.Descriptor) -> dict[str, Any]:
        """A $ref to the message's schema (added with everything it reaches)."""
        name = message_type.full_name
        if name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[name])
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder: recursive messages refer to it
            properties = {field.json_name: self.field(field) for field in message_type.fields}
            schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
            oneofs = [o for o in message_type.oneofs if not (len(o.fields) == 1 and o.name.startswith("_"))]
            if oneofs:
                schema["description"] = "; ".join(
                    f"at most one of {', '.join(f.json_name for f in o.fields)} ({o.name})" for o in oneofs
                )
            self.schemas[name] = self._described(schema, name)
        return _ref(name)

    def enum(self, enum_type: descriptor.EnumDescriptor) -> dict[str, Any]:
        name = enum_type.full_name
        if name not in self.schemas:
            values = [value.name for value in enum_type.values]
            lines = [
                f"- {v.name}: {self.comments[f'{name}.{v.name}']}"
                for v in enum_type.values
                if f"{name}.{v.name}" in self.comments
            ]
            schema: dict[str, Any] = {"type": "string", "enum": values}
            text = "\n".join(filter(None, [self.comments.get(name, ""), *lines]))
            self.schemas[name] = {**schema, "description": text} if text else schema
        return _ref(name)

    def scalar(self, field: FieldDescriptor) -> dict[str, Any]:
        kind = field.type
        if kind == FieldDescriptor.TYPE_BOOL:
            return {"type": "boolean"}
        if kind in _INT32:
            return {"type": "integer", "format": "int32"}
        if kind in _UINT32:
            return {"type": "integer", "format": "int32", "minimum": 0}
        if kind in _INT64:  # proto3 JSON writes 64-bit integers as strings and reads either
            return {"type": ["string", "integer"], "format": "int64"}
        if kind in _UINT64:
            return {"type": ["string", "integer"], "format": "uint64"}
        if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            return {"type": "number", "format": "float" if kind == FieldDescriptor.TYPE_FLOAT else "double"}
        if kind == FieldDescriptor.TYPE_BYTES:
            return {"type": "string", "contentEncoding": "base64"}
        if kind == FieldDescriptor.TYPE_ENUM:
            return self.enum(field.enum_type)
        if kind == FieldDescriptor.TYPE_MESSAGE:
            return self.message(field.message_type)
        return {"type": "string"}

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        text = self.comments.get(field.full_name, "")
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            schema: dict[str, Any] = {"type": "object", "additionalProperties": self.scalar(value)}
        elif field.is_repeated:
            schema = {"type": "array", "items": self.scalar(field)}
        else:
            schema = self.scalar(field)
        if text:
            # A $ref with siblings is allowed in 3.1; keep the field's own comment beside it.
            schema = {**schema, "description": text}
        return schema


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "Google's JSON error: the gRPC status, its HTTP code and its google.rpc details.",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "code": {"type": "integer", "description": "The HTTP status."},
                    "status": {"type": "string", "description": "The gRPC status code name, e.g. INVALID_ARGUMENT."},
                    "message": {"type": "string"},
                    "details": {"type": "array", "items": {"type": "object"}},
                },
                "required": ["code", "status", "message"],
            }
        },
        "required": ["error"],
    }


def _query_parameters(
    schemas: _Schemas, message_type: descriptor.Descriptor, bound: Sequence[str]
) -> list[dict[str, Any]]:
    """Every top-level field not bound by the path, as a query parameter (a message field as JSON)."""
    parameters = []
    for field in message_type.fields:
        if field.name in bound:
            continue
        schema = schemas.field(field)
        parameter: dict[str, Any] = {"name": field.name, "in": "query", "required": False}
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            parameter["content"] = {"application/json": {"schema": schema}}
        else:
            parameter["schema"] = schema
            if field.is_repeated:
                parameter["explode"] = True
        text = schemas.comments.get(field.full_name)
        if text:
            parameter["description"] = text
        parameters.append(parameter)
    return parameters


def build(services: Iterable[descriptor.ServiceDescriptor], comments: dict[str, str] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every annotated RPC of `services`."""
    services = list(services)
    comments = load_comments() if comments is None else comments
    schemas = _Schemas(comments)
    paths: dict[str, dict[str, Any]] = {}
    table = transcoder.routes(services)
    bindings = Counter(route.method.full_name for route in table)
    for route in table:
        method = route.method
        request_type, response_type = method.input_type, method.output_type
        operation: dict[str, Any] = {
            "operationId": method.name if bindings[method.full_name] == 1 else f"{method.name}_{route.verb}",
            "tags": [method.containing_service.name],
            "summary": (comments.get(method.full_name, "").split(". ")[0] or method.name).strip(),
            "description": comments.get(method.full_name, ""),
            "x-grpc-method": route.rpc,
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in route.variables
            ],
            "responses": {
                "default": {
                    "description": "An error: the gRPC status as its HTTP code.",
                    "content": {"application/json": {"schema": _ref("Error")}},
                }
            },
        }
        if not route.client_streaming and (route.verb in ("GET", "DELETE") or not route.body):
            operation["parameters"] += _query_parameters(schemas, request_type, route.variables)
        if route.verb in ("GET", "DELETE") and transcoder.first_bytes_field(route.response_class()()) is not None:
            operation["parameters"].append(
                {
                    "name": "alt",
                    "in": "query",
                    "required": False,
                    "description": "media: the response's bytes themselves (e.g. the JPEG), not JSON.",
                    "schema": {"type": "string", "enum": ["json", "media"], "default": "json"},
                }
            )
        operation["parameters"].append(
            {
                "name": "X-Server-Timeout",
                "in": "header",
                "required": False,
                "description": "The call's deadline in seconds.",
                "schema": {"type": "number", "exclusiveMinimum": 0},
            }
        )
        if route.body:
            content: dict[str, Any] = {}
            message_schema = schemas.message(request_type)
            if route.client_streaming:
                content[NDJSON] = {"schema": message_schema}
                content["application/json"] = {"schema": {"type": "array", "items": message_schema}}
            else:
                content["application/json"] = {"schema": message_schema}
            images = transcoder.image_fields(request_type)
            if images:
                form: dict[str, Any] = {name: {"type": "string", "format": "binary"} for name in images}
                form["request"] = {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "description": f"The rest of the {request_type.full_name} as JSON (optional; a field may "
                    "also be a part of its own).",
                }
                content["multipart/form-data"] = {"schema": {"type": "object", "properties": form}}
            operation["requestBody"] = {"required": True, "content": content}
        response_schema = schemas.message(response_type)
        operation["responses"]["200"] = {
            "description": "OK" + (" (newline-delimited JSON, one message per line)" if route.server_streaming else ""),
            "content": {NDJSON if route.server_streaming else "application/json": {"schema": response_schema}},
        }
        paths.setdefault(route.template, {})[route.verb.lower()] = operation
    paths["/healthz"] = {
        "get": {
            "operationId": "Health",
            "summary": "The gateway's grpc.health.v1 status",
            "parameters": [{"name": "service", "in": "query", "required": False, "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "SERVING", "content": {"application/json": {"schema": {"type": "object"}}}},
                "503": {
                    "description": "Not serving, or unreachable",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
            },
        }
    }
    schemas.schemas["Error"] = _error_schema()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Multi-product visual search",
            "version": "v1",
            "description": " ".join(comments.get(s.full_name, "") for s in services).strip(),
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.schemas.items())),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }


def main(argv: Sequence[str] | None = None) -> int:
    from gateway.http.app import SERVICES

    args = list(sys.argv[1:] if argv is None else argv)
    text = json.dumps(build(SERVICES), indent=2) + "\n"
    if args:
        Path(args[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
