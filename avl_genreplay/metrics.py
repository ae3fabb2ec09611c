"""Replay quality, experience by experience, as Avalanche metrics.

Each metric is a :class:`~avalanche.evaluation.PluginMetric`: add them to any
:class:`~avalanche.training.plugins.EvaluationPlugin` and its loggers
(TensorBoard, W&B, text, ...) report them. They are computed in
``after_training_exp``, on samples of every class seen so far:

- :class:`ReplayClassifierAccuracy`: how a reference classifier sees the
  samples (per class and a summary);
- :class:`ReplayFrechetDistance`: Fréchet distance between generated and
  real test samples in the reference's feature space;
- :class:`ReplaySamplesGrid`: a grid of samples, one row per class, as a
  :class:`~avalanche.evaluation.metric_results.TensorImage`;
- :class:`GeneratorLossMetric`: the generator's mean training losses.

Why ``after_training_exp``: the generator-training plugin trains the generator
in its own ``after_training_exp``, and Avalanche's templates put the
evaluation plugin after every user plugin, so the metrics see the generator
that will replay the past during the next experience; and they run once per
experience, whether or how often ``eval`` is called.

The first three share a :class:`ReplaySampler`, which draws the samples and
passes them through the reference once per experience (a diffusion model's
samples are dear). :func:`replay_quality_metrics` builds them all.

Under distributed training (``torchrun``) they are computed and emitted on
the main process alone: every rank holds the same generator (and the same
losses, averaged over ranks), Avalanche's loggers live on the main process
only, and the sampling leaves the global random state alone, so skipping it
elsewhere changes nothing but the time spent.
"""

import warnings
from contextlib import contextmanager
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue, TensorImage
from avalanche.evaluation.metric_utils import get_metric_name
from avalanche.distributed import DistributedHelper
from avalanche.models.generator import Generator
from torch import Tensor, nn
from torchvision.utils import make_grid

from avl_genreplay.generator_training import GeneratorTrainingPlugin
from avl_genreplay.reference import Data, features_and_logits, load_tensors
from avl_genreplay.replay import (
    SolverReplayPlugin,
    experience_classes,
    is_conditional,
)

__all__ = [
    "ReplaySamples",
    "ReplaySampler",
    "ReplayClassifierAccuracy",
    "ReplayFrechetDistance",
    "ReplaySamplesGrid",
    "GeneratorLossMetric",
    "find_generator",
    "frechet_distance",
    "replay_quality_metrics",
]


def find_generator(strategy, generator: Optional[Generator] = None) -> Generator:
    """The generator to judge: ``generator`` if given, else the strategy's
    ``generator`` attribute (:class:`~avl_genreplay.DGR`, ``DGM``, ``DDGR``),
    else that of a replay or generator-training plugin of the strategy."""
    if generator is not None:
        return generator
    found = getattr(strategy, "generator", None)
    if found is not None:
        return found
    for plugin in getattr(strategy, "plugins", []):
        if isinstance(plugin, (GeneratorTrainingPlugin, SolverReplayPlugin)):
            return plugin.generator
    raise ValueError(
        "no generator to judge: the strategy has no `generator` attribute and "
        "no generative-replay plugin; pass generator=... to the metrics"
    )


@contextmanager
def _seeded(device: torch.device, seed: int):
    """Random numbers from ``seed``, leaving the global generators (CPU and
    the device's) as they were: adding metrics must not change a run."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def _eval_mode(module):
    training = getattr(module, "training", None)
    if isinstance(module, nn.Module):
        module.eval()
    try:
        yield
    finally:
        if isinstance(module, nn.Module):
            module.train(training)


@torch.no_grad()
def _generate(
    generator: Generator, classes: Sequence[int], n: int, batch_size: int, device
) -> Tuple[Tensor, Optional[Tensor]]:
    """``n`` samples of each class (a conditional generator) or ``n`` times
    as many samples in all (an unconditional one), on the CPU, with the
    class requested of each sample (``None`` if unconditional)."""
    requested = None
    total = n * len(classes)
    if is_conditional(generator):
        requested = torch.tensor(list(classes)).repeat_interleave(n)
    chunks = []
    for start in range(0, total, batch_size):
        size = min(batch_size, total - start)
        if requested is None:
            chunk = generator.generate(size)
        else:
            chunk = generator.generate(size, requested[start : start + size].to(device))
        chunks.append(chunk.detach().float().cpu())
    return torch.cat(chunks), requested


def _frechet_from_moments(
    mean_a: Tensor, cov_a: Tensor, mean_b: Tensor, cov_b: Tensor
) -> float:
    # tr((A B)^(1/2)) = tr((A^(1/2) B A^(1/2))^(1/2)): the inner matrix is
    # symmetric, so its root comes from a symmetric eigendecomposition, stable
    # for the singular covariances of few samples in many dimensions
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    inner = root_a @ cov_b @ root_a
    inner_values = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0)
    distance = (
        (mean_a - mean_b).pow(2).sum()
        + cov_a.trace()
        + cov_b.trace()
        - 2 * inner_values.sqrt().sum()
    )
    return max(float(distance), 0.0)


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of features
    (rows are samples): ``|m_a - m_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))``,
    in double precision, with unbiased covariances."""
    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError("a Fréchet distance needs at least 2 samples on each side")
    a, b = features_a.double().flatten(1), features_b.double().flatten(1)
    return _frechet_from_moments(a.mean(0), a.T.cov(), b.mean(0), b.T.cov())


class ReplaySamples(NamedTuple):
    """One experience's draw from the generator.

    :param classes: the classes seen so far, in ascending order.
    :param x: the samples, on the CPU.
    :param requested: the class asked for each sample of a conditional
        generator; ``None`` for an unconditional one.
    :param features: the reference's penultimate-layer features (CPU), or
        ``None`` without a reference.
    :param logits: the reference's logits (CPU), or ``None``.
    """

    classes: List[int]
    x: Tensor
    requested: Optional[Tensor]
    features: Optional[Tensor]
    logits: Optional[Tensor]


class ReplaySampler:
    """Draws samples of every class seen so far, once per trained experience,
    and passes them (and real test samples) through the reference classifier.

    The metrics that share a sampler share its samples. Sampling is seeded
    (``seed`` plus the number of experiences trained before), in eval mode,
    and leaves the global random state alone.

    :param reference: the reference classifier (e.g. from
        :func:`~avl_genreplay.reference.train_reference_classifier`); ``None``
        if only the grid of a conditional generator is wanted.
    :param real_data: real test data (a dataset, a stream of experiences or
        a tuple ``(inputs, labels)``) for the Fréchet distance; ``None``
        without it.
    :param generator: the generator to judge; ``None`` to find it on the
        strategy (see :func:`find_generator`).
    :param samples_per_class: samples drawn per class seen (an unconditional
        generator draws that many times the number of classes), and real
        samples kept per class.
    :param batch_size: the generator's and the reference's batch size.
    :param seed: seed of the sampling and of the choice of real samples.
    """

    def __init__(
        self,
        reference: Optional[nn.Module] = None,
        real_data: Optional[Data] = None,
        *,
        generator: Optional[Generator] = None,
        samples_per_class: int = 100,
        batch_size: int = 256,
        seed: int = 0,
    ):
        if samples_per_class < 2 or batch_size < 1:
            raise ValueError("samples_per_class must be >= 2 and batch_size >= 1")
        self.reference = reference
        self.real_data = real_data
        self.generator = generator
        self.samples_per_class = samples_per_class
        self.batch_size = batch_size
        self.seed = seed
        self.classes: List[int] = []
        self._key = None
        self._samples: Optional[ReplaySamples] = None
        self._real: Optional[Dict[int, Tensor]] = None
        self._real_features: Dict[int, Tensor] = {}

    def observe(self, strategy) -> ReplaySamples:
        """The samples after the experience the strategy has just trained
        (drawn on the first call for that experience)."""
        key = (id(strategy), strategy.clock.train_exp_counter)
        if key != self._key:
            self.classes = sorted(
                set(self.classes) | set(experience_classes(strategy.experience))
            )
            self._samples = self._draw(strategy)
            self._key = key
        return self._samples

    def _draw(self, strategy) -> ReplaySamples:
        generator = find_generator(strategy, self.generator)
        device = torch.device(strategy.device)
        seed = self.seed + strategy.clock.train_exp_counter
        with _seeded(device, seed), _eval_mode(generator):
            x, requested = _generate(
                generator, self.classes, self.samples_per_class, self.batch_size, device
            )
        features = logits = None
        if self.reference is not None:
            features, logits = self.reference_outputs(x, device)
        return ReplaySamples(list(self.classes), x, requested, features, logits)

    @torch.no_grad()
    def reference_outputs(self, x: Tensor, device) -> Tuple[Tensor, Tensor]:
        """The reference's features and logits for ``x``, on the CPU."""
        if self.reference is None:
            raise ValueError("this metric needs a reference classifier")
        self.reference.to(device)
        features, logits = [], []
        with _eval_mode(self.reference):
            for start in range(0, len(x), self.batch_size):
                f, out = features_and_logits(
                    self.reference, x[start : start + self.batch_size].to(device)
                )
                features.append(f.cpu())
                logits.append(out.cpu())
        return torch.cat(features), torch.cat(logits)

    def real_features(self, classes: Sequence[int], device) -> Dict[int, Tensor]:
        """The reference's features of up to ``samples_per_class`` real test
        samples of each class (chosen at random once, then kept)."""
        if self.real_data is None:
            raise ValueError("this metric needs real test data (real_data=...)")
        if self._real is None:
            x, y = load_tensors(self.real_data)
            chooser = torch.Generator().manual_seed(self.seed)
            self._real = {}
            for label in y.unique().tolist():
                indices = (y == label).nonzero().squeeze(1)
                order = torch.randperm(len(indices), generator=chooser)
                self._real[label] = x[indices[order[: self.samples_per_class]]]
        missing = [c for c in classes if c not in self._real]
        if missing:
            raise ValueError(f"the real test data holds no sample of classes {missing}")
        for c in classes:
            if c not in self._real_features:
                self._real_features[c] = self.reference_outputs(self._real[c], device)[
                    0
                ]
        return {c: self._real_features[c] for c in classes}


def _class_suffix(label: int) -> str:
    return f"Class{label:03d}"


class _ReplayMetric(PluginMetric[Dict[str, object]]):
    """A metric computed from a sampler's samples after each experience;
    :meth:`result` gives the last values emitted, by name."""

    def __init__(self, sampler: ReplaySampler):
        super().__init__()
        self.sampler = sampler
        self._last: Dict[str, object] = {}

    def result(self) -> Dict[str, object]:
        return dict(self._last)

    def reset(self) -> None:
        self._last = {}

    def after_training_exp(self, strategy) -> List[MetricValue]:
        if not DistributedHelper.is_main_process:
            return []
        samples = self.sampler.observe(strategy)
        values = self._compute(samples, strategy)
        self._last = {}
        emitted = []
        for (label, suffix), value in values.items():
            name = get_metric_name(label, strategy, add_task=False)
            if suffix:
                name = f"{name}/{suffix}"
            self._last[name] = value
            x_plot = strategy.clock.train_iterations
            emitted.append(MetricValue(self, name, value, x_plot))
        return emitted

    def _compute(self, samples: ReplaySamples, strategy) -> Dict[tuple, object]:
        """Values by ``(metric label, name suffix or None)``."""
        raise NotImplementedError


class ReplayClassifierAccuracy(_ReplayMetric):
    """How the reference classifier sees samples of every class seen so far.

    A conditional generator: the share of the samples asked of each class
    that the reference puts in that class (``ReplayClassifierAccuracy/.../
    ClassNNN``), and their mean (``ReplayClassifierAccuracy/...``). Real test
    images score the reference's test accuracy; samples that ignore the
    requested class score at most ``1 / k`` with ``k`` classes seen.

    An unconditional generator: the share of the samples the reference puts
    in each class (``ReplayClassShare/.../ClassNNN``, ``1 / k`` at best) and
    the coverage (``ReplayClassCoverage/...``), the overlap of the
    predicted-class distribution with the uniform one over the classes seen,
    ``sum_c min(share_c, 1 / k)``: 1 for every class in equal share, ``1 / k``
    for samples all of one seen class.

    (This is not the "classification accuracy score" of Ravuri and Vinyals,
    2019, which trains a classifier on generated samples.)

    :param sampler: where the samples come from; it needs a reference.
    """

    def __init__(self, sampler: ReplaySampler):
        if sampler.reference is None:
            raise ValueError("ReplayClassifierAccuracy needs a reference classifier")
        super().__init__(sampler)

    def __str__(self):
        return "ReplayClassifierAccuracy"

    def _compute(self, samples: ReplaySamples, strategy) -> Dict[tuple, object]:
        predicted = samples.logits.argmax(1)
        values = {}
        if samples.requested is not None:
            label = str(self)
            for c in samples.classes:
                hits = predicted[samples.requested == c] == c
                values[(label, _class_suffix(c))] = hits.float().mean().item()
            per_class = [values[(label, _class_suffix(c))] for c in samples.classes]
            values[(label, None)] = sum(per_class) / len(per_class)
            return values
        fair = 1.0 / len(samples.classes)
        coverage = 0.0
        for c in samples.classes:
            share = (predicted == c).float().mean().item()
            values[("ReplayClassShare", _class_suffix(c))] = share
            coverage += min(share, fair)
        values[("ReplayClassCoverage", None)] = coverage
        return values


class ReplayFrechetDistance(_ReplayMetric):
    """Fréchet distance between generated and real test samples of the
    classes seen so far, in the reference classifier's feature space (its
    penultimate layer), in the manner of FID but with the reference instead
    of Inception (``ReplayFrechetDistance/...``). The real side holds as many
    samples of each class; a conditional generator's side too, and with
    ``per_class`` each class also gets its own distance
    (``ReplayFrechetDistance/.../ClassNNN``). With few samples in many
    dimensions the estimate is biased upwards: compare values drawn with the
    same ``samples_per_class``.

    :param sampler: where the samples come from; it needs a reference and
        real test data.
    :param per_class: also a distance per class (conditional generators).
    """

    def __init__(self, sampler: ReplaySampler, *, per_class: bool = True):
        if sampler.reference is None or sampler.real_data is None:
            raise ValueError(
                "ReplayFrechetDistance needs a reference classifier and real test data"
            )
        super().__init__(sampler)
        self.per_class = per_class

    def __str__(self):
        return "ReplayFrechetDistance"

    def _compute(self, samples: ReplaySamples, strategy) -> Dict[tuple, object]:
        real = self.sampler.real_features(samples.classes, strategy.device)
        label = str(self)
        values = {
            (label, None): frechet_distance(
                samples.features, torch.cat([real[c] for c in samples.classes])
            )
        }
        if self.per_class and samples.requested is not None:
            for c in samples.classes:
                generated = samples.features[samples.requested == c]
                values[(label, _class_suffix(c))] = frechet_distance(generated, real[c])
        return values


class ReplaySamplesGrid(_ReplayMetric):
    """A grid of samples, one row per class seen so far in ascending order,
    emitted as a :class:`~avalanche.evaluation.metric_results.TensorImage`
    (``ReplaySamples/...``) that Avalanche's TensorBoard and W&B loggers show.

    Row ``c`` holds samples asked of class ``c`` (conditional generators) or
    samples the reference puts in class ``c`` (unconditional ones; a short row
    is padded with blank tiles, a sign the class is under-produced). Without a
    reference an unconditional generator's samples fill the rows in order.

    :param sampler: where the samples come from.
    :param columns: samples per row.
    :param value_range: ``(low, high)`` of the data, mapped to black and
        white; ``None`` for the samples' own minimum and maximum.
    """

    def __init__(
        self,
        sampler: ReplaySampler,
        *,
        columns: int = 8,
        value_range: Optional[Tuple[float, float]] = None,
    ):
        if columns < 1:
            raise ValueError(f"columns must be >= 1, got {columns}")
        super().__init__(sampler)
        self.columns = columns
        self.value_range = value_range

    def __str__(self):
        return "ReplaySamples"

    def rows(self, samples: ReplaySamples) -> List[Tensor]:
        """The samples of each row (up to ``columns``), row after row."""
        if samples.requested is not None:
            chosen = samples.requested
        elif samples.logits is not None:
            chosen = samples.logits.argmax(1)
        else:
            per_row = samples.x[: self.columns * len(samples.classes)]
            return list(per_row.split(self.columns))
        return [samples.x[chosen == c][: self.columns] for c in samples.classes]

    def _compute(self, samples: ReplaySamples, strategy) -> Dict[tuple, object]:
        low, high = self.value_range or (samples.x.min(), samples.x.max())
        span = max(float(high) - float(low), 1e-8)
        tiles = []
        for row in self.rows(samples):
            row = ((row - float(low)) / span).clamp(0, 1)
            blank = row.new_zeros(self.columns - len(row), *samples.x.shape[1:])
            tiles.append(torch.cat([row, blank]))
        grid = make_grid(torch.cat(tiles), nrow=self.columns, pad_value=0.5)
        return {(str(self), None): TensorImage(grid)}


class GeneratorLossMetric(PluginMetric[Dict[str, float]]):
    """The generator's training losses, each averaged over an experience
    (``GeneratorLoss/.../<loss name>``), as the
    :class:`~avl_genreplay.generator_training.GeneratorTrainingPlugin` records
    them in ``loss_history`` (with ``schedule="after"``; nothing is emitted
    for an experience that added no entry, and, with a warning, nothing
    without such a plugin).

    :param plugin: the generator-training plugin; ``None`` to find it among
        the strategy's plugins.
    """

    def __init__(self, plugin: Optional[GeneratorTrainingPlugin] = None):
        super().__init__()
        self.plugin = plugin
        self._reported = 0
        self._warned = False
        self._last: Dict[str, float] = {}

    def __str__(self):
        return "GeneratorLoss"

    def result(self) -> Dict[str, float]:
        return dict(self._last)

    def reset(self) -> None:
        self._last = {}

    def _find_plugin(self, strategy) -> Optional[GeneratorTrainingPlugin]:
        if self.plugin is not None:
            return self.plugin
        for plugin in strategy.plugins:
            if isinstance(plugin, GeneratorTrainingPlugin):
                return plugin
        return None

    def after_training_exp(self, strategy) -> List[MetricValue]:
        if not DistributedHelper.is_main_process:
            return []
        plugin = self._find_plugin(strategy)
        if plugin is None:
            # a metric should not end a run that may have trained for hours
            if not self._warned:
                warnings.warn(
                    "GeneratorLossMetric found no GeneratorTrainingPlugin among "
                    "the strategy's plugins and reports nothing; pass plugin=..."
                )
                self._warned = True
            return []
        history = plugin.loss_history
        if len(history) <= self._reported:
            return []
        self._reported = len(history)
        base = get_metric_name(self, strategy, add_task=False)
        self._last = {f"{base}/{k}": float(v) for k, v in history[-1].items()}
        x_plot = strategy.clock.train_iterations
        return [MetricValue(self, k, v, x_plot) for k, v in self._last.items()]


def replay_quality_metrics(
    reference: Optional[nn.Module] = None,
    real_data: Optional[Data] = None,
    *,
    generator: Optional[Generator] = None,
    samples_per_class: int = 100,
    accuracy: bool = True,
    frechet: bool = True,
    per_class_frechet: bool = True,
    grid: bool = True,
    grid_columns: int = 8,
    grid_value_range: Optional[Tuple[float, float]] = None,
    losses: bool = True,
    generator_plugin: Optional[GeneratorTrainingPlugin] = None,
    batch_size: int = 256,
    seed: int = 0,
) -> List[PluginMetric]:
    """The replay-quality metrics, for an
    :class:`~avalanche.training.plugins.EvaluationPlugin` (as Avalanche's
    ``accuracy_metrics``); the sample-based ones share one
    :class:`ReplaySampler`.

    :param reference: the reference classifier, e.g. from
        :func:`~avl_genreplay.reference.train_reference_classifier`; needed
        by ``accuracy`` and ``frechet``.
    :param real_data: real test data (dataset, stream or ``(inputs,
        labels)``); needed by ``frechet``.
    :param generator: the generator to judge; ``None`` to find it on the
        strategy.
    :param samples_per_class: samples drawn per class seen, per experience.
    :param accuracy: :class:`ReplayClassifierAccuracy`.
    :param frechet: :class:`ReplayFrechetDistance`.
    :param per_class_frechet: its distance per class too.
    :param grid: :class:`ReplaySamplesGrid`.
    :param grid_columns: samples per row of the grid.
    :param grid_value_range: the data's ``(low, high)`` for the grid.
    :param losses: :class:`GeneratorLossMetric`.
    :param generator_plugin: its plugin; ``None`` to find it on the strategy.
    :param batch_size: the generator's and the reference's batch size.
    :param seed: seed of the sampling.
    """
    metrics: List[PluginMetric] = []
    if accuracy or frechet or grid:
        sampler = ReplaySampler(
            reference,
            real_data,
            generator=generator,
            samples_per_class=samples_per_class,
            batch_size=batch_size,
            seed=seed,
        )
        if accuracy:
            metrics.append(ReplayClassifierAccuracy(sampler))
        if frechet:
            metrics.append(ReplayFrechetDistance(sampler, per_class=per_class_frechet))
        if grid:
            metrics.append(
                ReplaySamplesGrid(
                    sampler, columns=grid_columns, value_range=grid_value_range
                )
            )
    if losses:
        metrics.append(GeneratorLossMetric(generator_plugin))
    return metrics
