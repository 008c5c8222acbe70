"""Knowledge distillation: the losses, that KD moves a student toward its teacher, bit-identical
resume, masks kept, pruned students of every kind, and clear errors before any training."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from secateur.config import ConfigError
from secateur.errors import SecateurError
from secateur.formats.loader import load
from secateur.jobs import checkpoint_dir, distill_job
from secateur.models.loading import Loaded
from secateur.recovery.distill import DistillConfig, distill
from secateur.recovery.kd_loss import (
    divergence,
    kd_loss,
    student_logp,
    teacher_targets,
)
from secateur.surgery.depth import remove_layers
from tests.recovery.test_recovery import sparsify, zero_positions
from tests.reload import reload_one
from tests.tiny_models import save_tiny


@pytest.fixture
def text(tmp_path):
    from secateur.data.sources import load_text

    path = tmp_path / "text.txt"
    path.write_text(load_text("wiki").joined()[:20000])
    return str(path)


@pytest.fixture
def teacher_dir(tmp_path):
    """A tiny llama whose head is scaled 5x: its next-token distributions are peaked enough
    that a student's KL to them is far from 0 (a random init is nearly uniform), and whose
    norm weights are random, so a pruned student's layers can be matched by their norms."""
    path = save_tiny("llama", tmp_path / "teacher")
    loaded = load(path)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(5)
        for name, p in loaded.model.named_parameters():
            if "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    loaded.model.save_pretrained(path)
    return path


def _copy(loaded: Loaded) -> Loaded:
    return copy.deepcopy(loaded)


def _depth_student(teacher: Loaded) -> Loaded:
    student = _copy(teacher)
    remove_layers(student.model, student.adapter, [1])
    return student


def _width_student(teacher: Loaded) -> Loaded:
    from secateur.surgery.width import rewrite_config, shrink_layer

    student = _copy(teacher)
    adapter = student.adapter
    for i in range(adapter.num_layers):
        shrink_layer(adapter, i, torch.tensor([False, True]), torch.arange(128) % 4 == 0)
    rewrite_config(student.model, adapter)
    return student


def _config(text: str, **kw) -> DistillConfig:
    base = dict(data=text, steps=6, seqlen=32, lr=3e-4, warmup_steps=1, heldout_windows=2,
                save_every=2, seed=0)
    base.update(kw)
    return DistillConfig(**base)


# -- losses ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("topk", [None, 5])
def test_kd_loss_is_zero_for_the_teacher_itself_and_positive_otherwise(kind, topk):
    gen = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(2, 7, 50, generator=gen)
    other = teacher + torch.randn(2, 7, 50, generator=gen)
    targets = teacher_targets(teacher, 2.0, topk)
    assert kd_loss(teacher, targets, kind, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(other, targets, kind, 2.0).item() > 1e-2


def test_kd_loss_matches_torch_kl_and_top_k_is_a_lower_bound():
    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(1, 5, 40, generator=gen), torch.randn(1, 5, 40, generator=gen)
    t_logp = torch.log_softmax(teacher, -1)
    s_logp = torch.log_softmax(student, -1)
    reference = torch.nn.functional.kl_div(s_logp, t_logp, log_target=True,
                                           reduction="none").sum(-1).mean()
    full = kd_loss(student, teacher_targets(teacher, 1.0), "forward_kl", 1.0)
    assert full.item() == pytest.approx(reference.item(), rel=1e-5)
    for k in (1, 8, 39):
        bucketed = kd_loss(student, teacher_targets(teacher, 1.0, k), "forward_kl", 1.0)
        assert 0 < bucketed.item() <= full.item() + 1e-6
    everything = kd_loss(student, teacher_targets(teacher, 1.0, 40), "forward_kl", 1.0)
    assert everything.item() == pytest.approx(full.item(), rel=1e-4)
    # the folded student distribution still sums to one
    folded = student_logp(student, 1.0, teacher_targets(teacher, 1.0, 8).index)
    assert torch.allclose(folded.exp().sum(-1), torch.ones(1, 5), atol=1e-5)
    assert divergence(t_logp, s_logp, "jsd").max().item() <= math.log(2) + 1e-6


# -- training -------------------------------------------------------------------------------
def test_kd_lowers_the_held_out_kl_of_a_depth_pruned_student(teacher_dir, text):
    teacher = load(teacher_dir)
    student = _depth_student(teacher)
    result = distill(student, teacher, _config(text, steps=20, hidden_weight=0.5),
                     progress=False)
    before, after = result.evals[0]["heldout_kl"], result.evals[-1]["heldout_kl"]
    assert after < 0.7 * before, (before, after)
    assert result.extra["layer_map"] == [0, 2]
    assert result.extra["layer_map_from"] == "identical norm weights"
    assert student.model.config.num_hidden_layers == 2
    assert set(result.parts) == {"kd", "hidden"} and len(result.losses) == 20
    assert result.tokens == 20 * 32


@pytest.mark.usefixtures("one_thread")
def test_compiled_training_takes_the_same_steps(teacher_dir, text):
    """torch.compile changes how the forward runs, not what it computes: the same losses to
    float rounding, and the trained weights land in the model that is saved."""
    teacher = load(teacher_dir)
    runs = {}
    for compiled in (False, True):
        student = _depth_student(teacher)
        run = distill(student, teacher, _config(text, steps=2, train="full", compile=compiled),
                      progress=False)
        runs[compiled] = (run, student.model.state_dict())
    plain, compiled = runs[False][0], runs[True][0]
    assert plain.losses == pytest.approx(compiled.losses, rel=1e-4)
    for key, value in runs[False][1].items():
        assert torch.allclose(value, runs[True][1][key], atol=1e-5), key


def test_width_pruned_student_trains_with_lora_and_keeps_its_shapes(teacher_dir, text):
    teacher = load(teacher_dir)
    student = _width_student(teacher)
    shapes = {n: p.shape for n, p in student.model.named_parameters()}
    result = distill(student, teacher, _config(text, steps=10, train="lora", lr=3e-3,
                                               hidden_weight=0.5, ce_weight=0.1),
                     progress=False)
    assert result.evals[-1]["heldout_kl"] < result.evals[0]["heldout_kl"]
    assert result.extra["layer_map"] == [0, 1, 2]
    assert {n: p.shape for n, p in student.model.named_parameters()} == shapes
    assert not any("lora" in n for n, _ in student.model.named_parameters())


@pytest.mark.parametrize("kw", [{}, {"train": "lora", "lr": 3e-3, "teacher_cache": "topk",
                                     "topk": 8}])
def test_resume_after_an_interrupt_is_bit_identical(teacher_dir, text, tmp_path, kw):
    teacher = load(teacher_dir)
    student = _depth_student(teacher)
    whole = _copy(student)
    distill(whole, teacher, _config(text, **kw), checkpoint=tmp_path / "a", progress=False)

    def interrupt(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    cut = _copy(student)
    with pytest.raises(KeyboardInterrupt):
        distill(cut, teacher, _config(text, **kw), checkpoint=tmp_path / "b", progress=False,
                on_step=interrupt)
    resumed = _copy(student)  # a fresh process would reload the student from disk
    result = distill(resumed, teacher, _config(text, **kw), checkpoint=tmp_path / "b",
                     progress=False)
    assert result.resumed_from == 2 and len(result.losses) == 6
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_refuses_a_checkpoint_of_other_settings(teacher_dir, text, tmp_path):
    teacher = load(teacher_dir)

    def interrupt(step: int, loss: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(_depth_student(teacher), teacher, _config(text, save_every=1),
                checkpoint=tmp_path, progress=False, on_step=interrupt)
    with pytest.raises(SecateurError, match="other settings"):
        distill(_depth_student(teacher), teacher, _config(text, save_every=1, loss="jsd"),
                checkpoint=tmp_path, progress=False)


def test_a_setting_added_later_at_its_default_keeps_checkpoints_resumable(text):
    """A checkpoint from before a release that added `newer` (default: old behaviour) still
    matches; setting it, or changing any existing setting, does not."""

    class Later(DistillConfig):
        newer: int = 3

    before = _config(text, lr=1e-3).fingerprint({"mode": "full"})
    assert Later(**_config(text, lr=1e-3).model_dump()).fingerprint({"mode": "full"}) == before
    assert Later(**_config(text, lr=1e-3).model_dump(), newer=4).fingerprint(
        {"mode": "full"}) != before
    assert _config(text, lr=2e-3).fingerprint({"mode": "full"}) != before
    assert _config(text, lr=1e-3, save_every=7).fingerprint({"mode": "full"}) == before


@pytest.mark.parametrize("train", ["full", "lora"])
def test_a_sparse_student_keeps_its_zeros(teacher_dir, text, train):
    teacher = load(teacher_dir)
    student = _copy(teacher)
    sparsify(student.model, student.adapter)
    zeros = zero_positions(student.model)
    before = {n: p.clone() for n, p in student.model.named_parameters()}
    distill(student, teacher, _config(text, steps=3, train=train, lr=3e-3), progress=False)
    after = zero_positions(student.model)
    for name, z in zeros.items():
        assert torch.equal(after[name], z), name
    moved = [n for n, p in student.model.named_parameters() if not torch.equal(before[n], p)]
    assert any("q_proj" in n for n in moved)

    # the same training without masks fills them in: the check above can fail
    loose = _copy(teacher)
    sparsify(loose.model, loose.adapter)
    distill(loose, teacher, _config(text, steps=3, train=train, lr=3e-3, keep_masks=False),
            progress=False)
    assert sum(int(z.sum()) for z in zero_positions(loose.model).values()) < \
        0.5 * sum(int(z.sum()) for z in zeros.values())


@pytest.mark.parametrize("mode", ["teacher_generated", "on_policy"])
def test_generated_data_trains_on_completions_only(teacher_dir, text, mode):
    from secateur.recovery import distill as distill_module

    teacher = load(teacher_dir)
    student = _depth_student(teacher)
    seen: list[torch.Tensor] = []
    real = distill_module.Distillation._ids

    def spy(self, model, index, sample):
        ids = real(self, model, index, sample)
        seen.append((ids.clone(), self.data.train[index].clone()))
        return ids

    config = _config(text, steps=3, data_mode=mode, prompt_tokens=8, ce_weight=0.5)
    try:
        distill_module.Distillation._ids = spy
        result = distill(student, teacher, config, progress=False)
    finally:
        distill_module.Distillation._ids = real
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    for ids, window in seen:
        assert ids.shape == window.shape
        assert torch.equal(ids[:, :8], window[:, :8])  # the prompt is the text
        assert not torch.equal(ids[:, 8:], window[:, 8:])  # the rest was generated


# -- bad input ------------------------------------------------------------------------------
def _untouched(student: Loaded, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[n], p) for n, p in student.model.named_parameters())


def test_teacher_with_another_vocabulary_fails_before_training(teacher_dir, text, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import byte_tokenizer, configs

    cfg = configs()["llama"]
    cfg.vocab_size = 300
    other = AutoModelForCausalLM.from_config(cfg)
    other.save_pretrained(tmp_path / "other")
    byte_tokenizer().save_pretrained(tmp_path / "other")
    student = _depth_student(load(teacher_dir))
    before = {n: p.clone() for n, p in student.model.named_parameters()}
    with pytest.raises(SecateurError, match="vocabulary differs") as err:
        distill(student, load(tmp_path / "other"), _config(text), progress=False)
    assert "\n" not in str(err.value) and _untouched(student, before)


def test_teacher_with_another_tokenizer_fails_before_training(teacher_dir, text):
    teacher = load(teacher_dir)
    student = _depth_student(teacher)
    student.tokenizer = copy.deepcopy(teacher.tokenizer)
    student.tokenizer.add_tokens(["<extra>"])
    with pytest.raises(SecateurError, match="different tokenizers"):
        distill(student, teacher, _config(text), progress=False)


def test_text_shorter_than_one_sequence_fails_before_training(teacher_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    teacher = load(teacher_dir)
    student = _depth_student(teacher)
    before = {n: p.clone() for n, p in student.model.named_parameters()}
    with pytest.raises(SecateurError, match="fewer than one window") as err:
        distill(student, teacher, _config(str(short)), progress=False)
    assert "\n" not in str(err.value) and _untouched(student, before)


def test_student_not_smaller_than_its_teacher_is_a_warning(teacher_dir, text):
    teacher = load(teacher_dir)
    with pytest.warns(UserWarning, match="not smaller than the teacher"):
        distill(_copy(teacher), teacher, _config(text, steps=1), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distill(_depth_student(teacher), teacher, _config(text, steps=1), progress=False)
    with pytest.raises(SecateurError, match="the student itself"):
        distill(teacher, teacher, _config(text, steps=1), progress=False)


@pytest.mark.parametrize("kw,message", [
    ({"steps": 0}, "DistillConfig.steps"),
    ({"temperature": 0}, "DistillConfig.temperature"),
    ({"loss": "kl"}, "DistillConfig.loss"),
    ({"kd_weight": 0}, "nothing to train on"),
    ({"data_mode": "on_policy", "teacher_cache": "topk"}, "never repeats"),
    ({"data_mode": "teacher_generated", "prompt_tokens": 256}, "shorter than seqlen"),
    ({"hidden_weight": 1.0, "teacher_cache": "full"}, "hidden states"),
])
def test_bad_settings_are_one_line_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message) as err:
        DistillConfig(**kw)
    assert "\n" not in str(err.value)


# -- jobs and registry ------------------------------------------------------------------------
@pytest.mark.reload
def test_distill_job_saves_a_smaller_model_that_reloads_without_secateur(teacher_dir, text,
                                                                           tmp_path):
    from transformers import AutoModelForCausalLM

    from secateur.jobs import EvalSpec

    teacher = load(teacher_dir)
    student = _depth_student(teacher)
    student.model.save_pretrained(tmp_path / "student")
    student.tokenizer.save_pretrained(tmp_path / "student")
    result = distill_job(str(tmp_path / "student"), str(teacher_dir), tmp_path / "out",
                         _config(text, steps=8), EvalSpec(text, 32, 4),
                         tmp_path / "r.json", progress=False)
    # random tiny models: the pruned student need not be worse than its teacher, so only
    # that each perplexity is there (the gap share needs a real gap)
    assert all(math.isfinite(x) for x in (result.teacher_perplexity, result.perplexity_before,
                                          result.perplexity))
    evals = result.training.evals
    assert evals[-1]["heldout_kl"] < evals[0]["heldout_kl"]
    assert result.training.settings["method"] == "distill"
    assert not checkpoint_dir(tmp_path / "out", "distill").exists()
    assert (tmp_path / "r.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.num_hidden_layers == 2
    assert sum(p.numel() for p in reloaded.parameters()) < \
        sum(p.numel() for p in teacher.model.parameters())
    got = reload_one(tmp_path / "out", [[1, 2, 3, 4, 5, 6]], tmp_path)  # forward + generate
    assert got["cls"] == "LlamaForCausalLM"


def test_distill_is_a_registered_recovery_step(teacher_dir, text):
    from secateur.api import recover
    from secateur.registry import make_config

    config = make_config({"method": "distill", "data": text, "steps": 2, "seqlen": 32},
                         kind="recover")
    assert isinstance(config, DistillConfig)
    teacher = load(teacher_dir)
    student = _depth_student(teacher)
    step = recover(student, config, teacher=lambda: teacher, progress=False)
    assert step.summary["steps"] == 2 and step.summary["mode"] == "full"
    with pytest.raises(SecateurError, match="needs a teacher"):
        recover(_depth_student(teacher), config, progress=False)


def test_distill_cli(teacher_dir, text, tmp_path):
    from typer.testing import CliRunner

    from secateur.cli import app

    student = _depth_student(load(teacher_dir))
    student.model.save_pretrained(tmp_path / "student")
    student.tokenizer.save_pretrained(tmp_path / "student")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["distill", str(tmp_path / "student"), "--teacher",
                                   str(teacher_dir), "--data", text, "--steps", "2",
                                   "--seqlen", "32", "--loss", "jsd", "--eval", "none",
                                   "--out", str(out), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file()
    import json

    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["distill"]["settings"]["loss"] == "jsd" and saved["distill"]["steps"] == 2
