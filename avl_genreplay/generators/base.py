"""Common base of the package's image generators and of their training steps.

Every generator here is an :class:`avalanche.models.Generator`: it samples with
``generate(batch_size, condition=None)``. Image generators also know the shape
and value range of the data they imitate, so no image size or normalisation is
hard-coded: the shape comes from the benchmark, the range from the data.
"""

from abc import ABC, abstractmethod
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from avalanche.models.generator import Generator
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from avl_genreplay.distributed import extreme

__all__ = [
    "ImageGenerator",
    "GeneratorTrainer",
    "WeightAverage",
    "ExperienceAverage",
    "check_ema_decay",
    "refresh_batch_norm",
]


class ImageGenerator(Generator, nn.Module):
    """An image generator whose outputs live in the value range of the data.

    Subclasses implement :meth:`decode`, mapping noise (and a condition) to
    images in ``[-1, 1]``; this class rescales them, per channel, to the range
    of the real data, which :meth:`calibrate_range` measures on a real batch
    (the training plugins call it on the first experience). A fixed range can
    also be given at construction.

    :param output_shape: shape of one image, ``(channels, height, width)``.
    :param noise_dim: size of the noise vector.
    :param num_classes: number of classes of a class-conditional generator,
        ``None`` for an unconditional one.
    :param data_range: fixed ``(low, high)`` value range of the data; ``None``
        to measure it on the first real batch.
    """

    def __init__(
        self,
        output_shape: Sequence[int],
        noise_dim: int,
        num_classes: Optional[int] = None,
        data_range: Optional[Tuple[float, float]] = None,
    ):
        nn.Module.__init__(self)
        if len(output_shape) != 3 or min(output_shape) < 1:
            raise ValueError(
                f"output_shape must be (channels, height, width), got {output_shape}"
            )
        self.output_shape = tuple(int(s) for s in output_shape)
        self.noise_dim = int(noise_dim)
        self.num_classes = num_classes
        channels = self.output_shape[0]
        low, high = data_range if data_range is not None else (-1.0, 1.0)
        self.register_buffer("range_low", torch.full((channels, 1, 1), float(low)))
        self.register_buffer("range_high", torch.full((channels, 1, 1), float(high)))
        self.register_buffer("range_calibrated", torch.tensor(data_range is not None))

    @property
    def is_conditional(self) -> bool:
        """Whether :meth:`generate` takes class labels as ``condition``."""
        return self.num_classes is not None

    @property
    def device(self) -> torch.device:
        return self.range_low.device

    @torch.no_grad()
    def calibrate_range(self, real: Tensor) -> None:
        """Sets the output range, per channel, to that of a batch of real data.

        Does nothing once calibrated, so later experiences keep the range
        (and so the meaning of the outputs) of the first. Under distributed
        training, the range of every rank's batch (called on every rank alike).
        """
        if bool(self.range_calibrated):
            return
        per_channel = real.detach().transpose(0, 1).reshape(real.shape[1], -1)
        low = extreme(per_channel.min(dim=1).values, largest=False)
        high = extreme(per_channel.max(dim=1).values, largest=True)
        self.range_low.copy_(low.view(-1, 1, 1))
        self.range_high.copy_(high.view(-1, 1, 1))
        self.range_calibrated.fill_(True)

    def to_data_range(self, unit: Tensor) -> Tensor:
        """Maps images from ``[-1, 1]`` to the data's value range."""
        return self.range_low + (unit + 1) * 0.5 * (self.range_high - self.range_low)

    def to_unit_range(self, data: Tensor) -> Tensor:
        """Maps images from the data's value range to ``[-1, 1]``."""
        span = (self.range_high - self.range_low).clamp_min(1e-8)
        return (data - self.range_low) / span * 2 - 1

    def sample_noise(self, batch_size: int) -> Tensor:
        return torch.randn(batch_size, self.noise_dim, device=self.device)

    def check_condition(self, condition: Optional[Tensor], batch_size: int) -> None:
        """Raises a clear error for a condition this generator cannot take."""
        if condition is None:
            if self.is_conditional:
                raise ValueError("this generator is conditional: pass class labels")
            return
        if not self.is_conditional:
            raise ValueError("this generator is unconditional: condition must be None")
        if condition.shape != (batch_size,):
            raise ValueError(
                f"condition must hold one class label per sample, shape "
                f"({batch_size},), got {tuple(condition.shape)}"
            )
        if condition.numel() and (
            int(condition.min()) < 0 or int(condition.max()) >= self.num_classes
        ):
            raise ValueError(
                f"condition holds a class outside 0..{self.num_classes - 1}: "
                f"{sorted(set(condition.tolist()))}"
            )

    @abstractmethod
    def decode(self, noise: Tensor, condition: Optional[Tensor] = None) -> Tensor:
        """Maps noise (and a condition) to images in ``[-1, 1]``."""

    def get_features(self, x: Tensor) -> Tensor:
        """Generators have no feature extractor (required by ``BaseModel``)."""
        raise NotImplementedError("generators do not extract features")

    def forward(self, noise: Tensor, condition: Optional[Tensor] = None) -> Tensor:
        """Images in the data's value range for the given noise."""
        return self.to_data_range(self.decode(noise, condition))

    def generate(
        self, batch_size: Optional[int] = None, condition: Optional[Tensor] = None
    ) -> Tensor:
        """Samples ``batch_size`` images (one if ``None``).

        :param batch_size: number of samples.
        :param condition: class labels, one per sample, for a conditional
            generator; ``None`` for an unconditional one.
        """
        batch_size = 1 if batch_size is None else int(batch_size)
        if condition is not None:
            condition = torch.as_tensor(condition, device=self.device).long()
        self.check_condition(condition, batch_size)
        return self(self.sample_noise(batch_size), condition)


class GeneratorTrainer(ABC):
    """One training step of a generator, apart from where its data comes from.

    The generator-training plugin feeds batches (real data mixed with replay)
    to :meth:`train_step`; what a step does (GAN, diffusion, ...) is the
    trainer's business. Trainers keep their own optimisers, so a generator's
    learning rate is its own. The generator may be any Avalanche
    ``Generator`` (e.g. Avalanche's ``MlpVAE``), not only an
    :class:`ImageGenerator`.
    """

    generator: Generator
    #: whether :meth:`train_step` works under distributed training: it
    #: averages its gradients across ranks before each optimiser step
    #: (:func:`~avl_genreplay.distributed.average_gradients`) and its
    #: networks stay the same on every rank
    supports_distributed: bool = False
    #: whether a :class:`~avl_genreplay.generator_training.TrainingGuard`
    #: judges the generator's samples in training mode during an experience
    #: (its last check is in eval mode, as replay samples it): for a generator
    #: that samples in eval mode only in a form that settles at the end of
    #: the experience, e.g. DGM's binary task masks
    check_in_training_mode: bool = False

    @abstractmethod
    def train_step(self, x: Tensor, y: Optional[Tensor] = None) -> Dict[str, float]:
        """Trains on one batch; returns the losses computed in this step by name
        (a loss not computed in a step, e.g. the generator's between critic
        steps, is left out).

        A trainer that treats replay apart from new data (DGM's, a diffusion
        model's with ``distill_replay``) may also take a keyword
        ``replayed``, a boolean mask of the batch's replayed samples: the
        generator-training plugin then passes it, so that labels need not
        tell them apart (they cannot where experiences share classes)."""

    def optimizers(self) -> List[torch.optim.Optimizer]:
        """The trainer's optimisers (for lowering the learning rate)."""
        return []

    def scale_learning_rate(self, factor: float) -> None:
        """Multiplies the learning rate of every optimiser by ``factor``."""
        for optimizer in self.optimizers():
            for group in optimizer.param_groups:
                group["lr"] *= factor

    def start_experience(self, experience_index: int) -> None:
        """Called before the generator learns an experience (no-op by default)."""

    def end_experience(self, experience_index: int) -> None:
        """Called after the generator learned an experience (no-op by default)."""

    def modules(self) -> Dict[str, nn.Module]:
        """The trainer's own networks beside the generator, e.g. a critic."""
        return {}

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to resume training: networks and optimisers."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restores what :meth:`state_dict` returned."""


def check_ema_decay(decay: Optional[float]) -> None:
    """Raises ``ValueError`` unless ``decay`` is ``None`` or in ``(0, 1)``."""
    if decay is not None and not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay must lie in (0, 1), got {decay}")


class WeightAverage:
    """An exponential moving average of a module's parameters over one
    experience, loaded into the module at its end (buffers are left alone).

    Diffusion models sample better from averaged weights (Ho et al., 2020).
    Entries that do not change during the experience keep their exact value:
    the average moves by ``(1 - decay) * (new - average)``, 0 for them. (A
    DGM generator sampled from its average did worse: on SplitMNIST, seed 0,
    DGM-a's final accuracy fell from 0.935 to 0.855.)

    :param module: the module whose weights are averaged.
    :param decay: the average's decay per :meth:`update`, in ``(0, 1)``.
    """

    def __init__(self, module: nn.Module, decay: float):
        check_ema_decay(decay)
        self.module = module
        self.average = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay))

    def update(self) -> None:
        """Moves the average towards the module's current weights."""
        self.average.update_parameters(self.module)

    @torch.no_grad()
    def load_into_module(self) -> None:
        """Replaces the module's parameters by their average."""
        for live, averaged in zip(
            self.module.parameters(), self.average.module.parameters()
        ):
            live.copy_(averaged)

    def state_dict(self) -> dict:
        return self.average.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state)


class ExperienceAverage:
    """A trainer's moving average of a module's weights over each experience:
    started by :meth:`start`, moved after each optimiser step by
    :meth:`update`, loaded into the module by :meth:`finish` (see
    :class:`WeightAverage`). With ``decay=None`` every call does nothing.

    :param module: the module whose weights are averaged.
    :param decay: the average's decay per step, in ``(0, 1)``, or ``None``.
    """

    def __init__(self, module: nn.Module, decay: Optional[float]):
        check_ema_decay(decay)
        self.module = module
        self.decay = decay
        #: the average of the experience under way, ``None`` between experiences
        self.current: Optional[WeightAverage] = None

    def start(self) -> None:
        """Starts averaging from the module's weights as they are now."""
        if self.decay is not None:
            self.current = WeightAverage(self.module, self.decay)

    def update(self) -> None:
        """Moves the average towards the module's current weights."""
        if self.current is not None:
            self.current.update()

    def finish(self) -> bool:
        """Loads the average into the module and ends it; whether it did."""
        if self.current is None:
            return False
        self.current.load_into_module()
        self.current = None
        return True

    def state_dict(self) -> Optional[dict]:
        """The average under way, for a trainer's state; ``None`` if none."""
        return None if self.current is None else self.current.state_dict()

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Restores an average under way (nothing between experiences)."""
        if self.current is not None and state is not None:
            self.current.load_state_dict(state)


@torch.no_grad()
def refresh_batch_norm(
    generator: ImageGenerator,
    *,
    batches: int = 16,
    batch_size: int = 256,
    classes: Optional[Sequence[int]] = None,
) -> None:
    """Measures the running statistics of the generator's batch-norm layers
    anew on its own samples (a cumulative mean over ``batches`` batches).

    Weights loaded from a moving average do not match the statistics the
    layers gathered with the last weights, and a generator sampled in eval
    mode (as replay samples it) uses those statistics.

    :param generator: the generator; its mode is restored afterwards.
    :param batches: batches of noise to pass through it.
    :param batch_size: samples per batch.
    :param classes: for a conditional generator, the classes to condition on
        (drawn evenly at random); ignored for an unconditional one.
    """
    norms = [
        module
        for module in generator.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.track_running_stats
    ]
    if not norms:
        return
    if generator.is_conditional and not classes:
        raise ValueError("a conditional generator needs the classes to sample")
    was_training = generator.training
    momenta = [module.momentum for module in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # a cumulative mean over the batches
    generator.train()
    try:
        for _ in range(batches):
            condition = None
            if generator.is_conditional:
                picks = torch.randint(len(classes), (batch_size,))
                condition = torch.as_tensor(list(classes))[picks].to(generator.device)
            generator.decode(generator.sample_noise(batch_size), condition)
    finally:
        for module, momentum in zip(norms, momenta):
            module.momentum = momentum
        generator.train(was_training)
