"""Every method on every family: prune (or quantize, or recover) a tiny random model, save it
the way secateur saves, reload it in a Python that cannot import secateur, and check that it
gives the logits secateur's in-memory model gave and that generation with the KV cache equals
generation without it.

One cell per (family, method). The parent process runs every selected cell once, then ONE
subprocess reloads all of them: a fresh interpreter spends most of its time importing
transformers' model code (~10 s under load), so one per family would dominate the matrix.

A cell that cannot work says why in `EXPECTED_ERRORS` and asserts that error, so no cell is
silently skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.reload import reload_without_secateur
from tests.tiny_models import configs, save_tiny

FAMILIES = list(configs())
IDS = [[256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 32, 84]]
NEW_TOKENS = 8
ATOL = 1e-4
# cells whose shapes differ per layer: they must reload as secateur's generic class; so must
# uniform widths where head_dim follows from hidden / heads (no stock config states them)
HETEROGENEOUS = ("llm-pruner-per-layer", "blockpruner", "lora", "llm-pruner-per-layer+gptq")
HEAD_DIM_FROM_HIDDEN = ("opt", "gpt2", "gpt_neox")


def _calibration() -> list[torch.Tensor]:
    # ready token windows: tokenizing a text source byte by byte would dominate the matrix
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (1, 32), generator=gen) for _ in range(4)]


def _step(**fields):
    from tests.tiny_models import make_step

    return make_step(**fields)


def _force_branches(loaded, summary: dict) -> None:
    """BlockPruner picks blocks by loss, so which kinds it takes on a random model is chance;
    top its choice up so the saved model lacks an attention branch in one layer and an MLP
    branch in another (the KV cache must still count positions right)."""
    from secateur.surgery.depth import Block, remove_blocks

    removed = [Block.parse(b) for b in summary["removed"]]
    touched = {b.layer for b in removed}
    free = [i for i in range(loaded.adapter.num_layers) if i not in touched]
    extra = []
    if not any(b.part == "attn" for b in removed):
        extra.append(Block(free.pop(0), "attn"))
    if not any(b.part == "mlp" for b in removed):
        extra.append(Block(free.pop(), "mlp"))
    if extra:
        remove_blocks(loaded.model, loaded.adapter, extra)


def _prune(**fields) -> Callable:
    def run(loaded, text: Path) -> None:
        from secateur.api import prune

        prune(loaded, _step(**fields), _calibration(), progress=False)
    return run


def _blockpruner(loaded, text: Path) -> None:
    from secateur.api import prune

    run = prune(loaded, _step(method="blockpruner", blocks=1), _calibration(), progress=False)
    _force_branches(loaded, run.summary)


def _gptq(loaded, text: Path) -> None:
    from secateur.api import quantize

    quantize(loaded, _step(method="gptq", bits=4, group_size=16), _calibration(),
             progress=False)


def _gptq_after_width(loaded, text: Path) -> None:
    """Quantizing a per-layer-width model: the packed checkpoint must carry secateur's class.
    Per channel, since importance-allocated widths are no multiple of a group size."""
    from secateur.api import prune, quantize

    prune(loaded, _step(method="llm-pruner", ratio=0.3, importance="l2",
                        allocation="importance", protect_first=1), _calibration(),
          progress=False)
    quantize(loaded, _step(method="gptq", bits=4, group_size=-1), _calibration(),
             progress=False)


def _lora_after_width(loaded, text: Path) -> None:
    """Recovery on the per-layer-width model: the realistic order, and it checks that the
    trained model keeps secateur's class."""
    from secateur.api import prune, recover
    from secateur.registry import make_config

    prune(loaded, _step(method="llm-pruner", ratio=0.3, importance="l2",
                        allocation="importance", protect_first=1), _calibration(),
          progress=False)
    recover(loaded, make_config({"method": "lora", "data": str(text), "steps": 2,
                                 "seqlen": 32}, kind="recover"), progress=False)


# (family, method) -> the one-line error secateur gives instead, and why it cannot work.
EXPECTED_ERRORS = {
    # GPT-2 keeps its linears as transformers' Conv1D; compressed-tensors (what transformers
    # and vLLM load) packs nn.Linear only, so secateur refuses to write a packed GPT-2.
    ("gpt2", "gptq-w4g16"): "is a Conv1D: compressed-tensors packs nn.Linear weights only",
    ("gpt2", "llm-pruner-per-layer+gptq"): "is a Conv1D: compressed-tensors packs nn.Linear "
                                           "weights only",
}

METHODS: dict[str, Callable] = {
    "magnitude": _prune(method="magnitude", sparsity=0.5),
    "wanda": _prune(method="wanda", sparsity=0.5),
    "sparsegpt": _prune(method="sparsegpt", sparsity=0.5),
    "wanda-2:4": _prune(method="wanda", nm="2:4"),
    "wanda-owl": _prune(method="wanda", sparsity=0.5, owl={"lam": 0.1}),
    "llm-pruner-uniform": _prune(method="llm-pruner", ratio=0.25, importance="taylor",
                                 protect_first=0, protect_last=0),
    "llm-pruner-per-layer": _prune(method="llm-pruner", ratio=0.3, importance="taylor",
                                   allocation="importance", protect_first=1),
    "blockpruner": _blockpruner,
    "shortgpt": _prune(method="shortgpt", layers=1),
    "sleb": _prune(method="sleb", layers=1),
    "gptq-w4g16": _gptq,
    "llm-pruner-per-layer+gptq": _gptq_after_width,
    "lora": _lora_after_width,
}

def _save(loaded, out: Path) -> None:
    from secateur.quant.state import is_quantized

    if is_quantized(loaded.model):
        from secateur.formats.packed_save import save_packed

        save_packed(loaded.model, loaded.tokenizer, out)
    else:
        from secateur.formats.hf import save_model

        save_model(loaded.model, loaded.tokenizer, out)


def run_matrix(families: list[str], root: Path) -> dict[tuple[str, str], dict]:
    """Every method on every family in this process, then one subprocess reloads them all."""
    from secateur.formats.loader import load

    torch.set_num_threads(1)
    text = root / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy "
                                  f"dog {i} times." for i in range(20)))
    ids = torch.tensor(IDS)
    cells: dict[tuple[str, str], dict] = {}
    dirs: dict[str, str] = {}
    for family in families:
        base = save_tiny(family, root / f"tiny-{family}")
        with torch.no_grad():
            dense = load(base).model(ids).logits[0]
        for name, run in METHODS.items():
            try:
                loaded = load(base)
                run(loaded, text)
                with torch.no_grad():
                    want = loaded.model(ids).logits[0]
                out = root / f"{family}-{name}"
                _save(loaded, out)
                cells[(family, name)] = {"logits": want, "dense": dense}
                dirs[f"{family}/{name}"] = str(out)
            except Exception as err:  # reported (or expected) by that cell's test
                cells[(family, name)] = {"parent_error": err}
    # each cell's error is asserted by its own test, so the reload is not strict here
    reloaded = reload_without_secateur(dirs, IDS, root, new_tokens=NEW_TOKENS, strict=False)
    for key, got in reloaded.items():
        family, name = key.split("/")
        cells[(family, name)]["reloaded"] = got
    return cells


@pytest.fixture(scope="session")
def matrix(request, tmp_path_factory) -> dict[tuple[str, str], dict]:
    """The cells of the families this session selected (all of them in CI)."""
    selected = {item.callspec.params["family"] for item in request.session.items
                if getattr(item, "originalname", "") == TEST_NAME}
    families = [f for f in FAMILIES if f in selected]
    return run_matrix(families, tmp_path_factory.mktemp("matrix"))


TEST_NAME = "test_method_saves_and_reloads_without_secateur"


@pytest.mark.reload
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_method_saves_and_reloads_without_secateur(family, method, matrix):
    cell = matrix[(family, method)]
    expected = EXPECTED_ERRORS.get((family, method))
    if expected is not None:
        from secateur.errors import SecateurError

        assert isinstance(cell.get("parent_error"), SecateurError), cell
        assert expected in str(cell["parent_error"])
        assert "\n" not in str(cell["parent_error"])  # one line
        return
    if "parent_error" in cell:
        raise cell["parent_error"]
    # every cell really changed the model
    assert float((cell["logits"] - cell["dense"]).abs().max()) > 1e-3
    got = cell["reloaded"]
    assert "error" not in got, got["error"]
    secateurs_class = method in HETEROGENEOUS or (method == "llm-pruner-uniform"
                                                  and family in HEAD_DIM_FROM_HIDDEN)
    assert got["cls"].startswith("Pruned") == secateurs_class, got["cls"]
    logits = torch.tensor(got["logits"])
    assert logits.shape == cell["logits"].shape
    diff = float((logits - cell["logits"]).abs().max())
    assert diff <= ATOL, f"reloaded logits differ by {diff:.2e}"
    assert len(got["cached"]) == len(IDS[0]) + NEW_TOKENS
    assert got["cached"] == got["uncached"], "generation with the KV cache differs"
