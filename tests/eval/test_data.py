import json

import pytest
import torch

from secateur.data import calibration_windows, eval_windows, load_text, tokenize_stream
from secateur.errors import SecateurError
from tests.tiny_models import byte_tokenizer


def test_wiki_documents_are_doc_elements_in_file_order():
    src = load_text("wiki")
    assert len(src.documents) == 2349
    assert src.documents[0].startswith("2007 European Parliament election in Romania")
    assert not any("<doc" in d or "</doc>" in d for d in src.documents[:50])
    assert all(d == d.strip() for d in src.documents[:50])
    assert src.join == "\n\n"


def test_c4_sample_has_one_document_per_line():
    src = load_text("c4-sample")
    assert len(src.documents) > 500
    assert all("\n" not in d for d in src.documents)


def test_tiny_stories_are_the_blank_line_separated_stories():
    src = load_text("tiny-stories")
    assert len(src.documents) == 235
    assert src.documents[0].startswith("One day, a little girl named Lily found a needle")
    assert all("\n\n" not in d and d == d.strip() for d in src.documents)


def test_local_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nstill first\n\nsecond para\n")
    assert load_text(str(tmp_path / "a.txt")).documents == ["first para\nstill first",
                                                            "second para"]
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x y"}) + "\n\n"
                                      + json.dumps({"text": "z"}) + "\n")
    assert load_text(str(tmp_path / "a.jsonl")).documents == ["x y", "z"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p", "q"]}), tmp_path / "a.parquet")
    assert load_text(str(tmp_path / "a.parquet")).documents == ["p", "q"]


def test_bad_text_inputs_fail_clearly(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(SecateurError, match="contains no text"):
        load_text(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"content": 1}\n')
    with pytest.raises(SecateurError, match="'text' field"):
        load_text(str(tmp_path / "bad.jsonl"))
    with pytest.raises(SecateurError, match="unknown text source 'nope'.*wiki"):
        load_text("nope")
    with pytest.raises(SecateurError, match="not found"):
        load_text(str(tmp_path / "missing.txt"))


def test_eval_windows_are_non_overlapping_and_drop_the_remainder():
    ids = torch.arange(1000)
    w = eval_windows(ids, 128, max_windows=None)
    assert w.available == 7 and len(w.windows) == 7
    assert torch.equal(torch.cat(w.windows, 1)[0], ids[:896])
    assert len(eval_windows(ids, 128, max_windows=3).windows) == 3
    each = eval_windows(ids, 128, max_windows=2, bos_id=999)
    assert each.windows[1][0, 0].item() == 999 and each.windows[1][0, 1].item() == 127
    with pytest.raises(SecateurError, match="at least 2"):
        eval_windows(ids, 0)
    with pytest.raises(SecateurError, match="fewer than one window"):
        eval_windows(ids[:10], 128)


def test_calibration_sampler_is_seeded_and_shaped():
    tok = byte_tokenizer()
    src = load_text("c4-sample")
    a = calibration_windows(tok, src, 4, 64, seed=0)
    b = calibration_windows(tok, src, 4, 64, seed=0)
    c = calibration_windows(tok, src, 4, 64, seed=1)
    assert [w.shape for w in a] == [(1, 64)] * 4
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_calibration_text_shorter_than_a_window_fails(tmp_path):
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(SecateurError, match="not enough for one window"):
        calibration_windows(byte_tokenizer(), load_text(str(tmp_path / "short.txt")), 2, 512, 0)


def test_tokenize_stream_bos_policies():
    tok = byte_tokenizer()
    none = tokenize_stream(tok, "ab", "none").tolist()
    assert none == tokenize_stream(tok, "ab", "each").tolist()
    with pytest.raises(SecateurError, match="unknown BOS policy"):
        tokenize_stream(tok, "ab", "sometimes")
