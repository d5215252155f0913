"""train_pack: a pack's members are ordinary runs, each trained exactly as its standalone run
(dropout 0, seeds equal to the pack's batch seed); stopping or a divergence drops a member without
changing the others; a pack resumed from its members' checkpoints continues as if uninterrupted."""
import json
import math
from pathlib import Path

import pytest
import torch

from cvae_core.checkpoint import load_model, read_state, step_dir
from cvae_core.cli import main as cvae_main
from cvae_core.config import build_config
from cvae_core.errors import CvaeError
from cvae_core.packed import loop as packed_loop
from cvae_core.packed import train_pack
from cvae_core.train import StopTraining, train
from conftest import TINY
from test_packed import COUPLED_MEMBERS

MEMBERS = COUPLED_MEMBERS[:3]  # coupled members with different loss weights and KL schedules
RUN = {"train.steps": 20, "train.eval_every": 10, "train.log_every": 5}
NOT_DETERMINISTIC = {"tokens_per_s"}  # wall-clock throughput
STEP_10, STEP_20 = (step_dir(Path("."), step).name for step in (10, 20))


def member_configs(data_dir, seeds=(0, 1, 2), **shared):
    return [build_config("coupled-vae", "text", "quick",
                         {**TINY, **RUN, "data.data_dir": str(data_dir), "train.seed": seed, **member, **shared})
            for seed, member in zip(seeds, MEMBERS)]


def step_names(ckpt_root):
    return sorted(p.name for p in ckpt_root.glob("step-*"))


def quiet(_text):
    pass


def assert_same_histories(actual, expected):
    """Two runs' evaluation metrics: the same keys, the same values (float tolerance), step by step."""
    assert [m["step"] for m in actual] == [m["step"] for m in expected]
    for got, want in zip(actual, expected):
        assert set(got) == set(want)
        for key in set(want) - NOT_DETERMINISTIC:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)


@pytest.fixture(scope="module")
def pack_without_member_1(tiny_data_dir, tmp_path_factory):
    """The reference for dropping member 1: members 0 and 2 alone, the same batches (configs[0]'s seed)."""
    torch.set_num_threads(1)
    configs = member_configs(tiny_data_dir)
    out = tmp_path_factory.mktemp("pack_0_2")
    ends = train_pack([configs[0], configs[2]], [out / "m0", out / "m2"], log=quiet)
    return {0: ends[0].result.history, 2: ends[1].result.history}


@pytest.mark.slow  # about 30 s on a busy 2-core machine: a pack and two standalone runs
def test_members_are_ordinary_runs_equal_to_their_standalone_runs(tiny_data_dir, tmp_path, capsys):
    """Members 0 and 1 share the batch seed 0 (the pack reads seed 0's batches), so each one's
    run must equal train() of its config: every evaluation's metrics (train() keys and values),
    checkpoints, best link.  Dropout is 0 (TINY): the posterior noise is all the randomness."""
    configs = member_configs(tiny_data_dir, seeds=(0, 0))
    lines = []
    ended = []
    ends = train_pack(configs, [tmp_path / "m0", tmp_path / "m1"], log=lines.append, on_member_end=ended.append)
    assert [e.member for e in ends] == [0, 1] and [e.outcome for e in ends] == ["done", "done"]
    assert [e.member for e in ended] == [0, 1] and all(e.diverged is None for e in ends)
    # One progress line per log step for the pack, one eval line per member.
    assert sum(line.startswith("step 5/20 | 2 members | loss 0:") for line in lines) == 1
    assert sum(line.startswith("member 1: eval step 20 | val_nll") for line in lines) == 1

    for k, (config, end) in enumerate(zip(configs, ends)):
        standalone = train(config, tmp_path / f"standalone{k}", log=quiet)
        assert_same_histories(end.result.history, standalone.history)
        assert end.result.steps == 20 and end.result.selection_metric == "val_nll"
        # An ordinary run's tree: config.json, step checkpoints, latest, best at the lowest val_nll.
        root = tmp_path / f"m{k}" / "checkpoints"
        assert json.loads((tmp_path / f"m{k}" / "config.json").read_text()) == json.loads(config.to_json())
        standalone_root = tmp_path / f"standalone{k}" / "checkpoints"
        assert step_names(root) == step_names(standalone_root) == [STEP_20]  # train.keep_last 1 prunes step 10
        best_step = min(end.result.history, key=lambda m: m["val_nll"])["step"]
        assert read_state(root / "best").step == best_step == end.result.best_step
        assert (root / "latest").resolve() == step_dir(root, 20)
        model, saved, _ = load_model(root / "latest")
        reference, _, _ = load_model(standalone_root / "latest")
        assert saved.flat() == config.flat()
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, reference.state_dict()[name], rtol=1e-4, atol=1e-5)

    capsys.readouterr()
    code = cvae_main(["evaluate", str(tmp_path / "m1" / "checkpoints" / "best"), "--split", "valid",
                      "--n-samples", "3", "--mi-samples", "3", "--limit", "20", "--json"])
    assert code == 0 and 0 < json.loads(capsys.readouterr().out)["nll"] < 1e4


def test_a_member_stopped_by_a_callback_leaves_the_pack_and_the_others_unchanged(tiny_data_dir, tmp_path,
                                                                                   pack_without_member_1):
    configs = member_configs(tiny_data_dir)
    seen = []

    def stop_member_1(evaluations):
        seen.append([(e.member, e.metrics["step"], e.checkpoint.name) for e in evaluations])
        return [1] if evaluations[0].metrics["step"] == 10 else None

    lines, ended = [], []
    ends = train_pack(configs, [tmp_path / f"m{k}" for k in range(3)], [stop_member_1], log=lines.append,
                      on_member_end=lambda end: ended.append(end.member))
    assert seen == [[(0, 10.0, STEP_10), (1, 10.0, STEP_10), (2, 10.0, STEP_10)],
                    [(0, 20.0, STEP_20), (2, 20.0, STEP_20)]]
    assert [e.outcome for e in ends] == ["done", "stopped", "done"] and ended == [1, 0, 2]
    assert ends[1].result.steps == 10 and [m["step"] for m in ends[1].result.history] == [10.0]
    assert step_names(tmp_path / "m1" / "checkpoints") == [STEP_10]
    assert any(line.startswith("step 15/20 | 2 members | loss 0:") and " 2:" in line for line in lines)
    # The smaller pack kept members 0 and 2's weights and Adam state: they go on exactly as without member 1.
    assert_same_histories(ends[0].result.history, pack_without_member_1[0])
    assert_same_histories(ends[2].result.history, pack_without_member_1[2])


def test_a_diverged_member_ends_and_the_others_go_on_unchanged(tiny_data_dir, tmp_path, monkeypatch,
                                                               pack_without_member_1):
    """Member 1's weights are poisoned with NaN after step 12, so its loss is NaN from step 13:
    it ends "diverged" at the log line of step 15, with train()'s message; no checkpoint of it
    after step 10; members 0 and 2 train exactly as a pack without member 1."""
    configs = member_configs(tiny_data_dir)
    real_step = packed_loop.train_step

    def poisoning_step(packed, objective, optimizer, batch, step, config, noise=None):
        result = real_step(packed, objective, optimizer, batch, step, config, noise)
        if step == 12:
            with torch.no_grad():
                for parameter in packed.parameters():
                    parameter[1] = math.nan
        return result

    monkeypatch.setattr(packed_loop, "train_step", poisoning_step)
    ends = train_pack(configs, [tmp_path / f"m{k}" for k in range(3)], log=quiet)
    assert [e.outcome for e in ends] == ["done", "diverged", "done"]
    diverged = ends[1].diverged
    assert diverged.step == 13
    assert str(diverged) == ("diverged at step 13: loss is nan (coupled-vae); lower train.lr or check the "
                             "posterior's numerics")
    assert [m["step"] for m in ends[1].result.history] == [10.0]
    assert step_names(tmp_path / "m1" / "checkpoints") == [STEP_10]
    assert_same_histories(ends[0].result.history, pack_without_member_1[0])
    assert_same_histories(ends[2].result.history, pack_without_member_1[2])


def test_a_pack_resumed_from_its_members_checkpoints_continues_as_if_uninterrupted(tiny_data_dir, tmp_path,
                                                                                    pack_without_member_1):
    """Members 0 and 2 stopped after the evaluation of step 10, resumed from their latest
    checkpoints: their evaluations equal the uninterrupted pack's.  Dropout 0 (TINY): each
    member's noise stream is in its checkpoint's rng.pt.  (With dropout on, the masks come from
    the process RNG, which member checkpoints do not record: resuming then is not bit-exact.)"""
    configs = member_configs(tiny_data_dir)
    configs = [configs[0], configs[2]]

    def stop_all(_evaluations):
        raise StopTraining

    dirs = [tmp_path / "m0", tmp_path / "m2"]
    stopped = train_pack(configs, dirs, [stop_all], log=quiet)
    assert [e.outcome for e in stopped] == ["stopped", "stopped"] and stopped[0].result.steps == 10
    lines = []
    resumed = train_pack(configs, dirs, log=lines.append,
                         resume_from=[d / "checkpoints" / "latest" for d in dirs])
    assert any(line.startswith(f"resumed a pack of 2 members from {STEP_10} at step 10") for line in lines)
    assert [e.outcome for e in resumed] == ["done", "done"]
    for end, k in zip(resumed, (0, 2)):
        assert [m["step"] for m in end.result.history] == [10.0, 20.0]
        assert_same_histories(end.result.history, pack_without_member_1[k])


def test_bad_input_is_refused_in_one_line(tiny_data_dir, tmp_path):
    configs = member_configs(tiny_data_dir)[:2]
    with pytest.raises(CvaeError, match="one output directory per member: 2 configs, 1 directories"):
        train_pack(configs, [tmp_path / "m0"], log=quiet)
    with pytest.raises(CvaeError, match="different output directory for every member"):
        train_pack(configs, [tmp_path / "m", tmp_path / "m"], log=quiet)
    with pytest.raises(CvaeError, match="one checkpoint per member: 2 configs, 1 checkpoints"):
        train_pack(configs, [tmp_path / "m0", tmp_path / "m1"], log=quiet, resume_from=[tmp_path])
    other = member_configs(tiny_data_dir, **{"model.hidden_dim": 8})[1]
    with pytest.raises(CvaeError, match="pack members must share model.hidden_dim"):
        train_pack([configs[0], other], [tmp_path / "m0", tmp_path / "m1"], log=quiet)
    measured = member_configs(tiny_data_dir, **{"train.dynamics_every": 5})[:2]  # Figure 2's norms: not packed
    with pytest.raises(CvaeError, match="packed training supports neither train.dynamics_every nor train.amp"):
        train_pack(measured, [tmp_path / "m0", tmp_path / "m1"], log=quiet)
    assert not (tmp_path / "m0").exists()


def test_cvae_train_pack_writes_one_ordinary_run_per_member(tiny_data_dir, tmp_path, capsys):
    settings = {**TINY, "train.steps": 10}
    args = ["train", "--preset", "coupled-vae", "--dataset", "text", "--data-dir", str(tiny_data_dir),
            *(f"--set={key}={value}" for key, value in settings.items())]
    code = cvae_main([*args, "--pack", "coupling.lambda_m=0.1,2", "--out", str(tmp_path / "pack")])
    out = capsys.readouterr().out
    assert code == 0
    for k, lambda_m in enumerate((0.1, 2.0)):
        model, config, _ = load_model(tmp_path / "pack" / f"member-{k}" / "checkpoints" / "best")
        assert config.coupling.lambda_m == lambda_m and read_state(
            tmp_path / "pack" / f"member-{k}" / "checkpoints" / "best").step == 10
        assert f"member {k} (coupling.lambda_m={'0.1' if k == 0 else '2'}): done, best val_nll " in out

    for pack, problem in (("model.hidden_dim=8,16", "pack members must share model.hidden_dim: got 8 and 16"),
                          ("coupling.lambda_m", "--pack expects KEY=V1,V2,... with two or more values")):
        code = cvae_main([*args, "--pack", pack, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"cvae: error: {problem}") and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
