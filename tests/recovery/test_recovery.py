"""LoRA recovery: trains, merges, saves, resumes bit-identically, keeps masks, lowers perplexity."""

from __future__ import annotations

import pytest
import torch

from secateur.config import ConfigError
from secateur.errors import SecateurError
from secateur.jobs import checkpoint_dir, recover_job
from secateur.recovery.lora import LoRAConfig, train_lora


@pytest.fixture
def text(tmp_path):
    """20k characters of real text: enough windows, and fast to tokenize byte by byte."""
    from secateur.data.sources import load_text

    path = tmp_path / "text.txt"
    path.write_text(load_text("wiki").joined()[:20000])
    return str(path)


def _config(text: str, **kw) -> LoRAConfig:
    base = dict(data=text, steps=6, seqlen=32, lr=5e-3, warmup_steps=1, save_every=2, rank=4,
                seed=0, heldout_windows=2)
    base.update(kw)
    return LoRAConfig(**base)


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def sparsify(model, adapter, sparsity: float = 0.5) -> None:
    """Magnitude-prune every decoder projection per row, as the sparsity methods leave it."""
    with torch.no_grad():
        for layer in adapter.layers:
            for proj in adapter.linears(layer).values():
                w = proj.weight
                k = int(w.shape[1] * sparsity)
                idx = w.abs().argsort(dim=1)[:, :k]
                w.scatter_(1, idx, 0.0)


def zero_positions(model) -> dict[str, torch.Tensor]:
    return {n: (p == 0) for n, p in model.named_parameters() if p.dim() == 2 and "layers" in n}


def test_lora_trains_merges_and_saves(tiny_dir, tmp_path, text):
    src = tiny_dir("llama")
    result = recover_job(str(src), tmp_path / "out", _config(text, steps=12), progress=False)
    run = result.training
    assert run.steps == 12 and run.resumed_from == 0 and run.mode == "lora"
    assert run.tokens == 12 * 32 and run.settings["method"] == "lora"
    losses = run.losses
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    before_ppl, after_ppl = run.evals[0]["heldout_ppl"], run.evals[-1]["heldout_ppl"]
    assert after_ppl < before_ppl
    before, after = _weights(src), _weights(tmp_path / "out")
    assert set(after) == set(before)  # merged: no lora_A/lora_B tensors left
    changed = [k for k in before if "q_proj" in k and not torch.equal(before[k], after[k])]
    assert changed
    assert not checkpoint_dir(tmp_path / "out", "lora").exists()


def test_lora_resumes_bit_identically_from_its_last_checkpoint(tiny_dir, tmp_path, text):
    src = str(tiny_dir("llama"))
    recover_job(src, tmp_path / "whole", _config(text), progress=False)

    def interrupt(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover_job(src, tmp_path / "cut", _config(text), progress=False, on_step=interrupt)
    assert [p.name for p in (tmp_path / "cut").iterdir()] == [".secateur-work"]  # no output
    assert (checkpoint_dir(tmp_path / "cut", "lora") / "state.safetensors").is_file()
    with pytest.raises(SecateurError, match="other settings"):
        recover_job(src, tmp_path / "cut", _config(text, lr=1e-3), progress=False)
    result = recover_job(src, tmp_path / "cut", _config(text), progress=False)
    assert result.training.resumed_from == 2
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_lora_keeps_the_zeros_of_a_sparse_model(tiny_dir, text):
    from secateur.formats.loader import load

    loaded = load(tiny_dir("llama"))
    sparsify(loaded.model, loaded.adapter)
    zeros = zero_positions(loaded.model)
    assert sum(int(z.sum()) for z in zeros.values()) > 0
    run = train_lora(loaded, _config(text, steps=3), progress=False)
    assert run.masks["zeros_kept"] == sum(int(z.sum()) for z in zeros.values())
    after = zero_positions(loaded.model)
    for name, z in zeros.items():
        assert torch.equal(after[name], z), name

    # without the masks the dense LoRA delta fills them: the test above can fail
    again = load(tiny_dir("llama"))
    sparsify(again.model, again.adapter)
    train_lora(again, _config(text, steps=3, keep_masks=False), progress=False)
    filled = zero_positions(again.model)
    assert sum(int(z.sum()) for z in filled.values()) < 0.01 * sum(int(z.sum())
                                                                   for z in zeros.values())


def test_lora_keeps_per_layer_width_class(tiny_dir, tmp_path, text):
    from secateur.api import CalibrationConfig, prune
    from secateur.formats.hf import save_model
    from secateur.formats.loader import load
    from secateur.methods import LLMPrunerConfig

    loaded = load(tiny_dir("llama"))
    prune(loaded, LLMPrunerConfig(ratio=0.3, importance="l2", allocation="importance"),
          CalibrationConfig(text, 2, 32), progress=False)
    save_model(loaded.model, loaded.tokenizer, tmp_path / "pruned")
    recover_job(str(tmp_path / "pruned"), tmp_path / "out", _config(text, steps=2),
                progress=False)
    again = load(tmp_path / "out")
    assert again.model.config.model_type == "secateur"  # secateur's generic pruned class
    assert (tmp_path / "out" / "modeling_secateur_flex.py").is_file()


def test_lora_is_a_registered_recovery_step(tiny_dir, text):
    from secateur.api import recover
    from secateur.formats.loader import load
    from secateur.registry import make_config

    config = make_config({"method": "lora", "data": text, "steps": 2, "seqlen": 32},
                         kind="recover")
    assert isinstance(config, LoRAConfig)
    loaded = load(tiny_dir("llama"))
    before = {n: p.clone() for n, p in loaded.model.named_parameters()}
    step = recover(loaded, config, progress=False)
    assert step.summary["steps"] == 2 and step.summary["tokens"] == 64
    assert any(not torch.equal(before[n], p) for n, p in loaded.model.named_parameters())


@pytest.mark.parametrize("kw,field", [({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"),
                                      ({"dropout": 1.0}, "dropout"), ({"rank": 0}, "rank"),
                                      ({"seqlen": 1}, "seqlen"), ({"sparsity": 0.5}, "sparsity")])
def test_bad_lora_settings_are_one_line_config_errors(kw, field):
    with pytest.raises(ConfigError, match=rf"LoRAConfig\.{field}") as err:
        LoRAConfig(**kw)
    assert "\n" not in str(err.value)


def test_text_shorter_than_one_window_fails_before_training(tiny_dir, tmp_path):
    from secateur.formats.loader import load

    short = tmp_path / "short.txt"
    short.write_text("too short to fill one window")
    loaded = load(tiny_dir("llama"))
    with pytest.raises(SecateurError, match="fewer than one window") as err:
        train_lora(loaded, LoRAConfig(data=str(short), seqlen=64, steps=1), progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_lora_lowers_perplexity_of_pruned_smollm2(smollm2_copy):
    from secateur.api import CalibrationConfig, prune
    from secateur.methods import LLMPrunerConfig
    from tests.methods.test_structured import _wiki_ppl

    loaded = smollm2_copy
    prune(loaded, LLMPrunerConfig(ratio=0.2, importance="l2"),
          CalibrationConfig("c4-sample", 2, 64), progress=False)
    before = _wiki_ppl(loaded)
    train_lora(loaded, LoRAConfig(steps=12, seqlen=128, lr=5e-4, warmup_steps=2,
                                  heldout_windows=0), progress=False)
    after = _wiki_ppl(loaded)
    assert after < 0.8 * before, (before, after)


def test_recover_cli(tiny_dir, tmp_path, text):
    from typer.testing import CliRunner

    from secateur.cli import app

    src = str(tiny_dir("llama"))
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["recover", src, "--lora", "--data", text, "--steps", "2",
                              "--seqlen", "32", "--eval", "none", "--out", str(out), "--json",
                              str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file() and (tmp_path / "r.json").is_file()
