"""Diffusion-based generative replay (DDGR) on class-incremental SplitMNIST.

    python examples/ddgr_splitmnist.py --data-root ../shared/data

Without ``--data-root`` (or ``$AVL_GENREPLAY_DATA``), Avalanche downloads MNIST.
The same plugins can be added by hand to any Avalanche strategy (the pool
plugin first, so the pool is full when the others take their copies)::

    diffusion = DiffusionGenerator(
        (1, 28, 28), num_classes=10, base_channels=16, prediction_type="sample"
    )
    pool = ReplayPool((1, 28, 28), num_classes=10)
    trainer = DDPMTrainer(diffusion, lr=2e-3, ema_decay=0.995, distill_replay=True)
    plugins = [
        ReplayPoolPlugin(diffusion, pool, samples_per_class=2000),
        SolverReplayPlugin(pool, replay_mb_size=256, soft_targets=True),
        GeneratorTrainingPlugin(trainer, replay_generator=pool),
    ]
    Naive(model=model, optimizer=optimizer, plugins=plugins)
"""

import argparse
import os

import torch
from avalanche.benchmarks.classic import SplitMNIST
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
from avalanche.logging import InteractiveLogger
from avalanche.models import SimpleMLP
from avalanche.training.plugins import EvaluationPlugin

from avl_genreplay import DDGR
from avl_genreplay.bench.data import subsample_experience


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("AVL_GENREPLAY_DATA"))
    parser.add_argument("--experiences", type=int, default=5)
    parser.add_argument("--generator-iterations", type=int, default=1000)
    parser.add_argument("--samples-per-class", type=int, default=2000)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    benchmark = SplitMNIST(
        n_experiences=5,
        fixed_class_order=list(range(10)),
        dataset_root=args.data_root,
    )
    model = SimpleMLP(num_classes=10, hidden_size=400, hidden_layers=2, drop_rate=0)
    strategy = DDGR(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        input_shape=(1, 28, 28),  # the default diffusion UNet follows it
        num_classes=10,
        generator_iterations=args.generator_iterations,
        samples_per_class=args.samples_per_class,
        replay_mb_size=256,  # the benchmark's settings (benchmarks/README.md)
        train_mb_size=128,
        train_epochs=4,
        evaluator=EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True),
            forgetting_metrics(experience=True, stream=True),
            loggers=[InteractiveLogger()],
        ),
    )
    results = None
    for experience in benchmark.train_stream[: args.experiences]:
        strategy.train(subsample_experience(experience, args.train_subset, args.seed))
        results = strategy.eval(benchmark.test_stream[: args.experiences])
    return results


if __name__ == "__main__":
    main()
