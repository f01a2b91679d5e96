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
