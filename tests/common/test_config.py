"""Configuration: defaults, environment and flags; every Literal field and range check refuses a bad
value with a message naming the field and what it allows, from code and from the command line."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import pytest

from common.config import ConfigError, ServerConfig, allowed_values, load_config
from detector_server.config import DetectorConfig
from gateway.backends import KIND_VALUES
from gateway.config import GatewayConfig, LocalisingSource, SignatureKind
from gateway.proposals import LOCALISING
from index_server.config import IndexConfig, RouterConfig
from signature_server.config import SignatureConfig

CONFIGS: list[type[ServerConfig]] = [DetectorConfig, SignatureConfig, IndexConfig, RouterConfig, GatewayConfig]


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


def test_flags_parse_into_the_typed_configs():
    gateway = load_config(
        GatewayConfig,
        "gateway",
        [
            "--port=7000",
            "--access-log=off",
            "--proposal-iou=0.5",
            "--index-kinds",
            '["bow"]',
            "--default-signature-kind=bow",
            "--selection-kind=bow",
            "--default-sources",
            '["salient", "segment"]',
            "--min-score",
            '{"bow": 0.2}',
            "--category-min-score",
            '{"mugs": {"bow": 0.3}}',
        ],
        environ={},
    )
    assert (gateway.port, gateway.access_log, gateway.proposal_iou) == (7000, False, 0.5)
    assert (gateway.index_kinds, gateway.default_signature_kind, gateway.selection_kind) == (["bow"], "bow", "bow")
    assert gateway.default_sources == ["salient", "segment"]
    assert (gateway.min_score, gateway.category_min_score) == ({"bow": 0.2}, {"mugs": {"bow": 0.3}})
    router = load_config(
        RouterConfig,
        "index_router",
        ["--layout", "word", "--shards", '[["127.0.0.1:1", "[::1]:2"], ["dns:///index:3"]]', "--max-top-k", "9"],
        environ={},
    )
    assert (router.layout, router.max_top_k) == ("word", 9)
    assert router.shards == [["127.0.0.1:1", "[::1]:2"], ["dns:///index:3"]]
    signature = load_config(SignatureConfig, "signature", ["--kernels", "cpu", "--log-format", "text"], environ={})
    assert (signature.kernels, signature.log_format) == ("cpu", "text")
    index = load_config(IndexConfig, "index", ["--word-shard-index", "1", "--word-shard-count", "2"], environ={})
    assert (index.word_shard_index, index.word_shard_count, index.max_word_share) == (1, 2, 1.0)


# -- Literal fields ---------------------------------------------------------------------------------

LITERAL_CASES: list[tuple[type[ServerConfig], dict[str, Any], str]] = [
    (DetectorConfig, {"log_format": "yaml"}, "log_format 'yaml' is not one of 'json', 'text'"),
    (SignatureConfig, {"kernels": "opencl"}, "kernels 'opencl' is not one of 'auto', 'cuda', 'cpu'"),
    (RouterConfig, {"layout": "wrod"}, "layout 'wrod' is not one of 'item', 'word'"),
    (
        GatewayConfig,
        {"default_signature_kind": "clip"},
        "default_signature_kind 'clip' is not one of 'deep', 'bow', 'blcf'",
    ),
    (GatewayConfig, {"selection_kind": "clip"}, "selection_kind 'clip' is not one of 'deep', 'bow', 'blcf'"),
    (GatewayConfig, {"index_kinds": ["deep", "clip"]}, "index_kinds[1] 'clip' is not one of 'deep', 'bow', 'blcf'"),
    (
        GatewayConfig,
        {"default_sources": ["detector", "user_region"]},
        "default_sources[1] 'user_region' is not one of 'detector', 'objectness', 'salient', 'segment'",
    ),
    (
        GatewayConfig,
        {"min_score": {"deep": 0.5, "dep": 0.5}},
        "min_score key 'dep' is not one of 'deep', 'bow', 'blcf'",
    ),
    (
        GatewayConfig,
        {"category_min_score": {"mugs": {"Deep": 0.5}}},
        "category_min_score['mugs'] key 'Deep' is not one of 'deep', 'bow', 'blcf'",
    ),
]


def _has_literal(kind: Any) -> bool:
    return bool(allowed_values(kind)) or any(_has_literal(arg) for arg in typing.get_args(kind))


def test_every_literal_field_has_a_case():
    literal_fields = {
        (cls.__name__, name)
        for cls in CONFIGS
        for name, kind in typing.get_type_hints(cls).items()
        if _has_literal(kind) and (name != "log_format" or cls is DetectorConfig)
    }
    cased = {(cls.__name__, name) for cls, overrides, _ in LITERAL_CASES for name in overrides}
    assert literal_fields == cased


@pytest.mark.parametrize(("cls", "overrides", "message"), LITERAL_CASES)
def test_a_literal_field_refuses_other_values(cls, overrides, message):
    with pytest.raises(ConfigError) as error:
        cls(**overrides)
    assert str(error.value) == message
    # Every config shares log_format; the Literal values themselves are accepted.
    assert cls(log_format="text").log_format == "text"


def test_the_literals_are_the_values_the_code_knows():
    assert typing.get_args(LocalisingSource) == tuple(source.value for source in LOCALISING)
    assert set(typing.get_args(SignatureKind)) == set(KIND_VALUES)


# -- types ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "overrides", "message"),
    [
        (IndexConfig, {"port": "many"}, "port 'many' is not an integer"),
        (IndexConfig, {"port": True}, "port True is not an integer"),
        (IndexConfig, {"access_log": "yes"}, "access_log 'yes' is not a boolean (true or false)"),
        (IndexConfig, {"max_word_share": "0.5"}, "max_word_share '0.5' is not a number"),
        (IndexConfig, {"data_dir": 3}, "data_dir 3 is not a string"),
        (RouterConfig, {"shards": "127.0.0.1:1"}, "shards '127.0.0.1:1' is not a list (JSON [...])"),
        (RouterConfig, {"shards": [["127.0.0.1:1", 2]]}, "shards[0][1] 2 is not a string"),
        (GatewayConfig, {"index_routes": ["a"]}, "index_routes ['a'] is not a dict (JSON {...})"),
        (GatewayConfig, {"min_score": {"deep": "high"}}, "min_score['deep'] 'high' is not a number"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused(cls, overrides, message):
    with pytest.raises(ConfigError) as error:
        cls(**overrides)
    assert str(error.value) == message


def test_a_float_field_takes_an_int():
    assert IndexConfig(max_word_share=1, data_dir="").max_word_share == 1


# -- ranges ---------------------------------------------------------------------------------------------

# (config, field, lowest allowed value): one below it is refused.
AT_LEAST: list[tuple[type[ServerConfig], str, float, str]] = [
    (IndexConfig, "max_workers", 1, ""),
    (IndexConfig, "max_message_bytes", 1, ""),
    (IndexConfig, "shutdown_grace_s", 0, ""),
    (IndexConfig, "rate_limit_per_s", 0, " (0 = none)"),
    (IndexConfig, "rate_burst", 0, " (0 = none)"),
    (IndexConfig, "max_concurrent_per_client", 0, " (0 = none)"),
    *[
        (DetectorConfig, name, low, note)
        for name, low, note in [
            ("max_pixels", 1, ""),
            ("inference_concurrency", 1, ""),
            ("max_objects", 0, ""),
            ("intra_op_threads", 0, " (0 lets ONNX Runtime choose)"),
        ]
    ],
    *[
        (SignatureConfig, name, low, note)
        for name, low, note in [
            ("bow_threads", 1, ""),
            ("max_images_per_request", 1, ""),
            ("max_pixels", 1, ""),
            ("inference_concurrency", 1, ""),
            ("max_salient", 0, ""),
            ("max_segments", 0, ""),
            ("intra_op_threads", 0, " (0 lets ONNX Runtime choose)"),
            ("opencv_threads", -1, " (-1 = OpenCV's default)"),
        ]
    ],
    *[
        (cls, name, low, "")
        for cls in (IndexConfig, RouterConfig)
        for name, low in [
            ("max_id_bytes", 1),
            ("max_items_per_stream", 1),
            ("max_metadata_keys", 0),
            ("max_metadata_key_bytes", 0),
            ("max_metadata_value_bytes", 0),
            ("max_metadata_bytes", 0),
            ("chunk_size", 1),
            ("max_top_k", 1),
            ("max_batch", 1),
            ("cancel_settle_s", 0),
        ]
    ],
    *[
        (IndexConfig, name, low, "")
        for name, low in [
            ("store_map_bytes", 1),
            ("snapshot_every", 1),
            ("dense_train_size", 1),
            ("partial_chunk", 1),
            ("replicate_chunk_bytes", 1),
            ("catch_up_timeout_s", 0),
            ("catch_up_tail_s", 0),
            ("replicate_settle_s", 0),
        ]
    ],
    (RouterConfig, "reply_reserve_s", 0, ""),
    (RouterConfig, "min_write_replicas", 1, ""),
    *[
        (GatewayConfig, name, low, "")
        for name, low in [
            *[(name, 0) for name in ("max_objects", "max_salient", "max_segments")],
            *[(name, 0) for name in ("category_margin", "box_vote_sharpness", "ingest_report_limit")],
            *[(name, 0) for name in ("catalogue_refresh_s", "reply_reserve_s", "cancel_settle_s")],
            *[(name, 0) for name in ("max_metadata_keys", "max_metadata_key_bytes")],
            *[(name, 0) for name in ("max_metadata_value_bytes", "max_metadata_bytes")],
            *[(name, 1) for name in ("max_proposals", "max_items", "decode_max_side", "detector_side")],
            *[(name, 1) for name in ("locate_side", "crop_max_side", "max_pixels", "max_top_k", "max_regions")],
            *[(name, 1) for name in ("max_categories", "signature_call_images", "signature_call_bytes")],
            *[(name, 1) for name in ("max_id_bytes", "max_delete_ids", "ingest_batch", "max_images_per_stream")],
        ]
    ],
    (GatewayConfig, "index_ready_wait_s", 0, " (0 = fail at once)"),
    (GatewayConfig, "rerank_k", 0, " (0 = off)"),
    *[(GatewayConfig, name, 1, "") for name in ("rerank_min_inliers", "rerank_half")],
    (GatewayConfig, "rerank_weight", 0, ""),
    (GatewayConfig, "max_connection_age_s", 0, " (0 = never)"),
    (IndexConfig, "max_local_features_bytes", 0, ""),
    (RouterConfig, "max_local_features_bytes", 0, ""),
]


@pytest.mark.parametrize(("cls", "name", "low", "note"), AT_LEAST, ids=lambda v: getattr(v, "__name__", str(v)))
def test_a_value_below_its_range_is_refused(cls, name, low, note):
    assert getattr(cls(**{name: low}), name) == low
    with pytest.raises(ConfigError) as error:
        cls(**{name: low - 1})
    assert str(error.value) == f"{name} {low - 1!r} is not >= {low}{note}"
    if typing.get_type_hints(cls)[name] is float:
        with pytest.raises(ConfigError, match=f"^{name} nan is not >= {low}"):
            cls(**{name: math.nan})


# (config, field, a refused value, the message)
OTHER_RANGES: list[tuple[type[ServerConfig], dict[str, Any], str]] = [
    (DetectorConfig, {"port": 65536}, "port 65536 is not in [0, 65535]"),
    (DetectorConfig, {"port": -1}, "port -1 is not in [0, 65535]"),
    (GatewayConfig, {"metrics_port": 70000}, "metrics_port 70000 is not in [0, 65535]"),
    (GatewayConfig, {"rerank_k": 30, "max_rerank_k": 20}, "rerank_k 30 is above max_rerank_k 20"),
    (GatewayConfig, {"rerank_k": 0, "max_rerank_k": 0}, "max_rerank_k 0 is not >= 1"),
    (GatewayConfig, {"rerank_side": 16}, "rerank_side 16 is not in [32, 2048]"),
    (GatewayConfig, {"rerank_points": 513}, "rerank_points 513 is not in [1, 512]"),
    (
        SignatureConfig,
        {"log_level": "LOUD"},
        "log_level 'LOUD' is not one of 'CRITICAL', 'ERROR', 'WARNING', 'INFO', 'DEBUG' (any case)",
    ),
    (IndexConfig, {"tls_cert": "a.crt"}, "tls_cert and tls_key go together: give both or neither"),
    (IndexConfig, {"tls_key": "a.key"}, "tls_cert and tls_key go together: give both or neither"),
    (IndexConfig, {"tls_client_ca": "ca.crt"}, "tls_client_ca (mTLS) needs the server's own tls_cert and tls_key"),
    (IndexConfig, {"tls_client_cert": "c.crt"}, "tls_client_cert/tls_client_key need tls_ca (the servers' CA)"),
    (
        IndexConfig,
        {"tls_ca": "ca.crt", "tls_client_key": "c.key"},
        "tls_client_cert and tls_client_key go together: give both or neither",
    ),
    (DetectorConfig, {"models": []}, "models [] is empty: name at least one model directory under models_dir"),
    (IndexConfig, {"max_dense_dimension": 1 << 20}, "max_dense_dimension 1048576 is not in [1, 1048575]"),
    (RouterConfig, {"max_dense_dimension": 0}, "max_dense_dimension 0 is not in [1, 1048575]"),
    (IndexConfig, {"max_bow_vocabulary": 65536}, "max_bow_vocabulary 65536 is not in [1, 65535]"),
    (RouterConfig, {"max_bow_vocabulary": 0}, "max_bow_vocabulary 0 is not in [1, 65535]"),
    (IndexConfig, {"word_shard_count": 0}, "word_shard_count 0 is not >= 1"),
    (
        IndexConfig,
        {"word_shard_index": 2, "word_shard_count": 2},
        "word_shard_index 2 is not in [0, word_shard_count 2)",
    ),
    (IndexConfig, {"word_shard_index": -1}, "word_shard_index -1 is not in [0, word_shard_count 1)"),
    (IndexConfig, {"max_word_share": 0}, "max_word_share 0 is not in (0, 1]"),
    (IndexConfig, {"max_word_share": 1.5}, "max_word_share 1.5 is not in (0, 1]"),
    (IndexConfig, {"max_word_share": math.nan}, "max_word_share nan is not in (0, 1]"),
    (IndexConfig, {"replicate_timeout_s": 0}, "replicate_timeout_s 0 is not > 0"),
    (RouterConfig, {"default_timeout_s": 0.0}, "default_timeout_s 0.0 is not > 0"),
    (RouterConfig, {"add_timeout_s": -1}, "add_timeout_s -1 is not > 0"),
    (RouterConfig, {"shards": []}, "shards must list at least one shard, each with at least one address"),
    (
        RouterConfig,
        {"shards": [["127.0.0.1:1"], []]},
        "shards must list at least one shard, each with at least one address",
    ),
    (
        RouterConfig,
        {"shards": [["127.0.0.1:1"], ["127.0.0.1:2", "index-b:3"]]},
        "shards[1][1] 'index-b:3': several replicas must be given as IP:port "
        "(or as one dns:///name:port resolving to all of them)",
    ),
    (RouterConfig, {"shards": [["127.0.0.1:", "127.0.0.1:2"]]}, "shards[0][0] '127.0.0.1:' has no port"),
    (
        GatewayConfig,
        {"index_kinds": ["deep"], "default_signature_kind": "bow"},
        "default_signature_kind 'bow' is not one of index_kinds ['deep']: "
        "every product is indexed only with those kinds",
    ),
    (
        GatewayConfig,
        {"index_kinds": ["deep"], "selection_kind": "bow", "default_signature_kind": "deep"},
        "selection_kind 'bow' is not one of index_kinds ['deep']: every product is indexed only with those kinds",
    ),
    (GatewayConfig, {"default_timeout_s": 0}, "default_timeout_s 0 is not > 0"),
    *[
        (GatewayConfig, {name: value}, f"{name} {value} is not in [0, 1]")
        for name in (
            "objectness_threshold",
            "ingest_min_objectness",
            "ingest_min_area",
            "proposal_iou",
            "exclusive_iou",
            "item_iou",
            "same_product_overlap",
        )
        for value in (-0.1, 1.5)
    ],
]


@pytest.mark.parametrize(("cls", "overrides", "message"), OTHER_RANGES)
def test_a_value_outside_its_range_is_refused(cls, overrides, message):
    with pytest.raises(ConfigError) as error:
        cls(**overrides)
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("cls", "overrides"),
    [
        (DetectorConfig, {"port": 65535, "log_level": "debug"}),
        (IndexConfig, {"tls_cert": "a.crt", "tls_key": "a.key", "tls_client_ca": "ca.crt"}),
        (IndexConfig, {"tls_ca": "ca.crt", "tls_client_cert": "c.crt", "tls_client_key": "c.key"}),
        (IndexConfig, {"word_shard_index": 1, "word_shard_count": 2, "max_word_share": 0.01}),
        (IndexConfig, {"max_dense_dimension": (1 << 20) - 1, "max_bow_vocabulary": 65535}),
        (RouterConfig, {"shards": [["127.0.0.1:1", "[::1]:2"], ["dns:///index-b:3"]], "layout": "word"}),
        (GatewayConfig, {"index_kinds": ["bow"], "default_signature_kind": "bow", "selection_kind": "bow"}),
        (GatewayConfig, {"proposal_iou": 1, "same_product_overlap": 0, "objectness_threshold": 0}),
    ],
)
def test_values_at_the_edges_of_their_ranges_are_taken(cls, overrides):
    config = cls(**overrides)
    assert {name: getattr(config, name) for name in overrides} == overrides


def test_every_default_is_valid():
    for cls in CONFIGS:
        defaults = cls()
        assert dataclasses.asdict(defaults) == dataclasses.asdict(cls(**dataclasses.asdict(defaults)))


# -- from the command line and the environment ------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "service", "argv", "message"),
    [
        (GatewayConfig, "gateway", ["--port", "many"], "argument --port: port 'many' is not an integer"),
        (RouterConfig, "index_router", ["--layout", "wrod"], "argument --layout: layout 'wrod' is not one of"),
        (
            GatewayConfig,
            "gateway",
            ["--index-kinds", '["deep", "clip"]'],
            "argument --index-kinds: index_kinds[1] 'clip' is not one of 'deep', 'bow', 'blcf'",
        ),
        (
            RouterConfig,
            "index_router",
            ["--shards", "[[127.0.0.1:1]]"],
            "argument --shards: shards '[[127.0.0.1:1]]' is not JSON (Expecting ',' delimiter)",
        ),
        (
            IndexConfig,
            "index",
            ["--word-shard-index", "2", "--word-shard-count", "2"],
            "error: word_shard_index 2 is not in [0, word_shard_count 2)",
        ),
        (IndexConfig, "index", ["--access-log", "maybe"], "argument --access-log: access_log 'maybe' is not a boolean"),
    ],
)
def test_a_bad_flag_is_an_argparse_error(cls, service, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_config(cls, service, argv, environ={})
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m ")
    assert message in err
    assert "Traceback" not in err


def test_a_bad_environment_variable_names_itself(capsys):
    with pytest.raises(ConfigError) as error:
        load_config(RouterConfig, "index_router", environ={"MPS_INDEX_ROUTER_LAYOUT": "wrod"})
    assert str(error.value) == "MPS_INDEX_ROUTER_LAYOUT: layout 'wrod' is not one of 'item', 'word'"
    with pytest.raises(SystemExit) as exit_:
        load_config(SignatureConfig, "signature", [], environ={"MPS_SIGNATURE_MAX_PIXELS": "0"})
    assert exit_.value.code == 2
    assert "error: max_pixels 0 is not >= 1" in capsys.readouterr().err


def test_a_bad_override_raises_config_error_a_value_error():
    with pytest.raises(ValueError) as error:
        load_config(IndexConfig, "index", environ={}, max_workers=0)
    assert isinstance(error.value, ConfigError)
    assert str(error.value) == "max_workers 0 is not >= 1"


def test_help_names_each_flag_its_default_and_allowed_values(capsys):
    with pytest.raises(SystemExit) as exit_:
        load_config(RouterConfig, "index_router", ["--help"], environ={})
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--layout LAYOUT default: 'item'; env MPS_INDEX_ROUTER_LAYOUT; one of 'item', 'word'" in out
    assert '--shards SHARDS default: [["127.0.0.1:50053"]]; env MPS_INDEX_ROUTER_SHARDS' in out
    assert "--max-top-k MAX_TOP_K default: 1000; env MPS_INDEX_ROUTER_MAX_TOP_K" in out
