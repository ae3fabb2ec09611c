"""Benchmarks of the harness: Avalanche's Split* streams and PermutedMNIST,
offline-friendly.

The data root comes from a flag or the ``AVL_GENREPLAY_DATA`` environment
variable; with neither, Avalanche's default location (and download) is used.
A root that is given but does not hold the dataset is an error, raised before
any training, rather than a download attempt that fails later.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = [
    "BENCHMARKS",
    "SCENARIOS",
    "DATA_ROOT_ENV",
    "BenchmarkSpec",
    "DataRootError",
    "resolve_data_root",
    "check_data_root",
    "make_benchmark",
    "solver_outputs",
    "synthetic_benchmark",
    "subsample_experience",
]

DATA_ROOT_ENV = "AVL_GENREPLAY_DATA"
SCENARIOS = ("class", "task", "domain")


class DataRootError(ValueError):
    """A data root that does not hold the benchmark's dataset."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """What the harness needs to know of a benchmark."""

    name: str
    input_shape: Tuple[int, int, int]
    num_classes: int
    folder: str
    required_files: Tuple[str, ...]
    # Avalanche's per-channel input normalisation of the benchmark (mean, std)
    normalization: Tuple[Tuple[float, ...], Tuple[float, ...]]
    # the scenarios its streams can be run in, the default first
    scenarios: Tuple[str, ...] = SCENARIOS
    # whether the experiences split the classes between them (Split*), or
    # each holds every class (PermutedMNIST: one permutation of the pixels
    # per experience)
    splits_classes: bool = True


BENCHMARKS = {
    "splitmnist": BenchmarkSpec(
        "splitmnist",
        (1, 28, 28),
        10,
        "MNIST",
        ("raw/train-images-idx3-ubyte", "raw/t10k-images-idx3-ubyte"),
        ((0.1307,), (0.3081,)),
    ),
    "splitfmnist": BenchmarkSpec(
        "splitfmnist",
        (1, 28, 28),
        10,
        "FashionMNIST",
        ("raw/train-images-idx3-ubyte", "raw/t10k-images-idx3-ubyte"),
        ((0.2860,), (0.3530,)),
    ),
    "splitcifar100": BenchmarkSpec(
        "splitcifar100",
        (3, 32, 32),
        100,
        "cifar-100-python",
        ("train", "test"),
        ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    ),
    # domain-incremental only: with task labels a class-conditional
    # generator (DGM, DDGR) could not tell which permutation, so which task,
    # a sample of a class it draws belongs to
    "permutedmnist": BenchmarkSpec(
        "permutedmnist",
        (1, 28, 28),
        10,
        "MNIST",
        ("raw/train-images-idx3-ubyte", "raw/t10k-images-idx3-ubyte"),
        ((0.1307,), (0.3081,)),
        scenarios=("domain",),
        splits_classes=False,
    ),
}


def resolve_data_root(flag: Optional[str]) -> Optional[Path]:
    """The flag if given, else ``$AVL_GENREPLAY_DATA``, else ``None``."""
    root = flag or os.environ.get(DATA_ROOT_ENV) or None
    return Path(root).expanduser() if root else None


def check_data_root(spec: BenchmarkSpec, root: Optional[Path]) -> None:
    """Raises :class:`DataRootError` if ``root`` does not hold the dataset."""
    if root is None:
        return
    root = Path(root)
    if not root.is_dir():
        raise DataRootError(f"data root {root} is not a directory")
    folder = root / spec.folder
    missing = [
        name
        for name in spec.required_files
        if not (folder / name).exists() and not (folder / f"{name}.gz").exists()
    ]
    if missing:
        raise DataRootError(
            f"data root {root} does not hold {spec.name}'s data (missing "
            f"{', '.join(str(folder / m) for m in missing)}); point the data root "
            f"at a folder with {spec.folder}/ in it, or give none to let "
            f"Avalanche download it"
        )


def solver_outputs(
    name: str,
    *,
    scenario: str,
    n_experiences: int,
    first_experience_half: bool = False,
) -> int:
    """The outputs the solver needs: the benchmark's classes, except in a
    domain-incremental Split* stream, whose labels start from 0 in each
    experience: the most classes an experience holds (2 for SplitMNIST in 5
    experiences, 50 for SplitCIFAR100 with a first experience of half)."""
    spec = BENCHMARKS[name]
    if scenario != "domain" or not spec.splits_classes:
        return spec.num_classes
    if first_experience_half:
        return spec.num_classes // 2
    return spec.num_classes // n_experiences


def make_benchmark(
    name: str,
    *,
    scenario: str = "class",
    n_experiences: int = 5,
    data_root: Optional[Path] = None,
    seed: int = 0,
    first_experience_half: bool = False,
    preload: bool = True,
):
    """Builds one of Avalanche's Split* benchmarks with a fixed class order,
    or its PermutedMNIST (one random permutation of the pixels per
    experience, drawn from ``seed``; every experience holds the 10 classes).

    Domain-incremental Split* streams relabel each experience's classes from
    0 (``class_ids_from_zero_in_each_exp``), so all experiences share labels.

    :param first_experience_half: SplitCIFAR100 only: the first experience
        holds half the classes (the DDGR paper's protocol: 50, then 5 or 10
        per experience), the rest split over the other experiences.
    :param preload: SplitMNIST and SplitFMNIST only: their images are
        transformed once, as whole tensors, rather than one by one whenever
        they are read (the same values; see :func:`_preloaded_split`).
    """
    from avalanche.benchmarks.classic import (
        PermutedMNIST,
        SplitCIFAR100,
        SplitFMNIST,
        SplitMNIST,
    )

    if name not in BENCHMARKS:
        raise ValueError(
            f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}"
        )
    spec = BENCHMARKS[name]
    if scenario not in spec.scenarios:
        raise ValueError(
            f"{name} has no {scenario!r} scenario; choose from {spec.scenarios}"
        )
    if first_experience_half and name != "splitcifar100":
        raise ValueError("a first experience of half the classes is for splitcifar100")
    data_root = Path(data_root) if data_root is not None else None
    check_data_root(spec, data_root)
    if name == "permutedmnist":
        return PermutedMNIST(n_experiences, seed=seed, dataset_root=data_root)
    kwargs = dict(
        n_experiences=n_experiences,
        fixed_class_order=list(range(spec.num_classes)),
        seed=seed,
        class_ids_from_zero_in_each_exp=scenario == "domain",
        dataset_root=data_root,
        return_task_id=scenario == "task",
    )
    if name in ("splitmnist", "splitfmnist") and preload:
        return _preloaded_split(spec, **kwargs)
    if name == "splitmnist":
        return SplitMNIST(**kwargs)
    if name == "splitfmnist":
        return SplitFMNIST(**kwargs)
    return SplitCIFAR100(first_exp_with_half_classes=first_experience_half, **kwargs)


def _preloaded_split(spec: BenchmarkSpec, *, dataset_root, return_task_id, **kwargs):
    """SplitMNIST or SplitFMNIST as Avalanche builds them, from images passed
    through the benchmark's transforms (``ToTensor``, ``Normalize``) once, as
    whole tensors: the same samples in the same experiences and order, without
    the per-sample transforms at every epoch and evaluation (most of Joint's
    time). Their transforms draw no random numbers, so nothing else changes."""
    from avalanche.benchmarks import nc_benchmark
    from avalanche.benchmarks.datasets.external_datasets.fmnist import (
        get_fmnist_dataset,
    )
    from avalanche.benchmarks.datasets.external_datasets.mnist import (
        get_mnist_dataset,
    )

    load = get_mnist_dataset if spec.name == "splitmnist" else get_fmnist_dataset
    train, test = (_normalised_tensors(dataset, spec) for dataset in load(dataset_root))
    return nc_benchmark(
        train,
        test,
        task_labels=return_task_id,
        train_transform=None,
        eval_transform=None,
        **kwargs,
    )


def _normalised_tensors(dataset, spec: BenchmarkSpec):
    """A torchvision MNIST-like dataset's images as ``ToTensor`` and
    ``Normalize`` give them, one float tensor for all, with its labels."""
    from torch.utils.data import TensorDataset

    mean, std = (
        torch.as_tensor(values, dtype=torch.float32).view(-1, 1, 1)
        for values in spec.normalization
    )
    # in place: one copy of the images in memory, not one per operation
    images = dataset.data.unsqueeze(1).to(torch.float32)
    images.div_(255).sub_(mean).div_(std)
    normalised = TensorDataset(images, dataset.targets)
    normalised.targets = dataset.targets
    return normalised


def synthetic_benchmark(
    *,
    input_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 100,
    n_experiences: int = 10,
    per_class: int = 4,
    scenario: str = "class",
    seed: int = 0,
    first_experience_half: bool = False,
):
    """A small random stand-in with a real benchmark's shape (e.g. CIFAR-100's
    3x32x32 and 100 classes), built with Avalanche's ``nc_benchmark``; for
    exercising code paths where the real data cannot be had."""
    from avalanche.benchmarks import nc_benchmark
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(seed)

    def split(n_per_class: int):
        y = torch.arange(num_classes).repeat_interleave(n_per_class)
        x = torch.randn(len(y), *input_shape, generator=generator)
        dataset = TensorDataset(x, y)
        dataset.targets = y.tolist()
        return dataset

    return nc_benchmark(
        split(per_class),
        split(max(per_class // 2, 1)),
        n_experiences=n_experiences,
        task_labels=scenario == "task",
        fixed_class_order=list(range(num_classes)),
        class_ids_from_zero_in_each_exp=scenario == "domain",
        per_exp_classes={0: num_classes // 2} if first_experience_half else None,
    )


def subsample_experience(experience, size: Optional[int], seed: int):
    """Keeps a random ``size`` samples of an experience (all if ``None``)."""
    if size is None or size >= len(experience.dataset):
        return experience
    generator = torch.Generator().manual_seed(seed + experience.current_experience)
    indices: List[int] = torch.randperm(len(experience.dataset), generator=generator)
    experience.dataset = experience.dataset.subset(indices[:size].tolist())
    return experience
