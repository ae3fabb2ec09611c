"""Dynamic Generative Memory (Ostapenko et al., CVPR 2019) as an Avalanche
strategy."""

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins.evaluation import (
    EvaluationPlugin,
    default_evaluator,
)
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor
from torch.nn import CrossEntropyLoss, Module
from torch.optim import Optimizer

from avl_genreplay.devices import check_device
from avl_genreplay.distributed import with_data_parallel
from avl_genreplay.generator_training import GeneratorTrainingPlugin
from avl_genreplay.generators.dgm import (
    VARIANTS,
    DGMTrainer,
    DiscriminatorSolver,
    MaskedConvGenerator,
    MaskedGenerator,
    MaskedMlpGenerator,
)
from avl_genreplay.replay import SolverReplayPlugin

__all__ = ["DGM", "DEFAULT_SPARSITY"]

_SOLVERS = ("model", "discriminator")
_ARCHITECTURES = ("conv", "mlp")

#: Sparsity weights per variant, tuned on SplitMNIST: the penalty is the mean
#: soft mask over the free entries, so its pull on each entry shrinks with
#: their number (about 96 units in DGM-a, 0.5M weights in DGM-w); the paper's
#: 0.08 left about half of the free capacity reserved after each task here.
#: DGM-w ended SplitMNIST 0.4 points higher with 5 than with 10 over five
#: seeds, and seed 0 1.7 points lower with 100 than with 10; DGM-a's seed 0
#: ended 1.3 points lower with 3 than with 10.
DEFAULT_SPARSITY = {"w": 5.0, "a": 10.0}


class DGM(SupervisedTemplate):
    """Dynamic Generative Memory: a class-conditional AC-GAN whose generator
    learns binary masks per task, keeps what past tasks use and grows.

    The generator (:class:`~avl_genreplay.generators.dgm.MaskedGenerator`)
    learns each experience as a task, with hard attention: DGM-w
    (``variant="w"``) masks its weights, DGM-a (``variant="a"``) its units.
    Parameters reserved by past tasks' masks take no gradient, so a past
    class, generated with its task's mask, comes out the same for the same
    noise however many tasks follow; a sparsity penalty keeps reservations
    small, and after each task the hidden layers grow by what the task
    reserved (:attr:`generator`'s ``growth_log`` lists the size per task).
    The AC-GAN learns the experience's data with class-conditional replay of
    every past class (:class:`~avl_genreplay.generator_training.GeneratorTrainingPlugin`
    and :class:`~avl_genreplay.generators.dgm.DGMTrainer`). The solver gets
    an equal number of generated samples of each past class, labelled by
    their condition or, with ``relabel``, by the previous solver
    (:class:`~avl_genreplay.replay.SolverReplayPlugin`).

    The solver is ``model``, or with ``solver="discriminator"`` the AC-GAN's
    auxiliary classifier (as in the paper; then ``model`` must be ``None`` and
    ``optimizer`` may be, for Adam with ``solver_lr``).

    The defaults are the paper's MNIST settings where they fit (batch 64,
    noise 128, learning rate 2e-3, ``s_max`` 1e4), with a 64/32-channel
    generator and a 32/64-channel discriminator, and ``generator_iterations``
    discriminator steps per experience sized for 2 CPU cores (see the
    benchmark's config for the measured cost). Deviations, for few steps with
    Adam: the mask embeddings learn faster (``mask_lr`` 1e-2), the scale is
    annealed geometrically (see
    :func:`~avl_genreplay.generators.masks.annealed_scale`), and the sparsity
    weight is :data:`DEFAULT_SPARSITY` (5 for DGM-w, 10 for DGM-a), not the
    paper's 0.08, which left about half of the free capacity reserved after
    each task and made the generator grow (and slow down) by as much.

    :param model: the solver (``None`` with ``solver="discriminator"``).
    :param optimizer: the solver's optimizer.
    :param criterion: the solver's loss.
    :param input_shape: ``(channels, height, width)`` of the inputs; builds the
        default generator. Ignored if ``generator`` is given.
    :param num_classes: classes of the benchmark (the generator's conditions).
    :param variant: ``"w"`` (DGM-w, masks on weights) or ``"a"`` (DGM-a, masks
        on units).
    :param generator: a :class:`~avl_genreplay.generators.dgm.MaskedGenerator`;
        ``None`` to build one of ``generator_architecture``.
    :param generator_trainer: its :class:`DGMTrainer`; ``None`` to build one
        from the settings below.
    :param solver: ``"model"`` or ``"discriminator"``.
    :param solver_lr: Adam's learning rate for the discriminator as a solver
        when no ``optimizer`` is given.
    :param noise_dim: the generator's noise size.
    :param generator_architecture: the default generator and discriminator:
        ``"conv"`` (:class:`~avl_genreplay.generators.dgm.MaskedConvGenerator`
        of ``generator_channels`` and
        :class:`~avl_genreplay.generators.dgm.ACDiscriminator` of
        ``discriminator_channels``) or ``"mlp"``
        (:class:`~avl_genreplay.generators.dgm.MaskedMlpGenerator` and
        :class:`~avl_genreplay.generators.dgm.MlpACDiscriminator`, two hidden
        layers of ``generator_hidden_size`` each; cheaper on a CPU).
    :param generator_channels: the convolutional generator's hidden feature
        maps at the start (they grow).
    :param generator_hidden_size: the fully connected networks' hidden units
        (the generator's at the start; they grow).
    :param discriminator_channels: the convolutional discriminator's first
        feature maps.
    :param projection: condition the critic's score on the label by
        projection too, beside the auxiliary classifier.
    :param generator_iterations: discriminator steps per experience.
    :param generator_mb_size: the AC-GAN's batch size.
    :param generator_lr: the AC-GAN's learning rate.
    :param mask_lr: the mask embeddings' learning rate (``None``: as the
        networks').
    :param critic_steps: discriminator steps per generator step.
    :param gp_weight: weight of the gradient penalty.
    :param penalty_share: share of the critic's batch on which the gradient
        penalty is estimated (its double backward pass is the dearest part).
    :param aux_weight: weight of the auxiliary classification losses.
    :param s_max: largest mask scale.
    :param anneal_fraction: share of an experience's generator steps over
        which the mask scale rises to ``s_max``; the rest train the networks
        under (nearly) binary masks.
    :param sparsity: weight of the mask sparsity penalty; ``None`` for
        :data:`DEFAULT_SPARSITY` of the variant.
    :param generator_replay_share: share of replayed past classes in the
        AC-GAN's batches (``None``: ``(t - 1) / t``, as DGR).
    :param importance_ratio: ``r``, weight of the current data's loss in the
        solver's; ``None`` for ``1 / t``.
    :param replay_mb_size: replayed samples per solver iteration; ``None`` for
        the size of the current minibatch.
    :param replay_bank_size: replay minibatches drawn from this many inputs
        generated once before each experience instead of new inputs at every
        iteration (see :class:`~avl_genreplay.replay.SolverReplayPlugin`);
        ``None`` (the paper's way) for new inputs at every iteration.
    :param generator_replay_bank_size: the AC-GAN's replay is taken from this
        many inputs drawn once before each experience (see
        :class:`~avl_genreplay.generator_training.GeneratorTrainingPlugin`);
        ``None`` for new inputs at every step.
    :param relabel: label replay by the previous solver, not by its class.
    :param soft_targets: distil the previous solver's probabilities on the
        replay instead of its labels (see
        :class:`~avl_genreplay.replay.SolverReplayPlugin`).
    :param temperature: distillation temperature.
    :param augment: a random transformation of input batches applied alike
        to the solver's minibatches and to the replay (see
        :class:`~avl_genreplay.replay.SolverReplayPlugin`); ``None`` for none.
    :param generator_preload: keep the experience's data in memory, through its
        transforms, for the generator's training (faster; random augmentations
        would be drawn once: see
        :class:`~avl_genreplay.generator_training.GeneratorTrainingPlugin`).
    :param generator_train_after_last: ``False`` trains no generator on the
        stream's last experience (as in :class:`~avl_genreplay.strategies.DGR`).
    :param progress_bar: show the generator's progress bar.
    :param train_mb_size: the solver's minibatch size.
    :param train_epochs: the solver's epochs per experience.
    :param eval_mb_size: the evaluation minibatch size.
    :param device: where to train.
    :param plugins: more plugins. Under distributed training (``torchrun``,
        with Avalanche's ``DistributedHelper`` initialised before the strategy
        is built) a :class:`~avl_genreplay.distributed.DataParallelPlugin` is
        added unless one is given, so the solver trains data-parallel.
    :param evaluator: Avalanche's evaluation plugin (or a factory of one).
    :param eval_every: as in :class:`~avalanche.training.templates.SupervisedTemplate`.
    :param base_kwargs: more :class:`SupervisedTemplate` arguments.
    """

    def __init__(
        self,
        *,
        model: Optional[Module] = None,
        optimizer: Optional[Optimizer] = None,
        criterion=CrossEntropyLoss(),
        input_shape: Optional[Sequence[int]] = None,
        num_classes: Optional[int] = None,
        variant: str = "w",
        generator: Optional[MaskedGenerator] = None,
        generator_trainer: Optional[DGMTrainer] = None,
        solver: str = "model",
        solver_lr: float = 1e-3,
        noise_dim: int = 128,
        generator_architecture: str = "conv",
        generator_channels: Tuple[int, int] = (64, 32),
        generator_hidden_size: int = 400,
        discriminator_channels: int = 32,
        projection: bool = False,
        generator_iterations: int = 1000,
        generator_mb_size: int = 64,
        generator_lr: float = 2e-3,
        mask_lr: Optional[float] = 0.01,
        critic_steps: int = 2,
        gp_weight: float = 10.0,
        penalty_share: float = 1.0,
        aux_weight: float = 1.0,
        s_max: float = 1e4,
        anneal_fraction: float = 1.0,
        sparsity: Optional[float] = None,
        generator_replay_share: Optional[float] = 0.5,
        importance_ratio: Optional[float] = None,
        replay_mb_size: Optional[int] = None,
        replay_bank_size: Optional[int] = None,
        generator_replay_bank_size: Optional[int] = None,
        relabel: bool = False,
        soft_targets: bool = False,
        temperature: float = 2.0,
        augment: Optional[Callable[[Tensor], Tensor]] = None,
        generator_preload: bool = False,
        generator_train_after_last: bool = True,
        progress_bar: bool = True,
        train_mb_size: int = 128,
        train_epochs: int = 1,
        eval_mb_size: Optional[int] = None,
        device: Union[str, torch.device] = "cpu",
        plugins: Optional[List[SupervisedPlugin]] = None,
        evaluator: Union[
            EvaluationPlugin, Callable[[], EvaluationPlugin]
        ] = default_evaluator,
        eval_every: int = -1,
        **base_kwargs,
    ):
        device = check_device(device)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if critic_steps < 1:
            raise ValueError(f"critic_steps must be >= 1, got {critic_steps}")
        if not 0.0 < anneal_fraction <= 1.0:
            raise ValueError(
                f"anneal_fraction must lie in (0, 1], got {anneal_fraction}"
            )
        if generator_architecture not in _ARCHITECTURES:
            raise ValueError(
                f"generator_architecture must be one of {list(_ARCHITECTURES)}, "
                f"got {generator_architecture!r}"
            )
        if solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")
        if sparsity is None:
            sparsity = DEFAULT_SPARSITY[variant]
        if generator is None and generator_trainer is not None:
            generator = generator_trainer.generator
        if generator is None:
            if input_shape is None or num_classes is None:
                raise ValueError(
                    "DGM needs input_shape and num_classes (or a generator)"
                )
            if generator_architecture == "conv":
                generator = MaskedConvGenerator(
                    input_shape,
                    num_classes,
                    variant=variant,
                    noise_dim=noise_dim,
                    channels=generator_channels,
                )
            else:
                generator = MaskedMlpGenerator(
                    input_shape,
                    num_classes,
                    variant=variant,
                    noise_dim=noise_dim,
                    hidden=(generator_hidden_size, generator_hidden_size),
                )
        elif not isinstance(generator, MaskedGenerator):
            raise ValueError("DGM's generator must be a MaskedGenerator")
        generator.to(device)
        if generator_trainer is None:
            generator_trainer = DGMTrainer(
                generator,
                lr=generator_lr,
                mask_lr=mask_lr,
                critic_steps=critic_steps,
                gp_weight=gp_weight,
                penalty_share=penalty_share,
                aux_weight=aux_weight,
                sparsity=sparsity,
                s_max=s_max,
                anneal_steps=max(
                    round(anneal_fraction * generator_iterations / critic_steps), 1
                ),
                discriminator_channels=discriminator_channels,
                discriminator_hidden_size=generator_hidden_size,
                projection=projection,
            )
        elif generator_trainer.generator is not generator:
            raise ValueError("generator_trainer must train the given generator")
        if solver == "discriminator":
            if model is not None:
                raise ValueError(
                    "with solver='discriminator' the solver is the discriminator's "
                    "auxiliary classifier: leave model None"
                )
            model = DiscriminatorSolver(generator_trainer.discriminator, generator)
            if optimizer is None:
                optimizer = torch.optim.Adam(model.parameters(), lr=solver_lr)
        elif model is None or optimizer is None:
            raise ValueError("DGM needs a model and an optimizer (the solver)")
        self.generator = generator
        self.generator_trainer = generator_trainer
        self.replay_plugin = SolverReplayPlugin(
            generator,
            importance_ratio=importance_ratio,
            replay_mb_size=replay_mb_size,
            replay_bank_size=replay_bank_size,
            relabel=relabel,
            soft_targets=soft_targets,
            temperature=temperature,
            augment=augment,
        )
        self.generator_plugin = GeneratorTrainingPlugin(
            generator_trainer,
            train_iterations=generator_iterations,
            train_mb_size=generator_mb_size,
            replay_share=generator_replay_share,
            preload=generator_preload,
            train_after_last=generator_train_after_last,
            replay_bank_size=generator_replay_bank_size,
            progress_bar=progress_bar,
        )
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=with_data_parallel(
                [self.replay_plugin, self.generator_plugin] + (plugins or [])
            ),
            evaluator=evaluator,
            eval_every=eval_every,
            **base_kwargs,
        )
