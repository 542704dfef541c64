"""The HTTP front's settings: defaults, environment and flags, and refusals that name the field."""

from __future__ import annotations

import pytest

from common.config import ConfigError, load_config
from gateway.http.config import HttpConfig


def test_environment_and_flags_override_the_defaults():
    env = {"MPS_HTTP_GATEWAY_ADDRESS": "dns:///gateway:50050", "MPS_HTTP_CORS_ORIGINS": '["https://shop.example"]'}
    config = load_config(HttpConfig, "http", ["--port", "9000", "--page", "false"], environ=env)
    assert config.port == 9000 and not config.page
    assert config.gateway_address == "dns:///gateway:50050" and config.cors_origins == ["https://shop.example"]
    assert HttpConfig().port == 8080 and HttpConfig().page


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"port": 70000}, "port 70000 is not in [0, 65535]"),
        ({"timeout_s": 0}, "timeout_s 0 is not > 0"),
        ({"max_body_bytes": 10}, "max_body_bytes 10 is not >= 1024"),
        ({"log_level": "LOUD"}, "log_level 'LOUD' is not one of"),
        ({"log_format": "xml"}, "log_format 'xml' is not one of 'json', 'text'"),
        ({"gateway_address": ""}, "gateway_address: no address given"),
        ({"gateway_address": "a:1,b:2"}, "gateway_address: replica address 'a:1'"),
        ({"tls_cert": "c.pem"}, "tls_cert and tls_key go together"),
        ({"tls_client_cert": "c.pem", "tls_client_key": "k.pem"}, "need tls_ca"),
        ({"cors_origins": "*"}, "cors_origins '*' is not a list"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(overrides, says):
    with pytest.raises(ConfigError) as refused:
        load_config(HttpConfig, "http", environ={}, **overrides)
    assert says in str(refused.value)


def test_a_bad_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as stopped:
        load_config(HttpConfig, "http", ["--timeout-s", "soon"], environ={})
    assert stopped.value.code == 2 and "timeout_s 'soon' is not a number" in capsys.readouterr().err
