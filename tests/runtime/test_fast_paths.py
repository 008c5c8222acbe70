"""Every fast path of the mask methods gives what the slow path gave (issue 14, item 2)."""

import copy

import pytest
import torch

from secateur.api import CalibrationConfig, prune
from secateur.engine.capture import capture_layer_inputs
from secateur.engine.sequential import run_with_stats
from secateur.methods.masks import (
    kth_smallest,
    lowest_n_of_m,
    lowest_per_matrix,
    lowest_per_row,
)
from secateur.methods.sparsegpt import SparseGPT
from secateur.models import adapter_for
from secateur.stats import ColumnSquares, Hessian
from tests.tiny_models import make_step, tiny_loaded

CALIB = CalibrationConfig("c4-sample", nsamples=4, seqlen=48, seed=0)
SPARSITIES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.99)


def _argsort_per_matrix(score, sparsity):
    k = int(score.numel() * sparsity)
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[torch.argsort(score.flatten(), stable=True)[:k]] = True
    return mask.view_as(score)


def _argsort_per_row(score, sparsity):
    k = int(score.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    return mask.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :k], True)


def _scores(seed):
    """Real-valued scores, scores on a small grid (ties everywhere), and all-equal ones
    with signed zeros."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.randint(1, 50, (2,), generator=g).tolist()
    signed_zeros = torch.zeros(rows, cols)
    signed_zeros[torch.rand(rows, cols, generator=g) < 0.5] = -0.0
    return [torch.randn(rows, cols, generator=g).abs(),
            torch.randint(0, 4, (rows, cols), generator=g).float(),
            signed_zeros]


@pytest.mark.parametrize("seed", range(20))
def test_selection_masks_equal_stable_argsort_masks(seed):
    for score in _scores(seed):
        for s in SPARSITIES:
            per_matrix = lowest_per_matrix(score, s)
            assert torch.equal(per_matrix, _argsort_per_matrix(score, s)), (score.shape, s)
            assert per_matrix.sum().item() == int(score.numel() * s)
            per_row = lowest_per_row(score, s)
            assert torch.equal(per_row, _argsort_per_row(score, s)), (score.shape, s)
            assert (per_row.sum(1) == int(score.shape[1] * s)).all()


def test_bracketed_selection_on_large_matrices_equals_kthvalue_and_argsort():
    g = torch.Generator().manual_seed(3)
    skewed = torch.rand(120_000, generator=g) + 1
    skewed[:: 120_000 // 4096] = 0  # exactly what the sample sees: the bracket misses
    for score in (torch.randn(300, 400, generator=g).abs(),
                  (torch.randn(300, 400, generator=g) * 4).round().abs(),  # grid: many ties
                  skewed.view(300, 400)):
        flat = score.flatten()
        for k in (1, 2, 1000, flat.numel() // 2, flat.numel() - 1, flat.numel()):
            assert kth_smallest(flat, k).item() == flat.kthvalue(k).values.item(), k
        for s in (0.3, 0.5, 0.9):
            assert torch.equal(lowest_per_matrix(score, s), _argsort_per_matrix(score, s))


def test_per_row_mask_with_crowded_ties_in_some_rows_only():
    score = torch.tensor([[1.0, 2.0, 2.0, 2.0, 3.0, 0.5],  # 3 ties at the threshold, 2 needed
                          [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # no ties
                          [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])  # all tied
    mask = lowest_per_row(score, 0.5)
    assert mask.tolist() == [[True, True, False, False, False, True],
                             [True, True, True, False, False, False],
                             [True, True, True, False, False, False]]
    assert torch.equal(mask, _argsort_per_row(score, 0.5))


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_exact_pattern_and_lowest_in_every_group(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    for score in (torch.randn(37, 8 * m, generator=g).abs(),
                  torch.randint(0, 3, (37, 8 * m), generator=g).float()):
        mask = lowest_n_of_m(score, n, m)
        groups, pruned = score.reshape(37, -1, m), mask.reshape(37, -1, m)
        assert (pruned.sum(-1) == m - n).all()
        highest_pruned = groups.masked_fill(~pruned, float("-inf")).amax(-1)
        lowest_kept = groups.masked_fill(pruned, float("inf")).amin(-1)
        assert (highest_pruned <= lowest_kept).all()
        if score.unique().numel() == score.numel():  # without ties the set is unique
            stable = torch.argsort(groups, dim=-1, stable=True)[..., : m - n]
            assert torch.equal(pruned, torch.zeros_like(pruned).scatter_(-1, stable, True))


@pytest.mark.parametrize("width", [64, 256, 600])
def test_hessian_panels_equal_the_full_product(width):
    g = torch.Generator().manual_seed(width)
    chunks = [torch.randn(1, 40, width, generator=g) for _ in range(3)]
    hessian = Hessian(width)
    full = torch.zeros(width, width)
    for x in chunks:
        hessian.add(x)
        full.addmm_(x[0].t(), x[0])
    h = hessian.sum
    assert torch.equal(h, h.t())
    torch.testing.assert_close(h, full, rtol=1e-5, atol=1e-4)
    assert hessian.tokens == 120
    hessian.sum = torch.empty(0)  # what a method does to free it
    assert hessian.sum.numel() == 0


def _windows(count=3, seqlen=24):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (1, seqlen), generator=g) for _ in range(count)]


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "opt", "gpt2", "gpt_neox"])
def test_shared_statistics_equal_separate_ones(family):
    loaded = tiny_loaded(family)
    adapter = loaded.adapter
    captured = capture_layer_inputs(loaded.model, adapter, _windows())
    layer = adapter.layers[1]
    projections = adapter.linears(layer)
    needs = (ColumnSquares, Hessian)
    outputs, separate = run_with_stats(layer, projections, needs, captured.hidden,
                                       captured.calls[1])
    same_outputs, shared = run_with_stats(layer, projections, needs, captured.hidden,
                                          captured.calls[1], share=True)
    no_outputs, early = run_with_stats(layer, projections, needs, captured.hidden,
                                       captured.calls[1], share=True, outputs=False)
    assert no_outputs == [] and len(outputs) == 3
    assert all(torch.equal(a, b) for a, b in zip(outputs, same_outputs, strict=True))
    for name in projections:
        for stat in (ColumnSquares.name, Hessian.name):
            assert torch.equal(shared[name][stat].sum, separate[name][stat].sum), name
            assert torch.equal(early[name][stat].sum, separate[name][stat].sum), name
            assert shared[name][stat].tokens == separate[name][stat].tokens == 72
    groups = {id(shared[name]) for name in projections}
    if family in ("llama", "gemma3_text"):
        q, k, v, o = (shared[f"self_attn.{p}_proj"] for p in "qkvo")
        assert q is k is v and o is not q
        assert shared["mlp.gate_proj"] is shared["mlp.up_proj"]
        assert len(groups) == 4  # q/k/v, o, gate/up, down
    elif family == "opt":
        assert len(groups) == 4  # q/k/v, out, fc1, fc2
    else:
        assert len(groups) == len(projections)  # fused q/k/v: nothing to share


def _prune(loaded, **options):
    return prune(loaded, make_step(**options), CALIB, progress=False)


def _weights(loaded):
    return {(i, n): p.weight.detach().clone() for i, layer in enumerate(loaded.adapter.layers)
            for n, p in loaded.adapter.linears(layer).items()}


@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"nm": "2:4"}])
def test_shared_hessian_sparsegpt_equals_per_matrix_sparsegpt(monkeypatch, target):
    shared = tiny_loaded()
    _prune(shared, method="sparsegpt", **target)
    monkeypatch.setattr(SparseGPT, "shares_statistics", False)
    separate = tiny_loaded()
    _prune(separate, method="sparsegpt", **target)
    a, b = _weights(shared), _weights(separate)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any((a[k] == 0).any() for k in a)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sequential", [True, False])
def test_without_error_report_same_weights(method, sequential):
    loaded = {}
    runs = {}
    for report in (True, False):
        loaded[report] = tiny_loaded()
        runs[report] = _prune(loaded[report], method=method, sparsity=0.5,
                              sequential=sequential, error_report=report)
    a, b = _weights(loaded[True]), _weights(loaded[False])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(0 < layer["relative_error"] < 1 for layer in runs[True].layers)
    assert all(layer["relative_error"] is None for layer in runs[False].layers)


def test_magnitude_runs_no_layer_without_error_report():
    calls = []
    loaded = tiny_loaded()
    before = copy.deepcopy(loaded.model)
    for layer in loaded.adapter.layers:
        layer.register_forward_hook(lambda *a: calls.append(1))
    _prune(loaded, method="magnitude", sparsity=0.5)
    assert calls == []
    # the same masks as magnitude from the weights alone (ties to the lowest index)
    adapter = adapter_for(before)
    for i, layer in enumerate(adapter.layers):
        for name, p in adapter.linears(layer).items():
            mask = _argsort_per_matrix(p.weight.abs(), 0.5)
            assert torch.equal(loaded.adapter.linears(loaded.adapter.layers[i])[name].weight,
                               p.weight.masked_fill(mask, 0.0))


def test_magnitude_needs_no_calibration_windows(tmp_path):
    from secateur.engine.sequential import prune_layerwise
    from secateur.methods.magnitude import Magnitude, MagnitudeConfig

    with_windows, without = tiny_loaded(), tiny_loaded()
    _prune(with_windows, method="magnitude", nm="2:4")
    method = Magnitude(MagnitudeConfig(nm="2:4"))
    method.prepare(without.model, without.adapter)
    reports = prune_layerwise(without.model, without.adapter, method, [], progress=False,
                              checkpoint=tmp_path / "ckpt")
    assert len(reports) == 3 and all(r.relative_error is None for r in reports)
    a, b = _weights(with_windows), _weights(without)
    assert all(torch.equal(a[k], b[k]) for k in a)


BF16_CALIB = CalibrationConfig("c4-sample", nsamples=4, seqlen=48, seed=0,
                               compute_dtype="bfloat16")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "gptq"])
def test_bf16_calibration_forwards_keep_fp32_statistics(method, monkeypatch):
    """compute_dtype="bfloat16" runs the layers under autocast (the statistics differ from
    fp32's by bf16 rounding, not by nothing) while the statistics themselves stay fp32/fp64;
    the masks and weights come out close to fp32's, and the record says which was used."""
    from secateur.stats import ColumnSquares, Hessian

    seen: dict[str, list] = {"float32": [], "bfloat16": []}
    for dtype in ("float32", "bfloat16"):
        for cls in (ColumnSquares, Hessian):
            add = cls.add

            def spy(self, x, _add=add, _dtype=dtype):
                seen[_dtype].append((x.dtype, torch.is_autocast_enabled("cpu")))
                return _add(self, x)

            monkeypatch.setattr(cls, "add", spy)
        options = ({"method": "gptq", "bits": 4, "group_size": 32} if method == "gptq"
                   else {"method": method, "sparsity": 0.5})
        loaded = tiny_loaded()
        calib = BF16_CALIB if dtype == "bfloat16" else CALIB
        result = prune(loaded, make_step(**options), calib, progress=False) \
            if method != "gptq" else _quantize(loaded, options, calib)
        assert result.calibration["compute_dtype"] == dtype
        seen[dtype + "_weights"] = _weights(loaded)
        monkeypatch.undo()
    assert not any(autocast for _, autocast in seen["bfloat16"])  # stats never autocast
    # some projection inputs are bf16 under autocast (an attention or MLP product's output)
    assert {d for d, _ in seen["bfloat16"]} >= {torch.bfloat16}
    assert {d for d, _ in seen["float32"]} == {torch.float32}
    a, b = seen["float32_weights"], seen["bfloat16_weights"]
    if method != "gptq":
        agree = sum(((a[k] == 0) == (b[k] == 0)).sum().item() for k in a)
        total = sum(a[k].numel() for k in a)
        assert 0.9 < agree / total < 1.0  # close, and really computed differently
        assert all(((b[k] == 0).float().mean() - 0.5).abs() < 1e-6 for k in b)
    else:
        diff = max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a)
        assert 0 < diff < 0.5


def _quantize(loaded, options, calib):
    from secateur.api import quantize

    return quantize(loaded, make_step(**options), calib, progress=False)


def test_bad_compute_dtype_is_refused_before_loading():
    from secateur.errors import SecateurError

    with pytest.raises((SecateurError, ValueError), match="compute_dtype"):
        CalibrationConfig("c4-sample", compute_dtype="float16")
