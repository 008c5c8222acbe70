"""Zero-shot through lm-eval: local task copies, names, and agreement with lm-eval's own CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

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
    from secateur.formats.loader import load

    loaded = load(str(tiny_dir("llama")))
    result = zs.zeroshot(loaded.model, loaded.tokenizer,
                         zs.ZeroShotSpec(("arc_easy", "winogrande"), limit=3), "float32")
    arc, wino = result["tasks"]["arc_easy"], result["tasks"]["winogrande"]
    assert arc["samples"] == 3 and arc["samples_available"] == 570
    assert 0 <= arc["acc"] <= 1 and 0 <= arc["acc_norm"] <= 1
    assert wino["acc_norm"] is None and wino["average_metric"] == "acc"
    assert result["average"] == pytest.approx((arc["acc_norm"] + wino["acc"]) / 2)
    assert result["protocol"]["limit"] == 3 and result["protocol"]["data"] == "local"
    # lm-eval leaves stderr out with its bootstrap off; ours is its closed form for 0/1 scores
    p = arc["acc"]
    assert arc["acc_stderr"] == pytest.approx((p * (1 - p) / 2) ** 0.5)
    assert wino["acc_stderr"] is not None and wino["acc_norm_stderr"] is None


def test_mean_stderr_is_the_sample_standard_error_of_0_1_scores():
    import statistics

    scores = [1, 0, 0, 1, 1, 1, 0, 1]
    expected = statistics.stdev(scores) / len(scores) ** 0.5
    assert zs.mean_stderr(sum(scores) / len(scores), len(scores)) == pytest.approx(expected)
    assert zs.mean_stderr(None, 300) is None and zs.mean_stderr(1.0, 1) is None


@pytest.mark.slow
def test_secateur_matches_lm_eval_cli_exactly(smollm2, tmp_path):
    """Same local tasks, same documents, same batch size (ours defaults to 8): our in-process
    numbers equal lm-eval's CLI's."""
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
           "--limit", str(limit), "--device", "cpu", "--batch_size",
           str(zs.DEFAULT_BATCH_SIZE),
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


def _per_document(model, tokenizer, batch_size, compute_dtype=None,
                  tasks=("arc_easy", "lambada_openai"), limit=6):
    spec = zs.ZeroShotSpec(tasks, limit=limit, batch_size=batch_size,
                           compute_dtype=compute_dtype)
    out, run_names, *_ = zs.run_harness(model, tokenizer, spec, log_samples=True)
    docs = {}
    for run in run_names:
        for s in out["samples"][run]:
            # filtered_resps: per choice (log-likelihood, is-greedy)
            lls = [float(r[0]) for r in s["filtered_resps"]]
            docs[run, s["doc_id"]] = (lls, {m: s[m] for m in s["metrics"] if "acc" in m})
    return docs


def test_batch_size_does_not_change_any_document(tiny_dir):
    """lm-eval pads a batch on the right of a causal model, so every scored position sees
    the same tokens: batch 8 equals batch 1 per document, up to float rounding."""
    from secateur.formats.loader import load

    loaded = load(str(tiny_dir("llama")))
    one = _per_document(loaded.model, loaded.tokenizer, 1)
    eight = _per_document(loaded.model, loaded.tokenizer, 8)
    assert one.keys() == eight.keys() and len(one) == 12
    for key, (lls, metrics) in one.items():
        assert eight[key][1] == metrics, key  # acc, acc_norm (LAMBADA: acc) per document
        assert eight[key][0] == pytest.approx(lls, rel=1e-5, abs=1e-4), key
    # bf16 matmuls (log-softmax in fp32) move each log-likelihood a little, not a lot
    bf16 = _per_document(loaded.model, loaded.tokenizer, 8, "bfloat16")
    moved = [b - a for k in one for a, b in zip(one[k][0], bf16[k][0], strict=True)]
    assert any(d != 0 for d in moved)
    assert max(abs(d) for d in moved) < 0.5
    assert next(loaded.model.parameters()).dtype == torch.float32


def test_evaluate_with_a_zero_shot_config_records_batch_and_compute_dtype(tiny_dir):
    from secateur.eval.api import evaluate
    from secateur.eval.config import ZeroShotConfig
    from secateur.formats.loader import load

    loaded = load(str(tiny_dir("llama")))
    fp32 = evaluate(loaded, ZeroShotConfig(tasks="arc_easy", limit=4, batch_size=4))
    bf16 = evaluate(loaded, ZeroShotConfig(tasks=("arc_easy",), limit=4,
                                           compute_dtype="bfloat16"))
    assert isinstance(fp32, zs.ZeroShotResult)
    assert zs.ZeroShotResult.from_dict(fp32.to_dict()) == fp32
    p, q = fp32.protocol, bf16.protocol
    assert (p["batch_size"], p["compute_dtype"], p["lm_eval_model_args"]) == (
        4, "float32", {"dtype": "float32"})
    assert (q["batch_size"], q["compute_dtype"], q["lm_eval_model_args"]) == (
        8, "bfloat16", {"dtype": "float32", "mixed_precision_dtype": "bfloat16",
                        "softmax_dtype": "float32"})
    assert fp32.tasks["arc_easy"]["samples"] == bf16.tasks["arc_easy"]["samples"] == 4
    with pytest.raises(SecateurError, match="batch size"):
        zs.zeroshot(loaded.model, loaded.tokenizer, zs.ZeroShotSpec(("arc_easy",), 2,
                                                                    batch_size=0))
