import sys

from common.config import load_config
from gateway.config import GatewayConfig
from gateway.server import serve

serve(load_config(GatewayConfig, "gateway", sys.argv[1:]))
