"""Vocabulary, corpora (PTB, Yelp-13, Yahoo, plain text) and length-bucketed batching."""
from .batching import Batch, BucketBatcher, make_batch
from .corpus import Corpus, load_corpus
from .text import read_lines
from .vocab import Vocab

__all__ = ["Batch", "BucketBatcher", "Corpus", "Vocab", "load_corpus", "make_batch", "read_lines"]
