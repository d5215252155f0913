"""Packed training: K Gaussian GRU text VAEs (coupled or not) that differ only in loss weights,
schedules and seeds, trained as one model with a leading member dimension on every parameter."""
from .checkpoints import LoadedPack, load_pack, save_member_checkpoint
from .loop import MemberEnd, MemberEvaluation, PackCallback, select_members, train_pack
from .model import Packed, member_state_dict, pack, unpack
from .training import (UNSUPPORTED_WHEN_PACKED, PackedObjective, check_pack_configs, clip_grad_norm_per_member,
                       train_step)

__all__ = ["LoadedPack", "MemberEnd", "MemberEvaluation", "PackCallback", "Packed", "PackedObjective",
           "UNSUPPORTED_WHEN_PACKED", "check_pack_configs",
           "clip_grad_norm_per_member", "load_pack", "member_state_dict", "pack", "save_member_checkpoint",
           "select_members", "train_pack", "train_step", "unpack"]
