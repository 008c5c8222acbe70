"""Every bad input is one line on stderr naming what is wrong, exit 2, and nothing on disk.

Each row runs the CLI in-process from an empty working folder that holds a tiny model
(`M`), a text (`T`), a recipe or two; the folder's listing must be unchanged afterwards.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from secateur.cli import main
from tests.tiny_models import save_tiny

W = ["--calib", "T", "--nsamples", "1", "--seqlen", "16", "--eval", "none"]
P = ["prune", "M", "--method"]

CASES: list[tuple[str, list[str], str]] = [
    # -- parsing ---------------------------------------------------------------------------
    ("bare", [], "give a command"),
    ("misspelt command", ["prnue"], "No such command 'prnue'"),
    ("missing model", ["prune"], "Missing argument"),
    ("missing method", ["prune", "M"], "Missing option '--method'"),
    ("unknown method", [*P, "bogus"], "unknown method 'bogus'"),
    ("unknown option", [*P, "wanda", "--sparsity", "0.5", "--colour", "red"],
     "--colour is not a flag of --method wanda"),
    ("not a number", [*P, "wanda", "--sparsity", "abc"], "Invalid value for '--sparsity'"),
    ("int flag given text", [*P, "wanda", "--sparsity", "0.5", "--nsamples", "x"],
     "Invalid value for '--nsamples'"),
    # -- wanda / magnitude / sparsegpt -----------------------------------------------------
    ("sparsity 1.5", [*P, "wanda", "--sparsity", "1.5"], "WandaConfig.sparsity: .*less than 1"),
    ("sparsity -0.1", [*P, "magnitude", "--sparsity", "-0.1"],
     "MagnitudeConfig.sparsity: .*greater than or equal to 0"),
    ("neither sparsity nor nm", [*P, "wanda"], "exactly one of sparsity"),
    ("both sparsity and nm", [*P, "wanda", "--sparsity", "0.5", "--nm", "2:4"],
     "exactly one of sparsity"),
    ("nm N >= M", [*P, "wanda", "--nm", "3:2"], "0 < N < M"),
    ("nm words", [*P, "wanda", "--nm", "two:four"], "whole numbers"),
    ("nm with owl", [*P, "wanda", "--nm", "2:4", "--owl"], "does not combine"),
    ("ratio with wanda", [*P, "wanda", "--sparsity", "0.5", "--ratio", "0.2"],
     "--ratio is not a flag of --method wanda"),
    ("blocks with wanda", [*P, "wanda", "--sparsity", "0.5", "--blocks", "2"],
     "--blocks is not a flag"),
    ("owl m 0", [*P, "wanda", "--sparsity", "0.5", "--owl-m", "0"], "OWLConfig.m|owl.m"),
    ("owl lambda 1.5", [*P, "wanda", "--sparsity", "0.5", "--owl-lam", "1.5"],
     "OWLConfig.lam"),
    ("no-owl with owl field", [*P, "wanda", "--sparsity", "0.5", "--no-owl", "--owl-m", "3"],
     "--no-owl contradicts --owl-m"),
    ("percdamp 0", [*P, "sparsegpt", "--sparsity", "0.5", "--percdamp", "0"],
     "SparseGPTConfig.percdamp"),
    ("blocksize 0", [*P, "sparsegpt", "--sparsity", "0.5", "--blocksize", "0"],
     "SparseGPTConfig.blocksize"),
    ("gptq flag on sparsegpt", [*P, "sparsegpt", "--sparsity", "0.5", "--act-order"],
     "--act-order is not a flag"),
    # -- llm-pruner ------------------------------------------------------------------------
    ("llm-pruner no ratio", [*P, "llm-pruner"], "LLMPrunerConfig.ratio: Field required"),
    ("llm-pruner ratio 0", [*P, "llm-pruner", "--ratio", "0"], "LLMPrunerConfig.ratio"),
    ("llm-pruner ratio 1", [*P, "llm-pruner", "--ratio", "1"], "LLMPrunerConfig.ratio"),
    ("importance bogus", [*P, "llm-pruner", "--ratio", "0.2", "--importance", "bogus"],
     "LLMPrunerConfig.importance"),
    ("allocation bogus", [*P, "llm-pruner", "--ratio", "0.2", "--allocation", "owl"],
     "LLMPrunerConfig.allocation"),
    ("gqa mode bogus", [*P, "llm-pruner", "--ratio", "0.2", "--gqa-mode", "mqa"],
     "LLMPrunerConfig.gqa_mode"),
    ("protect negative", [*P, "llm-pruner", "--ratio", "0.2", "--protect-first", "-1"],
     "LLMPrunerConfig.protect_first"),
    ("sparsity with llm-pruner", [*P, "llm-pruner", "--ratio", "0.2", "--sparsity", "0.5"],
     "--sparsity is not a flag"),
    # -- depth -----------------------------------------------------------------------------
    ("blockpruner nothing", [*P, "blockpruner"], "exactly one of blocks"),
    ("blockpruner both", [*P, "blockpruner", "--blocks", "2", "--ratio", "0.1"],
     "exactly one of blocks"),
    ("blocks 0", [*P, "blockpruner", "--blocks", "0"], "BlockPrunerConfig.blocks"),
    ("shortlist 0", [*P, "blockpruner", "--blocks", "1", "--search-shortlist", "0"],
     "search_shortlist"),
    ("search dtype", [*P, "blockpruner", "--blocks", "1", "--search-dtype", "int8"],
     "search_dtype"),
    ("layers with blockpruner", [*P, "blockpruner", "--blocks", "1", "--layers", "1"],
     "--layers is not a flag"),
    ("shortlist with shortgpt", [*P, "shortgpt", "--layers", "1", "--search-shortlist", "2"],
     "--search-shortlist is not a flag"),
    ("sleb ratio 1.5", [*P, "sleb", "--ratio", "1.5"], "SLEBConfig.ratio"),
    ("sleb layers text", [*P, "sleb", "--layers", "abc"], "Invalid value for '--layers'"),
    ("too many layers", [*P, "shortgpt", "--layers", "5", *W], "at most 2 can go"),
    # -- shared prune flags ----------------------------------------------------------------
    ("nsamples 0", [*P, "wanda", "--sparsity", "0.5", "--nsamples", "0"],
     "CalibrationConfig.nsamples"),
    ("seqlen 1", [*P, "wanda", "--sparsity", "0.5", "--seqlen", "1"],
     "CalibrationConfig.seqlen"),
    ("calibration compute dtype float16", [*P, "wanda", "--sparsity", "0.5",
                                           "--compute-dtype", "float16"],
     "CalibrationConfig.compute_dtype"),
    ("seed -1", [*P, "wanda", "--sparsity", "0.5", "--seed", "-1"], "CalibrationConfig.seed"),
    ("out is cwd", [*P, "wanda", "--sparsity", "0.5", "--out", ".", "--overwrite"], "--out"),
    ("out is a file", [*P, "wanda", "--sparsity", "0.5", "--out", "T"], "is a file"),
    ("out exists", [*P, "wanda", "--sparsity", "0.5", "--out", "M"], "--out|already exists"),
    ("out holds unrelated files", [*P, "wanda", "--sparsity", "0.5", "--out", "notes",
                                   "--overwrite"], "no saved model"),
    ("json is a folder", [*P, "wanda", "--sparsity", "0.5", "--json", "notes"], "--json"),
    ("no such model", ["prune", "nosuchdir/", "--method", "wanda", "--sparsity", "0.5"],
     "nosuchdir"),
    ("no such eval text", [*P, "wanda", "--sparsity", "0.5", "--eval", "nosuch.txt"],
     "nosuch.txt"),
    ("binary calibration text", [*P, "wanda", "--sparsity", "0.5", "--calib", "B.txt",
                                 "--eval", "none"], "not UTF-8"),
    ("dtype float64", [*P, "wanda", "--sparsity", "0.5", "--dtype", "float64", *W],
     "unknown dtype"),
    # -- quantize --------------------------------------------------------------------------
    ("bits 1", ["quantize", "M", "--method", "gptq", "--bits", "1"], "GPTQConfig.bits"),
    ("bits 9", ["quantize", "M", "--method", "rtn", "--bits", "9"], "RTNConfig.bits"),
    ("prune method to quantize", ["quantize", "M", "--method", "wanda", "--sparsity", "0.5"],
     "unknown method 'wanda'"),
    ("quantize method to prune", [*P, "gptq", "--bits", "4"], "unknown method 'gptq'"),
    ("group size not dividing", ["quantize", "M", "--method", "rtn", "--bits", "4",
                                 "--group-size", "48", *W], "group"),
    # GPT-2's Conv1D cannot be packed: refused before the run, not when saving after it
    ("gpt2 quantized to disk", ["quantize", "G", "--method", "rtn", "--bits", "4",
                                "--group-size", "16", *W, "--out", "q"],
     "'attn.c_attn' is a Conv1D: compressed-tensors packs nn.Linear weights only"),
    ("gpt2 sparsegpt+grid to disk", ["prune", "G", "--method", "sparsegpt", "--sparsity", "0.5",
                                     "--quantize", *W, "--out", "q"], "is a Conv1D"),
    ("gpt2 recipe quantizes", ["run", "gpt2-gptq.yaml", "--out", "r"], "is a Conv1D"),
    # -- eval ------------------------------------------------------------------------------
    ("eval no such text", ["eval", "M", "--data", "nosuch.txt"], "nosuch.txt"),
    ("eval max windows 0", ["eval", "M", "--max-windows", "0"], "max_windows"),
    ("eval protocol", ["eval", "M", "--protocol", "bogus"], "protocol"),
    ("eval bos", ["eval", "M", "--bos", "bogus"], "bos"),
    ("eval batch size", ["eval", "M", "--batch-size", "abc"], "--batch-size"),
    ("eval compute dtype", ["eval", "M", "--compute-dtype", "float64"], "compute_dtype"),
    ("eval unknown task", ["eval", "M", "--tasks", "bogus_task"], "bogus_task"),
    # -- recover / distill -----------------------------------------------------------------
    ("recover without method", ["recover", "M"], "say how to recover"),
    ("recover steps 0", ["recover", "M", "--lora", "--steps", "0"], "LoRAConfig.steps"),
    ("recover lr negative", ["recover", "M", "--lora", "--lr", "-1"], "LoRAConfig.lr"),
    ("recover with distill", ["recover", "M", "--method", "distill"], "secateur distill"),
    ("distill no teacher", ["distill", "M"], "Missing option '--teacher'"),
    ("distill steps 0", ["distill", "M", "--teacher", "M", "--steps", "0"],
     "DistillConfig.steps"),
    ("distill loss bogus", ["distill", "M", "--teacher", "M", "--loss", "l2"],
     "DistillConfig.loss"),
    # -- run -------------------------------------------------------------------------------
    ("run no recipe file", ["run", "nosuch.yaml", "--out", "o"], "does not exist"),
    ("run unknown step", ["run", "unknown.yaml", "--out", "o"], "unknown method 'prunemore'"),
    ("run empty recipe", ["run", "empty.yaml", "--out", "o"], "at least 1 item"),
    ("run without out", ["run", "empty.yaml"], "Missing option '--out'"),
    # -- sweep / bench ---------------------------------------------------------------------
    ("sweep bad value", ["sweep", "M", "--out", "s", "--methods", "wanda",
                         "--sparsities", "half"], "neither a sparsity"),
    ("sweep bad method", ["sweep", "M", "--out", "s", "--methods", "bogus",
                          "--sparsities", "0.5"], "unknown method 'bogus'"),
    ("sweep field of another method", ["sweep", "M", "--out", "s", "--methods", "magnitude",
                                       "--sparsities", "ratio=0.2"],
     "MagnitudeConfig.ratio: not a field"),
    ("bench lengths", ["bench", "M", "--lengths", "abc"], "lengths|--lengths"),
    ("bench head without runtime", ["bench", "M", "--head", "int8"], "give --runtime"),
    ("bench unknown head", ["bench", "M", "--runtime", "int4", "--head", "int2"],
     "float16 or int8"),
    ("run int8 head, nothing quantized", ["run", "headless.yaml", "--out", "o"],
     "no step quantizes"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-inputs")
    save_tiny("llama", root / "M", 0)
    save_tiny("gpt2", root / "G", 0)
    (root / "gpt2-gptq.yaml").write_text(
        "model: G\ncalibration: {source: T, nsamples: 1, seqlen: 16}\n"
        "steps:\n  - {method: wanda, sparsity: 0.5}\n  - {method: gptq, group_size: 16}\n")
    (root / "T").write_text("some text for calibration. " * 200)
    (root / "B.txt").write_bytes(bytes(range(256)) * 40)
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a model")
    (root / "unknown.yaml").write_text("model: M\nsteps:\n  - {method: prunemore}\n")
    (root / "empty.yaml").write_text("model: M\nsteps: []\n")
    (root / "headless.yaml").write_text("model: M\nsteps:\n  - {method: wanda, sparsity: 0.5}\n"
                                        "bench: {head: int8}\n")
    return root


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, args, message, workdir,
                                                         monkeypatch, capsys):
    import re

    monkeypatch.chdir(workdir)
    before = _listing(workdir)
    monkeypatch.setattr(sys, "argv", ["secateur", *args])
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err
    # progress bars (a model that loads before the error) are not messages
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert done.value.code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and re.search(message, lines[0]), lines[0]
    assert _listing(workdir) == before


def test_there_are_at_least_sixty_distinct_bad_inputs():
    assert len({tuple(args) for _, args, _ in CASES}) >= 60


@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143)])
def test_an_interrupt_says_so_and_exits_non_zero(signum, code, tmp_path):
    import signal
    import subprocess
    import threading

    save_tiny("llama", tmp_path / "M", 0)
    exe = Path(sys.executable).parent / "secateur"
    proc = subprocess.Popen([str(exe), "eval", str(tmp_path / "M"), "--data", "wiki"],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    working = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "perplexity" in line or "it/s" in line:
                working.set()  # the evaluation's progress bar: it is working

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert working.wait(timeout=180), "".join(lines)
    proc.send_signal(signal.Signals(signum))
    proc.wait(timeout=60)
    reader.join(timeout=10)
    assert proc.returncode == code, "".join(lines)
    last = [line for line in "".join(lines).replace("\r", "\n").splitlines() if line.strip()]
    assert "interrupted (" + signal.Signals(signum).name + ")" in last[-1]


def test_an_unpackable_quantized_output_is_refused_before_the_run(workdir, monkeypatch, capsys):
    import secateur.recipe

    def never(*args, **kwargs):
        raise AssertionError("the step ran before the refusal")

    monkeypatch.setattr(secateur.recipe, "run_step", never)
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["secateur", "quantize", "G", "--method", "gptq",
                                      "--group-size", "16", *W, "--out", "q"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 2 and "is a Conv1D" in capsys.readouterr().err
