"""DGR end to end on a subset of real MNIST: replay keeps the first classes."""

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import SimpleMLP, as_multitask
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from avl_genreplay.bench.data import make_benchmark, subsample_experience
from avl_genreplay.strategies import DGR


@pytest.fixture(scope="module")
def mnist_task(data_root):
    """Real SplitMNIST, task-incremental: 5 tasks of 2 classes, one head each."""
    return make_benchmark("splitmnist", scenario="task", data_root=data_root)


def _train(make_strategy, benchmark, n_experiences, *, multitask=False, **kwargs):
    """Trains a fresh 400x400 MLP on the first experiences (1000 samples each)
    and returns its accuracy on each of their test experiences."""
    torch.manual_seed(0)
    model = SimpleMLP(num_classes=10, hidden_size=400, hidden_layers=2, drop_rate=0)
    if multitask:
        model = as_multitask(model, "classifier")
    kwargs.setdefault("train_epochs", 3)
    strategy = make_strategy(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=kwargs.pop("lr", 1e-3)),
        train_mb_size=64,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
        **kwargs,
    )
    for experience in benchmark.train_stream[:n_experiences]:
        strategy.train(subsample_experience(experience, 1000, seed=0))
    results = strategy.eval(benchmark.test_stream[:n_experiences])
    return [
        results[f"Top1_Acc_Exp/eval_phase/test_stream/Task{task:03d}/Exp{index:03d}"]
        for index, task in enumerate(
            e.task_label for e in benchmark.test_stream[:n_experiences]
        )
    ]


def _dgr(iterations, **settings):
    def make(**kwargs):
        return DGR(
            input_shape=(1, 28, 28),
            generator_iterations=iterations,
            generator_lr=1e-3,
            critic_steps=1,
            # nothing replays the generator after the last experience
            generator_train_after_last=False,
            progress_bar=False,
            **settings,
            **kwargs,
        )

    return make


def test_dgr_remembers_the_first_classes_where_naive_forgets(mnist):
    naive = _train(Naive, mnist, 2)[0]
    replayed = _train(_dgr(250), mnist, 2)[0]
    assert naive < 0.2  # catastrophic forgetting without replay
    assert replayed > 0.8 and replayed > naive + 0.6


def test_task_incremental_dgr_scoring_every_head_forgets_less_than_naive(
    mnist_task,
):
    """Three tasks, each learned for 5 epochs at a high learning rate, so that
    the shared layers drift: replay scored on both past heads keeps the first
    two tasks better than Naive."""
    torch.set_num_threads(1)
    settings = dict(multitask=True, train_epochs=5, lr=3e-3)
    naive = _train(Naive, mnist_task, 3, **settings)
    replayed = _train(
        _dgr(100, score_every_head=True, generator_preload=True),
        mnist_task,
        3,
        **settings,
    )
    assert min(naive[:2]) < 0.9  # the shared layers drift without replay
    past = sum(replayed[:2]) / 2
    assert past > sum(naive[:2]) / 2 + 0.05 and min(replayed[:2]) > min(naive[:2])
