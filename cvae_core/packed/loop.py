"""The packed training loop: K members of one pack trained on the same batches, each an ordinary run.

``train_pack`` is the packed counterpart of :func:`cvae_core.train.train`.  Member k's run goes to
its own output directory with exactly the layout ``train`` writes (config.json, checkpoints/step-N,
latest, best, pruning), evaluated and checkpointed by the same code (``train.evaluate_and_checkpoint``
on the member's ordinary model), so every member's checkpoints are ordinary ones.

Randomness: member k starts from its standalone run's weights (``torch.manual_seed(seed_k)``,
``build_model``) and draws its posterior noise from its own stream, the one its standalone run
would draw from (and the one its checkpoints' rng.pt record).  So with dropout 0 a member trains
exactly as its standalone run on the pack's batches (those of configs[0]'s seed), whatever the other
members do, and dropping a member changes nothing for the others.  Dropout masks come from the
process's RNG (shared by the pack), so with dropout on a member's run depends on the pack.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import LATEST, TrainState, install_checkpoint, load_checkpoint
from ..config import Config, validate
from ..data import Corpus, load_corpus
from ..errors import CvaeError, Diverged
from ..models import build_model
from ..runtime import format_duration, resolve_device
from ..train import (DivergenceWatch, Log, Progress, StepLoop, StopTraining, TrainResult, check_resumable,
                     evaluate_and_checkpoint, learning_rate, make_optimizer, train_result, training_batches)
from .checkpoints import load_pack, save_member_checkpoint
from .model import Packed, member_state_dict, pack
from .training import PackedObjective, check_pack_configs, train_step


@dataclass
class MemberEvaluation:
    member: int  # index into the configs given to train_pack (stable after other members drop)
    metrics: dict[str, float]  # the keys train() gives its callbacks at an evaluation, for this member
    checkpoint: Path  # this member's full checkpoint just written: output_dirs[member]/checkpoints/step-N


@dataclass
class MemberEnd:
    member: int
    outcome: str  # "done" (ran train.steps) | "stopped" (a callback asked) | "diverged"
    result: TrainResult
    diverged: Diverged | None  # for outcome "diverged" (its step and reason), else None


# Called at each evaluation step with the evaluations of the members still training (member order);
# returns the members to stop, or None.  Raising train.StopTraining stops every member.
PackCallback = Callable[[list[MemberEvaluation]], Iterable[int] | None]


@dataclass
class _Member:
    """One member's ordinary run: its config, its output tree, where it stands and its noise stream."""

    index: int
    config: Config
    output_dir: Path
    state: TrainState
    noise: torch.Generator
    last_metrics: dict[str, float]

    @property
    def ckpt_root(self) -> Path:
        return self.output_dir / "checkpoints"


def train_pack(configs: list[Config], output_dirs: list[str | Path], callbacks: Iterable[PackCallback] = (), *,
               corpus: Corpus | None = None, log: Log | None = None, resume_from: list[str | Path] | None = None,
               on_member_end: Callable[[MemberEnd], None] | None = None) -> list[MemberEnd]:
    """Train the members of one pack (configs accepted by ``check_pack_configs``) on the same
    batches (those of configs[0]'s seed); member k's run goes to output_dirs[k] as ``train`` writes it.

    Each callback is called once per evaluation step with the evaluations of every member still
    training (in member order) and returns the members to stop (or None): they end "stopped" and
    leave the pack before the next step.  Raising ``StopTraining`` ends every remaining member
    "stopped".  A member whose loss or gradient norm becomes non-finite ends "diverged" at the next
    log line or evaluation (no evaluation or checkpoint of it past that step); the others go on
    unchanged.  ``resume_from``: one checkpoint per member (e.g. their latest), installed into the
    member's tree, the pack continuing from them.  ``on_member_end`` is called as each member ends.
    -> one MemberEnd per member, in member order."""
    log = log or (lambda text: print(text, file=sys.stdout, flush=True))
    _check_arguments(configs, output_dirs, resume_from)
    config = configs[0]  # every train.* setting is shared
    device = resolve_device(config.train.device)
    if corpus is None:
        log(f"loading {config.data.dataset} ...")
        corpus = load_corpus(config.data, ("train", "valid"))
    dirs = [Path(d).absolute() for d in output_dirs]
    if resume_from is None:
        packed, optimizer, members = _start(configs, dirs, len(corpus.vocab), device)
    else:
        packed, optimizer, members = _resume(configs, dirs, resume_from, device, log)
    for member in members:
        member.output_dir.mkdir(parents=True, exist_ok=True)
        (member.output_dir / "config.json").write_text(member.config.to_json())
    n_params = sum(p.numel() for p in packed.parameters()) // len(members)
    log(f"pack of {len(members)} {config.preset} members on {config.data.dataset} ({config.scale} scale): "
        f"{n_params:,} parameters each, {len(corpus['train'].examples):,} training sentences, device {device}, "
        f"{config.train.steps} steps")
    loop = _PackLoop(packed, optimizer, members, corpus, device, log, on_member_end)
    loop.run(list(callbacks))
    return [loop.ends[k] for k in range(len(configs))]


def _check_arguments(configs: list[Config], output_dirs: list[str | Path],
                     resume_from: list[str | Path] | None) -> None:
    check_pack_configs(configs)
    for config in configs:
        validate(config)
    if len(output_dirs) != len(configs):
        raise CvaeError(f"train_pack needs one output directory per member: {len(configs)} configs, "
                        f"{len(output_dirs)} directories")
    if len({Path(d).absolute() for d in output_dirs}) != len(output_dirs):
        raise CvaeError("train_pack needs a different output directory for every member")
    if resume_from is not None and len(resume_from) != len(configs):
        raise CvaeError(f"train_pack resumes from one checkpoint per member: {len(configs)} configs, "
                        f"{len(resume_from)} checkpoints")


def _start(configs: list[Config], dirs: list[Path], vocab_size: int,
           device: torch.device) -> tuple[Packed, torch.optim.Optimizer, list[_Member]]:
    """Every member's standalone initial weights and noise stream -> the pack, its Adam, the members."""
    models, members = [], []
    for k, (config, output_dir) in enumerate(zip(configs, dirs)):
        torch.manual_seed(config.train.seed)  # as train() seeds before building
        models.append(build_model(config, vocab_size).to(device))
        members.append(_Member(k, config, output_dir, TrainState(), _noise_stream(device, None, config), {}))
    packed = pack(models)
    return packed, make_optimizer(packed, configs[0]), members


def _resume(configs: list[Config], dirs: list[Path], sources: list[str | Path], device: torch.device,
            log: Log) -> tuple[Packed, torch.optim.Optimizer, list[_Member]]:
    """Install each member's checkpoint into its tree, then rebuild the pack from them."""
    latest = []
    for source, output_dir in zip(sources, dirs):
        install_checkpoint(source, output_dir / "checkpoints")
        latest.append(output_dir / "checkpoints" / LATEST)
    loaded = load_pack(latest, device)
    members = []
    for k, (config, path) in enumerate(zip(configs, latest)):
        check_resumable(loaded.configs[k], config, path)
        rng = load_checkpoint(path).rng
        members.append(_Member(k, config, dirs[k], loaded.states[k], _noise_stream(device, rng, config), {}))
    state = loaded.states[0]
    log(f"resumed a pack of {len(members)} members from {latest[0].resolve().name} at step {state.step}")
    return loaded.model, loaded.optimizer, members


def _noise_stream(device: torch.device, rng: dict[str, Any] | None, config: Config) -> torch.Generator:
    """The generator of a member's posterior noise: its standalone run's stream, i.e. the process
    RNG just after ``torch.manual_seed(seed)`` and ``build_model`` (or as its checkpoint's rng.pt
    recorded it).  Model building draws on the CPU RNG only, so a CUDA stream starts at the seed."""
    generator = torch.Generator(device)
    if device.type == "cuda":
        if rng is None:
            generator.manual_seed(config.train.seed)
        else:
            generator.set_state(rng["cuda"][device.index or 0])
    else:
        generator.set_state(torch.get_rng_state() if rng is None else rng["torch"])
    return generator


class _StreamAsProcessRng:
    """Within: the process RNG holds a member's noise stream, so that the checkpoint written then
    records that stream in rng.pt (as its standalone run's checkpoint would); restored after."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator
        cuda = generator.device.type == "cuda"
        self.fork = torch.random.fork_rng(devices=[generator.device.index or 0] if cuda else [])

    def __enter__(self):
        self.fork.__enter__()
        if self.generator.device.type == "cuda":
            torch.cuda.set_rng_state(self.generator.get_state(), self.generator.device)
        else:
            torch.set_rng_state(self.generator.get_state())

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)


class _PackLoop(StepLoop):
    """The pack's phases of ``train.StepLoop``: training steps of every member at once, per-member
    divergence, evaluations, callbacks and dropping members."""

    def __init__(self, packed: Packed, optimizer: torch.optim.Optimizer, members: list[_Member], corpus: Corpus,
                 device: torch.device, log: Log, on_member_end: Callable[[MemberEnd], None] | None):
        self.packed, self.optimizer, self.members = packed, optimizer, members
        self.corpus, self.device, self.log, self.on_member_end = corpus, device, log, on_member_end
        self.config = members[0].config
        first = members[0].state
        self.step = first.step
        self.batches = training_batches(self.config, corpus, first)  # the members share every train.* setting
        self.objective = PackedObjective([m.config for m in members])
        self.progress = Progress(self.config.train.steps, self.step)  # sums of [K] tensors, one entry per member
        self.divergence = DivergenceWatch(device, len(members))
        self.ends: dict[int, MemberEnd] = {}

    def run(self, callbacks: list[PackCallback]) -> None:
        super().run(callbacks)
        for member in list(self.members):
            self.end(member, "done")

    def training(self) -> bool:
        return bool(self.members)

    def train_step(self) -> None:
        batch = self.batches.next(self.device)
        self.step += 1
        for member in self.members:
            member.state.step = self.step
            member.state.epoch, member.state.batch_index = self.batches.epoch, self.batches.batch_index
        shape = (len(batch.lengths), self.config.model.latent_dim)
        noise = torch.stack([torch.empty(shape, device=self.device).normal_(generator=m.noise) for m in self.members])
        parts, grad_norms = train_step(self.packed, self.objective, self.optimizer, batch, self.step, self.config,
                                       noise)
        self.divergence.watch(self.step, parts["loss"], grad_norms)
        self.progress.add(parts, batch.n_tokens, {"grad_norm": grad_norms})

    def line(self) -> str:
        """One progress line for the pack: each member's mean loss, the summed tokens/s of the members."""
        rate, eta = self.progress.rate_and_eta(self.step)
        losses = self.progress.sums["loss"] / max(1, self.progress.count)
        summary = " ".join(f"{m.index}:{loss:.2f}" for m, loss in zip(self.members, losses.tolist()))
        lr = learning_rate(self.config, self.step)
        return (f"step {self.step}/{self.config.train.steps} | {len(self.members)} members | loss {summary} | "
                f"lr {lr:.2e} | {rate * len(self.members):,.0f} tok/s | ETA {format_duration(eta)}")

    def check_divergence(self) -> None:
        """Diverged members end "diverged" and leave the pack; the others go on."""
        outcomes = self.divergence.outcomes([m.config.preset for m in self.members])
        diverged = [(m, outcome) for m, outcome in zip(self.members, outcomes) if outcome is not None]
        if not diverged:
            return
        for member, outcome in diverged:
            self.log(f"member {member.index}: {outcome}")
        self.drop([m for m, _ in diverged], "diverged", [outcome for _, outcome in diverged])

    def evaluate(self) -> bool:
        """Every member's evaluation and checkpoint (as train() makes them), then the callbacks;
        the members they stop leave the pack. -> False: the loop ends when no member is left."""
        lr = learning_rate(self.config, self.step)
        tokens_per_s = self.progress.tokens_per_second()
        evaluations, seconds = [], 0.0
        for k, member in enumerate(self.members):
            training = {"kl_weight": self.objective.objectives[k].kl_weight(self.step), "lr": lr,
                        "tokens_per_s": tokens_per_s, **self.progress.means(k)}
            metrics, ckpt, eval_seconds = evaluate_and_checkpoint(
                member.config, self.member_model(k), member.state, training, self.corpus, member.ckpt_root,
                lambda directory, k=k, member=member: self.save(directory, k, member), self.log,
                label=f"member {member.index}: ")
            member.last_metrics = metrics
            seconds += eval_seconds
            evaluations.append(MemberEvaluation(member.index, metrics, ckpt))
        self.progress.reset()
        self.progress.exclude(seconds)
        stop: set[int] = set()
        try:
            for callback in self.callbacks:
                stop.update(callback(evaluations) or ())
        except StopTraining:
            self.log(f"stopped by a callback at step {self.step}")
            stop = {m.index for m in self.members}
        stopped = [m for m in self.members if m.index in stop]
        if stopped:
            if len(stopped) < len(self.members):
                self.log(f"stopped by a callback at step {self.step}: member "
                         + ", ".join(str(m.index) for m in stopped))
            self.drop(stopped, "stopped")
        return False

    def member_model(self, k: int) -> torch.nn.Module:
        """Member k's ordinary model holding its current weights (for evaluation)."""
        member = self.members[k]
        with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the pack's RNG as it is
            model = build_model(member.config, len(self.corpus.vocab)).to(self.device)
        model.load_state_dict(member_state_dict(self.packed, k))
        return model

    def save(self, directory: Path, k: int, member: _Member) -> Path:
        with _StreamAsProcessRng(member.noise):
            return save_member_checkpoint(directory, self.packed, self.optimizer, k, config=member.config,
                                          state=member.state, vocab=self.corpus.vocab)

    def drop(self, leaving: list[_Member], outcome: str, diverged: list[Diverged] | None = None) -> None:
        """End these members and rebuild the pack without them: the others keep their exact weights
        and Adam state (sliced in memory), so they go on as if nothing happened."""
        for member, cause in zip(leaving, diverged or [None] * len(leaving)):
            self.end(member, outcome, cause)
        keep = [k for k, m in enumerate(self.members) if m not in leaving]
        self.members = [self.members[k] for k in keep]
        if not keep:
            return
        self.packed, self.optimizer = select_members(self.packed, self.optimizer, keep,
                                                     [m.config for m in self.members], len(self.corpus.vocab))
        self.objective = PackedObjective([m.config for m in self.members])
        self.progress.keep(keep)
        self.divergence.keep(keep)

    def end(self, member: _Member, outcome: str, diverged: Diverged | None = None) -> None:
        result = train_result(member.config, member.output_dir, member.state, member.last_metrics)
        self.ends[member.index] = end = MemberEnd(member.index, outcome, result, diverged)
        if self.on_member_end is not None:
            self.on_member_end(end)


def select_members(packed: Packed, optimizer: torch.optim.Optimizer, keep: list[int], configs: list[Config],
                   vocab_size: int) -> tuple[Packed, torch.optim.Optimizer]:
    """The pack of members ``keep`` (configs[i] is member keep[i]'s) with their exact weights and
    Adam state: each per-element tensor sliced to those members, Adam's step count as it was."""
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the pack's RNG as it is
        models = [build_model(config, vocab_size) for config in configs]
    device = next(packed.parameters()).device
    for model, k in zip(models, keep):
        model.to(device).load_state_dict(member_state_dict(packed, k))
    smaller = pack(models)
    index = torch.tensor(keep, device=device)
    state = optimizer.state_dict()
    state["state"] = {i: {key: value[index.to(value.device)] if value.dim() else value.clone()
                          for key, value in slot.items()}
                      for i, slot in state["state"].items()}
    smaller_optimizer = make_optimizer(smaller, configs[0])
    smaller_optimizer.load_state_dict(state)
    return smaller, smaller_optimizer
