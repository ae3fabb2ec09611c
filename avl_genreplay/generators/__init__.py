"""Generators (models and their training steps) for generative replay."""

from avl_genreplay.generators.base import GeneratorTrainer, ImageGenerator
from avl_genreplay.generators.dgm import (
    ACDiscriminator,
    DGMTrainer,
    DiscriminatorSolver,
    MaskedConvGenerator,
    MaskedGenerator,
    MaskedMlpGenerator,
    MlpACDiscriminator,
)
from avl_genreplay.generators.diffusion import (
    DDPMTrainer,
    DiffusionGenerator,
    SmallUNet,
)
from avl_genreplay.generators.vae import DataRangeMlpVAE
from avl_genreplay.generators.wgan_gp import (
    ConvCritic,
    ConvGenerator,
    MlpCritic,
    MlpGenerator,
    WGANGPTrainer,
)

__all__ = [
    "ImageGenerator",
    "GeneratorTrainer",
    "ConvGenerator",
    "ConvCritic",
    "MlpGenerator",
    "MlpCritic",
    "WGANGPTrainer",
    "DiffusionGenerator",
    "DDPMTrainer",
    "SmallUNet",
    "MaskedGenerator",
    "MaskedConvGenerator",
    "MaskedMlpGenerator",
    "ACDiscriminator",
    "MlpACDiscriminator",
    "DGMTrainer",
    "DiscriminatorSolver",
    "DataRangeMlpVAE",
]
