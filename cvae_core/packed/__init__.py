"""Packed training: K Gaussian GRU text VAEs (coupled or not) that differ only in loss weights,
schedules and seeds, trained as one model with a leading member dimension on every parameter."""
from .model import PackedCoupledVAE, PackedOutput, PackedTextVAE, pack, unpack
from .training import PackedObjective, check_pack_configs, clip_grad_norm_per_member

__all__ = ["PackedCoupledVAE", "PackedObjective", "PackedOutput", "PackedTextVAE", "check_pack_configs",
           "clip_grad_norm_per_member", "pack", "unpack"]
