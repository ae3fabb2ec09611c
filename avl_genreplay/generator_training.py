"""Training the generator of a scholar, experience after experience.

:class:`GeneratorTrainingPlugin` trains a generator, through a
:class:`~avl_genreplay.generators.base.GeneratorTrainer` (GAN, diffusion, ...),
on the real data of each experience mixed with replay from a frozen copy of
the previous generator, so that it learns the inputs of all experiences seen
(Shin et al., 2017). It runs after the solver (default) or alongside it, one
generator step per solver iteration.
"""

import inspect
import math
from copy import deepcopy
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule
from avalanche.models.generator import Generator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from avl_genreplay.distributed import (
    RankRandom,
    average_values,
    broadcast_modules,
    first_found,
    shard_sampler,
)
from avl_genreplay.generators.base import GeneratorTrainer
from avl_genreplay.replay import (
    LearningCheck,
    PastClasses,
    ReplayBank,
    check_generator_classes,
    check_generator_shape,
    experience_classes,
    experience_task_label,
    frozen_copy,
    is_conditional,
    replay_inputs,
    sample_past_inputs,
)

__all__ = [
    "GeneratorTrainingPlugin",
    "GeneratorTrainingError",
    "TrainingGuard",
    "dataset_tensors",
]


class GeneratorTrainingError(RuntimeError):
    """Generator training that kept failing after rollbacks."""


def _spread(x: torch.Tensor) -> float:
    """Mean per-pixel standard deviation across a batch (0 for a collapse)."""
    return x.float().std(dim=0).mean().item() if len(x) > 1 else float("nan")


def _nonfinite(losses: Dict[str, float]) -> Optional[str]:
    bad = [name for name, value in losses.items() if not math.isfinite(value)]
    return f"the {', '.join(bad)} loss is not finite" if bad else None


class TrainingGuard:
    """The safety net of a generator's training, kept apart from the training.

    A loss that is NaN or infinite, samples of near-zero variance (checked
    every ``check_every`` steps) or, at the end of the experience, samples the
    solver puts almost all (``max_class_share``) in one class roll the trainer
    back to its last good state (saved every ``check_every`` steps) with the
    learning rate times ``lr_decay``; after ``max_retries`` rollbacks in one
    experience, :class:`GeneratorTrainingError` stops the run, so the solver
    never learns from a broken generator. Rollbacks are listed in
    :attr:`rollbacks`. Under distributed training every rank rolls back
    when one finds a problem (ranks must take the same steps). Samples are
    drawn in eval mode, as replay draws them, except during the experience
    for a trainer whose ``check_in_training_mode`` is set (DGM's masks).

    :class:`GeneratorTrainingPlugin` calls :meth:`start_experience` before it
    trains the generator on an experience, :meth:`after_step` after each step
    and :meth:`end_experience` at the end; another guard implements these.

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
        *,
        check_every: int = 100,
        check_samples: int = 128,
        max_retries: int = 3,
        lr_decay: float = 0.5,
        min_spread: float = 0.05,
        max_class_share: float = 0.95,
    ):
        if check_every < 1 or check_samples < 2:
            raise ValueError("check_every must be >= 1 and check_samples >= 2")
        if max_retries < 0 or not 0.0 < lr_decay <= 1.0:
            raise ValueError("max_retries must be >= 0 and lr_decay in (0, 1]")
        self.check_every = check_every
        self.check_samples = check_samples
        self.max_retries = max_retries
        self.lr_decay = lr_decay
        self.min_spread = min_spread
        self.max_class_share = max_class_share
        self.rollbacks: List[dict] = []
        self._trainer: Optional[GeneratorTrainer] = None

    def start_experience(
        self,
        trainer: GeneratorTrainer,
        *,
        experience: int,
        iterations: int,
        classes: Sequence[int],
        solver: nn.Module,
        device,
    ) -> None:
        """Saves the trainer's state as the first good one.

        :param trainer: the generator's trainer, rolled back on a failure.
        :param experience: the experience's index, for messages and logs.
        :param iterations: the steps the experience will take.
        :param classes: every class seen, the experience's included.
        :param solver: the model that classifies samples in the last check.
        :param device: where samples are drawn.
        """
        self._trainer = trainer
        self._experience = experience
        self._iterations = iterations
        self._classes = sorted(classes)
        self._solver = solver
        self._device = device
        self._good_state, self._good_step = deepcopy(trainer.state_dict()), 0
        self._retries = 0
        self._data_spread: Optional[float] = None

    def end_experience(self) -> None:
        """Lets go of the experience's saved state and networks."""
        self._trainer = self._solver = self._good_state = None

    def after_step(
        self, step: int, losses: Dict[str, float], real_x: Tensor
    ) -> Optional[int]:
        """Judges the training after ``step`` steps (counted from 1).

        :param losses: the step's losses by name.
        :param real_x: the real inputs of the step's batch (those of the first
            step are the reference of the samples' spread).
        :return: ``None`` to go on, or, after a rollback, the step the
            training resumes from.
        :raises GeneratorTrainingError: after ``max_retries`` rollbacks in the
            experience.
        """
        if self._data_spread is None:
            self._data_spread = _spread(real_x)
        problem = _nonfinite(losses)
        if problem is None and step % self.check_every == 0:
            problem = self.sample_problem(final=False)
        # a short run (< check_every steps) is not judged by classes
        if problem is None and step == self._iterations >= self.check_every:
            problem = self.sample_problem(final=True)
        problem = first_found(problem, self._device)
        if problem is None:
            if step % self.check_every == 0:
                self._good_state = deepcopy(self._trainer.state_dict())
                self._good_step = step
            return None
        self._retries += 1
        if self._retries > self.max_retries:
            raise GeneratorTrainingError(
                f"generator training failed at experience {self._experience}, "
                f"step {step}: {problem}; rolled back and lowered the learning "
                f"rate {self.max_retries} times"
            )
        self._trainer.load_state_dict(self._good_state)
        self._trainer.scale_learning_rate(self.lr_decay)
        self.rollbacks.append(
            dict(
                experience=self._experience,
                step=step,
                reason=problem,
                resumed_from=self._good_step,
            )
        )
        return self._good_step

    @torch.no_grad()
    def sample_problem(self, final: bool) -> Optional[str]:
        """A description of what is wrong with the generator's samples, or
        ``None``: near-zero variance across samples; at the end of an
        experience (``final``), also samples the solver puts almost all in
        one class."""
        generator = self._trainer.generator
        seen = PastClasses()
        seen.add(0, self._classes)
        training = generator.training
        generator.train(self._trainer.check_in_training_mode and not final)
        samples, _, _ = sample_past_inputs(
            generator, self.check_samples, seen, self._device
        )
        generator.train(training)
        spread = _spread(samples)
        if not math.isfinite(spread):
            return "the samples are not finite"
        if spread < self.min_spread * self._data_spread:
            return (
                f"the samples have near-zero variance ({spread:.3g}, the data "
                f"{self._data_spread:.3g})"
            )
        solver = self._solver
        if (
            not final
            or is_conditional(generator)
            or len(self._classes) < 2
            or isinstance(solver, MultiTaskModule)
        ):
            return None
        training = solver.training
        solver.eval()
        logits = solver(samples)
        solver.train(training)
        allowed = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        allowed[[c for c in self._classes if c < logits.shape[1]]] = True
        predicted = logits.masked_fill(~allowed, -float("inf")).argmax(dim=1)
        share = torch.bincount(predicted).max().item() / len(predicted)
        if share > self.max_class_share:
            top = torch.bincount(predicted).argmax().item()
            return (
                f"the solver puts {share:.0%} of the samples in class {top} of "
                f"{len(self._classes)} seen"
            )
        return None


_SCHEDULES = ("after", "alongside")


def dataset_tensors(
    dataset, *, batch_size: int = 512, num_workers: int = 0
) -> Tuple[Tensor, Tensor]:
    """The dataset's inputs and labels, through its transforms, as two
    tensors; the global random state is left as it was."""
    xs, ys = [], []
    # a data loader draws a seed from the global generator: restore it, so
    # that training sees the same random numbers as without loading
    with torch.random.fork_rng(devices=[]):
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
        for x, y, *_ in loader:
            xs.append(x)
            ys.append(torch.as_tensor(y))
    return torch.cat(xs), torch.cat(ys)


def _takes_replay_mask(trainer: GeneratorTrainer) -> bool:
    """Whether the trainer's ``train_step`` takes ``replayed`` (see
    :meth:`~avl_genreplay.generators.base.GeneratorTrainer.train_step`)."""
    return "replayed" in inspect.signature(trainer.train_step).parameters


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


class _LossMeans:
    """Running means of a training step's losses, by name."""

    def __init__(self):
        self.totals: Dict[str, float] = {}
        self.counts: Dict[str, int] = {}

    def add(self, losses: Dict[str, float]) -> None:
        for name, value in losses.items():
            self.totals[name] = self.totals.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1

    def result(self) -> Dict[str, float]:
        return {name: self.totals[name] / self.counts[name] for name in self.totals}


class GeneratorTrainingPlugin(SupervisedPlugin):
    """Trains a generator on each experience's data plus its own replay.

    Each generator batch holds ``replay_share`` replayed samples of past
    experiences and real samples of the current one for the rest. A
    class-conditional generator gets the real labels and, for replay, the
    requested past classes. A trainer whose ``train_step`` takes
    ``replayed`` (DGM's, the diffusion model's) also gets which samples are
    replay, which labels cannot tell where experiences share classes.

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
    :param guard: the safety net of the training (with ``schedule="after"``),
        a :class:`TrainingGuard` or a factory of one; ``None`` for none. The
        default rolls a failing generator back and stops the run after three
        failures in an experience (see :class:`TrainingGuard`).
    :param train_after_last: train the generator on the last experience of
        its stream too. ``False`` skips that training (the bookkeeping still
        runs): nothing replays the generator after the stream's last
        experience, so a run that ends with its stream (e.g. a benchmark)
        saves a share of its generator training, with the same solver. Leave
        it on to continue training on more experiences later. The last
        experience is the one whose ``current_experience`` is the last index
        of its ``origin_stream``.
    :param replay_bank_size: draw this many replayed inputs from the frozen
        generator once, before each experience, and take each batch's replay
        from them (see :class:`~avl_genreplay.replay.ReplayBank`) instead of
        generating it at every step; ``None`` to generate at every step.

    Under distributed training (``torchrun``, Avalanche's
    ``DistributedHelper``) the generator trains data-parallel in step with
    the solver: each rank trains on its own share of the experience (with
    ``schedule="after"``; alongside, on its share of the solver's batch) and
    its own replay, with noise of its own, and the trainer averages the
    gradients across ranks before each step; every experience starts and ends
    with rank 0's generator and critic on every rank, and the losses reported
    are the means over ranks. ``train_mb_size`` is per process, as
    Avalanche's. Declares ``supports_distributed`` only for a trainer that
    does (this package's do).
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
        guard: Union[TrainingGuard, Callable[[], TrainingGuard], None] = TrainingGuard,
        train_after_last: bool = True,
        replay_bank_size: Optional[int] = None,
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
        if replay_bank_size is not None and replay_bank_size < 1:
            raise ValueError(f"replay_bank_size must be >= 1, got {replay_bank_size}")
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
        self.learning_check = LearningCheck(type(self).__name__)
        # a factory, as Avalanche's evaluator: no guard shared by two plugins
        self.guard: Optional[TrainingGuard] = guard() if callable(guard) else guard
        self.train_after_last = train_after_last
        self.replay_bank_size = replay_bank_size
        self._bank: Optional[ReplayBank] = None
        self._skip_experience = False
        # the gradients are the trainer's to average
        self.supports_distributed = bool(getattr(trainer, "supports_distributed", 0))
        self._random = RankRandom(type(self).__name__)

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
        # a replay pool is falsy while empty: test for None
        replay_source = (
            self.generator if self.replay_generator is None else self.replay_generator
        )
        self.learning_check.before_experience(replay_source, bool(self.past))
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
        # the trainer may have initialised something at random (DGM's fresh
        # mask embeddings); every rank starts from rank 0's networks
        broadcast_modules(self.generator, *self.trainer.modules().values())
        self._random.reset()
        self._alongside = _LossMeans()
        if self.old_generator is not None and self.replay_bank_size is not None:
            self._bank = self._draw_bank(strategy)

    def _draw_bank(self, strategy) -> ReplayBank:
        with self._random(strategy.device):
            return ReplayBank.draw(
                self.old_generator, self.replay_bank_size, self.past, strategy.device
            )

    def after_training_iteration(self, strategy, **kwargs):
        if self.schedule == "alongside" and not self._skip_experience:
            real_y = strategy.mb_y if is_conditional(self.generator) else None
            self._alongside.add(
                self._train_step(strategy.mb_x, real_y, strategy.device)
            )

    def after_training_exp(self, strategy, **kwargs):
        if self.schedule == "after" and not self._skip_experience:
            self._train_on_experience(strategy)
        if self.schedule == "alongside" and self._alongside.counts:
            self.loss_history.append(self._alongside.result())
        self.trainer.end_experience(self.experience_index)
        # what each rank measured on its own data (batch-norm statistics) or
        # grew at random (DGM's new units) becomes rank 0's
        broadcast_modules(self.generator, *self.trainer.modules().values())
        self.past.add(
            experience_task_label(strategy.experience),
            experience_classes(strategy.experience),
        )
        self.old_generator = None
        self._bank = None

    def _iterations(self, dataset_size: int, real_per_batch: int) -> int:
        if self.train_epochs is None:
            return self.train_iterations
        return self.train_epochs * math.ceil(dataset_size / max(real_per_batch, 1))

    def _batches(self, loader):
        """Batches of the loader, epoch after epoch, without end."""
        epoch = 0
        while True:
            if hasattr(loader.sampler, "set_epoch"):  # a rank's share
                loader.sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    def _train_on_experience(self, strategy):
        share = self.current_replay_share()
        n_replay = round(self.train_mb_size * share)
        n_real = self.train_mb_size - n_replay
        dataset = strategy.experience.dataset.train()
        if self.preload:
            dataset = TensorDataset(
                *dataset_tensors(dataset, num_workers=self.num_workers)
            )
        # under distributed training, this rank's share of the experience
        sampler = shard_sampler(dataset)
        size = len(dataset) if sampler is None else len(sampler)
        loader = DataLoader(
            dataset,
            batch_size=max(n_real, 1),
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=size > n_real,
            num_workers=self.num_workers,
        )
        iterations = self._iterations(size, n_real)
        bar = tqdm(
            total=iterations,
            desc=f"generator, experience {self.experience_index}",
            disable=not self.progress_bar,
            leave=False,
        )
        guard = self.guard
        if guard is not None:
            guard.start_experience(
                self.trainer,
                experience=self.experience_index,
                iterations=iterations,
                classes=set(self.past.classes)
                | set(experience_classes(strategy.experience)),
                solver=strategy.model,
                device=strategy.device,
            )
        means = _LossMeans()
        done = 0
        try:
            for x, y, *_ in self._batches(loader):
                if done >= iterations:
                    break
                x, y = x.to(strategy.device), y.to(strategy.device)
                if n_real == 0:
                    x, y = x[:0], y[:0]
                losses = self._train_step(x, y, strategy.device, n_replay)
                done += 1
                resumed_from = (
                    None if guard is None else guard.after_step(done, losses, x)
                )
                if resumed_from is not None:  # rolled back
                    done = resumed_from
                    bar.reset(total=iterations)
                    bar.update(done)
                    continue
                means.add(losses)
                bar.update(1)
                if done % 50 == 0:
                    bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()})
        finally:
            bar.close()
            if guard is not None:
                guard.end_experience()
        self.loss_history.append(means.result())

    def _train_step(
        self,
        real_x: torch.Tensor,
        real_y: Optional[torch.Tensor],
        device,
        n_replay: Optional[int] = None,
    ) -> Dict[str, float]:
        """One trainer step on real data mixed with the old generator's replay."""
        # only this package's generators learn the data's value range
        calibrate_range = getattr(self.generator, "calibrate_range", None)
        if calibrate_range is not None and len(real_x):
            calibrate_range(real_x)
        if n_replay is None:
            share = self.current_replay_share()
            n_replay = round(len(real_x) * share / max(1 - share, 1e-8))
        x, y = real_x, real_y
        conditional = is_conditional(self.generator)
        # replay and noise of this rank's own: ranks must not draw alike
        with self._random(device):
            if self.old_generator is not None and n_replay > 0:
                replay_x, conditions, _ = replay_inputs(
                    self._bank, self.old_generator, n_replay, self.past, device
                )
                x = torch.cat([real_x, replay_x])
                if conditional:
                    y = torch.cat([real_y, conditions])
            labels = y if conditional else None
            if _takes_replay_mask(self.trainer):
                replayed = torch.arange(len(x), device=x.device) >= len(real_x)
                losses = self.trainer.train_step(x, labels, replayed=replayed)
            else:
                losses = self.trainer.train_step(x, labels)
        return average_values(losses, device)
