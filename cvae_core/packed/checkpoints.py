"""A pack's checkpoints are its members' ordinary single-model checkpoints.

``save_member_checkpoint`` writes member k of a packed model and its packed Adam as the
checkpoint a standalone run of member k would write (weights, Adam state in the ordinary
model's parameter order, the member's config, state and vocabulary), so ``cvae evaluate``,
``load_model`` and ``train(..., resume_from=...)`` work on it unchanged.  ``load_pack`` does the
reverse: K such checkpoints (weights and Adam state) -> one pack, to resume a whole pack.

Adam's state is elementwise, so member k's state is its slice of every per-element tensor
(exp_avg, exp_avg_sq); the step count is one scalar per parameter, equal for all members of a
pack (they step together).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import TrainState, load_checkpoint, save_checkpoint
from ..config import Config
from ..data.vocab import Vocab
from ..errors import CvaeError
from ..models import build_model
from ..train import make_optimizer
from .model import Packed, member_state_dict, pack
from .training import check_pack_configs


@dataclass
class LoadedPack:
    """A pack rebuilt from its members' checkpoints, ready to continue training."""

    model: Packed
    optimizer: torch.optim.Optimizer
    configs: list[Config]  # member k's config
    vocab: Vocab  # shared by all members
    states: list[TrainState]  # member k's step, data position, best value and history
    rng: dict[str, Any]  # the first member's RNG state (``checkpoint.restore_rng`` restores it)


def save_member_checkpoint(directory: str | Path, packed: Packed, optimizer: torch.optim.Optimizer, member: int, *,
                           config: Config, state: TrainState, vocab: Vocab) -> Path:
    """Write member ``member`` of ``packed`` (trained with ``optimizer``, an Adam over
    ``packed.parameters()``) as an ordinary checkpoint of ``config`` with ``checkpoint.save_checkpoint``.
    Its rng.pt is this process's RNG state (the pack's: a member has no stream of its own)."""
    # Building draws initial weights from the RNG: fork it, so that saving leaves the pack's
    # random stream (and the rng.pt written here) as they were.
    with torch.random.fork_rng(devices=[]):
        model = build_model(config, len(vocab)).to(next(packed.parameters()).device)
    try:
        model.load_state_dict(member_state_dict(packed, member))
    except RuntimeError:
        raise CvaeError(f"member {member}'s config ({config.preset}) and vocabulary ({len(vocab)} words) do not "
                        "build a model of the pack's shapes") from None
    ordinary = make_optimizer(model, config)
    ordinary.load_state_dict(member_optimizer_state(packed, optimizer, member, model))
    return save_checkpoint(directory, model=model, optimizer=ordinary, state=state, config=config, vocab=vocab)


def member_optimizer_state(packed: Packed, optimizer: torch.optim.Optimizer, member: int,
                           model: nn.Module) -> dict[str, Any]:
    """Member ``member``'s slice of the packed optimizer's state, as the state_dict of an
    optimizer made by ``train.make_optimizer(model, ...)`` for the ordinary ``model``."""
    group = _single_group(optimizer.param_groups, "the packed optimizer")
    packed_names = {id(p): name for name, p in packed.named_parameters()}
    ordinary_index = _parameter_index(model)
    state = {}
    for parameter in group["params"]:
        if parameter in optimizer.state:  # a parameter that never had a gradient has no state
            state[ordinary_index[packed_names[id(parameter)]]] = {
                key: (value[member] if value.dim() else value).clone()
                for key, value in optimizer.state[parameter].items()}
    hyper = {key: value for key, value in group.items() if key != "params"}
    return {"state": state, "param_groups": [{**hyper, "params": list(range(len(ordinary_index)))}]}


def load_pack(paths: list[str | Path], device: str | torch.device = "cpu") -> LoadedPack:
    """K ordinary training checkpoints that can train as one pack (``check_pack_configs``, one
    vocabulary, one step) -> the pack, its Adam holding every member's state, and the members'
    configs and states.  Member k is paths[k]."""
    if not paths:
        raise CvaeError("a pack needs at least one checkpoint")
    data = [load_checkpoint(path, map_location=device) for path in paths]
    check_pack_configs([d.config for d in data])
    first = data[0]
    for d in data:
        if d.vocab.itos != first.vocab.itos:
            raise CvaeError(f"pack members must share one vocabulary: {d.path} and {first.path} differ")
        if d.train_state.step != first.train_state.step:
            raise CvaeError(f"pack members must be at one step: {first.path} is at step {first.train_state.step}, "
                            f"{d.path} at step {d.train_state.step}")
        if d.optimizer is None:
            raise CvaeError(f"checkpoint {d.path} has no optimizer state: a pack resumes from training checkpoints")
    models = []
    for d in data:
        model = build_model(d.config, len(d.vocab)).to(device)
        try:
            model.load_state_dict(d.weights)
        except (RuntimeError, KeyError):
            raise CvaeError(f"checkpoint {d.path}: weights.pt does not fit its config.json/vocab.json") from None
        models.append(model)
    packed = pack(models)
    optimizer = make_optimizer(packed, first.config)
    optimizer.load_state_dict(packed_optimizer_state(packed, models[0], [d.optimizer for d in data]))
    return LoadedPack(packed, optimizer, [d.config for d in data], first.vocab, [d.train_state for d in data], first.rng)


def packed_optimizer_state(packed: Packed, model: nn.Module, member_states: list[dict[str, Any]]) -> dict[str, Any]:
    """The members' ordinary optimizer state_dicts (member k's is member_states[k], in the
    parameter order of ``model``, any member's ordinary model) -> the state_dict of an optimizer
    made by ``train.make_optimizer(packed, ...)``: per-element tensors stacked over the members."""
    groups = [_single_group(s["param_groups"], "a member's optimizer") for s in member_states]
    ordinary_index = _parameter_index(model)
    state = {}
    for index, (name, _) in enumerate(packed.named_parameters()):
        slices = [s["state"].get(ordinary_index[name]) for s in member_states]
        if all(s is None for s in slices):
            continue
        if any(s is None for s in slices) or any(set(s) != set(slices[0]) for s in slices):
            raise CvaeError(f"pack members' optimizer states differ in what they hold for {name}")
        state[index] = {key: _stack_member_values([s[key] for s in slices], f"{name} {key}") for key in slices[0]}
    hyper = {key: value for key, value in groups[0].items() if key != "params"}
    return {"state": state, "param_groups": [{**hyper, "params": list(range(len(ordinary_index)))}]}


def _stack_member_values(values: list[Tensor], what: str) -> Tensor:
    """Per-element tensors stack into [K, ...]; a scalar (Adam's step) must be one value for all."""
    if values[0].dim():
        return torch.stack(values)
    if any(not torch.equal(value, values[0]) for value in values):
        raise CvaeError(f"pack members' optimizers are at different steps ({what}: "
                        f"{sorted({float(v) for v in values})})")
    return values[0].clone()


def _single_group(groups: list[dict[str, Any]], what: str) -> dict[str, Any]:
    if len(groups) != 1:  # two groups are Lagging-VAE's, which packs do not support
        raise CvaeError(f"{what} has {len(groups)} parameter groups; packed training uses one")
    return groups[0]


def _parameter_index(model: nn.Module) -> dict[str, int]:
    """Parameter name -> its position in ``model.parameters()`` (the optimizer's order)."""
    return {name: index for index, (name, _) in enumerate(model.named_parameters())}
