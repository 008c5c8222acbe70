"""Completions of prompts, for sequence-level (teacher-generated) and on-policy distillation.

Every prompt has the same length (the first P tokens of a packed window), so batches need no
padding, and exactly `new_tokens` tokens are generated (end-of-sequence is suppressed until
then) so every sequence fills its window. Sampling draws from a generator seeded per call and
isolated from the global RNG, so generation changes nothing else a run draws (dropout), and a
resumed run generates the same tokens.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def complete(model: nn.Module, prompts: torch.Tensor, new_tokens: int, temperature: float,
             seed: int, pad_token_id: int | None) -> torch.Tensor:
    """(n, P) prompts -> (n, P + new_tokens); temperature 0 is greedy decoding."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = prompts.to(device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} \
        if temperature > 0 else {"do_sample": False}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=pad_token_id if pad_token_id is not None else 0,
                             **sampling)
    model.train(was_training)
    return out[:, :prompts.shape[1] + new_tokens].cpu()
