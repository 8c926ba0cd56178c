"""The embedded default corpus: Python standard-library sources, which every Python install has.

Real text (code, docstrings, comments) with no network. Files are read in sorted order so the corpus is the same
on every machine with the same Python minor version.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Sub-packages of the standard library left out: tests and vendored data would dominate by size.
_SKIP_PARTS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "turtledemo",
}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not (_SKIP_PARTS & set(p.relative_to(root).parts))]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def embedded_documents(max_bytes: int | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(doc_id, text)`` for standard-library source files until ``max_bytes`` of text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        yield str(path.relative_to(root)), text
        total += len(text.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            return
