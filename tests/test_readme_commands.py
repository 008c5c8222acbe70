"""Every `secateur` command the README shows runs, on a tiny model, as written.

The commands are read from the README's ```bash blocks, so a command added there is tested
without touching this file. Each is rewritten only where the real model would be too slow
here: the model names become a saved tiny model, output names fresh folders, and the sizes
(steps, windows, samples, documents, tokens) shrink to seconds; every flag and method stays
as the README spells it. `a|b|c` alternatives run once each; `[--flag]` runs with the flag;
`...` stands for the calibration and output flags of the line above it.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_loading_and_cli import run_cli
from tests.test_recipe import shrink

README = Path(__file__).parent.parent / "README.md"
MODEL_NAMES = {"MODEL", "smollm2-135m", "BIG"}
# inputs that name an earlier output of the README's own story: a pruned model
PRUNED_INPUTS = {"DIR", "pruned", "./pruned"}
SMALL = {"--steps": "2", "--max-windows": "1", "--eval-windows": "1", "--seqlen": "32",
         "--nsamples": "2", "--limit": "2", "--repeats": "1", "--decode-tokens": "2",
         "--lengths": "16", "--layers": "1", "--search-samples": "2", "--search-shortlist": "2",
         "--warmup": "0"}
ELLIPSIS = ["--calib", "c4-sample", "--nsamples", "2", "--seqlen", "32", "--eval", "none"]
# flags whose defaults are sized for real models, added where the README leaves them out
DEFAULTS = {"prune": {"--nsamples": "2", "--seqlen": "32", "--eval-windows": "1"},
            "quantize": {"--nsamples": "2", "--seqlen": "32", "--eval-windows": "1"},
            "sweep": {"--nsamples": "2", "--seqlen": "32", "--eval-windows": "1"},
            "recover": {"--seqlen": "32", "--eval-windows": "1"},
            "distill": {"--seqlen": "32", "--eval-windows": "1"},
            "eval": {"--max-windows": "1"},
            "frontier": {"--nsamples": "2", "--seqlen": "32", "--windows": "1",
                         "--eval-seqlen": "32", "--presets": "q4_0", "--secateur-presets": "q4_0",
                         "--roundings": "rtn"}}


# README commands whose tiny stand-in is refused by design, with the refusal's words: DeciLM
# needs MLP widths in multiples of 256, and the tiny model's are 128
REFUSED_ON_TINY = {("export", "nemotron-nas"): "256"}


def readme_blocks() -> list[list[str]]:
    """`secateur ...` lines of each bash block, continuations joined, comments dropped."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        commands = []
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            line = re.sub(r"^(bash scripts/setup.sh && )?\.venv/bin/", "", line)
            if line.startswith("secateur "):
                commands.append(line)
        if commands:
            blocks.append(commands)
    return blocks


def readme_commands() -> list[str]:
    return [c for block in readme_blocks() for c in block]


def _produced(command: str) -> set[str]:
    words = shlex.split(command.replace("[", "").replace("]", ""))
    made = {words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--out", "--json")}
    return made | ({"bench.json"} if words[1] == "bench" else set())


def command_groups() -> list[list[str]]:
    """One group per README command (each a test of its own, run in parallel), except that a
    command naming an output an earlier one makes (`report runs/s1 bench.json`) joins the group
    of the name's latest producer (the story maps a name to its last output).
    The main job's `secateur run recipes/...` runs shrunk in tests/test_recipe.py."""
    groups: list[list[str]] = []
    producer: dict[str, int] = {}  # output name -> the group of its latest producer
    for command in readme_commands():
        if command.startswith("secateur run recipes/"):
            continue
        words = set(shlex.split(command.replace("[", "").replace("]", "")))
        joined = sorted({producer[w] for w in words - MODEL_NAMES - PRUNED_INPUTS
                         if w in producer})
        if len(joined) > 1:  # reads the outputs of several groups: they become one
            for i in reversed(joined[1:]):
                groups[joined[0]] += groups[i]
                groups[i] = []
                producer.update({n: joined[0] for n, g in producer.items() if g == i})
        target = joined[0] if joined else len(groups)
        if target == len(groups):
            groups.append([])
        groups[target].append(command)
        producer.update({name: target for name in _produced(command)})
    groups = [g for g in groups if g]
    return groups


def expand(command: str) -> list[list[str]]:
    """One argv per `a|b|c` alternative; `[--flag]` made plain."""
    words = shlex.split(command.replace("[", "").replace("]", ""))[1:]
    for i, word in enumerate(words):
        if "|" in word and not word.startswith("-"):
            return [argv for alt in word.split("|")
                    for argv in expand(shlex.join(["secateur", *words[:i], alt, *words[i + 1:]]))]
    return [words]


def long_context_tiny(path: Path) -> Path:
    """The tiny Llama with a real model's context (lm-eval refuses a continuation longer than
    the context, and byte-level tokens make some task answers longer than 256) and a tokenizer
    with BPE merges (llama.cpp's, so the GGUF export has merges to write)."""
    from transformers import AutoModelForCausalLM

    from tests.test_export import bpe_tokenizer
    from tests.tiny_models import configs

    torch.manual_seed(0)
    config = configs()["llama"]
    config.max_position_embeddings = 4096
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    bpe_tokenizer().save_pretrained(path)
    return path


class Story:
    """The tiny stand-ins for the README's models and files, made once per test."""

    def __init__(self, tmp: Path, monkeypatch, capsys) -> None:
        self.tmp, self.monkeypatch, self.capsys = tmp, monkeypatch, capsys
        self.model = str(long_context_tiny(tmp / "tiny"))
        self.outputs: dict[str, Path] = {}
        self.count = 0

    @functools.cached_property
    def pruned(self) -> Path:
        return self.make(["prune", self.model, "--method", "wanda", "--sparsity", "0.5",
                          *ELLIPSIS, "--out", str(self.tmp / "pruned-fixture")])

    @functools.cached_property
    def packed(self) -> Path:
        return self.make(["quantize", self.model, "--method", "rtn", "--bits", "4",
                          "--group-size", "32", *ELLIPSIS,
                          "--out", str(self.tmp / "packed-fixture")])

    def make(self, argv: list[str]) -> Path:
        code, _, err = run_cli(self.monkeypatch, self.capsys, *argv)
        assert code == 0, f"{argv}: {err}"
        return Path(argv[argv.index("--out") + 1])

    def fresh(self, name: str) -> str:
        self.count += 1
        path = self.tmp / f"out{self.count}-{Path(name).name or 'x'}"
        self.outputs[name] = path
        return str(path)

    def recipe(self) -> str:
        path = self.tmp / f"recipe{self.count}.yaml"
        path.write_text(shrink(README.parent / "recipes" / "wanda-50.yaml", self.model).to_yaml())
        return str(path)

    def rewrite(self, argv: list[str]) -> list[str]:
        out: list[str] = []
        quantized_vs = "--runtime" in argv
        words = iter(argv)
        for word in words:
            if word == "...":
                out += ELLIPSIS
                if "--out" not in argv:
                    out += ["--out", self.fresh("dots")]
            elif word in SMALL:
                out += [word, SMALL[word]]
                next(words)
            elif word in ("--out", "--json"):
                out += [word, self.fresh(next(words))]
            elif word == "--vs":
                next(words)
                out += [word, str(self.packed if quantized_vs else self.pruned)]
            elif word == "--teacher":
                next(words)
                out += [word, self.model]
            elif word in MODEL_NAMES:
                out.append(self.model)
            elif word in PRUNED_INPUTS:
                out.append(str(self.pruned))
            elif word == "RECIPE.yaml":
                out.append(self.recipe())
            elif word in self.outputs:  # e.g. `report runs/s1 bench.json`
                out.append(str(self.outputs[word]))
            else:
                out.append(word)
        if "--help" not in out:
            tasks = {"--limit": "2"} if "--tasks" in out else {}  # documents per task
            defaults = {**DEFAULTS.get(out[0], {}), **tasks}
            for flag, value in defaults.items():
                if flag not in out:
                    out += [flag, value]
        if out[0] == "sweep":  # one task keeps a sweep's 6 models x lm-eval in seconds
            out[out.index("--tasks") + 1] = "arc_easy"
        return out


def test_the_readme_shows_the_commands_this_test_runs():
    commands = readme_commands()
    verbs = {c.split()[1] for c in commands}
    assert {"run", "prune", "quantize", "recover", "distill", "eval", "bench", "sweep",
            "report", "export"} <= verbs, verbs
    assert commands[0].startswith("secateur run recipes/smollm2-gguf-q4_k_m-dwq.yaml")


def test_readme_commands_are_many_and_grouped_whole():
    grouped = [c for group in command_groups() for c in group]
    assert sorted(grouped) == sorted(c for c in readme_commands()
                                     if not c.startswith("secateur run recipes/"))
    assert sum(len(expand(c)) for c in grouped) >= 20
    report = next(g for g in command_groups() if any(" report " in c for c in g))
    assert [c.split()[1] for c in report] == ["bench", "sweep", "report"], report


GROUPS = command_groups()


@pytest.mark.parametrize("commands", GROUPS, ids=[f"{i}-{g[0].split()[1]}"
                                                  for i, g in enumerate(GROUPS)])
def test_readme_commands_run_on_a_tiny_model(commands, tmp_path, monkeypatch, capsys):
    story = Story(tmp_path, monkeypatch, capsys)
    for command in commands:
        for argv in expand(command):
            if argv[0] == "bench":
                argv = [*argv, "--json", "bench.json"]  # the report command reads it
            argv = story.rewrite(argv)
            start = time.perf_counter()
            code, out, err = run_cli(monkeypatch, capsys, *argv)
            # capsys holds stdout: per-command seconds go to the real stderr (pytest -s)
            sys.__stderr__.write(f"{time.perf_counter() - start:6.1f} s  {command}\n")
            refusal = next((words for key, words in REFUSED_ON_TINY.items()
                            if set(key) <= set(argv)), None)
            if refusal is not None:
                assert code == 2 and refusal in err, f"README: {command}\n{err}"
                continue
            device = argv[argv.index("--device") + 1] if "--device" in argv else "auto"
            if device.startswith("cuda") and not torch.cuda.is_available():
                # the GPU commands, on a machine without one: refused early in one line
                assert code == 2 and "no CUDA device" in err, f"README: {command}\n{err}"
                continue
            assert code == 0, f"README: {command}\nran: {argv}\n{err}"
            if "--help" in argv:
                assert "--sparsity" in out and "--ratio" not in out
            if argv[0] == "report":
                report = Path(argv[argv.index("--out") + 1])
                assert (report / "report.html").is_file() and (report / "report.md").is_file()
            if argv[0] == "eval" and "--json" in argv and "--tasks" not in argv:
                record = json.loads(Path(argv[argv.index("--json") + 1]).read_text())
                assert record["perplexity"] > 1
