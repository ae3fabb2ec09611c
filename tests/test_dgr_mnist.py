"""DGR end to end on a subset of real MNIST: replay keeps the first classes."""

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import SimpleMLP
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from avl_genreplay.bench.data import subsample_experience
from avl_genreplay.strategies import DGR


def _accuracy_on_first_experience(strategy, mnist) -> float:
    results = strategy.eval(mnist.test_stream[:1])
    return results["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000"]


def _train_two_experiences(make_strategy, mnist) -> float:
    torch.manual_seed(0)
    model = SimpleMLP(num_classes=10, hidden_size=400, hidden_layers=2, drop_rate=0)
    strategy = make_strategy(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        train_mb_size=64,
        train_epochs=3,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
    )
    for experience in mnist.train_stream[:2]:
        strategy.train(subsample_experience(experience, 1000, seed=0))
    return _accuracy_on_first_experience(strategy, mnist)


def test_dgr_remembers_the_first_classes_where_naive_forgets(mnist):
    naive = _train_two_experiences(Naive, mnist)

    def dgr(**kwargs):
        return DGR(
            input_shape=(1, 28, 28),
            generator_iterations=250,
            generator_lr=1e-3,
            critic_steps=1,
            progress_bar=False,
            **kwargs,
        )

    replayed = _train_two_experiences(dgr, mnist)
    assert naive < 0.2  # catastrophic forgetting without replay
    assert replayed > 0.8 and replayed > naive + 0.6
