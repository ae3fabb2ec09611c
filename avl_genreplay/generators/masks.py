"""Hard attention to the task (Serra et al., 2018), the machinery of DGM's
plastic generator (Ostapenko et al., 2019).

A :class:`TaskMask` holds, for one tensor (a layer's units, or its weights),
a real-valued embedding for the task being learned and the binary masks of the
tasks learned before. The current task's mask is ``sigmoid(s * embedding)``
with a scale ``s`` annealed during training (:func:`annealed_scale`), and
``embedding > 0`` (binary) at inference and once the task is over. What the
past masks cover is *reserved*: the gradients of the parameters behind it are
blocked, so past tasks keep their outputs.

A :class:`GrowableLayer` is a linear or transposed-convolution layer whose
weights are kept as ``(out_units, in_units, ...)``, so it can gain output or
input units (dynamic expansion) without touching the existing ones.
"""

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TaskMask",
    "GrowableLayer",
    "annealed_scale",
]


def annealed_scale(step: int, total: int, s_max: float) -> float:
    """The mask scale ``s`` at a training step: from ``1 / s_max`` at the
    first step to ``s_max`` at step ``total - 1`` (and after), geometrically.

    HAT anneals ``s`` linearly within each epoch; with one anneal per
    experience and Adam, a linear schedule reaches ``s >> 1`` within a few
    steps, which freezes the masks almost at their random start. The
    geometric schedule keeps the masks soft (``s <= 1``) for the first half of
    the steps and binarises them over the second.
    """
    if s_max < 1:
        raise ValueError(f"s_max must be >= 1, got {s_max}")
    if total <= 1:
        return float(s_max)
    progress = min(max(step, 0) / (total - 1), 1.0)
    return float(s_max ** (2 * progress - 1))


class TaskMask(nn.Module):
    """Task masks of one tensor: an embedding for the current task, and the
    binary masks of the past tasks (a boolean buffer ``(tasks, *shape)``).

    :param shape: the shape of the masked tensor (e.g. ``(units,)`` for a
        layer's activations, a weight's shape for its weights).
    """

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        self.embedding = nn.Parameter(torch.randn(shape))
        self.register_buffer("past", torch.zeros((0, *shape), dtype=torch.bool))

    @property
    def shape(self) -> tuple:
        return tuple(self.embedding.shape)

    @property
    def num_tasks(self) -> int:
        """Tasks learned (whose masks are final)."""
        return self.past.shape[0]

    def reserved(self) -> Tensor:
        """Boolean tensor of the entries some past task uses."""
        if self.num_tasks == 0:
            return torch.zeros(self.shape, dtype=torch.bool, device=self.past.device)
        return self.past.any(dim=0)

    def binary(self) -> Tensor:
        """The current task's mask at inference: ``embedding > 0``."""
        return (self.embedding > 0).to(self.embedding.dtype)

    def soft(self, scale: float) -> Tensor:
        """The current task's mask during training: ``sigmoid(s * e)``."""
        return torch.sigmoid(scale * self.embedding)

    def mask(self, task: int, scale: Optional[float] = None) -> Tensor:
        """The mask of a task: binary for a past task, and for the current
        one without ``scale``; soft for the current one with a ``scale``."""
        if 0 <= task < self.num_tasks:
            return self.past[task].to(self.embedding.dtype)
        if task != self.num_tasks:
            raise ValueError(
                f"no mask for task {task}: {self.num_tasks} tasks learned, "
                f"task {self.num_tasks} being learned"
            )
        return self.binary() if scale is None else self.soft(scale)

    @torch.no_grad()
    def commit(self) -> Tensor:
        """Ends the current task: its binary mask joins the past ones.

        :return: the entries this task reserved that no earlier task had.
        """
        before = self.reserved()
        current = self.embedding > 0
        self.past = torch.cat([self.past, current.unsqueeze(0)])
        return current & ~before

    @torch.no_grad()
    def reset(self) -> None:
        """A fresh embedding, ``N(0, 1)`` as in HAT, for a new task."""
        self.embedding.normal_()

    @torch.no_grad()
    def grow(self, dim: int, n: int) -> None:
        """Adds ``n`` entries along ``dim``: past tasks do not use them (their
        masks are 0 there), the current task starts from a fresh embedding."""
        if n <= 0:
            return
        shape = list(self.shape)
        shape[dim] = n
        extra = torch.randn(shape, device=self.embedding.device)
        self.embedding = nn.Parameter(torch.cat([self.embedding.detach(), extra], dim))
        past_extra = torch.zeros(
            (self.num_tasks, *shape), dtype=torch.bool, device=self.past.device
        )
        self.past = torch.cat([self.past, past_extra], dim + 1)

    @torch.no_grad()
    def compensate_gradient(
        self, scale: float, s_max: float, cosh_limit: float = 50.0
    ) -> None:
        """HAT's gradient compensation: rescales the embedding's gradient so
        that it does not vanish as ``s`` grows (it becomes that of
        ``sigmoid(e)``, times ``s_max``)."""
        grad = self.embedding.grad
        if grad is None:
            return
        e = self.embedding
        num = torch.cosh(torch.clamp(scale * e, -cosh_limit, cosh_limit)) + 1
        den = torch.cosh(e) + 1
        grad.mul_(s_max / scale * num / den)

    @torch.no_grad()
    def clamp_(self, limit: float = 6.0) -> None:
        """Keeps the embedding in ``[-limit, limit]`` (HAT)."""
        self.embedding.clamp_(-limit, limit)


_KINDS = ("linear", "conv_transpose")


class GrowableLayer(nn.Module):
    """A linear or stride-2 transposed-convolution layer that can grow.

    Weights are kept as ``(out_units, in_units, *rest)`` and biases as
    ``(out_units, *rest_of_bias)``: a ``"linear"`` layer maps ``in_units``
    features to ``out_units`` feature maps of ``spatial`` size (``rest`` is
    the spatial size), a ``"conv_transpose"`` layer maps ``in_units`` channels
    to ``out_units`` channels with a ``kernel x kernel`` kernel, stride 2.

    :param kind: ``"linear"`` or ``"conv_transpose"``.
    :param in_units: input features (linear) or channels.
    :param out_units: output feature maps or channels.
    :param spatial: ``(height, width)`` of a linear layer's output maps.
    :param kernel: kernel size of a transposed convolution.
    """

    def __init__(
        self,
        kind: str,
        in_units: int,
        out_units: int,
        spatial: Sequence[int] = (1, 1),
        kernel: int = 4,
    ):
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        self.kind = kind
        self.spatial = tuple(int(s) for s in spatial)
        if kind == "linear":
            self.rest = (self.spatial[0] * self.spatial[1],)
            self.bias_rest = self.rest
            self.fan_per_unit = 1
        else:
            self.rest = (kernel, kernel)
            self.bias_rest = ()
            self.fan_per_unit = kernel * kernel
        self.weight = nn.Parameter(self._init(out_units, in_units, in_units))
        self.bias = nn.Parameter(self._init_bias(out_units, in_units))

    @property
    def in_units(self) -> int:
        return self.weight.shape[1]

    @property
    def out_units(self) -> int:
        return self.weight.shape[0]

    def _bound(self, fan_in_units: int) -> float:
        return 1.0 / math.sqrt(fan_in_units * self.fan_per_unit)

    def _init(self, out_units: int, in_units: int, fan_in_units: int) -> Tensor:
        bound = self._bound(fan_in_units)
        weight = torch.empty(out_units, in_units, *self.rest)
        return weight.uniform_(-bound, bound)

    def _init_bias(self, out_units: int, fan_in_units: int) -> Tensor:
        bound = self._bound(fan_in_units)
        return torch.empty(out_units, *self.bias_rest).uniform_(-bound, bound)

    def forward(
        self,
        x: Tensor,
        weight_mask: Optional[Tensor] = None,
        bias_mask: Optional[Tensor] = None,
        *,
        in_index: Optional[Tensor] = None,
        out_index: Optional[Tensor] = None,
    ) -> Tensor:
        """The layer's output for ``x``.

        :param x: the input, ``(batch, in_units, ...)`` or, with ``in_index``,
            only those input units.
        :param weight_mask: multiplies the weights (``None``: all ones).
        :param bias_mask: multiplies the biases (``None``: all ones).
        :param in_index: the input units ``x`` holds; the others are taken
            to be zero (``None``: all of them).
        :param out_index: the output units to compute (``None``: all).
        """
        weight, bias = self.weight, self.bias
        if weight_mask is not None:
            weight = weight * weight_mask
        if bias_mask is not None:
            bias = bias * bias_mask
        if in_index is not None:
            weight = weight[:, in_index]
        if out_index is not None:
            weight, bias = weight[out_index], bias[out_index]
        if self.kind == "linear":
            # (out, in, hw) -> (out * hw, in), the features in (out, h, w) order
            flat = weight.permute(0, 2, 1).reshape(-1, weight.shape[1])
            out = F.linear(x, flat, bias.reshape(-1))
            return out.view(-1, weight.shape[0], *self.spatial)
        weight = weight.transpose(0, 1)
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            # oneDNN's channels-last kernel gives the same values about twice
            # as fast on a CPU (replay, the critic's fakes); not its
            # gradients, which would round differently
            x = x.contiguous(memory_format=torch.channels_last)
            weight = weight.contiguous(memory_format=torch.channels_last)
        return F.conv_transpose2d(x, weight, bias, stride=2, padding=1)

    @torch.no_grad()
    def grow_out(self, n: int) -> None:
        """Adds ``n`` output units, initialised like the existing ones."""
        if n <= 0:
            return
        device = self.weight.device
        extra = self._init(n, self.in_units, self.in_units).to(device)
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), extra]))
        extra_bias = self._init_bias(n, self.in_units).to(device)
        self.bias = nn.Parameter(torch.cat([self.bias.detach(), extra_bias]))

    @torch.no_grad()
    def grow_in(self, n: int) -> None:
        """Adds ``n`` input units (new columns of the weight)."""
        if n <= 0:
            return
        extra = self._init(self.out_units, n, self.in_units + n)
        extra = extra.to(self.weight.device)
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), extra], dim=1))
