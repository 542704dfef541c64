"""Index shard configuration."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import ServerConfig


@dataclass
class IndexConfig(ServerConfig):
    """Serves one index shard over gRPC (mps.index.v1.IndexService)."""

    port: int = 50053
    # Items per streamed SearchResponse message.
    chunk_size: int = 64
    max_top_k: int = 1000
