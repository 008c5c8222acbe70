"""Zero-shot through lm-eval: local task copies, names, and agreement with lm-eval's own CLI."""

import json
import os
import subprocess
import sys

import pytest

from secateur.errors import SecateurError
from secateur.eval import zeroshot as zs
from secateur.offline import cache_dir


def test_parse_tasks_and_unknown_names_list_the_known_ones():
    assert zs.parse_tasks("arc_easy, piqa") == ("arc_easy", "piqa")
    assert zs.parse_tasks("all") == zs.DEFAULT_TASKS
    with pytest.raises(SecateurError, match="names no task"):
        zs.parse_tasks(" , ")
    with pytest.raises(SecateurError) as err:
        zs.check_tasks(("arc_easy", "arc_hard"), "local")
    assert "'arc_hard'" in str(err.value)
    for known in zs.TASKS:
        assert known in str(err.value)
    zs.check_tasks(("arc_easy_local", "piqa"), "local")  # both spellings are fine
    with pytest.raises(SecateurError, match="unknown task data"):
        zs.resolve_data("internet")


def test_local_tasks_keep_stock_prompts_and_metrics():
    """The generated task is the stock YAML with only the data source swapped."""
    from lm_eval.tasks import TaskManager

    root = zs.local_tasks_dir()
    manager = TaskManager(include_path=str(root), include_defaults=False)
    tasks = manager.load(["arc_easy_local", "boolq_local", "lambada_openai_local"])
    by_name = {t.config.task: t for t in _leaves(tasks)}

    arc = by_name["arc_easy_local"]
    docs = list(arc.eval_docs)
    assert len(docs) == 570  # ARC-Easy validation
    assert arc.config.doc_to_text == "Question: {{question}}\nAnswer:"
    assert {m["metric"] for m in arc.config.metric_list} == {"acc", "acc_norm"}
    assert arc.doc_to_text(docs[0]).startswith("Question: Which technology")

    boolq = by_name["boolq_local"]
    bdocs = list(boolq.eval_docs)
    assert len(bdocs) == 3270 and {d["label"] for d in bdocs} == {0, 1}
    assert boolq.doc_to_choice(bdocs[0]) == ["no", "yes"]

    lam = by_name["lambada_openai_local"]
    ldocs = list(lam.eval_docs)
    assert len(ldocs) == 5153  # LAMBADA (openai) test
    assert lam.doc_to_target(ldocs[0]) == " signs"
    assert lam.doc_to_text(ldocs[0]).endswith("I don't care about")


def _leaves(tasks):
    out = []
    for v in tasks.values():
        out.extend(_leaves(v) if isinstance(v, dict) else [v])
    return out


def test_zeroshot_on_a_tiny_model_reports_both_metrics(tiny_dir):
    from secateur.models.loading import load

    loaded = load(str(tiny_dir("llama")))
    result = zs.zeroshot(loaded.model, loaded.tokenizer,
                         zs.ZeroShotSpec(("arc_easy", "winogrande"), limit=3), "float32")
    arc, wino = result["tasks"]["arc_easy"], result["tasks"]["winogrande"]
    assert arc["samples"] == 3 and arc["samples_available"] == 570
    assert 0 <= arc["acc"] <= 1 and 0 <= arc["acc_norm"] <= 1
    assert wino["acc_norm"] is None and wino["average_metric"] == "acc"
    assert result["average"] == pytest.approx((arc["acc_norm"] + wino["acc"]) / 2)
    assert result["protocol"]["limit"] == 3 and result["protocol"]["data"] == "local"


@pytest.mark.slow
def test_secateur_matches_lm_eval_cli_exactly(smollm2, tmp_path):
    """Same local tasks, same documents: our in-process numbers equal lm-eval's CLI's."""
    import torch

    tasks, limit = ("arc_easy", "lambada_openai"), 5
    # One thread on both sides: the same reduction order, and no oversubscription of the
    # machine's two shared cores (which makes 2-thread runs several times slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = zs.zeroshot(smollm2.model, smollm2.tokenizer,
                           zs.ZeroShotSpec(tasks, limit=limit), "float32")
    finally:
        torch.set_num_threads(threads)
    model_dir = cache_dir() / "models" / "smollm2-135m"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={model_dir},dtype=float32", "--tasks",
           ",".join(t + "_local" for t in tasks), "--include_path", str(zs.local_tasks_dir()),
           "--limit", str(limit), "--device", "cpu", "--batch_size", "1",
           "--output_path", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                              "OMP_NUM_THREADS": "1"})
    (result_file,) = tmp_path.rglob("results_*.json")
    theirs = json.loads(result_file.read_text())["results"]
    for task in tasks:
        cli = theirs[task + "_local"]
        for metric in ("acc", "acc_norm", "perplexity"):
            if f"{metric},none" in cli:
                assert ours["tasks"][task][metric] == cli[f"{metric},none"], (task, metric)
    assert ours["tasks"]["lambada_openai"]["perplexity"] > 1
