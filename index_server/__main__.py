"""Index shard (`python -m index_server [flags]`) or router (`python -m index_server router [flags]`)."""

import sys

from common.config import load_config
from index_server.config import IndexConfig, RouterConfig
from index_server.server import serve, serve_router

if sys.argv[1:2] == ["router"]:
    serve_router(load_config(RouterConfig, "index_router", sys.argv[2:]))
else:
    serve(load_config(IndexConfig, "index", sys.argv[1:]))
