"""How the C library's allocator treats the memory torch frees on the CPU.

Torch allocates a CPU tensor with ``malloc`` and frees it as soon as it is
dropped. By default glibc serves large blocks (from 128 KiB, rising with use
to at most 32 MiB) with ``mmap`` and gives them back to the kernel when freed,
and returns the free top of its heap too (``trim``). A training step that
frees and allocates the same activations again then has the kernel hand out
and zero the same pages at every step: a DDGR UNet step on MNIST at batch 128
took about 31,000 minor page faults, some 20 % of its CPU time on one thread;
whole benchmark runs, whose steps allocate less at a time, gained 1-2 %
(benchmarks/README.md, "Freed memory kept for reuse"). Keeping the freed
memory in the process removes the faults and changes no value computed.
"""

import ctypes
import platform
import sys

__all__ = ["keep_freed_memory", "keeps_freed_memory"]

# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# the most glibc takes for M_MMAP_THRESHOLD before 2.26-ish (HEAP_MAX / 2)
_OLD_MMAP_LIMIT = 32 * 2**20
_INT_MAX = 2**31 - 1

# whether this process has made the change (the allocator's state is the
# process's, so this is too)
_kept = False


def keep_freed_memory(*, mmap_threshold: int = 2**30) -> bool:
    """Makes glibc's ``malloc`` keep the memory the process frees for reuse:
    blocks up to ``mmap_threshold`` bytes come from its heap, and the heap's
    free top is returned to the kernel only beyond 2 GiB.

    A speed setting for CPU training, the same figures either way. The
    process keeps the memory it has used at its peak instead of returning
    it between steps. The benchmark harness sets it in every run's process.
    Does nothing (and returns ``False``) outside glibc, e.g. on macOS,
    Windows or musl.

    :param mmap_threshold: blocks at least this large are still mapped and
        unmapped one by one; 1 GiB by default.
    :return: whether the allocator now keeps freed memory.
    """
    global _kept
    if mmap_threshold < 1:
        raise ValueError(f"mmap_threshold must be >= 1, got {mmap_threshold}")
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    threshold = min(mmap_threshold, _INT_MAX)
    # older glibc refuses thresholds above 32 MiB
    if not mallopt(_M_MMAP_THRESHOLD, threshold) and not mallopt(
        _M_MMAP_THRESHOLD, min(threshold, _OLD_MMAP_LIMIT)
    ):
        return False
    # both settings are needed: either one alone turns glibc's adaptive
    # thresholds off and leaves the other at 128 KiB
    _kept = bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    return _kept


def keeps_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` took effect in this process."""
    return _kept
