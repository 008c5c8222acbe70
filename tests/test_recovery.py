"""LoRA recovery: trains, merges, saves, resumes from its checkpoint, lowers perplexity."""

from __future__ import annotations

import pytest
import torch

from secateur.errors import SecateurError
from secateur.recovery.lora import LoraSpec, checkpoint_dir, recover_job


def _spec(**kw) -> LoraSpec:
    base = dict(steps=6, seqlen=32, lr=5e-3, warmup_steps=1, save_every=2, rank=4, seed=0)
    base.update(kw)
    return LoraSpec(**base)


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_lora_trains_merges_and_saves(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    result = recover_job(str(src), tmp_path / "out", _spec(steps=12), progress=False)
    assert result["lora"]["steps"] == 12 and result["lora"]["resumed_from"] == 0
    losses = result["lora"]["losses"]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    before, after = _weights(src), _weights(tmp_path / "out")
    assert set(after) == set(before)  # merged: no lora_A/lora_B tensors left
    changed = [k for k in before if "q_proj" in k and not torch.equal(before[k], after[k])]
    assert changed
    assert not checkpoint_dir(tmp_path / "out").exists()


def test_lora_resumes_from_its_last_checkpoint(tiny_dir, tmp_path):
    src = str(tiny_dir("llama"))
    recover_job(src, tmp_path / "whole", _spec(), progress=False)

    def interrupt(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover_job(src, tmp_path / "cut", _spec(), progress=False, on_step=interrupt)
    assert not (tmp_path / "cut").exists()
    assert (checkpoint_dir(tmp_path / "cut") / "state.pt").is_file()
    with pytest.raises(SecateurError, match="other settings"):
        recover_job(src, tmp_path / "cut", _spec(lr=1e-3), progress=False)
    result = recover_job(src, tmp_path / "cut", _spec(), progress=False)
    assert result["lora"]["resumed_from"] == 2
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    for key in whole:
        assert torch.allclose(whole[key], resumed[key], atol=1e-6), key


def test_lora_keeps_per_layer_width_class(tiny_dir, tmp_path):
    from secateur.api import CalibrationSpec, prune
    from secateur.methods import PruneOptions
    from secateur.models.loading import load
    from secateur.surgery.save import save_model

    loaded = load(tiny_dir("llama"))
    prune(loaded, PruneOptions(method="llm-pruner", ratio=0.3, importance="l2",
                               extra={"allocation": "importance"}),
          CalibrationSpec("c4-sample", 2, 32, 0), progress=False)
    save_model(loaded.model, loaded.tokenizer, tmp_path / "pruned")
    recover_job(str(tmp_path / "pruned"), tmp_path / "out", _spec(steps=2), progress=False)
    again = load(tmp_path / "out")
    assert again.model.config.model_type == "secateur_llama"
    assert (tmp_path / "out" / "modeling_secateur.py").is_file()


@pytest.mark.parametrize("kw,message", [({"steps": 0}, "--steps"), ({"lr": 0.0}, "--lr"),
                                        ({"dropout": 1.0}, "dropout")])
def test_bad_lora_settings(tiny_dir, tmp_path, kw, message):
    with pytest.raises(SecateurError, match=message):
        recover_job(str(tiny_dir("llama")), tmp_path / "out", _spec(**kw), progress=False)


@pytest.mark.slow
def test_lora_lowers_perplexity_of_pruned_smollm2(smollm2):
    import copy

    from secateur.api import CalibrationSpec, prune
    from secateur.methods import PruneOptions
    from secateur.models import adapter_for
    from secateur.models.loading import Loaded
    from secateur.recovery.lora import train_lora
    from tests.test_structured import _wiki_ppl

    model = copy.deepcopy(smollm2.model)
    loaded = Loaded(model, smollm2.tokenizer, adapter_for(model), smollm2.name, smollm2.path)
    prune(loaded, PruneOptions(method="llm-pruner", ratio=0.2, importance="l2"),
          CalibrationSpec("c4-sample", 2, 64, 0), progress=False)
    before = _wiki_ppl(loaded)
    train_lora(loaded, LoraSpec(steps=12, seqlen=128, lr=5e-4, warmup_steps=2), progress=False)
    after = _wiki_ppl(loaded)
    assert after < 0.8 * before, (before, after)


def test_recover_cli(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from secateur.cli import app

    src = str(tiny_dir("llama"))
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["recover", src, "--lora", "--steps", "2", "--seqlen", "32",
                              "--eval", "none", "--out", str(out), "--json",
                              str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file() and (tmp_path / "r.json").is_file()
    res = runner.invoke(app, ["recover", src, "--out", str(tmp_path / "x")])
    assert isinstance(res.exception, SecateurError) and "--lora" in str(res.exception)
