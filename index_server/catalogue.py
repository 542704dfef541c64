"""The databases of one shard, by name, each holding one signature kind."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from typing import Union

import numpy as np

from common.bow_codec import BagOfWords
from index_server.dense import DenseDatabase
from index_server.inverted import BowIndex, SignatureError
from mps.common.v1 import common_pb2

Database = Union[DenseDatabase, BowIndex]


class UnknownDatabase(KeyError):
    pass


@dataclass
class DatabaseInfo:
    name: str
    kind: int
    dimension: int
    items: int


class Catalogue:
    def __init__(self) -> None:
        self._databases: dict[str, tuple[int, Database]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> tuple[int, Database]:
        try:
            return self._databases[name]
        except KeyError:
            raise UnknownDatabase(name) from None

    def get_or_create(self, name: str, kind: int, value: np.ndarray | BagOfWords) -> Database:
        """The database `name`, created for this signature's kind and shape by its first item."""
        with self._lock:
            if name not in self._databases:
                database: Database = BowIndex(value.vocabulary, value.codebook) \
                    if isinstance(value, BagOfWords) else DenseDatabase(value.size)
                self._databases[name] = (kind, database)
            held_kind, database = self._databases[name]
        if held_kind != kind:
            raise SignatureError(f"database {name!r} holds {common_pb2.SignatureKind.Name(held_kind)} "
                                 f"signatures, not {common_pb2.SignatureKind.Name(kind)}")
        return database

    def names(self) -> list[str]:
        return sorted(self._databases)

    def stats(self) -> list[DatabaseInfo]:
        return [DatabaseInfo(name, kind, db.dimension, len(db))
                for name, (kind, db) in sorted(self._databases.items())]
