"""What packing buys recovery training: real tokens per step, packed or one document a window.

    python bench/packing.py          # -> bench/results/packing.json

Recovery trains on windows of `--seqlen` tokens cut from the documents joined end to end
(packing: every position is a real token). The usual alternative puts one document in each
window, padding the short ones and truncating the long ones; at the same step cost (a
window's cost does not depend on how many of its positions are padding) it trains on fewer
real tokens and drops the tails of long documents. This counts both on the recovery
benchmark's text and tokenizer; no timing, so it needs no quiet machine.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

from secateur.data.sources import load_text
from secateur.formats.loader import load
from secateur.io import write_json_atomic

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="c4-sample")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", type=Path, default=RESULTS / "packing.json")
    args = parser.parse_args()
    tokenizer = load(args.model).tokenizer
    lengths = [len(tokenizer(doc).input_ids) for doc in load_text(args.data).documents]
    real = sum(min(n, args.seqlen) for n in lengths)
    windows = len(lengths)
    result = {
        "model": args.model, "data": args.data, "seqlen": args.seqlen,
        "documents": windows, "tokens": sum(lengths),
        "median_document_tokens": statistics.median(lengths),
        "one_document_per_window": {
            "real_token_share": real / (windows * args.seqlen),
            "truncated_token_share": 1 - real / sum(lengths)},
        "packed": {"real_token_share": 1.0, "truncated_token_share": 0.0},
        "real_tokens_per_step_packed_vs_padded": windows * args.seqlen / real,
        "command": shlex.join(["python", "bench/packing.py", *sys.argv[1:]])}
    write_json_atomic(args.out, result)
    print(f"{args.data} at {args.seqlen}: one document per window fills "
          f"{result['one_document_per_window']['real_token_share']:.1%} of positions and drops "
          f"{result['one_document_per_window']['truncated_token_share']:.1%} of the text; "
          f"packing trains on {result['real_tokens_per_step_packed_vs_padded']:.2f}x the real "
          "tokens per step")


if __name__ == "__main__":
    main()
