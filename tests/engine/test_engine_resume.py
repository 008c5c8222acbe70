"""A layer-wise run killed after any layer resumes from its checkpoint to bit-identical weights.

Run as a module (`python -m tests.engine.test_engine_resume MODEL_DIR CKPT OUT.json
[KILL_AFTER]`) it is the worker the SIGKILL test starts: it prunes, optionally SIGKILLs itself
once layer KILL_AFTER is checkpointed, and writes the sha256 of every tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from secateur.engine.sequential import collect_layer_stats, prune_layerwise
from secateur.errors import SecateurError
from secateur.methods import PruneContext, SparseGPTConfig, WandaConfig, build_method
from secateur.methods.gguf import GGUFConfig
from secateur.methods.gptq import GPTQConfig
from secateur.methods.sparsity import OWLConfig
from secateur.methods.w8a8 import W8A8Config
from secateur.models import adapter_for
from secateur.quant.ggml import ggml_states
from secateur.quant.state import activation_quant, quant_state

ROOT = Path(__file__).resolve().parents[2]
LAYERS = 6


def tiny_deep(seed: int = 0):
    """The tiny Llama with six layers, so a kill can land on several interior layers."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import configs

    cfg = configs()["llama"]
    cfg.num_hidden_layers = LAYERS
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def windows(n: int = 4, seqlen: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (1, seqlen), generator=g) for _ in range(n)]


def run(model, config, calib, checkpoint=None, **kw):
    """What the API does for a layer-wise step: prepare (OWL measures here), then the loop."""
    adapter = adapter_for(model)
    method = build_method(config)
    context = PruneContext(
        model=model, tokenizer=None, adapter=adapter, calibration=calib, seed=0, progress=False,
        layerwise_stats=lambda needs, on_layer: collect_layer_stats(
            model, adapter, calib, needs, on_layer, False))
    method.prepare(model, adapter, context)
    reports = prune_layerwise(model, adapter, method, calib, progress=False,
                              checkpoint=checkpoint, **kw)
    return reports, method


def hashes(model) -> dict[str, str]:
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in model.state_dict().items()}


class Stop(Exception):
    pass


def stop_after(k: int):
    def hook(index: int) -> None:
        if index == k:
            raise Stop

    return hook


CONFIGS = {
    "wanda-owl": WandaConfig(sparsity=0.6, owl=OWLConfig(m=3.0, lam=0.08)),
    "sparsegpt-2:4": SparseGPTConfig(nm="2:4"),
    "gptq-4bit": GPTQConfig(bits=4, group_size=32),
    "w8a8-smoothquant": W8A8Config(smoothquant_alpha=0.5),
    "gguf-q4_k_m-gptq": GGUFConfig(preset="q4_k_m", rounding="gptq"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_interrupted_run_resumes_bit_identical(name, tmp_path):
    config, calib = CONFIGS[name], windows()
    reference = tiny_deep()
    ref_reports, ref_method = run(reference, config, calib)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Stop):
        run(tiny_deep(), config, calib, ckpt, on_layer_done=stop_after(2))
    saved = json.loads((ckpt / "checkpoint.json").read_text())
    assert saved["done"] == 3
    # Only what the next layer needs: finished layers plus one set of activations.
    assert sorted(p.name for p in ckpt.glob("hidden-*")) == ["hidden-00003.safetensors"]

    resumed = tiny_deep()
    seen: list[int] = []
    reports, method = run(resumed, config, calib, ckpt, on_layer_done=seen.append)
    assert seen == [3, 4, 5]  # the finished layers were not redone
    assert hashes(resumed) == hashes(reference)
    assert [asdict(r) for r in reports] == [asdict(r) for r in ref_reports]
    if not name.startswith("w8a8"):  # W8A8 sums up its smoothing from apply() calls
        assert method.summary() == ref_method.summary()
    # The grids and activation marks of the layers done before the interrupt came back.
    for a, b in zip(adapter_for(resumed).layers, adapter_for(reference).layers, strict=True):
        qa, qb = quant_state(a.self_attn.q_proj), quant_state(b.self_attn.q_proj)
        assert (qa is None) == (qb is None)
        if qa is not None:
            assert torch.equal(qa.scale, qb.scale) and torch.equal(qa.zero, qb.zero)
        assert activation_quant(a.mlp.down_proj) == activation_quant(b.mlp.down_proj)
    # llama.cpp's block codes and fields, which the GGUF writer reads, came back too
    ga, gb = ggml_states(resumed), ggml_states(reference)
    assert ga.keys() == gb.keys()
    for key, b in gb.items():
        a = ga[key]
        assert (a.type, a.imatrix_tokens, a.fields.keys()) == (b.type, b.imatrix_tokens,
                                                                b.fields.keys())
        for x, y in [(a.codes, b.codes), (a.s, b.s), (a.b, b.b), (a.imatrix, b.imatrix),
                     *((a.fields[k], b.fields[k]) for k in b.fields)]:
            assert (x is None and y is None) or torch.equal(x, y), key
    ids = calib[0]  # so the model computes the same, activation rounding included
    assert torch.equal(resumed(ids).logits, reference(ids).logits)
    assert not ckpt.exists()  # removed after success


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    calib, ckpt = windows(), tmp_path / "ckpt"
    with pytest.raises(Stop):
        run(tiny_deep(), WandaConfig(sparsity=0.5), calib, ckpt, on_layer_done=stop_after(0))
    with pytest.raises(SecateurError, match="different method settings") as err:
        run(tiny_deep(), WandaConfig(sparsity=0.6), calib, ckpt)
    assert "\n" not in str(err.value)
    with pytest.raises(SecateurError, match="different calibration data"):
        run(tiny_deep(), WandaConfig(sparsity=0.5), windows(seqlen=16), ckpt)
    with pytest.raises(SecateurError, match="different model"):
        run(tiny_deep(seed=1), WandaConfig(sparsity=0.5), calib, ckpt)
    assert (ckpt / "checkpoint.json").is_file()  # refused, not overwritten
    reports, _ = run(tiny_deep(), WandaConfig(sparsity=0.5), calib, ckpt)
    assert len(reports) == LAYERS


def test_kept_checkpoint_and_debris_of_a_killed_write(tmp_path):
    calib, ckpt = windows(), tmp_path / "ckpt"
    config = WandaConfig(sparsity=0.5)
    reference = tiny_deep()
    run(reference, config, calib)
    with pytest.raises(Stop):
        run(tiny_deep(), config, calib, ckpt, on_layer_done=stop_after(1))
    # A kill while layer 2 was being written leaves its partial and maybe its renamed file,
    # but checkpoint.json still says two layers are done.
    (ckpt / ".layer-00002.safetensors.partial-999999-1-deadbeef.safetensors").write_bytes(b"x")
    (ckpt / "layer-00002.safetensors").write_bytes(b"garbage")
    resumed = tiny_deep()
    run(resumed, config, calib, ckpt, keep_checkpoint=True)
    assert hashes(resumed) == hashes(reference)
    assert json.loads((ckpt / "checkpoint.json").read_text())["done"] == LAYERS
    assert not list(ckpt.glob(".*partial*"))  # the dead process's partial was cleaned up


def test_sigkill_at_a_random_layer_resumes_bit_identical(tmp_path):
    """The real thing: a separate process killed with SIGKILL, then rerun."""
    kill_after = random.Random(16).randrange(LAYERS - 1)
    print(f"killing after layer {kill_after}")
    model_dir = tmp_path / "model"
    tiny_deep().save_pretrained(model_dir)
    ckpt = tmp_path / "ckpt"

    def worker(out: str, *extra: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(
            [sys.executable, "-m", "tests.engine.test_engine_resume", str(model_dir), str(ckpt),
             str(tmp_path / out), *extra], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=300)

    killed = worker("killed.json", str(kill_after))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert json.loads((ckpt / "checkpoint.json").read_text())["done"] == kill_after + 1
    resumed = worker("resumed.json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((tmp_path / "resumed.json").read_text())
    assert a["first_layer_run"] == kill_after + 1
    assert not ckpt.exists()
    # The uninterrupted reference runs here, on the workers' single thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = _prune_saved(model_dir, None, lambda index: None)
    finally:
        torch.set_num_threads(threads)
    assert a["hashes"] == b["hashes"]
    assert a["reports"] == b["reports"]


def _prune_saved(model_dir, ckpt, on_layer_done) -> dict:
    """SparseGPT with OWL (weight updates and a measuring prepare) on the saved model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ran: list[int] = []

    def done(index: int) -> None:
        ran.append(index)
        on_layer_done(index)

    config = SparseGPTConfig(sparsity=0.6, owl=OWLConfig(m=3.0, lam=0.08))
    reports, _ = run(model, config, windows(), ckpt, on_layer_done=done)
    return {"hashes": hashes(model), "first_layer_run": ran[0],
            "reports": [asdict(r) for r in reports]}


def _worker(model_dir: str, ckpt: str, out: str, kill_after: str | None = None) -> None:
    torch.set_num_threads(1)

    def done(index: int) -> None:
        if kill_after is not None and index == int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)

    Path(out).write_text(json.dumps(_prune_saved(model_dir, Path(ckpt), done)))


if __name__ == "__main__":
    _worker(*sys.argv[1:])
