"""Avalanche's own VAE (MlpVAE) as the replayed generator, in Avalanche's Naive.

    python examples/vae_splitmnist.py --data-root ../shared/data
    python examples/vae_splitmnist.py --data-root ../shared/data --no-replay

Without ``--data-root`` (or ``$AVL_GENREPLAY_DATA``), Avalanche downloads MNIST.
Any Avalanche ``Generator`` fits the plugins: this one is trained by a small
:class:`~avl_genreplay.generators.base.GeneratorTrainer` of the user's own (the
VAE loss), on each experience's data mixed with its own replay, while
:class:`~avl_genreplay.SolverReplayPlugin` replays its samples, labelled by the
previous solver, to the solver. ``--no-replay`` trains Naive alone, for
comparison.
"""

import argparse
import os
from typing import Dict, Optional

import torch
from avalanche.benchmarks.classic import SplitMNIST
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
from avalanche.logging import InteractiveLogger
from avalanche.models import MlpVAE, SimpleMLP
from avalanche.models.generator import VAE_loss
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import Tensor

from avl_genreplay import GeneratorTrainingPlugin, SolverReplayPlugin
from avl_genreplay.bench.data import subsample_experience
from avl_genreplay.generators.base import GeneratorTrainer


class VAETrainer(GeneratorTrainer):
    """Trains a ``MlpVAE`` on Avalanche's VAE loss (reconstruction error plus
    KL divergence), per sample, with Adam.

    :param generator: the VAE.
    :param lr: Adam's learning rate.
    """

    def __init__(self, generator: MlpVAE, *, lr: float = 1e-3):
        self.generator = generator
        self.optimizer = torch.optim.Adam(generator.parameters(), lr=lr)

    def train_step(self, x: Tensor, y: Optional[Tensor] = None) -> Dict[str, float]:
        self.generator.train()
        self.optimizer.zero_grad()
        loss = VAE_loss(x, self.generator(x)) / len(x)
        loss.backward()
        self.optimizer.step()
        return {"vae": loss.item()}

    def optimizers(self):
        return [self.optimizer]

    def state_dict(self) -> dict:
        return dict(
            generator=self.generator.state_dict(),
            optimizer=self.optimizer.state_dict(),
        )

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("AVL_GENREPLAY_DATA"))
    parser.add_argument("--experiences", type=int, default=5)
    parser.add_argument("--generator-iterations", type=int, default=2000)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-replay", action="store_true")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    benchmark = SplitMNIST(
        n_experiences=5,
        fixed_class_order=list(range(10)),
        dataset_root=args.data_root,
    )
    model = SimpleMLP(num_classes=10, hidden_size=400, hidden_layers=2, drop_rate=0)
    plugins = []
    if not args.no_replay:
        # MlpVAE's decoder maps to MNIST's normalised range, as SplitMNIST's data
        generator = MlpVAE((1, 28, 28), nhid=16)
        plugins = [
            SolverReplayPlugin(generator),
            GeneratorTrainingPlugin(
                VAETrainer(generator),
                train_iterations=args.generator_iterations,
                train_mb_size=128,
            ),
        ]
    strategy = Naive(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        train_mb_size=128,
        train_epochs=2,
        plugins=plugins,
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
