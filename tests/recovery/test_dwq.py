"""DWQ: a quantized model's scales learnt from its unquantized teacher, codes frozen; ggml blocks
and compressed-tensors files stay exact, of the same types and size, and reload as before."""

from __future__ import annotations

import copy
import json

import gguf
import numpy as np
import pytest
import torch

from secateur.api import quantize, recover
from secateur.errors import SecateurError
from secateur.formats.loader import load
from secateur.methods.gguf import GGUFConfig
from secateur.methods.gptq import GPTQConfig
from secateur.models.base import adapter_for
from secateur.models.loading import Loaded
from secateur.quant.ggml import ggml_states, pack
from secateur.recovery.dwq import DWQConfig, dwq, frozen_codes
from tests.formats.test_export import bpe_tokenizer, tiny_llama
from tests.reload import reload_one

SHORT = dict(steps=40, seqlen=64, batch_size=4, lr=1e-3, warmup_steps=4, heldout_windows=4)


@pytest.fixture
def text(tmp_path):
    from secateur.data.sources import load_text

    path = tmp_path / "text.txt"
    path.write_text(load_text("wiki").joined()[:40000])
    return str(path)


def teacher_model() -> torch.nn.Module:
    """A tiny llama with K-type-sized FFN rows whose head is scaled 5x: peaked next-token
    distributions, so quantization moves the KL to the teacher well away from 0."""
    torch.set_num_threads(1)
    model = tiny_llama(0)
    with torch.no_grad():
        model.lm_head.weight.mul_(5)
    return model


def loaded(model: torch.nn.Module, name: str) -> Loaded:
    return Loaded(model, bpe_tokenizer(), adapter_for(model), name, "")


def calibration() -> list[torch.Tensor]:
    return [torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(i))
            for i in range(8)]


def held_out_kl(student: torch.nn.Module, teacher: torch.nn.Module) -> float:
    """Mean KL(teacher || student) per token on windows no step saw."""
    from secateur.recovery.kd_loss import kd_loss, teacher_targets

    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, 256, (4, 64), generator=g)
    with torch.no_grad():
        t = teacher(input_ids=ids).logits
        s = student(input_ids=ids).logits
    return float(kd_loss(s, teacher_targets(t, 1.0), "forward_kl", 1.0))


def export_gguf(model: torch.nn.Module, path, preset: str) -> dict:
    from secateur.formats.export import export_model

    return export_model(model, bpe_tokenizer(), "gguf", path, outtype=preset,
                        quantized=ggml_states(model), has_imatrix=True)


@pytest.mark.parametrize("preset", ["q4_0", "q4_1", "q4_k_m"])
def test_dwq_on_ggml_blocks_lowers_kl_keeps_codes_and_the_gguf_file(preset, text, tmp_path):
    teacher = teacher_model()
    student = copy.deepcopy(teacher)
    quantize(student, GGUFConfig(preset=preset, rounding="rtn"), calibration(), progress=False)
    codes = frozen_codes(student)
    before_kl = held_out_kl(student, teacher)
    before = export_gguf(student, tmp_path / "before.gguf", preset)
    result = dwq(loaded(student, "student"), loaded(teacher, "teacher"),
                 DWQConfig(data=text, **SHORT), progress=False)
    assert result.evals[-1]["heldout_kl"] < result.evals[0]["heldout_kl"]
    assert result.extra["heldout_after_projection"]["heldout_kl"] < result.evals[0]["heldout_kl"]
    assert held_out_kl(student, teacher) < before_kl
    after_codes = frozen_codes(student)
    assert codes.keys() == after_codes.keys() and len(codes) == 4 * 7
    assert all(torch.equal(codes[k], after_codes[k]) for k in codes)
    sd = student.state_dict()
    types = set()
    for name, state in ggml_states(student).items():
        kind = getattr(gguf.GGMLQuantizationType, state.type)
        assert np.array_equal(gguf.quants.dequantize(pack(state), kind), sd[name].numpy()), name
        types.add(state.type)
    if preset == "q4_k_m":
        assert {"Q4_K", "Q6_K"} <= types  # the K-types' fp16 factors were learnt too
    after = export_gguf(student, tmp_path / "after.gguf", preset)
    assert after["tensor_types"] == before["tensor_types"]
    assert (tmp_path / "after.gguf").stat().st_size == (tmp_path / "before.gguf").stat().st_size
    # the file holds the learnt blocks: llama.cpp's reader gets the weights in memory
    reader = gguf.GGUFReader(tmp_path / "after.gguf")
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert np.array_equal(gguf.quants.dequantize(down.data, down.tensor_type),
                          sd["model.layers.0.mlp.down_proj.weight"].numpy())


@pytest.mark.parametrize("symmetric", [True, False])
def test_dwq_on_packed_grids_lowers_kl_keeps_codes_size_and_reloads(symmetric, text, tmp_path):
    from secateur.formats.packed_save import save_packed

    teacher = teacher_model()
    student = copy.deepcopy(teacher)
    quantize(student, GPTQConfig(bits=4, group_size=32, symmetric=symmetric), calibration(),
             progress=False)
    codes = frozen_codes(student)
    before_kl = held_out_kl(student, teacher)
    save_packed(student, bpe_tokenizer(), tmp_path / "before")
    dwq(loaded(student, "student"), loaded(teacher, "teacher"), DWQConfig(data=text, **SHORT),
        progress=False)
    assert held_out_kl(student, teacher) < before_kl
    after_codes = frozen_codes(student)
    assert all(torch.equal(codes[k], after_codes[k]) for k in codes)
    save_packed(student, bpe_tokenizer(), tmp_path / "after")
    sizes = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("before", "after")]
    assert sizes[0] == sizes[1]
    ids = [[1, 2, 3, 4, 5, 6, 7, 8]]
    got = reload_one(tmp_path / "after", ids, tmp_path)
    with torch.no_grad():
        want = student(input_ids=torch.tensor(ids)).logits[0]
    assert torch.allclose(torch.tensor(got["logits"]), want, atol=1e-4)


def test_dwq_learns_only_what_it_is_told(text):
    teacher = teacher_model()
    student = copy.deepcopy(teacher)
    quantize(student, GGUFConfig(preset="q4_0", rounding="rtn"), calibration(), progress=False)
    norms = {n: p.clone() for n, p in student.named_parameters() if "norm" in n}
    states = {k: s.s.clone() for k, s in ggml_states(student).items()}
    dwq(loaded(student, "student"), loaded(teacher, "teacher"),
        DWQConfig(data=text, learn=("norms",), **{**SHORT, "steps": 4}), progress=False)
    assert any(not torch.equal(p, norms[n]) for n, p in student.named_parameters() if n in norms)
    assert all(torch.equal(s.s, states[k]) for k, s in ggml_states(student).items())
    assert not any(p.requires_grad for p in student.parameters())
    assert not any("parametrizations" in n for n, _ in student.named_parameters())


def test_dwq_refuses_an_unquantized_model_or_itself_as_teacher(text):
    teacher = teacher_model()
    with pytest.raises(SecateurError, match="after a"):
        dwq(loaded(copy.deepcopy(teacher), "s"), loaded(teacher, "t"), DWQConfig(data=text))
    with pytest.raises(SecateurError, match="itself"):
        same = loaded(teacher, "t")
        dwq(same, same, DWQConfig(data=text))
    with pytest.raises(SecateurError, match="teacher"):
        recover(copy.deepcopy(teacher), DWQConfig(data=text), progress=False)


def test_recipe_quantize_then_dwq(tiny_dir, tmp_path, text):
    from secateur.recipe import Recipe, run_recipe

    recipe = Recipe(model=str(tiny_dir("llama")),
                    calibration={"source": "c4-sample", "nsamples": 2, "seqlen": 32, "seed": 0},
                    steps=[{"method": "gptq", "bits": 4, "group_size": 32},
                           {"method": "dwq", "data": text, "steps": 3, "seqlen": 32}],
                    evaluate={"perplexity": [{"data": "wiki", "seqlen": 32,
                                              "max_windows": 2}]})
    out = tmp_path / "run"
    run_recipe(recipe, out, progress=False, say=lambda _: None)
    saved = json.loads((out / "result.json").read_text())
    assert [s["method"] for s in saved["steps"]] == ["gptq", "dwq"]
    assert saved["steps"][1]["summary"]["extra"]["quantized_linears"] == 3 * 7
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"


def test_recover_cli_runs_dwq_on_a_packed_folder(tmp_path, text):
    from typer.testing import CliRunner

    from secateur.cli import app
    from secateur.formats.packed_save import save_packed

    teacher = teacher_model()
    teacher.save_pretrained(tmp_path / "dense")
    bpe_tokenizer().save_pretrained(tmp_path / "dense")
    student = copy.deepcopy(teacher)
    quantize(student, GPTQConfig(bits=4, group_size=32), calibration(), progress=False)
    save_packed(student, bpe_tokenizer(), tmp_path / "q4")
    out = tmp_path / "q4-dwq"
    res = CliRunner().invoke(app, ["recover", str(tmp_path / "q4"), "--method", "dwq",
                                   "--teacher", str(tmp_path / "dense"), "--data", text,
                                   "--steps", "3", "--seqlen", "32", "--eval", "none",
                                   "--out", str(out), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert ((out / "model.safetensors").stat().st_size
            == (tmp_path / "q4" / "model.safetensors").stat().st_size)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["dwq"]["steps"] == 3 and saved["dwq"]["mode"] == "selected"
    from secateur.formats.packed_load import load_quantized

    codes = frozen_codes(load_quantized(tmp_path / "q4").model)
    again = frozen_codes(load_quantized(out).model)
    assert codes.keys() == again.keys() and all(torch.equal(codes[k], again[k]) for k in codes)
    assert torch.isfinite(load(out).model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    res = CliRunner().invoke(app, ["recover", str(tmp_path / "q4"), "--method", "dwq",
                                   "--data", text, "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "--teacher" in str(res.exception)


def test_recipe_refuses_dwq_without_a_quantize_step_before_it(tiny_dir):
    from secateur.config import ConfigError
    from secateur.recipe import Recipe

    with pytest.raises(ConfigError, match="put a quantize step"):
        Recipe(model=str(tiny_dir("llama")), steps=[{"method": "dwq", "steps": 3}])


def test_recipe_gguf_then_dwq_saves_learnt_blocks_of_the_same_types_and_size(tmp_path, text):
    from secateur.recipe import Recipe, run_recipe
    from tests.formats.test_export import save

    src = save(teacher_model(), tmp_path / "src")
    files = {}
    for name, extra in (("plain", []), ("dwq", [{"method": "dwq", "data": text, "steps": 3,
                                                "seqlen": 32, "lr": 0.01,
                                                "warmup_steps": 0}])):
        recipe = Recipe(model=str(src),
                        calibration={"source": "c4-sample", "nsamples": 2, "seqlen": 32,
                                     "seed": 0},
                        steps=[{"method": "gguf", "preset": "q4_0"}, *extra],
                        evaluate={"perplexity": [{"data": "wiki", "seqlen": 32,
                                                  "max_windows": 2}]})
        run_recipe(recipe, tmp_path / name, progress=False, say=lambda _: None)
        files[name] = tmp_path / name / "model" / "model.gguf"
    plain, learnt = (gguf.GGUFReader(files[n]) for n in ("plain", "dwq"))
    assert files["plain"].stat().st_size == files["dwq"].stat().st_size
    assert ([(t.name, t.tensor_type) for t in plain.tensors]
            == [(t.name, t.tensor_type) for t in learnt.tensors])
    q = {t.name: t for t in plain.tensors}
    changed = [t.name for t in learnt.tensors if t.name.endswith("attn_q.weight")
               and not np.array_equal(t.data, q[t.name].data)]
    assert changed  # the learnt scales are in the file


@pytest.mark.usefixtures("one_thread")
def test_compiled_dwq_takes_the_same_steps(text):
    """DWQ rebuilds each linear's weight from its learnt factors inside the forward; under
    torch.compile it must learn the same factors."""
    teacher = teacher_model()
    base = copy.deepcopy(teacher)
    quantize(base, GGUFConfig(preset="q4_0", rounding="rtn"), calibration(), progress=False)
    got = {}
    for compiled in (False, True):
        student = copy.deepcopy(base)
        run = dwq(loaded(student, "student"), loaded(teacher, "teacher"),
                  DWQConfig(data=text, compile=compiled, **{**SHORT, "steps": 3}),
                  progress=False)
        got[compiled] = (run.losses, student.state_dict())
    assert got[False][0] == pytest.approx(got[True][0], rel=1e-4)
    for key, value in got[False][1].items():
        assert torch.allclose(value.float(), got[True][1][key].float(), atol=1e-5), key
