"""cvae_core: a lean PyTorch Coupled-VAE (Wu, Wang & Wang, ACL 2020) with the paper's metrics."""
__version__ = "0.1.0"

from .checkpoint import load_checkpoint, load_model  # noqa: E402
from .config import PRESETS, Config, build_config  # noqa: E402
from .errors import CvaeError  # noqa: E402
from .evaluation import evaluate_checkpoint  # noqa: E402
from .train import StopTraining, TrainResult, train  # noqa: E402

__all__ = ["PRESETS", "Config", "CvaeError", "StopTraining", "TrainResult", "build_config",
           "evaluate_checkpoint", "load_checkpoint", "load_model", "train"]
