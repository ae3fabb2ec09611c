"""Generative replay for continual learning, as Avalanche plugins.

The strategies (:class:`DGR`) wire two plugins that also work on their own in
any Avalanche template: :class:`SolverReplayPlugin` (generated inputs of past
experiences replayed to the solver) and :class:`GeneratorTrainingPlugin` (the
generator learns each experience plus its own replay).
"""

from avl_genreplay.generator_training import GeneratorTrainingPlugin
from avl_genreplay.generators import ConvCritic, ConvGenerator, WGANGPTrainer
from avl_genreplay.replay import SolverReplayPlugin
from avl_genreplay.strategies import DGR

__all__ = [
    "DGR",
    "SolverReplayPlugin",
    "GeneratorTrainingPlugin",
    "ConvGenerator",
    "ConvCritic",
    "WGANGPTrainer",
]
