import pytest
import torch

import secateur.methods.gptq  # noqa: F401  (registers gptq)
import secateur.methods.rtn  # noqa: F401  (registers rtn)
from secateur.api import CalibrationConfig, prune, quantize
from secateur.config import ConfigError
from secateur.errors import SecateurError
from secateur.methods import SparseGPTConfig, WandaConfig
from secateur.methods.gptq import GPTQ, GPTQConfig
from secateur.methods.rtn import RTNConfig
from secateur.methods.sparsegpt import sparsegpt_prune, sparsegpt_prune_quantize
from secateur.models import adapter_for
from secateur.models.mask import kept_mask, set_kept_mask
from secateur.quant.gptq import gptq_quantize, output_error
from secateur.quant.grid import Grid, QuantGridConfig, find_params, rtn
from secateur.quant.grid import quantize as grid_quantize
from secateur.quant.state import QuantState, quant_state, set_quant_state
from tests.tiny_models import tiny_loaded, tiny_model

CALIB = CalibrationConfig("c4-sample", 4, 64, 0)


def _projections(loaded):
    return {(i, name): p for i, layer in enumerate(loaded.adapter.layers)
            for name, p in loaded.adapter.linears(layer).items()}


def _problem(out=48, inp=128, tokens=1500, seed=0):
    """A weight and the Hessian of correlated inputs with one dead input column."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, inp, generator=g) @ torch.randn(inp, inp, generator=g) * 0.1
    x[:, 5] = 0
    w = torch.randn(out, inp, generator=g)
    return w, x.t() @ x, x


def _reference_quantize(w, bits, sym):
    """The GPTQ reference's Quantizer (perchannel, weight=True) then quantize(), written out."""
    maxq = 2**bits - 1
    xmin = torch.minimum(w.min(1).values, torch.zeros(w.shape[0]))
    xmax = torch.maximum(w.max(1).values, torch.zeros(w.shape[0]))
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(both0, -1.0, xmin), torch.where(both0, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).unsqueeze(1)
    zero = (torch.full_like(scale, (maxq + 1) / 2) if sym
            else torch.round(-xmin / scale[:, 0]).unsqueeze(1))
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero), scale, zero


# -- the grid -------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 16, 32])
def test_grid_reproduces_reference_quantizer(bits, sym, group_size):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(bits))
    w[3] = w[3].abs()  # a row with no negative weight (the reference keeps xmin = 0)
    w[4] = 0  # an all-zero row gets the range [-1, 1]
    q, state = rtn(w, Grid(bits, sym), group_size)
    size = 64 if group_size == -1 else group_size
    for g, start in enumerate(range(0, 64, size)):
        ref, scale, zero = _reference_quantize(w[:, start:start + size], bits, sym)
        assert torch.equal(q[:, start:start + size], ref)
        assert torch.equal(state.scale[:, g:g + 1], scale)
        assert torch.equal(state.zero[:, g:g + 1], zero)
    if sym:
        assert (state.zero == 2 ** (bits - 1)).all()
    codes = state.codes(q)
    assert codes.max() <= 2**bits - 1
    assert torch.equal(state.dequantize(codes), q)


def test_rtn_error_is_at_most_half_a_step_and_zero_stays_zero():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    w[:, ::7] = 0
    q, state = rtn(w, Grid(4, False), 32)
    step = state.scale[:, torch.arange(128) // 32]
    assert ((q - w).abs() <= step / 2 + 1e-6).all()
    assert (q[:, ::7] == 0).all()
    assert state.scale.shape == (32, 4) and state.g_idx is None


def test_mse_grid_search_lowers_the_rounding_error():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(2)) ** 3  # heavy tails
    plain = rtn(w, Grid(3, False), -1)[0]
    searched = rtn(w, Grid(3, False, mse=True), -1)[0]
    objective = {n: ((q - w).abs() ** 2.4).sum(1) for n, q in (("plain", plain),
                                                               ("searched", searched))}
    assert (objective["searched"] <= objective["plain"] + 1e-4).all()  # p = 1 is a candidate
    assert objective["searched"].sum() < 0.9 * objective["plain"].sum()


def test_grid_quantize_matches_find_params():
    w = torch.randn(8, 40)
    scale, zero = find_params(w, Grid(4, True))
    assert torch.equal(grid_quantize(w, scale, zero, 15), rtn(w, Grid(4, True), -1)[0])


# -- the GPTQ solve -------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size", [(4, -1), (4, 32), (3, 32), (2, 64)])
def test_gptq_reconstructs_better_than_rtn(bits, group_size):
    w, h, x = _problem()
    grid = Grid(bits, False)
    q_rtn = rtn(w, grid, group_size)[0]
    q_gptq, _ = gptq_quantize(w, h, grid, group_size)
    err = {n: ((w - q) @ x.t()).norm().item() for n, q in (("rtn", q_rtn), ("gptq", q_gptq))}
    assert err["gptq"] < 0.8 * err["rtn"]
    assert output_error(w, q_gptq, h) == pytest.approx(err["gptq"] / (w @ x.t()).norm().item(),
                                                       rel=1e-3)


def test_gptq_dead_column_is_zero_and_finite():
    w, h, _ = _problem()
    q, state = gptq_quantize(w, h, Grid(4, True), 32, act_order=True)
    assert torch.isfinite(q).all()
    assert (q[:, 5] == 0).all()


def test_gptq_lazy_blocks_solve_as_well_as_small_ones():
    """Lazy block updates are the same solve; which code a near-tie takes differs with float
    rounding and a flip propagates, so compare the error reached, not the codes."""
    w, h, _ = _problem()
    for group_size in (-1, 64):
        errors = [output_error(w, gptq_quantize(w, h, Grid(4, False), group_size,
                                                blocksize=b)[0], h) for b in (128, 16, 1)]
        assert max(errors) < 1.05 * min(errors)
        assert max(errors) < 0.8 * output_error(w, rtn(w, Grid(4, False), group_size)[0], h)


def test_act_order_groups_record_g_idx_that_reproduces_the_weight():
    w, h, _ = _problem()
    q, state = gptq_quantize(w, h, Grid(4, True), 32, act_order=True)
    assert state.actorder == "group" and state.g_idx is not None
    g = state.g_idx.long()
    assert torch.equal(torch.bincount(g), torch.full((4,), 32))
    assert not torch.equal(g, torch.arange(128) // 32)  # really permuted
    # groups follow decreasing H_jj: group 0 holds the 32 largest diagonal entries
    order = torch.argsort(torch.diag(h), descending=True, stable=True)
    assert set(order[:32].tolist()) == set(torch.nonzero(g == 0).flatten().tolist())
    assert torch.equal(state.dequantize(state.codes(q)), q)


def test_static_groups_keep_contiguous_groups_under_act_order():
    w, h, _ = _problem()
    q, state = gptq_quantize(w, h, Grid(4, False), 32, act_order=True, static_groups=True)
    assert state.g_idx is None and state.actorder == "weight"
    assert torch.equal(state.dequantize(state.codes(q)), q)
    # the static grid is the one RTN finds on the original weights (dead column zeroed)
    w0 = w.clone()
    w0[:, 5] = 0
    assert torch.equal(state.scale, rtn(w0, Grid(4, False), 32)[1].scale)
    plain, _ = gptq_quantize(w, h, Grid(4, False), 32)
    assert not torch.equal(plain, q)


def test_gptq_keeps_a_mask_exactly_zero():
    w, h, x = _problem()
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    w = w.masked_fill(mask, 0.0)
    for kw in ({}, {"group_size": 32}, {"group_size": 32, "act_order": True}):
        q, state = gptq_quantize(w, h, Grid(4, True), mask=mask, **kw)
        assert (q[mask] == 0).all()
        assert torch.equal(state.dequantize(state.codes(q)), q)
    # without the mask the solve moves pruned weights off zero
    q_free, _ = gptq_quantize(w, h, Grid(4, True))
    assert (q_free[mask] != 0).float().mean() > 0.02


def test_singular_hessian_gets_more_dampening():
    w, h, _ = _problem(tokens=1500)
    h = h - 0.05 * torch.diag(h).mean() * torch.eye(h.shape[0])  # indefinite
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(h + 0.01 * torch.diag(h).mean() * torch.eye(h.shape[0]))
    q, _ = gptq_quantize(w, h, Grid(4, True), 32)
    assert torch.isfinite(q).all()


# -- joint SparseGPT + quantization ---------------------------------------------------------

def test_joint_sparsegpt_quantize_is_sparse_and_on_the_grid():
    w, h, _ = _problem(inp=256)
    for group_size in (-1, 64):
        q, state = sparsegpt_prune_quantize(w, h, 0.5, None, Grid(4, False), group_size)
        zeros = (q == 0).float().mean().item()
        assert 0.5 <= zeros < 0.53  # the mask, plus a few kept weights rounded to 0
        assert torch.equal(state.dequantize(state.codes(q)), q)
    q, state = sparsegpt_prune_quantize(w, h, None, (2, 4), Grid(3, True), 32)
    assert ((q.reshape(48, -1, 4) == 0).sum(-1) >= 2).all()
    assert torch.equal(state.dequantize(state.codes(q)), q)


def test_joint_solve_beats_prune_then_round():
    w, h, x = _problem(inp=256)
    joint, _ = sparsegpt_prune_quantize(w, h, 0.5, None, Grid(3, False), -1)
    pruned = sparsegpt_prune(w, h, 0.5, None)
    rounded, _ = rtn(pruned, Grid(3, False), -1)
    assert ((w - joint) @ x.t()).norm() < ((w - rounded) @ x.t()).norm()


# -- the methods through the API ------------------------------------------------------------

def test_wanda_then_gptq_keeps_every_pruned_weight_zero():
    loaded = tiny_loaded()
    prune(loaded, WandaConfig(sparsity=0.5), data=CALIB, progress=False)
    before = {k: p.weight.clone() for k, p in _projections(loaded).items()}
    run = quantize(loaded, GPTQConfig(bits=4, group_size=32, act_order=True), data=CALIB,
                   progress=False)
    for k, p in _projections(loaded).items():
        pruned = before[k] == 0
        assert (p.weight[pruned] == 0).all(), k
        # new zeros only where a kept weight rounds to the zero point
        assert (p.weight == 0).float().mean() < 0.51
        state = quant_state(p.module)
        assert torch.equal(state.dequantize(state.codes(p.weight)), p.weight), k
        assert not torch.equal(p.weight, before[k])
    assert run.kind == "quantize" and run.config["act_order"] is True
    m = run.layers[0]["matrices"]["self_attn.q_proj"]
    assert 0 < m["output_error"] < m["weight_error"] < 0.3
    assert 0 < run.layers[0]["relative_error"] < 0.1


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("config", [GPTQConfig(bits=3, group_size=16, symmetric=False),
                                    RTNConfig(bits=4, group_size=-1)])
def test_quantize_leaves_every_linear_on_its_grid(family, config):
    loaded = tiny_loaded(family)
    run = quantize(loaded, config, data=CALIB, progress=False)
    for k, p in _projections(loaded).items():
        state = quant_state(p.module)
        assert isinstance(state, QuantState) and state.bits == config.bits, k
        codes = state.codes(p.weight)
        assert codes.max() <= 2**config.bits - 1
        assert torch.equal(state.dequantize(codes), p.weight), k
        groups = 1 if config.group_size == -1 else p.in_features // config.group_size
        assert state.scale.shape == (p.out_features, groups)
    assert run.summary["bits"] == config.bits
    assert all(m["weight_error"] > 0 for r in run.layers for m in r["matrices"].values())


def test_gptq_beats_rtn_on_the_layer_outputs():
    errors = {}
    for config in (RTNConfig(bits=3, group_size=32, error_report=True),
                   GPTQConfig(bits=3, group_size=32)):
        run = quantize(tiny_loaded(), config, data=CalibrationConfig("c4-sample", 8, 64, 0),
                       progress=False)
        errors[config.method] = sum(r["relative_error"] for r in run.layers)
    assert errors["gptq"] < errors["rtn"]


def test_rtn_runs_no_layer_unless_asked_for_the_error_report():
    """Rounding needs the weights only: no layer forward by default, the same weights as the
    run that reports each layer's output error."""
    calls: list[int] = []
    fast, reported = tiny_loaded(), tiny_loaded()
    for layer in fast.adapter.layers:
        layer.register_forward_hook(lambda *a: calls.append(1))
    runs = {name: quantize(loaded, RTNConfig(bits=4, group_size=32, error_report=report),
                           data=CALIB, progress=False)
            for name, loaded, report in (("fast", fast, False), ("reported", reported, True))}
    assert calls == []
    a, b = _projections(fast), _projections(reported)
    assert all(torch.equal(a[k].weight, b[k].weight) for k in a)
    assert all(layer["relative_error"] is None for layer in runs["fast"].layers)
    assert all(0 < layer["relative_error"] < 0.5 for layer in runs["reported"].layers)
    assert all(m["weight_error"] > 0 for r in runs["fast"].layers for m in r["matrices"].values())


def test_joint_sparsegpt_through_the_api():
    loaded = tiny_loaded()
    run = prune(loaded, SparseGPTConfig(sparsity=0.5, quantize={"bits": 4, "group_size": 32}),
                data=CALIB, progress=False)
    for k, p in _projections(loaded).items():
        assert 0.5 <= (p.weight == 0).float().mean() < 0.53, k
        state = quant_state(p.module)
        assert state.bits == 4 and state.group_size == 32
        assert torch.equal(state.dequantize(state.codes(p.weight)), p.weight)
    assert run.summary["quantize"]["bits"] == 4
    assert run.config["quantize"]["group_size"] == 32
    assert "output_error" in run.layers[0]["matrices"]["mlp.up_proj"]


def test_sparsegpt_without_quantize_sets_no_grid():
    loaded = tiny_loaded()
    prune(loaded, SparseGPTConfig(sparsity=0.5), data=CALIB, progress=False)
    assert all(quant_state(p.module) is None for p in _projections(loaded).values())


def test_same_settings_same_result():
    a, b = tiny_loaded(), tiny_loaded()
    for loaded in (a, b):
        quantize(loaded, GPTQConfig(bits=4, group_size=32, act_order=True), data=CALIB,
                 progress=False)
    assert all(torch.equal(p.weight, _projections(b)[k].weight)
               for k, p in _projections(a).items())


# -- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [{"bits": 1}, {"bits": 9}, {"group_size": 0},
                                    {"group_size": -2}, {"static_groups": True, "group_size": -1},
                                    {"act_order": "yes please"}, {"sparsity": 0.5}])
def test_bad_settings_are_one_line_errors(fields):
    with pytest.raises(ConfigError) as err:
        GPTQConfig(**fields)
    assert "\n" not in str(err.value) and "GPTQConfig" in str(err.value)


def test_bad_grid_inside_sparsegpt_is_refused():
    with pytest.raises(ConfigError, match="bits"):
        SparseGPTConfig(sparsity=0.5, quantize={"bits": 9})
    with pytest.raises(ConfigError):
        QuantGridConfig(bits=1)


def _one_line_refusal(loaded, config, match):
    before = {k: p.weight.clone() for k, p in _projections(loaded).items()}
    with pytest.raises(SecateurError, match=match) as err:
        if config.kind == "prune":
            prune(loaded, config, data=CALIB, progress=False)
        else:
            quantize(loaded, config, data=CALIB, progress=False)
    assert "\n" not in str(err.value)
    assert all(torch.equal(p.weight, before[k]) for k, p in _projections(loaded).items())


@pytest.mark.parametrize("config", [GPTQConfig(group_size=48), RTNConfig(group_size=48),
                                    SparseGPTConfig(sparsity=0.5, quantize={"group_size": 48})])
def test_group_size_must_divide_every_input_width(config):
    _one_line_refusal(tiny_loaded(), config, r"group_size 48 does not divide the input width 64 of "
                                         r"layers\.0\.self_attn\.q_proj.*e\.g\. 32")


@pytest.mark.parametrize("config", [GPTQConfig(group_size=32), RTNConfig(group_size=32),
                                    SparseGPTConfig(sparsity=0.5, quantize={"group_size": 32})])
def test_an_already_quantized_model_is_refused(config):
    loaded = tiny_loaded()
    proj = loaded.adapter.linears(loaded.adapter.layers[2])["mlp.down_proj"]
    set_quant_state(proj.module, rtn(proj.weight, Grid(4), 32)[1])
    _one_line_refusal(loaded, config, "already quantized")
    fresh = tiny_loaded()
    fresh.model.config.quantization_config = {"quant_method": "compressed-tensors"}
    _one_line_refusal(fresh, config, "already quantized")


GPTQ_QUANTIZE_MATRIX = GPTQ.quantize_matrix


def _hessians_used(loaded, config, monkeypatch):
    """Each projection's X^T X as GPTQ received it, and the same statistic recomputed from
    the finished (quantized) model's own inputs on the calibration windows."""
    from secateur.api import calibration_data

    names = {id(p.module): key for key, p in _projections(loaded).items()}
    used = {}
    real = GPTQ_QUANTIZE_MATRIX  # not a wrapper from an earlier call

    def record(self, proj, stats):
        used[names[id(proj.module)]] = stats["hessian"].sum.clone()
        return real(self, proj, stats)

    monkeypatch.setattr(GPTQ, "quantize_matrix", record)
    windows = calibration_data(loaded, CALIB)[0]
    quantize(loaded, config, data=CALIB, progress=False)
    final = {key: torch.zeros(p.in_features, p.in_features)
             for key, p in _projections(loaded).items()}

    def add(key, x):
        x = x.reshape(-1, x.shape[-1])
        final[key].addmm_(x.t(), x)  # returns nothing: a pre-hook's return replaces the input

    hooks = [p.module.register_forward_pre_hook(lambda m, a, key=key: add(key, a[0]))
             for key, p in _projections(loaded).items()]
    with torch.no_grad():
        for w in windows:
            loaded.model(w)
    for h in hooks:
        h.remove()
    return used, final


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_true_sequential_gptq_sees_each_group_after_the_groups_before_it(monkeypatch):
    """With true_sequential, every projection is solved on the inputs the quantized model
    really gives it (o after quantized q/k/v, down after quantized gate/up), as in the
    reference's --true-sequential; without it, o and down see the dense layer's inputs."""
    used, final = _hessians_used(tiny_loaded(), GPTQConfig(true_sequential=True, group_size=32),
                                 monkeypatch)
    # 3e-4 apart: the quantize step rounds the embeddings to float16 after the solve
    assert len(used) == len(final) == 3 * 7
    for key in final:
        assert _rel(used[key], final[key]) < 1e-3, key
    used, final = _hessians_used(tiny_loaded(), GPTQConfig(group_size=32), monkeypatch)
    for i in range(3):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            assert _rel(used[i, name], final[i, name]) < 1e-3  # the layer's input: the same
        for name in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert _rel(used[i, name], final[i, name]) > 1e-2, (i, name)  # 2-7% measured


def test_true_sequential_groups_follow_the_layer_calls():
    from secateur.engine.capture import capture_layer_inputs
    from secateur.engine.sequential import input_groups

    loaded = tiny_loaded()
    captured = capture_layer_inputs(loaded.model, loaded.adapter, [torch.arange(16)[None]])
    layer = loaded.adapter.layers[0]
    groups = input_groups(layer, loaded.adapter.linears(layer), captured.hidden[0],
                          captured.calls[0])
    assert [sorted(g) for g in groups] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_partial_groups_must_be_asked_for_and_cut_like_the_reference():
    """128 does not divide smollm2's 576-wide inputs: refused unless partial_groups is set,
    then each row's last group is the narrower remainder with its own grid."""
    from secateur.methods.rtn import RTN

    model = tiny_model("llama")  # input widths 64 and 128
    adapter = adapter_for(model)
    with pytest.raises(SecateurError, match="does not divide the input width 64.*partial_groups"):
        RTN(RTNConfig(bits=4, group_size=48)).prepare(model, adapter)
    RTN(RTNConfig(bits=4, group_size=48, partial_groups=True)).prepare(model, adapter)
    assert GPTQConfig(group_size=48, partial_groups=True).partial_groups

    w = torch.randn(8, 64)
    q, state = rtn(w, Grid(4, False), 48)
    assert state.scale.shape == (8, 2)  # columns 0-47 and 48-63
    scale, _ = find_params(w[:, 48:], Grid(4, False))
    assert torch.equal(state.scale[:, 1:], scale)
    assert torch.equal(q[:, :48], rtn(w[:, :48], Grid(4, False), 48)[0])
    g, gstate = gptq_quantize(w, torch.eye(64), Grid(4, False), 48)
    # with an identity Hessian GPTQ has nothing to compensate: it is RTN on the same groups
    assert torch.allclose(g, q, atol=1e-6) and gstate.scale.shape == (8, 2)


def test_grid_is_in_the_state_dict_and_survives_a_round_trip_and_a_deepcopy():
    import copy

    loaded = tiny_loaded()
    quantize(loaded, GPTQConfig(bits=3, group_size=16, act_order=True), data=CALIB,
             progress=False)
    layer = loaded.adapter.layers[0]
    q = layer.self_attn.q_proj
    state = layer.state_dict()
    for key in ("weight_scale", "weight_zero_point", "weight_g_idx"):
        assert f"self_attn.q_proj.{key}" in state
    assert not any(p is q.weight_scale for p in loaded.model.parameters())  # never trained
    twin = copy.deepcopy(layer)
    assert quant_state(twin.self_attn.q_proj).scheme == quant_state(q).scheme
    fresh = tiny_loaded().adapter.layers[0]
    for path, module in layer.named_modules():
        if (s := quant_state(module)) is not None:
            set_quant_state(fresh.get_submodule(path), QuantState(
                s.bits, s.group_size, s.symmetric, torch.zeros_like(s.scale),
                torch.zeros_like(s.zero), torch.zeros_like(s.g_idx), s.actorder))
        if kept_mask(module) is not None:  # the mask the quantize step recorded, too
            set_kept_mask(fresh.get_submodule(path), torch.zeros_like(module.weight,
                                                                      dtype=torch.bool))
    fresh.load_state_dict(state, strict=True)
    got, want = quant_state(fresh.self_attn.q_proj), quant_state(q)
    assert torch.equal(got.scale, want.scale) and torch.equal(got.g_idx, want.g_idx)
    assert torch.equal(got.dequantize(got.codes(fresh.self_attn.q_proj.weight)),
                       fresh.self_attn.q_proj.weight)
    assert torch.equal(kept_mask(fresh.self_attn.q_proj), kept_mask(q))


def test_a_dense_save_of_a_quantized_model_holds_no_grid_and_reloads_cleanly(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from secateur.formats.hf import save_model

    loaded = tiny_loaded()
    quantize(loaded, RTNConfig(bits=4, group_size=32), data=CALIB, progress=False)
    save_model(loaded.model, None, tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any("weight_scale" in k or "weight_zero_point" in k for k in keys)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
