"""The lm_head and the loss over the vocabulary in one pass, a chunk of positions at a time.

Unfused, a training step holds the logits of every position over the whole vocabulary (49,152
for SmolLM2: 400 MB in float32 for 4 x 512 tokens) and autograd keeps each elementwise
intermediate of the softmax and divergence at that size, then walks them again backwards. Here
the head runs over `rows` positions at a time: each chunk's logits, loss and gradient w.r.t.
those logits are computed and at once turned into the gradients of the hidden states and of
the head's weight, so nothing vocabulary-sized outlives its chunk and the head's matmul is not
recomputed in the backward pass (the approach of Liger-Kernel's fused linear cross-entropy).
The gradient w.r.t. the logits comes from autograd on the chunk, so every divergence, the
top-k folding and the LM loss keep their one definition in `kd_loss`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# positions per chunk: a chunk's logits (256 x 49,152 floats, 50 MB) are reused heap memory
# rather than a fresh mapping each time (the same choice as the block search's head)
ROWS = 256

# (logits of rows [start, stop) in float32, start, stop) -> the loss of those rows, already
# divided by whatever makes the chunks' sum the mean the caller wants
ChunkLoss = Callable[[torch.Tensor, int, int], torch.Tensor]


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                chunk_loss: ChunkLoss, rows: int) -> torch.Tensor:
        device = hidden.device.type
        # the head runs in float32 whatever autocast says: the loss is taken in float32 anyway
        with torch.autocast(device, enabled=False):
            h, w = hidden.float(), weight.float()
            b = None if bias is None else bias.float()
            grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
            grad_b = torch.zeros_like(b) if b is not None and ctx.needs_input_grad[2] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, h.shape[0], rows):
                stop = min(start + rows, h.shape[0])
                chunk = h[start:stop]
                with torch.enable_grad():
                    logits = chunk @ w.T if b is None else torch.addmm(b, chunk, w.T)
                    logits.requires_grad_(True)
                    loss = chunk_loss(logits, start, stop)
                    (grad_logits,) = torch.autograd.grad(loss, logits)
                total += loss.detach()
                if grad_h is not None:
                    torch.mm(grad_logits, w, out=grad_h[start:stop])
                if grad_w is not None:
                    grad_w.addmm_(grad_logits.T, chunk)
                if grad_b is not None:
                    grad_b += grad_logits.sum(0)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0)
                                for g in (grad_h, grad_w, grad_b)))
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.present = (grad_h is not None, grad_w is not None, grad_b is not None)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grads = []
        for saved, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.dtypes,
                                             strict=True):
            grads.append((saved * grad_out).to(dtype) if present else None)
        return (*grads, None, None)


def fused_head_loss(hidden: torch.Tensor, head: nn.Module, chunk_loss: ChunkLoss,
                    rows: int = ROWS) -> torch.Tensor:
    """Sum over chunks of `chunk_loss(head(hidden)[rows])`, `hidden` flattened to (N, H).

    `head` must be a plain linear map (an `nn.Linear`, weight tied or not); its weight and
    bias receive their gradients as if the full logits had been computed."""
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the fused loss needs a linear lm_head, not {type(head).__name__}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    return _FusedHeadLoss.apply(flat, head.weight, head.bias, chunk_loss, rows)
