"""Depth-pruning criteria on smollm2-135m: ShortGPT, SLEB, BlockPruner (loss) and BlockPruner
with the per-parameter criterion (loss_per_param), at ~10/20/30% of ALL parameters.

Stages (each checkpoints into --out, so a kill loses at most the model being evaluated):

    search    run one method's greedy search to the largest ratio and store its removal order
              (a greedy order is the same whatever the stopping point: smaller ratios are
              prefixes). `--extend` continues an order already stored (from this file or
              --orders-from) on top of its removals, for a search that stopped short.
    evaluate  per method and ratio, build the pruned model from its order by the CLI's surgery
              and measure wiki perplexity, perplexity on held-out C4 text (c4-sample documents
              the calibration sampler never drew), and optionally lm-eval zero-shot.
    timing    prefill and batch-1 decode of every model against the dense one, interleaved;
              run it on a quiet machine, numbers from a loaded one are indicative only.
    table     write the markdown table (--out with .md) from the JSON.

Levels: ShortGPT and SLEB remove the smallest number of whole layers reaching each target; the
block methods take the prefix of their order whose ratio is nearest what the layer methods
achieved (ratios reported beside every number).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from depth_pruning import prefix_for, proportional_speedup, time_models  # noqa: E402

from secateur.api import CalibrationConfig, calibration_data, prune  # noqa: E402
from secateur.data.sources import TextSource, load_text  # noqa: E402
from secateur.eval.perplexity import perplexity  # noqa: E402
from secateur.formats.loader import load  # noqa: E402
from secateur.io import write_json_atomic, write_text_atomic  # noqa: E402
from secateur.models import adapter_for  # noqa: E402
from secateur.models.loading import Loaded, copy_loaded  # noqa: E402
from secateur.registry import make_config  # noqa: E402
from secateur.surgery.depth import (  # noqa: E402
    Block,
    block_parameters,
    remove_blocks,
    total_parameters,
)

OUT = Path(__file__).parent / "results"
# name in the results -> (secateur method, extra config fields)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "shortgpt": ("shortgpt", {}),
    "sleb": ("sleb", {}),
    "blockpruner": ("blockpruner", {}),
    "blockpruner_per_param": ("blockpruner", {"criterion": "loss_per_param"}),
}
LAYER_METHODS = ("shortgpt", "sleb")
# the tasks the table's average is taken over: those the issue names for every model
AVERAGE_TASKS = ("arc_easy", "piqa", "hellaswag", "winogrande")


def sizes_of(base: Loaded) -> dict[str, int]:
    return {f"{i}.{part}": block_parameters(base.adapter, Block(i, part))
            for i in range(base.adapter.num_layers) for part in ("attn", "mlp", "layer")}


def levels_for(ratios: list[float], layer: int, total: int, num_layers: int) -> list[dict]:
    out = []
    for target in ratios:
        k = next(k for k in range(1, num_layers) if k * layer >= target * total)
        out.append({"target": target, "layers": k, "ratio": k * layer / total})
    return out


def heldout_c4(tokenizer, calib: CalibrationConfig) -> TextSource:
    """c4-sample documents the calibration sampler never drew from: its draws replayed (same
    `random.Random(seed)` calls as `calibration_windows`) to know which documents it used."""
    source = load_text(calib.source)
    rng = random.Random(calib.seed)
    used: set[int] = set()
    drawn = 0
    while drawn < calib.nsamples:
        index = rng.randint(0, len(source.documents) - 1)
        ids = tokenizer(source.documents[index], return_tensors="pt").input_ids
        if ids.shape[1] <= calib.seqlen:
            continue
        rng.randint(0, ids.shape[1] - calib.seqlen - 1)
        used.add(index)
        drawn += 1
    docs = [d for i, d in enumerate(source.documents) if i not in used]
    return TextSource("c4-heldout", docs, "all", origin=(
        f"exllamav3 c4.utf8 without the {len(used)} documents the seed-{calib.seed} "
        f"{calib.nsamples} x {calib.seqlen} calibration windows come from"))


def check_heldout(base: Loaded, calib: CalibrationConfig, text: TextSource) -> None:
    """Every calibration window must lie in a document left out (replay is exact)."""
    joined = base.tokenizer(text.joined(), return_tensors="pt").input_ids[0].tolist()
    haystack = " " + " ".join(map(str, joined)) + " "
    for w in calibration_data(base, calib)[0]:
        needle = " " + " ".join(map(str, w[0, 64:96].tolist())) + " "
        assert needle not in haystack, "a calibration window overlaps the held-out text"


def load_result(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save(path: Path, result: dict, section: str, key: str | None = None) -> None:
    """Write `result[section][key]` into the file as it is now: stages run concurrently (a
    search beside an evaluation), so each merges only its own entry instead of overwriting."""
    current = load_result(path)
    for field in ("model", "total_parameters", "ratio_definition", "calibration"):
        if field in result:
            current.setdefault(field, result[field])
    if key is None:
        current.setdefault(section, {}).update(result[section])
    else:
        current.setdefault(section, {})[key] = result[section][key]
    write_json_atomic(path, current)


# -- search ---------------------------------------------------------------------------------
def search(args: argparse.Namespace, base: Loaded, result: dict) -> None:
    method, extra = METHODS[args.method]
    total = total_parameters(base.model)
    sizes = sizes_of(base)
    levels = levels_for(args.ratios, sizes["0.layer"], total, base.adapter.num_layers)
    calib = CalibrationConfig(args.calib, args.nsamples, args.seqlen, args.seed)
    previous: list[str] = []
    if args.extend:
        source = load_result(args.orders_from) if args.orders_from else result
        assert source["calibration"]["source"] == args.calib, "calibration differs"
        previous = list(source["searches"][args.method]["removed"])
    work = copy_loaded(base)
    if previous:
        remove_blocks(work.model, work.adapter, [Block.parse(b) for b in previous])
        work = Loaded(work.model, work.tokenizer, adapter_for(work.model), work.name, work.path)
    # layers left, by original index: whole-layer removal renumbers the survivors
    # (a layer that lost both branches goes too)
    kept = [i for i in range(base.adapter.num_layers) if f"{i}.layer" not in previous
            and not {f"{i}.attn", f"{i}.mlp"} <= set(previous)]
    if method in LAYER_METHODS:
        amount: dict[str, Any] = {"layers": levels[-1]["layers"] - len(previous)}
    else:
        done = sum(sizes[b] for b in previous)
        amount = {"ratio": (levels[-1]["ratio"] * total - done) / total_parameters(work.model)
                  - 1e-9}
    if method != "shortgpt":
        amount.update(search_samples=args.search_samples, search_shortlist=args.search_shortlist)
    else:  # the results record every method's curve: ShortGPT computes it only when asked
        amount.update(curve=True)
    config = make_config({"method": method, **amount, **extra})
    t = time.perf_counter()
    run = prune(work, config, calib, progress=False)
    s = run.summary
    new = [str(Block(kept[b.layer], b.part)) for b in map(Block.parse, s["removed"])]
    entry = {"removed": previous + new, "config": config.to_dict(),
             "calibration_perplexity": s["calibration_perplexity"], "search": s["search"],
             "seconds": time.perf_counter() - t,
             "searched_here": {"from": len(previous), "samples": args.search_samples,
                               "shortlist": args.search_shortlist}}
    if previous:
        source = Path(args.orders_from or args.out).resolve()
        # relative to the repository when inside it: results must not name one machine's paths
        root = Path(__file__).resolve().parent.parent
        entry["first_part_from"] = str(source.relative_to(root) if source.is_relative_to(root)
                                       else source)
    result.setdefault("searches", {})[args.method] = entry
    save(args.out, result, "searches", args.method)
    print(f"{args.method}: {entry['removed']}", flush=True)


# -- import --------------------------------------------------------------------------------
def import_orders(args: argparse.Namespace, base: Loaded, result: dict) -> None:
    """Take the removal orders (and the wiki perplexities of the same pruned models) from
    bench/depth_pruning.py's result: same calibration, same wiki protocol, no search rerun."""
    source = load_result(args.orders_from)
    calib = {k: result["calibration"][k] for k in ("source", "nsamples", "seqlen", "seed")}
    assert {k: source["calibration"][k] for k in calib} == calib, "calibration differs"
    for method in args.methods:
        if method not in source["searches"]:
            continue
        found = source["searches"][method]
        result.setdefault("searches", {})[method] = {
            "removed": found["removed"], "calibration_perplexity":
                found["calibration_perplexity"], "search": found["search"],
            "search_samples": found.get("search_samples"),
            "shortlist": source["calibration"].get("search_shortlist"),
            "from": str(args.orders_from)}
        save(args.out, result, "searches", method)
    wiki = {tuple(e["removed"]): e["perplexity"] for lv in source["levels"]
            for e in lv["methods"].values()}
    result["imported_wiki"] = {" ".join(k): v for k, v in wiki.items()}
    result["imported_wiki"]["dense"] = source["dense"]["perplexity"]
    result["imported_wiki_protocol"] = source["dense"]["protocol"]
    save(args.out, result, "imported_wiki")
    save(args.out, result, "imported_wiki_protocol")


def import_log(args: argparse.Namespace, result: dict) -> None:
    """Store the removals a search logged before it was stopped (one `removal N: BLOCK,
    calibration ppl X` line each), marked partial; `search --extend` continues from there."""
    steps = re.findall(r"removal (\d+): (\S+), calibration ppl ([0-9.]+)",
                       args.log.read_text())
    assert [int(n) for n, _, _ in steps] == list(range(1, len(steps) + 1)), "gap in the log"
    result.setdefault("searches", {})[args.method] = {
        "removed": [b for _, b, _ in steps],
        "calibration_perplexity_after_each": [float(p) for _, _, p in steps],
        "partial": True, "log": str(args.log),
        "searched_here": {"from": 0, "samples": args.search_samples,
                          "shortlist": args.search_shortlist}}
    save(args.out, result, "searches", args.method)
    print(f"{args.method}: {len(steps)} removals from the log", flush=True)


# -- evaluate -------------------------------------------------------------------------------
def zeroshot(loaded: Loaded, args: argparse.Namespace) -> dict:
    from secateur.eval.zeroshot import ZeroShotSpec, parse_tasks
    from secateur.eval.zeroshot import zeroshot as run_zeroshot

    spec = ZeroShotSpec(tasks=parse_tasks(args.zeroshot_tasks), limit=args.zeroshot_limit)
    out = run_zeroshot(loaded.model, loaded.tokenizer, spec)
    return {"average": out["average"], "limit": args.zeroshot_limit,
            "tasks": {k: {"acc": v["acc"], "acc_norm": v["acc_norm"]}
                      for k, v in out["tasks"].items()}}


def evaluate(args: argparse.Namespace, base: Loaded, result: dict) -> None:
    total = total_parameters(base.model)
    sizes = sizes_of(base)
    levels = levels_for(args.ratios, sizes["0.layer"], total, base.adapter.num_layers)
    calib = CalibrationConfig(args.calib, args.nsamples, args.seqlen, args.seed)
    texts = {"wiki": (load_text("wiki"), args.wiki_windows),
             "c4_heldout": (heldout_c4(base.tokenizer, calib), args.heldout_windows)}
    check_heldout(base, calib, texts["c4_heldout"][0])
    models = result.setdefault("models", {})

    imported = result.get("imported_wiki", {}) if args.reuse_wiki else {}

    def measure(name: str, loaded: Loaded, entry: dict) -> None:
        known = imported.get(" ".join(entry["removed"]) if entry["removed"] else "dense")
        if "wiki" not in entry and known is not None:
            # the same pruned model measured by bench/depth_pruning.py on the same protocol
            entry.update(wiki=known, wiki_from="depth_pruning.json")
        for key, (text, windows) in texts.items():
            if key not in entry and key in args.texts:
                ev = perplexity(loaded.model, loaded.tokenizer, text, args.eval_seqlen, windows,
                                progress=False).to_dict()
                entry[key] = ev["perplexity"]
                result.setdefault("protocols", {})[key] = ev["protocol"]
                save(args.out, result, "protocols")
                save(args.out, result, "models", name)
                print(f"{name} {key} {ev['perplexity']:.3f}", flush=True)
        if args.zeroshot_limit and entry.get("zeroshot", {}).get("limit") != args.zeroshot_limit:
            entry["zeroshot"] = zeroshot(loaded, args)
            save(args.out, result, "models", name)
            print(f"{name} zero-shot {entry['zeroshot']['average']:.4f}", flush=True)

    measure("dense", base, models.setdefault("dense", {"ratio": 0.0, "removed": []}))
    for level in levels:
        for method in args.methods:
            order = result["searches"][method]["removed"]
            try:
                n = (level["layers"] if method in LAYER_METHODS
                     else prefix_for(order, sizes, total, level["ratio"]))
            except ValueError:  # a search stopped before this ratio
                n = len(order) + 1
            name = f"{method}@{level['target']}"
            if n > len(order):
                print(f"{method}: order too short for ratio {level['ratio']:.3f}", flush=True)
                models[name] = {"method": method, "target": level["target"],
                                "not_reached": len(order)}
                save(args.out, result, "models", name)
                continue
            entry = models.setdefault(name, {})
            if entry.get("removed") != order[:n] or "not_reached" in entry:
                entry.clear()
            work = copy_loaded(base)
            remove_blocks(work.model, work.adapter, [Block.parse(b) for b in order[:n]])
            entry.update({"method": method, "target": level["target"],
                          "layer_methods_ratio": level["ratio"], "removed": order[:n],
                          "ratio": 1 - total_parameters(work.model) / total,
                          "proportional_speedup": proportional_speedup(
                              sizes, order[:n], base.model.get_output_embeddings().weight.numel(),
                              base.adapter.num_layers)})
            measure(name, work, entry)
            del work
            gc.collect()


# -- timing ---------------------------------------------------------------------------------
def timing(args: argparse.Namespace, base: Loaded, result: dict) -> None:
    for target in args.ratios:
        models = {"dense": base.model}
        for name, entry in result["models"].items():
            if entry.get("target") == target and "removed" in entry:
                work = copy_loaded(base)
                remove_blocks(work.model, work.adapter, [Block.parse(b) for b in entry["removed"]])
                models[name] = work.model
        timed = time_models(models, args.repeats, args.eval_seqlen, args.new_tokens, args.seed)
        result["timing_protocol"] = {
            "threads": args.threads, "machine": platform.processor() or platform.machine(),
            "what": f"batch 1, fp32; prefill: one {args.eval_seqlen}-token forward; decode: greedy "
                    f"{args.new_tokens} new tokens after a 16-token prompt with the KV cache; "
                    f"median of {args.repeats} interleaved repeats",
            "load_average_before": list(map(float, Path("/proc/loadavg").read_text().split()[:3]))}
        save(args.out, result, "timing_protocol")
        for name, t in timed.items():
            if name != "dense":
                result["models"][name]["timing"] = t
                save(args.out, result, "models", name)
        del models
        gc.collect()


# -- table ----------------------------------------------------------------------------------
LABELS = {"shortgpt": "ShortGPT", "sleb": "SLEB", "blockpruner": "BlockPruner (loss)",
          "blockpruner_per_param": "BlockPruner (loss_per_param)"}


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(args: argparse.Namespace, result: dict) -> str:
    models = result["models"]
    tasks = args.zeroshot_tasks.split(",")
    head = ["ratio target", "method", "removed", "ratio", "wiki ppl", "c4 held-out ppl",
            *tasks, f"zero-shot avg ({len(AVERAGE_TASKS)} tasks)", "decode x", "prefill x",
            "proportional x"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, target: str, e: dict, best: dict[str, float]) -> str:
        zs = e.get("zeroshot", {})
        accs = [zs.get("tasks", {}).get(t, {}) for t in tasks]
        scores = [(a.get("acc_norm") if a.get("acc_norm") is not None else a.get("acc"))
                  if a else None for a in accs]
        cells = [_fmt(v, 3) for v in scores]
        # one average over the same tasks for every model (some ran ARC-c too, some not)
        averaged = [v for t, v in zip(tasks, scores, strict=True) if t in AVERAGE_TASKS]
        average = (sum(averaged) / len(averaged)
                   if len(averaged) == len(AVERAGE_TASKS) and None not in averaged else None)
        blocks = e.get("removed", [])
        kinds = {p: sum(b.endswith(p) for b in blocks) for p in ("layer", "attn", "mlp")}
        removed = (f"{kinds['layer']} layers" if kinds["layer"] else
                   f"{kinds['attn']} attn + {kinds['mlp']} MLP" if blocks else "-")

        def ppl(key: str) -> str:
            v = e.get(key)
            text = _fmt(v)
            return f"**{text}**" if v is not None and v == best.get(key) else text
        t = e.get("timing", {})
        return "| " + " | ".join([target, label, removed, _fmt(e.get("ratio"), 3), ppl("wiki"),
                                  ppl("c4_heldout"), *cells, _fmt(average, 3),
                                  _fmt(t.get("decode_speedup")), _fmt(t.get("prefill_speedup")),
                                  _fmt(e.get("proportional_speedup"))]) + " |"

    rows.append(row("dense", "0", models["dense"], {}))
    searches = result.get("searches", {})
    for target in args.ratios:
        level = {m: models[f"{m}@{target}"] for m in METHODS if f"{m}@{target}" in models}
        best = {k: min(e[k] for e in level.values() if k in e) for k in ("wiki", "c4_heldout")
                if any(k in e for e in level.values())}
        for m, e in level.items():
            if "not_reached" in e:
                rows.append(f"| {target:g} | {LABELS[m]} | not reached: its search stopped "
                            f"after {e['not_reached']} removals |" + " |" * (len(head) - 3))
            else:
                rows.append(row(LABELS[m], f"{target:g}", e, best))
    notes = ["", "Search sets (removal orders):"]
    for m, found in searches.items():
        if "from" in found:
            how = (f"from {Path(found['from']).name}: first {found['search_samples']} of the "
                   f"calibration windows, shortlist {found['shortlist']}, "
                   f"{found['search']['dtype']} on another machine")
            if m == "shortgpt":
                how = f"from {Path(found['from']).name}: Block Influence on all 32 windows"
        else:
            here = found["searched_here"]
            how = (f"searched here: first {here['samples']} of the calibration windows, "
                   f"shortlist {here['shortlist']}, float32")
            if here.get("from"):
                how += (f" (removals {here['from'] + 1}-{len(found['removed'])}, continuing "
                        f"the first {here['from']} from {found.get('first_part_from')})")
        part = " (partial: stopped early)" if found.get("partial") else ""
        notes.append(f"- {LABELS[m]}: {len(found['removed'])} removals{part}, {how}")
    protocols = {"wiki": result.get("imported_wiki_protocol"), **result.get("protocols", {})}
    for key, label in (("wiki", "wiki"), ("c4_heldout", "c4 held-out")):
        if protocols.get(key):
            pr = protocols[key]
            notes.append(f"- {label}: {pr['windows']} x {pr['seqlen']} tokens, {pr['origin']}")
    return "\n".join(rows + notes) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("import", "import-log", "search", "evaluate", "timing",
                                      "table"))
    ap.add_argument("--method", choices=tuple(METHODS), help="search: the method to search.")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=tuple(METHODS))
    ap.add_argument("--extend", action="store_true",
                    help="search: continue the stored order (this --out or --orders-from).")
    ap.add_argument("--orders-from", type=Path, default=None)
    ap.add_argument("--log", type=Path, help="import-log: a search's log.")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--calib", default="c4-sample")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--search-samples", type=int, default=None)
    ap.add_argument("--search-shortlist", type=int, default=None)
    ap.add_argument("--texts", nargs="+", default=["wiki", "c4_heldout"])
    ap.add_argument("--wiki-windows", type=int, default=64)
    ap.add_argument("--reuse-wiki", action="store_true",
                    help="evaluate: take wiki ppl of models depth_pruning.py measured (import).")
    ap.add_argument("--heldout-windows", type=int, default=32)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--zeroshot-limit", type=int, default=0)
    ap.add_argument("--zeroshot-tasks", default="arc_easy,piqa,hellaswag,winogrande")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT / "depth_criteria.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    result = load_result(args.out)
    if args.stage == "import-log":
        import_log(args, result)
        return
    if args.stage == "table":
        text = table(args, result)
        md = args.out.with_suffix(".md")
        write_text_atomic(md, text)
        print(text)
        return
    base = load("smollm2-135m")
    result.setdefault("model", "smollm2-135m")
    result.setdefault("total_parameters", total_parameters(base.model))
    result.setdefault("ratio_definition", "removed / all parameters (embeddings included, tied "
                                          "once), as in the BlockPruner paper")
    result.setdefault("calibration", {"source": args.calib, "nsamples": args.nsamples,
                                      "seqlen": args.seqlen, "seed": args.seed})
    if args.stage == "import":
        import_orders(args, base, result)
    elif args.stage == "search":
        search(args, base, result)
    elif args.stage == "evaluate":
        evaluate(args, base, result)
    else:
        timing(args, base, result)


if __name__ == "__main__":
    main()
