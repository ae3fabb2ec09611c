"""Training the generator of a scholar, experience after experience.

:class:`GeneratorTrainingPlugin` trains a generator, through a
:class:`~avl_genreplay.generators.base.GeneratorTrainer` (GAN, diffusion, ...),
on the real data of each experience mixed with replay from a frozen copy of
the previous generator, so that it learns the inputs of all experiences seen
(Shin et al., 2017). It runs after the solver (default) or alongside it, one
generator step per solver iteration.
"""

import math
from copy import deepcopy
from typing import Dict, List, Optional

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule
from avalanche.models.generator import Generator
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from avl_genreplay.generators.base import GeneratorTrainer
from avl_genreplay.replay import (
    PastClasses,
    check_generator_classes,
    check_generator_shape,
    experience_classes,
    experience_task_label,
    frozen_copy,
    sample_past_inputs,
)

__all__ = ["GeneratorTrainingPlugin", "GeneratorTrainingError"]


class GeneratorTrainingError(RuntimeError):
    """Generator training that kept failing after rollbacks."""


def _spread(x: torch.Tensor) -> float:
    """Mean per-pixel standard deviation across a batch (0 for a collapse)."""
    return x.float().std(dim=0).mean().item() if len(x) > 1 else float("nan")


def _nonfinite(losses: Dict[str, float]) -> Optional[str]:
    bad = [name for name, value in losses.items() if not math.isfinite(value)]
    return f"the {', '.join(bad)} loss is not finite" if bad else None


_SCHEDULES = ("after", "alongside")


def _in_memory(dataset, num_workers: int = 0) -> TensorDataset:
    """The dataset's inputs and labels, through its transforms, as tensors."""
    xs, ys = [], []
    # a data loader draws a seed from the global generator: restore it, so
    # that training sees the same random numbers as without preloading
    with torch.random.fork_rng(devices=[]):
        for x, y, *_ in DataLoader(dataset, batch_size=512, num_workers=num_workers):
            xs.append(x)
            ys.append(y)
    return TensorDataset(torch.cat(xs), torch.cat(ys))


def _is_last(experience) -> bool:
    """Whether ``experience`` is the last of its stream."""
    try:
        stream = experience.origin_stream
    except (AttributeError, AssertionError):  # Avalanche asserts it is set
        stream = None
    if stream is None:
        raise ValueError(
            "train_after_last=False needs to know the stream's length, but the "
            "experience has no origin_stream"
        )
    return experience.current_experience == len(stream) - 1


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
    :param replay_generator: where replay comes from; ``None`` (DGR) for a
        frozen copy of the generator taken before each experience, or another
        generator, e.g. a :class:`~avl_genreplay.replay_pool.ReplayPool` of
        samples generated once per experience (DDGR), whose sampling would
        cost too much at every step.
    :param progress_bar: show a progress bar with the losses.
    :param num_workers: data loader workers for the generator's data.
    :param preload: pass the experience's data through its transforms once and
        keep it in memory as tensors, instead of at every generator step
        (about 6 % of DGR's time on SplitMNIST). The batches are the same, but
        random augmentations are drawn only once: leave it off for data
        augmented at random (e.g. Avalanche's SplitCIFAR100) or too large for
        memory.
    :param guard: watch the training (with ``schedule="after"``): a loss that
        is NaN or infinite, samples of near-zero variance (checked every
        ``check_every`` steps) or, at the end of the experience, samples the
        solver puts almost all (``max_class_share``) in one class roll the
        trainer back to its last good state (saved every ``check_every``
        steps) with the learning rate times ``lr_decay``; after
        ``max_retries`` rollbacks in one experience,
        :class:`GeneratorTrainingError` stops the run, so the solver never
        learns from a broken generator. Rollbacks are listed in
        :attr:`rollbacks`.
    :param train_after_last: train the generator on the last experience of
        its stream too. ``False`` skips that training (the bookkeeping still
        runs): nothing replays the generator after the stream's last
        experience, so a run that ends with its stream (e.g. a benchmark)
        saves a share of its generator training, with the same solver. Leave
        it on to continue training on more experiences later. The last
        experience is the one whose ``current_experience`` is the last index
        of its ``origin_stream``.
    :param check_every: steps between sample checks and saved good states.
    :param check_samples: samples drawn for a check.
    :param max_retries: rollbacks allowed per experience.
    :param lr_decay: learning-rate factor applied at each rollback.
    :param min_spread: the samples' mean per-pixel standard deviation must be
        at least this share of the real data's.
    :param max_class_share: most samples the solver may put in one class.
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
        replay_generator: Optional[Generator] = None,
        progress_bar: bool = True,
        num_workers: int = 0,
        preload: bool = False,
        guard: bool = True,
        train_after_last: bool = True,
        check_every: int = 100,
        check_samples: int = 128,
        max_retries: int = 3,
        lr_decay: float = 0.5,
        min_spread: float = 0.05,
        max_class_share: float = 0.95,
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
        if check_every < 1 or check_samples < 2:
            raise ValueError("check_every must be >= 1 and check_samples >= 2")
        if max_retries < 0 or not 0.0 < lr_decay <= 1.0:
            raise ValueError("max_retries must be >= 0 and lr_decay in (0, 1]")
        self.trainer = trainer
        self.generator = trainer.generator
        self.train_iterations = train_iterations
        self.train_epochs = train_epochs
        self.train_mb_size = train_mb_size
        self.schedule = schedule
        self.replay_share = replay_share
        self.replay_generator = replay_generator
        self.progress_bar = progress_bar
        self.num_workers = num_workers
        self.preload = preload
        self.past = PastClasses()
        self.old_generator = None
        self.experience_index = 0
        self.loss_history: List[Dict[str, float]] = []
        self.guard = guard
        self.train_after_last = train_after_last
        self._skip_experience = False
        self.check_every = check_every
        self.check_samples = check_samples
        self.max_retries = max_retries
        self.lr_decay = lr_decay
        self.min_spread = min_spread
        self.max_class_share = max_class_share
        self.rollbacks: List[dict] = []

    def current_replay_share(self) -> float:
        if not self.past:
            return 0.0
        if self.replay_share is not None:
            return self.replay_share
        return self.past.experiences / (self.past.experiences + 1)

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        # the first callback of an experience: fail before anything is trained
        check_generator_shape(self.generator, strategy.experience)
        check_generator_classes(self.generator, strategy.experience)

    def before_training_exp(self, strategy, **kwargs):
        self.generator.to(strategy.device)
        if not self.past:
            self.old_generator = None
        elif self.replay_generator is not None:
            self.old_generator = self.replay_generator
        else:
            self.old_generator = frozen_copy(self.generator)
        self.experience_index = strategy.experience.current_experience
        self._skip_experience = not self.train_after_last and _is_last(
            strategy.experience
        )
        self.trainer.start_experience(self.experience_index)

    def after_training_iteration(self, strategy, **kwargs):
        if self.schedule == "alongside" and not self._skip_experience:
            real_y = strategy.mb_y if self.generator.is_conditional else None
            self._train_step(strategy.mb_x, real_y, strategy.device)

    def after_training_exp(self, strategy, **kwargs):
        if self.schedule == "after" and not self._skip_experience:
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

    def _batches(self, loader):
        """Batches of the loader, epoch after epoch, without end."""
        while True:
            yield from loader

    def _train_on_experience(self, strategy):
        share = self.current_replay_share()
        n_replay = round(self.train_mb_size * share)
        n_real = self.train_mb_size - n_replay
        dataset = strategy.experience.dataset.train()
        if self.preload:
            dataset = _in_memory(dataset, self.num_workers)
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
        good_state, good_step = deepcopy(self.trainer.state_dict()), 0
        retries, done = 0, 0
        totals: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        data_spread = None
        for x, y, *_ in self._batches(loader):
            if done >= iterations:
                break
            x, y = x.to(strategy.device), y.to(strategy.device)
            if data_spread is None:
                data_spread = _spread(x)
            if n_real == 0:
                x, y = x[:0], y[:0]
            losses = self._train_step(x, y, strategy.device, n_replay)
            done += 1
            problem = None
            if self.guard:
                problem = _nonfinite(losses)
                if problem is None and done % self.check_every == 0:
                    problem = self._check_samples(data_spread, strategy, final=False)
                # a short run (< check_every steps) is not judged by classes
                if problem is None and done == iterations >= self.check_every:
                    problem = self._check_samples(data_spread, strategy, final=True)
            if problem is not None:
                retries += 1
                if retries > self.max_retries:
                    bar.close()
                    raise GeneratorTrainingError(
                        f"generator training failed at experience "
                        f"{self.experience_index}, step {done}: {problem}; rolled "
                        f"back and lowered the learning rate {self.max_retries} "
                        f"times"
                    )
                self.trainer.load_state_dict(good_state)
                self.trainer.scale_learning_rate(self.lr_decay)
                self.rollbacks.append(
                    dict(
                        experience=self.experience_index,
                        step=done,
                        reason=problem,
                        resumed_from=good_step,
                    )
                )
                done = good_step
                bar.reset(total=iterations)
                bar.update(done)
                continue
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + 1
            bar.update(1)
            if done % 50 == 0:
                bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()})
            if self.guard and done % self.check_every == 0:
                good_state, good_step = deepcopy(self.trainer.state_dict()), done
        bar.close()
        self.loss_history.append({k: totals[k] / counts[k] for k in totals})

    @torch.no_grad()
    def _check_samples(self, data_spread: float, strategy, final: bool):
        """A description of what is wrong with the generator's samples, or
        ``None``: near-zero variance across samples; at the end of an
        experience, also samples the solver puts almost all in one class."""
        classes = sorted(
            set(self.past.classes) | set(experience_classes(strategy.experience))
        )
        seen = PastClasses()
        seen.add(0, classes)
        training = self.generator.training
        self.generator.eval()
        samples, _, _ = sample_past_inputs(
            self.generator, self.check_samples, seen, strategy.device
        )
        self.generator.train(training)
        spread = _spread(samples)
        if not math.isfinite(spread):
            return "the samples are not finite"
        if spread < self.min_spread * data_spread:
            return (
                f"the samples have near-zero variance ({spread:.3g}, the data "
                f"{data_spread:.3g})"
            )
        solver = strategy.model
        if (
            not final
            or self.generator.is_conditional
            or len(classes) < 2
            or isinstance(solver, MultiTaskModule)
        ):
            return None
        training = solver.training
        solver.eval()
        logits = solver(samples)
        solver.train(training)
        allowed = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        allowed[[c for c in classes if c < logits.shape[1]]] = True
        predicted = logits.masked_fill(~allowed, -float("inf")).argmax(dim=1)
        share = torch.bincount(predicted).max().item() / len(predicted)
        if share > self.max_class_share:
            top = torch.bincount(predicted).argmax().item()
            return (
                f"the solver puts {share:.0%} of the samples in class {top} of "
                f"{len(classes)} seen"
            )
        return None

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
