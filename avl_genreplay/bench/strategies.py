"""Builds each compared strategy from its config section and the protocol.

Ours (``dgr``, ``dgm_w``, ``dgm_a``, ``ddgr``) come from this package; the
baselines are Avalanche's own strategies, never re-implemented here. What
every row shares (the protocol: solver, optimiser, epochs, batch, input
transformation, replayed samples per solver step) comes from the
:class:`StrategyContext`; a config section holds only what belongs to its
method.
"""

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "StrategyContext",
    "STRATEGIES",
    "SOLVER_MODELS",
    "PROTOCOL_KEYS",
    "input_transform",
    "build_solver",
    "build_strategy",
    "setting_parameters",
    "UNSUPPORTED_SCENARIOS",
    "NOT_DISTRIBUTED",
    "per_process_sizes",
    "per_process_settings",
]

SOLVER_MODELS = ("mlp", "slim_resnet18")

# the scenarios a strategy cannot run in, and why: the plan leaves it out of
# a comparison that runs the config's strategies, and refuses it by name
UNSUPPORTED_SCENARIOS: Dict[str, Dict[str, str]] = {
    "gr": {
        "task": "Avalanche's GenerativeReplay labels its replay with the old "
        "solver without task labels, which a multi-head solver needs (it "
        "assumes a task-free stream)"
    },
}

# settings that the protocol fixes for every row; a strategy section may not
# set them (under whichever name its builder takes them)
PROTOCOL_KEYS = frozenset(
    {
        "augment",
        "replay_mb_size",
        "replay_size",
        "batch_size_mem",
        "train_mb_size",
        "train_epochs",
        "eval_mb_size",
        "lr",
        "optimizer",
        "model",
        "criterion",
    }
)


@dataclass
class StrategyContext:
    """What every builder gets besides its own settings."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    input_shape: Sequence[int]
    num_classes: int
    train_mb_size: int
    train_epochs: int
    device: torch.device
    evaluator: object
    plugins: list
    progress_bar: bool = True
    augment: Optional[Callable] = None
    replay_mb_size: Optional[int] = None
    normalization: Optional[tuple] = None
    scenario: str = "class"

    def template_kwargs(self, *, augment_inputs: bool = True) -> dict:
        """The template's arguments; with ``augment_inputs`` (and an input
        transformation in the protocol) its plugins transform the solver's
        minibatches. Strategies whose replay plugin transforms them itself,
        with the replay, pass ``False``."""
        plugins = list(self.plugins)
        if augment_inputs and self.augment is not None:
            from avl_genreplay.augmentation import InputAugmentationPlugin

            plugins.append(InputAugmentationPlugin(self.augment))
        return dict(
            model=self.model,
            optimizer=self.optimizer,
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=self.train_mb_size,
            train_epochs=self.train_epochs,
            eval_mb_size=256,
            device=self.device,
            evaluator=self.evaluator,
            plugins=plugins,
        )

    def replay_kwargs(self) -> dict:
        """What the protocol gives this package's replay strategies."""
        return dict(augment=self.augment, replay_mb_size=self.replay_mb_size)


def build_solver(
    solver: dict, input_shape: Sequence[int], num_classes: int, scenario: str
) -> nn.Module:
    """The solver named by ``solver["model"]``: ``"mlp"`` (Avalanche's
    ``SimpleMLP``) or ``"slim_resnet18"`` (Avalanche's ``SlimResNet18``).
    Task-incremental runs get Avalanche's multi-head version (``as_multitask``).
    """
    from avalanche.models import SimpleMLP, SlimResNet18, as_multitask

    name = solver.get("model", "mlp")
    if name not in SOLVER_MODELS:
        raise ValueError(f"unknown solver model {name!r}; use one of {SOLVER_MODELS}")
    if name == "mlp":
        model = SimpleMLP(
            num_classes=num_classes,
            input_size=int(torch.Size(input_shape).numel()),
            hidden_size=solver.get("hidden_size", 400),
            hidden_layers=solver.get("hidden_layers", 2),
            drop_rate=solver.get("drop_rate", 0.0),
        )
    else:
        model = SlimResNet18(nclasses=num_classes)
    if scenario == "task":
        model = as_multitask(model, "classifier")
    return model


def _naive(ctx: StrategyContext):
    from avalanche.training import Naive

    return Naive(**ctx.template_kwargs())


def _ewc(ctx: StrategyContext, ewc_lambda: float = 10000.0):
    from avalanche.training import EWC

    return EWC(ewc_lambda=ewc_lambda, **ctx.template_kwargs())


def _si(ctx: StrategyContext, si_lambda: float = 10.0):
    # Avalanche's SynapticIntelligence strategy is a template with its SI
    # plugin; built from the two with a plugin that stores copies of the
    # weights, without which SI trains as Naive on a CPU (see the module)
    from avalanche.training import Naive

    from avl_genreplay.bench.synaptic_intelligence import (
        CopyingSynapticIntelligencePlugin,
    )

    kwargs = ctx.template_kwargs()
    # appended last, where Avalanche's SynapticIntelligence puts its plugin
    kwargs["plugins"].append(CopyingSynapticIntelligencePlugin(si_lambda=si_lambda))
    return Naive(**kwargs)


def _lwf(ctx: StrategyContext, alpha: float = 1.0, temperature: float = 2.0):
    from avalanche.training import LwF

    return LwF(alpha=alpha, temperature=temperature, **ctx.template_kwargs())


def _replay(ctx: StrategyContext, mem_size: int = 1000):
    # Avalanche's Replay strategy is a template with its ReplayPlugin; built
    # from the two so that the memory batch follows the protocol
    from avalanche.training import Naive
    from avalanche.training.plugins import ReplayPlugin

    kwargs = ctx.template_kwargs()
    replay = ReplayPlugin(
        mem_size=mem_size,
        batch_size=ctx.train_mb_size,
        batch_size_mem=ctx.replay_mb_size,
    )
    kwargs["plugins"].insert(0, replay)
    return Naive(**kwargs)


def _joint(ctx: StrategyContext):
    from avalanche.training import JointTraining

    return JointTraining(**ctx.template_kwargs())


def _gr(ctx: StrategyContext):
    # Avalanche's own VAE generative replay at Avalanche's defaults (MlpVAE
    # with 2 latent units, Adam lr 0.01 and weight decay 1e-4, the solver's
    # batch and epochs), replaying the protocol's number of samples; the VAE
    # is built here for the benchmark's shape and value range
    from avalanche.models import MlpVAE
    from avalanche.training import GenerativeReplay, VAETraining
    from avalanche.training.plugins import GenerativeReplayPlugin
    from avalanche.training.supervised.strategy_wrappers import VAE_loss

    from avl_genreplay.generators.vae import DataRangeMlpVAE

    shape = tuple(ctx.input_shape)
    if ctx.normalization is None:
        vae = MlpVAE(shape, nhid=2, device=ctx.device)
    else:
        vae = DataRangeMlpVAE(
            shape, normalization=ctx.normalization, nhid=2, device=ctx.device
        )
    generator_strategy = VAETraining(
        model=vae,
        optimizer=torch.optim.Adam(vae.parameters(), lr=0.01, weight_decay=1e-4),
        criterion=VAE_loss,
        train_mb_size=ctx.train_mb_size,
        train_epochs=ctx.train_epochs,
        eval_mb_size=256,
        device=ctx.device,
        plugins=[GenerativeReplayPlugin(replay_size=ctx.replay_mb_size)],
        evaluator=None,
    )
    strategy = GenerativeReplay(
        generator_strategy=generator_strategy,
        replay_size=ctx.replay_mb_size,
        **ctx.template_kwargs(),
    )
    strategy.generator = vae
    return strategy


def input_transform(spec: Optional[dict]) -> Optional[Callable]:
    """The protocol's input transformation: Kornia's ``RandomAffine`` with the
    arguments of a config's ``augment`` table (padding by the border pixels
    and ``p = 1`` unless set), ``None`` without one."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(
            "augment must be a table of RandomAffine arguments, e.g. "
            "{ degrees = 10.0, translate = [0.07, 0.07], scale = [0.9, 1.1] }"
        )
    from kornia.augmentation import RandomAffine

    arguments = {"padding_mode": "border", "p": 1.0}
    for key, value in spec.items():
        arguments[key] = tuple(value) if isinstance(value, list) else value
    return RandomAffine(**arguments)


def _wraps(strategy_class: str):
    """Marks a builder that passes its settings on to ``strategy_class``
    (``"module:Class"``), whose keyword arguments are then its settings."""

    def mark(builder: Callable) -> Callable:
        builder.wrapped_strategy = strategy_class
        return builder

    return mark


@_wraps("avl_genreplay.strategies:DGR")
def _dgr(ctx: StrategyContext, **settings):
    from avl_genreplay.strategies import DGR

    kwargs = ctx.template_kwargs(augment_inputs=False)
    settings.setdefault("progress_bar", ctx.progress_bar)
    # task-incremental DGR scores its replay on every past head (van de Ven &
    # Tolias, 2019): its unconditional GAN's samples carry no task. DGM's and
    # DDGR's class-conditional generators draw samples of each past (task,
    # class) pair, already scored on their own task's head.
    settings.setdefault("score_every_head", ctx.scenario == "task")
    return DGR(input_shape=ctx.input_shape, **settings, **ctx.replay_kwargs(), **kwargs)


@_wraps("avl_genreplay.strategies:DDGR")
def _ddgr(ctx: StrategyContext, **settings):
    from avl_genreplay.strategies import DDGR

    kwargs = ctx.template_kwargs(augment_inputs=False)
    settings.setdefault("progress_bar", ctx.progress_bar)
    return DDGR(
        input_shape=ctx.input_shape,
        num_classes=ctx.num_classes,
        **settings,
        **ctx.replay_kwargs(),
        **kwargs,
    )


def _dgm(ctx: StrategyContext, variant: str, **settings):
    from avl_genreplay.strategies import DGM

    kwargs = ctx.template_kwargs(augment_inputs=False)
    settings.setdefault("progress_bar", ctx.progress_bar)
    return DGM(
        input_shape=ctx.input_shape,
        num_classes=ctx.num_classes,
        variant=variant,
        **settings,
        **ctx.replay_kwargs(),
        **kwargs,
    )


@_wraps("avl_genreplay.strategies:DGM")
def _dgm_w(ctx: StrategyContext, **settings):
    return _dgm(ctx, "w", **settings)


@_wraps("avl_genreplay.strategies:DGM")
def _dgm_a(ctx: StrategyContext, **settings):
    return _dgm(ctx, "a", **settings)


STRATEGIES: Dict[str, Callable] = {
    "naive": _naive,
    "ewc": _ewc,
    "si": _si,
    "lwf": _lwf,
    "replay": _replay,
    "joint": _joint,
    "gr": _gr,
    "dgr": _dgr,
    "dgm_w": _dgm_w,
    "dgm_a": _dgm_a,
    "ddgr": _ddgr,
}


def build_strategy(name: str, ctx: StrategyContext, settings: Optional[dict] = None):
    """Builds strategy ``name`` with its config ``settings``."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
    try:
        return STRATEGIES[name](ctx, **(settings or {}))
    except TypeError as error:
        raise ValueError(f"bad settings for strategy {name!r}: {error}") from None


# what the harness gives every strategy itself, never a config section
_GIVEN_BY_THE_HARNESS = {
    "ctx",
    "model",
    "optimizer",
    "criterion",
    "train_mb_size",
    "train_epochs",
    "eval_mb_size",
    "eval_every",
    "device",
    "evaluator",
    "plugins",
    "input_shape",
    "num_classes",
    "variant",
    "generator",
    "generator_trainer",
}
_GIVEN_BY_THE_HARNESS |= PROTOCOL_KEYS


# what cannot train under distributed training (--nproc), and why
NOT_DISTRIBUTED = {
    "gr": "Avalanche's GenerativeReplay trains its VAE with a strategy of its "
    "own, whose GenerativeReplayPlugin does not support distributed training",
}
# a strategy's own batch sizes, per process under distributed training as
# the solver's are (divided by the number of processes to keep the total)
_PER_PROCESS_SETTINGS = ("generator_mb_size",)


def per_process_sizes(name: str, settings: dict) -> Dict[str, int]:
    """The batch sizes among strategy ``name``'s settings (given, or its
    defaults) that each process of a distributed run takes a share of."""
    parameters = setting_parameters(name)
    return {
        key: settings.get(key, parameters[key].default)
        for key in _PER_PROCESS_SETTINGS
        if key in parameters
    }


def per_process_settings(name: str, settings: dict, processes: int) -> dict:
    """``settings`` with each of :func:`per_process_sizes` divided by the
    number of ``processes`` (the plan checked that they divide)."""
    if processes == 1:
        return settings
    sizes = per_process_sizes(name, settings)
    return {**settings, **{k: v // processes for k, v in sizes.items()}}


def setting_parameters(name: str) -> Dict[str, inspect.Parameter]:
    """The settings a config section of strategy ``name`` may hold: the
    keyword arguments of its builder, or of the strategy class the builder
    passes them on to, less what the harness gives every strategy."""
    builder = STRATEGIES[name]
    target = builder
    wrapped = getattr(builder, "wrapped_strategy", None)
    if wrapped is not None:
        module, attribute = wrapped.split(":")
        target = getattr(importlib.import_module(module), attribute).__init__
    return {
        key: parameter
        for key, parameter in inspect.signature(target).parameters.items()
        if key not in _GIVEN_BY_THE_HARNESS
        and key != "self"
        and parameter.kind
        not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }
