"""Generative replay for continual learning, as Avalanche plugins.

The strategies (:class:`DGR`, :class:`DGM`, :class:`DDGR`) wire plugins that also work on
their own in any Avalanche template: :class:`SolverReplayPlugin` (generated
inputs of past experiences replayed to the solver),
:class:`GeneratorTrainingPlugin` (the generator learns each experience plus
its own replay) and :class:`ReplayPoolPlugin` (samples generated once per
experience, for generators too slow to sample at every step); under
``torchrun`` they train data-parallel (:mod:`avl_genreplay.distributed`, whose
:class:`DataParallelPlugin` trains the solver so). Replay quality
is measured by Avalanche metrics (:func:`replay_quality_metrics`) against a
reference classifier (:func:`train_reference_classifier`).
"""

import warnings

with warnings.catch_warnings():
    # Avalanche imports qpsolvers for GEM, which this package never uses; it
    # warns at import wherever no QP solver is installed
    warnings.filterwarnings("ignore", message="no QP solver found")
    from avl_genreplay.allocator import keep_freed_memory
    from avl_genreplay.augmentation import InputAugmentationPlugin
    from avl_genreplay.distributed import DataParallelPlugin
    from avl_genreplay.generator_training import (
        GeneratorTrainingError,
        GeneratorTrainingPlugin,
        TrainingGuard,
    )
    from avl_genreplay.generators import (
        ACDiscriminator,
        ConvCritic,
        ConvGenerator,
        DDPMTrainer,
        DGMTrainer,
        DiffusionGenerator,
        MaskedConvGenerator,
        MaskedGenerator,
        MaskedMlpGenerator,
        MlpACDiscriminator,
        MlpCritic,
        MlpGenerator,
        WGANGPTrainer,
    )
    from avl_genreplay.metrics import (
        GeneratorLossMetric,
        ReplayClassifierAccuracy,
        ReplayFrechetDistance,
        ReplaySampler,
        ReplaySamplesGrid,
        find_generator,
        frechet_distance,
        replay_quality_metrics,
    )
    from avl_genreplay.reference import (
        ReferenceClassifier,
        train_reference_classifier,
    )
    from avl_genreplay.replay import SolverReplayPlugin, UntrainedGeneratorWarning
    from avl_genreplay.replay_pool import ReplayPool, ReplayPoolPlugin
    from avl_genreplay.retained import retained_bytes
    from avl_genreplay.strategies import DDGR, DGM, DGR

__all__ = [
    "DGR",
    "DGM",
    "DDGR",
    "SolverReplayPlugin",
    "UntrainedGeneratorWarning",
    "InputAugmentationPlugin",
    "DataParallelPlugin",
    "retained_bytes",
    "keep_freed_memory",
    "GeneratorTrainingPlugin",
    "TrainingGuard",
    "GeneratorTrainingError",
    "ReplayPool",
    "ReplayPoolPlugin",
    "ConvGenerator",
    "ConvCritic",
    "MlpGenerator",
    "MlpCritic",
    "WGANGPTrainer",
    "DiffusionGenerator",
    "DDPMTrainer",
    "MaskedGenerator",
    "MaskedConvGenerator",
    "MaskedMlpGenerator",
    "ACDiscriminator",
    "MlpACDiscriminator",
    "DGMTrainer",
    "replay_quality_metrics",
    "ReplaySampler",
    "ReplayClassifierAccuracy",
    "ReplayFrechetDistance",
    "ReplaySamplesGrid",
    "GeneratorLossMetric",
    "find_generator",
    "frechet_distance",
    "ReferenceClassifier",
    "train_reference_classifier",
]
