"""Replay-quality metrics on real MNIST: a "generator" of real test images must
score like the reference classifier on them and sit near the real data; noise
must score near chance and far away; the grid must reach TensorBoard; the
loss metric must report the generator plugin's losses."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from avalanche.logging import TensorboardLogger
from avalanche.models import SimpleMLP
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from PIL import Image
from scipy.linalg import sqrtm
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import avl_genreplay.reference as reference_module
from avl_genreplay import (
    ConvGenerator,
    GeneratorLossMetric,
    GeneratorTrainingPlugin,
    SolverReplayPlugin,
    find_generator,
    frechet_distance,
    replay_quality_metrics,
    train_reference_classifier,
)
from avl_genreplay.bench.data import subsample_experience
from avl_genreplay.generators.base import GeneratorTrainer
from avl_genreplay.metrics import ReplaySampler
from avl_genreplay.reference import features_and_logits, load_tensors

SAMPLES = 200  # per class: the scores' standard error stays near 0.015
ACC = "ReplayClassifierAccuracy/train_phase/train_stream"
SHARE = "ReplayClassShare/train_phase/train_stream"
COVERAGE = "ReplayClassCoverage/train_phase/train_stream"
FRECHET = "ReplayFrechetDistance/train_phase/train_stream"
GRID = "ReplaySamples/train_phase/train_stream"


@pytest.fixture(scope="module")
def test_data(mnist):
    return load_tensors(mnist.test_stream)


@pytest.fixture(scope="module")
def reference(mnist, test_data, tmp_path_factory):
    """The default reference, trained on 800 random samples per experience."""
    chooser = torch.Generator().manual_seed(0)
    parts = []
    for experience in mnist.train_stream:
        order = torch.randperm(len(experience.dataset), generator=chooser)
        parts.append(experience.dataset.subset(order[:800].tolist()))
    return train_reference_classifier(
        parts,
        test_data=test_data,
        cache_dir=tmp_path_factory.mktemp("reference"),
        progress_bar=False,
        verbose=False,
    )


class RealImages:
    """A "generator" returning random real test images: of the requested
    class, or (unconditional) of the classes in ``classes``."""

    def __init__(self, x, y, *, conditional=True):
        self.x = x
        self.pools = [(y == c).nonzero().squeeze(1) for c in range(10)]
        self.num_classes = 10 if conditional else None
        self.classes = []

    def generate(self, n, condition=None):
        if condition is None:
            allowed = torch.tensor(self.classes)
            condition = allowed[torch.randint(len(allowed), (n,))]
        picks = [
            self.pools[c][torch.randint(len(self.pools[c]), ())]
            for c in condition.tolist()
        ]
        return self.x[torch.stack(picks)]


class Noise:
    """Gaussian noise, whatever the class asked."""

    def __init__(self, *, conditional=True):
        self.num_classes = 10 if conditional else None
        self.classes = []

    def generate(self, n, condition=None):
        return torch.randn(n, 1, 28, 28)


class ClassShade:
    """Constant images whose value is the requested class."""

    num_classes = 10

    def generate(self, n, condition=None):
        return condition.float().view(-1, 1, 1, 1).expand(n, 1, 28, 28).clone()


def _strategy(evaluator, plugins=None):
    torch.manual_seed(0)
    model = SimpleMLP(num_classes=10, hidden_size=32, hidden_layers=1)
    return Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        train_mb_size=50,
        evaluator=evaluator,
        plugins=plugins,
    )


def _run(mnist, metrics, generator=None, experiences=2, loggers=(), plugins=None):
    """Trains Naive on small experiences; the metrics' values after each."""
    evaluator = EvaluationPlugin(*metrics, loggers=list(loggers))
    strategy = _strategy(evaluator, plugins)
    history = []
    for experience in mnist.train_stream[:experiences]:
        if generator is not None:
            generator.classes += experience.classes_in_this_experience
        strategy.train(subsample_experience(experience, 100, seed=0))
        history.append(evaluator.get_last_metrics())
    return history, strategy


def _class_accuracy(reference, test_data, c):
    x, y = test_data
    with torch.no_grad():
        return (reference(x[y == c]).argmax(1) == c).float().mean().item()


def _real_spread(metrics, strategy, classes):
    """Total variance of the real features: the scale of the distances."""
    sampler = metrics[0].sampler
    real = sampler.real_features(classes, strategy.device)
    return torch.cat([real[c] for c in classes]).double().T.cov().trace().item()


def test_real_images_score_the_references_accuracy_and_lie_near_the_data(
    mnist, reference, test_data
):
    generator = RealImages(*test_data)
    metrics = replay_quality_metrics(
        reference,
        test_data,
        generator=generator,
        samples_per_class=SAMPLES,
        losses=False,
    )
    (first, second), strategy = _run(mnist, metrics, generator)
    assert f"{ACC}/Class002" not in first  # only the classes seen so far
    for c in range(4):
        expected = _class_accuracy(reference, test_data, c)
        assert second[f"{ACC}/Class{c:03d}"] == pytest.approx(expected, abs=0.05)
    per_class = [second[f"{ACC}/Class{c:03d}"] for c in range(4)]
    assert second[ACC] == pytest.approx(sum(per_class) / 4)
    assert second[FRECHET] < 0.05 * _real_spread(metrics, strategy, range(4))


def test_noise_scores_near_chance_and_lies_far_from_the_data(
    mnist, reference, test_data
):
    metrics = replay_quality_metrics(
        reference, test_data, generator=Noise(), samples_per_class=SAMPLES, losses=False
    )
    (_, second), strategy = _run(mnist, metrics)
    # noise ignores the class asked: at most 1 / k in the mean, up to sampling
    assert second[ACC] <= 0.25 + 0.05
    assert second[FRECHET] > _real_spread(metrics, strategy, range(4))
    assert second[f"{FRECHET}/Class000"] > _real_spread(metrics, strategy, [0])


def test_unconditional_real_images_cover_every_class_and_noise_does_not(
    mnist, reference, test_data
):
    real = RealImages(*test_data, conditional=False)
    metrics = replay_quality_metrics(
        reference, test_data, generator=real, samples_per_class=SAMPLES, losses=False
    )
    (_, second), _ = _run(mnist, metrics, real)
    for c in range(4):
        assert second[f"{SHARE}/Class{c:03d}"] == pytest.approx(0.25, abs=0.05)
    accuracy = np.mean([_class_accuracy(reference, test_data, c) for c in range(4)])
    assert second[COVERAGE] >= accuracy - 0.05
    assert f"{FRECHET}/Class000" not in second  # no class asked, no class FD

    noise = Noise(conditional=False)
    metrics = replay_quality_metrics(
        reference, test_data, generator=noise, samples_per_class=SAMPLES, losses=False
    )
    (_, second), _ = _run(mnist, metrics, noise)
    assert second[COVERAGE] < 0.5


def test_sample_grid_reaches_tensorboard_one_row_per_class(mnist, tmp_path):
    logger = TensorboardLogger(tmp_path)
    metrics = replay_quality_metrics(
        generator=ClassShade(),
        accuracy=False,
        frechet=False,
        losses=False,
        samples_per_class=4,
        grid_columns=3,
    )
    _run(mnist, metrics, loggers=[logger])
    logger.writer.flush()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    images = events.Images(GRID)
    assert len(images) == 2  # one grid per experience
    last = np.asarray(Image.open(io.BytesIO(images[1].encoded_image_string)))
    tile = 28 + 2  # make_grid's padding of 2
    assert last.shape[:2] == (4 * tile + 2, 3 * tile + 2)
    # row c shows class c's shade: c / 3 of white (the samples' range is 0..3)
    for c in range(4):
        centre = last[2 + c * tile + 14, 2 + 14, 0]
        assert centre == pytest.approx(255 * c / 3, abs=1)


class _CountingTrainer(GeneratorTrainer):
    """A trainer whose losses are the step count, so their means are known."""

    def __init__(self, generator):
        self.generator = generator
        self.steps = []

    def train_step(self, x, y=None):
        self.steps.append(len(self.steps) + 1)
        return {"critic": float(self.steps[-1]), "generator": -2.0 * self.steps[-1]}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_losses_metric_emits_the_generator_plugins_mean_losses(mnist):
    trainer = _CountingTrainer(ConvGenerator((1, 28, 28)))
    plugin = GeneratorTrainingPlugin(trainer, train_iterations=3, progress_bar=False)
    history, _ = _run(mnist, [GeneratorLossMetric()], plugins=[plugin])
    name = "GeneratorLoss/train_phase/train_stream"
    for index, values in enumerate(history):
        steps = trainer.steps[3 * index : 3 * index + 3]
        assert values[f"{name}/critic"] == pytest.approx(np.mean(steps))
        assert values[f"{name}/generator"] == pytest.approx(-2.0 * np.mean(steps))
        assert values[f"{name}/critic"] == plugin.loss_history[index]["critic"]


def test_losses_metric_without_a_generator_plugin_warns_once(mnist):
    with pytest.warns(UserWarning, match="no GeneratorTrainingPlugin") as caught:
        history, _ = _run(mnist, [GeneratorLossMetric()])
    ours = [w for w in caught if "GeneratorTrainingPlugin" in str(w.message)]
    assert len(ours) == 1  # two experiences, one warning
    assert not any(name.startswith("GeneratorLoss") for name in history[-1])


def test_metrics_leave_the_run_unchanged(mnist, reference, test_data):
    def final_weights(metrics):
        _, strategy = _run(mnist, metrics)
        return [p.detach().clone() for p in strategy.model.parameters()]

    plain = final_weights([])
    measured = final_weights(
        replay_quality_metrics(
            reference, test_data, generator=Noise(), samples_per_class=4, losses=False
        )
    )
    assert all(torch.equal(a, b) for a, b in zip(plain, measured))


def _gaussian_features(mean, cov, n=400, seed=0):
    """Samples whose mean and unbiased covariance are exactly ``mean``, ``cov``."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed))
    z = z.double() - z.double().mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T.cov())).T
    return z @ torch.linalg.cholesky(cov).T + mean


def test_frechet_distance_is_the_closed_form_between_gaussians():
    generator = torch.Generator().manual_seed(1)
    d = 5
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=generator).double())
    a, b = torch.rand(d, generator=generator).double() + 0.1, torch.rand(d).double()
    mean_a, mean_b = torch.randn(d).double(), torch.randn(d).double()
    cov_a = rotation @ torch.diag(a) @ rotation.T
    cov_b = rotation @ torch.diag(b + 0.1) @ rotation.T
    expected = ((mean_a - mean_b) ** 2).sum() + (
        a + b + 0.1 - 2 * (a * (b + 0.1)).sqrt()
    ).sum()
    fa = _gaussian_features(mean_a, cov_a)
    fb = _gaussian_features(mean_b, cov_b, seed=1)
    assert frechet_distance(fa, fb) == pytest.approx(expected.item(), rel=1e-6)
    # covariances that do not commute: against SciPy's matrix square root
    other = torch.randn(d, d, generator=generator).double()
    cov_c = other @ other.T + 0.1 * torch.eye(d, dtype=torch.double)
    fc = _gaussian_features(mean_b, cov_c, seed=2)
    root = sqrtm(cov_a.numpy() @ cov_c.numpy()).real
    scipy_value = ((mean_a - mean_b) ** 2).sum().item() + np.trace(
        cov_a.numpy() + cov_c.numpy() - 2 * root
    )
    assert frechet_distance(fa, fc) == pytest.approx(scipy_value, rel=1e-6)
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-8)


def test_reference_is_trained_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    x = torch.randn(64, 1, 8, 8)
    y = torch.arange(64) % 4
    first = train_reference_classifier(
        (x, y), epochs=1, cache_dir=tmp_path, progress_bar=False, verbose=False
    )

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(reference_module, "_fit", no_training)
    again = train_reference_classifier(
        (x, y), epochs=1, cache_dir=tmp_path, progress_bar=False, verbose=False
    )
    for (name, a), (_, b) in zip(
        first.state_dict().items(), again.state_dict().items()
    ):
        assert torch.equal(a, b), name
    with pytest.raises(AssertionError, match="trained again"):  # other data
        train_reference_classifier(
            (x[:32], y[:32]), epochs=1, cache_dir=tmp_path, verbose=False
        )
    with pytest.raises(AssertionError, match="trained again"):  # other settings
        train_reference_classifier(
            (x, y), epochs=1, seed=1, cache_dir=tmp_path, verbose=False
        )


def test_default_reference_learns_mnist(reference):
    # 4000 training samples; the full training set reaches about 99 %
    assert reference.test_accuracy > 0.9


def test_features_of_any_reference_are_the_input_of_its_last_linear_layer():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU())
    model = nn.Sequential(body, nn.Linear(8, 3))
    x = torch.randn(5, 1, 4, 4)
    features, logits = features_and_logits(model, x)
    assert torch.equal(features, body(x))
    assert torch.equal(logits, model(x))


def test_generator_is_found_on_the_strategy_or_its_replay_plugin():
    generator = ConvGenerator((1, 28, 28))
    assert find_generator(SimpleNamespace(generator=generator)) is generator
    with_plugin = SimpleNamespace(plugins=[SolverReplayPlugin(generator)])
    assert find_generator(with_plugin) is generator
    other = ConvGenerator((1, 28, 28))
    assert find_generator(with_plugin, other) is other
    with pytest.raises(ValueError, match="no generator"):
        find_generator(SimpleNamespace(plugins=[]))


def test_metrics_needing_a_reference_or_real_data_say_so():
    with pytest.raises(ValueError, match="reference"):
        replay_quality_metrics(None, None, frechet=False)
    with pytest.raises(ValueError, match="real test data"):
        replay_quality_metrics(nn.Linear(2, 2), None, accuracy=False)
    with pytest.raises(ValueError, match="samples_per_class"):
        ReplaySampler(samples_per_class=1)
