import sys

from common.config import load_config
from gateway.http.config import HttpConfig
from gateway.http.server import serve

serve(load_config(HttpConfig, "http", sys.argv[1:], prog="python -m gateway.http"))
