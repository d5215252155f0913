"""A pack's checkpoints are ordinary ones: a member's checkpoint loads, evaluates and resumes as a
standalone run's, and K of them rebuild the pack (weights and Adam state) exactly."""
import json
import random

import pytest
import torch

from cvae_core.checkpoint import TrainState, load_checkpoint, load_model, restore_rng, save_checkpoint
from cvae_core.cli import main as cvae_main
from cvae_core.config import build_config
from cvae_core.data import BucketBatcher, load_corpus
from cvae_core.data.batching import POOL_BATCHES
from cvae_core.errors import CvaeError
from cvae_core.models import build_model
from cvae_core.packed import (PackedObjective, load_pack, member_state_dict, pack, save_member_checkpoint,
                              train_step)
from cvae_core.train import make_optimizer, train
from conftest import TINY
from test_packed import COUPLED_MEMBERS, assert_close_to

LATENT = 4  # tests/conftest.py's TINY latent size


class Pack:
    """A pack of tiny coupled members (member k: COUPLED_MEMBERS[k], seed k) and the trainer's
    batches of one member's seed, trained with ``packed.train_step``."""

    def __init__(self, tiny_config, n_members=3, batch_seed=0, **shared):
        self.configs = [tiny_config("coupled-vae", **shared, **{"train.seed": k, **COUPLED_MEMBERS[k]})
                        for k in range(n_members)]
        self.corpus = load_corpus(self.configs[0].data, ("train", "valid"))
        models = []
        for k, config in enumerate(self.configs):
            torch.manual_seed(10 + k)
            models.append(build_model(config, len(self.corpus.vocab)))
        self.model = pack(models)
        self.objective = PackedObjective(self.configs)
        self.optimizer = make_optimizer(self.model, self.configs[0])
        config = self.configs[batch_seed]
        # The batches a standalone run of member batch_seed reads, in its order (epoch 0).
        batcher = BucketBatcher(self.corpus["train"].examples, config.train.batch_size, config.train.seed,
                                pool_batches=POOL_BATCHES[config.data.batching])
        self.batches = [batcher.batch(index) for index in batcher.order(0)]
        self.step = 0

    def train(self, steps, noises=None):
        for n in range(steps):
            self.step += 1
            train_step(self.model, self.objective, self.optimizer, self.batches[self.step - 1], self.step,
                       self.configs[0], None if noises is None else noises[n])

    def save(self, directory, member):
        return save_member_checkpoint(directory, self.model, self.optimizer, member, config=self.configs[member],
                                      state=TrainState(step=self.step, epoch=0, batch_index=self.step),
                                      vocab=self.corpus.vocab)


def packed_parameter(pack_, name):
    return dict(pack_.model.named_parameters())[name]


def test_member_checkpoint_is_an_ordinary_checkpoint(tiny_config, tmp_path, capsys):
    trained = Pack(tiny_config, n_members=2)
    trained.train(3)
    path = trained.save(tmp_path / "member1", member=1)

    model, config, vocab = load_model(path)
    assert config.flat() == trained.configs[1].flat() and vocab.itos == trained.corpus.vocab.itos
    expected = member_state_dict(trained.model, 1)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())
    # The member's Adam state, in the ordinary model's parameter order.
    saved = load_checkpoint(path).optimizer
    order = [name for name, _ in model.named_parameters()]
    for name in ("base.decoder.output.weight", "base.embedding.weight", "twin_signal.net.0.bias"):
        packed_state = trained.optimizer.state[packed_parameter(trained, name)]
        member_state = saved["state"][order.index(name)]
        assert torch.equal(member_state["exp_avg"], packed_state["exp_avg"][1])
        assert torch.equal(member_state["exp_avg_sq"], packed_state["exp_avg_sq"][1])
        assert float(member_state["step"]) == 3.0
    assert order.index("twin_head.log_std.weight") not in saved["state"]  # unused, as in a standalone run

    code = cvae_main(["evaluate", str(path), "--split", "valid", "--n-samples", "3", "--mi-samples", "3",
                      "--limit", "20", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["n_sentences"] == 20 and 0 < result["nll"] < 1e4


def test_member_resumed_standalone_continues_as_in_the_pack(tiny_config, tmp_path):
    """Member 1 trained N packed steps, saved, then resumed by the ordinary trainer for M steps
    (`train(..., resume_from=...)`) equals member 1 trained N + M packed steps on the same
    batches with the same posterior noise (dropout off: the noise is all the randomness)."""
    n_before, n_after, member = 6, 8, 1  # the learning rate halves after step 10 (TINY)
    trained = Pack(tiny_config, batch_seed=member, **{"train.clip_norm": 5.0, "train.steps": n_before + n_after,
                                                      "train.eval_every": n_before + n_after})
    trained.train(n_before)
    torch.manual_seed(2024)  # the RNG state the member checkpoint records
    path = trained.save(tmp_path / "member", member)

    train(trained.configs[member], tmp_path / "standalone", resume_from=path, corpus=trained.corpus,
          log=lambda _: None)

    # The noise the resumed run drew: the next B x d normal draws of the restored RNG, step after step.
    restore_rng(load_checkpoint(path).rng)
    batches = trained.batches[n_before : n_before + n_after]
    member_noise = [torch.empty(len(b.lengths), LATENT).normal_() for b in batches]
    others = torch.Generator().manual_seed(7)
    noises = []
    for batch, noise in zip(batches, member_noise):
        pack_noise = torch.randn(len(trained.configs), len(batch.lengths), LATENT, generator=others)
        pack_noise[member] = noise
        noises.append(pack_noise)
    trained.train(n_after, noises)

    resumed, _, _ = load_model(tmp_path / "standalone" / "checkpoints" / "latest")
    expected = member_state_dict(trained.model, member)
    for name, tensor in resumed.state_dict().items():
        assert_close_to(tensor, expected[name])
    assert not torch.allclose(expected["base.decoder.output.weight"],
                              load_model(path)[0].state_dict()["base.decoder.output.weight"])


def test_pack_resumed_from_member_checkpoints_continues_identically(tiny_config, tmp_path):
    """With dropout and sampling on: K member checkpoints -> load_pack -> the pack continues
    bit for bit as the uninterrupted pack (weights and Adam state), its RNG restored."""
    trained = Pack(tiny_config, **{"model.dropout": 0.3})
    trained.train(3)
    paths = [trained.save(tmp_path / f"member{k}", k) for k in range(len(trained.configs))]
    trained.train(4)  # the uninterrupted pack: saving has not touched its random stream

    loaded = load_pack(paths)
    assert [c.flat() for c in loaded.configs] == [c.flat() for c in trained.configs]
    assert [s.step for s in loaded.states] == [3, 3, 3]
    restore_rng(loaded.rng)
    objective = PackedObjective(loaded.configs)
    for step in range(4, 8):
        train_step(loaded.model, objective, loaded.optimizer, trained.batches[step - 1], step, loaded.configs[0])

    reference = dict(trained.model.named_parameters())
    for name, parameter in loaded.model.named_parameters():
        assert torch.equal(parameter, reference[name]), name
        if reference[name] in trained.optimizer.state:
            for key, value in trained.optimizer.state[reference[name]].items():
                assert torch.equal(loaded.optimizer.state[parameter][key], value), (name, key)
        else:
            assert parameter not in loaded.optimizer.state


def test_unpackable_checkpoints_are_refused(tiny_config, tmp_path):
    trained = Pack(tiny_config, n_members=2)
    with pytest.raises(CvaeError, match="member 2 is not in this pack"):
        save_member_checkpoint(tmp_path / "absent", trained.model, trained.optimizer, 2, config=trained.configs[0],
                               state=TrainState(), vocab=trained.corpus.vocab)
    assert not (tmp_path / "absent").exists()
    trained.train(1)
    first = trained.save(tmp_path / "step1", 0)
    trained.train(1)
    second = trained.save(tmp_path / "step2", 1)
    with pytest.raises(CvaeError, match="must be at one step"):
        load_pack([first, second])
    with pytest.raises(CvaeError, match="at least one checkpoint"):
        load_pack([])
    model, config, vocab = load_model(second)
    weights_only = save_checkpoint(tmp_path / "no-optimizer", model=model, optimizer=None,
                                   state=TrainState(step=2), config=config, vocab=vocab)
    with pytest.raises(CvaeError, match="no optimizer state"):
        load_pack([weights_only, second])
    with pytest.raises(CvaeError, match="share train.batch_size"):
        wider = tiny_config("coupled-vae", **{"train.batch_size": 4})
        save_checkpoint(tmp_path / "other", model=model, optimizer=None, state=TrainState(step=2), config=wider,
                        vocab=vocab)
        load_pack([second, tmp_path / "other"])



# ---------------------------------------------------------------------------------------------
# With dropout and sampling on, a packed run cannot repeat a standalone run's random draws; what
# must hold is that its members train like standalone runs: the same distribution of outcomes.

AGREEMENT_STEPS = 200
T_CRITICAL = 4.604  # Student's t with 4 degrees of freedom (3 + 3 runs): two-sided 1%


@pytest.fixture(scope="module")
def patterned_data_dir(tmp_path_factory):
    """Text files over 20 words where each next word is usually the previous one's successor: a
    tiny model learns it within a few hundred steps, so dropout changes the training loss a lot
    (on a slice of PTB the same model stays near the unigram loss and dropout hardly shows)."""
    rng = random.Random(0)

    def sentence():
        word, words = rng.randrange(20), []
        for _ in range(rng.randint(4, 10)):
            words.append(f"w{word}")
            word = (word + 1) % 20 if rng.random() < 0.85 else rng.randrange(20)
        return " ".join(words)

    folder = tmp_path_factory.mktemp("patterned")
    for split, n in (("train", 300), ("valid", 50), ("test", 50)):
        (folder / f"{split}.txt").write_text("\n".join(sentence() for _ in range(n)) + "\n")
    return folder


def agreement_config(data_dir, seed):
    """The tiny Coupled-VAE with dropout 0.5.  The loop evaluates at steps 100 and 200, so the
    last evaluation's train_loss is the mean training loss of steps 101-200."""
    return build_config("coupled-vae", "text", "quick", {
        **TINY, "data.data_dir": str(data_dir), "model.dropout": 0.5, "train.lr": 5e-3, "train.seed": seed,
        "train.steps": AGREEMENT_STEPS, "train.eval_every": AGREEMENT_STEPS // 2, "train.log_every": AGREEMENT_STEPS,
        "train.lr_decay_start": 10 * AGREEMENT_STEPS, "regularizer.anneal_steps": AGREEMENT_STEPS // 2})


@pytest.fixture(scope="module")
def standalone_losses(tmp_path_factory, patterned_data_dir):
    """The ordinary trainer's mean training loss of steps 101-200, seeds 0, 1, 2."""
    torch.set_num_threads(1)  # as every test runs (conftest); module fixtures are set up before that
    losses = []
    for seed in range(3):
        result = train(agreement_config(patterned_data_dir, seed), tmp_path_factory.mktemp(f"standalone{seed}"),
                       log=lambda _: None)
        losses.append(result.history[-1]["train_loss"])
    return losses


def packed_losses(data_dir):
    """One pack of seeds 0, 1, 2 (each member initialised as the trainer initialises its seed),
    trained on the batches the trainer reads for seed 0 -> each member's mean training loss of
    steps 101-200."""
    configs = [agreement_config(data_dir, seed) for seed in range(3)]
    corpus = load_corpus(configs[0].data, ("train",))
    models = []
    for config in configs:
        torch.manual_seed(config.train.seed)
        models.append(build_model(config, len(corpus.vocab)))
    packed, objective = pack(models), PackedObjective(configs)
    optimizer = make_optimizer(packed, configs[0])
    batcher = BucketBatcher(corpus["train"].examples, configs[0].train.batch_size, configs[0].train.seed,
                            pool_batches=POOL_BATCHES[configs[0].data.batching])
    order = [index for epoch in range(AGREEMENT_STEPS) for index in batcher.order(epoch)][:AGREEMENT_STEPS]
    torch.manual_seed(0)
    losses = []
    for step, index in enumerate(order, 1):
        parts, _ = train_step(packed, objective, optimizer, batcher.batch(index), step, configs[0])
        losses.append(parts["loss"])
    return torch.stack(losses[AGREEMENT_STEPS // 2 :]).mean(0).tolist()


def student_t(a, b):
    """Two-sample Student's t statistic of the means of a and b (pooled variance)."""
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    pooled = ((len(a) - 1) * a.var() + (len(b) - 1) * b.var()) / (len(a) + len(b) - 2)
    return float((a.mean() - b.mean()) / (pooled * (1 / len(a) + 1 / len(b))).sqrt())


@pytest.mark.slow
def test_packed_members_train_like_standalone_runs(patterned_data_dir, standalone_losses):
    """Dropout 0.5 and posterior sampling on, 200 steps: the members' mean training losses and the
    standalone runs' (seeds 0-2 each) have equal means by Student's t-test at the 1% level."""
    packed = packed_losses(patterned_data_dir)
    t = student_t(packed, standalone_losses)
    assert abs(t) < T_CRITICAL, (packed, standalone_losses, t)


@pytest.mark.slow
def test_agreement_test_detects_packed_training_without_dropout(patterned_data_dir, standalone_losses, monkeypatch):
    """The test above can fail: a pack whose dropout is off is told apart from standalone runs."""
    # The standalone losses are computed (a fixture) before this: only the pack trains without dropout.
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda x, p=0.5, training=True, inplace=False: x)
    packed = packed_losses(patterned_data_dir)
    t = student_t(packed, standalone_losses)
    assert abs(t) > T_CRITICAL, (packed, standalone_losses, t)
