import subprocess
import sys

import pytest

from avl_genreplay.allocator import keep_freed_memory, keeps_freed_memory

# frees and allocates again a 40 MiB block (above the 32 MiB up to which
# glibc's adaptive threshold keeps blocks in its heap) and an 8 MiB one, as
# a training step frees and allocates its activations; prints the minor page
# faults per step
_STEPS = """
import resource, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def steps(count):
    before = faults()
    for _ in range(count):
        big, small = torch.ones(10 * 2**20), torch.ones(2 * 2**20)
        del big, small
    return (faults() - before) / count
steps(3)
print(steps(10))
"""
_PAGES = 48 * 2**20 // 4096  # the two blocks' 4 KiB pages


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's allocator (Linux)"
)
def test_kept_memory_is_reused_without_page_faults():
    # by default every step maps the 40 MiB block anew (a fresh process)
    done = subprocess.run(
        [sys.executable, "-c", _STEPS], capture_output=True, text=True, check=True
    )
    assert float(done.stdout) > _PAGES / 2
    # this process (the harness sets it in its runs' processes too)
    assert keep_freed_memory()
    assert keeps_freed_memory()
    namespace = {}
    exec(_STEPS.replace("print(steps(10))", "kept = steps(10)"), namespace)
    assert namespace["kept"] < _PAGES / 100


def test_a_bad_threshold_is_refused():
    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_freed_memory(mmap_threshold=0)
