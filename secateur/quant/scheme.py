"""A quantized linear's scheme, and which schemes each consumer of quantized weights takes.

`Accepts` is the one owner of the bit and group ranges: the quantize methods' configs, the
compressed-tensors packer and the CPU runtimes each name theirs here instead of checking bits
on their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class QuantScheme:
    """As compressed-tensors' `quantization_scheme` on a module: hashable, JSON-ready."""

    bits: int
    group_size: int  # -1: one group per output row (per channel)
    symmetric: bool
    actorder: Literal["group", "weight"] | None = None


@dataclass(frozen=True)
class Accepts:
    """The schemes one consumer takes, and how its refusal reads."""

    takes: str  # the consumer and its verb, as the refusal says it
    min_bits: int
    max_bits: int
    per_channel: bool = False  # one group per output row only
    symmetric: bool = False  # symmetric grids only
    instead: str = ""  # what to use instead, appended to the refusal

    @property
    def bit_range(self) -> str:
        if self.min_bits == self.max_bits:
            return f"{self.max_bits} bits"
        if self.min_bits == 1 and self.max_bits < 8:
            return f"at most {self.max_bits} bits"
        return f"{self.min_bits} to {self.max_bits} bits"

    def takes_bits(self, bits: int) -> bool:
        return self.min_bits <= bits <= self.max_bits

    def refusal(self, name: str, scheme: QuantScheme, groups: int = 1) -> str | None:
        """Why the linear `name` with this scheme (and `groups` groups per row) is refused,
        or None when it is taken."""
        if not self.takes_bits(scheme.bits):
            return (f"'{name}' has {scheme.bits}-bit weights: {self.takes} {self.bit_range}"
                    f"{self.instead}")
        if self.per_channel and groups != 1:
            return (f"'{name}' has {groups} groups per row: {self.takes} per-channel weights"
                    f"{self.instead}")
        if self.symmetric and not scheme.symmetric:
            return f"'{name}' has an asymmetric grid: {self.takes} symmetric weights{self.instead}"
        return None


# secateur's own grids (GPTQ, RTN, SparseGPT's joint solve): below 2 bits a min/max grid
# keeps only the range's ends
QUANTIZERS = Accepts("the quantize methods take", 2, 8)
# integer codes stored in a byte: compressed-tensors' packing and the CPU kernels
INTEGER = Accepts("integer formats and kernels take", 1, 8)
INT4_RUNTIME = Accepts("the int4 runtime takes", 1, 4, instead="; use runtime='int8'")
INT8_RUNTIME = Accepts("the int8 runtime takes", 1, 8, per_channel=True,
                       instead="; use runtime='int4' for grouped weights of at most 4 bits")
# int8 weights times int8 activations: no zero-point correction per token
W8A8 = Accepts("W8A8 takes", 8, 8, per_channel=True, symmetric=True,
               instead="; quantize with method w8a8")
