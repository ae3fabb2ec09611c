"""Replay from a pool of samples generated once per experience (DDGR).

Sampling a diffusion model costs tens of network passes per image, too much
to do at every training iteration as DGR does with its GAN. DDGR (Gao & Liu,
2023) instead generates a fixed number of samples per past class once, before
each new experience, with the previous solver guiding the sampling, and
replays that set both to the solver and to the diffusion model.

:class:`ReplayPool` holds such a set and is itself a class-conditional
:class:`~avalanche.models.generator.Generator` (``generate`` draws stored
samples of the requested classes), so the foundation's
:class:`~avl_genreplay.replay.SolverReplayPlugin` and
:class:`~avl_genreplay.generator_training.GeneratorTrainingPlugin` replay it
unchanged. :class:`ReplayPoolPlugin` refills it before each experience.
"""

import time
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

# Avalanche 0.6 exports no public tensor-dataset factory; its own strategies
# (iCaRL) use this one
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from avalanche.core import SupervisedPlugin
from avalanche.distributed import DistributedHelper
from avalanche.models.generator import Generator
from avalanche.models.utils import avalanche_forward
from torch import Tensor, nn
from tqdm.auto import tqdm

from avl_genreplay.distributed import RankRandom, gather_shares
from avl_genreplay.replay import (
    LearningCheck,
    PastClasses,
    experience_classes,
    experience_task_label,
    frozen_copy,
    past_classes_mask,
    restrict_logits,
)

__all__ = ["ReplayPool", "ReplayPoolPlugin"]


class ReplayPool(Generator, nn.Module):
    """A fixed set of generated samples that "generates" by drawing from it.

    :param output_shape: ``(channels, height, width)`` of a sample.
    :param num_classes: number of classes of the benchmark (labels lie in
        ``0..num_classes - 1``).
    """

    def __init__(self, output_shape: Sequence[int], num_classes: int):
        nn.Module.__init__(self)
        self.output_shape = tuple(int(s) for s in output_shape)
        self.num_classes = int(num_classes)
        self.register_buffer("x", torch.zeros(0, *self.output_shape))
        self.register_buffer("y", torch.zeros(0, dtype=torch.long))
        self.register_buffer("t", torch.zeros(0, dtype=torch.long))

    def fill(self, x: Tensor, y: Tensor, t: Optional[Tensor] = None) -> None:
        """Replaces the pool's content with samples ``x`` of classes ``y``
        (and task labels ``t``, 0 by default)."""
        if tuple(x.shape[1:]) != self.output_shape or len(x) != len(y):
            raise ValueError(
                f"expected samples of shape {self.output_shape} with one label "
                f"each, got {tuple(x.shape)} and {len(y)} labels"
            )
        self.x = x.detach().to(self.x.device)
        self.y = y.detach().long().to(self.x.device)
        t = torch.zeros_like(self.y) if t is None else t.detach().long()
        self.t = t.to(self.x.device)

    @property
    def classes(self) -> List[int]:
        return self.y.unique().tolist()

    def __len__(self) -> int:
        return len(self.y)

    def generate(
        self, batch_size: Optional[int] = None, condition: Optional[Tensor] = None
    ) -> Tensor:
        """Draws stored samples (with replacement) of the classes in
        ``condition``, or of any class if it is ``None``."""
        batch_size = 1 if batch_size is None else int(batch_size)
        if len(self) == 0:
            raise ValueError("the replay pool is empty")
        if condition is None:
            picks = torch.randint(len(self), (batch_size,), device=self.y.device)
            return self.x[picks]
        condition = torch.as_tensor(condition, device=self.y.device).long()
        if condition.shape != (batch_size,):
            raise ValueError(
                f"condition must hold one class per sample, shape ({batch_size},)"
            )
        picks = torch.empty(batch_size, dtype=torch.long, device=self.y.device)
        for label in condition.unique().tolist():
            where = (self.y == label).nonzero().flatten()
            if len(where) == 0:
                raise ValueError(
                    f"the replay pool holds no sample of class {label} (it holds "
                    f"{self.classes})"
                )
            wanted = (condition == label).nonzero().flatten()
            choice = torch.randint(len(where), (len(wanted),), device=where.device)
            picks[wanted] = where[choice]
        return self.x[picks]

    def get_features(self, x: Tensor) -> Tensor:
        """A pool has no feature extractor (required by ``BaseModel``)."""
        raise NotImplementedError("a replay pool does not extract features")

    def as_dataset(self):
        """The pool as an Avalanche classification dataset (with task labels)."""
        return _make_taskaware_tensor_classification_dataset(
            self.x.cpu(),
            self.y.cpu(),
            targets=self.y.cpu().tolist(),
            task_labels=self.t.cpu().tolist(),
        )


class ReplayPoolPlugin(SupervisedPlugin, supports_distributed=True):
    """Refills a :class:`ReplayPool` before each experience (from the second
    on) with ``samples_per_class`` samples of every past class, drawn from a
    class-conditional generator and guided by the previous solver.

    Add it before the plugins that replay the pool: the pool must be full when
    they take their frozen copies in ``before_training_exp``.

    :param generator: a class-conditional generator. If it has a ``sample``
        method taking ``guidance`` (as
        :class:`~avl_genreplay.generators.diffusion.DiffusionGenerator`), the
        previous solver guides it; otherwise ``generate`` is used.
    :param pool: the pool to fill.
    :param samples_per_class: samples generated per past class.
    :param guidance_scale: weight of the classifier guidance (0: none).
    :param guide_on: guide on the predicted clean image (``"x0"``) or on the
        noisy one (``"xt"``), for generators that support guidance.
    :param regenerate: draw every past class anew before each experience
        (DDGR's way: the newest generator and solver make the whole pool);
        ``False`` draws only the classes of the experience just learned and
        keeps the pool's samples of the others, which nothing has taught the
        generator since: in a class-incremental stream each class is sampled
        once, by the generator and solver that had just learned it; a class
        that comes back (domain-incremental streams) is drawn anew.
    :param progress_bar: show the sampling's progress.

    Under distributed training (``torchrun``, Avalanche's
    ``DistributedHelper``) each rank generates its share of the pool, with
    noise of its own, and the shares are gathered: every rank ends with the
    same pool, in the order a single process would fill it, at about
    ``1 / ranks`` of the sampling time.
    """

    def __init__(
        self,
        generator: Generator,
        pool: ReplayPool,
        *,
        samples_per_class: int = 500,
        guidance_scale: float = 1.0,
        guide_on: str = "x0",
        regenerate: bool = True,
        progress_bar: bool = True,
    ):
        super().__init__()
        if getattr(generator, "num_classes", None) is None:
            raise ValueError(
                "ReplayPoolPlugin needs a class-conditional generator "
                "(num_classes set)"
            )
        if samples_per_class < 1:
            raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        self.generator = generator
        self.pool = pool
        self.samples_per_class = samples_per_class
        self.guidance_scale = guidance_scale
        self.guide_on = guide_on
        self.regenerate = regenerate
        self.last_learned: set = set()
        self.progress_bar = progress_bar
        self.past = PastClasses()
        # cost of each refill, for reports: seconds, images per second and,
        # for a diffusion model, its sampler and denoising steps
        self.sampling_log: List[dict] = []
        self.learning_check = LearningCheck(type(self).__name__)
        self.random = RankRandom(type(self).__name__)

    def before_training_exp(self, strategy, **kwargs):
        self.learning_check.before_experience(self.generator, bool(self.past))
        if not self.past:
            return
        self.random.reset()
        pairs = self.past.task_class_pairs()
        kept = torch.zeros(len(self.pool), dtype=torch.bool)
        if not self.regenerate:
            # a past class's samples stay until the generator learns it again
            pooled = list(zip(self.pool.t.tolist(), self.pool.y.tolist()))
            held = set(pooled) - self.last_learned
            kept = torch.tensor([pair in held for pair in pooled], dtype=torch.bool)
            pairs = [pair for pair in pairs if pair not in held]
        tasks = torch.tensor(
            [t for t, _ in pairs], device=strategy.device
        ).repeat_interleave(self.samples_per_class)
        labels = torch.tensor(
            [c for _, c in pairs], device=strategy.device
        ).repeat_interleave(self.samples_per_class)
        solver = frozen_copy(DistributedHelper.unwrap_model(strategy.model))
        started = time.time()

        def share(indices: Tensor) -> Tensor:
            indices = indices.to(labels.device)
            with self.random(strategy.device):
                return self._generate(solver, labels[indices], tasks[indices])

        x = gather_shares(len(labels), share)
        seconds = time.time() - started
        images = len(labels)
        self.pool.to(strategy.device)
        if kept.any():
            kept = kept.to(self.pool.y.device)
            x = torch.cat([self.pool.x[kept], x.to(self.pool.x.device)])
            labels = torch.cat([self.pool.y[kept], labels.to(self.pool.y.device)])
            tasks = torch.cat([self.pool.t[kept], tasks.to(self.pool.t.device)])
        self.pool.fill(x, labels, tasks)
        self.sampling_log.append(
            dict(
                experience=strategy.experience.current_experience,
                images=images,
                seconds=seconds,
                images_per_second=images / max(seconds, 1e-9),
                sampler=getattr(self.generator, "sampler", None),
                denoising_steps=getattr(self.generator, "sampling_steps", None),
            )
        )

    def after_training_exp(self, strategy, **kwargs):
        task = experience_task_label(strategy.experience)
        classes = experience_classes(strategy.experience)
        self.past.add(task, classes)
        # what the generator learned since the pool's samples were drawn
        self.last_learned = {(task, c) for c in classes}

    def guidance(self, solver: nn.Module, tasks: Tensor):
        """``log p(y | x)`` under ``solver`` for samples of task labels
        ``tasks``, restricted to the classes seen under each task label."""

        def log_prob(x: Tensor, y: Tensor) -> Tensor:
            logits = avalanche_forward(solver, x, tasks)
            allowed = past_classes_mask(self.past, tasks, logits.shape[1])
            log_p = F.log_softmax(restrict_logits(logits, allowed), dim=1)
            return log_p.gather(1, y.view(-1, 1)).squeeze(1)

        return log_prob

    @torch.no_grad()
    def _generate(self, solver: nn.Module, labels: Tensor, tasks: Tensor) -> Tensor:
        training = self.generator.training
        self.generator.eval()
        sample = getattr(self.generator, "sample", None)
        # one chunk per call, so each call's guidance sees its own task labels
        chunk = getattr(self.generator, "sample_mb_size", 256)
        parts = []
        starts = range(0, len(labels), chunk)
        try:
            for start in tqdm(
                starts,
                desc=f"replay pool ({len(labels)} samples)",
                disable=not self.progress_bar,
                leave=False,
            ):
                y, t = labels[start : start + chunk], tasks[start : start + chunk]
                if sample is None:
                    parts.append(self.generator.generate(len(y), y))
                    continue
                parts.append(
                    sample(
                        len(y),
                        y,
                        guidance=self.guidance(solver, t),
                        guidance_scale=self.guidance_scale,
                        guide_on=self.guide_on,
                    )
                )
        finally:
            self.generator.train(training)
        return torch.cat(parts)
