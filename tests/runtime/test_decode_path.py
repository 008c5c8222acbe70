"""The one-token decode path gives the logits and tokens of each layer's own forward."""

from __future__ import annotations

import copy

import pytest
import torch

from secateur.bench.measure import cache_keyword
from secateur.runtime import apply_runtime, avx2, decode
from secateur.runtime.decode import install_decode_path, remove_decode_path
from tests.formats.test_packed import quantize_tiny
from tests.tiny_models import tiny_model

ATOL = 1e-4  # the same arithmetic in another summation order
PROMPT = torch.tensor([[256, 72, 101, 108, 108, 111, 44, 32]])


@pytest.fixture(params=["kernels", "torch"])
def glue(request, monkeypatch):
    """Each check runs on secateur's compiled helpers and on the torch-op fallback."""
    if request.param == "torch":
        monkeypatch.setattr(decode, "_glue", lambda x: None)
    elif avx2.kernels() is None:
        pytest.skip("no AVX2 kernels on this machine")
    return request.param


def with_and_without(model):
    fast = model
    slow = copy.deepcopy(model)
    assert remove_decode_path(slow) == len(model.model.layers)
    return fast, slow


def spy_steps(monkeypatch) -> list[int]:
    calls: list[int] = []
    step = decode.decode_step

    def counted(layout, *args):
        calls.append(layout.cache_index)
        return step(layout, *args)

    monkeypatch.setattr(decode, "decode_step", counted)
    return calls


@torch.no_grad()
def cached_logits(model, steps: int, prompt: torch.Tensor = PROMPT) -> torch.Tensor:
    key = cache_keyword(model)
    out = model(prompt, use_cache=True)
    cache, rows = getattr(out, key), []
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(nxt, use_cache=True, **{key: cache})
        rows.append(out.logits[:, -1])
        nxt = out.logits[:, -1:].argmax(-1)
    return torch.stack(rows, 1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_int4_decode_path_matches_the_layers_own_forward(family, glue, monkeypatch):
    if family == "mistral":  # prompt + new tokens outgrow the window after step 6
        model = apply_runtime(_mistral_window(14), "int4")
    else:
        model = apply_runtime(quantize_tiny(4, 32, symmetric=False, family=family), "int4")
    fast, slow = with_and_without(model)
    calls = spy_steps(monkeypatch)
    got, want = cached_logits(fast, 12), cached_logits(slow, 12)
    if family == "mistral":
        # transformers masks the keys out of the window, and a masked step takes the layer's
        # own forward: the path ran while the cache fit in the window, not after
        assert 0 < len(calls) < 12 * len(fast.model.layers)
    else:  # every step of every layer took the path
        assert len(calls) == 12 * len(fast.model.layers)
    assert (got - want).abs().max() < ATOL
    assert want.abs().max() > 1e-2  # real logits, not zeros on both sides
    same = fast.generate(PROMPT, max_new_tokens=10, do_sample=False)
    assert torch.equal(same, slow.generate(PROMPT, max_new_tokens=10, do_sample=False))


def _mistral_window(window: int):
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import configs

    torch.manual_seed(0)
    cfg = configs()["mistral"]
    cfg.sliding_window = window
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    from secateur.models import adapter_for
    from tests.formats.test_packed import rtn

    adapter = adapter_for(model)
    for layer in adapter.layers:
        for proj in adapter.linears(layer).values():
            rtn(proj.module, 4, 32, False, None, None)
    return model


def test_window_changes_the_result():
    """The Mistral case above is a real test: without the window the logits differ once the
    cache is longer than it."""
    short = apply_runtime(_mistral_window(14), "int4")
    long = apply_runtime(_mistral_window(4096), "int4")
    assert (cached_logits(short, 12) - cached_logits(long, 12)).abs().max() > 1e-3


def test_dense_model_takes_the_path_too(glue, monkeypatch):
    model = tiny_model("llama")
    assert install_decode_path(model) == 3
    fast, slow = with_and_without(model)
    calls = spy_steps(monkeypatch)
    assert (cached_logits(fast, 8) - cached_logits(slow, 8)).abs().max() < ATOL
    assert calls


def test_padded_batches_and_prompts_use_the_layers_own_forward(monkeypatch):
    model = tiny_model("llama")
    install_decode_path(model)
    fast, slow = with_and_without(model)
    calls = spy_steps(monkeypatch)
    ids = torch.cat([PROMPT, PROMPT.flip(1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: a real mask, which the path does not handle
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=257)
    got = fast.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got, slow.generate(ids, attention_mask=mask, **kw))
    assert not calls  # every step had a padding mask
    with torch.no_grad():
        fast(PROMPT)
    assert not calls  # a prompt of 8 tokens is not a decode step


def test_unbatched_cache_free_and_batched_decode(glue):
    model = tiny_model("qwen3")
    install_decode_path(model)
    fast, slow = with_and_without(model)
    ids = torch.cat([PROMPT, PROMPT.flip(1)])
    assert (cached_logits(fast, 5, ids) - cached_logits(slow, 5, ids)).abs().max() < ATOL
    with torch.no_grad():  # one token, no cache: attention over itself alone
        one = torch.tensor([[72]])
        assert (fast(one, use_cache=False).logits
                - slow(one, use_cache=False).logits).abs().max() < ATOL


def test_families_whose_math_differs_are_left_alone():
    assert install_decode_path(tiny_model("gemma3_text")) == 0  # (1 + w) norms, GELU
    assert install_decode_path(tiny_model("gpt2")) == 0
    assert install_decode_path(tiny_model("opt")) == 0


def test_deepcopy_rebinds_the_path_to_the_copy():
    model = tiny_model("llama")
    install_decode_path(model)
    twin = copy.deepcopy(model)
    layer = twin.model.layers[0]
    assert layer.forward.__self__ is layer
    layout = layer.__dict__[decode.LAYOUT_ATTR]
    assert layout.q is layer.self_attn.q_proj
    with torch.no_grad():
        twin.model.layers[0].self_attn.q_proj.weight.mul_(3)
    assert (cached_logits(twin, 3) - cached_logits(model, 3)).abs().max() > 1e-3
