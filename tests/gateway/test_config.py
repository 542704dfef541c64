"""The gateway's BLCF settings (gateway/config.py): defaults that leave BLCF off until configured,
and refusals that say what to fix, from code and from the command line. (Every service's common
checks: tests/common/test_config.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from common.config import ConfigError, load_config
from gateway.backends import KIND_VALUES
from gateway.config import GatewayConfig
from mps.common.v1 import common_pb2


def test_blcf_is_a_kind_but_is_indexed_only_when_configured():
    config = GatewayConfig()
    assert config.index_kinds == ["deep", "bow"]
    assert config.min_score["blcf"] == 0.05
    assert (config.spatial_rerank_k, config.max_spatial_rerank_k, config.query_expansion) == (50, 200, 0)
    assert KIND_VALUES["blcf"] == common_pb2.SIGNATURE_KIND_BLCF
    configured = load_config(
        GatewayConfig,
        "gateway",
        ["--index-kinds", '["deep", "bow", "blcf"]', "--default-signature-kind", "blcf", "--spatial-rerank-k", "20"],
        environ={"MPS_GATEWAY_QUERY_EXPANSION": "5"},
    )
    assert configured.index_kinds == ["deep", "bow", "blcf"] and configured.default_signature_kind == "blcf"
    assert (configured.spatial_rerank_k, configured.query_expansion) == (20, 5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"default_signature_kind": "blcf"},
            "default_signature_kind 'blcf' is not one of index_kinds ['deep', 'bow']: every product is indexed "
            "only with those kinds",
        ),
        (
            {"index_kinds": ["deep", "blcf2"]},
            "index_kinds[1] 'blcf2' is not one of 'deep', 'bow', 'blcf'",
        ),
        (
            {"spatial_rerank_k": 201},
            "spatial_rerank_k 201 is above max_spatial_rerank_k 200: lower it, or raise the limit",
        ),
        ({"spatial_rerank_k": -1}, "spatial_rerank_k -1 is not >= 0 (0 = off)"),
        ({"max_spatial_rerank_k": 0, "spatial_rerank_k": 0}, "max_spatial_rerank_k 0 is not >= 1"),
        (
            {"spatial_rerank_k": 10, "query_expansion": 11},
            "query_expansion 11 is above spatial_rerank_k 10: the query is expanded with the best windows of "
            "the re-ranked candidates, so expand over at most spatial_rerank_k of them (or 0 for none)",
        ),
        ({"query_expansion": -2}, "query_expansion -2 is not >= 0 (0 = off)"),
        ({"blcf_side": 16}, "blcf_side 16 is not in [32, 8192]"),
        ({"min_score": {"blcf": "low"}}, "min_score['blcf'] 'low' is not a number"),
    ],
)
def test_bad_blcf_settings_are_refused_saying_what_to_fix(overrides: dict[str, Any], message: str):
    with pytest.raises(ConfigError) as error:
        GatewayConfig(**overrides)
    assert str(error.value) == message


def test_a_bad_blcf_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        load_config(GatewayConfig, "gateway", ["--query-expansion", "60"], environ={})
    assert exited.value.code == 2
    assert "query_expansion 60 is above spatial_rerank_k 50" in capsys.readouterr().err
