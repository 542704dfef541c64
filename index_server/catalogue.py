"""The databases of one shard, by name, each holding one signature kind."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from index_server.dense import DenseDatabase, SignatureError


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
        self._databases: dict[str, tuple[int, DenseDatabase]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> tuple[int, DenseDatabase]:
        try:
            return self._databases[name]
        except KeyError:
            raise UnknownDatabase(name) from None

    def get_or_create(self, name: str, kind: int, dimension: int) -> DenseDatabase:
        with self._lock:
            if name not in self._databases:
                self._databases[name] = (kind, DenseDatabase(dimension))
            held_kind, database = self._databases[name]
        if held_kind != kind:
            raise SignatureError(f"database {name!r} holds another signature kind ({held_kind}), not {kind}")
        return database

    def names(self) -> list[str]:
        return sorted(self._databases)

    def stats(self) -> list[DatabaseInfo]:
        return [DatabaseInfo(name, kind, db.dimension, len(db))
                for name, (kind, db) in sorted(self._databases.items())]
