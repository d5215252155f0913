"""Length-bucketed batches in a seeded order that can be resumed from (epoch, index)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor

from .vocab import BOS, EOS, PAD


@dataclass
class Batch:
    """A padded batch. B sentences, T = longest sentence length.

    words   [B, T]    word ids, no BOS/EOS (encoder input), PAD-padded
    lengths [B]       number of words per sentence
    inputs  [B, T+1]  <bos> w1..wn (decoder input)
    targets [B, T+1]  w1..wn <eos> (decoder target); PAD positions are ignored by the loss

    Conditional (post/response) batches describe the RESPONSE in the four fields above and add
    post_words [B, P] and post_lengths [B] for the post (the condition); None otherwise.
    """

    words: Tensor
    lengths: Tensor
    inputs: Tensor
    targets: Tensor
    post_words: Tensor | None = None
    post_lengths: Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        """The batch on ``device``; to a GPU through pinned memory, so the copy does not block.
        The lengths stay on the CPU: the encoders' packed sequences read them there, and copying
        them back from a GPU would make every step wait for it."""
        device = torch.device(device)
        pinned = device.type == "cuda"

        def moved(name: str, t: Tensor | None) -> Tensor | None:
            if t is None or name.endswith("lengths"):  # a sentence batch has no post fields
                return t
            return (t.pin_memory() if pinned else t).to(device, non_blocking=pinned)

        return type(self)(**{f.name: moved(f.name, getattr(self, f.name)) for f in fields(self)})

    def select(self, index: Tensor | list[int] | slice) -> "Batch":
        """The sentences at ``index`` (first dimension of every field), still padded to this T."""
        return type(self)(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                             for f in fields(self)})

    @property
    def size(self) -> int:
        return self.words.shape[0]

    @property
    def n_tokens(self) -> int:
        """Words plus one <eos> per sentence."""
        return int(self.lengths.sum().item()) + self.size


class Pair(NamedTuple):
    """One conditional example: the post (condition) and its response, word ids without BOS/EOS."""

    post: list[int]
    response: list[int]


def example_length(example: list[int] | Pair) -> int:
    """Words the decoder reads: the sentence, or a pair's response."""
    return len(example.response) if isinstance(example, Pair) else len(example)


def make_batch(examples: list[list[int]] | list[Pair]) -> Batch:
    """Pad sentences into a Batch; pairs give a response batch with the posts attached."""
    if examples and isinstance(examples[0], Pair):
        batch = make_batch([pair.response for pair in examples])
        posts = make_batch([pair.post for pair in examples])
        batch.post_words, batch.post_lengths = posts.words, posts.lengths
        return batch
    size = len(examples)
    longest = max(len(x) for x in examples)
    words = torch.full((size, longest), PAD, dtype=torch.long)
    inputs = torch.full((size, longest + 1), PAD, dtype=torch.long)
    targets = torch.full((size, longest + 1), PAD, dtype=torch.long)
    inputs[:, 0] = BOS
    for i, ids in enumerate(examples):
        n = len(ids)
        row = torch.tensor(ids, dtype=torch.long)
        words[i, :n] = row
        inputs[i, 1 : n + 1] = row
        targets[i, :n] = row
        targets[i, n] = EOS
    lengths = torch.tensor([len(x) for x in examples], dtype=torch.long)
    return Batch(words, lengths, inputs, targets)


# data.batching -> BucketBatcher pool size: pools of 50 batches sorted by length, or pools of one
# batch, which leaves i.i.d. shuffled batches (the authors' DataLoader(shuffle=True)).
POOL_BATCHES = {"bucket": 50, "random": 1}


class BucketBatcher:
    """Shuffled, length-bucketed training batches; epoch e's order depends only on (seed, e).

    Each epoch: shuffle, cut into pools of ``pool_batches`` batches, sort each pool by length
    (so padding is small), cut into batches, shuffle the batch order.  The last partial batch is
    kept, as in the authors' code (a last batch of one sentence joins its neighbour).  ``batches(epoch)[index:]`` resumes mid-epoch exactly.
    """

    def __init__(self, examples: list[list[int]], batch_size: int, seed: int, pool_batches: int = 50):
        self.examples, self.batch_size, self.seed, self.pool_batches = examples, batch_size, seed, pool_batches

    def order(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        perm = torch.randperm(len(self.examples), generator=generator).tolist()
        pool = self.batch_size * self.pool_batches
        batches: list[list[int]] = []
        for start in range(0, len(perm), pool):
            chunk = sorted(perm[start : start + pool], key=lambda i: example_length(self.examples[i]))
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        if len(batches) > 1 and len(batches[-1]) == 1:
            # A one-sentence batch breaks BatchNorm in training (NF/WAE-NF heads, CNN decoder).
            batches[-2].extend(batches.pop())
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffle]

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def batch(self, indices: list[int]) -> Batch:
        return make_batch([self.examples[i] for i in indices])


class BatchStream:
    """A training run's batches, in ``batcher``'s order from the position (epoch, batch_index):
    ``next`` rolls over to the next epoch's order after an epoch's last batch.  The position is
    what a checkpoint records (``TrainState.epoch``, ``batch_index``) to resume exactly."""

    def __init__(self, batcher: BucketBatcher, epoch: int = 0, batch_index: int = 0):
        self.batcher, self.epoch, self.batch_index = batcher, epoch, batch_index
        self.order = batcher.order(epoch)

    def next(self, device: torch.device | str) -> Batch:
        """The batch at the position (on ``device``); the position moves past it."""
        if self.batch_index >= len(self.order):
            self.epoch, self.batch_index = self.epoch + 1, 0
            self.order = self.batcher.order(self.epoch)
        batch = self.batcher.batch(self.order[self.batch_index]).to(device)
        self.batch_index += 1
        return batch

    def random(self, device: torch.device | str) -> Batch:
        """A random batch of the current epoch (drawn from torch's RNG); the position stays."""
        return self.batcher.batch(self.order[int(torch.randint(len(self.order), ()))]).to(device)


def eval_batches(examples: list[list[int]], batch_size: int) -> list[Batch]:
    """Consecutive, unshuffled batches in file order (the MI estimator's batches are these)."""
    return [make_batch(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


def length_sorted_batches(examples: list[list[int]] | list[Pair], batch_size: int) -> list[tuple[list[int], Batch]]:
    """Evaluation batches of sentences of similar length -> [(indices into ``examples``, Batch)].

    Sorting the whole split by length (stable, so ties keep file order) makes almost every
    decoded position a real token; in file order about half of them are padding.  Per-sentence
    results do not depend on the grouping when each sentence has its own sample stream.
    """
    order = sorted(range(len(examples)), key=lambda i: example_length(examples[i]))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [(group, make_batch([examples[i] for i in group])) for group in groups]
