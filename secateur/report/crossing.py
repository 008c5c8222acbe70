"""Where pruning + recovery meets quantizing harder: each recovered point of a frontier against
the unpruned model's ladder at the same bytes, and, from the recovery benchmark's tokens curve,
the training budget at which it would reach that ladder (an extrapolation, labelled as one).

A frontier point made from a pruned model records the model folder; bench/recovery.py names
its saved models STUDENT (pruned only) and STUDENT-RECOVERY-TOKENS, which is how a point finds
its recovery run. The ladder at a point's bytes is the lower envelope of the unpruned points
(llama.cpp's presets with and without imatrix, secateur's roundings), interpolated in log MiB
and log perplexity between the two envelope points around it; below the smallest rung it is
not extrapolated: the point is held against that rung, which it dominates once it reaches the
rung's perplexity with fewer bytes.

The budget: the share of the dense-to-pruned gap recovered is fitted as a + b ln(tokens) over
every budget of the same student and recovery (least squares, at least two budgets); the
quantized point is assumed to keep its measured ratio to the unquantized recovered model
(llama.cpp on the frontier's windows over the benchmark's own perplexity) at every budget.
Both are assumptions, which is why the column says "extrapolated".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from secateur.report.frontier import decode_tok_s
from secateur.report.recovery import curves

NOTE = ("Each recovered point (pruned, recovered by bench/recovery.py, quantized by secateur, "
        "scored by llama.cpp) against the unpruned model's ladder: the lower envelope of its "
        "points, interpolated in log MiB and log perplexity at the point's MiB (a point "
        "smaller than every rung is held against the smallest rung). The budget "
        "column is an extrapolation: the share of the gap recovered fitted as a + b ln(tokens) "
        "over the measured budgets, the quantized point keeping its ratio to the unquantized "
        "recovered model. The last column: the unpruned point of lowest perplexity that "
        "decodes at least as fast in llama.cpp, where the frontier was timed (--speed).")
COLUMNS = ["recovered point", "MiB", "wiki ppl", "ladder at its MiB (interpolated)",
           "verdict at its budget", "tokens to reach the ladder (extrapolated)",
           "best rung at least as fast"]


def as_fast(points: dict[str, dict[str, Any]], point: dict[str, Any], text: str = "wiki"
            ) -> str:
    """The unpruned point of lowest perplexity that decodes at least as fast as `point` (when
    the frontier timed them): what quantizing harder gives at the pruned model's speed."""
    fast = decode_tok_s(point)
    if fast is None:
        return "- (speed not measured)"
    rivals = [(q[text], n) for n, q in points.items() if n != "f32" and "pruned_from" not in q
              and text in q and (decode_tok_s(q) or 0) >= fast]
    if not rivals:
        return f"none as fast ({fast:.1f} tok/s)"
    ppl, name = min(rivals)
    return f"{name}: {ppl:.3f}"


def envelope(points: dict[str, dict[str, Any]], text: str = "wiki"
             ) -> list[tuple[float, float, str]]:
    """(MiB, perplexity, name) of the unpruned points no smaller point beats, by size."""
    ladder = sorted((p["mib"], p[text], n) for n, p in points.items()
                    if n != "f32" and "pruned_from" not in p and text in p)
    out: list[tuple[float, float, str]] = []
    for mib, ppl, name in ladder:
        if not out or ppl < out[-1][1]:
            out.append((mib, ppl, name))
    return out


def ladder_at(points: dict[str, dict[str, Any]], mib: float, text: str = "wiki"
              ) -> tuple[float, str] | None:
    """The ladder's perplexity at `mib` and what it was read from; None below its smallest
    point."""
    env = envelope(points, text)
    if not env or mib < env[0][0]:
        return None
    below = [e for e in env if e[0] <= mib][-1]
    above = [e for e in env if e[0] > mib]
    if not above or below[0] == mib:
        return below[1], below[2]
    (m0, p0, n0), (m1, p1, n1) = below, above[0]
    w = (math.log(mib) - math.log(m0)) / (math.log(m1) - math.log(m0))
    return math.exp((1 - w) * math.log(p0) + w * math.log(p1)), f"{n0} .. {n1}"


def fit_log_tokens(curve: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares (a, b) of share = a + b ln(tokens); None under two distinct budgets."""
    xs = [math.log(t) for t, _ in curve]
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(s for _, s in curve) / len(curve)
    b = sum((x - mx) * (s - my) for x, (_, s) in zip(xs, curve, strict=True)) / \
        sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def tokens_to_reach(curve: list[tuple[int, float]], share: float) -> float | None:
    """The budget at which the fitted curve reaches `share`; None if it does not rise."""
    fit = fit_log_tokens(curve)
    if fit is None or fit[1] <= 0:
        return None
    a, b = fit
    return math.exp((share - a) / b)


def _run_of(point: dict[str, Any], recoveries: list[dict[str, Any]]
            ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(result file, run) of the recovery that made this point's model."""
    folder = Path(str(point.get("model", ""))).name
    for data in recoveries:
        for run in data["runs"]:
            if folder == f"{run['student']}-{run['recovery']}-{run['tokens']}":
                return data, run
    return None


def rows(frontier: dict[str, Any], recoveries: list[dict[str, Any]]) -> list[list[str]]:
    """One row per recovered point of `frontier` whose recovery run is in `recoveries`."""
    points = frontier["points"]
    out = []
    for name, p in sorted(points.items(), key=lambda kv: -kv[1]["mib"]):
        found = _run_of(p, recoveries) if "pruned_from" in p else None
        if found is None or "wiki" not in p:
            continue
        data, run = found
        ladder = ladder_at(points, p["mib"])
        if ladder is None:  # smaller than every rung: reaching the smallest one dominates it
            env = envelope(points)
            if not env:
                continue
            mib, target, rung = env[0]
            source = f"none this small; smallest rung {rung}, {mib:.1f} MiB"
        else:
            target, source = ladder
        verdict, budget = _verdict(p["wiki"], target, data, run, recoveries)
        out.append([name, f"{p['mib']:.1f}", f"{p['wiki']:.3f}", f"{target:.3f} ({source})",
                    verdict, budget, as_fast(points, p)])
    return out


def _verdict(ppl: float, target: float, data: dict[str, Any], run: dict[str, Any],
             recoveries: list[dict[str, Any]]) -> tuple[str, str]:
    if ppl <= target:
        return "beats the ladder", "-"
    verdict = f"{ppl / target:.2f}x the ladder's perplexity"
    pruned = data["students"][run["student"]]["wiki_ppl"]
    dense = data["dense"]["wiki_ppl"]
    # the quantized point over the benchmark's unquantized model at the same budget
    ratio = ppl / run["wiki_ppl"]
    share = (pruned - target / ratio) / (pruned - dense)
    if share >= 1:
        return verdict, "not by recovery: it would have to beat the dense model"
    # curves() joins only the files of this run's settings
    line = curves([data, *[d for d in recoveries if d is not data]]).get(
        (run["student"], run["recovery"]))
    if line is None:
        return verdict, "needs the tokens curve (two budgets or more)"
    tokens = tokens_to_reach([(t, s) for t, s, _ in line], share)
    if tokens is None:
        return verdict, "the curve does not rise"
    return verdict, (f"~{tokens:.2g} tokens (log-linear fit of {len(line)} budgets, "
                     f"{100 * share:.0f}% of the gap)")
