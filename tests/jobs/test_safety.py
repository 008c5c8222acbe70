"""Issue 24: no command deletes what secateur did not write, and no bad input or fault ends in
a traceback or after the expensive work.

Each row of CASES runs the CLI in-process (as tests/jobs/test_bad_inputs.py does) from a working
folder holding a tiny model (`M`), a text, a project folder with a user's file, earlier
outputs and damaged models. Every row asserts its exit code, exactly one stderr line matching
its message, no traceback, that the work itself (a method step, an evaluation; for rows
marked so, even the model load) never ran, and that every file of the working folder (the
current folder, the input model, unrelated folders) is byte-identical afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from secateur.cli import main
from tests.jobs.test_bad_inputs import W
from tests.tiny_models import byte_tokenizer, save_tiny, tiny_model

MODEL = "model: M\ncalibration: {source: T, nsamples: 1, seqlen: 16}\nevaluate: {perplexity: []}\n"
WANDA = MODEL + "steps:\n  - {method: wanda, sparsity: 0.5}\n"
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "model: M\nsteps: []\n"
LONG = "x" * 240  # fits a 255-byte name, but not with the temporary sibling's suffix
PW = [*W[:-2], "--eval", "none"]  # prune flags: tiny calibration, no evaluation
PRUNE = ["prune", "M", "--method", "magnitude", "--sparsity", "0.5", *PW]

# (id, argv, exit code, stderr pattern, may the model load before the refusal)
CASES: list[tuple[str, list[str], int, str, bool]] = [
    # -- A. --overwrite deletes only a folder secateur wrote, never an input -------------------
    ("run into the current folder", ["run", "recipe.yaml", "--out", ".", "--overwrite"], 2,
     "is the current folder", False),
    ("run into the folder holding its recipe",
     ["run", "proj/recipe.yaml", "--out", "proj", "--overwrite"], 2,
     "'proj' is or holds the input 'proj/recipe.yaml'", False),
    ("run into its input model", ["run", "recipe.yaml", "--out", "M", "--overwrite"], 2,
     "'M' is or holds the input 'M'", False),
    ("run into its input model, no overwrite", ["run", "recipe.yaml", "--out", "M"], 2,
     "is or holds the input 'M'", False),
    ("run into a parent of its calibration text",
     ["run", "proj/thesis-calib.yaml", "--out", "proj/data", "--overwrite"], 2,
     "holds the input 'proj/data/thesis.txt'", False),
    ("run resumes into a folder secateur did not write",
     ["run", "recipe.yaml", "--out", "planted"], 2, "resumes only in a folder it wrote", False),
    ("run --json onto its recipe", ["run", "recipe.yaml", "--out", "r", "--json", "recipe.yaml",
                                    "--overwrite"], 2, "--json 'recipe.yaml' is the input", False),
    ("prune into its input", [*PRUNE, "--out", "M", "--overwrite"], 2,
     "is or holds the input 'M'", False),
    ("prune into a parent of its calibration text",
     ["prune", "M", "--method", "magnitude", "--sparsity", "0.5", "--calib",
      "proj/data/thesis.txt", "--out", "proj", "--overwrite"], 2,
     "holds the input 'proj/data/thesis.txt'", False),
    ("prune into a folder of the user's", [*PRUNE, "--out", "notes", "--overwrite"], 2,
     "no saved model secateur wrote", False),
    ("prune into a model secateur did not write", [*PRUNE, "--out", "M2", "--overwrite"], 2,
     "no saved model secateur wrote", False),
    ("prune into an output a user added to", [*PRUNE, "--out", "added", "--overwrite"], 2,
     r"holds files secateur did not write \(notes.txt\)", False),
    ("prune into an output with a user file deep inside",
     [*PRUNE, "--out", "added-deep", "--overwrite"], 2, r"did not write \(sub/\)",
     False),
    ("eval --json onto the model's config", ["eval", "M", "--json", "M/config.json"], 2,
     "is inside the input 'M'", False),
    ("eval --json onto the model's config, overwrite",
     ["eval", "M", "--json", "M/config.json", "--overwrite"], 2, "is inside the input", False),
    ("eval --json onto an existing file", ["eval", "M", "--json", "old.json"], 2,
     "--json 'old.json' already exists: pass --overwrite", False),
    ("eval --json onto its text", ["eval", "M", "--data", "T", "--json", "T", "--overwrite"], 2,
     "--json 'T' is the input 'T'", False),
    ("prune --json onto an existing file", [*PRUNE, "--json", "old.json"], 2,
     "already exists: pass --overwrite", False),
    ("bench --json onto an existing file", ["bench", "M", "--json", "old.json"], 2,
     "already exists: pass --overwrite", False),
    ("export gguf onto the model's weights",
     ["export", "M", "--format", "gguf", "--out", "M/model.safetensors", "--overwrite"], 2,
     "is inside the input 'M'", False),
    ("export gguf onto an existing file", ["export", "M", "--format", "gguf", "--out",
                                           "old.gguf"], 2, "already exists: pass --overwrite",
     False),
    ("export nemotron into its input", ["export", "M", "--format", "nemotron-nas", "--out", "M",
                                        "--overwrite"], 2, "is or holds the input 'M'", False),
    ("export --json onto an existing file",
     ["export", "M", "--format", "gguf", "--out", "new.gguf", "--json", "old.json"], 2,
     "already exists", False),
    ("sweep into its input model", ["sweep", "M", "--out", "M/sweep", "--methods", "magnitude",
                                    "--sparsities", "0.5"], 2, "inside the input 'M'", False),
    ("report over a user's report.md", ["report", "result.json", "--out", "notes"], 2,
     "already holds 'report.md', which secateur did not write", False),
    # -- B. paths and inputs checked before the work ------------------------------------------
    ("symlink loop as --out", [*PRUNE, "--out", "loop-a"], 2, "'loop-a' is a symbolic link",
     False),
    ("path through a symlink loop as --out", [*PRUNE, "--out", "loop-a/o"], 2,
     "cannot be resolved", False),
    ("symlink loop as --json", ["eval", "M", "--json", "loop-a"], 2, "is a symbolic link",
     False),
    ("path through a symlink loop as --json", ["eval", "M", "--json", "loop-a/r.json"], 2,
     "cannot be resolved", False),
    ("long --out name", [*PRUNE, "--out", LONG], 2, "temporary copy's .* more, over", False),
    ("long --json name", ["eval", "M", "--json", LONG + ".json"], 2, "bytes .* over this", False),
    ("long run --out name", ["run", "recipe.yaml", "--out", LONG], 2, "at most 214 bytes",
     False),
    ("run into a read-only folder", ["run", "recipe.yaml", "--out", "/proc/secateur-run"], 2,
     "cannot write in '/proc'", False),
    ("prune into a read-only folder", [*PRUNE, "--out", "/proc/secateur-out"], 2,
     "cannot write in", False),
    ("binary recipe", ["run", "binary.yaml", "--out", "r"], 2, "is not a text file", False),
    ("huge recipe", ["run", "huge.yaml", "--out", "r"], 2, "at most 1 MiB", False),
    ("YAML alias bomb", ["run", "bomb.yaml", "--out", "r"], 2, "expands to over 100,000", False),
    ("recursive YAML alias", ["run", "recursive.yaml", "--out", "r"], 2, "refers to itself",
     False),
    ("rtn then gptq", ["run", "rtn-gptq.yaml", "--out", "r"], 2,
     r"step 2 \(gptq\) cannot follow step 1 \(rtn\)", False),
    ("rtn then llm-pruner", ["run", "rtn-llm-pruner.yaml", "--out", "r"], 2,
     r"step 2 \(llm-pruner\) cannot follow step 1 \(rtn\)", False),
    ("rtn then lora", ["run", "rtn-lora.yaml", "--out", "r"], 2,
     r"step 2 \(lora\) cannot follow", False),
    ("rtn then sparsegpt", ["run", "rtn-sparsegpt.yaml", "--out", "r"], 2,
     r"step 3 \(sparsegpt\) cannot follow step 1 \(rtn\)", False),
    ("NaN weights, eval", ["eval", "NAN", "--data", "T"], 2,
     "tensor 'model.layers.1.mlp.up_proj.weight' holds NaN", True),
    ("NaN weights, prune", ["prune", "NAN", "--method", "wanda", "--sparsity", "0.5", *PW,
                            "--out", "o"], 2, "holds NaN", True),
    ("infinite weights", ["eval", "INF", "--data", "T"], 2,
     "'model.norm.weight' holds infinite values", True),
    ("config with fewer layers than the weights", ["eval", "FEWER", "--data", "T"], 2,
     "config.json does not match the weights: .* in the weights but not in config.json "
     r"\(e.g. 'model.layers.2.", True),
    ("config with more layers than the weights", ["eval", "MORE", "--data", "T"], 2,
     "missing from the weights", True),
]


def _files(root: Path) -> dict[str, str]:
    """Every entry under root (links not followed) with its bytes' hash or link target."""
    seen: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                seen[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                seen[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                seen[rel] = "dir"
    return seen


def _save_damaged(root: Path, name: str, damage) -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        damage(model)
    model.save_pretrained(root / name)
    byte_tokenizer().save_pretrained(root / name)


def _layers(model_dir: Path, n: int) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] = n
    (model_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    import shutil

    from secateur.formats.hf import save_model

    root = tmp_path_factory.mktemp("safety")
    save_tiny("llama", root / "M", 0)
    save_tiny("llama", root / "M2", 1)
    (root / "T").write_text("some text for calibration. " * 200)
    (root / "recipe.yaml").write_text(WANDA)
    (root / "proj" / "data").mkdir(parents=True)
    (root / "proj" / "recipe.yaml").write_text(WANDA)
    (root / "proj" / "data" / "thesis.txt").write_text("years of work")
    (root / "proj" / "thesis-calib.yaml").write_text(
        WANDA.replace("source: T", "source: proj/data/thesis.txt"))
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a model")
    (root / "notes" / "report.md").write_text("my own report")
    (root / "old.json").write_text('{"mine": true}')
    (root / "old.gguf").write_bytes(b"GGUF not really")
    (root / "result.json").write_text(json.dumps({"model": "M", "method": "wanda",
                                                  "perplexity": 20.0}))
    for name in ("added", "added-deep"):
        save_model(tiny_model("llama"), None, root / name, {"v": 1})
    (root / "added" / "notes.txt").write_text("mine")
    (root / "added-deep" / "sub").mkdir()
    (root / "added-deep" / "sub" / "notes.txt").write_text("mine")
    # a folder with a recipe checkpoint someone else put there, beside their own files
    (root / "planted" / ".checkpoint").mkdir(parents=True)
    (root / "planted" / "mine.txt").write_text("mine")
    (root / "planted" / ".checkpoint" / "secateur.json").write_text("{}")
    (root / "planted" / ".secateur-work" / "recipe").mkdir(parents=True)
    (root / "planted" / ".secateur-work" / "recipe" / "recipe.json").write_text("{}")
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "huge.yaml").write_text("# padding\n" * (1 << 17) + WANDA)
    (root / "bomb.yaml").write_text(BOMB)
    (root / "recursive.yaml").write_text("model: M\nsteps: &s [*s]\n")
    step = {"gptq": "{method: gptq, group_size: 16}", "llm-pruner": "{method: llm-pruner, "
            "ratio: 0.2}", "lora": "{method: lora, steps: 1}",
            "sparsegpt": "{method: sparsegpt, sparsity: 0.5}"}
    for name, after in step.items():
        middle = "  - {method: wanda, sparsity: 0.5}\n" if name == "sparsegpt" else ""
        (root / f"rtn-{name}.yaml").write_text(
            MODEL + f"steps:\n  - {{method: rtn, group_size: 16}}\n{middle}  - {after}\n")
    _save_damaged(root, "NAN", lambda m: m.model.layers[1].mlp.up_proj.weight[3, 5].fill_(
        float("nan")))
    _save_damaged(root, "INF", lambda m: m.model.norm.weight[0].fill_(float("inf")))
    for name, n in (("FEWER", 2), ("MORE", 4)):
        shutil.copytree(root / "M", root / name)
        _layers(root / name, n)
    return root


def _payload_never_runs(monkeypatch, may_load: bool) -> None:
    """The expensive work raises if reached; so does loading the model, unless the check
    needs the loaded model (NaN weights, a config against its weights)."""
    import secateur.formats.loader
    import secateur.jobs
    import secateur.recipe

    def never(*_a, **_k):
        raise AssertionError("the work ran before the refusal")

    for module, name in ((secateur.recipe, "run_step"),
                         (secateur.jobs, "evaluate_perplexity"),
                         (secateur.recipe, "_evaluate")):
        monkeypatch.setattr(module, name, never)
    if not may_load:
        for module in (secateur.jobs, secateur.recipe, secateur.formats.loader):
            monkeypatch.setattr(module, "load", never)


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, list[str], str]:
    monkeypatch.setattr(sys, "argv", ["secateur", *args])
    try:
        main()
        code = 0
    except SystemExit as done:  # an error; a success returns
        code = done.code
    err = capsys.readouterr().err
    # progress bars (a model that loads before the error) are not messages
    lines = [line for line in err.replace("\r", "\n").splitlines()
             if line.strip() and "/s]" not in line]
    return code, lines, err


@pytest.mark.parametrize("name, args, code, message, may_load", CASES,
                         ids=[c[0] for c in CASES])
def test_refused_in_one_line_and_every_file_is_left_as_it_was(name, args, code, message,
                                                              may_load, workdir, monkeypatch,
                                                              capsys):
    monkeypatch.chdir(workdir)
    _payload_never_runs(monkeypatch, may_load)
    before = _files(workdir)
    start = time.perf_counter()
    exit_code, lines, err = run_cli(args, monkeypatch, capsys)
    assert exit_code == code, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert len(lines[0]) < 600, lines[0]
    assert time.perf_counter() - start < 60  # the alias bomb took 86 s
    assert _files(workdir) == before


def test_an_output_secateur_wrote_is_replaced_and_nothing_else_changes(workdir, monkeypatch,
                                                                       capsys, tmp_path):
    from secateur.formats.hf import save_model

    monkeypatch.chdir(workdir)
    save_model(tiny_model("llama"), None, workdir / "prev", {"v": 1})
    before = {k: v for k, v in _files(workdir).items() if not k.startswith("prev")}
    code, lines, err = run_cli([*PRUNE, "--out", "prev", "--overwrite"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((workdir / "prev" / "secateur.json").read_text())["method"] == "magnitude"
    after = {k: v for k, v in _files(workdir).items() if not k.startswith("prev")}
    assert after == before


def test_run_overwrites_its_own_output_only(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    out = workdir / "runs" / "r1"
    code, _, err = run_cli(["run", "recipe.yaml", "--out", str(out)], monkeypatch, capsys)
    assert code == 0, err
    code, _, err = run_cli(["run", "recipe.yaml", "--out", str(out), "--overwrite"],
                           monkeypatch, capsys)
    assert code == 0, err
    (out / "model" / "notes.txt").write_text("mine")
    code, lines, err = run_cli(["run", "recipe.yaml", "--out", str(out), "--overwrite"],
                               monkeypatch, capsys)
    assert code == 2 and "did not write (model/notes.txt)" in lines[-1], err
    assert (out / "model" / "notes.txt").read_text() == "mine"


# -- the atomic replace keeps the old copy until the new one is in place ----------------------


def test_a_kill_between_the_two_renames_gives_the_old_copy_back(tmp_path):
    from secateur.formats.hf import save_model

    out = save_model(tiny_model("llama"), None, tmp_path / "m", {"v": 1})
    old = {k: v for k, v in _files(out).items()}
    # the second rename (new copy onto `m`) never happens: the process dies first
    code = ("import os, signal, sys; from pathlib import Path\n"
            "from secateur.io import atomic_dir\n"
            "real = Path.rename\n"
            "def rename(self, target):\n"
            "    if '-old' not in str(target):\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(self, target)\n"
            "Path.rename = rename\n"
            "with atomic_dir(Path(sys.argv[1]), overwrite=True) as tmp:\n"
            "    (tmp / 'config.json').write_text('{}')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(out)],
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.endswith("-old")]
    from secateur.outputs import check_output_dir

    with pytest.raises(Exception, match="already exists"):  # the next run sees it back
        check_output_dir(out, overwrite=False)
    assert _files(out) == old
    save_model(tiny_model("llama"), None, tmp_path / "other")  # cleans the new partial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "other"]


# -- a full disk: one line, exit 1, nothing left behind ---------------------------------------


def test_disk_full_while_saving_is_one_line_exit_1_and_leaves_nothing(workdir, monkeypatch,
                                                                     capsys):
    import secateur.io

    def full(root):
        raise OSError(errno.ENOSPC, "No space left on device", str(root / "model.safetensors"))

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(secateur.io, "_finish_tree", full)
    before = _files(workdir)
    # a depth method: no layer checkpoints, which a rerun would resume from
    code, lines, err = run_cli(["prune", "M", "--method", "shortgpt", "--layers", "1", *PW,
                                "--out", "full-out"], monkeypatch, capsys)
    assert code == 1 and len(lines) == 1 and "disk is full" in lines[0], err
    assert "Traceback" not in err and _files(workdir) == before


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                                            str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_real_full_disk(workdir, tiny_disk, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    # the saved copy needs about the model's size: refused before the work
    code, lines, err = run_cli([*PRUNE, "--out", str(tiny_disk / "o")], monkeypatch, capsys)
    assert code == 1 and re.search("KiB free in .* needs about", lines[0]), err
    # a writer meeting ENOSPC: the JSON after an evaluation, on a disk filled meanwhile
    (tiny_disk / "filler").write_bytes(b"\0" * (256 * 1024 - 8192))
    with open(tiny_disk / "filler", "ab", buffering=0) as f:  # fill to the last block
        try:
            while True:
                f.write(b"\0" * 1024)
                f.flush()
        except OSError:
            pass
    code, lines, err = run_cli(["eval", "M", "--data", "T", "--seqlen", "16", "--max-windows",
                                "1", "--json", str(tiny_disk / "r.json")], monkeypatch, capsys)
    assert code == 1 and len(lines) == 1 and "disk is full" in lines[0], err
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler"]


# -- C. interrupts -----------------------------------------------------------------------------


def test_an_interrupted_layerwise_prune_says_how_to_resume():
    from secateur.cli import _then

    assert "--resume" in _then(["prune", "M", "--method", "wanda", "--out", "o"])
    assert "--resume" in _then(["quantize", "M", "--method", "gptq", "--out=o"])
    assert "--resume" not in _then(["prune", "M", "--method", "wanda"])  # nothing kept
    assert "--resume" not in _then(["prune", "M", "--method", "shortgpt", "--out", "o"])
    assert "same command" in _then(["run", "r.yaml", "--out", "o"])


def test_a_rerun_without_resume_says_it_starts_over(workdir, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(workdir)
    out = tmp_path / "interrupted"  # what a killed layer-wise prune leaves (secateur.workdir)
    (out / ".secateur-work" / "layers").mkdir(parents=True)
    (out / ".secateur-work" / "layers" / "checkpoint.json").write_text("{}")
    with pytest.warns(UserWarning, match="interrupted run; starting over .* --resume"):
        code, _, err = run_cli([*PRUNE, "--out", str(out)], monkeypatch, capsys)
    assert code == 0, err


def test_ctrl_c_during_the_imports_is_one_line_and_exit_130(workdir):
    exe = Path(sys.executable).parent / "secateur"
    # were the imports done before the signal, the evaluation is interrupted: the same line
    proc = subprocess.Popen([str(exe), "eval", "M", "--data", "T"], cwd=workdir,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(1.5)  # the imports take seconds (torch, transformers)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted (SIGINT)"), err


# -- markdown ---------------------------------------------------------------------------------


def test_report_markdown_escapes_what_a_result_file_says(tmp_path):
    from secateur.report.page import build_report

    evil = "<script>alert(1)</script> | [click](http://x)"
    (tmp_path / "r.json").write_text(json.dumps({"model": "M", "method": evil,
                                                 "perplexity": 20.0, "sparsity": 0.5}))
    report = build_report([tmp_path / "r.json"], tmp_path / "rep")
    md = report.md.read_text()
    assert "<script>" not in md and "[click](http" not in md and "&lt;script&gt;" in md
    assert "<script>" not in report.html.read_text()
    rows = [line for line in md.splitlines() if "script" in line and line.startswith("|")]
    assert all(line.count(" | ") == rows[0].count(" | ") for line in rows)
    assert "\\|" in rows[0]  # the cell's own bar does not split the row
    build_report([tmp_path / "r.json"], tmp_path / "rep")  # its own files may be replaced
