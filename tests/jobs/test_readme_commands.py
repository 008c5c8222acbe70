"""Every `secateur` command the README and the docs pages show runs, on a tiny model, as written.

The commands are read from the ```bash blocks of README.md and docs/*.md (not docs/cli.md, which
is generated from the flags themselves), so a command added there is tested without touching
this file. Each is rewritten only where the real model would be too slow here: the model names
become a saved tiny model, output names fresh folders, and the sizes (steps, windows, samples,
documents, tokens, presets) shrink to seconds; every flag and method stays as the page spells
it. `a|b|c` alternatives run once each; `[--flag]` runs with the flag; `...` stands for the
calibration and output flags of the line above it. `torchrun ... -m secateur CMD` runs as
`secateur CMD` in one process. The other lines of a bash block are checked without running
them: `secateur run recipes/X.yaml` names a shipped recipe (each runs shrunk in
tests/jobs/test_recipe.py), `python bench/X.py` names a script whose parser has every flag shown,
`bash scripts/X.sh` names a script, and anything else is one of a few outside tools (hf,
llama-server, vllm); a line that is none of these fails.
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

from tests.jobs.test_loading_and_cli import run_cli
from tests.jobs.test_recipe import shrink

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
# every page whose bash blocks are run; docs/cli.md is generated from the flags
PAGES = [README, *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "cli.md")]
README_LIMIT = 12_000  # bytes: the README is the quick starts; the rest lives in docs/
MODEL_NAMES = {"MODEL", "smollm2-135m", "BIG", "Llama-3.1-8B"}
# inputs that name an earlier output of the page's own story: a pruned model, a packed one
PRUNED_INPUTS = {"DIR", "pruned", "./pruned"}
QUANTIZED_INPUTS = {"DIR-w4"}
# programs a page may show that are not run here: downloads, serving, other machines
OUTSIDE_TOOLS = {"hf", "llama-server", "llama-cli", "vllm"}
SMALL = {"--steps": "2", "--max-windows": "1", "--eval-windows": "1", "--seqlen": "32",
         "--nsamples": "2", "--limit": "2", "--repeats": "1", "--decode-tokens": "2",
         "--lengths": "16", "--layers": "1", "--search-samples": "2", "--search-shortlist": "2",
         "--warmup": "0", "--presets": "q4_0"}
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


def bash_lines(page: Path) -> list[str]:
    """Every line of the page's bash blocks, continuations joined, comments dropped."""
    text = page.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def as_secateur(line: str) -> str | None:
    """The `secateur ...` command a line runs, if it runs one."""
    line = re.sub(r"^(bash scripts/setup.sh && )?\.venv/bin/", "", line)
    line = re.sub(r"^torchrun( --[\w-]+[ =]\S+)* -m secateur ", "secateur ", line)
    return line if line.startswith("secateur ") else None


def page_commands(page: Path) -> list[str]:
    return [c for line in bash_lines(page) if (c := as_secateur(line))]


def readme_commands() -> list[str]:
    return page_commands(README)


def documented_commands() -> list[str]:
    return [c for page in PAGES for c in page_commands(page)]


def _produced(command: str) -> set[str]:
    words = shlex.split(command.replace("[", "").replace("]", ""))
    made = {words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--out", "--json")}
    return made | ({"bench.json"} if words[1] == "bench" else set())


def command_groups(commands: list[str] | None = None) -> list[list[str]]:
    """One group per command of a page (each a test of its own), except that a command naming
    an output an earlier one makes (`report runs/s1 bench.json`) joins the group of the name's
    latest producer (the story maps a name to its last output).
    `secateur run recipes/...` runs shrunk in tests/jobs/test_recipe.py."""
    groups: list[list[str]] = []
    producer: dict[str, int] = {}  # output name -> the group of its latest producer
    for command in readme_commands() if commands is None else commands:
        if command.startswith("secateur run recipes/"):
            continue
        words = set(shlex.split(command.replace("[", "").replace("]", "")))
        inputs = MODEL_NAMES | PRUNED_INPUTS | QUANTIZED_INPUTS
        joined = sorted({producer[w] for w in words - inputs if w in producer})
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

    from tests.formats.test_export import bpe_tokenizer
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
            elif word in QUANTIZED_INPUTS:
                out.append(str(self.packed))
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


def page_groups() -> list[tuple[str, list[str]]]:
    """(test id, commands) per group of every page; a group another page already shows word for
    word runs once."""
    seen: set[tuple[str, ...]] = set()
    out = []
    for page in PAGES:
        for i, group in enumerate(command_groups(page_commands(page))):
            if tuple(group) not in seen:
                seen.add(tuple(group))
                out.append((f"{page.stem}-{i}-{group[0].split()[1]}", group))
    return out


def test_the_readme_shows_the_commands_this_test_runs():
    assert readme_commands()[0].startswith("secateur run recipes/smollm2-gguf-q4_k_m-dwq.yaml")
    assert bash_lines(README)[:2] == [
        "bash scripts/setup.sh && .venv/bin/secateur run recipes/smollm2-gguf-q4_k_m-dwq.yaml "
        "--out runs/smollm2-gguf-q4_k_m-dwq --overwrite", "bash scripts/test.sh"]
    verbs = {c.split()[1] for c in documented_commands()}
    assert {"run", "prune", "quantize", "recover", "distill", "eval", "bench", "sweep",
            "report", "export", "frontier"} <= verbs, verbs
    assert {p.name for p in PAGES} >= {"README.md", "protocol.md", "formats.md", "methods.md",
                                       "benchmarks.md", "architecture.md"}


def test_the_readme_stays_short():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes: move detail into docs/"


def test_commands_are_many_and_grouped_whole():
    grouped = [c for _, group in page_groups() for c in group]
    assert sorted(set(grouped)) == sorted({c for c in documented_commands()
                                           if not c.startswith("secateur run recipes/")})
    assert sum(len(expand(c)) for c in grouped) >= 30
    # a report of runs stays grouped with the commands that make them; a report may also
    # stand alone when every input it names is a committed result file
    for _, group in page_groups():
        for command in (c for c in group if c.split()[1] == "report"):
            inputs = command.split()[2:command.split().index("--out")]
            made = any(c.split()[1] in ("bench", "sweep") for c in group)
            assert made or all((ROOT / i).is_file() for i in inputs), group
    report = next(g for _, g in page_groups() if any(" sweep " in c for c in g))
    assert [c.split()[1] for c in report] == ["bench", "sweep", "report"], report


def _script_flags(script: Path) -> set[str]:
    return set(re.findall(r"""["'](--[\w-]+)["']""", script.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_the_lines_not_run_here_name_what_exists(page):
    """Recipes, bench scripts with their flags, shell scripts and outside tools, as shown."""
    for line in bash_lines(page):
        command = as_secateur(line)
        if command is not None:
            if command.startswith("secateur run recipes/"):
                recipe = ROOT / shlex.split(command)[2]
                assert recipe.is_file(), f"{page.name}: {line}: no {recipe.name} in recipes/"
            continue
        for part in line.split("&&"):
            words = shlex.split(part)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # OMP_NUM_THREADS=1
                words = words[1:]
            if words[0] == "python" and words[1].startswith("bench/"):
                script = ROOT / words[1]
                assert script.is_file(), f"{page.name}: {line}: no {words[1]}"
                text, flags = script.read_text(encoding="utf-8"), _script_flags(script)
                for word in words[2:]:
                    if word.startswith("--"):
                        assert word.split("=")[0] in flags, f"{page.name}: {line}: {word}?"
                    elif "|" in word:  # sub-commands, e.g. search|evaluate
                        for alt in word.split("|"):
                            assert f'"{alt}"' in text, f"{page.name}: {line}: {alt}?"
            elif words[0] == "bash":
                assert (ROOT / words[1]).is_file(), f"{page.name}: {line}: no {words[1]}"
            else:
                assert words[0] in OUTSIDE_TOOLS, f"{page.name}: what runs `{line}`?"


def test_the_recipe_yaml_the_readme_shows_is_a_shipped_recipe():
    """A ```yaml block of a page is a valid recipe, with the steps of one in recipes/."""
    from secateur.recipe import Recipe

    shipped = [Recipe.load(p).to_dict()["steps"] for p in sorted((ROOT / "recipes").glob("*.yaml"))]
    blocks = [(page, block) for page in PAGES for block in
              re.findall(r"```yaml\n(.*?)```", page.read_text(encoding="utf-8"), re.DOTALL)]
    assert any(page == README for page, _ in blocks)
    for page, block in blocks:
        recipe = Recipe.from_yaml(block)  # unknown keys and methods are refused
        assert recipe.to_dict()["steps"] in shipped, f"{page.name}: {block}"


GROUPS = page_groups()


@pytest.mark.parametrize("commands", [g for _, g in GROUPS], ids=[i for i, _ in GROUPS])
def test_documented_commands_run_on_a_tiny_model(commands, tmp_path, monkeypatch, capsys):
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
                assert code == 2 and refusal in err, f"{command}\n{err}"
                continue
            device = argv[argv.index("--device") + 1] if "--device" in argv else "auto"
            if device.startswith("cuda") and not torch.cuda.is_available():
                # the GPU commands, on a machine without one: refused early in one line
                assert code == 2 and "no CUDA device" in err, f"{command}\n{err}"
                continue
            assert code == 0, f"{command}\nran: {argv}\n{err}"
            if "--help" in argv:  # a method's own flags, listed
                assert "--method" in out, out
            if argv[0] == "report":
                report = Path(argv[argv.index("--out") + 1])
                assert (report / "report.html").is_file() and (report / "report.md").is_file()
            if argv[0] == "eval" and "--json" in argv and "--tasks" not in argv:
                record = json.loads(Path(argv[argv.index("--json") + 1]).read_text())
                assert record["perplexity"] > 1
