"""How generated samples reach the solver: a method-agnostic replay plugin.

From the second experience on, :class:`SolverReplayPlugin` adds to every
training iteration a loss on a batch of generated inputs of past experiences,
labelled by a frozen copy of the previous solver (or, for a class-conditional
generator, by the requested classes). The two losses are weighed by the
importance ratio ``r``: ``loss = r * loss_current + (1 - r) * loss_replay``
(Shin et al., 2017), where ``loss_current`` is the template's criterion on the
minibatch; terms that other plugins (EWC, LwF, ...) add to the loss keep their
own weight, whatever the order of the plugins. Labels can be hard (the old
solver's arg-max) or soft (distillation with a temperature, "DGR+distill" in
van de Ven & Tolias, 2019).

The same bookkeeping (which classes each task label has seen, sampling inputs
of past classes) serves the generator-training plugins, so it lives here too.
"""

import warnings
from collections import Counter
from copy import deepcopy
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.distributed import DistributedHelper
from avalanche.models.generator import Generator
from avalanche.models.utils import avalanche_forward
from torch import Tensor, nn

from avl_genreplay.augmentation import InputAugmentationPlugin
from avl_genreplay.distributed import RankRandom, sum_counts

__all__ = [
    "PastClasses",
    "Replay",
    "ReplayBank",
    "replay_inputs",
    "SolverReplayPlugin",
    "UntrainedGeneratorWarning",
    "LearningCheck",
    "parameter_fingerprint",
    "frozen_copy",
    "is_conditional",
    "experience_classes",
    "experience_task_label",
    "check_generator_shape",
    "check_generator_classes",
    "sample_past_inputs",
    "on_every_head",
    "restrict_logits",
    "past_classes_mask",
    "distillation_loss",
    "class_balancing_weights",
]

_MASKED = -1e9  # finite, so that p * log p stays 0 (not NaN) on masked classes


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy in eval mode whose parameters take no gradient."""
    copy = deepcopy(module)
    copy.eval()
    for parameter in copy.parameters():
        parameter.requires_grad_(False)
    return copy


def is_conditional(generator: Generator) -> bool:
    """Whether the generator's ``generate`` takes class labels as condition:
    its ``is_conditional`` where it has one (this package's generators), else
    whether it has a number of classes (e.g. Avalanche's ``MlpVAE`` has none,
    a :class:`~avl_genreplay.replay_pool.ReplayPool` has one)."""
    conditional = getattr(generator, "is_conditional", None)
    if conditional is None:
        return getattr(generator, "num_classes", None) is not None
    return bool(conditional)


def experience_classes(experience) -> List[int]:
    """The classes of an experience, with a clear error where none are known."""
    classes = getattr(experience, "classes_in_this_experience", None)
    if classes is None:
        targets = getattr(getattr(experience, "dataset", None), "targets", None)
        if targets is None:
            raise ValueError(
                "the experience carries no class information "
                "(classes_in_this_experience or dataset.targets), which "
                "labelling replay needs"
            )
        classes = torch.as_tensor(list(targets)).unique().tolist()
    return sorted(int(c) for c in classes)


def experience_task_label(experience) -> int:
    """The experience's task label (0 for streams without task labels)."""
    labels = getattr(experience, "task_labels", None) or [0]
    if len(labels) != 1:
        raise ValueError(
            f"an experience with several task labels {labels} is not supported"
        )
    return int(labels[0])


def check_generator_shape(generator: Generator, experience) -> None:
    """Raises ``ValueError`` if the generator's samples and the data differ in
    shape (e.g. channels or image size), before any training."""
    dataset = experience.dataset
    if len(dataset) == 0:
        raise ValueError(
            f"experience {experience.current_experience} has an empty dataset"
        )
    data_shape = tuple(dataset[0][0].shape)
    generator_shape = getattr(generator, "output_shape", None)
    if generator_shape is None:
        training = generator.training
        generator.eval()
        with torch.no_grad():
            if is_conditional(generator):
                samples = generator.generate(2, torch.zeros(2, dtype=torch.long))
            else:  # e.g. Avalanche's MlpVAE, whose generate takes no condition
                samples = generator.generate(2)
            generator_shape = tuple(samples.shape[1:])
        generator.train(training)
    if tuple(generator_shape) != data_shape:
        raise ValueError(
            f"the generator makes samples of shape {tuple(generator_shape)} but "
            f"the data has shape {data_shape}: build the generator for the "
            f"benchmark's input shape"
        )


def check_generator_classes(generator: Generator, experience) -> None:
    """Raises ``ValueError`` if the experience carries no class information,
    which labelling replay needs, or if a class-conditional generator does not
    know all its classes (before any training)."""
    classes = experience_classes(experience)
    num_classes = getattr(generator, "num_classes", None)
    if num_classes is None:
        return
    unknown = [c for c in classes if not 0 <= c < num_classes]
    if unknown:
        raise ValueError(
            f"experience {experience.current_experience} holds classes {unknown} "
            f"that the conditional generator does not know (it has "
            f"{num_classes} classes, 0..{num_classes - 1})"
        )


class UntrainedGeneratorWarning(UserWarning):
    """Replay is drawn from a generator that has not learned any experience."""


@torch.no_grad()
def parameter_fingerprint(generator: Generator) -> Optional[Tuple[float, ...]]:
    """The sum and the sum of squares of each of the generator's parameters,
    which any training step changes; ``None`` for a generator without
    parameters (e.g. a :class:`~avl_genreplay.replay_pool.ReplayPool`)."""
    if not isinstance(generator, nn.Module):
        return None
    sums = []
    for parameter in generator.parameters():
        values = parameter.detach().double()
        sums += [values.sum().item(), values.square().sum().item()]
    return tuple(sums) or None


class LearningCheck:
    """Warns, once, when a plugin draws replay from a generator whose
    parameters have not changed since the plugin's first experience: one that
    learned nothing replays noise (e.g. replay without any generator
    training, Avalanche issue #1138).

    Generators without parameters are not checked: a
    :class:`~avl_genreplay.replay_pool.ReplayPool` is filled by a plugin that
    checks its own generator. A generator trained before the run and frozen
    since also warns; silence it with ``warnings.filterwarnings("ignore",
    category=UntrainedGeneratorWarning)``.

    :param plugin_name: the plugin named in the warning.
    """

    def __init__(self, plugin_name: str):
        self.plugin_name = plugin_name
        self.start: Optional[Tuple[float, ...]] = None
        self.warned = False

    def before_experience(self, generator: Generator, replaying: bool) -> None:
        """Call before each experience, ``replaying`` from the first one whose
        replay comes from ``generator``."""
        if not replaying:
            if self.start is None:
                self.start = parameter_fingerprint(generator)
            return
        if self.warned or self.start is None:
            return
        if parameter_fingerprint(generator) == self.start:
            self.warned = True
            warnings.warn(
                f"{self.plugin_name} replays samples of a "
                f"{type(generator).__name__} whose parameters have not changed "
                f"since the first experience: it has learned nothing, so its "
                f"samples are noise. Train it, e.g. with GeneratorTrainingPlugin.",
                UntrainedGeneratorWarning,
                stacklevel=2,
            )


class PastClasses:
    """Which classes were seen under which task label, experience by experience."""

    def __init__(self):
        self.by_task: Dict[int, List[int]] = {}
        self.experiences = 0

    def add(self, task_label: int, classes: Sequence[int]) -> None:
        known = self.by_task.setdefault(task_label, [])
        known.extend(c for c in classes if c not in known)
        known.sort()
        self.experiences += 1

    def task_class_pairs(self) -> List[tuple]:
        """Every ``(task label, class)`` seen, task by task."""
        return [(t, c) for t, cs in self.by_task.items() for c in cs]

    @property
    def classes(self) -> List[int]:
        return sorted({c for cs in self.by_task.values() for c in cs})

    def __bool__(self) -> bool:
        return self.experiences > 0


def past_classes_mask(past: PastClasses, tasks: Tensor, num_outputs: int) -> Tensor:
    """Boolean ``(batch, outputs)`` mask of the past classes of each sample's
    task label."""
    allowed = torch.zeros(len(tasks), num_outputs, dtype=torch.bool)
    for task, classes in past.by_task.items():
        columns = torch.zeros(num_outputs, dtype=torch.bool)
        columns[[c for c in classes if c < num_outputs]] = True
        allowed[(tasks == task).cpu()] = columns
    return allowed.to(tasks.device)


class Replay(NamedTuple):
    """A batch of replay: inputs, labels, task labels and the old solver's
    logits (restricted to each sample's allowed classes; ``None`` if unused)."""

    x: Tensor
    y: Tensor
    t: Tensor
    logits: Optional[Tensor]


def restrict_logits(logits: Tensor, allowed: Tensor) -> Tensor:
    """Masks the logits of classes a sample may not take (``allowed`` is a
    boolean ``(batch, classes)`` mask)."""
    return logits.masked_fill(~allowed, _MASKED)


def distillation_loss(
    logits: Tensor,
    target_logits: Tensor,
    allowed: Tensor,
    temperature: float,
    weights: Optional[Tensor] = None,
) -> Tensor:
    """KL divergence from the teacher's tempered softmax over the allowed
    classes to the student's over all outputs, scaled by ``temperature ** 2``
    (Hinton et al., 2015). The student is not restricted: in a single head,
    mass it puts on classes the teacher rules out (e.g. the current
    experience's) is what replay must take away. ``weights``, one per sample
    and summing to one, replace the mean over samples."""
    log_p = F.log_softmax(logits / temperature, dim=1)
    q = F.softmax(restrict_logits(target_logits, allowed) / temperature, dim=1)
    per_sample = (q * (q.clamp_min(1e-12).log() - log_p)).sum(1)
    reduced = per_sample.mean() if weights is None else (weights * per_sample).sum()
    return reduced * temperature**2


def class_balancing_weights(
    labels: Tensor, *, groups: Optional[Tensor] = None
) -> Tensor:
    """Per-sample weights, summing to one, that give every label present in
    the batch the same total weight; with ``groups`` (e.g. the head each
    sample is scored on), every group the same total weight and, within it,
    every label."""
    if groups is None:
        counts = torch.bincount(labels)
        weights = 1.0 / counts[labels].float()
        return weights / weights.sum()
    weights = torch.empty(len(labels), device=labels.device)
    present = groups.unique()
    for group in present:
        members = groups == group
        weights[members] = class_balancing_weights(labels[members]) / len(present)
    return weights


def _balanced(values: Sequence[int], n: int, device) -> Tensor:
    """``n`` draws from ``values``, each value equally often (up to one)."""
    values = torch.as_tensor(list(values), device=device)
    order = torch.randperm(n, device=device) % len(values)
    return values[order]


def sample_past_inputs(
    generator: Generator, n: int, past: PastClasses, device
) -> tuple:
    """Samples ``n`` inputs of past experiences.

    A conditional generator gets an equal number of samples per past class;
    an unconditional one samples freely. Task labels are those of the
    requested classes, or drawn evenly among past task labels.

    :return: ``(x, conditions or None, task_labels)``.
    """
    if is_conditional(generator):
        pairs = past.task_class_pairs()
        picks = _balanced(range(len(pairs)), n, device)
        conditions = torch.tensor([pairs[i][1] for i in picks.tolist()], device=device)
        tasks = torch.tensor([pairs[i][0] for i in picks.tolist()], device=device)
        x = generator.generate(n, conditions)
        return x.to(device), conditions, tasks
    tasks = _balanced(sorted(past.by_task), n, device)
    return generator.generate(n).to(device), None, tasks


class ReplayBank:
    """Inputs drawn once from a frozen generator, replayed in minibatches in
    a random order, reshuffled each time they are used up, so each input is
    replayed as often as any other (up to one).

    :param x: the inputs.
    :param conditions: the classes a conditional generator was asked for,
        ``None`` for an unconditional one.
    :param tasks: the task label of each input.
    """

    def __init__(self, x: Tensor, conditions: Optional[Tensor], tasks: Tensor):
        self.x, self.conditions, self.tasks = x, conditions, tasks
        self._order = torch.zeros(0, dtype=torch.long, device=x.device)

    @classmethod
    @torch.no_grad()
    def draw(
        cls,
        generator: Generator,
        size: int,
        past: PastClasses,
        device,
        *,
        batch_size: int = 1024,
    ) -> "ReplayBank":
        """``size`` inputs of past experiences from ``generator`` (see
        :func:`sample_past_inputs`; each of its batches is balanced over the
        past classes, so the bank is too, up to one per batch)."""
        parts = [
            sample_past_inputs(generator, min(batch_size, size - start), past, device)
            for start in range(0, size, batch_size)
        ]
        x, conditions, tasks = (list(column) for column in zip(*parts))
        conditions = None if conditions[0] is None else torch.cat(conditions)
        return cls(torch.cat(x), conditions, torch.cat(tasks))

    def take(self, n: int) -> tuple:
        """The next ``n`` inputs: ``(x, conditions or None, tasks)``."""
        while len(self._order) < n:
            reshuffled = torch.randperm(len(self.x), device=self.x.device)
            self._order = torch.cat([self._order, reshuffled])
        picks, self._order = self._order[:n], self._order[n:]
        conditions = None if self.conditions is None else self.conditions[picks]
        return self.x[picks], conditions, self.tasks[picks]


def replay_inputs(
    bank: Optional[ReplayBank],
    generator: Generator,
    n: int,
    past: PastClasses,
    device,
) -> tuple:
    """``n`` inputs of past experiences: the bank's next ones if there is a
    bank, else new ones from ``generator`` (see :func:`sample_past_inputs`)."""
    if bank is not None:
        return bank.take(n)
    with torch.no_grad():
        return sample_past_inputs(generator, n, past, device)


def on_every_head(
    x: Tensor, conditions: Optional[Tensor], tasks: Tensor, heads: Sequence[int]
) -> tuple:
    """Each sample once per head (task label) in ``heads``, head after head,
    for scoring every replayed sample on every past head.

    :return: ``(x, conditions or None, own task labels, head of each row)``,
        the own task labels being those ``tasks`` gave each sample.
    """
    repeats = len(heads)
    x = x.repeat(repeats, *([1] * (x.dim() - 1)))
    if conditions is not None:
        conditions = conditions.repeat(repeats)
    head_of_row = torch.as_tensor(list(heads), device=tasks.device)
    return (
        x,
        conditions,
        tasks.repeat(repeats),
        head_of_row.repeat_interleave(len(tasks)),
    )


class SolverReplayPlugin(SupervisedPlugin, supports_distributed=True):
    """Replays generated inputs of past experiences to the solver.

    Works with any :class:`avalanche.models.generator.Generator` (e.g. this
    package's GANs and diffusion models, or Avalanche's ``MlpVAE``), in
    class-incremental (one head; labels restricted to the classes seen so
    far), task-incremental (task labels passed through to a
    ``MultiTaskModule``; labels restricted to the classes of each task) and
    domain-incremental streams. The generator is trained elsewhere, e.g. by
    :class:`avl_genreplay.generator_training.GeneratorTrainingPlugin`.

    In a task-incremental stream, an unconditional generator's samples carry
    no task: by default each gets a past task label drawn evenly, so it may
    be scored on a head that is not its own. ``score_every_head`` instead
    scores every replayed sample on every past head, as does the
    task-incremental DGR of van de Ven & Tolias (2019): the old solver's head
    of each past task label, restricted to that task's classes, labels all
    the samples (or gives their soft targets), the new solver's head learns
    them, and the replay loss is the mean over the heads.
    :attr:`last_replay` then holds each sample once per head (``t`` its head)
    and :attr:`replayed_class_counts` counts each sample once per head.

    Under distributed training (``torchrun``, Avalanche's
    ``DistributedHelper``) each rank replays samples of its own (drawn from a
    random stream of its own, :class:`~avl_genreplay.distributed.RankRandom`)
    beside its share of the minibatch, so ranks do not replay the same
    samples; ``replay_mb_size`` is per process, as Avalanche's
    ``train_mb_size``, and :attr:`replayed_class_counts` sums every rank's.
    The solver's gradients are averaged by whoever trains it data-parallel
    (:class:`~avl_genreplay.distributed.DataParallelPlugin`, which this
    package's strategies add, or a solver wrapped with
    ``DistributedHelper.wrap_model``).

    :param generator: the generator whose samples are replayed. A frozen copy
        taken before each experience is sampled, so a generator trained
        alongside the solver does not replay its own half-learned samples.
    :param importance_ratio: ``r``, the weight of the loss on current data
        (the template's ``criterion()``); replay gets ``1 - r``. Terms other
        plugins add to ``strategy.loss`` (e.g. EWC's penalty) are not scaled.
        ``None`` (DGR's default) uses ``1 / t`` where ``t`` is the number of
        experiences seen, current one included.
    :param replay_mb_size: replayed samples per iteration; ``None`` for as many
        as the current minibatch holds.
    :param soft_targets: learn the old solver's tempered probabilities
        (distillation) instead of its arg-max labels.
    :param temperature: distillation temperature for ``soft_targets``.
    :param relabel: for a class-conditional generator, label samples by the
        old solver instead of by the requested class.
    :param balance_classes: weigh each replayed sample by the inverse
        frequency of its label in the batch (cross-entropy or distillation),
        so that classes an unconditional generator under-produces still count
        as much as the others.
    :param augment: a random transformation of a batch of inputs (e.g.
        Kornia's ``RandomAffine``) applied alike to the solver's training
        minibatches and to the replayed inputs (before the old solver labels
        them). The solver then learns every class under the same variations,
        which makes up for part of what the generator's samples of a class
        miss. The minibatch is transformed from the forward pass to the
        backward pass (see :class:`~avl_genreplay.augmentation.
        InputAugmentationPlugin`); the generator still trains on the
        untransformed data. ``None`` for no transformation.
    :param score_every_head: score every replayed sample on the head of every
        past task label (see above) instead of on one task label's. With one
        task label (class- and domain-incremental streams) it changes
        nothing. A class-conditional generator's samples are generated as
        without it (evenly per past class) and, on their own task's head,
        labelled by their class unless ``relabel``; on the other heads the old
        solver labels them. Such a generator knows each sample's task, so it
        does not need this.
    :param replay_bank_size: draw this many inputs from the frozen generator
        once, before each experience, in batches of ``bank_mb_size``, and
        replay minibatches taken from them in a random order (reshuffled each
        time they are used up) instead of generating ``replay_mb_size`` new
        inputs at every iteration. The old solver still labels each replayed
        minibatch, after ``augment``, as without a bank. It saves most of the
        generator's forward passes where they are dear (a few of a solver
        epoch's worth of replay: DGM's masked generator decodes one pass per
        past task) at the price of replaying each input several times. A
        conditional generator's bank holds each past class equally often (up
        to one per generator batch). ``None`` (the default, as in DGR's and
        DGM's papers) draws fresh inputs at every iteration. The bank lives
        during the experience only.
    :param bank_mb_size: generator batch size when filling the bank.
    """

    def __init__(
        self,
        generator: Generator,
        *,
        importance_ratio: Optional[float] = None,
        replay_mb_size: Optional[int] = None,
        soft_targets: bool = False,
        temperature: float = 2.0,
        relabel: bool = False,
        balance_classes: bool = False,
        augment: Optional[Callable[[Tensor], Tensor]] = None,
        score_every_head: bool = False,
        replay_bank_size: Optional[int] = None,
        bank_mb_size: int = 1024,
    ):
        super().__init__()
        if augment is not None and not callable(augment):
            raise ValueError(f"augment must be callable, got {type(augment).__name__}")
        if importance_ratio is not None and not 0.0 <= importance_ratio <= 1.0:
            raise ValueError(
                f"importance_ratio must lie in [0, 1], got {importance_ratio}"
            )
        if replay_mb_size is not None and replay_mb_size < 1:
            raise ValueError(f"replay_mb_size must be >= 1, got {replay_mb_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if replay_bank_size is not None and replay_bank_size < 1:
            raise ValueError(f"replay_bank_size must be >= 1, got {replay_bank_size}")
        if bank_mb_size < 1:
            raise ValueError(f"bank_mb_size must be >= 1, got {bank_mb_size}")
        self.generator = generator
        self.importance_ratio = importance_ratio
        self.replay_mb_size = replay_mb_size
        self.soft_targets = soft_targets
        self.temperature = temperature
        self.relabel = relabel
        self.balance_classes = balance_classes
        self.augment = augment
        self.score_every_head = score_every_head
        self.replay_bank_size = replay_bank_size
        self.bank_mb_size = bank_mb_size
        self._bank: Optional[ReplayBank] = None
        # the current data takes the transformation the way every strategy's
        # does (InputAugmentationPlugin); the replay takes it in sample()
        self._inputs = None if augment is None else InputAugmentationPlugin(augment)
        self.past = PastClasses()
        self.old_solver: Optional[nn.Module] = None
        self.old_generator: Optional[Generator] = None
        self.last_replay: Optional[Replay] = None
        # labels replayed in each experience, to see which classes the
        # generator still covers (a collapsed one replays few classes)
        self.replayed_class_counts: List[Dict[int, int]] = []
        self._counts: Counter = Counter()
        self.learning_check = LearningCheck(type(self).__name__)
        self.random = RankRandom(type(self).__name__)

    def current_ratio(self) -> float:
        """The weight of the current data's loss for the experience at hand."""
        if self.importance_ratio is not None:
            return self.importance_ratio
        return 1.0 / (self.past.experiences + 1)

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        # the first callback of an experience: fail before anything is trained
        check_generator_shape(self.generator, strategy.experience)
        check_generator_classes(self.generator, strategy.experience)

    def before_training_exp(self, strategy, **kwargs):
        self.learning_check.before_experience(self.generator, bool(self.past))
        if self.past:
            # a copy of the module, not of a DistributedDataParallel wrapper
            self.old_solver = frozen_copy(
                DistributedHelper.unwrap_model(strategy.model)
            )
            self.old_generator = frozen_copy(self.generator)
        self._counts: Counter = Counter()
        self.random.reset()
        if self.past and self.replay_bank_size is not None:
            with self.random(strategy.device):
                self._bank = ReplayBank.draw(
                    self.old_generator,
                    self.replay_bank_size,
                    self.past,
                    strategy.device,
                    batch_size=self.bank_mb_size,
                )
        if self._inputs is not None:
            self._inputs.before_training_exp(strategy)

    def after_training_exp(self, strategy, **kwargs):
        self.past.add(
            experience_task_label(strategy.experience),
            experience_classes(strategy.experience),
        )
        self.old_solver = self.old_generator = None
        self.last_replay = None
        self._bank = None
        self.replayed_class_counts.append(sum_counts(self._counts))

    def allowed_classes(self, tasks: Tensor, num_outputs: int) -> Tensor:
        """Boolean ``(batch, outputs)`` mask of the past classes of each
        sample's task label."""
        return past_classes_mask(self.past, tasks, num_outputs)

    @torch.no_grad()
    def sample(self, n: int, device) -> Replay:
        """A labelled batch of ``n`` replayed samples of past experiences
        (``n`` per past task label with ``score_every_head``)."""
        x, conditions, own_tasks = replay_inputs(
            self._bank, self.old_generator, n, self.past, device
        )
        if self.augment is not None:
            x = self.augment(x)
        tasks = own_tasks
        if self.score_every_head:
            x, conditions, own_tasks, tasks = on_every_head(
                x, conditions, own_tasks, sorted(self.past.by_task)
            )
        # a requested class labels its sample on its own task's head only
        by_condition = None
        if conditions is not None and not self.relabel:
            by_condition = tasks == own_tasks
        logits = None
        y = conditions
        if by_condition is None or self.soft_targets or not by_condition.all():
            raw = avalanche_forward(self.old_solver, x, tasks)
            logits = restrict_logits(raw, self.allowed_classes(tasks, raw.shape[1]))
            y = logits.argmax(dim=1)
            if by_condition is not None:
                y = torch.where(by_condition, conditions, y)
        return Replay(x, y, tasks, logits)

    def before_forward(self, strategy, **kwargs):
        if self._inputs is not None:
            self._inputs.before_forward(strategy)

    def after_backward(self, strategy, **kwargs):
        if self._inputs is not None:
            self._inputs.after_backward(strategy)

    def before_backward(self, strategy, **kwargs):
        if self.old_generator is None:
            return
        n = self.replay_mb_size or len(strategy.mb_x)
        with self.random(strategy.device):
            replay = self.sample(n, strategy.device)
        self.last_replay = replay
        self._counts.update(replay.y.tolist())
        output = avalanche_forward(strategy.model, replay.x, replay.t)
        weights = None
        if self.balance_classes:
            # with every head scoring, each head weighs the same, as in the
            # unweighted mean over the heads
            heads = replay.t if self.score_every_head else None
            weights = class_balancing_weights(replay.y, groups=heads)
        if self.soft_targets:
            allowed = self.allowed_classes(replay.t, output.shape[1])
            replay_loss = distillation_loss(
                output, replay.logits, allowed, self.temperature, weights
            )
        elif weights is not None:
            per_sample = F.cross_entropy(output, replay.y, reduction="none")
            replay_loss = (weights * per_sample).sum()
        else:
            replay_loss = strategy._criterion(output, replay.y)
        # the template has already added the current data's criterion to the
        # loss, at weight 1, and other plugins (EWC, LwF, ...) add their own
        # terms before or after this one: only add what turns the criterion's
        # weight into r, so that their terms keep theirs whatever the order
        ratio = self.current_ratio()
        current_loss = strategy.criterion()
        strategy.loss += (ratio - 1) * current_loss + (1 - ratio) * replay_loss
