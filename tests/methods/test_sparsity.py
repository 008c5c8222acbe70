import pytest
import torch

from secateur.api import CalibrationConfig, prune
from secateur.errors import SecateurError
from secateur.methods.owl import owl_sparsities
from tests.tiny_models import make_step, tiny_loaded, tiny_model

CALIB = CalibrationConfig("c4-sample", nsamples=4, seqlen=64, seed=0)


def _run(family="llama", calib=CALIB, **options):
    loaded = tiny_loaded(family)
    run = prune(loaded, make_step(**options), calib, progress=False)
    return loaded, run


def _weights(loaded):
    return {(i, name): p.weight.clone() for i, layer in enumerate(loaded.adapter.layers)
            for name, p in loaded.adapter.linears(layer).items()}


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_sparsity_per_matrix(method, family):
    head_before = tiny_model(family).get_output_embeddings().weight.clone()
    loaded, run = _run(family, method=method, sparsity=0.5)
    for (_, name), w in _weights(loaded).items():
        assert (w == 0).sum().item() == w.numel() // 2, name
    assert all(abs(m["sparsity"] - 0.5) < 1e-9 for r in run.layers for m in r["matrices"].values())
    # Embeddings and head are left alone.
    assert torch.equal(loaded.adapter.lm_head.weight, head_before)


def test_wanda_prunes_exactly_per_output_row():
    loaded, _ = _run(method="wanda", sparsity=0.3)
    for w in _weights(loaded).values():
        per_row = (w == 0).sum(1)
        assert (per_row == int(w.shape[1] * 0.3)).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", ["2:4", "1:4", "4:8"])
def test_nm_pattern(method, nm):
    n, m = map(int, nm.split(":"))
    loaded, _ = _run(method=method, nm=nm)
    for w in _weights(loaded).values():
        zeros = (w.reshape(w.shape[0], -1, m) == 0).sum(-1)
        assert (zeros >= m - n).all()
        assert (w == 0).float().mean().item() == pytest.approx((m - n) / m, abs=1e-6)


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude():
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        _, run = _run(method=method, sparsity=0.5, error_report=True,
                      calib=CalibrationConfig("c4-sample", 8, 64, 0))
        errors[method] = run.layers[0]["relative_error"]
    assert errors["sparsegpt"] < errors["wanda"]
    assert errors["sparsegpt"] < errors["magnitude"]
    assert 0 < errors["sparsegpt"] < 1


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_same_seed_same_masks(method):
    a, _ = _run(method=method, sparsity=0.5)
    b, _ = _run(method=method, sparsity=0.5)
    c, _ = _run(method=method, sparsity=0.5, calib=CalibrationConfig("c4-sample", 4, 64, seed=1))
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[k] == 0, wb[k] == 0) for k in wa)
    assert not all(torch.equal(wa[k] == 0, wc[k] == 0) for k in wa)


def test_non_sequential_uses_dense_inputs_for_later_layers():
    seq, _ = _run(method="wanda", sparsity=0.5, sequential=True)
    dense, _ = _run(method="wanda", sparsity=0.5, sequential=False)
    ws, wd = _weights(seq), _weights(dense)
    first = [k for k in ws if k[0] == 0]
    later = [k for k in ws if k[0] == 2]
    assert all(torch.equal(ws[k], wd[k]) for k in first)
    assert not all(torch.equal(ws[k], wd[k]) for k in later)


def test_owl_layer_sparsities_average_to_target():
    loaded, run = _run(method="wanda", sparsity=0.6, owl={"lam": 0.1})
    targets = run.summary["owl_layer_sparsities"]
    assert sum(targets) / len(targets) == pytest.approx(0.6)
    assert max(targets) - min(targets) == pytest.approx(0.2)
    for report in run.layers:
        for m in report["matrices"].values():
            assert m["sparsity"] == pytest.approx(report["target"], abs=2 / 64)


def test_owl_rule_matches_reference_formula():
    got = owl_sparsities([1.0, 2.0, 4.0], 0.5, 0.08)
    scaled = [0.0, 0.16 / 3, 0.16]
    mean = sum(scaled) / 3
    assert got == pytest.approx([1 - (s - mean + 0.5) for s in scaled])


@pytest.mark.parametrize("options, message", [
    (dict(sparsity=1.0), r"WandaConfig.sparsity: Input should be less than 1"),
    (dict(sparsity=-0.1), r"WandaConfig.sparsity: Input should be greater than or equal to 0"),
    (dict(sparsity="abc"), r"WandaConfig.sparsity: Input should be a valid number"),
    (dict(sparsity=0.5, ratio=0.2), r"WandaConfig.ratio: not a field of this method"),
    (dict(sparsity=0.5, sparsty=0.2), r"WandaConfig.sparsty: not a field of this method"),
    (dict(nm="3:2"), "0 < N < M"),
    (dict(nm="two:four"), "whole numbers"),
    (dict(nm="2:5"), "does not divide"),
    (dict(), "exactly one of"),
    (dict(sparsity=0.5, nm="2:4"), "exactly one of"),
    (dict(nm="2:4", owl=True), "does not combine"),
])
def test_bad_sparsity_options(options, message):
    with pytest.raises(SecateurError, match=message):
        _run(method="wanda", **options)


def test_unknown_method():
    with pytest.raises(SecateurError, match="unknown method 'prunemore'.*wanda"):
        _run(method="prunemore", sparsity=0.5)
