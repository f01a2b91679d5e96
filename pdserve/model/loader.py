"""Loads a causal LM for the engines, or just its metadata for the gateway.

A model spec is one of: ``default`` (SmolLM2-135M-Instruct, provisioned
offline), ``preset:NAME`` (random weights, see ``presets``), or the path of any
Hugging Face causal-LM folder. The gateway needs only ``load_model_info``:
config, tokenizer and limits, no weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedConfig

from pdserve.config import DEFAULT_MODEL
from pdserve.errors import InvalidArgument
from pdserve.model import presets, provision

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return _DTYPES[name]


@dataclass(frozen=True)
class KVShape:
    """The per-token KV geometry every layer shares."""

    num_layers: int
    kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        # K and V, every layer.
        return 2 * self.num_layers * self.kv_heads * self.head_dim * dtype.itemsize


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway knows about the model: no weights."""

    name: str
    spec: str
    config: PreTrainedConfig
    tokenizer: Any | None
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    kv: KVShape

    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer is not None and bool(getattr(self.tokenizer, "chat_template", None))


@dataclass(frozen=True)
class LoadedModel:
    info: ModelInfo
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype


def _resolve_folder(spec: str) -> Path:
    if spec in (DEFAULT_MODEL, provision.DEFAULT_MODEL_NAME):
        folder = provision.default_model_dir()
        if not provision.is_provisioned(folder):
            raise InvalidArgument(f"model: the default model is not provisioned yet; run `pdserve model fetch` (folder {folder})")
        return folder
    folder = Path(spec).expanduser()
    if not (folder / "config.json").exists():
        raise InvalidArgument(
            f"model: {spec!r} is not a Hugging Face model folder (no config.json), 'default', "
            f"or a preset ({', '.join(presets.PREFIX + p for p in sorted(presets.PRESETS))})"
        )
    return folder


def _kv_shape(cfg: PreTrainedConfig) -> KVShape:
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return KVShape(num_layers=cfg.num_hidden_layers, kv_heads=kv_heads, head_dim=head_dim)


def _check_supported(cfg: PreTrainedConfig, name: str) -> None:
    layer_types = getattr(cfg, "layer_types", None) or ()
    if any(t != "full_attention" for t in layer_types):
        raise InvalidArgument(f"model: {name} uses {sorted(set(layer_types))} layers; pdserve supports full attention only")


def _eos_ids(cfg: PreTrainedConfig, gen: GenerationConfig | None) -> tuple[int, ...]:
    eos = gen.eos_token_id if gen is not None and gen.eos_token_id is not None else cfg.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def load_model_info(spec: str) -> ModelInfo:
    """Config, tokenizer (None for presets) and limits of a model spec."""
    if presets.is_preset(spec):
        try:
            preset = presets.get_preset(spec)
        except KeyError as exc:
            raise InvalidArgument(f"model: {exc.args[0]}") from None
        cfg, tokenizer, gen, name = preset.config(), None, None, spec
    else:
        folder = _resolve_folder(spec)
        cfg = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        try:
            gen = GenerationConfig.from_pretrained(folder)
        except OSError:
            gen = None
        name = provision.DEFAULT_MODEL_NAME if spec == DEFAULT_MODEL else folder.name
    cfg = cfg.get_text_config()
    _check_supported(cfg, name)
    return ModelInfo(
        name=name,
        spec=spec,
        config=cfg,
        tokenizer=tokenizer,
        context_length=int(cfg.max_position_embeddings),
        vocab_size=int(cfg.vocab_size),
        eos_token_ids=_eos_ids(cfg, gen),
        kv=_kv_shape(cfg),
    )


def load_model(spec: str, device: str = "cpu", dtype: str = "auto") -> LoadedModel:
    """Loads weights for an engine: eval mode, sdpa attention, on ``device``."""
    started = time.monotonic()
    info = load_model_info(spec)
    torch_dtype = resolve_dtype(dtype, device)
    if presets.is_preset(spec):
        model = presets.build(presets.get_preset(spec), device, torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(_resolve_folder(spec), dtype=torch_dtype)
        model = model.to(device)
    model.set_attn_implementation("sdpa")
    model.eval()
    model.requires_grad_(False)
    log.info("loaded %s on %s in %s (%.1f s)", info.name, device, torch_dtype, time.monotonic() - started)
    return LoadedModel(info=info, model=model, device=torch.device(device), dtype=torch_dtype)
