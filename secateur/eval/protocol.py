"""What every number was measured under, written next to it."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, fields
from importlib.metadata import PackageNotFoundError, version

PROTOCOLS = {
    # SparseGPT/Wanda: test split joined with "\n\n", non-overlapping windows of 2048 tokens
    # (capped by the model's context), remainder dropped.
    "sparsegpt": 2048,
    # LLM-Pruner / FLAP evaluate at 128 tokens per window; their numbers are not comparable
    # with the 2048-token ones, hence a named protocol rather than a silent default.
    "llm-pruner": 128,
}


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("secateur", "torch", "transformers", "datasets", "lm_eval", "peft"):
        try:
            out[pkg] = version(pkg.replace("_", "-"))
        except PackageNotFoundError:
            continue
    return out


@dataclass(frozen=True)
class PerplexityProtocol:
    name: str
    dataset: str
    origin: str
    split: str
    join: str
    seqlen: int
    stride: int
    windows: int
    windows_available: int
    tokens_scored: int
    bos: str
    dtype: str  # the weights'
    versions: dict
    # the dtype the forward ran in (bf16 moves perplexity by ~0.1-1%); the NLL is fp32 either way
    compute_dtype: str = ""
    # where the forward ran: a GPU's kernels sum in another order (~1e-5 relative in fp32)
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PerplexityProtocol:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        # results written before compute_dtype was recorded ran in the weights' dtype
        values.setdefault("compute_dtype", values.get("dtype", ""))
        return cls(**values)
