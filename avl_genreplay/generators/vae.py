"""Avalanche's MLP VAE for data other than MNIST."""

from typing import Sequence, Tuple, Union

import torch
from avalanche.models import MlpVAE
from torchvision import transforms

__all__ = ["DataRangeMlpVAE"]


class DataRangeMlpVAE(MlpVAE):
    """Avalanche's ``MlpVAE`` whose decoder outputs the benchmark's value range.

    Avalanche's VAE decoder ends in a sigmoid followed by MNIST's
    normalisation (mean 0.1307, std 0.3081), so on data normalised otherwise
    (e.g. Fashion-MNIST's 0.2860 and 0.3530) it cannot produce the background
    value. This is the same VAE with the data's normalisation after the
    sigmoid instead; with MNIST's it is Avalanche's ``MlpVAE``.

    :param shape: shape of one input, e.g. ``(1, 28, 28)``.
    :param normalization: the data's per-channel ``(mean, std)``.
    :param nhid: latent units (Avalanche's ``GenerativeReplay`` uses 2).
    :param n_classes: outputs of the VAE's classification head.
    :param device: where the VAE samples.
    """

    def __init__(
        self,
        shape: Sequence[int],
        *,
        normalization: Tuple[Sequence[float], Sequence[float]],
        nhid: int = 2,
        n_classes: int = 10,
        device: Union[str, torch.device] = "cpu",
    ):
        super().__init__(tuple(shape), nhid=nhid, n_classes=n_classes, device=device)
        mean, std = normalization
        self.decoder.invTrans = transforms.Normalize(tuple(mean), tuple(std))
