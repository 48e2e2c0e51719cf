"""Where documents come from: this Python's standard library sources, or a folder of .txt/.jsonl files."""
from __future__ import annotations

import json
import os
import sysconfig
import zlib
from dataclasses import dataclass

SOURCES = ("stdlib", "path")  # data.source


class DataError(ValueError):
    """A data problem, described in one line that names the fix."""


@dataclass(frozen=True)
class Document:
    name: str  # path relative to the corpus root (+ '#<line>' for jsonl records)
    text: str


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return out


def _folder_files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith((".txt", ".jsonl"))]
    return out


def list_files(source: str, path: str) -> tuple[str, list[str]]:
    """(root, sorted file paths) of the corpus."""
    if source == "stdlib":
        root = stdlib_root()
        return root, _stdlib_files(root)
    if not os.path.isdir(path):
        raise DataError(f"data.path='{path}' does not exist: point data.path at a folder of .txt/.jsonl files")
    files = _folder_files(path)
    if not files:
        raise DataError(f"data.path='{path}' holds no .txt or .jsonl files: add some or use data.source=stdlib")
    return path, files


def read_documents(root: str, files: list[str]) -> list[Document]:
    docs = []
    for f in files:
        rel = os.path.relpath(f, root)
        with open(f, encoding="utf-8", errors="replace") as fh:
            if f.endswith(".jsonl"):
                for i, line in enumerate(fh):
                    if line.strip():
                        text = json.loads(line).get("text", "")
                        if text:
                            docs.append(Document(f"{rel}#{i}", text))
            else:
                text = fh.read()
                if text:
                    docs.append(Document(rel, text))
    return docs


def is_validation(name: str, val_percent: float) -> bool:
    """Held-out split by a stable hash of the document's name (independent of file order and machine)."""
    return zlib.crc32(name.encode()) % 10_000 < val_percent * 100
