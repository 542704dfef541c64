import sys

from common.config import load_config
from signature_server.config import SignatureConfig
from signature_server.server import serve

serve(load_config(SignatureConfig, "signature", sys.argv[1:]))
