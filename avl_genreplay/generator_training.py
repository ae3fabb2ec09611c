"""Training the generator of a scholar, experience after experience.

:class:`GeneratorTrainingPlugin` trains a generator, through a
:class:`~avl_genreplay.generators.base.GeneratorTrainer` (GAN, diffusion, ...),
on the real data of each experience mixed with replay from a frozen copy of
the previous generator, so that it learns the inputs of all experiences seen
(Shin et al., 2017). It runs after the solver (default) or alongside it, one
generator step per solver iteration.
"""

import math
from typing import Dict, List, Optional

import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from avl_genreplay.generators.base import GeneratorTrainer
from avl_genreplay.replay import (
    PastClasses,
    check_generator_shape,
    experience_classes,
    experience_task_label,
    frozen_copy,
    sample_past_inputs,
)

__all__ = ["GeneratorTrainingPlugin"]

_SCHEDULES = ("after", "alongside")


class GeneratorTrainingPlugin(SupervisedPlugin):
    """Trains a generator on each experience's data plus its own replay.

    Each generator batch holds ``replay_share`` replayed samples of past
    experiences and real samples of the current one for the rest. A
    class-conditional generator gets the real labels and, for replay, the
    requested past classes.

    :param trainer: the generator's training step (holds the generator, its
        critic if any, and their optimisers).
    :param train_iterations: generator training steps per experience (with
        ``schedule="after"``).
    :param train_epochs: alternatively, passes over the experience's data;
        overrides ``train_iterations`` when given.
    :param train_mb_size: the generator's batch size (its own, not the
        solver's).
    :param schedule: ``"after"`` the solver has learned the experience (DGR),
        or ``"alongside"`` it, one generator step per solver iteration.
    :param replay_share: share of replay in each generator batch; ``None``
        (DGR) uses ``(t - 1) / t`` with ``t`` experiences seen, current one
        included, so every experience weighs the same.
    :param progress_bar: show a progress bar with the losses.
    :param num_workers: data loader workers for the generator's data.
    """

    def __init__(
        self,
        trainer: GeneratorTrainer,
        *,
        train_iterations: int = 1000,
        train_epochs: Optional[int] = None,
        train_mb_size: int = 64,
        schedule: str = "after",
        replay_share: Optional[float] = None,
        progress_bar: bool = True,
        num_workers: int = 0,
    ):
        super().__init__()
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
        if replay_share is not None and not 0.0 <= replay_share <= 1.0:
            raise ValueError(f"replay_share must lie in [0, 1], got {replay_share}")
        if train_mb_size < 1:
            raise ValueError(f"train_mb_size must be >= 1, got {train_mb_size}")
        if train_epochs is None and train_iterations < 1:
            raise ValueError(f"train_iterations must be >= 1, got {train_iterations}")
        if train_epochs is not None and train_epochs < 1:
            raise ValueError(f"train_epochs must be >= 1, got {train_epochs}")
        self.trainer = trainer
        self.generator = trainer.generator
        self.train_iterations = train_iterations
        self.train_epochs = train_epochs
        self.train_mb_size = train_mb_size
        self.schedule = schedule
        self.replay_share = replay_share
        self.progress_bar = progress_bar
        self.num_workers = num_workers
        self.past = PastClasses()
        self.old_generator = None
        self.experience_index = 0
        self.loss_history: List[Dict[str, float]] = []

    def current_replay_share(self) -> float:
        if not self.past:
            return 0.0
        if self.replay_share is not None:
            return self.replay_share
        return self.past.experiences / (self.past.experiences + 1)

    def before_training_exp(self, strategy, **kwargs):
        check_generator_shape(self.generator, strategy.experience)
        experience_classes(strategy.experience)
        self.generator.to(strategy.device)
        self.old_generator = frozen_copy(self.generator) if self.past else None
        self.experience_index = strategy.experience.current_experience
        self.trainer.start_experience(self.experience_index)

    def after_training_iteration(self, strategy, **kwargs):
        if self.schedule == "alongside":
            real_y = strategy.mb_y if self.generator.is_conditional else None
            self._train_step(strategy.mb_x, real_y, strategy.device)

    def after_training_exp(self, strategy, **kwargs):
        if self.schedule == "after":
            self._train_on_experience(strategy)
        self.trainer.end_experience(self.experience_index)
        self.past.add(
            experience_task_label(strategy.experience),
            experience_classes(strategy.experience),
        )
        self.old_generator = None

    def _iterations(self, dataset_size: int, real_per_batch: int) -> int:
        if self.train_epochs is None:
            return self.train_iterations
        return self.train_epochs * math.ceil(dataset_size / max(real_per_batch, 1))

    def _train_on_experience(self, strategy):
        share = self.current_replay_share()
        n_replay = round(self.train_mb_size * share)
        n_real = self.train_mb_size - n_replay
        dataset = strategy.experience.dataset.train()
        loader = DataLoader(
            dataset,
            batch_size=max(n_real, 1),
            shuffle=True,
            drop_last=len(dataset) > n_real,
            num_workers=self.num_workers,
        )
        iterations = self._iterations(len(dataset), n_real)
        bar = tqdm(
            total=iterations,
            desc=f"generator, experience {self.experience_index}",
            disable=not self.progress_bar,
            leave=False,
        )
        done, totals = 0, {}
        while done < iterations:
            for batch in loader:
                x, y = batch[0].to(strategy.device), batch[1].to(strategy.device)
                if n_real == 0:
                    x, y = x[:0], y[:0]
                losses = self._train_step(x, y, strategy.device, n_replay)
                for name, value in losses.items():
                    totals[name] = totals.get(name, 0.0) + value
                done += 1
                bar.update(1)
                if done % 50 == 0:
                    bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()})
                if done >= iterations:
                    break
        bar.close()
        self.loss_history.append({k: v / max(done, 1) for k, v in totals.items()})

    def _train_step(
        self,
        real_x: torch.Tensor,
        real_y: Optional[torch.Tensor],
        device,
        n_replay: Optional[int] = None,
    ) -> Dict[str, float]:
        """One trainer step on real data mixed with the old generator's replay."""
        if len(real_x):
            self.generator.calibrate_range(real_x)
        if n_replay is None:
            share = self.current_replay_share()
            n_replay = round(len(real_x) * share / max(1 - share, 1e-8))
        x, y = real_x, real_y
        if self.old_generator is not None and n_replay > 0:
            with torch.no_grad():
                replay_x, conditions, _ = sample_past_inputs(
                    self.old_generator, n_replay, self.past, device
                )
            x = torch.cat([real_x, replay_x])
            if self.generator.is_conditional:
                y = torch.cat([real_y, conditions])
        return self.trainer.train_step(x, y if self.generator.is_conditional else None)
