"""cvae_core: a lean PyTorch Coupled-VAE (Wu, Wang & Wang, ACL 2020) with the paper's metrics."""
__version__ = "0.1.0"

from .checkpoint import (checkpoint_step, is_checkpoint, load_checkpoint, load_model, read_config,  # noqa: E402
                         read_state)
from .config import PRESETS, Config, build_config, preset_coupling  # noqa: E402
from .errors import CvaeError  # noqa: E402
from .evaluation import evaluate_checkpoint  # noqa: E402
from .train import StopTraining, TrainResult, train  # noqa: E402

__all__ = ["PRESETS", "Config", "CvaeError", "StopTraining", "TrainResult", "build_config", "checkpoint_step",
           "evaluate_checkpoint", "is_checkpoint", "load_checkpoint", "load_model", "preset_coupling",
           "read_config", "read_state", "train"]
