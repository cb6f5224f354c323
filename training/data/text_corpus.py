"""Text corpora for the GPT job.

The default corpus is real English that ships with Python itself: the language reference
topics in `pydoc_data.topics` plus the docstrings of the standard library (read with `ast`,
never imported). It is extracted deterministically and split by document, so no document
is in both train and validation (a corpus of a few documents, or of unequal ones, is split by
characters instead: see load_corpus). `--data` takes the user's own .txt files (a document each),
.jsonl files (a document per line, `{"text": ...}`, the layout of Hugging Face's text
datasets), or folders of them.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}


@dataclass
class Corpus:
    train: list[str]  # documents
    val: list[str]
    left_out: int = 0  # characters past max_chars, not used
    by_characters: bool = False  # the text's tail held out, not whole documents (see load_corpus)

    @property
    def hash(self) -> str:
        """Short content hash, stored in the model's labels so a model names its data. Each split
        and document is length-prefixed: where documents end (an end-of-text token) is data too."""
        h = hashlib.sha256()
        for split in (self.train, self.val):
            h.update(f"{len(split)};".encode())
            for doc in split:
                data = doc.encode("utf-8", "surrogatepass")
                h.update(f"{len(data)};".encode() + data)
        return h.hexdigest()[:16]


def _docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    docs = [ast.get_docstring(n) for n in nodes]
    return "\n\n".join(d.strip() for d in docs if d and len(d.strip()) > 40)


def default_documents() -> list[tuple[str, str]]:
    """(name, text) pairs in a fixed order: pydoc topics, then stdlib docstrings by path."""
    from pydoc_data.topics import topics

    docs = [(f"topic:{name}", topics[name].strip()) for name in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(stdlib).parts):
            continue
        text = _docstrings(path)
        if text:
            docs.append((f"stdlib:{path.relative_to(stdlib)}", text))
    return docs


# Files named in --data that are data, not text: trained on as text, their syntax would be too
# (Hugging Face's `to_json("ds.json")` writes JSON lines into a .json file).
STRUCTURED = ("json", "csv", "tsv")


def user_documents(paths: list[str]) -> list[tuple[str, str]]:
    """Every .txt file named, or found under a named folder, is one document, and every line of
    a .jsonl file is one; each is named by its path inside that folder (or its file name), and a
    line by its number too: the split must not depend on how a path is spelled ("data",
    "./data", "/home/me/data") or on the working directory."""
    files: list[tuple[str, Path]] = []
    for i, entry in enumerate(paths):
        if not entry.strip():  # Path("") is ".": it would read every .txt under the working directory
            raise ValueError(f"--data={','.join(paths)}: entry {i + 1} is empty (a stray comma?)")
        p = Path(entry)
        if p.is_dir():
            files.extend((str(f.relative_to(p)), f) for f in folder_files(p) if f.suffix.lower() in (".txt", ".jsonl"))
        elif p.is_file():
            if (kind := p.suffix.lower().lstrip(".")) in STRUCTURED:  # its syntax would be trained on as text
                raise ValueError(f"--data: {p} is a {kind} file: give JSON lines of {{\"text\": …}} as .jsonl, "
                                 f"or rename it to .txt to train on its text as it is")
            files.append((p.name, p))
        elif p.exists():  # a FIFO or a device was told "does not exist"
            raise ValueError(f"--data: {p} is neither a file nor a folder")
        else:
            raise FileNotFoundError(f"--data: {p} does not exist")
    docs = [doc for name, f in files
            for doc in (_jsonl_documents(name, f) if f.suffix.lower() == ".jsonl" else [(name, _read_utf8(f))])]
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise ValueError(f"--data: no non-empty .txt or .jsonl documents in {paths}")
    return docs


def folder_files(folder: Path) -> list[Path]:
    """The files under `folder`, sorted by path, as the user sees them: linked subfolders are
    followed (once each: a link to a parent does not loop; rglob skipped them, and their
    documents, in silence), hidden files and folders are not (.git, .ipynb_checkpoints, a
    .venv's licence texts), and a subfolder that cannot be read is an error, not a silent gap."""
    def unreadable(e: OSError) -> None:
        raise ValueError(f"--data: {e.filename} cannot be read ({e.strerror})")

    files, seen = [], set()
    for root, dirs, names in os.walk(folder, onerror=unreadable, followlinks=True):
        if (real := os.path.realpath(root)) in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(root, n) for n in names if not n.startswith(".") and Path(root, n).is_file()]
    return sorted(files)


def _jsonl_documents(name: str, path: Path) -> list[tuple[str, str]]:
    """A .jsonl file's documents, `name:line` each: every non-blank line must be a JSON object
    with a string `text` (other fields are ignored); anything else is refused, naming the line,
    rather than trained on or dropped unseen."""
    docs = []
    # "\n" only: str.splitlines also splits at U+2028, NEL and others that JSON allows inside a string
    for number, line in enumerate(_read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--data: {path}:{number} is not JSON ({e.msg})") from None
        if not (isinstance(row, dict) and isinstance(row.get("text"), str)):
            raise ValueError(f"--data: {path}:{number} is not an object with a string \"text\" field")
        docs.append((f"{name}:{number}", row["text"]))
    return docs


def _read_utf8(path: Path) -> str:
    """A text file's contents; other encodings are refused, not silently turned into U+FFFD. A
    UTF-8 byte-order mark, as some editors write, is dropped rather than trained on as U+FEFF.
    Line ends are read as Python reads text: \r\n and a lone \r become \n."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        with path.open("rb") as f:
            utf16 = f.read(2) in (b"\xff\xfe", b"\xfe\xff")  # UTF-16's byte-order mark
        raise ValueError(f"--data: {path} is not UTF-8 text ({e.reason} at byte {e.start}); if it is text, convert "
                         f"it first, e.g. `iconv -f {'utf-16' if utf16 else 'latin1'} -t utf-8`") from None
    except OSError as e:
        raise ValueError(f"--data: {path} cannot be read ({e.strerror})") from None
    # Valid UTF-8 is not always text: text has no NUL near its start (git's test for a binary
    # file). Zeros have, and so has UTF-16 with no byte-order mark, whose ASCII letters each pair
    # with a NUL (after the letter: little-endian).
    if (nul := text.find("\0", 0, 8000)) >= 0:
        raise ValueError(f"--data: {path} holds a NUL character (at character {nul}): not text; UTF-16 text "
                         f"without a byte-order mark reads so, convert it first, e.g. "
                         f"`iconv -f utf-16{'le' if nul % 2 else 'be'} -t utf-8`")
    return text


def load_corpus(data: str = "", val_fraction: float = 0.05, max_chars: int = 0) -> Corpus:
    """Split documents by a hash of their name (stable whatever else is in the corpus). Where
    whole documents cannot make about val_fraction of the text (from half to twice it: a few
    documents, or one far longer than the rest), the text's last val_fraction of characters is
    held out instead, cutting the document it falls in: two files of 3 KB and 300 KB had left
    the 3 KB one to train on."""
    docs = user_documents(data.split(",")) if data else default_documents()
    left_out = 0
    if max_chars:
        kept, total = [], 0
        for name, text in docs:
            if total >= max_chars:
                break
            kept.append((name, text[: max_chars - total]))
            total += len(kept[-1][1])
        left_out = sum(len(text) for _, text in docs) - total
        docs = kept
    train, val = [], []
    for name, text in docs:
        # surrogateescape: a file name that is not UTF-8 (its bytes, as os read them) hashes too
        bucket = int(hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest(), 16) % 1000
        (val if bucket < val_fraction * 1000 else train).append(text)
    total = sum(len(text) for _, text in docs)
    if val_fraction / 2 <= sum(map(len, val)) / max(total, 1) <= 2 * val_fraction:
        return Corpus(train, val, left_out)
    cut, seen = int(total * (1 - val_fraction)), 0
    train, val = [], []
    for _, text in docs:
        if seen + len(text) <= cut:
            train.append(text)
        elif seen >= cut:
            val.append(text)
        else:
            train.append(text[:cut - seen])
            val.append(text[cut - seen:])
        seen += len(text)
    return Corpus(train, val, left_out, by_characters=True)
