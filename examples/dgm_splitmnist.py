"""Dynamic Generative Memory (DGM-w or DGM-a) on class-incremental SplitMNIST.

    python examples/dgm_splitmnist.py --data-root ../shared/data --variant a

Without ``--data-root`` (or ``$AVL_GENREPLAY_DATA``), Avalanche downloads MNIST.
The same plugins can be added by hand to any Avalanche strategy::

    generator = MaskedConvGenerator((1, 28, 28), num_classes=10, variant="w")
    trainer = DGMTrainer(generator, anneal_steps=500)
    plugins = [
        SolverReplayPlugin(generator),
        GeneratorTrainingPlugin(trainer, train_iterations=1000, replay_share=0.5),
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
from kornia.augmentation import RandomAffine

from avl_genreplay import DGM
from avl_genreplay.bench.data import subsample_experience


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("AVL_GENREPLAY_DATA"))
    parser.add_argument("--variant", choices=["w", "a"], default="w")
    parser.add_argument("--experiences", type=int, default=5)
    parser.add_argument("--generator-iterations", type=int, default=1000)
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
    strategy = DGM(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        input_shape=(1, 28, 28),  # the generator and discriminator follow it
        num_classes=10,
        variant=args.variant,
        generator_iterations=args.generator_iterations,
        soft_targets=True,
        # the solver's minibatches and the replay get the same random
        # rotations, shifts and scalings (as in the benchmark's config)
        augment=RandomAffine(
            degrees=10.0,
            translate=(0.07, 0.07),
            scale=(0.9, 1.1),
            padding_mode="border",
            p=1.0,
        ),
        train_mb_size=128,
        train_epochs=2,
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
        growth = strategy.generator.growth_log[-1]
        print(
            f"generator after experience {growth['task']}: units {growth['units']}, "
            f"{growth['parameters']} parameters"
        )
    return results


if __name__ == "__main__":
    main()
