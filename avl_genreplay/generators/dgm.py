"""Dynamic Generative Memory (Ostapenko et al., CVPR 2019): a class-conditional
AC-GAN whose generator learns binary task masks, keeps what past tasks use
and grows to keep its free capacity.

* :class:`MaskedGenerator`: noise and a one-hot label -> three growable
  layers, no batch normalisation (its statistics would be shared across
  tasks): :class:`MaskedConvGenerator` (dense -> two transposed
  convolutions, sized from the image shape, as
  :class:`~avl_genreplay.generators.wgan_gp.ConvGenerator`) or
  :class:`MaskedMlpGenerator` (fully connected, cheaper on a CPU). Each class is
  generated with the mask of the task (experience) it was learned in (of one
  of them, drawn at random, for a class met again in a later experience, as
  in domain-incremental streams). In
  variant ``"a"`` (DGM-a) the masks gate the hidden layers' units; in
  variant ``"w"`` (DGM-w) they gate every weight and bias.
* :class:`ACDiscriminator` and :class:`MlpACDiscriminator`: the WGAN-GP
  critic of :class:`~avl_genreplay.generators.wgan_gp.ConvCritic` or
  :class:`~avl_genreplay.generators.wgan_gp.MlpCritic` with an auxiliary
  classification head.
* :class:`DGMTrainer`: the AC-GAN training step with hard attention
  (annealed mask scale, sparsity penalty, blocked gradients of reserved
  parameters) and, after each task, the expansion of the generator.
* :class:`DiscriminatorSolver`: the discriminator's auxiliary classifier as a
  solver (as in the paper).
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avl_genreplay.distributed import average_gradients, extreme
from avl_genreplay.generators.base import GeneratorTrainer, ImageGenerator
from avl_genreplay.generators.masks import GrowableLayer, TaskMask, annealed_scale
from avl_genreplay.generators.wgan_gp import (
    ConvCritic,
    MlpCritic,
    _base_size,
    gradient_penalty,
)

__all__ = [
    "VARIANTS",
    "MaskedGenerator",
    "MaskedConvGenerator",
    "MaskedMlpGenerator",
    "ACDiscriminator",
    "MlpACDiscriminator",
    "DGMTrainer",
    "DiscriminatorSolver",
]

VARIANTS = ("w", "a")


class MaskedGenerator(ImageGenerator):
    """DGM's class-conditional generator with learned binary task masks: three
    growable layers (:class:`~avl_genreplay.generators.masks.GrowableLayer`),
    ReLU after the two hidden ones, tanh at the output, no batch
    normalisation (its statistics would be shared across tasks). Subclasses
    choose the layers (:meth:`_build_layers`).

    Task ``t`` is the ``t``-th experience the generator learns; a class
    belongs to the task in which it was first seen (:meth:`assign_classes`)
    and is always generated with that task's mask. In a domain-incremental
    stream, where later experiences bring the same classes again (e.g.
    PermutedMNIST), the trainer assigns them to each task that learns them,
    and each sample of such a class is generated with the mask of one of its
    past tasks, drawn at random. During training the
    current task's mask is ``sigmoid(scale * embedding)`` (``scale`` set by
    the trainer); in eval mode, and for every past task, masks are binary.

    :param output_shape: ``(channels, height, width)`` of the data.
    :param num_classes: number of classes (the generator is conditional).
    :param variant: ``"w"`` (masks on weights) or ``"a"`` (masks on units).
    :param noise_dim: size of the noise vector.
    :param hidden: units (feature maps) of the two hidden layers at the start
        (they grow after each task); ``None`` for the class's
        :attr:`default_hidden`.
    :param data_range: fixed ``(low, high)`` data range, ``None`` to calibrate.
    """

    #: hidden units (feature maps) at the start when none are given
    default_hidden: Tuple[int, int] = (64, 32)

    def __init__(
        self,
        output_shape: Sequence[int],
        num_classes: int,
        *,
        variant: str = "w",
        noise_dim: int = 128,
        hidden: Optional[Tuple[int, int]] = None,
        data_range: Optional[Tuple[float, float]] = None,
    ):
        hidden = self.default_hidden if hidden is None else tuple(hidden)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if num_classes is None or num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if len(hidden) != 2 or min(hidden) < 1:
            raise ValueError(f"hidden sizes must be two positive sizes, got {hidden}")
        super().__init__(output_shape, noise_dim, num_classes, data_range)
        self.variant = variant
        self.layers = nn.ModuleList(self._build_layers(hidden))
        if variant == "a":
            self.unit_masks = nn.ModuleList([TaskMask((c,)) for c in hidden])
        else:
            self.weight_masks = nn.ModuleList(
                [TaskMask(layer.weight.shape) for layer in self.layers]
            )
            self.bias_masks = nn.ModuleList(
                [TaskMask(layer.bias.shape) for layer in self.layers]
            )
        # which tasks learned each class: (classes, tasks), the current task
        # (the last column) included
        self.register_buffer(
            "class_tasks", torch.zeros(num_classes, 1, dtype=torch.bool)
        )
        self.scale: Optional[float] = None
        self._keep: List[Tuple[Tensor, Tensor]] = []
        self._free: List[Tensor] = []
        self.growth_log: List[dict] = []

    def _build_layers(self, hidden: Tuple[int, int]) -> List[GrowableLayer]:
        """The input, hidden and output layers, from the noise and one-hot
        label to the image."""
        raise NotImplementedError

    # -- tasks and classes -------------------------------------------------

    def masks(self) -> List[TaskMask]:
        """Every task mask of the generator."""
        if self.variant == "a":
            return list(self.unit_masks)
        return list(self.weight_masks) + list(self.bias_masks)

    @property
    def num_tasks(self) -> int:
        """Tasks learned; the task being learned has this index."""
        return self.masks()[0].num_tasks

    @property
    def units(self) -> List[int]:
        """Units (feature maps) of the hidden layers."""
        return [layer.out_units for layer in self.layers[:-1]]

    def layer_parameters(self) -> int:
        """Weights and biases of the generator (masks and embeddings aside)."""
        return sum(layer.weight.numel() + layer.bias.numel() for layer in self.layers)

    def _class_table(self) -> Tensor:
        """:attr:`class_tasks` with one column per task, the current one
        included (made here if :meth:`start_task` has not)."""
        missing = self.num_tasks + 1 - self.class_tasks.shape[1]
        if missing > 0:
            padding = self.class_tasks.new_zeros(len(self.class_tasks), missing)
            self.class_tasks = torch.cat([self.class_tasks, padding], 1)
        return self.class_tasks[:, : self.num_tasks + 1]

    @property
    def class_task(self) -> Tensor:
        """The first task of each class, -1 while unseen."""
        table = self._class_table()
        first = table.float().argmax(1)
        return torch.where(table.any(1), first, torch.full_like(first, -1))

    @torch.no_grad()
    def assign_classes(self, labels: Tensor, *, again: bool = False) -> None:
        """Maps the classes among ``labels`` not seen before to the task being
        learned; with ``again``, every class among them (the experience's own
        samples of classes that past experiences had too, as in
        domain-incremental streams)."""
        table = self._class_table()
        new = labels.unique()
        if not again:
            new = new[~table[new].any(1)]
        table[new, self.num_tasks] = True

    def current_classes(self) -> Tensor:
        """The classes of the task being learned."""
        return self._class_table()[:, self.num_tasks].nonzero().squeeze(1)

    def task_of(self, condition: Tensor) -> Tensor:
        """The task whose mask generates each label: the task being learned
        for its own classes and unseen ones, else the past task that learned
        it, one drawn at random where several did."""
        tasks = self._class_table()[condition]
        # the current task's column stands in for classes no past task has
        current = tasks[:, -1] | ~tasks[:, :-1].any(1)
        tasks[:, -1] = current
        tasks[current, :-1] = False
        if (tasks.sum(1) > 1).any():  # never in class-incremental streams
            return torch.multinomial(tasks.float(), 1).squeeze(1)
        return tasks.float().argmax(1)

    # -- generation ----------------------------------------------------------

    def _layer_masks(self, task: int):
        scale = self.scale if self.training else None
        if self.variant == "a":
            units = [m.mask(task, scale) for m in self.unit_masks]
            return [(None, None, u) for u in units] + [(None, None, None)]
        return [
            (w.mask(task, scale), b.mask(task, scale), None)
            for w, b in zip(self.weight_masks, self.bias_masks)
        ]

    def _input(self, noise: Tensor, condition: Tensor) -> Tensor:
        """The first layer's input: the noise and the one-hot label."""
        return torch.cat([noise, F.one_hot(condition, self.num_classes).to(noise)], 1)

    def _crop(self, x: Tensor) -> Tensor:
        """The output layer's maps cut to the image size."""
        _, height, width = self.output_shape
        return x[:, :, :height, :width]

    def _decode_task(self, noise: Tensor, condition: Tensor, task: int) -> Tensor:
        x = self._input(noise, condition)
        last = len(self.layers) - 1
        for index, (layer, (w_mask, b_mask, u_mask)) in enumerate(
            zip(self.layers, self._layer_masks(task))
        ):
            if layer.kind == "linear":
                x = x.flatten(1)
            x = layer(x, w_mask, b_mask)
            if index == last:
                x = torch.tanh(x)
            else:
                x = F.relu(x)
                if u_mask is not None:
                    x = x * u_mask.view(1, -1, 1, 1)
        return self._crop(x)

    def decode(self, noise: Tensor, condition: Optional[Tensor] = None) -> Tensor:
        if condition is None:
            raise ValueError("this generator is conditional: pass class labels")
        tasks = self.task_of(condition)
        present = tasks.unique().tolist()
        if len(present) == 1:
            return self._decode_task(noise, condition, present[0])
        order, parts = [], []
        for task in present:
            index = (tasks == task).nonzero().squeeze(1)
            order.append(index)
            parts.append(self._decode_task(noise[index], condition[index], task))
        return torch.cat(parts)[torch.cat(order).argsort()]

    # -- plasticity control --------------------------------------------------

    def _blocked(self) -> List[Tuple[Tensor, Tensor]]:
        """Per layer, the weights and biases that past tasks use (boolean)."""
        if self.variant == "w":
            return [
                (w.reserved(), b.reserved())
                for w, b in zip(self.weight_masks, self.bias_masks)
            ]
        device = self.class_tasks.device
        past = self.num_tasks > 0
        learned = self._class_table()[:, : self.num_tasks].any(1)
        noise = torch.full((self.noise_dim,), past, dtype=torch.bool, device=device)
        units = [torch.cat([noise, learned])]
        units += [m.reserved() for m in self.unit_masks]
        out = torch.full((self.output_shape[0],), past, dtype=torch.bool, device=device)
        units.append(out)
        blocked = []
        for layer, used_in, used_out in zip(self.layers, units[:-1], units[1:]):
            extra = (1,) * len(layer.rest)
            weight = used_out.view(-1, 1, *extra) & used_in.view(1, -1, *extra)
            bias = used_out.view(-1, *((1,) * len(layer.bias_rest)))
            blocked.append((weight.expand_as(layer.weight), bias.expand_as(layer.bias)))
        return blocked

    def reserved_share(self) -> List[float]:
        """Per layer, the share of its weights and biases past tasks hold."""
        shares = []
        for weight, bias in self._blocked():
            total = weight.numel() + bias.numel()
            shares.append((weight.sum() + bias.sum()).item() / total)
        return shares

    def start_task(self) -> None:
        """Before a task: fresh embeddings, and the gradient masks of the
        parameters past tasks reserved."""
        for mask in self.masks():
            mask.reset()
        # the task's column now, so the state's shapes hold through the task
        # (a rollback restores a state saved before its first step)
        self._class_table()
        self._keep = [
            ((~w).to(layer.weight), (~b).to(layer.bias))
            for layer, (w, b) in zip(self.layers, self._blocked())
        ]
        self._free = [(~m.reserved()).to(m.embedding) for m in self.masks()]

    @torch.no_grad()
    def block_gradients(self) -> None:
        """Zeroes the gradients of the parameters past tasks reserved."""
        for layer, (keep_w, keep_b) in zip(self.layers, self._keep):
            if layer.weight.grad is not None:
                layer.weight.grad.mul_(keep_w)
            if layer.bias.grad is not None:
                layer.bias.grad.mul_(keep_b)

    def sparsity_loss(self, scale: float) -> Tensor:
        """HAT's penalty: the mean soft mask over the entries no past task
        holds (the current task's share of the free capacity)."""
        if not self._free:  # outside a task: what is free now
            self._free = [(~m.reserved()).to(m.embedding) for m in self.masks()]
        total, count = 0.0, 0.0
        for mask, free in zip(self.masks(), self._free):
            total = total + (mask.soft(scale) * free).sum()
            count += float(free.sum())
        if count == 0:
            return torch.zeros((), device=self.device)
        return total / count

    # -- expansion -----------------------------------------------------------

    @torch.no_grad()
    def end_task(self) -> dict:
        """After a task: its masks become binary and reserved; each hidden
        layer grows by the units (DGM-a) or the weight capacity, in units
        (DGM-w), that the task newly reserved, so the free capacity stays
        what it was.

        :return: the task's record, also appended to :attr:`growth_log`:
            ``reserved_units`` (DGM-a) or ``reserved_weights`` (DGM-w) newly
            reserved per hidden layer, ``added_units`` per hidden layer,
            ``units`` after growth, ``parameters`` (weights and biases) after
            growth, and ``reserved_share`` per layer after growth.
        """
        task = self.num_tasks
        newly = [mask.commit() for mask in self.masks()]
        hidden = len(self.layers) - 1
        record = {"task": task, "parameters_before": self.layer_parameters()}
        if self.variant == "a":
            counts = [int(n.sum()) for n in newly]
            added = counts
            record["reserved_units"] = counts
        else:
            weights, biases = newly[: len(self.layers)], newly[len(self.layers) :]
            counts = [int(w.sum() + b.sum()) for w, b in zip(weights, biases)]
            added = []
            for layer, count in zip(self.layers[:hidden], counts[:hidden]):
                per_unit = layer.weight[0].numel() + layer.bias[0].numel()
                added.append(math.ceil(count / per_unit))
            record["reserved_weights"] = counts
        for index, n in enumerate(added):
            self._grow(index, n)
        self._keep, self._free = [], []
        record.update(
            added_units=added,
            units=self.units,
            parameters=self.layer_parameters(),
            reserved_share=self.reserved_share(),
        )
        self.growth_log.append(record)
        return record

    def _grow(self, index: int, n: int) -> None:
        """Adds ``n`` units to hidden layer ``index`` (and inputs to the next)."""
        if n <= 0:
            return
        self.layers[index].grow_out(n)
        self.layers[index + 1].grow_in(n)
        if self.variant == "a":
            self.unit_masks[index].grow(0, n)
        else:
            self.weight_masks[index].grow(0, n)
            self.bias_masks[index].grow(0, n)
            self.weight_masks[index + 1].grow(1, n)


class MaskedConvGenerator(MaskedGenerator):
    """:class:`MaskedGenerator` of a dense layer and two transposed
    convolutions (sized from the image shape, as
    :class:`~avl_genreplay.generators.wgan_gp.ConvGenerator`).

    :param output_shape: ``(channels, height, width)`` of the data.
    :param num_classes: number of classes (the generator is conditional).
    :param variant: ``"w"`` (masks on weights) or ``"a"`` (masks on units).
    :param noise_dim: size of the noise vector.
    :param channels: feature maps of the two hidden layers at the start
        (they grow after each task).
    :param data_range: fixed ``(low, high)`` data range, ``None`` to calibrate.
    """

    def __init__(
        self,
        output_shape: Sequence[int],
        num_classes: int,
        *,
        variant: str = "w",
        noise_dim: int = 128,
        channels: Tuple[int, int] = (64, 32),
        data_range: Optional[Tuple[float, float]] = None,
    ):
        super().__init__(
            output_shape,
            num_classes,
            variant=variant,
            noise_dim=noise_dim,
            hidden=channels,
            data_range=data_range,
        )

    def _build_layers(self, hidden: Tuple[int, int]) -> List[GrowableLayer]:
        base = _base_size(self.output_shape)
        return [
            GrowableLayer("linear", self.noise_dim + self.num_classes, hidden[0], base),
            GrowableLayer("conv_transpose", hidden[0], hidden[1]),
            GrowableLayer("conv_transpose", hidden[1], self.output_shape[0]),
        ]

    def _decode_task(self, noise: Tensor, condition: Tensor, task: int) -> Tensor:
        binary = task < self.num_tasks or not self.training
        if binary and not torch.is_grad_enabled():
            masks = self._layer_masks(task)
            kept = self._kept_units(masks)
            # oneDNN refuses a convolution without channels
            if all(len(units) for units in kept):
                return self._decode_units(noise, condition, masks, kept)
        return super()._decode_task(noise, condition, task)

    def _kept_units(self, masks: list) -> List[Tensor]:
        """The units of each hidden layer that binary masks keep: DGM-a's unit
        masks; under DGM-w's, the units with a weight or bias left (the
        others are zeros, e.g. every unit grown after the task)."""
        if self.variant == "a":
            return [u_mask.nonzero().squeeze(1) for _, _, u_mask in masks[:-1]]
        kept = []
        for w_mask, b_mask, _ in masks[:-1]:
            units = w_mask.flatten(1).any(1) | b_mask.reshape(len(b_mask), -1).any(1)
            kept.append(units.nonzero().squeeze(1))
        return kept

    def _decode_units(
        self, noise: Tensor, condition: Tensor, masks: list, kept: List[Tensor]
    ) -> Tensor:
        """Decodes under binary masks (no autograd) through the units they
        keep only: the units they drop are zeros, which add nothing to the
        next layer, and a past task keeps few of a grown generator's units
        (DGM-a's masks keep few of any), so its replay costs a fraction of a
        pass through every unit. The values are the same to the bit on a
        CPU: the transposed convolutions give the kept channels the same
        values without the zero ones; the dense layer computes every unit,
        since its rounding depends on how many it computes for batches of one
        to three samples."""
        dense, hidden, output = self.layers
        (w0, b0, _), (w1, b1, _), (w2, b2, _) = masks
        x = F.relu(dense(self._input(noise, condition), w0, b0))[:, kept[0]]
        x = F.relu(hidden(x, w1, b1, in_index=kept[0], out_index=kept[1]))
        return self._crop(torch.tanh(output(x, w2, b2, in_index=kept[1])))


class MaskedMlpGenerator(MaskedGenerator):
    """:class:`MaskedGenerator` of three fully connected layers, two hidden
    layers of 400 units at the start unless ``hidden`` says otherwise; on a
    CPU its steps cost a fraction of :class:`MaskedConvGenerator`'s (as
    :class:`~avl_genreplay.generators.wgan_gp.MlpGenerator` against
    :class:`~avl_genreplay.generators.wgan_gp.ConvGenerator`). Takes
    :class:`MaskedGenerator`'s arguments.
    """

    default_hidden = (400, 400)

    def _build_layers(self, hidden: Tuple[int, int]) -> List[GrowableLayer]:
        channels, height, width = self.output_shape
        return [
            GrowableLayer("linear", self.noise_dim + self.num_classes, hidden[0]),
            GrowableLayer("linear", hidden[0], hidden[1]),
            GrowableLayer("linear", hidden[1], channels, (height, width)),
        ]


class _AuxiliaryClassifier:
    """AC-GAN's auxiliary classification head on a projection critic's
    features (the critic's ``features``, ``_prepare`` and ``_scored``)."""

    def score_and_logits(
        self, x: Tensor, condition: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        features = self.features(self._prepare(x))
        return self._scored(features, condition), self.classifier(features)

    def classify(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self._prepare(x)))


class ACDiscriminator(_AuxiliaryClassifier, ConvCritic):
    """AC-GAN discriminator: a WGAN-GP critic (no normalisation) and an
    auxiliary classifier on the same features.

    ``forward`` gives the critic's score (as :class:`ConvCritic`, so
    :func:`~avl_genreplay.generators.wgan_gp.gradient_penalty` applies),
    :meth:`classify` the class logits. Inputs are in ``[-1, 1]``.

    :param input_shape: ``(channels, height, width)`` of the data.
    :param num_classes: classes of the auxiliary classifier.
    :param channels: feature maps of the first stage (the second has twice).
    :param projection: also condition the critic's score on the label by
        projection (Miyato & Koyama, 2018), beside the auxiliary head.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: int = 32,
        projection: bool = False,
    ):
        super().__init__(input_shape, channels, num_classes if projection else None)
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.score.in_features, num_classes)


class MlpACDiscriminator(_AuxiliaryClassifier, MlpCritic):
    """:class:`ACDiscriminator` of fully connected layers
    (:class:`~avl_genreplay.generators.wgan_gp.MlpCritic` with an auxiliary
    classifier), the match of :class:`MaskedMlpGenerator`.

    :param input_shape: ``(channels, height, width)`` of the data.
    :param num_classes: classes of the auxiliary classifier.
    :param hidden_size: units of each hidden layer.
    :param hidden_layers: number of hidden layers.
    :param projection: also condition the critic's score on the label by
        projection, beside the auxiliary head.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden_size: int = 400,
        hidden_layers: int = 2,
        projection: bool = False,
    ):
        super().__init__(
            input_shape,
            hidden_size,
            hidden_layers,
            num_classes if projection else None,
        )
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.score.in_features, num_classes)


class DiscriminatorSolver(nn.Module):
    """The discriminator's auxiliary classifier as a solver on data-range
    inputs (mapped to ``[-1, 1]`` with the generator's range, which its first
    training batch calibrates if nothing did before).

    The generator is held without being registered as a submodule, so the
    solver's parameters are the discriminator's only.
    """

    def __init__(self, discriminator: ACDiscriminator, generator: ImageGenerator):
        super().__init__()
        self.discriminator = discriminator
        object.__setattr__(self, "generator", generator)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.generator.calibrate_range(x)
        return self.discriminator.classify(self.generator.to_unit_range(x))


class DGMTrainer(GeneratorTrainer):
    """DGM's AC-GAN step with hard attention to the task.

    Each :meth:`train_step` updates the discriminator on the batch (real data
    of the current task and replay of past classes): critic + ``gp_weight`` x
    gradient penalty, on the current task's samples against generated ones
    of the same classes (past classes come from frozen masks, nothing to
    learn there), + ``aux_weight`` x auxiliary cross-entropy on the whole
    batch, replay included. Every ``critic_steps``-th step
    the generator is updated on samples of the current task's classes: critic
    + ``aux_weight`` x auxiliary cross-entropy + ``sparsity`` x mask sparsity.
    The gradients of parameters past tasks reserved are zeroed and the
    generator's optimiser is rebuilt for each task (its Adam state is fresh,
    so reserved parameters do not move); the mask scale is annealed from
    ``1 / s_max`` to ``s_max`` over ``anneal_steps`` generator steps; HAT's
    embedding-gradient compensation and clamping apply.

    :param generator: a :class:`MaskedGenerator`.
    :param discriminator: an :class:`ACDiscriminator` or
        :class:`MlpACDiscriminator`; ``None`` for one sized from the
        generator (fully connected for a :class:`MaskedMlpGenerator`).
    :param lr: Adam's learning rate for the networks.
    :param mask_lr: Adam's learning rate for the mask embeddings (``None``:
        ``lr``).
    :param betas: Adam's betas.
    :param critic_steps: discriminator updates per generator update.
    :param gp_weight: weight of the gradient penalty.
    :param penalty_share: share of the critic's pairs on which the gradient
        penalty is estimated (see
        :func:`~avl_genreplay.generators.wgan_gp.gradient_penalty`).
    :param aux_weight: weight of the auxiliary classification losses.
    :param sparsity: weight of the mask sparsity penalty (>= 0): the mean
        soft mask over the entries no past task holds (HAT's), so its pull on
        each entry is ``sparsity / entries``.
    :param s_max: largest mask scale (>= 1).
    :param anneal_steps: generator steps over which the scale is annealed
        (one experience's, usually).
    :param embedding_limit: embeddings are clamped to ``[-limit, limit]``.
    :param discriminator_channels: channels of the default convolutional
        discriminator.
    :param discriminator_hidden_size: hidden units of the default fully
        connected discriminator.
    :param projection: the default discriminator's critic is also
        conditioned on the label by projection.
    """

    supports_distributed = True
    # the current task's binary mask (eval mode) means nothing before the
    # scale anneals: with the sparsity penalty a layer's embeddings may all be
    # negative while its soft mask is still ~0.4, so the eval-mode samples
    # are constant though the generator trains well
    check_in_training_mode = True

    def __init__(
        self,
        generator: MaskedGenerator,
        discriminator: Optional[Union[ACDiscriminator, MlpACDiscriminator]] = None,
        *,
        lr: float = 2e-3,
        mask_lr: Optional[float] = 0.01,
        betas: Tuple[float, float] = (0.5, 0.9),
        critic_steps: int = 2,
        gp_weight: float = 10.0,
        penalty_share: float = 1.0,
        aux_weight: float = 1.0,
        sparsity: float = 0.08,
        s_max: float = 1e4,
        anneal_steps: int = 500,
        embedding_limit: float = 6.0,
        discriminator_channels: int = 32,
        discriminator_hidden_size: int = 400,
        projection: bool = False,
    ):
        if not isinstance(generator, MaskedGenerator):
            raise ValueError("DGMTrainer needs a MaskedGenerator")
        if critic_steps < 1:
            raise ValueError(f"critic_steps must be >= 1, got {critic_steps}")
        if sparsity < 0:
            raise ValueError(f"sparsity must be >= 0, got {sparsity}")
        if not 0.0 < penalty_share <= 1.0:
            raise ValueError(f"penalty_share must lie in (0, 1], got {penalty_share}")
        if not s_max >= 1:
            raise ValueError(f"s_max must be >= 1, got {s_max}")
        if anneal_steps < 1:
            raise ValueError(f"anneal_steps must be >= 1, got {anneal_steps}")
        if lr <= 0 or (mask_lr is not None and mask_lr <= 0):
            raise ValueError("lr and mask_lr must be > 0")
        self.generator = generator
        if discriminator is None:
            shape, classes = generator.output_shape, generator.num_classes
            if isinstance(generator, MaskedMlpGenerator):
                discriminator = MlpACDiscriminator(
                    shape, classes, discriminator_hidden_size, projection=projection
                )
            else:
                discriminator = ACDiscriminator(
                    shape, classes, discriminator_channels, projection=projection
                )
        self.discriminator = discriminator.to(generator.device)
        self.lr = lr
        self.mask_lr = lr if mask_lr is None else mask_lr
        self.betas = betas
        self.critic_steps = critic_steps
        self.gp_weight = gp_weight
        self.penalty_share = penalty_share
        self.aux_weight = aux_weight
        self.sparsity = sparsity
        self.s_max = float(s_max)
        self.anneal_steps = anneal_steps
        self.embedding_limit = embedding_limit
        self.discriminator_optimizer = torch.optim.Adam(
            self.discriminator.parameters(), lr=lr, betas=betas
        )
        self.generator_optimizer = self._generator_optimizer()
        self.steps = 0
        self.generator_steps = 0
        self.generator.start_task()

    def _generator_optimizer(self) -> torch.optim.Optimizer:
        embeddings = [mask.embedding for mask in self.generator.masks()]
        weights = [p for layer in self.generator.layers for p in layer.parameters()]
        return torch.optim.Adam(
            [{"params": weights}, {"params": embeddings, "lr": self.mask_lr}],
            lr=self.lr,
            betas=self.betas,
        )

    def modules(self) -> Dict[str, nn.Module]:
        return {"discriminator": self.discriminator}

    def optimizers(self) -> List[torch.optim.Optimizer]:
        return [self.generator_optimizer, self.discriminator_optimizer]

    def scale(self) -> float:
        """The mask scale at the current generator step."""
        return annealed_scale(self.generator_steps, self.anneal_steps, self.s_max)

    def start_experience(self, experience_index: int) -> None:
        # a fresh embedding per task; a fresh optimiser (the generator may
        # have grown, and Adam's state must not move reserved parameters)
        self.generator.start_task()
        self.generator_steps = 0
        lrs = [group["lr"] for group in self.generator_optimizer.param_groups]
        self.generator_optimizer = self._generator_optimizer()
        # keep a learning rate lowered by a rollback of the guard
        for group, lr in zip(self.generator_optimizer.param_groups, lrs):
            group["lr"] = lr

    def end_experience(self, experience_index: int) -> None:
        self.generator.end_task()
        self.generator.scale = None

    def train_step(
        self, x: Tensor, y: Optional[Tensor] = None, replayed: Optional[Tensor] = None
    ) -> Dict[str, float]:
        """One discriminator step (and every ``critic_steps``-th, a generator
        step).

        :param replayed: which samples of the batch are replay; ``None`` to
            tell them by their labels (classes of past tasks), which fails
            where experiences share classes (domain-incremental streams).
        """
        if y is None:
            raise ValueError("DGM's generator is class-conditional: pass labels")
        generator, discriminator = self.generator, self.discriminator
        if replayed is None:
            generator.assign_classes(y)
        else:
            generator.assign_classes(y[~replayed], again=True)
        # under distributed training a class is the task's once any rank's
        # batch held it, so every rank takes its generator steps alike
        generator.class_tasks = extreme(generator.class_tasks, largest=True)
        generator.train()
        discriminator.train()
        scale = self.scale()
        generator.scale = scale
        real = generator.to_unit_range(x)
        real_score, real_logits = discriminator.score_and_logits(real, y)
        # the critic compares real and generated samples of the current
        # task's classes: past classes are generated with frozen masks, so
        # neither side could learn from them; replay trains the classifier
        if replayed is None:
            current = generator.task_of(y) == generator.num_tasks
        else:
            current = ~replayed
        if not current.any():
            current = torch.ones_like(current)
        with torch.no_grad():
            fake = generator.decode(
                generator.sample_noise(int(current.sum())), y[current]
            )
        fake_score = discriminator(fake, y[current])
        wasserstein = real_score[current].mean() - fake_score.mean()
        penalty = gradient_penalty(
            discriminator, real[current], fake, y[current], share=self.penalty_share
        )
        auxiliary = F.cross_entropy(real_logits, y)
        loss = -wasserstein + self.gp_weight * penalty + self.aux_weight * auxiliary
        self.discriminator_optimizer.zero_grad()
        loss.backward()
        average_gradients(self.discriminator_optimizer)
        self.discriminator_optimizer.step()
        losses = {
            "critic": loss.item(),
            "wasserstein": wasserstein.item(),
            "gp": penalty.item(),
            "aux": auxiliary.item(),
        }
        self.steps += 1
        current = generator.current_classes()
        if self.steps % self.critic_steps == 0 and len(current):
            losses.update(self._generator_step(len(x), current, scale))
        return losses

    def _generator_step(self, n: int, classes: Tensor, scale: float) -> dict:
        generator = self.generator
        condition = classes[torch.randint(len(classes), (n,), device=classes.device)]
        fake = generator.decode(generator.sample_noise(n), condition)
        score, logits = self.discriminator.score_and_logits(fake, condition)
        auxiliary = F.cross_entropy(logits, condition)
        sparsity = generator.sparsity_loss(scale)
        loss = -score.mean() + self.aux_weight * auxiliary + self.sparsity * sparsity
        self.generator_optimizer.zero_grad()
        loss.backward()
        generator.block_gradients()
        for mask in generator.masks():
            mask.compensate_gradient(scale, self.s_max)
        average_gradients(self.generator_optimizer)
        self.generator_optimizer.step()
        for mask in generator.masks():
            mask.clamp_(self.embedding_limit)
        self.generator_steps += 1
        return {
            "generator": loss.item(),
            "generator_aux": auxiliary.item(),
            "sparsity": sparsity.item(),
        }

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "discriminator_optimizer": self.discriminator_optimizer.state_dict(),
            "steps": self.steps,
            "generator_steps": self.generator_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` (within one task: the generator's
        shapes must be those of the saved state)."""
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.steps = state["steps"]
        self.generator_steps = state["generator_steps"]
