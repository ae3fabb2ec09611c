"""One protocol for every row: the same input pipeline for every strategy, and
what each strategy retains between experiences measured the same way."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import SimpleMLP
from avalanche.training import Naive, Replay
from avalanche.training.plugins import EvaluationPlugin

from avl_genreplay.bench.config import load_config
from avl_genreplay.bench.runner import RunSpec, run_strategy
from avl_genreplay.replay_pool import ReplayPool
from avl_genreplay.retained import retained_bytes

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class OffGridRecorder(SupervisedPlugin):
    """Records, per training minibatch, the share of pixels that are not one
    of MNIST's 256 grey levels: 0 for real images, large for images that a
    random affine transformation resampled."""

    def __init__(self):
        super().__init__()
        self.shares = []

    def before_backward(self, strategy, **kwargs):
        levels = (strategy.mb_x * MNIST_STD + MNIST_MEAN) * 255
        off = (levels - levels.round()).abs() > 1e-3
        self.shares.append(off.float().mean().item())


def _half(benchmark):
    class Streams:
        train_stream = benchmark.train_stream[:2]
        test_stream = benchmark.test_stream[:2]

    return Streams


@pytest.mark.parametrize("protocol", ["plain", "augmented"])
@pytest.mark.parametrize("name", ["joint", "ewc", "replay", "dgr"])
def test_every_strategy_gets_the_protocols_input_pipeline(mnist, protocol, name):
    config = load_config("splitmnist")
    table = {**config["protocol"], **config.get("protocols", {}).get(protocol, {})}
    settings = dict(config["strategies"][name])
    if name == "dgr":
        settings.update(generator_iterations=2, progress_bar=False)
    recorder = OffGridRecorder()
    run_strategy(
        RunSpec(
            strategy=name,
            seed=0,
            solver=dict(config["solver"], train_epochs=1),
            settings=settings,
            input_shape=(1, 28, 28),
            num_classes=10,
            scenario="class",
            device=torch.device("cpu"),
            train_subset=64,
            plugins=[recorder],
            protocol={"augment": table.get("augment"), "replay_mb_size": 32},
        ),
        _half(mnist),
    )
    assert recorder.shares
    if protocol == "plain":
        assert max(recorder.shares) == 0.0
    else:
        assert min(recorder.shares) > 0.05


def test_a_run_resumed_after_its_last_experience_keeps_its_retained_figure(
    mnist, tmp_path
):
    # PermutedMNIST's seed-2 runs of dgm_w, gr and replay were resumed after
    # their last saved experience and reported 0 MB retained
    config = load_config("splitmnist")
    spec = RunSpec(
        strategy="replay",
        seed=0,
        solver=dict(config["solver"], train_epochs=1),
        settings=dict(config["strategies"]["replay"]),
        input_shape=(1, 28, 28),
        num_classes=10,
        scenario="class",
        device=torch.device("cpu"),
        train_subset=64,
    )
    paths = (tmp_path / "run.ckpt", tmp_path / "run.json")
    whole = run_strategy(spec, _half(mnist), resume_paths=paths)
    # the saved state is that after the last experience: nothing is trained
    resumed = run_strategy(spec, _half(mnist), resume_paths=paths)
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert whole["retained_mb"] > 0
    assert resumed["retained_mb"] == whole["retained_mb"]


def _naive(plugins=()):
    model = SimpleMLP(num_classes=6, input_size=144, hidden_size=16, drop_rate=0)
    return dict(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=16,
        evaluator=EvaluationPlugin(loggers=[]),
        plugins=list(plugins),
    )


def test_retained_counts_an_exemplar_buffer(tiny_stream):
    naive, replay = Naive(**_naive()), Replay(mem_size=20, **_naive())
    for strategy in (naive, replay):
        strategy.train(tiny_stream.train_stream[0])
    assert retained_bytes(naive) == 0  # the solver alone: nothing retained
    # 20 images of 1x12x12 floats (and the buffer's sample weights)
    assert 20 * 144 * 4 <= retained_bytes(replay) < 20 * 144 * 4 + 1024


class HoldsPool(SupervisedPlugin):
    def __init__(self, pool):
        super().__init__()
        self.pool = pool


def test_retained_counts_a_replay_pool_and_its_copies_once(tiny_stream):
    pool = ReplayPool((1, 12, 12), 6)
    pool.fill(torch.randn(50, 1, 12, 12), torch.randint(0, 6, (50,)))
    strategy = Naive(**_naive([HoldsPool(pool), HoldsPool(pool)]))
    strategy.train(tiny_stream.train_stream[0])
    pool_bytes = 50 * 144 * 4 + 50 * 8  # images and labels
    assert pool_bytes <= retained_bytes(strategy) < pool_bytes + 1024
    # a copy is kept apart: it counts too
    copy = ReplayPool((1, 12, 12), 6)
    copy.fill(pool.x.clone(), pool.y.clone())
    strategy.plugins.append(HoldsPool(copy))
    assert retained_bytes(strategy) >= 2 * pool_bytes
