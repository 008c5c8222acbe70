"""CPU runtimes for quantized models: int4 / int8 kernel linears in place of dequantized ones.

`apply_runtime(model, "int4" | "int8")` converts a model quantized in memory (linears carrying a
`QuantState`; `secateur.formats.packed_runtime.load_packed` builds the runtime model straight
from a `save_packed` directory without ever materialising the dense weights.
"""

from __future__ import annotations

from secateur.runtime.base import RuntimeLinear, runtime_weight_bytes
from secateur.runtime.convert import RUNTIMES, Runtime, apply_runtime
from secateur.runtime.head import HEADS, Head
from secateur.runtime.int4 import Int4Linear
from secateur.runtime.int8 import Int8Linear, W8A8Linear, mark_w8a8

__all__ = ["HEADS", "RUNTIMES", "Head", "Int4Linear", "Int8Linear", "Runtime", "RuntimeLinear",
           "W8A8Linear", "apply_runtime", "mark_w8a8", "runtime_weight_bytes"]
