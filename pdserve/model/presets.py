"""Deterministic random-weight models of real architectures.

A preset is a config plus a seed: every process that builds ``preset:NAME``
gets bit-identical weights (same torch build), so prefill and decode servers
agree without sharing files. Tiny presets serve the tests; full-size shapes
serve GPU benchmarks, where weights do not matter. Presets have no tokenizer:
send token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedConfig, Qwen2Config

PREFIX = "preset:"


@dataclass(frozen=True)
class Preset:
    name: str
    make_config: Callable[[], PreTrainedConfig]
    seed: int = 0
    # Wider than the usual 0.02 so logits are well separated: greedy decoding
    # is then robust to the last-bit differences between batched and solo
    # kernels, which is what exactness tests need.
    init_std: float = 0.25

    def config(self) -> PreTrainedConfig:
        cfg = self.make_config()
        # Random weights would hit a random EOS; presets generate to max_tokens.
        cfg.eos_token_id = None
        cfg.bos_token_id = None
        cfg.pad_token_id = None
        return cfg


def _tiny_llama() -> PreTrainedConfig:
    return LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)


def _tiny_qwen2() -> PreTrainedConfig:
    return Qwen2Config(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                       use_sliding_window=False)


def _tiny_gpt2() -> PreTrainedConfig:
    return GPT2Config(vocab_size=1024, n_embd=128, n_layer=4, n_head=4, n_positions=1024, bos_token_id=None, eos_token_id=None)


def _llama_1b() -> PreTrainedConfig:
    # Llama-3.2-1B's shape.
    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                       rope_theta=500000.0, tie_word_embeddings=True)


def _llama_8b() -> PreTrainedConfig:
    # Llama-3.1-8B's shape.
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0)


def _qwen2_0_5b() -> PreTrainedConfig:
    # Qwen2-0.5B's shape.
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True, use_sliding_window=False)


def _gpt2() -> PreTrainedConfig:
    # GPT-2 small's shape.
    return GPT2Config()


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny-llama", _tiny_llama),
        Preset("tiny-qwen2", _tiny_qwen2),
        Preset("tiny-gpt2", _tiny_gpt2),
        Preset("llama-1b", _llama_1b, init_std=0.02),
        Preset("llama-8b", _llama_8b, init_std=0.02),
        Preset("qwen2-0.5b", _qwen2_0_5b, init_std=0.02),
        Preset("gpt2", _gpt2, init_std=0.02),
    )
}


def is_preset(spec: str) -> bool:
    return spec.startswith(PREFIX)


def get_preset(spec: str) -> Preset:
    name = spec.removeprefix(PREFIX)
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def build(preset: Preset, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights drawn from the preset's seed: on the CPU in float32, then moved and cast; on a GPU
    drawn there in ``dtype`` (an 8B shape in seconds, not a minute and 32 GB of host memory), so a preset
    on a GPU has other weights than on the CPU, the same in every process."""
    cfg = preset.config()
    cfg.initializer_range = preset.init_std
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(preset.seed)
        if torch.device(device).type == "cuda":
            with torch.device(device):
                return AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.to(device=device, dtype=dtype)
