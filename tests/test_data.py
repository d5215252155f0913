"""Vocabulary, corpus formats (PTB, Yelp-13, Yahoo, plain text), bucketed resumable batching."""
import json

import pytest

from cvae_core.config import DataConfig
from cvae_core.data import BucketBatcher, Vocab, load_corpus, make_batch
from cvae_core.data.corpus import KNOWN_CHECKSUMS
from cvae_core.data.text import tokenize
from cvae_core.data.vocab import BOS, EOS, PAD, UNK
from cvae_core.errors import CvaeError
from conftest import SHARED_DATA


def test_vocab_specials_order_and_json_round_trip(tmp_path):
    vocab = Vocab.build([["b", "a", "b"], ["c", "a"], ["rare"]], min_count=2)
    assert vocab.itos == ["<pad>", "<bos>", "<eos>", "<unk>", "b", "a"]
    assert (PAD, BOS, EOS, UNK) == (0, 1, 2, 3)
    assert vocab.encode(["a", "rare", "b"]) == [5, UNK, 4]
    vocab.save(tmp_path / "v.json")
    assert json.loads((tmp_path / "v.json").read_text())["itos"] == vocab.itos  # plain JSON, no pickle
    assert Vocab.load(tmp_path / "v.json").itos == vocab.itos


def test_vocab_load_rejects_bad_files(tmp_path):
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(CvaeError, match="not a valid vocab JSON"):
        Vocab.load(tmp_path / "bad.json")
    with pytest.raises(CvaeError, match="not found"):
        Vocab.load(tmp_path / "missing.json")


def test_ptb_splits_and_vocabulary_size():
    corpus = load_corpus(DataConfig(dataset="ptb"))
    assert [len(corpus[s].examples) for s in ("train", "valid", "test")] == [42068, 3370, 3761]
    # 9,999 word types incl. <unk> (Mikolov's 10K counts </s>) + pad/bos/eos = the authors' 10,002
    assert len(corpus.vocab) == 10002
    for split in ("train", "valid", "test"):
        assert corpus[split].md5 == KNOWN_CHECKSUMS[("ptb", split)]


def test_yelp_drops_the_rating_digit_and_skips_empty_reviews():
    lines = ["3 great food .", "0", "", "4 ok"]
    assert tokenize(lines, "yelp13") == [["great", "food", "."], ["ok"]]
    assert tokenize(["3 great"], "yahoo") == [["3", "great"]]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the project")
@pytest.mark.parametrize("dataset,n_valid,n_test", [("yelp13", 7773, 8671), ("yahoo", 10000, 10000)])
def test_real_yelp13_and_yahoo_files(dataset, n_valid, n_test):
    # The training splits are not shipped; train on valid to check the formats and checksums.
    folder = SHARED_DATA / dataset
    config = DataConfig(dataset=dataset, train_path=str(folder / "valid.txt"),
                        valid_path=str(folder / "valid.txt"), test_path=str(folder / "test.txt"))
    corpus = load_corpus(config)
    assert len(corpus["valid"].examples) == n_valid and len(corpus["test"].examples) == n_test
    assert corpus["test"].md5 == KNOWN_CHECKSUMS[(dataset, "test")]
    assert max(len(x) for x in corpus["test"].examples) <= 200
    if dataset == "yelp13":  # rating digits are gone from the vocabulary's first words
        first = corpus.vocab.itos[4:50]
        assert not {"0", "1", "2", "3", "4"} & set(first[:3])


def test_truncation_and_batch_tensors(tmp_path):
    (tmp_path / "train.txt").write_text("a b c d e\nb c\n")
    config = DataConfig(dataset="text", data_dir=str(tmp_path), train_path=str(tmp_path / "train.txt"),
                        max_len=3)
    corpus = load_corpus(config, ("train",))
    assert [len(x) for x in corpus["train"].examples] == [3, 2]
    batch = make_batch(corpus["train"].examples)
    a, b, c = corpus.vocab.encode(["a", "b", "c"])
    assert batch.words.tolist() == [[a, b, c], [b, c, PAD]]
    assert batch.inputs.tolist() == [[BOS, a, b, c], [BOS, b, c, PAD]]
    assert batch.targets.tolist() == [[a, b, c, EOS], [b, c, EOS, PAD]]
    assert batch.n_tokens == 3 + 2 + 2


def test_bucketed_order_is_seeded_complete_and_bucketed():
    examples = [[1] * (i % 37 + 1) for i in range(1000)]
    batcher = BucketBatcher(examples, batch_size=16, seed=5)
    order = batcher.order(0)
    assert order == BucketBatcher(examples, 16, 5).order(0)  # same seed, same order: resumable
    assert order != batcher.order(1)
    flat = sorted(i for batch in order for i in batch)
    assert flat == list(range(1000))  # every example once per epoch, last partial batch kept
    spread = [max(len(examples[i]) for i in b) - min(len(examples[i]) for i in b) for b in order]
    assert sum(spread) / len(spread) < 3  # length-bucketed: little padding


def test_empty_and_missing_and_non_utf8_files(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(CvaeError, match="empty"):
        load_corpus(DataConfig(dataset="text", train_path=str(tmp_path / "empty.txt")), ("train",))
    with pytest.raises(CvaeError, match="not found"):
        load_corpus(DataConfig(dataset="text", train_path=str(tmp_path / "nope.txt")), ("train",))
    (tmp_path / "latin1.txt").write_bytes("ok line\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(CvaeError, match="line 2 is not valid UTF-8"):
        load_corpus(DataConfig(dataset="text", train_path=str(tmp_path / "latin1.txt")), ("train",))


def test_a_last_batch_of_one_sentence_joins_its_neighbour():
    examples = [[1] * (i % 5 + 1) for i in range(33)]  # 33 = 2 x 16 + 1
    order = BucketBatcher(examples, batch_size=16, seed=0).order(0)
    assert sorted(len(b) for b in order) == [16, 17]
    assert sorted(i for b in order for i in b) == list(range(33))
