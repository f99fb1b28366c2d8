"""vaehelpers: train, evaluate and explore Stable-Diffusion-style KL autoencoders."""

from vaehelpers.config import DataConfig, LossConfig, ModelConfig, TrainConfig
from vaehelpers.model import AutoencoderKL, DiagonalGaussian

__all__ = ["AutoencoderKL", "DiagonalGaussian", "ModelConfig", "DataConfig", "LossConfig", "TrainConfig"]
__version__ = "0.1.0"
