"""Word vocabulary with fixed special ids, saved as JSON (never pickle)."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

from ..errors import CvaeError

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


class Vocab:
    """Specials <pad>=0, <bos>=1, <eos>=2, <unk>=3, then words in order of first appearance."""

    def __init__(self, words: Iterable[str]):
        self.itos: list[str] = list(SPECIALS)
        for word in words:
            if word not in SPECIALS:
                self.itos.append(word)
        self.stoi = {word: i for i, word in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise CvaeError("vocabulary has duplicate words")

    @classmethod
    def build(cls, sentences: Iterable[list[str]], min_count: int = 1) -> "Vocab":
        counts: Counter[str] = Counter()
        order: dict[str, None] = {}
        for sentence in sentences:
            counts.update(sentence)
            order.update(dict.fromkeys(sentence))
        return cls(word for word in order if counts[word] >= min_count)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, words: list[str]) -> list[int]:
        return [self.stoi.get(word, UNK) for word in words]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[i] for i in ids]

    def save(self, path: str | Path) -> None:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps({"itos": self.itos}, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
            itos = raw["itos"]
        except FileNotFoundError:
            raise CvaeError(f"vocabulary file not found: {path}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise CvaeError(f"vocabulary file {path} is not a valid vocab JSON ({exc})") from None
        if list(itos[: len(SPECIALS)]) != list(SPECIALS):
            raise CvaeError(f"vocabulary file {path} does not start with the special tokens {SPECIALS}")
        return cls(itos)
