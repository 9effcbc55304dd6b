"""Regenerate ``corpus.txt``, the small English corpus that ships with swarmtrain.

The corpus is built only from text that ships with CPython itself, so it exists
offline on any machine and its licence is the Python Software Foundation
License (PSF-2.0):

1. the "pydoc topics" of the language reference (``pydoc_data.topics``), in
   sorted topic order, and
2. docstrings of the pure-Python standard library, read with :mod:`ast` (no
   module is imported, so nothing is executed), in sorted file order.

Only prose paragraphs are kept: code samples, grammar rules, doctest sessions
and tables are dropped, and repeated paragraphs are kept once. The output is
cut at a paragraph boundary once it reaches ``--max-bytes``. The result is
deterministic for a given CPython version; the version used is recorded in
``README.md`` next to this script.

Usage (run once, from the repository root)::

    python peer/training/data/make_corpus.py            # writes peer/training/data/corpus.txt
    python peer/training/data/make_corpus.py --max-bytes 1500000 --out corpus-preview.txt
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import sysconfig
import textwrap
from pathlib import Path
from typing import Iterator

# Parts of the standard library that are tests, demos, vendored or generated code.
SKIPPED_DIRS = {
    "test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo", "ensurepip",
    "site-packages", "dist-packages", "__pycache__", "pydoc_data", "encodings",
}
MIN_WORDS = 8
DEFAULT_MAX_BYTES = 1_200_000


def is_prose(paragraph: str) -> bool:
    """Return True if a dedented paragraph reads like English prose (not code, tables or grammar)."""
    lines = paragraph.splitlines()
    if any(line[:1].isspace() for line in lines):
        return False  # indented: code sample or literal block
    if any(marker in paragraph for marker in (">>>", "::=", "...:", "====", "----", "****", "|", "{", "}", "\\")):
        return False
    if len(paragraph.split()) < MIN_WORDS or paragraph.rstrip()[-1:] not in ".?!":
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in paragraph)
    return letters / len(paragraph) >= 0.85


def paragraphs(text: str) -> Iterator[str]:
    """Split text on blank lines and yield the dedented, stripped paragraphs."""
    for block in re.split(r"\n\s*\n", text):
        block = textwrap.dedent(block).strip("\n").rstrip()
        if block:
            yield block


def topic_texts() -> Iterator[str]:
    """Yield the language-reference topics shipped in ``pydoc_data.topics``, sorted by topic name."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def docstring_texts(stdlib: Path) -> Iterator[str]:
    """Yield the module, class and function docstrings of the stdlib's .py files, in sorted path order."""
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if SKIPPED_DIRS.intersection(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    yield doc


def build_corpus(max_bytes: int) -> str:
    """Return the corpus text: unique prose paragraphs separated by blank lines, at most ``max_bytes`` UTF-8 bytes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    kept: list[str] = []
    size = 0
    for source in (topic_texts(), docstring_texts(stdlib)):
        for text in source:
            for paragraph in paragraphs(text):
                if paragraph in seen or not is_prose(paragraph):
                    continue
                seen.add(paragraph)
                cost = len(paragraph.encode("utf-8")) + 2
                if size + cost > max_bytes:
                    return "\n\n".join(kept) + "\n"
                kept.append(paragraph)
                size += cost
    return "\n\n".join(kept) + "\n"


def main() -> None:
    """Command-line entry point: write the corpus file and report its size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("corpus.txt"))
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    args = parser.parse_args()
    text = build_corpus(args.max_bytes)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text.encode('utf-8'))} bytes) with Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
