"""Text sources: packaged offline text, local files, and Hub datasets, as lists of documents."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from secateur.errors import SecateurError
from secateur.offline import package_dir

_DOC = re.compile(r"<doc[^>]*>(.*?)</doc>", re.DOTALL)


@dataclass(frozen=True)
class TextSource:
    """Documents plus how the field's protocols join them into one evaluation stream."""

    name: str
    documents: list[str]
    split: str
    join: str = "\n\n"
    origin: str = ""

    def joined(self) -> str:
        return self.join.join(self.documents)


def _packaged(filename: str) -> Path:
    return package_dir("exllamav3", "exllamav3") / "conversion" / "standard_cal_data" / filename


def _wiki() -> TextSource:
    text = _packaged("wiki.utf8").read_text(encoding="utf-8")
    docs = [d.strip() for d in _DOC.findall(text)]
    return TextSource("wiki", [d for d in docs if d], "all", origin="exllamav3 wiki.utf8 "
                      "(2,349 Wikipedia articles; not WikiText-2)")


def _c4_sample() -> TextSource:
    lines = _packaged("c4.utf8").read_text(encoding="utf-8").splitlines()
    return TextSource("c4-sample", [ln.strip() for ln in lines if ln.strip()], "all",
                      origin="exllamav3 c4.utf8 (C4-style web text)")


def _wikitext2(split: str) -> TextSource:
    from datasets import load_dataset

    rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    # SparseGPT/Wanda join the raw rows (one line each) with "\n\n"; keep that for comparability.
    return TextSource("wikitext2", list(rows), split, origin="wikitext-2-raw-v1")


def _c4(split: str) -> TextSource:
    from datasets import load_dataset

    shard = {
        "train": "en/c4-train.00000-of-01024.json.gz",
        "validation": "en/c4-validation.00000-of-00008.json.gz",
    }[split]
    rows = load_dataset("allenai/c4", data_files={split: shard}, split=split)["text"]
    # The reference evaluates the first 1,100 validation documents joined with a space.
    docs = list(rows[:1100]) if split == "validation" else list(rows)
    return TextSource("c4", docs, split, join=" ", origin=f"allenai/c4 {shard}")


def _ptb(split: str) -> TextSource:
    from datasets import load_dataset

    rows = load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"]
    return TextSource("ptb", list(rows), split, join=" ", origin="ptb_text_only")


def read_utf8(path: Path) -> str:
    """The file's text, or a one-line error for binary data, bad encoding or no permission."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SecateurError(f"cannot read text file '{path}' ({err.strerror})") from None
    # NUL never occurs in text, and decodes without complaint as UTF-8.
    bad = data.find(b"\0")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = err.start if bad < 0 else min(bad, err.start)
    if bad >= 0:
        raise SecateurError(f"'{path}' is not UTF-8 text (binary data at byte {bad:,}): give a "
                            f"plain text, .jsonl or .parquet file")
    return text


def _parquet_docs(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SecateurError(f"'{path}' is not a readable parquet file ({first}): give an intact "
                            ".parquet with a 'text' column") from None
    if "text" not in table.column_names:
        raise SecateurError(f"{path} has no 'text' column (columns: {table.column_names})")
    return [str(t) for t in table.column("text").to_pylist() if t is not None]


def _local_file(path: Path) -> TextSource:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        docs = []
        for n, line in enumerate(read_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise SecateurError(f"{path}:{n}: each line must be a JSON object with a "
                                    f"'text' field ({err})") from None
            if not isinstance(text, str):
                raise SecateurError(f"{path}:{n}: the 'text' field must be a string, not "
                                    f"{type(text).__name__}")
            docs.append(text)
    elif suffix == ".parquet":
        docs = _parquet_docs(path)
    else:
        # Plain text: paragraphs separated by blank lines are the documents.
        docs = re.split(r"\n\s*\n", read_utf8(path))
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise SecateurError(f"{path} contains no text: give a file with some documents in it")
    return TextSource(path.name, docs, "all", origin=str(path.resolve()))


def _tiny_stories() -> TextSource:
    text = _packaged("tiny.utf8").read_text(encoding="utf-8")
    docs = [d.strip() for d in re.split(r"\n\s*\n", text)]
    return TextSource("tiny-stories", [d for d in docs if d], "all",
                      origin="exllamav3 tiny.utf8 (TinyStories-style children's stories)")


# wiki evaluates; c4-sample calibrates; tiny-stories is a second held-out text of another style
BUILTIN = {"wiki": _wiki, "c4-sample": _c4_sample, "tiny-stories": _tiny_stories}
HUB = {"wikitext2": _wikitext2, "c4": _c4, "ptb": _ptb}
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


def load_text(spec: str, split: str = "test") -> TextSource:
    """A source name (`wiki`, `c4-sample`, `wikitext2`, `c4`, `ptb`) or a local file path."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    if spec in HUB:
        hub_split = "validation" if spec == "c4" and split == "test" else split
        return HUB[spec](hub_split)
    path = Path(spec)
    if path.is_file():
        return _local_file(path)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        raise SecateurError(f"text file '{spec}' not found (or not a file)")
    known = ", ".join([*BUILTIN, *HUB])
    raise SecateurError(f"unknown text source '{spec}': use one of {known}, or a path to a "
                        f"{'/'.join(LOCAL_SUFFIXES)} file")
