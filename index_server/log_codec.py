"""A shard's write-ahead log records: domain operations (index_server.domain Item, Deletion, Update) <-> bytes.

The storage encoding, kept as it always was so that every data directory still loads: a record is
one tag byte, b"A" then a serialized mps.index.v1.AddRequest, b"D" then a DeleteRequest, or b"U"
then an UpdateGroupsRequest. A replication stream carries the same records as LoggedOperation
messages (to_message, from_message), and a database set aside at start-up keeps its records framed
in one snapshot blob (pack, unpack). An Add's thumbnail and local features are written to the
store's thumbnails beside its record, so the record the log keeps leaves them out
(without_thumbnail); the record a replication stream carries keeps them.
"""

from __future__ import annotations

import struct

from index_server.convert import (
    add_request,
    attributes_to_proto,
    filter_to_proto,
    stored_attributes,
    stored_filter,
    stored_item,
)
from index_server.domain import Deletion, Item, Operation, Update
from mps.index.v1 import index_pb2

_ADD, _DELETE, _UPDATE = b"A", b"D", b"U"

Message = index_pb2.AddRequest | index_pb2.DeleteRequest | index_pb2.UpdateGroupsRequest


def encode(operation: Operation) -> bytes:
    """The log record of an operation."""
    if isinstance(operation, Item):
        return _ADD + add_request(operation).SerializeToString()
    if isinstance(operation, Update):
        return _UPDATE + update_request(operation).SerializeToString()
    request = index_pb2.DeleteRequest(
        database=operation.database, item_ids=operation.item_ids, group_ids=operation.group_ids
    )
    if operation.where is not None:
        request.where.CopyFrom(filter_to_proto(operation.where))
    return _DELETE + request.SerializeToString()


def update_request(update: Update) -> index_pb2.UpdateGroupsRequest:
    return index_pb2.UpdateGroupsRequest(
        database=update.database,
        groups=[
            index_pb2.GroupAttributes(group_id=group, attributes=attributes_to_proto(attributes))
            for group, attributes in update.attributes.items()
        ],
    )


def add_record(request: index_pb2.AddRequest) -> bytes:
    """The log record of an Add received as `request` (the same record encode() makes of its Item,
    without encoding the signature again)."""
    return _ADD + request.SerializeToString()


def without_thumbnail(record: bytes) -> bytes:
    """The record as the log keeps it: an Add without its thumbnail and local features (the store
    holds them beside)."""
    if record[:1] != _ADD:
        return record
    request = index_pb2.AddRequest.FromString(record[1:])
    if not request.thumbnail and not request.HasField("local_features"):
        return record
    request.ClearField("thumbnail")
    request.ClearField("local_features")
    return _ADD + request.SerializeToString()


def _message(record: bytes) -> Message:
    tag, payload = record[:1], record[1:]
    if tag == _ADD:
        return index_pb2.AddRequest.FromString(payload)
    if tag == _DELETE:
        return index_pb2.DeleteRequest.FromString(payload)
    if tag == _UPDATE:
        return index_pb2.UpdateGroupsRequest.FromString(payload)
    raise ValueError(f"logged record with unknown tag {tag!r}")


def database_of(record: bytes) -> str:
    """The database a record writes to, even when its operation does not decode."""
    return _message(record).database


def decode(record: bytes) -> Operation:
    """The operation a record holds; raises SignatureError (or InvalidArgument) for an Add whose
    signature does not decode, ValueError for a record that is no operation."""
    message = _message(record)
    if isinstance(message, index_pb2.AddRequest):
        return stored_item(message)
    if isinstance(message, index_pb2.UpdateGroupsRequest):
        return Update(
            message.database, {group.group_id: stored_attributes(group.attributes) for group in message.groups}
        )
    return Deletion(
        message.database,
        tuple(message.item_ids),
        tuple(message.group_ids),
        stored_filter(message.where) if message.HasField("where") else None,
    )


def to_message(record: bytes) -> index_pb2.LoggedOperation:
    """A record as a replication stream carries it."""
    message = _message(record)
    if isinstance(message, index_pb2.AddRequest):
        return index_pb2.LoggedOperation(add=message)
    if isinstance(message, index_pb2.UpdateGroupsRequest):
        return index_pb2.LoggedOperation(update=message)
    return index_pb2.LoggedOperation(delete=message)


def from_message(operation: index_pb2.LoggedOperation) -> bytes:
    """The record of an operation received in a replication stream."""
    kind = operation.WhichOneof("operation")
    if kind == "add":
        return _ADD + operation.add.SerializeToString()
    if kind == "update":
        return _UPDATE + operation.update.SerializeToString()
    return _DELETE + operation.delete.SerializeToString()


def pack(records: list[bytes]) -> bytes:
    """Records as one blob: u32 little-endian length + record, repeated."""
    return b"".join(struct.pack("<I", len(r)) + r for r in records)


def unpack(blob: bytes) -> list[bytes]:
    """The records of a pack() blob, in order."""
    records, position = [], 0
    while position < len(blob):
        (size,) = struct.unpack_from("<I", blob, position)
        records.append(bytes(blob[position + 4 : position + 4 + size]))
        position += 4 + size
    return records
