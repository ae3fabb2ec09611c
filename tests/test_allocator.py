import subprocess
import sys

import pytest

from avl_genreplay.allocator import keep_freed_memory

# frees and allocates again a 40 MiB block (above the 32 MiB up to which
# glibc's adaptive threshold keeps blocks in its heap) and an 8 MiB one, as
# a training step frees and allocates its activations; prints the minor page
# faults per step
_STEPS = """
import resource, sys, torch
from avl_genreplay.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    big, small = torch.ones(10 * 2**20), torch.ones(2 * 2**20)
    del big, small
before = faults()
for _ in range(10):
    big, small = torch.ones(10 * 2**20), torch.ones(2 * 2**20)
    del big, small
print((faults() - before) / 10)
"""


def _faults_per_step(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _STEPS, mode], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's allocator (Linux)"
)
def test_kept_memory_is_reused_without_page_faults():
    pages = 48 * 2**20 // 4096  # the two blocks' 4 KiB pages
    # by default every step maps the 40 MiB block anew
    assert _faults_per_step("default") > pages / 2
    assert _faults_per_step("keep") < pages / 100


def test_a_bad_threshold_is_refused():
    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_freed_memory(mmap_threshold=0)
