"""What each job returns: typed records whose `to_json()` is the result JSON the job writes
(and saves beside a model), so callers read attributes and the files keep one shape."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from secateur.api import Count, StepResult
from secateur.eval.perplexity import PerplexityResult

if TYPE_CHECKING:
    from secateur.engine.streamed import StreamedPrune
    from secateur.recovery.training import TrainResult


@dataclass
class Where:
    """Where a job computed: `device_record`'s fields (a CUDA device adds its name and peak
    allocation, which a CPU run leaves out of the JSON)."""

    device: str = "cpu"
    device_name: str | None = None
    peak_device_mib: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device": self.device}
        if self.device_name is not None:
            out["device_name"] = self.device_name
            out["peak_device_mib"] = self.peak_device_mib
        return out

    @classmethod
    def of(cls, record: dict[str, Any]) -> Where:
        return cls(record["device"], record.get("device_name"), record.get("peak_device_mib"))


@dataclass
class DensePerplexity:
    """The unpruned model's figure in a prune's result, and where it came from."""

    value: float
    source: Literal["given", "cache", "computed"]
    cache: str | None = None  # the perplexity cache file; None: not stored there

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dense_perplexity": self.value,
                               "dense_perplexity_source": self.source}
        if self.source != "given":  # a caller's figure has no cache file to name
            out["dense_perplexity_cache"] = self.cache
        return out


@dataclass
class PruneResult:
    """`prune_job`: what `secateur prune` / `quantize` write as result.json."""

    model: str
    method: str
    seed: int
    step: StepResult
    parameters: dict[str, dict[str, int]]  # dense / pruned: count_parameters' records
    timings: dict[str, float]
    peak_rss_mib: float
    where: Where
    distributed: dict[str, Any]
    dense: DensePerplexity | None = None
    scored: PerplexityResult | None = None  # the pruned model's perplexity
    gguf: dict[str, Any] | None = None  # a GGUF output's export record
    out: str | None = None
    bytes_on_disk: int | None = None
    removal_plot: list[str] | None = None

    @property
    def sparsity(self) -> float | None:
        return self.step.sparsity

    @property
    def dense_count(self) -> Count:
        return Count.of(self.parameters["dense"])

    @property
    def pruned_count(self) -> Count:
        return Count.of(self.parameters["pruned"])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "method": self.method, "seed": self.seed}
        if self.dense is not None:
            out.update(self.dense.to_json())
        if self.scored is not None:
            out.update(perplexity=self.scored.perplexity, tokens=self.scored.tokens,
                       protocol=self.scored.protocol.to_dict())
        out.update({
            "sparsity": self.sparsity, "parameters": self.parameters, "timings": self.timings,
            "peak_rss_mib": self.peak_rss_mib, **self.where.to_json(),
            "calibration": self.step.calibration, "distributed": self.distributed,
            "options": self.step.config, "summary": self.step.summary,
            "layers": self.step.layers})
        if self.gguf is not None:
            out["gguf"] = self.gguf
        if self.out is not None:
            out.update(out=self.out, bytes_on_disk=self.bytes_on_disk)
        if self.removal_plot is not None:
            out["removal_plot"] = self.removal_plot
        return out


@dataclass
class StreamedResult:
    """`prune_streamed_job`: a layer-wise prune written one decoder layer at a time."""

    model: str
    method: str
    options: dict[str, Any]
    calibration: dict[str, Any]
    where: Where
    run: StreamedPrune | None = None
    bytes_on_disk: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "method": self.method,
                               "options": self.options, "calibration": self.calibration,
                               "streamed": True, "device": self.where.device}
        if self.run is not None:
            out.update(self.run.to_dict())
        out.update(self.where.to_json())
        if self.bytes_on_disk is not None:
            out["bytes_on_disk"] = self.bytes_on_disk
        return out


@dataclass
class RecoveryResult:
    """`recover` (LoRA, DWQ) and `distill`: the model before and after training."""

    model: str
    recovery: str  # lora, distill, dwq: also the key the training record is written under
    training: TrainResult | None = None
    teacher: str | None = None
    teacher_perplexity: float | None = None
    perplexity_before: float | None = None
    scored: PerplexityResult | None = None  # after training
    gap_recovered: float | None = None  # 1: all the way back to the teacher
    parameters: int = 0
    peak_rss_mib: float = 0.0
    where: Where = field(default_factory=Where)
    out: str | None = None
    bytes_on_disk: int | None = None

    @property
    def perplexity(self) -> float | None:
        return None if self.scored is None else self.scored.perplexity

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "recovery": self.recovery}
        for name in ("teacher", "teacher_perplexity", "perplexity_before"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.training is not None:
            out[self.recovery] = self.training.to_dict()
        if self.scored is not None:
            out.update(perplexity=self.scored.perplexity,
                       protocol=self.scored.protocol.to_dict())
        if self.gap_recovered is not None:
            out["gap_recovered"] = self.gap_recovered
        out.update(parameters=self.parameters, peak_rss_mib=self.peak_rss_mib,
                   **self.where.to_json())
        if self.out is not None:
            out.update(out=self.out, bytes_on_disk=self.bytes_on_disk)
        return out

    def summary(self) -> dict[str, Any]:
        """The figures `recover --method dwq` and `distill` print."""
        keys = ("perplexity_before", "perplexity", "teacher_perplexity", "gap_recovered", "out")
        return {k: v for k, v in self.to_json().items() if k in keys}


@dataclass
class EvalResult:
    """`eval_job`: a model's perplexity and zero-shot accuracy."""

    model: str
    scored: PerplexityResult | None = None
    zeroshot: dict[str, Any] | None = None
    runtime: str | None = None  # llama.cpp for a GGUF file; None: transformers
    where: Where | None = None  # None: llama.cpp chose
    parameters: int | None = None
    bytes_on_disk: int | None = None  # a GGUF file's size

    @property
    def perplexity(self) -> float | None:
        return None if self.scored is None else self.scored.perplexity

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model}
        if self.runtime is not None:
            out["runtime"] = self.runtime
        if self.scored is not None:
            out.update(self.scored.to_dict())
        if self.zeroshot is not None:
            out["zeroshot"] = self.zeroshot
        if self.where is not None:
            out.update(self.where.to_json())
        if self.parameters is not None:
            out["parameters"] = self.parameters
        if self.bytes_on_disk is not None:
            out["bytes_on_disk"] = self.bytes_on_disk
        return out


@dataclass
class Measured:
    """A recipe's evaluations of one model (dense, or final with its saved output)."""

    perplexity: list[PerplexityResult]
    parameters: dict[str, int]
    zeroshot: dict[str, Any] | None = None
    format: str | None = None  # final: what the output was saved as
    bytes_on_disk: int | None = None
    bench: dict[str, Any] | None = None  # the record; `BenchResult(bench)` reads it typed

    @property
    def count(self) -> Count:
        return Count.of(self.parameters)

    @property
    def first_perplexity(self) -> float | None:
        return self.perplexity[0].perplexity if self.perplexity else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"perplexity": [p.to_dict() for p in self.perplexity]}
        if self.zeroshot is not None:
            out["zeroshot"] = self.zeroshot
        out["parameters"] = self.parameters
        for name in ("format", "bytes_on_disk", "bench"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measured:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["perplexity"] = [PerplexityResult.from_dict(p) for p in data["perplexity"]]
        return cls(**values)


@dataclass
class RecipeResult:
    """`run_recipe`: the recipe, the dense model's measures, each step's record, the final
    model's; also the checkpoint's state, read back when a run resumes."""

    recipe: dict[str, Any]
    dense: Measured | None = None
    steps: list[StepResult] = field(default_factory=list)
    final: Measured | None = None
    out: str | None = None
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    resumed_from_step: int = 0

    @property
    def model(self) -> str:
        return self.recipe["model"]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dense"] = {} if self.dense is None else self.dense.to_json()
        out["steps"] = [s.to_dict() for s in self.steps]
        out["final"] = {} if self.final is None else self.final.to_json()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecipeResult:
        values = dict(data)
        values["dense"] = Measured.from_json(data["dense"]) if data.get("dense") else None
        values["final"] = Measured.from_json(data["final"]) if data.get("final") else None
        values["steps"] = [StepResult.from_dict(s) for s in data.get("steps", [])]
        return cls(**values)


@dataclass
class BenchedModel:
    """One model's row of a transformers bench, as the dense-vs-compressed table reads it."""

    bytes_on_disk: int | None
    prefill_tokens_per_second: float  # at the first prompt length
    decode_tokens_per_second: float
    weight_bytes_per_token: float
    peak_working_mib: float | None = None

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> BenchedModel:
        prefill = next(iter(row["prefill"].values()))["tokens_per_second"]
        decode = row["decode"]
        return cls(row["bytes_on_disk"], prefill, decode["tokens_per_second"],
                   decode["weight_bytes_per_token"], row.get("peak_working_mib"))


@dataclass
class Spread:
    """A ratio over interleaved rounds."""

    median: float
    min: float
    max: float


@dataclass
class BenchResult:
    """`secateur bench` (and a recipe's bench step): the measured record, whose shape
    `secateur.bench` owns, read through typed accessors; `to_json()` is the record."""

    record: dict[str, Any]

    @property
    def runtime(self) -> str | None:
        return self.record.get("runtime")

    @property
    def in_llama_cpp(self) -> bool:
        """Timed by llama.cpp (GGUF files), whose rows have another shape."""
        return str(self.runtime or "").startswith("llama.cpp")

    @property
    def baseline(self) -> str:
        return self.record["baseline"]

    @property
    def threads_used(self) -> int:
        return self.record["protocol"]["threads_used"]

    @property
    def compared(self) -> list[str]:
        """The models measured against the baseline, in order."""
        return [name for name in self.record["models"] if name != self.baseline]

    def model(self, name: str) -> BenchedModel:
        return BenchedModel.from_json(self.record["models"][name])

    def decode_speedup(self, name: str) -> Spread:
        d = self.record["speedup_vs_baseline"][name]["decode"]
        return Spread(d["median"], d["min"], d["max"])

    def bytes_ratio(self, name: str) -> float:
        """`name`'s bytes on disk over the baseline's (NaN when either is unknown)."""
        return self.record["speedup_vs_baseline"][name].get("bytes_on_disk", float("nan"))

    def to_json(self) -> dict[str, Any]:
        return self.record


@dataclass
class FrontierPoint:
    """One file on the frontier: its size and its perplexities in llama.cpp."""

    mib: float
    wiki: float
    tiny_stories: float
    decode_tokens_per_second: float | None = None  # median; only when speed was measured

    @classmethod
    def from_json(cls, point: dict[str, Any]) -> FrontierPoint:
        speed = point.get("speed", {}).get("decode_tokens_per_second", {}).get("median")
        return cls(point["mib"], point["wiki"], point["tiny-stories"], speed)


@dataclass
class FrontierResult:
    """`secateur frontier`: secateur's GGUF points and llama.cpp's ladder, by name;
    `to_json()` is frontier.json's record."""

    runtime: str
    points: dict[str, FrontierPoint]
    record: dict[str, Any]

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> FrontierResult:
        return cls(record["runtime"], {name: FrontierPoint.from_json(p)
                                       for name, p in record["points"].items()}, record)

    def to_json(self) -> dict[str, Any]:
        return self.record


@dataclass
class ExportResult:
    """`secateur export`: what was written where; `to_json()` is the export's record."""

    model: str
    format: str
    out: str
    architecture: str
    outtype: str
    layers: int
    bytes: int
    record: dict[str, Any]

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ExportResult:
        return cls(record["model"], record["format"], record["out"], record["architecture"],
                   record["outtype"], record["layers"], record["bytes"], record)

    def to_json(self) -> dict[str, Any]:
        return self.record
