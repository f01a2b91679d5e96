"""What one process running ``model.generate()`` produces: the reference every served output is held to."""

from __future__ import annotations

import torch

from pdserve.model.loader import LoadedModel


def reference_greedy(loaded: LoadedModel, prompt_ids: list[int], max_new_tokens: int,
                     ignore_eos: bool = False) -> list[int]:
    """The tokens single-process ``model.generate(do_sample=False)`` appends to ``prompt_ids``."""
    extra = {"eos_token_id": None} if ignore_eos else {}
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids], device=loaded.device)
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=max_new_tokens, pad_token_id=0, **extra)
    return out[0, len(prompt_ids):].tolist()


def greedy_margins(loaded: LoadedModel, prompt_ids: list[int], token_ids: list[int]) -> list[float]:
    """For each of ``token_ids`` (a greedy continuation of ``prompt_ids``), the gap between the largest and
    second-largest logit it was chosen by: how far float rounding is from flipping that choice."""
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids + token_ids[:-1]], device=loaded.device)
        logits = loaded.model(ids).logits[0, len(prompt_ids) - 1:].float()
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()
