import sys

from common.config import load_config
from detector_server.config import DetectorConfig
from detector_server.server import serve

serve(load_config(DetectorConfig, "detector", sys.argv[1:]))
