import pytest

from common.config import load_config
from gateway.config import GatewayConfig


def test_defaults_env_flags_precedence():
    env = {
        "MPS_GATEWAY_PORT": "6000",
        "MPS_GATEWAY_EXCLUSIVE_IOU": "0.3",
        "MPS_GATEWAY_INDEX_ROUTES": '{"bags": "10.0.0.1:1"}',
    }
    config = load_config(GatewayConfig, "gateway", ["--port", "7000"], environ=env)
    assert config.port == 7000  # the flag beats the environment
    assert config.exclusive_iou == 0.3
    assert config.index_routes == {"bags": "10.0.0.1:1"}
    assert config.max_top_k == GatewayConfig().max_top_k


def test_bad_value_is_refused():
    with pytest.raises(SystemExit):
        load_config(GatewayConfig, "gateway", ["--port", "many"], environ={})
