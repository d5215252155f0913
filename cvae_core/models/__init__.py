"""Models: GRU-LM, DAE, the text VAE over any posterior family, and the coupling wrapper."""
from .build import build_model
from .text_vae import CoupledVAE, DenoisingAutoencoder, LanguageModel, ModelOutput, TextVAE

__all__ = ["CoupledVAE", "DenoisingAutoencoder", "LanguageModel", "ModelOutput", "TextVAE", "build_model"]
