"""WGAN-GP (Gulrajani et al., 2017): DGR's generator and its training step.

The default networks are small DCGAN-style convolutional nets whose sizes
follow the image shape (two stride-2 stages, so 28x28 starts from 7x7 and
32x32 from 8x8); fully connected ones (as van de Ven et al.'s generative
replay uses on MNIST) are cheaper on a CPU.
"""

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avl_genreplay.distributed import average_gradients
from avl_genreplay.generators.base import (
    ExperienceAverage,
    GeneratorTrainer,
    ImageGenerator,
    refresh_batch_norm,
)

__all__ = [
    "ConvGenerator",
    "ConvCritic",
    "MlpGenerator",
    "MlpCritic",
    "WGANGPTrainer",
    "gradient_penalty",
]


def _base_size(output_shape: Sequence[int]) -> Tuple[int, int]:
    """Spatial size before the two upsampling stages (rounded up)."""
    _, height, width = output_shape
    return -(-height // 4), -(-width // 4)


def _label_embedding(num_classes: Optional[int]) -> Optional[nn.Embedding]:
    """The label embedding a conditional generator concatenates to its noise
    (``None`` for an unconditional one)."""
    if num_classes is None:
        return None
    return nn.Embedding(num_classes, min(num_classes, 32))


def _with_label(
    embedding: Optional[nn.Embedding], noise: Tensor, condition: Optional[Tensor]
) -> Tensor:
    """``noise`` with the embedding of its ``condition`` appended, if any."""
    if condition is None:
        return noise
    return torch.cat([noise, embedding(condition)], dim=1)


def _embedding_width(embedding: Optional[nn.Embedding]) -> int:
    return 0 if embedding is None else embedding.embedding_dim


def _dense_layers(
    width: int,
    hidden_size: int,
    hidden_layers: int,
    *,
    activation: Callable[[], nn.Module],
    batch_norm: bool,
) -> List[nn.Module]:
    """``hidden_layers`` fully connected layers of ``hidden_size`` units from
    ``width`` inputs, each followed by batch norm (if asked) and a new
    ``activation()``."""
    if hidden_size < 1 or hidden_layers < 1:
        raise ValueError(
            "hidden_size and hidden_layers must be >= 1, got "
            f"{hidden_size} and {hidden_layers}"
        )
    layers: List[nn.Module] = []
    for _ in range(hidden_layers):
        layers.append(nn.Linear(width, hidden_size))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_size))
        layers.append(activation())
        width = hidden_size
    return layers


class ConvGenerator(ImageGenerator):
    """Convolutional generator: noise -> dense -> two transposed convolutions.

    :param output_shape: ``(channels, height, width)`` of the data.
    :param noise_dim: size of the noise vector.
    :param channels: feature maps of the last hidden stage (the first has twice
        as many).
    :param num_classes: if given, the generator is class-conditional (a label
        embedding is concatenated to the noise).
    :param data_range: fixed ``(low, high)`` data range, ``None`` to calibrate.
    """

    def __init__(
        self,
        output_shape: Sequence[int],
        noise_dim: int = 100,
        channels: int = 32,
        num_classes: Optional[int] = None,
        data_range: Optional[Tuple[float, float]] = None,
    ):
        super().__init__(output_shape, noise_dim, num_classes, data_range)
        base_h, base_w = _base_size(self.output_shape)
        self.base_shape = (2 * channels, base_h, base_w)
        self.label_embedding = _label_embedding(num_classes)
        embed = _embedding_width(self.label_embedding)
        self.dense = nn.Sequential(
            nn.Linear(noise_dim + embed, 2 * channels * base_h * base_w),
            nn.BatchNorm1d(2 * channels * base_h * base_w),
            nn.ReLU(),
        )
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(2 * channels, channels, 4, 2, 1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.ConvTranspose2d(channels, self.output_shape[0], 4, 2, 1),
            nn.Tanh(),
        )

    def decode(self, noise: Tensor, condition: Optional[Tensor] = None) -> Tensor:
        noise = _with_label(self.label_embedding, noise, condition)
        hidden = self.dense(noise).view(-1, *self.base_shape)
        images = self.upsample(hidden)
        _, height, width = self.output_shape
        return images[:, :, :height, :width]


class _ProjectionCritic(nn.Module):
    """A WGAN critic's linear score on its ``features`` (of ``width``); with
    ``num_classes``, conditioned on the label by projection (Miyato & Koyama,
    2018). Subclasses may prepare the inputs first (:meth:`_prepare`)."""

    def __init__(self, features: nn.Module, width: int, num_classes: Optional[int]):
        super().__init__()
        self.features = features
        self.score = nn.Linear(width, 1)
        self.label_projection = (
            nn.Embedding(num_classes, width) if num_classes is not None else None
        )

    def _prepare(self, x: Tensor) -> Tensor:
        return x

    def _scored(self, features: Tensor, condition: Optional[Tensor]) -> Tensor:
        score = self.score(features).squeeze(1)
        if self.label_projection is not None and condition is not None:
            score = score + (self.label_projection(condition) * features).sum(1)
        return score

    def forward(self, x: Tensor, condition: Optional[Tensor] = None) -> Tensor:
        return self._scored(self.features(self._prepare(x)), condition)


class ConvCritic(_ProjectionCritic):
    """WGAN critic: two stride-2 convolutions and a linear score.

    No batch normalisation, which the gradient penalty does not allow. With
    ``num_classes`` it becomes a projection critic (Miyato & Koyama, 2018),
    conditioned on the label.

    :param input_shape: ``(channels, height, width)`` of the data.
    :param channels: feature maps of the first stage (the second has twice).
    :param num_classes: number of classes of a conditional critic.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        channels: int = 32,
        num_classes: Optional[int] = None,
    ):
        base_h, base_w = _base_size(input_shape)
        features = nn.Sequential(
            nn.Conv2d(input_shape[0], channels, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, 2 * channels, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        super().__init__(features, 2 * channels * base_h * base_w, num_classes)
        self.input_shape = tuple(input_shape)

    def _prepare(self, x: Tensor) -> Tensor:
        # Sizes not divisible by 4 are padded to the generator's upsampled size.
        base_h, base_w = _base_size(self.input_shape)
        return F.pad(x, (0, 4 * base_w - x.shape[-1], 0, 4 * base_h - x.shape[-2]))


class MlpGenerator(ImageGenerator):
    """Fully connected generator: noise -> hidden layers -> image.

    On a CPU its training steps cost about a third of :class:`ConvGenerator`'s
    with :class:`MlpCritic` (hidden size 400, batch 64, one thread).

    :param output_shape: ``(channels, height, width)`` of the data.
    :param noise_dim: size of the noise vector.
    :param hidden_size: units of each hidden layer.
    :param hidden_layers: number of hidden layers.
    :param num_classes: if given, the generator is class-conditional (a label
        embedding is concatenated to the noise).
    :param data_range: fixed ``(low, high)`` data range, ``None`` to calibrate.
    """

    def __init__(
        self,
        output_shape: Sequence[int],
        noise_dim: int = 100,
        hidden_size: int = 400,
        hidden_layers: int = 2,
        num_classes: Optional[int] = None,
        data_range: Optional[Tuple[float, float]] = None,
    ):
        super().__init__(output_shape, noise_dim, num_classes, data_range)
        self.label_embedding = _label_embedding(num_classes)
        width = noise_dim + _embedding_width(self.label_embedding)
        hidden = _dense_layers(
            width, hidden_size, hidden_layers, activation=nn.ReLU, batch_norm=True
        )
        self.layers = nn.Sequential(
            *hidden, nn.Linear(hidden_size, math.prod(self.output_shape)), nn.Tanh()
        )

    def decode(self, noise: Tensor, condition: Optional[Tensor] = None) -> Tensor:
        noise = _with_label(self.label_embedding, noise, condition)
        return self.layers(noise).view(-1, *self.output_shape)


class MlpCritic(_ProjectionCritic):
    """WGAN critic of fully connected layers (no normalisation, which the
    gradient penalty does not allow); with ``num_classes`` a projection
    critic, as :class:`ConvCritic`.

    :param input_shape: ``(channels, height, width)`` of the data.
    :param hidden_size: units of each hidden layer.
    :param hidden_layers: number of hidden layers.
    :param num_classes: number of classes of a conditional critic.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden_size: int = 400,
        hidden_layers: int = 2,
        num_classes: Optional[int] = None,
    ):
        hidden = _dense_layers(
            math.prod(input_shape),
            hidden_size,
            hidden_layers,
            activation=lambda: nn.LeakyReLU(0.2),
            batch_norm=False,
        )
        super().__init__(nn.Sequential(nn.Flatten(), *hidden), hidden_size, num_classes)


def gradient_penalty(
    critic: nn.Module,
    real: Tensor,
    fake: Tensor,
    condition: Optional[Tensor] = None,
    share: float = 1.0,
) -> Tensor:
    """WGAN-GP's penalty: (||grad critic(x_hat)|| - 1)^2 on random interpolates.

    :param share: share of the pairs (drawn at random) on which the penalty is
        estimated. Its double backward pass is the dearest part of a critic
        step; half the batch still gives a fair estimate of the mean.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must lie in (0, 1], got {share}")
    if share < 1.0:
        keep = torch.randperm(real.shape[0], device=real.device)
        keep = keep[: max(1, round(share * real.shape[0]))]
        real, fake = real[keep], fake[keep]
        condition = None if condition is None else condition[keep]
    mix = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    interpolates = (mix * real + (1 - mix) * fake).requires_grad_(True)
    scores = critic(interpolates, condition)
    (grads,) = torch.autograd.grad(scores.sum(), interpolates, create_graph=True)
    return ((grads.flatten(1).norm(dim=1) - 1) ** 2).mean()


class WGANGPTrainer(GeneratorTrainer):
    """Trains a generator against a critic with the WGAN-GP objective.

    Each :meth:`train_step` updates the critic once on the given real batch;
    every ``critic_steps``-th step the generator is updated too. The critic
    works on images in ``[-1, 1]`` (the generator's unit range), whatever the
    data's normalisation.

    :param generator: the generator to train.
    :param critic: the critic; by default a :class:`ConvCritic` sized from the
        generator (conditional if the generator is).
    :param lr: Adam's learning rate for both networks.
    :param betas: Adam's betas (WGAN-GP's paper uses (0.5, 0.9) and (0, 0.9)).
    :param critic_steps: critic updates per generator update.
    :param gp_weight: weight of the gradient penalty (lambda).
    :param penalty_share: share of each batch on which the gradient penalty
        is estimated (see :func:`gradient_penalty`).
    :param ema_decay: keep an exponential moving average of the generator's
        weights over each experience (updated after each generator step) and
        load it into the generator at the experience's end, so that replay
        samples the average (Yazici et al., 2019: averaged GAN generators
        sample better than their last iterate); its batch-norm statistics are
        then measured anew on its own samples (:func:`refresh_batch_norm`).
        ``None`` keeps the last weights.
    """

    supports_distributed = True

    def __init__(
        self,
        generator: ImageGenerator,
        critic: Optional[nn.Module] = None,
        *,
        lr: float = 2e-4,
        betas: Tuple[float, float] = (0.5, 0.9),
        critic_steps: int = 5,
        gp_weight: float = 10.0,
        penalty_share: float = 1.0,
        ema_decay: Optional[float] = None,
    ):
        if critic_steps < 1:
            raise ValueError(f"critic_steps must be >= 1, got {critic_steps}")
        if not 0.0 < penalty_share <= 1.0:
            raise ValueError(f"penalty_share must lie in (0, 1], got {penalty_share}")
        self.generator = generator
        self.critic = critic or ConvCritic(
            generator.output_shape, num_classes=generator.num_classes
        ).to(generator.device)
        self.critic_steps = critic_steps
        self.gp_weight = gp_weight
        self.penalty_share = penalty_share
        self.generator_optimizer = torch.optim.Adam(
            generator.parameters(), lr=lr, betas=betas
        )
        self.critic_optimizer = torch.optim.Adam(
            self.critic.parameters(), lr=lr, betas=betas
        )
        self.steps = 0
        self.average = ExperienceAverage(generator, ema_decay)
        # a conditional generator's batch-norm statistics are measured anew
        # on the classes it learned
        self.learned_classes: set = set()

    def start_experience(self, experience_index: int) -> None:
        self.average.start()

    def end_experience(self, experience_index: int) -> None:
        if self.average.finish():
            refresh_batch_norm(
                self.generator, classes=sorted(self.learned_classes) or None
            )

    def modules(self) -> Dict[str, nn.Module]:
        return {"critic": self.critic}

    def optimizers(self) -> List[torch.optim.Optimizer]:
        return [self.generator_optimizer, self.critic_optimizer]

    def train_step(self, x: Tensor, y: Optional[Tensor] = None) -> Dict[str, float]:
        generator, critic = self.generator, self.critic
        condition = y if generator.is_conditional else None
        if condition is not None and self.average.decay is not None:
            self.learned_classes.update(condition.unique().tolist())
        generator.train()
        critic.train()
        real = generator.to_unit_range(x)
        with torch.no_grad():
            fake = generator.decode(generator.sample_noise(x.shape[0]), condition)
        wasserstein = critic(real, condition).mean() - critic(fake, condition).mean()
        penalty = gradient_penalty(
            critic, real, fake, condition, share=self.penalty_share
        )
        critic_loss = -wasserstein + self.gp_weight * penalty
        self.critic_optimizer.zero_grad()
        critic_loss.backward()
        average_gradients(self.critic_optimizer)
        self.critic_optimizer.step()

        losses = {
            "critic": critic_loss.item(),
            "wasserstein": wasserstein.item(),
            "gp": penalty.item(),
        }
        self.steps += 1
        if self.steps % self.critic_steps == 0:
            fake = generator.decode(generator.sample_noise(x.shape[0]), condition)
            generator_loss = -critic(fake, condition).mean()
            self.generator_optimizer.zero_grad()
            generator_loss.backward()
            average_gradients(self.generator_optimizer)
            self.generator_optimizer.step()
            self.average.update()
            losses["generator"] = generator_loss.item()
        return losses

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.state_dict(),
            "critic": self.critic.state_dict(),
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "steps": self.steps,
            "average": self.average.state_dict(),
            "learned_classes": sorted(self.learned_classes),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.critic.load_state_dict(state["critic"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.steps = state["steps"]
        self.average.load_state_dict(state.get("average"))
        self.learned_classes = set(state.get("learned_classes", []))
