"""Resumable, deterministic runs."""

import pytest
import torch
from avl_genreplay.checkpoint import maybe_load_checkpoint, save_checkpoint
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import SimpleMLP
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin

from avl_genreplay.generators.wgan_gp import ConvGenerator
from avl_genreplay.strategies import DGR

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


def _dgr(plugins=()):
    model = SimpleMLP(num_classes=6, input_size=144, hidden_size=32, drop_rate=0)
    return DGR(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        generator=ConvGenerator(SHAPE, channels=8),
        generator_iterations=4,
        critic_steps=2,
        progress_bar=False,
        train_mb_size=16,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
        plugins=list(plugins),
    )


def _row(strategy, stream):
    results = strategy.eval(stream)
    return [
        results[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"]
        for j in range(len(stream))
    ]


def _run(stream, checkpoint=None, kill_at=None, resuming=False):
    """Trains DGR over the stream, checkpointing after each experience."""
    RNGManager.set_random_seeds(0)
    KillDuring.fired = resuming
    strategy = _dgr([KillDuring(kill_at)] if kill_at is not None else [])
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


def test_two_runs_with_one_seed_give_the_same_accuracy_matrix(tiny_stream):
    (first, a), (second, b) = _run(tiny_stream), _run(tiny_stream)
    assert first == second
    assert _same_weights(a.model, b.model) and _same_weights(a.generator, b.generator)


def test_a_run_killed_after_experience_2_resumes_to_the_same_result(
    tiny_stream, tmp_path
):
    uninterrupted, whole = _run(tiny_stream)
    checkpoint = tmp_path / "dgr.pkl"
    with pytest.raises(Killed):
        _run(tiny_stream, checkpoint, kill_at=2)
    resumed, strategy = _run(tiny_stream, checkpoint, resuming=True)
    assert len(resumed) == 1  # only the last experience was left
    assert resumed[-1] == uninterrupted[-1]
    # the same networks, not only the same (coarse) accuracies
    assert _same_weights(strategy.model, whole.model)
    assert _same_weights(strategy.generator, whole.generator)
    # the plugins hold the restored generator, not the fresh one
    assert strategy.replay_plugin.generator is strategy.generator
