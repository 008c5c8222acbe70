"""CPU runtimes for quantized models: int4 / int8 kernel linears in place of dequantized ones.

`apply_runtime(model, "int4" | "int8")` converts a model quantized in memory (linears carrying a
`QuantState`); `load_packed(dir, runtime)` builds the runtime model straight from a
`save_packed` directory without ever materialising the dense weights.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from secateur.runtime.base import RuntimeLinear, runtime_weight_bytes
from secateur.runtime.convert import RUNTIMES, Runtime, apply_runtime
from secateur.runtime.head import HEADS, Head
from secateur.runtime.int4 import Int4Linear
from secateur.runtime.int8 import Int8Linear, W8A8Linear, mark_w8a8


def load_packed(path: str | Path, runtime: Runtime, dtype: str = "float32",
                head: Head = "float16") -> nn.Module:
    """See `secateur.runtime.packed.load_packed` (imported late: it reads the packed format,
    which itself builds on this package)."""
    from secateur.runtime.packed import load_packed as load

    return load(path, runtime, dtype, head)


__all__ = ["HEADS", "RUNTIMES", "Head", "Int4Linear", "Int8Linear", "Runtime", "RuntimeLinear",
           "W8A8Linear", "apply_runtime", "load_packed", "mark_w8a8", "runtime_weight_bytes"]
