"""The WGAN-GP generator and its training step."""

import math
from copy import deepcopy

import pytest
import torch

from avl_genreplay.generators.wgan_gp import (
    ConvCritic,
    ConvGenerator,
    MlpCritic,
    MlpGenerator,
    WGANGPTrainer,
    gradient_penalty,
)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 12, 12)])
def test_samples_have_the_data_shape(shape):
    generator = ConvGenerator(shape, channels=8)
    samples = generator.generate(5)
    assert samples.shape == (5, *shape)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_critic_scores_one_value_per_sample(shape):
    critic = ConvCritic(shape, channels=8)
    assert critic(torch.randn(4, *shape)).shape[0] == 4
    assert critic(torch.randn(4, *shape)).numel() == 4


@pytest.mark.parametrize("conditional", [False, True])
def test_wgan_gp_losses_are_finite_and_move_the_generator(conditional):
    torch.manual_seed(0)
    shape = (3, 32, 32)
    generator = ConvGenerator(shape, channels=8, num_classes=4 if conditional else None)
    trainer = WGANGPTrainer(generator, critic_steps=2, lr=1e-3)
    before = [p.detach().clone() for p in generator.parameters()]
    x = torch.rand(16, *shape)
    y = torch.randint(0, 4, (16,)) if conditional else None
    history = [trainer.train_step(x, y) for _ in range(4)]
    # the generator steps every second critic step
    assert ["generator" in losses for losses in history] == [False, True] * 2
    for losses in history:
        assert {"critic", "wasserstein", "gp"} <= set(losses)
        assert all(math.isfinite(v) for v in losses.values())
    after = list(generator.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after))


@pytest.mark.parametrize("conditional", [False, True])
def test_fully_connected_wgan_gp_learns_where_the_data_is_bright(conditional):
    """Images bright on one half (the left, or per class the left or the
    right): after training, the samples are brighter on that half."""
    torch.manual_seed(0)
    shape = (1, 8, 8)
    classes = 2 if conditional else None
    generator = MlpGenerator(shape, hidden_size=64, num_classes=classes)
    critic = MlpCritic(shape, hidden_size=64, num_classes=classes)
    trainer = WGANGPTrainer(generator, critic, critic_steps=2, lr=2e-3)
    y = torch.arange(64) % 2 if conditional else torch.zeros(64, dtype=torch.long)
    x = torch.full((64, *shape), -1.0)
    for i, label in enumerate(y.tolist()):
        half = slice(0, 4) if label == 0 else slice(4, 8)
        x[i, :, :, half] = 1.0
    for _ in range(150):
        trainer.train_step(x + 0.05 * torch.randn_like(x), y if conditional else None)
    generator.eval()
    for label in (0, 1) if conditional else (0,):
        condition = torch.full((200,), label) if conditional else None
        samples = generator.generate(200, condition)
        left, right = samples[..., :4].mean(), samples[..., 4:].mean()
        bright, dark = (left, right) if label == 0 else (right, left)
        assert bright - dark > 1.0


def test_gradient_penalty_on_a_share_of_the_batch():
    seen = []

    class LinearCritic(torch.nn.Module):
        # a linear critic has the same gradient everywhere: any subset of the
        # pairs gives the full batch's penalty
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3 * 4 * 4))

        def forward(self, x, condition=None):
            seen.append((len(x), None if condition is None else condition.clone()))
            return x.flatten(1) @ self.weight

    critic = LinearCritic()
    real, fake = torch.rand(16, 3, 4, 4), torch.rand(16, 3, 4, 4)
    condition = torch.arange(16)
    full = gradient_penalty(critic, real, fake, condition)
    half = gradient_penalty(critic, real, fake, condition, share=0.5)
    assert torch.allclose(full, half)
    assert seen[0][0] == 16 and seen[1][0] == 8
    # each kept pair keeps its own label, and the pairs are drawn at random
    # (DGR's batches put real data first: not always the first rows)
    assert len(set(seen[1][1].tolist())) == 8
    for _ in range(4):
        gradient_penalty(critic, real, fake, condition, share=0.5)
    assert any(set(c.tolist()) != set(range(8)) for _, c in seen[1:])
    with pytest.raises(ValueError, match="share"):
        gradient_penalty(critic, real, fake, share=0.0)
    with pytest.raises(ValueError, match="penalty_share"):
        WGANGPTrainer(ConvGenerator((1, 12, 12), channels=8), penalty_share=1.5)


def test_outputs_take_the_range_of_the_data():
    generator = ConvGenerator((1, 12, 12), channels=8).eval()
    data = torch.rand(32, 1, 12, 12) * 2 + 3  # data in [3, 5]
    generator.calibrate_range(data)
    assert generator.range_low.item() == data.min().item()
    assert generator.range_high.item() == data.max().item()
    # the decoder's [-1, 1] output is mapped onto the calibrated range
    noise = generator.sample_noise(64)
    unit = generator.decode(noise)
    low, high = data.min(), data.max()
    expected = low + (unit + 1) / 2 * (high - low)
    torch.testing.assert_close(generator(noise), expected)
    # calibrated once: a later experience keeps the first range
    generator.calibrate_range(torch.zeros(4, 1, 12, 12))
    assert generator.range_low.item() == data.min().item()


def test_conditional_generator_rejects_bad_conditions():
    generator = ConvGenerator((1, 12, 12), channels=8, num_classes=3)
    assert generator.generate(4, torch.tensor([0, 1, 2, 0])).shape == (4, 1, 12, 12)
    with pytest.raises(ValueError, match="conditional"):
        generator.generate(4)
    with pytest.raises(ValueError, match="outside"):
        generator.generate(2, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="one class label per sample"):
        generator.generate(3, torch.tensor([0, 1]))


def test_bad_generator_arguments_are_refused():
    with pytest.raises(ValueError, match="output_shape"):
        ConvGenerator((28, 28))
    with pytest.raises(ValueError, match="critic_steps"):
        WGANGPTrainer(ConvGenerator((1, 12, 12), channels=8), critic_steps=0)


def _batch_norm_inputs(generator, noise, condition=None):
    """What the generator's first batch-norm layer sees for this noise."""
    if condition is not None:
        noise = torch.cat([noise, generator.label_embedding(condition)], dim=1)
    return generator.dense[0](noise)


@pytest.mark.parametrize("conditional", [False, True])
def test_the_generator_keeps_its_moving_average_with_fresh_statistics(conditional):
    torch.manual_seed(0)
    shape = (1, 12, 12)
    generator = ConvGenerator(shape, channels=8, num_classes=4 if conditional else None)
    trainer = WGANGPTrainer(generator, critic_steps=1, lr=1e-2, ema_decay=0.5)
    x = torch.rand(16, *shape)
    y = torch.tensor([1, 2] * 8) if conditional else None
    first = [p.detach().clone() for p in generator.parameters()]
    trainer.start_experience(0)
    for _ in range(6):
        trainer.train_step(x, y)
    last = [p.detach().clone() for p in generator.parameters()]
    average = [p.clone() for p in trainer.average.current.average.module.parameters()]
    trainer.end_experience(0)
    kept = list(generator.parameters())
    assert all(torch.equal(k, a) for k, a in zip(kept, average))
    assert not all(torch.equal(k, p) for k, p in zip(kept, last))
    assert not all(torch.equal(k, p) for k, p in zip(kept, first))
    assert trainer.average.current is None
    # the statistics are those of the averaged weights' own samples (of the
    # classes learned), not those gathered while training
    with torch.no_grad():
        noise = generator.sample_noise(4096)
        condition = torch.tensor([1, 2] * 2048) if conditional else None
        inputs = _batch_norm_inputs(generator, noise, condition)
    norm = generator.dense[1]
    assert torch.allclose(norm.running_mean, inputs.mean(0), atol=0.05)
    assert torch.allclose(norm.running_var, inputs.var(0), rtol=0.1, atol=0.01)
    assert generator.training


def test_without_a_moving_average_the_generator_keeps_its_last_weights():
    torch.manual_seed(0)
    shape = (1, 12, 12)
    generator = ConvGenerator(shape, channels=8)
    trainer = WGANGPTrainer(generator, critic_steps=1, lr=1e-2)
    trainer.start_experience(0)
    for _ in range(3):
        trainer.train_step(torch.rand(16, *shape))
    state = {k: v.clone() for k, v in generator.state_dict().items()}
    trainer.end_experience(0)
    assert all(torch.equal(v, generator.state_dict()[k]) for k, v in state.items())


def test_a_rolled_back_trainer_restores_its_moving_average():
    torch.manual_seed(0)
    shape = (1, 12, 12)
    generator = ConvGenerator(shape, channels=8)
    trainer = WGANGPTrainer(generator, critic_steps=1, lr=1e-2, ema_decay=0.5)
    x = torch.rand(16, *shape)
    trainer.start_experience(0)
    trainer.train_step(x)
    saved = deepcopy(trainer.state_dict())  # as the training guard keeps it
    kept = [p.clone() for p in trainer.average.current.average.module.parameters()]
    for _ in range(3):
        trainer.train_step(x)
    trainer.load_state_dict(saved)
    restored = list(trainer.average.current.average.module.parameters())
    assert all(torch.equal(k, r) for k, r in zip(kept, restored))


def test_a_moving_average_decay_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="ema_decay"):
        WGANGPTrainer(ConvGenerator((1, 12, 12), channels=8), ema_decay=1.0)


def test_dgr_gives_its_generator_the_moving_average_it_is_asked_for():
    from avalanche.models import SimpleMLP

    from avl_genreplay.strategies import DGR

    model = SimpleMLP(num_classes=4, input_size=144, hidden_size=8)
    strategy = DGR(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        input_shape=(1, 12, 12),
        ema_decay=0.9,
        progress_bar=False,
    )
    assert strategy.generator_plugin.trainer.average.decay == 0.9


@pytest.mark.parametrize(
    "architecture, networks",
    [("conv", (ConvGenerator, ConvCritic)), ("mlp", (MlpGenerator, MlpCritic))],
)
def test_dgr_builds_the_generator_and_critic_of_its_architecture(
    architecture, networks
):
    from avalanche.models import SimpleMLP

    from avl_genreplay.strategies import DGR

    model = SimpleMLP(num_classes=4, input_size=144, hidden_size=8)
    strategy = DGR(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        input_shape=(1, 12, 12),
        generator_architecture=architecture,
        generator_hidden_size=24,
        progress_bar=False,
    )
    critic = strategy.generator_plugin.trainer.critic
    assert (type(strategy.generator), type(critic)) == networks
    if architecture == "mlp":
        assert critic.score.in_features == 24
    assert strategy.generator.generate(3).shape == (3, 1, 12, 12)


def test_dgr_refuses_an_unknown_architecture():
    from avalanche.models import SimpleMLP

    from avl_genreplay.strategies import DGR

    model = SimpleMLP(num_classes=4, input_size=144, hidden_size=8)
    with pytest.raises(ValueError, match="generator_architecture must be one of"):
        DGR(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            input_shape=(1, 12, 12),
            generator_architecture="resnet",
        )
