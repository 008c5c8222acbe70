"""torch.distributed on CPU: 2 gloo ranks give what one process gives.

Both sides run the same layer-wise steps on the same tiny random Llama and calibration
windows. Exact where the reduced statistic is exact (Wanda's float64 column squares, the
absmax of W8A8, weights alone for magnitude and RTN); within float tolerance where the fp32
Hessian X^T X is summed in another order (SparseGPT, GPTQ).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from secateur import distributed
from tests.tiny_models import save_tiny, tiny_model

WORLD = 2
STEPS = {
    "wanda": {"method": "wanda", "sparsity": 0.5},
    "magnitude": {"method": "magnitude", "sparsity": 0.5, "error_report": True},
    "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5},
    "gptq": {"method": "gptq", "bits": 4, "group_size": 32},
    "gptq_true_sequential": {"method": "gptq", "bits": 4, "group_size": 32,
                             "true_sequential": True},
    "rtn": {"method": "rtn", "bits": 4, "group_size": 32},
    "w8a8": {"method": "w8a8"},
    "wanda_owl": {"method": "wanda", "sparsity": 0.5, "owl": True},
}


def _windows() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (1, 32), generator=g) for _ in range(7)]  # 4 + 3 per rank


def _run_steps() -> dict[str, dict]:
    """Every step on a fresh tiny model: its weights, grids and per-layer reports."""
    from secateur.api import run_step
    from secateur.quant.state import quant_state
    from secateur.registry import make_config

    out = {}
    for name, fields in STEPS.items():
        model = tiny_model("llama", seed=0)
        result = run_step(model, make_config(dict(fields)), _windows(), progress=False,
                          device=None)
        grids = {n: (s.scale, s.zero) for n, m in model.named_modules()
                 if (s := quant_state(m)) is not None}
        out[name] = {"weights": {k: v.clone() for k, v in model.state_dict().items()},
                     "grids": grids, "layers": result.layers, "summary": result.summary}
    return out


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    distributed.init()
    try:
        assert distributed.world() == WORLD and distributed.backend() == "gloo"
        results = _run_steps()
        # every rank must hold the same model, not only rank 0
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        distributed.finish()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, list[dict]]:
    """(one process's results, each of the 2 ranks' results)."""
    assert not distributed.active()
    single = _run_steps()
    folder = tmp_path_factory.mktemp("ranks")
    ctx = mp.spawn(_worker, (_free_port(), str(folder)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2 gloo ranks did not finish in 240 s")
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return single, ranks


def _without_error(layers: list[dict]) -> list[dict]:
    return [{k: v for k, v in layer.items() if k != "relative_error"} for layer in layers]


@pytest.mark.parametrize("step", list(STEPS))
def test_ranks_hold_the_same_model(runs, step):
    _, ranks = runs
    first, second = ranks[0][step], ranks[1][step]
    for k, v in first["weights"].items():
        assert torch.equal(v, second["weights"][k]), k
    assert first["grids"].keys() == second["grids"].keys()
    for k, (scale, zero) in first["grids"].items():
        assert torch.equal(scale, second["grids"][k][0]) and torch.equal(zero,
                                                                          second["grids"][k][1])
    assert first["layers"] == second["layers"]


@pytest.mark.parametrize("step", ["wanda", "wanda_owl", "magnitude", "rtn", "w8a8"])
def test_exact_statistics_give_identical_results(runs, step):
    single, ranks = runs
    one, two = single[step], ranks[0][step]
    for k, v in one["weights"].items():
        assert torch.equal(v, two["weights"][k]), k
    for k, (scale, zero) in one["grids"].items():
        assert torch.equal(scale, two["grids"][k][0]) and torch.equal(zero, two["grids"][k][1])
    # the report's output error sums float64 squares per rank first: last bits may differ
    assert _without_error(one["layers"]) == _without_error(two["layers"])
    for a, b in zip(one["layers"], two["layers"], strict=True):
        assert (a["relative_error"] is None) == (b["relative_error"] is None)
        if a["relative_error"] is not None:
            assert a["relative_error"] == pytest.approx(b["relative_error"], rel=1e-12)
    assert one["summary"] == two["summary"]


@pytest.mark.parametrize("step", ["sparsegpt", "gptq", "gptq_true_sequential"])
def test_hessian_methods_agree_within_float_tolerance(runs, step):
    """X^T X is fp32 summed in another order; the solve amplifies that only slightly."""
    single, ranks = runs
    one, two = single[step], ranks[0][step]
    for k, v in one["weights"].items():
        w = two["weights"][k]
        if not v.is_floating_point():  # a pruning mask: agrees where the weights do
            assert (v == w).float().mean() > 0.99, k
            continue
        if "proj" not in k:
            assert torch.equal(v, w), k
            continue
        # a weight may land one grid step (or mask decision) apart; almost all agree
        close = torch.isclose(v, w, rtol=1e-4, atol=1e-5)
        assert close.float().mean() > 0.995, (k, close.float().mean())
        assert (v - w).norm() / v.norm() < 0.02, k
    for a, b in zip(one["layers"], two["layers"], strict=True):
        assert a["matrices"].keys() == b["matrices"].keys()
        for m, vals in a["matrices"].items():
            assert vals == pytest.approx(b["matrices"][m], rel=0.02, abs=1e-6), m
        if a["relative_error"] is not None:
            assert a["relative_error"] == pytest.approx(b["relative_error"], rel=0.02)


def test_one_process_is_not_distributed():
    assert (distributed.world(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    items = list(range(5))
    assert distributed.shard(items) == items
    assert distributed.sum_scalars(1.5, 2.0) == [1.5, 2.0]
    assert distributed.record() == {"world_size": 1, "backend": None}


def test_torchrun_cli_matches_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m secateur prune` prints and writes once (rank 0), the
    same result as one process apart from timings, memory and the distributed record."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from secateur.cli import app

    model = save_tiny("llama", tmp_path / "tiny")
    args = ["prune", str(model), "--method", "wanda", "--sparsity", "0.5", "--nsamples", "4",
            "--seqlen", "32", "--eval", "none"]
    one = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out-one"), "--json",
                                   str(tmp_path / "one.json")])
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port",
                          str(_free_port()), "-m", "secateur", *args, "--out",
                          str(tmp_path / "out-two"), "--json", str(tmp_path / "two.json")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("per layer") == 1  # one rank printed
    results = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two")]
    assert results[0]["distributed"] == {"world_size": 1, "backend": None}
    assert results[1]["distributed"] == {"world_size": 2, "backend": "gloo"}
    varying = {"timings", "peak_rss_mib", "distributed", "out", "bytes_on_disk"}
    assert [{k: v for k, v in r.items() if k not in varying} for r in results[:1]] == [
        {k: v for k, v in r.items() if k not in varying} for r in results[1:]]
    a = load_file(tmp_path / "out-one" / "model.safetensors")
    b = load_file(tmp_path / "out-two" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_refuses_commands_it_does_not_split(monkeypatch):
    from secateur.__main__ import refusal

    assert refusal(["eval", "smollm2-135m"]) is None  # one process runs anything
    monkeypatch.setattr(distributed, "world", lambda: 2)
    assert refusal(["prune", "m", "--method", "wanda"]) is None
    assert refusal(["quantize", "m"]) is None
    assert "run 'eval' as one process" in refusal(["eval", "smollm2-135m"])
