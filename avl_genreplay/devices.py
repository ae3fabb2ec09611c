"""Checking a requested torch device before any work starts, and what it
computes natively."""

import functools
from typing import Union

import torch

__all__ = ["check_device", "native_bfloat16"]


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


@functools.lru_cache(maxsize=None)
def _native_bfloat16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(
            including_emulation=False
        )
    if device_type == "cpu":
        # x86 CPUs with AVX512-BF16 or AMX; oneDNN emulates bfloat16 on other
        # AVX-512 CPUs, where it ran DDGR's UNet about twice as slowly as
        # float32 (benchmarks/README.md)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def native_bfloat16(device: Union[str, torch.device]) -> bool:
    """Whether ``device`` computes in bfloat16 in hardware (CUDA GPUs from
    Ampere on; x86 CPUs with AVX512-BF16 or AMX), where autocast to bfloat16
    pays; elsewhere it is emulated and may be slower than float32."""
    return _native_bfloat16(torch.device(device).type)
