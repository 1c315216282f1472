"""Text sources: the bundled corpus (the interpreter's own standard library)
and user files (plain text or JSON lines).

The bundled corpus is every ``*.py`` file of the running interpreter's
standard library (``sysconfig.get_paths()['stdlib']``, without
``site-packages``): real text, tens of MB, present on every machine. The file
list and its order are deterministic: files are ordered by the SHA-1 of their
POSIX path relative to the stdlib root. Hashing (rather than sorting by name)
spreads packages over the whole order, so the validation documents that
Megatron's ``split`` takes from the end are a fair sample, not just ``xml/``
and ``zipfile/``. Files that are not valid UTF-8 are skipped (the same ones
on every machine with the same interpreter).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from typing import Iterator, List, Sequence

CORPUS_VERSION = 1  # bump when the recipe changes, so cached datasets are rebuilt


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def bundled_corpus_id() -> str:
    """Names the bundled corpus: interpreter version + recipe version."""
    v = sys.version_info
    return f"stdlib-py{v.major}.{v.minor}.{v.micro}-v{CORPUS_VERSION}"


def bundled_files(root: str | None = None) -> List[str]:
    """Relative POSIX paths of the bundled corpus, in corpus order."""
    root = root or stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("site-packages", "__pycache__", "dist-packages"))
        for name in filenames:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found, key=lambda rel: (hashlib.sha1(rel.encode()).hexdigest(), rel))


def iter_bundled(root: str | None = None) -> Iterator[Document]:
    root = root or stdlib_root()
    for rel in bundled_files(root):
        with open(os.path.join(root, rel), "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            yield Document(rel, text)


def iter_user_files(paths: Sequence[str], json_keys: Sequence[str] = ("text",)) -> Iterator[Document]:
    """Documents from user files: ``.jsonl``/``.json`` (one object per line,
    text under ``json_keys``) or plain text (one document per file)."""
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--input {path!r}: no such file.")
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{lineno}: not a JSON object ({exc.msg}); "
                                         f"JSON-lines input needs one object per line.") from None
                    for key in json_keys:
                        if key not in obj:
                            raise ValueError(f"{path}:{lineno}: key {key!r} missing; pass "
                                             f"--json-keys with the key holding the text "
                                             f"(found {sorted(obj)}).")
                        if str(obj[key]).strip():
                            yield Document(f"{path}:{lineno}:{key}", str(obj[key]))
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if text.strip():
                yield Document(path, text)
