"""Shared fixtures: the real-data root and small benchmarks that run in seconds."""

import os
import warnings
from pathlib import Path

import pytest
import torch

from avl_genreplay.bench.data import DATA_ROOT_ENV, make_benchmark, synthetic_benchmark

warnings.filterwarnings("ignore", category=UserWarning)

# Beside the project root on the development machines and in CI.
_DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# Two torch threads on the 2-core machines; one per process when pytest-xdist
# runs the tests in several processes (``-n 2``), which would otherwise ask for
# more threads than there are cores and slow every process down.
_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(_THREADS)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder holding MNIST and Fashion-MNIST; tests on real data skip
    (with the reason shown by ``-rs``) where it is absent."""
    # absolute: a relative $AVL_GENREPLAY_DATA (the READMEs' ../shared/data)
    # must still hold in tests that change the working directory
    root = Path(os.environ.get(DATA_ROOT_ENV) or _DEFAULT_ROOT).resolve()
    if not (root / "MNIST").is_dir():
        pytest.skip(f"real MNIST not found under {root}; set {DATA_ROOT_ENV}")
    return root


@pytest.fixture(scope="session")
def mnist(data_root):
    """Real SplitMNIST, class-incremental, 5 experiences of classes 0..9."""
    return make_benchmark("splitmnist", data_root=data_root)


@pytest.fixture
def tiny_stream():
    """A random 1x12x12 class-incremental stream: 3 experiences of 2 classes."""
    return synthetic_benchmark(
        input_shape=(1, 12, 12), num_classes=6, n_experiences=3, per_class=16
    )
