"""Decode and prefill speed of every point of a frontier result, measured afterwards, quietly.

    python bench/frontier_speed.py --frontier bench/results/frontier_smollm2-135m.json

A frontier run measures quality point by point over hours, usually beside other work, so its
timings would not compare; this measures them all in one quiet sitting and writes them into
the points (`speed`), which the report's frontier plot and crossing table read. llama.cpp's
speed depends on a file's tensor types and shapes, not on the values in them, so each point
is timed on a stand-in with the same types and shapes, built in seconds: llama.cpp's own
quantization at the point's preset of the point's model (the dense model, or the pruned
folder the point names) exported to F32; the F32 point is the export itself. Points sharing
a model and a preset (with and without an imatrix, rtn, gptq or +dwq) share one timing; the
presets llama.cpp refuses without an importance matrix get a uniform one, which changes no
type. Every file is timed once per round, the files in turn (`secateur.bench.measure.
interleaved`: A B C C B A ...), so a slow spell of the machine hits them alike;
min/median/max over rounds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from secateur.bench.measure import interleaved, spread
from secateur.data.sources import load_text
from secateur.formats.export import export_model
from secateur.formats.loader import load
from secateur.io import write_json_atomic
from secateur.quant.ggml_presets import NEEDS_IMATRIX
from secateur.runtime import llama_cpp as runtime


def point_source(name: str, row: dict[str, Any], model: str) -> tuple[str, str]:
    """(model it was made from, preset) of a frontier point's name."""
    if name == "f32":
        return model, "f32"
    words = name.split()
    if words[0] == "llama.cpp":
        return model, words[1]
    if words[0] == "secateur" and "model" in row:  # secateur LABEL PRESET ROUNDING
        return row["model"], words[2]
    return model, words[1]  # secateur PRESET ROUNDING


def uniform_imatrix(f32: Path) -> dict[str, torch.Tensor]:
    import gguf

    reader = gguf.GGUFReader(f32)
    return {t.name: torch.ones(int(t.shape[0])) for t in reader.tensors if len(t.shape) == 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frontier", type=Path, required=True, help="a frontier.json")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp's, when timed")
    parser.add_argument("--build-threads", type=int, default=2,
                        help="for exporting and quantizing the stand-ins (not timed)")
    args = parser.parse_args()
    torch.set_num_threads(args.build_threads)
    result = json.loads(args.frontier.read_text())
    points: dict[str, Any] = result["points"]
    sources: dict[tuple[str, str], list[str]] = {}
    for name, row in points.items():
        source = point_source(name, row, result["model"])
        if source[0] != result["model"] and not (Path(source[0]) / "config.json").is_file():
            print(f"skipped {name}: its model {source[0]} is not on this machine", flush=True)
            continue
        sources.setdefault(source, []).append(name)

    with tempfile.TemporaryDirectory() as tmp:
        files: dict[tuple[str, str], Path] = {}
        prompt: list[int] | None = None
        for model in dict.fromkeys(m for m, _ in sources):
            loaded = load(model)
            if prompt is None:
                ids = loaded.tokenizer(load_text("wiki", split="test").joined()[:4000]).input_ids
                prompt = ids[:args.prompt_tokens]
            f32 = Path(tmp) / f"{len(files)}-f32.gguf"
            export_model(loaded.model, loaded.tokenizer, "gguf", f32, outtype="f32",
                         name=Path(model).name)
            del loaded
            for _, preset in (k for k in sources if k[0] == model):
                if preset == "f32":
                    files[(model, preset)] = f32
                    continue
                path = Path(tmp) / f"{len(files)}-{preset}.gguf"
                runtime.quantize(f32, path, preset, uniform_imatrix(f32)
                                 if preset.lower() in NEEDS_IMATRIX else None,
                                 args.build_threads)
                files[(model, preset)] = path
            print(f"built {model}: {', '.join(p for m, p in files if m == model)}", flush=True)
        assert prompt is not None
        keys = list(files)
        runs = {str(i): (lambda path=files[key]: runtime.decode_speed(
            path, prompt, args.new_tokens, args.threads, 1)) for i, key in enumerate(keys)}
        rounds = interleaved(runs, args.rounds, warmup=0, desc="rounds")
    timings = {key: {kind: [r[f"{kind}_tokens_per_second"]["median"] for r in rounds[str(i)]]
                     for kind in ("decode", "prefill")} for i, key in enumerate(keys)}

    for key, names in sources.items():
        speed = {"decode_tokens_per_second": spread(timings[key]["decode"]),
                 "prefill_tokens_per_second": spread(timings[key]["prefill"]),
                 "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                 "new_tokens": args.new_tokens, "rounds": args.rounds,
                 "timed_on": f"llama.cpp {key[1]} of {Path(key[0]).name}"}
        for name in names:
            points[name]["speed"] = speed
    result["speed_protocol"] = {
        "command": shlex.join(["python", "bench/frontier_speed.py", *sys.argv[1:]]),
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "how": "after the quality run, all points in one sitting, interleaved rounds, on "
               "stand-ins with the same tensor types and shapes (llama.cpp's own quantization "
               "of the point's model at its preset; see bench/frontier_speed.py)"}
    write_json_atomic(args.frontier, result)
    for key, names in sources.items():
        print(f"{key[1]:>8} {Path(key[0]).name:>40}: decode median "
              f"{spread(timings[key]['decode'])['median']:6.1f} tok/s  ({len(names)} points)")


if __name__ == "__main__":
    main()
