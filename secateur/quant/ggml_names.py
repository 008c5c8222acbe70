"""Where a linear rounded into llama.cpp's block types keeps them: the names alone.

Apart from `ggml.py` so that `quant/state.py` (which `ggml.py` imports through the GPTQ solve)
can leave these buffers out of dense checkpoints without an import circle.
"""

from __future__ import annotations

from torch import nn

from secateur.params import GGML_PREFIX as PREFIX  # every block buffer's name starts with it

ATTR = "secateur_ggml"  # the module's GGMLScheme
CODES, S, B, IMATRIX = (PREFIX + k for k in ("codes", "s", "b", "imatrix"))
FIELD = PREFIX + "field_"  # + a field's name (d, m, dmin, sc): what the packer stores per block


def ggml_keys(model: nn.Module) -> set[str]:
    """The state_dict keys of the block buffers (not weights: dense formats leave them out)."""
    return {f"{name}.{leaf}" if name else leaf
            for name, module in model.named_modules() if ATTR in module.__dict__
            for leaf in module._buffers if leaf.startswith(PREFIX)}
