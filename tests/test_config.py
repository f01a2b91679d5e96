"""Configuration from PDSERVE_* variables and flags, with errors that name their source."""

from __future__ import annotations

import argparse

import pytest

from pdserve import config as cfg


def parse(cls, argv, env=None):
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, cls)
    return cfg.load(cls, parser.parse_args(argv), environ=env or {})


def test_defaults():
    c = parse(cfg.GatewayConfig, [])
    assert c.listen == "127.0.0.1:50051" and c.prefill == ("127.0.0.1:50061",)


def test_env_then_flags_override():
    env = {"PDSERVE_MAX_BATCH": "8", "PDSERVE_MODEL": "preset:tiny-llama", "PDSERVE_LISTEN": "0.0.0.0:7000"}
    c = parse(cfg.DecodeConfig, ["--max-batch", "4"], env)
    assert (c.max_batch, c.model, c.listen) == (4, "preset:tiny-llama", "0.0.0.0:7000")


def test_lists_from_env():
    c = parse(cfg.GatewayConfig, [], {"PDSERVE_DECODE": "a:1, b:2"})
    assert c.decode == ("a:1", "b:2")


@pytest.mark.parametrize("cls,argv,env,needle", [
    (cfg.DecodeConfig, [], {"PDSERVE_MAX_BATCH": "lots"}, "PDSERVE_MAX_BATCH"),
    (cfg.DecodeConfig, ["--max-batch", "0"], {}, "max_batch: must be >= 1"),
    (cfg.PrefillConfig, ["--dtype", "int3"], {}, "dtype"),
    (cfg.PrefillConfig, ["--device", "tpu"], {}, "device"),
    (cfg.GatewayConfig, ["--decode", "nohost"], {}, "decode: expected host:port"),
    (cfg.GatewayConfig, ["--listen", "127.0.0.1:99999"], {}, "listen"),
    (cfg.PrefillConfig, ["--kv-inflight-bytes", "lots"], {}, "kv_inflight_bytes: expected a size"),
    (cfg.DecodeConfig, ["--min-step-interval-ms", "-1"], {}, "min_step_interval_ms"),
    (cfg.DecodeConfig, ["--cuda-graph-tokens", "-5"], {}, "cuda_graph_tokens"),
])
def test_invalid_values_name_their_source(cls, argv, env, needle):
    with pytest.raises(cfg.ConfigError) as info:
        parse(cls, argv, env)
    assert needle in str(info.value)


def test_auto_dtype():
    assert cfg.ModelConfig(device="cpu").torch_dtype_name == "float32"
    assert cfg.ModelConfig(device="cuda").torch_dtype_name == "bfloat16"


def test_auto_kv_in_flight_scales_with_the_device():
    """1 GiB of KV in flight is one 8k-token prompt of an 8B model: on a GPU the default is a share of its memory."""
    assert cfg.PrefillConfig(device="cpu").kv_inflight_spec == "1GiB"
    assert cfg.PrefillConfig(device="cuda").kv_inflight_spec == "0.25"
    assert cfg.PrefillConfig(device="cuda", kv_inflight_bytes="2GiB").kv_inflight_spec == "2GiB"


def test_kv_streams_default_to_the_device():
    """Parallel KV streams pay where a GPU's staging feeds them; on a CPU they only share its cores."""
    assert parse(cfg.PrefillConfig, []).kv_stream_count("cpu") == 1
    assert parse(cfg.PrefillConfig, ["--kv-streams", "auto"]).kv_stream_count("cuda") == 4
    assert parse(cfg.PrefillConfig, [], {"PDSERVE_KV_STREAMS": "2"}).kv_stream_count("cuda") == 2
    with pytest.raises(cfg.ConfigError, match="kv_streams"):
        cfg.PrefillConfig(kv_streams=0)


def test_prefill_passes_default_to_the_device():
    """A GPU pass of a few hundred tokens costs mostly its launches: GPU passes are larger by default; a value
    given (0 included: no chunking) is kept, and "auto" is the default."""
    assert parse(cfg.PrefillConfig, []).prefill_batch("cpu") == (2048, 512)
    assert parse(cfg.PrefillConfig, []).prefill_batch("cuda") == (4096, 2048)
    given = parse(cfg.DecodeConfig, ["--prefill-chunk-tokens", "0"], {"PDSERVE_PREFILL_TOKEN_BUDGET": "256"})
    assert given.prefill_batch("cuda") == (256, 0)
    assert parse(cfg.PrefillConfig, ["--prefill-chunk-tokens", "auto"]).prefill_batch("cuda") == (4096, 2048)
    with pytest.raises(cfg.ConfigError, match="PDSERVE_PREFILL_CHUNK_TOKENS"):
        parse(cfg.PrefillConfig, [], {"PDSERVE_PREFILL_CHUNK_TOKENS": "big"})
