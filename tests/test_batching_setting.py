"""data.batching: bucketed (length-sorted pools) or random (i.i.d.) training batches."""
import pytest

from cvae_core.config import build_config
from cvae_core.data.batching import POOL_BATCHES, BucketBatcher
from cvae_core.errors import CvaeError


def padding(batcher: BucketBatcher, order) -> float:
    batches = [batcher.batch(indices) for indices in order]
    return 1 - sum(b.n_tokens for b in batches) / sum(b.targets.numel() for b in batches)


def test_bucket_is_the_default_and_random_leaves_batches_unsorted():
    assert build_config("vae", "ptb", "quick").data.batching == "bucket"
    examples = [[1] * (1 + (i * 7919) % 40) for i in range(3200)]
    bucket = BucketBatcher(examples, 32, seed=0, pool_batches=POOL_BATCHES["bucket"])
    random = BucketBatcher(examples, 32, seed=0, pool_batches=POOL_BATCHES["random"])
    for batcher in (bucket, random):  # every sentence once per epoch, either way
        assert sorted(i for batch in batcher.order(0) for i in batch) == list(range(len(examples)))
    assert padding(bucket, bucket.order(0)) < 0.05
    assert padding(random, random.order(0)) > 0.3  # i.i.d. batches: about half padding


def test_unknown_batching_is_a_clear_error():
    with pytest.raises(CvaeError, match="data.batching='sorted' is not one of bucket, random"):
        build_config("vae", "ptb", "quick", {"data.batching": "sorted"})
