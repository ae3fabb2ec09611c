"""A reference classifier for judging generated samples, trained once and cached.

The replay-quality metrics (:mod:`avl_genreplay.metrics`) look at generated
samples through a classifier that has seen the benchmark's whole training set:
its predictions say which class a sample looks like, its penultimate layer is
the feature space of a Fréchet distance. Any ``nn.Module`` ending in an
``nn.Linear`` layer can serve; :func:`train_reference_classifier` trains a
small CNN (about a minute on one CPU core for MNIST) and caches it on disk,
keyed by a hash of the data and of the training settings.
"""

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from avalanche.benchmarks.utils import AvalancheDataset
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from avl_genreplay.generator_training import dataset_tensors

__all__ = [
    "ReferenceClassifier",
    "train_reference_classifier",
    "reference_accuracy",
    "features_and_logits",
    "load_tensors",
    "default_cache_dir",
]

# bumped when the architecture or the training changes, so old caches miss
_VERSION = 1

Data = Union[Dataset, Iterable, Tuple[Tensor, Tensor]]


class ReferenceClassifier(nn.Module):
    """A small CNN: two 3x3 convolution blocks (batch norm, ReLU, 2x2 max
    pooling), a hidden fully connected layer whose output is the feature space
    of the metrics, and a linear head.

    :param input_shape: ``(channels, height, width)`` of the inputs.
    :param num_classes: number of classes.
    :param width: channels of the first convolution (the second has twice).
    :param feature_dim: size of the feature layer.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        width: int = 16,
        feature_dim: int = 128,
    ):
        super().__init__()
        channels, height, width_px = (int(s) for s in input_shape)
        self.config = dict(
            input_shape=[channels, height, width_px],
            num_classes=int(num_classes),
            width=int(width),
            feature_dim=int(feature_dim),
        )
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (height // 4) * (width_px // 4), feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        #: accuracy on the test data given to :func:`train_reference_classifier`
        self.test_accuracy: Optional[float] = None

    def features(self, x: Tensor) -> Tensor:
        """The penultimate layer's activations."""
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def features_and_logits(reference: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    """The reference's penultimate-layer features and logits for ``x``.

    A :class:`ReferenceClassifier` (or any module with ``features`` and
    ``head``) gives them directly; for another module the features are the
    input of its last ``nn.Linear`` layer, caught by a hook.
    """
    if hasattr(reference, "features") and hasattr(reference, "head"):
        features = reference.features(x)
        return features, reference.head(features)
    linears = [m for m in reference.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            "the reference classifier has no nn.Linear layer whose input could "
            "serve as features; give it `features` and `head` methods"
        )
    caught = []
    hook = linears[-1].register_forward_pre_hook(lambda _, args: caught.append(args[0]))
    try:
        logits = reference(x)
    finally:
        hook.remove()
    return caught[-1].flatten(1), logits


def _datasets(data: Data) -> list:
    if isinstance(data, (Dataset, AvalancheDataset)):
        return [data]
    datasets = []
    for item in data:
        if isinstance(item, (Dataset, AvalancheDataset)):
            datasets.append(item)
        elif hasattr(item, "dataset"):  # an experience of a stream
            datasets.append(item.dataset)
        else:
            raise TypeError(
                "expected a dataset, a sequence of datasets, a stream of "
                "experiences or a tuple (inputs, labels), got a sequence of "
                f"{type(item).__name__}"
            )
    return datasets


def load_tensors(data: Data, *, batch_size: int = 1024) -> Tuple[Tensor, Tensor]:
    """All inputs and labels of ``data`` as two tensors.

    :param data: a dataset yielding ``(x, y, ...)``, a sequence of them or an
        Avalanche stream (the datasets are concatenated), or a tuple
        ``(inputs, labels)``, returned as is. Avalanche datasets are read with
        their eval transforms, so random augmentations are left out.
    """
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        return data[0], torch.as_tensor(data[1]).long()
    xs, ys = [], []
    for dataset in _datasets(data):
        if hasattr(dataset, "eval") and callable(dataset.eval):
            dataset = dataset.eval()
        x, y = dataset_tensors(dataset, batch_size=batch_size)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys).long()


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/avl_genreplay/reference`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "avl_genreplay" / "reference"


def _cache_key(x: Tensor, y: Tensor, settings: dict) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(str(tuple(x.shape)).encode())
    digest.update(x.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(y.detach().long().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def reference_accuracy(
    reference: nn.Module, data: Data, *, batch_size: int = 1000, device="cpu"
) -> float:
    """Accuracy of the reference on ``data`` (see :func:`load_tensors`)."""
    x, y = load_tensors(data)
    training = reference.training
    reference.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = reference(x[start : start + batch_size].to(device))
        correct += (logits.argmax(1).cpu() == y[start : start + batch_size]).sum()
    reference.train(training)
    return int(correct) / max(len(x), 1)


def train_reference_classifier(
    train_data: Data,
    *,
    test_data: Optional[Data] = None,
    num_classes: Optional[int] = None,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 3e-3,
    width: int = 16,
    feature_dim: int = 128,
    seed: int = 0,
    cache_dir: Union[str, Path, None] = None,
    name: str = "reference",
    device: Union[str, torch.device] = "cpu",
    progress_bar: bool = True,
    verbose: bool = True,
) -> ReferenceClassifier:
    """Trains a :class:`ReferenceClassifier` on a benchmark's training data,
    or loads it from the cache.

    Adam with a one-cycle learning-rate schedule: on MNIST, 2 epochs reach
    about 99 % test accuracy. The cache holds one file per data and settings
    (a hash of the inputs, labels and every argument that changes the
    result), so a different subset or seed trains anew. The global random
    state is left as it was.

    :param train_data: a dataset, a sequence of datasets, an Avalanche stream (e.g.
        ``benchmark.train_stream``: all experiences together) or a tuple
        ``(inputs, labels)``; read once into memory, with eval transforms.
    :param test_data: the same kinds; if given, the accuracy on it is
        measured, printed (``verbose``) and kept as ``test_accuracy``.
    :param num_classes: classes of the head; ``None`` for the largest label
        plus one.
    :param epochs: passes over the training data.
    :param batch_size: minibatch size.
    :param lr: the schedule's peak learning rate.
    :param width: channels of the first convolution.
    :param feature_dim: size of the feature layer.
    :param seed: seed of the initialisation and of the minibatch order.
    :param cache_dir: where trained classifiers are kept; ``None`` for
        :func:`default_cache_dir`.
    :param name: prefix of the cache file's name (e.g. the benchmark's).
    :param device: where to train.
    :param progress_bar: show a progress bar with the loss.
    :param verbose: print where the classifier comes from and its accuracy.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    x, y = load_tensors(train_data)
    num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    settings = dict(
        version=_VERSION,
        num_classes=num_classes,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        width=width,
        feature_dim=feature_dim,
        seed=seed,
    )
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"{name}-{_cache_key(x, y, settings)}.pt"
    cached = path.exists()
    # seeded here, so that the initialisation and the minibatch order depend
    # on the seed alone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ReferenceClassifier(
            x.shape[1:], num_classes, width=width, feature_dim=feature_dim
        )
        if cached:
            model.load_state_dict(torch.load(path, map_location="cpu"))
        else:
            _fit(model, x, y, settings, device, progress_bar)
    if cached:
        source = f"loaded from {path}"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        # written aside and moved, so that a run stopped midway leaves no
        # half-written cache behind; one file per process, so that processes
        # training the same classifier at once do not write into each other's
        partial = path.with_suffix(f".{os.getpid()}.partial")
        torch.save(model.state_dict(), partial)
        partial.replace(path)
        source = f"trained on {len(x)} samples, saved to {path}"
    model.to(device).eval()
    if test_data is not None:
        model.test_accuracy = reference_accuracy(model, test_data, device=device)
        source += f"; test accuracy {model.test_accuracy:.4f}"
    if verbose:
        print(f"reference classifier {source}", file=sys.stderr)
    return model


def _fit(model, x, y, settings, device, progress_bar) -> None:
    epochs, batch_size = settings["epochs"], settings["batch_size"]
    steps_per_epoch = -(-len(x) // batch_size)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings["lr"], total_steps=epochs * steps_per_epoch
    )
    bar = tqdm(
        total=epochs * steps_per_epoch,
        desc="reference classifier",
        disable=not progress_bar,
        leave=False,
    )
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for step in range(steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(model(x[batch].to(device)), y[batch].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
