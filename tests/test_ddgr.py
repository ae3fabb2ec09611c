"""DDGR: the diffusion generator, guided sampling, the replay pool and the
strategy end to end."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from avalanche.models import SimpleMLP
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch.utils.data import DataLoader

from avl_genreplay.bench.data import subsample_experience, synthetic_benchmark
from avl_genreplay.generator_training import GeneratorTrainingPlugin
from avl_genreplay.generators.diffusion import DDPMTrainer, DiffusionGenerator
from avl_genreplay.generators.wgan_gp import ConvGenerator
from avl_genreplay.replay_pool import ReplayPool, ReplayPoolPlugin
from avl_genreplay.strategies import DDGR

SHAPE = (1, 12, 12)


def _real_images(experience, n):
    """``n`` images and labels of an experience, as tensors."""
    subset = subsample_experience(experience, n, seed=0).dataset
    x, y, *_ = next(iter(DataLoader(subset, batch_size=n)))
    return x, y


def _tiny_diffusion(**kwargs):
    kwargs.setdefault("base_channels", 8)
    kwargs.setdefault("sampling_steps", 5)
    return DiffusionGenerator(SHAPE, **kwargs)


def test_the_noise_prediction_loss_falls_on_real_mnist(mnist):
    torch.manual_seed(0)
    x, y = _real_images(mnist.train_stream[0], 256)
    generator = DiffusionGenerator((1, 28, 28), 10, base_channels=8)
    generator.calibrate_range(x)
    trainer = DDPMTrainer(generator, lr=2e-3)
    losses = [trainer.train_step(x[i::4], y[i::4])["diffusion"] for i in range(4)]
    for _ in range(36):
        i = int(torch.randint(4, ()))
        losses.append(trainer.train_step(x[i::4], y[i::4])["diffusion"])
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert all(torch.isfinite(torch.tensor(losses)))
    assert last < 0.6 * first


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_with_one_seed_is_deterministic(sampler):
    torch.manual_seed(0)
    generator = _tiny_diffusion(num_classes=3, sampler=sampler).eval()
    labels = torch.tensor([0, 1, 2, 2])
    a = generator.sample(4, labels, seed=7)
    b = generator.sample(4, labels, seed=7)
    c = generator.sample(4, labels, seed=8)
    assert a.shape == (4, *SHAPE)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_the_ddim_sampling_chunk_size_changes_no_image():
    # sample_mb_size is a speed setting: the pools of a benchmark run must be
    # the same, up to float rounding, whichever chunk size denoised them
    # (12 x 12 = 9 x 16 values)
    torch.manual_seed(0)
    generator = _tiny_diffusion(num_classes=3).eval()
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 3))

    def guidance(x, y):
        return F.log_softmax(classifier(x), 1).gather(1, y[:, None]).squeeze(1)

    labels = torch.arange(3).repeat(7)
    images = []
    for chunk in (len(labels), 8, 5):
        generator.sample_mb_size = chunk
        images.append(generator.sample(len(labels), labels, guidance=guidance, seed=3))
    assert torch.allclose(images[0], images[1], atol=1e-5)
    assert torch.allclose(images[0], images[2], atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_a_perfect_prediction_of_any_type_gives_back_the_noise(prediction_type):
    torch.manual_seed(0)
    generator = _tiny_diffusion(prediction_type=prediction_type)
    clean, noise = torch.rand(6, *SHAPE) * 2 - 1, torch.randn(6, *SHAPE)
    t = torch.tensor([0, 10, 250, 500, 900, 999])
    noisy = generator.add_noise(clean, noise, t)
    target = generator.training_target(clean, noise, t)
    # a UNet that outputs exactly its training target
    generator.predict = lambda x, steps, condition=None: target
    assert torch.allclose(generator.predict_noise(noisy, t), noise, atol=1e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_weights_cap_every_type_at_gamma(prediction_type):
    generator = _tiny_diffusion(prediction_type=prediction_type)
    trainer = DDPMTrainer(generator, snr_gamma=5.0)
    t = torch.tensor([0, 100, 500, 999])
    snr = generator.snr(t)
    weights = trainer._snr_weight(t)
    # in clean-image terms the weight is min(SNR, gamma) for every type
    in_x0_terms = {
        "epsilon": weights * snr,
        "sample": weights,
        "v_prediction": weights * (snr + 1),
    }[prediction_type]
    assert torch.allclose(in_x0_terms, snr.clamp(max=5.0), rtol=1e-4)
    assert snr[0] > 5.0 > snr[-1]


def test_min_snr_weighting_reaches_the_training_loss():
    generator = _tiny_diffusion(num_classes=2, prediction_type="epsilon")
    x, y = torch.rand(16, *SHAPE), torch.tensor([0, 1] * 8)

    def loss(gamma):
        torch.manual_seed(0)  # the same timesteps and noise for every gamma
        return DDPMTrainer(generator, snr_gamma=gamma).loss(x, y)

    plain = loss(None)
    # for noise prediction the weight is min(SNR, gamma) / SNR: 1 when gamma
    # caps nothing, below 1 at the timesteps whose SNR exceeds gamma
    assert torch.allclose(loss(1e12), plain)
    assert loss(0.5) < plain


def test_the_moving_average_is_what_the_generator_keeps():
    torch.manual_seed(0)
    generator = _tiny_diffusion(num_classes=2)
    trainer = DDPMTrainer(generator, lr=1e-2, ema_decay=0.9)
    x, y = torch.rand(8, *SHAPE), torch.tensor([0, 1] * 4)
    trainer.start_experience(0)
    for _ in range(5):
        trainer.train_step(x, y)
    last = [p.clone() for p in generator.unet.parameters()]
    average = [p.clone() for p in trainer.average.current.average.module.parameters()]
    trainer.end_experience(0)
    kept = list(generator.unet.parameters())
    assert all(torch.equal(k, a) for k, a in zip(kept, average))
    assert not all(torch.equal(k, p) for k, p in zip(kept, last))
    assert trainer.average.current is None


def test_distilled_replay_learns_the_previous_models_predictions():
    torch.manual_seed(0)
    generator = _tiny_diffusion(num_classes=3)
    trainer = DDPMTrainer(generator, lr=1e-2, distill_replay=True)
    first = torch.rand(8, *SHAPE), torch.tensor([0, 1] * 4)
    trainer.start_experience(0)
    for _ in range(3):
        trainer.train_step(*first)
    assert trainer.teacher is None  # nothing to distil in the first experience
    trainer.end_experience(0)
    assert trainer.learned_classes == [0, 1]
    trainer.start_experience(1)
    assert trainer.teacher is not None
    # at the start the model is its teacher: replayed classes cost nothing,
    # while the same images as a new class are still learned from the image
    replayed = trainer.loss(first[0], first[1])
    new_class = trainer.loss(first[0], torch.full((8,), 2))
    assert replayed.item() < 1e-10 < new_class.item()
    trainer.train_step(first[0], torch.tensor([0, 2] * 4))
    teacher = [p.clone() for p in trainer.teacher.parameters()]
    # a resumed trainer distils from the same teacher
    resumed = DDPMTrainer(_tiny_diffusion(num_classes=3), distill_replay=True)
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.learned_classes == [0, 1]
    assert all(torch.equal(p, q) for p, q in zip(resumed.teacher.parameters(), teacher))
    assert not all(torch.equal(p, q) for p, q in zip(generator.parameters(), teacher))
    trainer.end_experience(1)
    assert trainer.learned_classes == [0, 1, 2] and trainer.teacher is None
    with pytest.raises(ValueError, match="class-conditional"):
        DDPMTrainer(_tiny_diffusion(), distill_replay=True)


def test_ddim_sampling_is_deterministic_from_its_starting_noise():
    torch.manual_seed(0)
    generator = _tiny_diffusion(num_classes=3).eval()
    noise = torch.randn(4, *SHAPE)
    labels = torch.tensor([0, 1, 2, 0])
    assert torch.equal(generator(noise, labels), generator(noise, labels))


def test_guidance_raises_the_classifiers_accuracy_on_the_requested_class(mnist):
    torch.manual_seed(0)
    x, y = _real_images(mnist.train_stream[0], 512)  # classes 0 and 1
    classifier = SimpleMLP(num_classes=2, hidden_size=64, drop_rate=0)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    for _ in range(100):
        picks = torch.randint(len(x), (64,))
        loss = F.cross_entropy(classifier(x[picks]), y[picks])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    classifier.eval()
    for parameter in classifier.parameters():
        parameter.requires_grad_(False)
    # an unconditional model: only guidance can pick the class
    generator = DiffusionGenerator((1, 28, 28), None, base_channels=8)
    generator.calibrate_range(x)
    trainer = DDPMTrainer(generator, lr=2e-3)
    for _ in range(40):
        trainer.train_step(x[torch.randint(len(x), (64,))])
    generator.eval()

    def log_prob(images, labels):
        return F.log_softmax(classifier(images), 1).gather(1, labels.view(-1, 1))[:, 0]

    wanted = torch.tensor([0, 1]).repeat(32)

    def accuracy(scale):
        samples = generator.sample(
            64, wanted, guidance=log_prob, guidance_scale=scale, seed=0
        )
        return (classifier(samples).argmax(1) == wanted).float().mean().item()

    unguided, guided = accuracy(0.0), accuracy(20.0)
    assert guided > unguided + 0.2 and guided > 0.9


class LabelRecordingTrainer(DDPMTrainer):
    """Records the labels of every batch the diffusion model learns from."""

    def __init__(self, generator, **kwargs):
        super().__init__(generator, **kwargs)
        self.labels = []

    def train_step(self, x, y=None):
        self.labels.append(y.clone())
        return super().train_step(x, y)


class TeacherCallsTrainer(DDPMTrainer):
    """Records how many samples of each batch its teacher is asked for."""

    def __init__(self, generator, **kwargs):
        super().__init__(generator, **kwargs)
        self.teacher_calls = []

    def start_experience(self, experience_index):
        super().start_experience(experience_index)
        if self.teacher is not None:
            predict = self.teacher.predict

            def recorded(noisy, t, y):
                self.teacher_calls.append(len(y))
                return predict(noisy, t, y)

            self.teacher.predict = recorded


def test_in_a_domain_incremental_stream_only_the_replay_is_distilled():
    """Both experiences hold classes 0 and 1: the generator-training plugin
    tells the trainer which half of each batch of 8 is replay, and only those
    4 samples are distilled. Told by their labels (classes of past
    experiences), the new data would be distilled too, and never learned."""
    torch.manual_seed(0)
    stream = synthetic_benchmark(
        input_shape=SHAPE,
        num_classes=4,
        n_experiences=2,
        per_class=16,
        scenario="domain",
    )
    trainer = TeacherCallsTrainer(
        _tiny_diffusion(num_classes=2, sampling_steps=2), distill_replay=True
    )
    model = SimpleMLP(num_classes=2, input_size=144, hidden_size=16, drop_rate=0)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        train_mb_size=8,
        evaluator=EvaluationPlugin(loggers=[]),
        plugins=[
            GeneratorTrainingPlugin(
                trainer,
                train_iterations=3,
                train_mb_size=8,
                replay_share=0.5,
                progress_bar=False,
            )
        ],
    )
    for experience in stream.train_stream:
        strategy.train(experience)
    assert trainer.teacher_calls == [4, 4, 4]


def test_guidance_on_xt_takes_the_gradient_at_the_noisy_input():
    """``guide_on="xt"``: the classifier sees the noisy images the denoiser
    gets (in the data's range), not the predicted clean ones, and its gradient
    moves the samples toward the requested class."""
    torch.manual_seed(0)
    generator = _tiny_diffusion(data_range=(3.0, 5.0))
    generator.eval()
    noisy_inputs, guided_inputs = [], []
    predict_noise = generator.predict_noise

    def recording_predict_noise(noisy, t, condition=None):
        noisy_inputs.append(noisy.clone())
        return predict_noise(noisy, t, condition)

    generator.predict_noise = recording_predict_noise

    def log_prob(images, labels):
        # a two-class logistic classifier on the mean brightness: class 0 for
        # bright images, class 1 for dark ones
        brightness = images.mean(dim=(1, 2, 3)) - 4.0
        logits = torch.stack([brightness, -brightness], 1) * 4
        guided_inputs.append(images.detach().clone())
        return F.log_softmax(logits, 1).gather(1, labels.view(-1, 1))[:, 0]

    wanted = torch.tensor([0, 1]).repeat(4)

    def samples(scale):
        noisy_inputs.clear(), guided_inputs.clear()
        return generator.sample(
            8, wanted, guidance=log_prob, guidance_scale=scale, guide_on="xt", seed=0
        )

    plain, guided = samples(0.0), samples(5.0)
    assert len(guided_inputs) == len(noisy_inputs) == generator.sampling_steps
    for noisy, seen in zip(noisy_inputs, guided_inputs):
        torch.testing.assert_close(seen, generator.to_data_range(noisy))
    shift = guided.mean(dim=(1, 2, 3)) - plain.mean(dim=(1, 2, 3))
    assert torch.all(shift[wanted == 0] > 0) and torch.all(shift[wanted == 1] < 0)


def test_the_replay_pool_holds_past_classes_in_the_datas_range(tiny_stream):
    torch.manual_seed(0)
    model = SimpleMLP(num_classes=6, input_size=144, hidden_size=32, drop_rate=0)
    strategy = DDGR(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        generator=_tiny_diffusion(num_classes=6),
        generator_iterations=6,
        samples_per_class=10,
        distill_replay=True,
        progress_bar=False,
        train_mb_size=16,
        evaluator=EvaluationPlugin(loggers=[]),
    )
    assert strategy.generator_plugin.trainer.distill_replay
    recorder = LabelRecordingTrainer(strategy.generator, distill_replay=True)
    strategy.generator_plugin.trainer = recorder
    for index, experience in enumerate(tiny_stream.train_stream):
        before = len(recorder.labels)
        strategy.train(experience)
        past = sorted(
            c
            for e in tiny_stream.train_stream[:index]
            for c in e.classes_in_this_experience
        )
        pool = strategy.pool
        assert len(pool) == 10 * len(past)
        if not past:
            continue
        assert pool.x.shape == (10 * len(past), *SHAPE)
        assert torch.isfinite(pool.x).all()
        # in the data's range, calibrated on the first experience: its
        # standard-normal pixels reach well beyond the default [-1, 1]
        low, high = strategy.generator.range_low, strategy.generator.range_high
        assert low.item() < -2 and high.item() > 2
        assert pool.x.min() < -1 and pool.x.max() > 1
        assert torch.bincount(pool.y, minlength=6)[past].tolist() == [10] * len(past)
        assert sorted(pool.y.unique().tolist()) == past
        # replay reached the solver, labelled with past classes only
        assert set(strategy.replay_plugin.replayed_class_counts[-1]) == set(past)
        # and the diffusion model, beside the new classes
        seen = set(torch.cat(recorder.labels[before:]).tolist())
        assert set(past) <= seen
        assert seen - set(past) == set(experience.classes_in_this_experience)
        # the replayed classes were distilled from the model before this experience
        assert recorder.learned_classes == sorted(seen)
    log = strategy.pool_plugin.sampling_log
    assert [entry["images"] for entry in log] == [20, 40]
    assert all(entry["images_per_second"] > 0 for entry in log)


def _strategy_kwargs():
    model = SimpleMLP(num_classes=6, input_size=144, hidden_size=32, drop_rate=0)
    return dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "needs input_shape and num_classes"),
        (dict(generator=_tiny_diffusion()), "class-conditional"),
        (dict(input_shape=SHAPE, num_classes=6, samples_per_class=0), ">= 1"),
        (dict(input_shape=SHAPE, num_classes=6, guidance_scale=-1), ">= 0"),
        (dict(input_shape=SHAPE, num_classes=6, sampling_steps=0), "sampling_steps"),
        (dict(input_shape=SHAPE, num_classes=6, generator_lr=0), "lr must be"),
    ],
)
def test_bad_ddgr_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DDGR(**_strategy_kwargs(), **kwargs)


def test_bad_sampling_requests_are_refused():
    generator = _tiny_diffusion(num_classes=3)
    with pytest.raises(ValueError, match="guide_on"):
        generator.sample(2, torch.tensor([0, 1]), guide_on="both")
    with pytest.raises(ValueError, match="needs the classes"):
        generator.sample(2, guidance=lambda x, y: x.sum())
    with pytest.raises(ValueError, match="outside"):
        generator.sample(2, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="sampler"):
        _tiny_diffusion(sampler="euler")
    with pytest.raises(ValueError, match="prediction_type"):
        _tiny_diffusion(prediction_type="score")
    with pytest.raises(ValueError, match="snr_gamma"):
        DDPMTrainer(generator, snr_gamma=0)
    with pytest.raises(ValueError, match="ema_decay"):
        DDPMTrainer(generator, ema_decay=1.0)


def test_the_pool_refuses_classes_it_does_not_hold():
    pool = ReplayPool(SHAPE, 6)
    with pytest.raises(ValueError, match="empty"):
        pool.generate(2)
    pool.fill(torch.zeros(4, *SHAPE), torch.tensor([1, 1, 2, 2]))
    assert pool.generate(3, torch.tensor([2, 2, 1])).shape == (3, *SHAPE)
    with pytest.raises(ValueError, match="no sample of class 4"):
        pool.generate(2, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="shape"):
        pool.fill(torch.zeros(2, 3, 12, 12), torch.tensor([1, 2]))
    dataset = pool.as_dataset()
    assert len(dataset) == 4 and list(dataset.targets) == [1, 1, 2, 2]
    assert pool.generate(5).shape == (5, *SHAPE)  # no condition: any class
    with pytest.raises(ValueError, match="one class per sample"):
        pool.generate(3, torch.tensor([1, 2]))


def test_the_pool_plugin_fills_from_any_conditional_generator(tiny_stream):
    # a generator without a guided ``sample`` (here a conditional GAN) is
    # sampled through ``generate``, unguided
    generator = ConvGenerator(SHAPE, 8, channels=4, num_classes=6)
    pool = ReplayPool(SHAPE, 6)
    plugin = ReplayPoolPlugin(generator, pool, samples_per_class=5, progress_bar=False)
    strategy = Naive(
        **_strategy_kwargs(), evaluator=EvaluationPlugin(loggers=[]), plugins=[plugin]
    )
    strategy.train(tiny_stream.train_stream[0])
    assert len(pool) == 0  # nothing to replay before the second experience
    strategy.train(tiny_stream.train_stream[1])
    past = sorted(tiny_stream.train_stream[0].classes_in_this_experience)
    assert torch.bincount(pool.y).nonzero().flatten().tolist() == past
    assert torch.bincount(pool.y)[past].tolist() == [5, 5]
    assert pool.x.shape == (10, *SHAPE) and torch.isfinite(pool.x).all()


def test_a_pool_kept_between_experiences_samples_only_the_newly_past_classes(
    tiny_stream,
):
    generator = ConvGenerator(SHAPE, 8, channels=4, num_classes=6)
    sampled = []
    generate = generator.generate
    generator.generate = lambda n, y: sampled.append(y.tolist()) or generate(n, y)
    pool = ReplayPool(SHAPE, 6)
    plugin = ReplayPoolPlugin(
        generator, pool, samples_per_class=5, regenerate=False, progress_bar=False
    )
    strategy = Naive(
        **_strategy_kwargs(), evaluator=EvaluationPlugin(loggers=[]), plugins=[plugin]
    )
    first, second, _ = (
        sorted(e.classes_in_this_experience) for e in tiny_stream.train_stream
    )
    strategy.train(tiny_stream.train_stream[0])
    strategy.train(tiny_stream.train_stream[1])
    kept_x, kept_y = pool.x.clone(), pool.y.clone()
    sampled.clear()
    strategy.train(tiny_stream.train_stream[2])
    assert sorted(set(sum(sampled, []))) == second  # not the first's again
    assert torch.equal(pool.x[:10], kept_x) and torch.equal(pool.y[:10], kept_y)
    assert sorted(pool.y[10:].unique().tolist()) == second
    assert torch.bincount(pool.y, minlength=6)[first + second].tolist() == [5] * 4
    assert [entry["images"] for entry in plugin.sampling_log] == [10, 10]


def test_a_kept_pool_draws_again_the_classes_that_come_back():
    # domain-incremental: every experience teaches the same classes again, so
    # nothing is kept and the pool is the one regenerate=True draws
    domain = synthetic_benchmark(
        input_shape=SHAPE,
        num_classes=6,
        n_experiences=3,
        per_class=8,
        scenario="domain",
    )
    torch.manual_seed(0)
    generator = ConvGenerator(SHAPE, 8, channels=4, num_classes=2)
    pools = []
    for regenerate in (True, False):
        pool = ReplayPool(SHAPE, 2)
        learner = copy.deepcopy(generator)
        plugin = ReplayPoolPlugin(
            learner,
            pool,
            samples_per_class=5,
            regenerate=regenerate,
            progress_bar=False,
        )
        torch.manual_seed(1)
        strategy = Naive(
            **_strategy_kwargs(),
            evaluator=EvaluationPlugin(loggers=[]),
            plugins=[plugin],
        )
        for experience in domain.train_stream:
            strategy.train(experience)
            with torch.no_grad():  # stands for what the generator learned
                for parameter in learner.parameters():
                    parameter.mul_(0.9)
        pools.append(pool)
    assert len(pools[0]) == 10
    assert torch.equal(pools[0].x, pools[1].x) and torch.equal(pools[0].y, pools[1].y)


def test_the_pool_plugin_needs_a_conditional_generator():
    with pytest.raises(ValueError, match="class-conditional"):
        ReplayPoolPlugin(_tiny_diffusion(), ReplayPool(SHAPE, 6))


def _record_conv_dtypes(generator):
    """The UNet's first convolution and the list its outputs' dtypes go to."""
    dtypes = []
    first_conv = next(m for m in generator.unet.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    return first_conv, dtypes


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_the_unet_computes_at_the_chosen_precision(precision):
    torch.manual_seed(0)
    generator = _tiny_diffusion(num_classes=3, precision=precision)
    first_conv, conv_outputs = _record_conv_dtypes(generator)
    trainer = DDPMTrainer(generator, lr=1e-3)
    trainer.train_step(torch.rand(8, *SHAPE), torch.arange(8) % 3)
    images = generator.sample(4, torch.arange(4) % 3, seed=0)
    labels = torch.tensor([0, 1])
    raw = generator.predict(torch.randn(2, *SHAPE), torch.tensor([5, 500]), labels)
    expected = torch.bfloat16 if precision == "bfloat16" else torch.float32
    assert set(conv_outputs) == {expected}
    # weights, their gradients and what leaves the model stay in float32
    assert first_conv.weight.dtype == first_conv.weight.grad.dtype == torch.float32
    assert raw.dtype == images.dtype == torch.float32
    assert torch.isfinite(images).all()


def test_the_unet_can_train_in_bfloat16_and_sample_in_float32():
    torch.manual_seed(0)
    generator = _tiny_diffusion(
        num_classes=3, precision="bfloat16", sampling_precision="float32"
    )
    first_conv, conv_outputs = _record_conv_dtypes(generator)
    DDPMTrainer(generator, lr=1e-3).train_step(
        torch.rand(8, *SHAPE), torch.arange(8) % 3
    )
    assert set(conv_outputs) == {torch.bfloat16}
    conv_outputs.clear()
    images = generator.sample(4, torch.arange(4) % 3, seed=0)
    assert set(conv_outputs) == {torch.float32}
    # the very samples of a float32 model with the same weights
    plain = _tiny_diffusion(num_classes=3)
    plain.load_state_dict(generator.state_dict())
    assert torch.equal(images, plain.sample(4, torch.arange(4) % 3, seed=0))


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_computes_in_bfloat16_only_where_the_device_has_it(
    monkeypatch, native
):
    import avl_genreplay.generators.diffusion as diffusion

    asked = []

    def fake_native_bfloat16(device):
        asked.append(torch.device(device).type)
        return native

    monkeypatch.setattr(diffusion, "native_bfloat16", fake_native_bfloat16)
    generator = _tiny_diffusion(
        num_classes=3, precision="auto", sampling_precision="float32"
    )
    first_conv, conv_outputs = _record_conv_dtypes(generator)
    DDPMTrainer(generator, lr=1e-3).train_step(
        torch.rand(8, *SHAPE), torch.arange(8) % 3
    )
    assert set(conv_outputs) == {torch.bfloat16 if native else torch.float32}
    assert asked and set(asked) == {"cpu"}
    conv_outputs.clear()
    generator.sample(2, torch.tensor([0, 1]), seed=0)
    assert set(conv_outputs) == {torch.float32}


def test_ddgr_builds_its_diffusion_model_at_the_chosen_precision():
    model = SimpleMLP(num_classes=3, input_size=144)
    strategy = DDGR(
        model=model,
        optimizer=torch.optim.Adam(model.parameters()),
        input_shape=SHAPE,
        num_classes=3,
        precision="bfloat16",
        sampling_precision="float32",
    )
    assert strategy.generator.precision == "bfloat16"
    assert strategy.generator.sampling_precision == "float32"
    with pytest.raises(ValueError, match="precision must be one of"):
        _tiny_diffusion(precision="float16")
    with pytest.raises(ValueError, match="sampling_precision must be None or one of"):
        _tiny_diffusion(sampling_precision="float16")
