"""A denoising diffusion model (DDPM, Ho et al., 2020): DDGR's generator and its
training step.

The noise schedules and samplers are ``diffusers``' (``DDPMScheduler`` for
training and ancestral sampling, ``DDIMScheduler`` for fast deterministic
sampling); the network is a small UNet written here, because ``diffusers``'
``UNet2DModel`` at its smallest sensible size trains about four times slower
on a CPU than this one.

Sampling can be guided by a classifier (Dhariwal & Nichol, 2021, as used by
DDGR): each denoising step shifts the model's noise estimate along the
gradient of the classifier's ``log p(y | x)``. ``guide_on="xt"`` is the
paper's choice: the classifier sees the noisy ``x_t``. A classifier trained
on clean data only, such as the previous solver, is unreliable there, so the
default ``guide_on="x0"`` asks it about the model's prediction of the clean
image instead and moves that prediction by ``scale`` times the gradient at
every step.
"""

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from avl_genreplay.devices import native_bfloat16
from avl_genreplay.distributed import average_gradients, union
from avl_genreplay.generators.base import (
    GeneratorTrainer,
    ImageGenerator,
    ExperienceAverage,
    check_ema_decay,
)
from avl_genreplay.replay import frozen_copy

__all__ = [
    "SmallUNet",
    "DiffusionGenerator",
    "DDPMTrainer",
    "GuidanceFunction",
]

# log p(y | x) per sample, for images x in the data's range
GuidanceFunction = Callable[[Tensor, Tensor], Tensor]

_SAMPLERS = ("ddim", "ddpm")
_GUIDE_ON = ("x0", "xt")
_PREDICTIONS = ("epsilon", "sample", "v_prediction")
_PRECISIONS = ("float32", "bfloat16", "auto")


def _timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al., 2017)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device).float() / half
    )
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class _ResBlock(nn.Module):
    """Two 3x3 convolutions with the time (and class) embedding added between."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embed = nn.Linear(embed_dim, out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.embed(embedding)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class SmallUNet(nn.Module):
    """A two-level UNet predicting the noise in ``x_t``.

    Resolutions ``H``, ``H/2``, ``H/4`` (rounded up, so any image size works);
    ``base_channels`` at the top, twice as many below.

    :param channels: image channels.
    :param base_channels: feature maps at full resolution.
    :param num_classes: adds a learned class embedding to the time embedding
        (a class-conditional model); ``None`` for an unconditional one.
    :param embed_dim: size of the time (and class) embedding.
    """

    def __init__(
        self,
        channels: int,
        base_channels: int = 32,
        num_classes: Optional[int] = None,
        embed_dim: int = 64,
    ):
        super().__init__()
        c1, c2 = base_channels, 2 * base_channels
        self.embed_dim = embed_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(embed_dim, 2 * embed_dim),
            nn.SiLU(),
            nn.Linear(2 * embed_dim, embed_dim),
        )
        self.class_embedding = (
            nn.Embedding(num_classes, embed_dim) if num_classes is not None else None
        )
        self.stem = nn.Conv2d(channels, c1, 3, padding=1)
        self.down1 = _ResBlock(c1, c1, embed_dim)
        self.pool1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down2 = _ResBlock(c2, c2, embed_dim)
        self.pool2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.middle = _ResBlock(c2, c2, embed_dim)
        self.up2 = _ResBlock(2 * c2, c2, embed_dim)
        self.up1 = _ResBlock(c2 + c1, c1, embed_dim)
        self.head = nn.Sequential(
            nn.GroupNorm(_groups(c1), c1), nn.SiLU(), nn.Conv2d(c1, channels, 3, 1, 1)
        )

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        embedding = self.time_mlp(_timestep_embedding(t, self.embed_dim))
        if self.class_embedding is not None:
            if y is None:
                raise ValueError("this UNet is class-conditional: pass labels")
            embedding = embedding + self.class_embedding(y)
        h1 = self.down1(self.stem(x), embedding)
        h2 = self.down2(self.pool1(h1), embedding)
        h = self.middle(self.pool2(h2), embedding)
        h = F.interpolate(h, size=h2.shape[-2:], mode="nearest")
        h = self.up2(torch.cat([h, h2], dim=1), embedding)
        h = F.interpolate(h, size=h1.shape[-2:], mode="nearest")
        h = self.up1(torch.cat([h, h1], dim=1), embedding)
        return self.head(h)


class DiffusionGenerator(ImageGenerator):
    """A DDPM image generator, optionally class-conditional and
    classifier-guided.

    :meth:`generate` samples with the configured sampler and no guidance;
    :meth:`sample` takes a classifier to guide with, a seed and a progress bar.
    The "noise" of :meth:`decode` is the starting image ``x_T``.

    :param output_shape: ``(channels, height, width)`` of the data.
    :param num_classes: number of classes of a class-conditional model;
        ``None`` for an unconditional one (classifier guidance alone then
        picks the class).
    :param base_channels: the UNet's feature maps at full resolution.
    :param train_timesteps: ``T``, the diffusion length.
    :param beta_schedule: a ``diffusers`` beta schedule; ``"squaredcos_cap_v2"``
        is the cosine schedule (Nichol & Dhariwal, 2021) of DDGR's code.
    :param sampler: ``"ddim"`` (deterministic, few steps) or ``"ddpm"``
        (ancestral).
    :param sampling_steps: denoising steps when sampling (re-spaced over
        ``T``).
    :param sample_mb_size: images denoised at once, a speed setting: with the
        DDIM sampler the images are the same for any value, up to float
        rounding (DDGR's MNIST pools came out identical), where an image
        holds a multiple of 16 values, as MNIST's and CIFAR's do (torch draws
        normal noise in blocks of 16); DDPM draws each step's noise chunk by
        chunk. On one CPU thread 64 (the default) denoised DDGR's 16-channel
        MNIST UNet about 1.8 times as fast as 256, whose activations no
        longer fit the cache; a GPU wants more.
    :param data_range: fixed ``(low, high)`` data range, ``None`` to calibrate.
    :param prediction_type: what the UNet predicts: ``"epsilon"`` (the noise,
        DDPM's choice), ``"sample"`` (the clean image) or ``"v_prediction"``
        (Salimans & Ho, 2022). Samplers and guidance always work on the noise
        estimate derived from it (:meth:`predict_noise`).
    :param precision: ``"float32"``, or ``"bfloat16"`` to run the UNet under
        :func:`torch.autocast` (weights, losses and the samplers stay in
        float32). Pays where the hardware computes in bfloat16 (recent GPUs;
        CPUs with AVX512-BF16 or AMX); elsewhere it may be slower (about
        twice, on an AVX-512 CPU without them). ``"auto"``: bfloat16 where
        the model's device computes it natively
        (:func:`~avl_genreplay.devices.native_bfloat16`), float32 elsewhere.
        The samples change with it (rounding), so runs are comparable only at
        the same precision.
    :param sampling_precision: the UNet's arithmetic while sampling
        (:meth:`sample`, :meth:`generate`), as ``precision``; ``None`` for
        ``precision``. ``precision="bfloat16"`` with ``sampling_precision=
        "float32"`` trains in bfloat16 and samples in float32 (on SplitMNIST,
        DDGR kept its accuracy so, and lost about a third of a point sampling
        in bfloat16 too: benchmarks/README.md).
    """

    def __init__(
        self,
        output_shape: Sequence[int],
        num_classes: Optional[int] = None,
        *,
        base_channels: int = 32,
        train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        sampler: str = "ddim",
        sampling_steps: int = 20,
        sample_mb_size: int = 64,
        data_range: Optional[Tuple[float, float]] = None,
        prediction_type: str = "epsilon",
        precision: str = "float32",
        sampling_precision: Optional[str] = None,
    ):
        shape = tuple(int(s) for s in output_shape)
        super().__init__(shape, math.prod(shape), num_classes, data_range)
        if sampler not in _SAMPLERS:
            raise ValueError(f"sampler must be one of {_SAMPLERS}, got {sampler!r}")
        if not 1 <= sampling_steps <= train_timesteps:
            raise ValueError(
                f"sampling_steps must lie in [1, {train_timesteps}], got "
                f"{sampling_steps}"
            )
        if sample_mb_size < 1:
            raise ValueError(f"sample_mb_size must be >= 1, got {sample_mb_size}")
        if prediction_type not in _PREDICTIONS:
            raise ValueError(
                f"prediction_type must be one of {_PREDICTIONS}, got "
                f"{prediction_type!r}"
            )
        if precision not in _PRECISIONS:
            raise ValueError(
                f"precision must be one of {_PRECISIONS}, got {precision!r}"
            )
        if sampling_precision is not None and sampling_precision not in _PRECISIONS:
            raise ValueError(
                f"sampling_precision must be None or one of {_PRECISIONS}, "
                f"got {sampling_precision!r}"
            )
        self.prediction_type = prediction_type
        self.precision = precision
        self.sampling_precision = sampling_precision
        # True while sampling: the UNet then runs at sampling_precision
        self._sampling = False
        self.unet = SmallUNet(shape[0], base_channels, num_classes)
        self.train_timesteps = train_timesteps
        self.beta_schedule = beta_schedule
        self.sampler = sampler
        self.sampling_steps = sampling_steps
        self.sample_mb_size = sample_mb_size
        self.training_schedule = self._scheduler("ddpm")

    def _scheduler(self, kind: str):
        # imported here: diffusers takes seconds to import, and only the
        # diffusion model needs it
        from diffusers import DDIMScheduler, DDPMScheduler

        scheduler = DDIMScheduler if kind == "ddim" else DDPMScheduler
        return scheduler(
            num_train_timesteps=self.train_timesteps,
            beta_schedule=self.beta_schedule,
            clip_sample=True,
            prediction_type="epsilon",
        )

    def sample_noise(self, batch_size: int) -> Tensor:
        return torch.randn(batch_size, *self.output_shape, device=self.device)

    def predict(
        self, noisy: Tensor, t: Tensor, condition: Optional[Tensor] = None
    ) -> Tensor:
        """The UNet's raw output for ``noisy`` (unit range) at ``t``: noise,
        clean image or velocity, by ``prediction_type``."""
        condition = condition if self.is_conditional else None
        if self.compute_precision() == "float32":
            return self.unet(noisy, t, condition)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            output = self.unet(noisy, t, condition)
        # losses, samplers and guidance in float32
        return output.float()

    def compute_precision(self) -> str:
        """The UNet's arithmetic now, ``"float32"`` or ``"bfloat16"``: the
        sampling precision while sampling, ``"auto"`` resolved for the model's
        device."""
        precision = self.precision
        if self._sampling and self.sampling_precision is not None:
            precision = self.sampling_precision
        if precision == "auto":
            return "bfloat16" if native_bfloat16(self.device) else "float32"
        return precision

    def alpha_bar(self, t: Tensor, like: Optional[Tensor] = None) -> Tensor:
        """``alpha_bar_t`` per sample; shaped (and typed) to broadcast over
        ``like`` if given."""
        alphas = self.training_schedule.alphas_cumprod.to(t.device)[t]
        if like is None:
            return alphas
        return alphas.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def predict_noise(
        self, noisy: Tensor, t: Tensor, condition: Optional[Tensor] = None
    ) -> Tensor:
        """The model's estimate of the noise in ``noisy`` (unit range) at
        ``t``, whatever the UNet predicts."""
        output = self.predict(noisy, t, condition)
        if self.prediction_type == "epsilon":
            return output
        alpha_bar = self.alpha_bar(t, noisy)
        if self.prediction_type == "sample":
            return (noisy - alpha_bar.sqrt() * output) / (1 - alpha_bar).sqrt()
        # v = sqrt(a) eps - sqrt(1 - a) x0 and x_t = sqrt(a) x0 + sqrt(1 - a) eps
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * noisy

    def training_target(self, clean: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the UNet should output for ``x_t`` made of ``clean`` and
        ``noise``."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return clean
        alpha_bar = self.alpha_bar(t, clean)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * clean

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` at ``t``."""
        alpha_bar = self.alpha_bar(t)
        return alpha_bar / (1 - alpha_bar)

    def add_noise(self, clean: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t`` for clean images in the unit range (the forward process)."""
        return self.training_schedule.add_noise(clean, noise, t)

    def decode(self, noise: Tensor, condition: Optional[Tensor] = None) -> Tensor:
        return self._denoise(noise, condition, None, 0.0, "x0", None)

    def sample(
        self,
        batch_size: int,
        condition: Optional[Tensor] = None,
        *,
        guidance: Optional[GuidanceFunction] = None,
        guidance_scale: float = 1.0,
        guide_on: str = "x0",
        seed: Optional[int] = None,
        progress_bar: bool = False,
    ) -> Tensor:
        """Samples ``batch_size`` images in the data's range, in chunks of
        ``sample_mb_size``.

        :param condition: class labels, one per sample (required by a
            class-conditional model; the classes guidance aims at).
        :param guidance: ``log p(y | x)`` per sample for images in the data's
            range and labels ``condition``; ``None`` for no guidance.
        :param guidance_scale: the guidance's weight (0 turns it off).
        :param guide_on: ``"x0"`` (the predicted clean image) or ``"xt"``.
        :param seed: seeds the starting noise (and DDPM's noise) for
            reproducible samples; ``None`` uses torch's global generator.
        :param progress_bar: show a bar over the chunks.
        """
        if guide_on not in _GUIDE_ON:
            raise ValueError(f"guide_on must be one of {_GUIDE_ON}, got {guide_on!r}")
        if guidance is not None and condition is None:
            raise ValueError("classifier guidance needs the classes (condition)")
        if condition is not None:
            condition = torch.as_tensor(condition, device=self.device).long()
        if self.is_conditional or condition is not None and guidance is None:
            self.check_condition(condition, batch_size)
        rng = None
        if seed is not None:
            rng = torch.Generator(device=self.device).manual_seed(seed)
        chunks: List[Tensor] = []
        starts = range(0, batch_size, self.sample_mb_size)
        for start in tqdm(starts, desc="sampling", disable=not progress_bar):
            size = min(self.sample_mb_size, batch_size - start)
            noise = torch.randn(
                size, *self.output_shape, device=self.device, generator=rng
            )
            part = None if condition is None else condition[start : start + size]
            unit = self._denoise(noise, part, guidance, guidance_scale, guide_on, rng)
            chunks.append(self.to_data_range(unit))
        if not chunks:
            return torch.zeros(0, *self.output_shape, device=self.device)
        return torch.cat(chunks)

    def _denoise(
        self,
        x: Tensor,
        condition: Optional[Tensor],
        guidance: Optional[GuidanceFunction],
        guidance_scale: float,
        guide_on: str,
        rng: Optional[torch.Generator],
    ) -> Tensor:
        """Runs the reverse process from ``x_T`` (unit range) to ``x_0``."""
        scheduler = self._scheduler(self.sampler)
        scheduler.set_timesteps(self.sampling_steps)
        alphas = scheduler.alphas_cumprod.to(x.device)
        guided = guidance is not None and guidance_scale != 0
        self._sampling = True  # the UNet at sampling_precision
        try:
            for t in scheduler.timesteps:
                steps = torch.full((len(x),), int(t), device=x.device, dtype=torch.long)
                with torch.no_grad():
                    eps = self.predict_noise(x, steps, condition)
                if guided:
                    grad = self._guidance_gradient(
                        x, eps, alphas[t], condition, guidance, guide_on
                    )
                    eps = eps - self._guidance_weight(alphas[t], guide_on) * (
                        guidance_scale * grad
                    )
                kwargs = {} if self.sampler == "ddim" else {"generator": rng}
                x = scheduler.step(eps, t, x, **kwargs).prev_sample
        finally:
            self._sampling = False
        return x.clamp(-1, 1)

    @staticmethod
    def _guidance_weight(alpha_bar: Tensor, guide_on: str) -> Tensor:
        """How much of the classifier's gradient enters the noise estimate.

        On ``x_t``: ``sqrt(1 - alpha_bar)``, the score shift of Dhariwal &
        Nichol (2021, eq. 14), which also serves DDIM. On ``x_0``: the weight
        that moves the predicted clean image by ``scale * grad`` at every
        step, ``sqrt(alpha_bar / (1 - alpha_bar))``; the score-shift weight
        would, through ``x_0 = (x_t - sqrt(1 - alpha_bar) eps) /
        sqrt(alpha_bar)``, move it by ``(1 - alpha_bar) / alpha_bar`` times the
        gradient, thousands of times too far at the noisiest steps.
        """
        if guide_on == "x0":
            return (alpha_bar / (1 - alpha_bar)).sqrt()
        return (1 - alpha_bar).sqrt()

    def _guidance_gradient(self, x, eps, alpha_bar, condition, guidance, guide_on):
        """The gradient of ``log p(y | .)`` at ``x_t`` or at the predicted
        clean image."""
        with torch.no_grad():
            if guide_on == "x0":
                x = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        with torch.enable_grad():
            # not clamped to [-1, 1]: a clamp would zero the gradient wherever
            # an early, rough prediction leaves the image range
            images = x.detach().requires_grad_(True)
            log_p = guidance(self.to_data_range(images), condition).sum()
            (grad,) = torch.autograd.grad(log_p, images)
        return grad


class DDPMTrainer(GeneratorTrainer):
    """DDPM's training step: predict the noise (or clean image, or velocity,
    by the generator's ``prediction_type``) at a random timestep (mean
    squared error), with Adam.

    :param generator: the diffusion generator.
    :param lr: learning rate.
    :param snr_gamma: Min-SNR loss weighting (Hang et al., 2023): each
        timestep's loss is weighed as if the model predicted the clean image
        with weight ``min(SNR, gamma)``, which keeps the nearly noise-free
        steps from dominating and speeds training; ``None`` for DDPM's plain
        mean. 5 is the paper's value.
    :param ema_decay: keep an exponential moving average of the weights during
        each experience and sample from it afterwards (the average is loaded
        into the generator at the end of the experience); ``None`` to use the
        last weights.
    :param distill_replay: for samples of classes learned in past
        experiences (the replay), the target is the prediction of the model
        as it was at the start of the experience, at the same noisy input,
        instead of the replayed image: the model is distilled from its
        predecessor on the replay, so old classes drift less from one
        experience to the next. Needs a class-conditional generator.
    """

    supports_distributed = True

    def __init__(
        self,
        generator: DiffusionGenerator,
        lr: float = 1e-3,
        *,
        snr_gamma: Optional[float] = None,
        ema_decay: Optional[float] = None,
        distill_replay: bool = False,
    ):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0, got {snr_gamma}")
        check_ema_decay(ema_decay)
        if distill_replay and not generator.is_conditional:
            raise ValueError(
                "distill_replay needs a class-conditional generator (the labels "
                "tell replay from new data)"
            )
        self.generator = generator
        self.optimizer = torch.optim.Adam(generator.parameters(), lr=lr)
        self.snr_gamma = snr_gamma
        self.ema_decay = ema_decay
        self.average = ExperienceAverage(generator.unet, ema_decay)
        self.distill_replay = distill_replay
        self.teacher: Optional[DiffusionGenerator] = None
        # with distill_replay: classes of finished experiences, and of the
        # one being learned
        self.learned_classes: List[int] = []
        self._classes_now: set = set()

    def start_experience(self, experience_index: int) -> None:
        self.average.start()
        if self.distill_replay and self.learned_classes:
            self.teacher = frozen_copy(self.generator)

    def end_experience(self, experience_index: int) -> None:
        self.average.finish()
        # every rank's batches: the classes must be the same on every rank
        learned = union(self._classes_now)
        self.learned_classes = sorted(set(self.learned_classes) | learned)
        self._classes_now = set()
        self.teacher = None

    def optimizers(self) -> List[torch.optim.Optimizer]:
        return [self.optimizer]

    def loss(
        self, x: Tensor, y: Optional[Tensor] = None, replayed: Optional[Tensor] = None
    ) -> Tensor:
        """The noise-prediction loss on a batch of images in the data's range;
        ``replayed`` marks the replay (see :meth:`train_step`)."""
        clean = self.generator.to_unit_range(x)
        noise = torch.randn_like(clean)
        t = torch.randint(
            0, self.generator.train_timesteps, (len(clean),), device=clean.device
        )
        noisy = self.generator.add_noise(clean, noise, t)
        predicted = self.generator.predict(noisy, t, y)
        target = self.generator.training_target(clean, noise, t)
        if self.teacher is not None and y is not None:
            if replayed is None:
                learned = torch.as_tensor(self.learned_classes).to(y)
                replayed = torch.isin(y, learned)
            if replayed.any():
                with torch.no_grad():
                    taught = self.teacher.predict(
                        noisy[replayed], t[replayed], y[replayed]
                    )
                target = target.clone()
                target[replayed] = taught
        if self.snr_gamma is None:
            return F.mse_loss(predicted, target)
        errors = (predicted - target).pow(2).flatten(1).mean(1)
        return (errors * self._snr_weight(t)).mean()

    def _snr_weight(self, t: Tensor) -> Tensor:
        """Min-SNR-gamma weights, for the generator's prediction type."""
        snr = self.generator.snr(t)
        clipped = snr.clamp(max=self.snr_gamma)
        if self.generator.prediction_type == "epsilon":
            return clipped / snr
        if self.generator.prediction_type == "sample":
            return clipped
        return clipped / (snr + 1)

    def train_step(
        self, x: Tensor, y: Optional[Tensor] = None, replayed: Optional[Tensor] = None
    ) -> Dict[str, float]:
        """One step on a batch.

        :param replayed: with ``distill_replay``, which samples of the batch
            are replay; ``None`` to tell them by their labels (classes of past
            experiences), which fails where experiences share classes
            (domain-incremental streams: every sample would be distilled).
        """
        self.generator.train()
        # only distillation needs to know which classes are replay
        if self.distill_replay and y is not None:
            self._classes_now.update(int(c) for c in y.unique())
        loss = self.loss(x, y, replayed)
        self.optimizer.zero_grad()
        loss.backward()
        average_gradients(self.optimizer)
        self.optimizer.step()
        self.average.update()
        return {"diffusion": loss.item()}

    def state_dict(self) -> dict:
        state = {
            "generator": self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        if self.average.current is not None:
            state["average"] = self.average.state_dict()
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        state["learned_classes"] = list(self.learned_classes)
        state["classes_now"] = sorted(self._classes_now)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.average.load_state_dict(state.get("average"))
        self.learned_classes = list(state.get("learned_classes", []))
        self._classes_now = set(state.get("classes_now", []))
        if "teacher" in state:
            self.teacher = frozen_copy(self.generator)
            self.teacher.load_state_dict(state["teacher"])
