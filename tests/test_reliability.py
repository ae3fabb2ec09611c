"""Reliability: resumable and deterministic runs, guarded generator training,
inputs validated before any training."""

import pytest
import torch
from avl_genreplay.checkpoint import maybe_load_checkpoint, save_checkpoint
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import SimpleMLP
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin

from avalanche.training import Naive

from avl_genreplay.generator_training import (
    GeneratorTrainingError,
    GeneratorTrainingPlugin,
    TrainingGuard,
)
from avl_genreplay.generators.diffusion import DiffusionGenerator
from avl_genreplay.generators.wgan_gp import ConvGenerator, WGANGPTrainer
from avl_genreplay.strategies import DDGR, DGM, DGR

SHAPE = (1, 12, 12)


class Killed(Exception):
    """Stands for the process dying mid-run."""


class KillDuring(SupervisedPlugin):
    """Kills the run at an iteration of an experience, once per process: the
    checkpoint restores this plugin too, and a resumed run must not die again."""

    fired = False  # on the class, so not restored from a checkpoint

    def __init__(self, experience):
        super().__init__()
        self.experience = experience

    def after_training_iteration(self, strategy, **kwargs):
        if (
            strategy.experience.current_experience == self.experience
            and strategy.clock.train_epoch_iterations >= 1
            and not KillDuring.fired
        ):
            KillDuring.fired = True
            raise Killed()


def _small_solver():
    model = SimpleMLP(num_classes=6, input_size=144, hidden_size=32, drop_rate=0)
    return dict(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        train_mb_size=16,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
    )


def _dgr(plugins=()):
    return DGR(
        generator=ConvGenerator(SHAPE, channels=8),
        generator_iterations=4,
        critic_steps=2,
        progress_bar=False,
        plugins=list(plugins),
        **_small_solver(),
    )


def _ddgr(plugins=()):
    return DDGR(
        generator=DiffusionGenerator(
            SHAPE, 6, base_channels=8, sampling_steps=3, sampler="ddpm"
        ),
        generator_iterations=4,
        samples_per_class=6,
        progress_bar=False,
        plugins=list(plugins),
        **_small_solver(),
    )


def _dgm(plugins=()):
    return DGM(
        input_shape=SHAPE,
        num_classes=6,
        variant="w",
        noise_dim=8,
        generator_channels=(8, 4),
        discriminator_channels=8,
        generator_iterations=4,
        progress_bar=False,
        plugins=list(plugins),
        **_small_solver(),
    )


METHODS = {"dgr": _dgr, "ddgr": _ddgr, "dgm": _dgm}


def _plugins_hold_the_strategys_networks(strategy) -> bool:
    """After a restore, the plugins must use the restored networks, not the
    ones of the strategy the checkpoint was loaded into."""
    pool = getattr(strategy, "pool", None)
    replayed = strategy.generator if pool is None else pool
    held = strategy.replay_plugin.generator is replayed
    held &= strategy.generator_plugin.generator is strategy.generator
    if pool is not None:
        held &= strategy.pool_plugin.pool is pool
        held &= strategy.generator_plugin.replay_generator is pool
    return held


def _row(strategy, stream):
    results = strategy.eval(stream)
    return [
        results[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"]
        for j in range(len(stream))
    ]


def _run(stream, method, checkpoint=None, kill_at=None, resuming=False):
    """Trains a method over the stream, checkpointing after each experience."""
    RNGManager.set_random_seeds(0)
    KillDuring.fired = resuming
    strategy = METHODS[method]([KillDuring(kill_at)] if kill_at is not None else [])
    start = 0
    if checkpoint is not None:
        strategy, start = maybe_load_checkpoint(strategy, checkpoint)
    matrix = []
    for experience in stream.train_stream[start:]:
        strategy.train(experience)
        matrix.append(_row(strategy, stream.test_stream))
        if checkpoint is not None:
            save_checkpoint(strategy, checkpoint)
    return matrix, strategy


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_runs_with_one_seed_give_the_same_accuracy_matrix(tiny_stream, method):
    (first, a), (second, b) = _run(tiny_stream, method), _run(tiny_stream, method)
    assert first == second
    assert _same_weights(a.model, b.model) and _same_weights(a.generator, b.generator)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_run_killed_after_experience_2_resumes_to_the_same_result(
    tiny_stream, tmp_path, method
):
    uninterrupted, whole = _run(tiny_stream, method)
    checkpoint = tmp_path / f"{method}.pkl"
    with pytest.raises(Killed):
        _run(tiny_stream, method, checkpoint, kill_at=2)
    resumed, strategy = _run(tiny_stream, method, checkpoint, resuming=True)
    assert len(resumed) == 1  # only the last experience was left
    assert resumed[-1] == uninterrupted[-1]
    # the same networks, not only the same (coarse) accuracies
    assert _same_weights(strategy.model, whole.model)
    assert _same_weights(strategy.generator, whole.generator)
    assert _plugins_hold_the_strategys_networks(strategy)


# --- guarded generator training ---------------------------------------------


class NaNAt(WGANGPTrainer):
    """A WGAN-GP trainer whose generator turns NaN at the given steps (counted
    over the whole run, retries included)."""

    def __init__(self, generator, at, **kwargs):
        super().__init__(generator, **kwargs)
        self.at = set(at)
        self.calls = 0

    def train_step(self, x, y=None):
        losses = super().train_step(x, y)
        self.calls += 1
        if self.calls in self.at:
            with torch.no_grad():
                for parameter in self.generator.parameters():
                    parameter.fill_(float("nan"))
            losses["generator"] = float("nan")
        return losses


def _naive_with(
    trainer, stream, experiences=1, train_iterations=10, guard=TrainingGuard
):
    model = SimpleMLP(num_classes=6, input_size=144, hidden_size=32, drop_rate=0)
    plugin = GeneratorTrainingPlugin(
        trainer, train_iterations=train_iterations, guard=guard, progress_bar=False
    )
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        train_mb_size=16,
        evaluator=EvaluationPlugin(loggers=[]),
        plugins=[plugin],
    )
    for experience in stream.train_stream[:experiences]:
        strategy.train(experience)
    return plugin


def test_a_nan_generator_is_rolled_back_with_a_lower_learning_rate(tiny_stream):
    generator = ConvGenerator(SHAPE, channels=8)
    trainer = NaNAt(generator, at=[7], lr=1e-3, critic_steps=1)
    plugin = _naive_with(
        trainer,
        tiny_stream,
        train_iterations=10,
        guard=TrainingGuard(check_every=5, max_class_share=1.0),
    )
    assert len(plugin.guard.rollbacks) == 1
    rollback = plugin.guard.rollbacks[0]
    assert rollback["experience"] == 0 and rollback["step"] == 7
    assert rollback["resumed_from"] == 5 and "not finite" in rollback["reason"]
    assert trainer.calls == 12  # 7 steps, then steps 6..10 again
    assert all(torch.isfinite(p).all() for p in generator.parameters())
    for optimizer in trainer.optimizers():
        assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_generator_training_stops_with_a_clear_error_after_the_retries(tiny_stream):
    generator = ConvGenerator(SHAPE, channels=8)
    trainer = NaNAt(generator, at=range(1, 100), critic_steps=1)
    with pytest.raises(
        GeneratorTrainingError, match=r"experience 0, step 1: .*2 times"
    ):
        _naive_with(
            trainer,
            tiny_stream,
            train_iterations=10,
            guard=TrainingGuard(max_retries=2),
        )


class Collapsing(WGANGPTrainer):
    """Zeroes the generator's last layer: every sample is the same image."""

    def train_step(self, x, y=None):
        losses = super().train_step(x, y)
        with torch.no_grad():
            self.generator.upsample[-2].weight.zero_()
        return losses


def test_samples_of_near_zero_variance_are_a_collapse(tiny_stream):
    trainer = Collapsing(ConvGenerator(SHAPE, channels=8), critic_steps=1)
    with pytest.raises(GeneratorTrainingError, match="near-zero variance"):
        _naive_with(
            trainer, tiny_stream, train_iterations=6, guard=TrainingGuard(check_every=2)
        )


def test_samples_all_put_in_one_class_are_a_collapse(tiny_stream):
    trainer = WGANGPTrainer(ConvGenerator(SHAPE, channels=8), critic_steps=1)
    model = SimpleMLP(num_classes=6, input_size=144, hidden_size=32, drop_rate=0)
    with torch.no_grad():
        model.classifier.bias[0] = 1e4  # the solver calls everything class 0
    plugin = GeneratorTrainingPlugin(
        trainer,
        train_iterations=4,
        guard=TrainingGuard(check_every=4, max_retries=1),
        progress_bar=False,
    )
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        evaluator=EvaluationPlugin(loggers=[]),
        plugins=[plugin],
    )
    with pytest.raises(GeneratorTrainingError, match="100% of the samples in class 0"):
        strategy.train(tiny_stream.train_stream[0])


def test_without_a_guard_a_nan_generator_trains_on(tiny_stream):
    trainer = NaNAt(ConvGenerator(SHAPE, channels=8), at=range(1, 100), critic_steps=1)
    _naive_with(trainer, tiny_stream, train_iterations=6, guard=None)
    assert trainer.calls == 6  # no rollback, no error


class _Watching(TrainingGuard):
    """A guard of the user's own: records how the plugin calls it and asks
    for one rollback, to step 2, at step 3 of each experience."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def start_experience(self, trainer, *, experience, iterations, **kwargs):
        self.calls.append(("start", experience, iterations))
        self.rolled_back = False

    def after_step(self, step, losses, real_x):
        self.calls.append(("step", step))
        if step == 3 and not self.rolled_back:
            self.rolled_back = True
            return 2
        return None

    def end_experience(self):
        self.calls.append(("end",))


def test_a_guard_of_ones_own_replaces_the_default(tiny_stream):
    trainer = WGANGPTrainer(ConvGenerator(SHAPE, channels=8), critic_steps=1)
    guard = _Watching()
    plugin = _naive_with(trainer, tiny_stream, train_iterations=4, guard=guard)
    assert plugin.guard is guard
    steps = [("step", s) for s in (1, 2, 3, 3, 4)]  # resumed after step 2
    assert guard.calls == [("start", 0, 4), *steps, ("end",)]


def test_each_plugin_gets_a_default_guard_of_its_own():
    plugins = [
        GeneratorTrainingPlugin(WGANGPTrainer(ConvGenerator(SHAPE, channels=8)))
        for _ in range(2)
    ]
    assert all(isinstance(p.guard, TrainingGuard) for p in plugins)
    assert plugins[0].guard is not plugins[1].guard


# --- inputs validated before any training -------------------------------------


def _untouched(model, weights) -> bool:
    return all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def _dgr_with(model, **kwargs):
    kwargs.setdefault("generator", ConvGenerator(SHAPE, channels=8))
    return DGR(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        generator_iterations=2,
        progress_bar=False,
        evaluator=EvaluationPlugin(loggers=[]),
        **kwargs,
    )


def _mlp():
    return SimpleMLP(num_classes=6, input_size=144, hidden_size=32, drop_rate=0)


def test_a_class_the_conditional_generator_does_not_know(tiny_stream):
    model = _mlp()
    generator = ConvGenerator(SHAPE, channels=8, num_classes=2)
    strategy = _dgr_with(model, generator=generator)
    strategy.train(tiny_stream.train_stream[0])  # classes 0 and 1: known
    weights = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"classes \[2, 3\] that the conditional"):
        strategy.train(tiny_stream.train_stream[1])
    assert _untouched(model, weights)


def test_an_empty_experience(tiny_stream):
    model = _mlp()
    weights = [p.clone() for p in model.parameters()]
    experience = tiny_stream.train_stream[0]
    experience.dataset = experience.dataset.subset([])
    with pytest.raises(ValueError, match="empty dataset"):
        _dgr_with(model).train(experience)
    assert _untouched(model, weights)


def test_a_stream_without_class_information():
    from types import SimpleNamespace

    from avl_genreplay.replay import check_generator_classes

    experience = SimpleNamespace(
        classes_in_this_experience=None,
        dataset=SimpleNamespace(targets=None),
        current_experience=0,
    )
    with pytest.raises(ValueError, match="no class information"):
        check_generator_classes(ConvGenerator(SHAPE, channels=8), experience)


@pytest.mark.parametrize("device", ["cuda:7", "tpu", "cpu:x"])
def test_a_device_that_does_not_exist(device):
    with pytest.raises(ValueError, match="device"):
        _dgr_with(_mlp(), device=device)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(importance_ratio=1.01), "importance_ratio"),
        (dict(generator_replay_share=-0.1), "replay_share"),
        (dict(replay_mb_size=0), "replay_mb_size"),
        (dict(generator_mb_size=0), "train_mb_size"),
        (dict(critic_steps=0), "critic_steps"),
    ],
)
def test_ratios_and_batch_sizes_out_of_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _dgr_with(_mlp(), **kwargs)


def test_dgr_refuses_a_missing_shape_or_a_trainer_of_another_generator():
    with pytest.raises(ValueError, match="input_shape"):
        DGR(**_small_solver())
    other = WGANGPTrainer(ConvGenerator(SHAPE, channels=8))
    with pytest.raises(ValueError, match="must train the given generator"):
        DGR(
            generator=ConvGenerator(SHAPE, channels=8),
            generator_trainer=other,
            **_small_solver(),
        )
