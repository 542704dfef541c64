import sys

from common.config import load_config
from index_server.config import IndexConfig
from index_server.server import serve

serve(load_config(IndexConfig, "index", sys.argv[1:]))
