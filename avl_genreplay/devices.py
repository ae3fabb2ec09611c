"""Checking a requested torch device before any work starts."""

from typing import Union

import torch

__all__ = ["check_device"]


def check_device(device: Union[str, torch.device]) -> torch.device:
    """The device, or ``ValueError`` if it is malformed or absent here
    (rather than an obscure failure at the first tensor moved to it)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"bad device {str(device)!r}: {error}") from None
    if device.type == "cuda" and (
        not torch.cuda.is_available()
        or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise ValueError(f"device {str(device)!r} does not exist on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} does not exist on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {str(device)!r}")
    return device
