"""The loss, the clipping and the configuration rules of packed training.

The packed loss is the sum of the members' losses, so the gradient of member k's slices is
exactly member k's standalone gradient.  Clipping is per member (each member's own global norm,
as its standalone run clips).  Adam is elementwise, so one ``torch.optim.Adam`` over the stacked
parameters keeps per-member state by construction (``train.make_optimizer`` serves as is).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..config import Config
from ..data import Batch
from ..errors import CvaeError
from ..models.text_vae import ModelOutput
from ..objectives import Objective, matching_loss, weighted_loss
from ..train import set_learning_rate
from .model import Packed

# Settings that may differ between the members of one pack (the loss weights, their schedule,
# the seed); every other setting must be equal.  The preset is only a label.
PER_MEMBER_SETTINGS = frozenset({
    "preset", "train.seed", "coupling.lambda_r", "coupling.lambda_m", "coupling.distance", "coupling.rq_c",
    "regularizer.kl_cap", "regularizer.schedule", "regularizer.anneal_start", "regularizer.anneal_steps",
    "regularizer.cycles", "regularizer.cycle_ratio",
})


# Settings packed training does not support, at the value that turns each off.
UNSUPPORTED_WHEN_PACKED = {"train.dynamics_every": 0, "train.amp": False}


def check_pack_configs(configs: list[Config]) -> None:
    """One-line CvaeError unless the configs can train as one pack (see PER_MEMBER_SETTINGS)."""
    if not configs:
        raise CvaeError("a pack needs at least one configuration")
    shared = {key: value for key, value in configs[0].flat().items() if key not in PER_MEMBER_SETTINGS}
    for config in configs:
        if config.model.kind != "vae" or config.model.posterior != "gaussian" or config.model.decoder != "gru":
            raise CvaeError("packed training supports the Gaussian GRU text VAE (model.kind vae) only, got "
                            f"{config.model.kind}/{config.model.posterior}/{config.model.decoder}")
        if config.regularizer.kind != "kl" or config.train.aggressive or config.train.pretrain_steps \
                or config.train.init_from:
            raise CvaeError("packed training supports the KL regularizer without Lagging-VAE or PreFB only")
        flat = config.flat()
        if any(flat[key] != off for key, off in UNSUPPORTED_WHEN_PACKED.items()):
            raise CvaeError("packed training supports neither train.dynamics_every nor train.amp; "
                            "set train.dynamics_every=0 and train.amp=false")
        for key, value in shared.items():
            if flat[key] != value:
                raise CvaeError(f"pack members must share {key}: got {value!r} and {flat[key]!r}")


class PackedObjective:
    """Each member's Eq. (4) with its own weights, as tensors over the K members:
    loss_k = rec + w_KL,k(t)·KL + λ_r,k·rec^c + λ_m,k·match_k (batch means, ``weighted_loss``);
    returns their sum."""

    def __init__(self, configs: list[Config]):
        check_pack_configs(configs)
        self.objectives = [Objective(config) for config in configs]
        self.coupled = configs[0].coupling.enabled

        def per_member(values: Iterable[float]) -> Tensor:
            return torch.tensor(list(values), dtype=torch.float32)

        self.lambda_r = per_member(c.coupling.lambda_r for c in configs)
        self.lambda_m = per_member(c.coupling.lambda_m for c in configs)
        self.rq_c = per_member(c.rq_c for c in configs).unsqueeze(1)  # [K, 1], as D [K, B]
        uses_rq = [c.coupling.distance == "rq" for c in configs]
        # One distance for every member, or per member (matching_loss selects with torch.where).
        self.distance: str | Tensor = ("rq" if all(uses_rq) else "eucl" if not any(uses_rq)
                                       else torch.tensor(uses_rq).unsqueeze(1))

    def kl_weight(self, step: int) -> Tensor:
        """[K]: each member's KL weight at ``step`` from its own schedule."""
        return torch.tensor([objective.kl_weight(step) for objective in self.objectives], dtype=torch.float32)

    def matching(self, h: Tensor, h_coupled: Tensor) -> Tensor:
        """[K, B] per member: its own ``matching_loss`` (distance and C)."""
        distance = self.distance if isinstance(self.distance, str) else self.distance.to(h.device)
        return matching_loss(h, h_coupled, distance, self.rq_c.to(h.device))

    def __call__(self, output: ModelOutput, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """A pack's forward output (tensors [K, B, ...]) -> (scalar: the sum of the members'
        losses, named parts [K] each a batch mean).  The KL is the ordinary model's term."""
        device = output.rec.device
        kl = output.posterior.regularizer(output.prior, output.sample)  # [K, B]
        parts = {"rec": output.rec.mean(-1), "kl": kl.mean(-1)}
        if self.coupled:
            parts["rec_coupled"] = output.rec_coupled.mean(-1)
            parts["match"] = self.matching(output.h, output.h_coupled).mean(-1)
        parts["loss"] = loss = weighted_loss(
            parts["rec"], parts["kl"], self.kl_weight(step).to(device), rec_coupled=parts.get("rec_coupled"),
            lambda_r=self.lambda_r.to(device), match=parts.get("match"), lambda_m=self.lambda_m.to(device))
        return loss.sum(), parts


def clip_grad_norm_per_member(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Clip each member's gradient by its own global norm (over its slices of every parameter),
    as ``nn.utils.clip_grad_norm_`` clips a standalone run's.  -> the norms before clipping [K]."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    members = grads[0].shape[0]
    norms = torch.stack([g.reshape(members, -1).norm(dim=1) for g in grads]).norm(dim=0)  # [K]
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.view(members, *([1] * (grad.dim() - 1))))
    return norms


def train_step(packed: Packed, objective: PackedObjective, optimizer: torch.optim.Optimizer,
               batch: Batch, step: int, config: Config, noise: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """Training step ``step`` (1-based) of every member, as the trainer makes it for one model:
    the learning rate of ``step``, forward in training mode (posterior noise [K, B, d], drawn if
    None), the summed loss, backward, per-member clipping by train.clip_norm, one Adam step.
    ``config`` is any member's (they share every train.* setting).
    -> (named loss parts [K] each a batch mean, gradient norms before clipping [K])."""
    set_learning_rate(optimizer, config, step)
    packed.train()
    loss, parts = objective(packed(batch, noise), step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norms = clip_grad_norm_per_member(packed.parameters(), config.train.clip_norm)
    optimizer.step()
    return {name: value.detach() for name, value in parts.items()}, norms
