"""DGM: masked generator, plasticity control, growth, AC-GAN and strategy."""

import math

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import SimpleMLP
from avalanche.training.plugins import EvaluationPlugin
from torch.utils.data import DataLoader

from avl_genreplay.bench.data import synthetic_benchmark
from avl_genreplay.generator_training import TrainingGuard
from avl_genreplay.generators.dgm import (
    ACDiscriminator,
    DGMTrainer,
    DiscriminatorSolver,
    MaskedConvGenerator,
    MaskedMlpGenerator,
    MlpACDiscriminator,
)
from avl_genreplay.generators.masks import TaskMask, annealed_scale
from avl_genreplay.generators.wgan_gp import ConvGenerator
from avl_genreplay.strategies import DGM

SHAPE = (1, 12, 12)
NOISE = 16


@pytest.fixture(autouse=True)
def _one_thread():
    # these networks are too small to gain from a second thread, and on a
    # busy machine two threads can stall each other
    torch.set_num_threads(1)


def _generator(variant, channels=(8, 4), architecture="conv"):
    if architecture == "mlp":
        return MaskedMlpGenerator(
            SHAPE, 6, variant=variant, noise_dim=NOISE, hidden=channels
        )
    return MaskedConvGenerator(
        SHAPE, 6, variant=variant, noise_dim=NOISE, channels=channels
    )


def _train_task(trainer, task, classes, steps, past=()):
    """``steps`` trainer steps on random images of ``classes`` (and of the
    ``past`` classes, as replay would), as one task."""
    trainer.start_experience(task)
    x = torch.rand(32, *SHAPE)
    y = torch.tensor(classes).repeat(16)
    if past:
        y[16:] = torch.tensor(past).repeat(8)
    history = [trainer.train_step(x, y) for _ in range(steps)]
    return history


def _solver_kwargs():
    model = SimpleMLP(num_classes=6, input_size=144, hidden_size=32, drop_rate=0)
    return dict(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        train_mb_size=16,
        evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]),
    )


def _dgm(variant, **kwargs):
    settings = dict(
        input_shape=SHAPE,
        num_classes=6,
        variant=variant,
        noise_dim=NOISE,
        generator_channels=(8, 4),
        discriminator_channels=8,
        generator_iterations=8,
        generator_mb_size=16,
        progress_bar=False,
    )
    settings.update(kwargs)
    if settings.get("solver") != "discriminator":
        settings.update(_solver_kwargs())
    else:
        settings["evaluator"] = _solver_kwargs()["evaluator"]
        settings["train_mb_size"] = 16
    return DGM(**settings)


@pytest.mark.parametrize("variant", ["w", "a"])
def test_masks_are_soft_in_training_and_binary_at_inference(variant):
    torch.manual_seed(0)
    generator = _generator(variant)
    trainer = DGMTrainer(generator, anneal_steps=10, critic_steps=1)
    _train_task(trainer, 0, [0, 1], 4)
    generator.train()
    generator.scale = 1.0
    soft = torch.cat(
        [m.flatten() for t in generator._layer_masks(0) for m in t if m is not None]
    )
    assert ((soft > 0) & (soft < 1)).any()
    generator.eval()
    binary = torch.cat(
        [m.flatten() for t in generator._layer_masks(0) for m in t if m is not None]
    )
    assert set(binary.unique().tolist()) <= {0.0, 1.0}
    trainer.end_experience(0)
    # a past task's mask is binary in training too
    generator.train()
    generator.scale = 1.0
    past = torch.cat(
        [m.flatten() for t in generator._layer_masks(0) for m in t if m is not None]
    )
    assert set(past.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("architecture", ["conv", "mlp"])
@pytest.mark.parametrize("variant", ["w", "a"])
def test_a_past_task_generates_the_same_samples_after_a_later_task(
    variant, architecture, tiny_stream
):
    torch.manual_seed(0)
    strategy = _dgm(
        variant,
        generator_iterations=12,
        train_epochs=1,
        generator_architecture=architecture,
        generator_hidden_size=16,
    )
    generator = strategy.generator
    if architecture == "mlp":
        assert isinstance(generator, MaskedMlpGenerator)
        assert generator.units == [16, 16]
        discriminator = strategy.generator_trainer.discriminator
        assert isinstance(discriminator, MlpACDiscriminator)
        assert discriminator.score.in_features == 16
    strategy.train(tiny_stream.train_stream[0])
    noise = torch.randn(10, NOISE)
    classes = torch.tensor([0, 1] * 5)
    generator.eval()
    with torch.no_grad():
        before = generator(noise, classes).clone()
        others_before = generator(noise, torch.full((10,), 2)).clone()
    strategy.train(tiny_stream.train_stream[1])
    generator.eval()
    with torch.no_grad():
        after = generator(noise, classes)
        others_after = generator(noise, torch.full((10,), 2))
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    # the later task did learn: its own class changed
    assert (others_after - others_before).abs().max() > 1e-3
    assert generator.class_task.tolist()[:4] == [0, 0, 1, 1]


@pytest.mark.parametrize("variant", ["w", "a"])
def test_each_task_of_a_domain_incremental_stream_learns_its_classes_again(
    variant,
):
    """Every experience of a domain-incremental stream brings classes 0 and 1
    again: each task takes them under its own mask, with its own generator
    steps, and a replayed class comes from the masks of all its past tasks.
    Telling the new data by its labels (classes no past task has) left the
    later tasks no class to learn, and no generator step."""
    torch.manual_seed(0)
    stream = synthetic_benchmark(
        input_shape=SHAPE,
        num_classes=6,
        n_experiences=3,
        per_class=16,
        scenario="domain",
    )
    strategy = _dgm(variant, generator_iterations=6, critic_steps=1)
    generator, trainer = strategy.generator, strategy.generator_trainer
    for index, experience in enumerate(stream.train_stream):
        strategy.train(experience)
        assert trainer.generator_steps == 6
        assert generator.class_tasks[:2, : index + 1].all()
        assert not generator.class_tasks[2:].any()
    generator.eval()
    tasks = generator.task_of(torch.tensor([0, 1]).repeat(150))
    assert sorted(set(tasks.tolist())) == [0, 1, 2]


@pytest.mark.parametrize("architecture", ["conv", "mlp"])
@pytest.mark.parametrize("variant", ["w", "a"])
def test_blocked_parameters_keep_their_values(variant, architecture):
    torch.manual_seed(0)
    generator = _generator(variant, architecture=architecture)
    trainer = DGMTrainer(generator, anneal_steps=10, critic_steps=1)
    _train_task(trainer, 0, [0, 1], 10)
    trainer.end_experience(0)
    trainer.start_experience(1)
    blocked = generator._blocked()
    assert any(w.any() for w, _ in blocked)
    before = [
        (l.weight.detach().clone(), l.bias.detach().clone()) for l in generator.layers
    ]
    _train_task(trainer, 1, [2, 3], 10, past=[0, 1])
    moved_free = False
    for layer, (w0, b0), (w_blocked, b_blocked) in zip(
        generator.layers, before, blocked
    ):
        assert torch.equal(layer.weight[w_blocked], w0[w_blocked])
        assert torch.equal(layer.bias[b_blocked], b0[b_blocked])
        moved_free |= not torch.equal(layer.weight[~w_blocked], w0[~w_blocked])
    assert moved_free


@pytest.mark.parametrize("variant", ["w", "a"])
def test_the_generator_grows_after_a_task_by_the_amount_reported(variant):
    torch.manual_seed(0)
    generator = _generator(variant)
    trainer = DGMTrainer(generator, anneal_steps=10, critic_steps=1)
    units = generator.units
    in_features = NOISE + 6
    hw = 3 * 3  # 12x12 images start from 3x3 maps
    _train_task(trainer, 0, [0, 1], 6)
    parameters = generator.layer_parameters()
    record = trainer.generator.end_task()
    added = record["added_units"]
    assert sum(added) > 0
    assert generator.units == [u + a for u, a in zip(units, added)] == record["units"]
    if variant == "a":
        # as many units as the task reserved
        assert added == record["reserved_units"]
    else:
        # enough units to hold as many weights as the task reserved
        per_unit = [in_features * hw + hw, units[0] * 16 + 1]
        for a, n, p in zip(added, record["reserved_weights"], per_unit):
            assert a == math.ceil(n / p)
    c1, c2 = generator.units
    expected = c1 * (in_features * hw + hw) + c2 * (c1 * 16 + 1) + 1 * (c2 * 16 + 1)
    assert generator.layer_parameters() == record["parameters"] == expected
    assert record["parameters"] > parameters == record["parameters_before"]
    assert generator.growth_log == [record]
    # the new units are free: no past task uses them
    assert all(share < 1 for share in record["reserved_share"])
    samples = generator.eval().generate(4, torch.tensor([0, 1, 2, 3]))
    assert samples.shape == (4, *SHAPE)


@pytest.mark.parametrize("variant", ["w", "a"])
def test_decoding_without_autograd_gives_the_same_samples(variant):
    # replay and the critic's fakes decode without autograd through a faster
    # kernel: the samples must be the very ones decoded with autograd, also
    # once the generator has grown to channel counts of no particular size
    torch.manual_seed(0)
    generator = MaskedConvGenerator((1, 28, 28), 10, variant=variant)
    trainer = DGMTrainer(generator, anneal_steps=4, critic_steps=1)
    trainer.start_experience(0)
    x, y = torch.rand(32, 1, 28, 28), torch.tensor([0, 1]).repeat(16)
    for _ in range(4):
        trainer.train_step(x, y)
    trainer.end_experience(0)
    assert generator.units != [64, 32]
    generator.eval()
    noise, condition = generator.sample_noise(40), torch.tensor([0, 1]).repeat(20)
    with torch.no_grad():
        fast = generator.decode(noise, condition)
    assert torch.equal(fast, generator.decode(noise, condition).detach())


@pytest.mark.parametrize("variant", ["w", "a"])
def test_past_tasks_decode_through_the_units_they_keep_to_the_same_samples(variant):
    # without autograd, a task with binary masks decodes through the units
    # they keep only (DGM-a's kept units; under DGM-w, units with a weight or
    # bias left, which leaves out those grown after the task); the samples
    # must be the very ones of the masked pass through every unit, for
    # batches of every size (the dense layer rounds differently for one to
    # three samples), and a task that keeps no unit of a layer must still
    # decode (oneDNN refuses empty channels)
    torch.manual_seed(0)
    generator = MaskedConvGenerator((1, 28, 28), 10, variant=variant, channels=(24, 12))
    # per task, the shares of the hidden layers' units (DGM-a) or weights
    # (DGM-w) kept, and DGM-w's share of biases kept where not the same
    keep = [(0.15, 0.25, None), (0.5, 0.1, None), (0.3, 0.0, None)]
    if variant == "w":
        keep.append((0.2, 0.002, 1.0))  # many units kept by their bias alone
    for task, (first, second, bias) in enumerate(keep):
        generator.assign_classes(torch.tensor([2 * task, 2 * task + 1]))
        shares = (first, second)
        if variant == "w":  # the output layer whole
            biases = (first, second) if bias is None else (bias, bias)
            shares = (first, second, 1.0, *biases, 1.0)
        for mask, share in zip(generator.masks(), shares):
            kept = torch.rand(mask.shape) < share
            mask.embedding.data = torch.where(kept, 1.0, -1.0)
        generator.end_task()
    assert generator.units[0] > 24  # grown: units past tasks do not use
    generator.eval()
    for n in (1, 2, 3, 64, 150):
        noise = generator.sample_noise(n)
        condition = torch.arange(2 * len(keep)).repeat(n)[:n]
        with torch.no_grad():
            fast = generator.decode(noise, condition)
        assert torch.equal(fast, generator.decode(noise, condition).detach())


@pytest.mark.parametrize("variant", ["w", "a"])
def test_the_fully_connected_generator_grows_by_the_amount_reported(variant):
    torch.manual_seed(0)
    generator = _generator(variant, channels=(12, 10), architecture="mlp")
    trainer = DGMTrainer(generator, anneal_steps=10, critic_steps=1)
    assert isinstance(trainer.discriminator, MlpACDiscriminator)
    in_features, pixels = NOISE + 6, math.prod(SHAPE)
    _train_task(trainer, 0, [0, 1], 6)
    record = trainer.generator.end_task()
    added = record["added_units"]
    assert sum(added) > 0
    assert generator.units == [12 + added[0], 10 + added[1]] == record["units"]
    if variant == "a":
        assert added == record["reserved_units"]
    else:
        # a hidden unit holds its fan-in and its bias
        per_unit = [in_features + 1, 12 + 1]
        for a, n, p in zip(added, record["reserved_weights"], per_unit):
            assert a == math.ceil(n / p)
    u1, u2 = generator.units
    expected = u1 * (in_features + 1) + u2 * (u1 + 1) + pixels * (u2 + 1)
    assert generator.layer_parameters() == record["parameters"] == expected
    samples = generator.eval().generate(4, torch.tensor([0, 1, 2, 3]))
    assert samples.shape == (4, *SHAPE)


def _reserved_share(variant, sparsity):
    torch.manual_seed(0)
    generator = _generator(variant, channels=(16, 8))
    trainer = DGMTrainer(
        generator, anneal_steps=40, critic_steps=1, mask_lr=0.05, sparsity=sparsity
    )
    _train_task(trainer, 0, [0, 1], 40)
    generator.end_task()
    masks = generator.masks()
    return sum(int(m.past[0].sum()) for m in masks) / sum(
        m.past[0].numel() for m in masks
    )


@pytest.mark.parametrize("variant", ["w", "a"])
def test_the_sparsity_penalty_lowers_the_share_of_reserved_units(variant):
    without = _reserved_share(variant, 0.0)
    penalised = _reserved_share(variant, 10.0)
    assert penalised < 0.6 * without


def test_the_scale_is_annealed_from_its_inverse_to_its_maximum():
    assert annealed_scale(0, 100, 1e4) == pytest.approx(1e-4)
    assert annealed_scale(99, 100, 1e4) == pytest.approx(1e4)
    assert annealed_scale(500, 100, 1e4) == pytest.approx(1e4)
    scales = [annealed_scale(i, 100, 1e4) for i in range(100)]
    assert scales == sorted(scales)
    # a one-step anneal is binary at once; a scale below 1 is refused
    assert annealed_scale(0, 1, 1e4) == 1e4
    with pytest.raises(ValueError, match="s_max"):
        annealed_scale(0, 100, 0.5)


def test_a_task_mask_commits_binary_masks_and_grows_free():
    mask = TaskMask((4,))
    with torch.no_grad():
        mask.embedding.copy_(torch.tensor([1.0, -1.0, 0.5, -0.5]))
    assert mask.commit().tolist() == [True, False, True, False]
    mask.reset()
    with torch.no_grad():
        mask.embedding.copy_(torch.tensor([1.0, 1.0, -0.5, -0.5]))
    # only what no earlier task held is new
    assert mask.commit().tolist() == [False, True, False, False]
    mask.grow(0, 2)
    assert mask.shape == (6,)
    assert mask.reserved().tolist() == [True, True, True, False, False, False]
    with pytest.raises(ValueError, match="no mask for task 5"):
        mask.mask(5)


@pytest.mark.parametrize("fully_connected", [False, True])
@pytest.mark.parametrize("projection", [False, True])
def test_the_discriminator_scores_and_classifies(projection, fully_connected):
    if fully_connected:
        discriminator = MlpACDiscriminator(
            (1, 28, 28), 10, hidden_size=16, projection=projection
        )
    else:
        discriminator = ACDiscriminator(
            (1, 28, 28), 10, channels=8, projection=projection
        )
    x = torch.randn(5, 1, 28, 28)
    y = torch.tensor([0, 1, 2, 3, 4])
    score, logits = discriminator.score_and_logits(x, y)
    assert score.shape == (5,) and logits.shape == (5, 10)
    torch.testing.assert_close(discriminator(x, y), score)
    torch.testing.assert_close(discriminator.classify(x), logits)
    # only a projection critic's score depends on the label
    other = discriminator(x, torch.tensor([9, 9, 9, 9, 9]))
    assert torch.allclose(other, score) != projection


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_generator_samples_have_the_benchmark_shape(shape):
    for generator in (
        MaskedConvGenerator(shape, 10, channels=(8, 4)),
        MaskedMlpGenerator(shape, 10, hidden=(8, 4)),
    ):
        assert generator.generate(3, torch.tensor([0, 5, 9])).shape == (3, *shape)


def test_the_trainer_state_restores_a_step():
    torch.manual_seed(0)
    generator = _generator("w")
    trainer = DGMTrainer(generator, anneal_steps=10, critic_steps=1)
    _train_task(trainer, 0, [0, 1], 2)
    state = {k: v for k, v in trainer.state_dict().items()}
    import copy

    state = copy.deepcopy(state)
    noise = torch.randn(4, NOISE)
    generator.eval()
    before = generator(noise, torch.tensor([0, 1, 0, 1]))
    _train_task(trainer, 0, [0, 1], 2)
    trainer.load_state_dict(state)
    generator.eval()
    torch.testing.assert_close(generator(noise, torch.tensor([0, 1, 0, 1])), before)


def test_the_discriminator_can_be_the_solver(tiny_stream):
    torch.manual_seed(0)
    strategy = _dgm("a", solver="discriminator")
    assert isinstance(strategy.model, DiscriminatorSolver)
    discriminator = strategy.generator_trainer.discriminator
    assert strategy.model.discriminator is discriminator
    # the solver's parameters are the discriminator's, not the generator's
    assert {id(p) for p in strategy.model.parameters()} == {
        id(p) for p in discriminator.parameters()
    }
    for experience in tiny_stream.train_stream[:2]:
        strategy.train(experience)
    results = strategy.eval(tiny_stream.test_stream[:2])
    accuracy = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    # what was evaluated is the discriminator's auxiliary classifier, on inputs
    # mapped to [-1, 1] with the generator's (calibrated) range
    assert bool(strategy.generator.range_calibrated)
    correct = total = 0
    discriminator.eval()
    with torch.no_grad():
        for experience in tiny_stream.test_stream[:2]:
            x, y, *_ = next(iter(DataLoader(experience.dataset, batch_size=1000)))
            unit = strategy.generator.to_unit_range(x)
            correct += (discriminator.classify(unit).argmax(1) == y).sum().item()
            total += len(y)
    assert accuracy == pytest.approx(correct / total)
    assert len(strategy.generator.growth_log) == 2


def test_replay_to_the_solver_is_class_balanced_with_condition_labels(tiny_stream):
    torch.manual_seed(0)
    strategy = _dgm("w")
    for experience in tiny_stream.train_stream[:2]:
        strategy.train(experience)
    counts = strategy.replay_plugin.replayed_class_counts
    assert counts[0] == {}
    assert set(counts[1]) == {0, 1}
    assert abs(counts[1][0] - counts[1][1]) <= len(counts[1]) * 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(s_max=0.5), "s_max"),
        (dict(sparsity=-0.1), "sparsity"),
        (dict(critic_steps=0), "critic_steps"),
        (dict(solver="bogus"), "solver"),
        (dict(generator_lr=0.0), "lr"),
        (dict(anneal_fraction=0.0), "anneal_fraction"),
    ],
)
def test_bad_dgm_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _dgm("w", **kwargs)


def test_bad_generator_settings_are_refused():
    with pytest.raises(ValueError, match="variant"):
        _dgm("x")
    with pytest.raises(ValueError, match="variant"):
        MaskedConvGenerator(SHAPE, 6, variant="b")
    with pytest.raises(ValueError, match="num_classes"):
        MaskedConvGenerator(SHAPE, 0)
    with pytest.raises(ValueError, match="hidden sizes"):
        MaskedConvGenerator(SHAPE, 6, channels=(8,))
    with pytest.raises(ValueError, match="hidden sizes"):
        MaskedMlpGenerator(SHAPE, 6, hidden=(8, 0))
    with pytest.raises(ValueError, match="MaskedGenerator"):
        DGMTrainer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="generator_architecture"):
        _dgm("w", generator_architecture="resnet")
    with pytest.raises(ValueError, match="leave model None"):
        DGM(
            input_shape=SHAPE,
            num_classes=6,
            solver="discriminator",
            **_solver_kwargs(),
        )
    with pytest.raises(ValueError, match="model and an optimizer"):
        DGM(input_shape=SHAPE, num_classes=6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(critic_steps=0), "critic_steps"),
        (dict(penalty_share=0.0), "penalty_share"),
        (dict(penalty_share=1.5), "penalty_share"),
        (dict(anneal_steps=0), "anneal_steps"),
    ],
)
def test_bad_trainer_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DGMTrainer(_generator("a"), **kwargs)


def test_the_generator_and_its_trainer_need_class_labels():
    generator = _generator("a")
    with pytest.raises(ValueError, match="conditional: pass class labels"):
        generator.decode(generator.sample_noise(2))
    with pytest.raises(ValueError, match="class-conditional: pass labels"):
        DGMTrainer(generator).train_step(torch.rand(4, *SHAPE))


def test_the_strategy_refuses_a_generator_it_cannot_use():
    with pytest.raises(ValueError, match="input_shape and num_classes"):
        DGM(variant="a", **_solver_kwargs())
    with pytest.raises(ValueError, match="MaskedGenerator"):
        DGM(generator=ConvGenerator(SHAPE, NOISE, 8, 6), **_solver_kwargs())
    other = DGMTrainer(_generator("a"))
    with pytest.raises(ValueError, match="must train the given generator"):
        DGM(generator=_generator("a"), generator_trainer=other, **_solver_kwargs())


class _NaNAt(DGMTrainer):
    """A DGM trainer whose generator turns NaN at one step (counted over the
    whole run, retries included)."""

    def __init__(self, generator, at, **kwargs):
        super().__init__(generator, **kwargs)
        self.at, self.calls = at, 0

    def train_step(self, x, y=None):
        losses = super().train_step(x, y)
        self.calls += 1
        if self.calls == self.at:
            with torch.no_grad():
                for parameter in self.generator.parameters():
                    parameter.fill_(float("nan"))
            losses["generator"] = float("nan")
        return losses


def test_a_rollback_restores_masks_and_weights_within_a_task(tiny_stream):
    torch.manual_seed(0)
    generator = _generator("w")
    trainer = _NaNAt(generator, at=17, anneal_steps=6, critic_steps=1)
    strategy = DGM(
        generator_trainer=trainer,
        generator_iterations=12,
        generator_mb_size=16,
        progress_bar=False,
        **_solver_kwargs(),
    )
    strategy.generator_plugin.guard.check_every = 4
    strategy.generator_plugin.guard.min_spread = 0.0  # only the NaN is a failure
    for experience in tiny_stream.train_stream[:2]:
        strategy.train(experience)
    rollbacks = strategy.generator_plugin.guard.rollbacks
    assert [(r["experience"], r["step"], r["resumed_from"]) for r in rollbacks] == [
        (1, 5, 4)
    ]
    assert all(torch.isfinite(p).all() for p in generator.parameters())
    assert len(generator.growth_log) == 2


def test_the_guard_judges_masked_samples_as_trained_until_the_last_check():
    # DGM-a on PermutedMNIST, seed 2: the sparsity penalty had pushed every
    # embedding of a layer below 0 while the scale was still small, so the
    # eval-mode (binary) samples were constant though the soft masks were ~0.4
    torch.manual_seed(0)
    generator = _generator("a")
    trainer = DGMTrainer(generator, anneal_steps=20, critic_steps=1)
    _train_task(trainer, 0, [0, 1], 2)
    with torch.no_grad():
        generator.unit_masks[0].embedding.fill_(-0.5)
    # an untrained generator's samples hardly vary: any spread above 0 passes
    guard = TrainingGuard(check_every=2, min_spread=1e-3)
    guard.start_experience(
        trainer,
        experience=0,
        iterations=20,
        classes=[0, 1],
        solver=torch.nn.Linear(1, 1),
        device="cpu",
    )
    real = torch.rand(32, *SHAPE)
    assert guard.after_step(2, {"critic": 0.0}, real) is None
    # the last check samples as replay will, with the binary masks
    assert guard.after_step(20, {"critic": 0.0}, real) == 2
    assert "near-zero variance" in guard.rollbacks[0]["reason"]
