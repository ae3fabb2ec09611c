"""Each usage example runs (briefly) on real data."""

import importlib.util
from pathlib import Path

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import MlpVAE, SimpleMLP
from avalanche.training import Naive
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.plugins import EvaluationPlugin

from avl_genreplay import GeneratorTrainingPlugin, SolverReplayPlugin
from avl_genreplay.bench.data import subsample_experience

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "example, own_arguments",
    [
        ("dgr_splitmnist", []),
        ("ddgr_splitmnist", ["--samples-per-class", "8"]),
        ("dgm_splitmnist", ["--variant", "a"]),
        ("vae_splitmnist", []),
    ],
)
def test_example_trains_and_evaluates(example, own_arguments, data_root, monkeypatch):
    trained = []  # the classes and size of each experience the strategy trains on
    train = SupervisedTemplate.train

    def recording_train(strategy, experiences, *args, **kwargs):
        targets = list(experiences.dataset.targets)
        trained.append((sorted(set(targets)), len(targets)))
        return train(strategy, experiences, *args, **kwargs)

    evaluated = []  # the test-experience sizes of each evaluation
    evaluate = SupervisedTemplate.eval

    def recording_eval(strategy, experiences, *args, **kwargs):
        evaluated.append([len(e.dataset) for e in experiences])
        return evaluate(strategy, experiences, *args, **kwargs)

    monkeypatch.setattr(SupervisedTemplate, "train", recording_train)
    monkeypatch.setattr(SupervisedTemplate, "eval", recording_eval)
    results = _load(example).main(
        [
            "--data-root",
            str(data_root),
            "--experiences",
            "2",
            "--generator-iterations",
            "5",
            "--train-subset",
            "256",
            *own_arguments,
        ]
    )
    accuracy = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    # the final evaluation covers the two experiences seen, and the stream's
    # accuracy is their accuracies weighted by their test sizes
    sizes = evaluated[-1]
    assert len(sizes) == 2
    per_experience = [
        results[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp00{i}"]
        for i in range(2)
    ]
    weighted = sum(a * n for a, n in zip(per_experience, sizes)) / sum(sizes)
    assert accuracy == pytest.approx(weighted)
    # a random subset of each experience: both its classes, not the first one's
    assert trained == [([0, 1], 256), ([2, 3], 256)]


def _class_il_run(benchmark, *, replay: bool) -> float:
    """Accuracy on the test data of 3 class-incremental SplitMNIST experiences
    (1,000 random training images each), with Avalanche's ``MlpVAE`` replayed
    and trained through the plugins (the example's trainer) or Naive alone."""
    torch.manual_seed(0)
    model = SimpleMLP(num_classes=10, hidden_size=200, drop_rate=0)
    plugins = []
    if replay:
        generator = MlpVAE((1, 28, 28), nhid=16)
        trainer = _load("vae_splitmnist").VAETrainer(generator)
        plugins = [
            SolverReplayPlugin(generator),
            GeneratorTrainingPlugin(
                trainer, train_iterations=300, train_mb_size=64, progress_bar=False
            ),
        ]
    strategy = Naive(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        train_mb_size=32,
        train_epochs=2,
        plugins=plugins,
        evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]),
    )
    for experience in benchmark.train_stream[:3]:
        strategy.train(subsample_experience(experience, 1000, seed=0))
    results = strategy.eval(benchmark.test_stream[:3])
    return results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]


def test_mlp_vae_trained_through_the_plugins_ends_above_naive(mnist):
    """Naive keeps only the last experience's classes (about a third of the
    test data); replay of a VAE that learned every experience keeps more."""
    torch.set_num_threads(1)
    naive = _class_il_run(mnist, replay=False)
    replayed = _class_il_run(mnist, replay=True)
    assert replayed > naive + 0.2, (naive, replayed)
