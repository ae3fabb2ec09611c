"""The method-agnostic solver replay plugin and the generator-training plugin."""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.models import MlpVAE, MultiTaskModule, SimpleMLP, as_multitask
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin, EWCPlugin, LwFPlugin
from torch import nn

from avl_genreplay.bench.data import synthetic_benchmark
from avl_genreplay.generator_training import GeneratorTrainingPlugin, TrainingGuard
from avl_genreplay.generators.wgan_gp import ConvGenerator, WGANGPTrainer
from avl_genreplay.generators.base import GeneratorTrainer
from avl_genreplay.replay import (
    SolverReplayPlugin,
    UntrainedGeneratorWarning,
    distillation_loss,
    experience_classes,
    experience_task_label,
)
from avl_genreplay.generators.diffusion import DiffusionGenerator
from avl_genreplay.strategies import DDGR, DGM, DGR

SHAPE = (1, 12, 12)


def quiet():
    return EvaluationPlugin(loggers=[])


def solver(num_classes=6):
    return SimpleMLP(
        num_classes=num_classes, input_size=144, hidden_size=32, drop_rate=0
    )


class Recorder(SupervisedPlugin):
    """Records, at each backward, the minibatch, the replay and the loss."""

    def __init__(self, replay_plugin):
        super().__init__()
        self.replay_plugin = replay_plugin
        self.records = []

    def before_backward(self, strategy, **kwargs):
        self.records.append(
            dict(
                experience=strategy.experience.current_experience,
                mb_size=len(strategy.mb_x),
                replay=self.replay_plugin.last_replay,
                loss=strategy.loss.detach().clone(),
            )
        )

    def of(self, experience):
        return [r for r in self.records if r["experience"] == experience]


def small_dgr(model, **kwargs):
    kwargs.setdefault("generator", ConvGenerator(SHAPE, channels=8))
    return DGR(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        generator_iterations=3,
        progress_bar=False,
        train_mb_size=10,
        evaluator=quiet(),
        **kwargs,
    )


def test_replay_minibatches_have_the_asked_size_and_past_labels_only(tiny_stream):
    strategy = small_dgr(solver(), replay_mb_size=7)
    recorder = Recorder(strategy.replay_plugin)
    strategy.plugins.append(recorder)
    for experience in tiny_stream.train_stream:
        strategy.train(experience)
    assert all(r["replay"] is None for r in recorder.of(0))
    for index, past in ((1, {0, 1}), (2, {0, 1, 2, 3})):
        records = recorder.of(index)
        assert records and all(r["mb_size"] == 10 for r in records[:-1])
        for record in records:
            replay = record["replay"]
            assert replay.x.shape == (7, *SHAPE) and replay.y.shape == (7,)
            assert set(replay.y.tolist()) <= past
            assert torch.isfinite(record["loss"])


def test_replay_batch_defaults_to_the_current_minibatch_size(tiny_stream):
    strategy = small_dgr(solver())
    recorder = Recorder(strategy.replay_plugin)
    strategy.plugins.append(recorder)
    for experience in tiny_stream.train_stream[:2]:
        strategy.train(experience)
    for record in recorder.of(1):
        assert len(record["replay"].x) == record["mb_size"]


def test_old_solver_and_generator_stay_frozen(tiny_stream):
    strategy = small_dgr(solver())
    plugin = strategy.replay_plugin
    snapshots = {}

    class Snapshot(SupervisedPlugin):
        def before_training_epoch(self, strategy, **kwargs):
            snapshots["start"] = [
                [p.clone() for p in m.parameters()]
                for m in (plugin.old_solver, plugin.old_generator)
            ]

        def after_training_epoch(self, strategy, **kwargs):
            snapshots["end"] = [
                list(m.parameters()) for m in (plugin.old_solver, plugin.old_generator)
            ]
            snapshots["training"] = (
                plugin.old_solver.training,
                plugin.old_generator.training,
            )

    strategy.train(tiny_stream.train_stream[0])
    strategy.plugins.append(Snapshot())
    strategy.train(tiny_stream.train_stream[1])
    for start, end in zip(snapshots["start"], snapshots["end"]):
        for a, b in zip(start, end):
            assert torch.equal(a, b) and not b.requires_grad
    assert snapshots["training"] == (False, False)
    # the live networks did learn meanwhile
    assert any(
        not torch.equal(a, b)
        for a, b in zip(snapshots["start"][0], strategy.model.parameters())
    )


def test_loss_weighs_current_and_replay_by_the_ratio_in_naive_by_hand(tiny_stream):
    """The plugins also work added to Avalanche's Naive; with r = 0.25 the loss
    is 0.25 * loss(current) + 0.75 * loss(replay)."""
    model = solver()
    generator = ConvGenerator(SHAPE, channels=8)
    replay = SolverReplayPlugin(generator, importance_ratio=0.25, replay_mb_size=5)
    before = Recorder(replay)
    after = Recorder(replay)
    training = GeneratorTrainingPlugin(
        WGANGPTrainer(generator), train_iterations=2, progress_bar=False
    )
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),  # loss unaffected
        train_mb_size=8,
        evaluator=quiet(),
        plugins=[before, replay, after, training],
    )
    strategy.train(tiny_stream.train_stream[0])
    strategy.train(tiny_stream.train_stream[1])
    for first, second in zip(before.of(1), after.of(1)):
        batch = second["replay"]
        replay_loss = F.cross_entropy(model(batch.x), batch.y)
        expected = 0.25 * first["loss"] + 0.75 * replay_loss
        assert torch.allclose(second["loss"], expected, atol=1e-5)


def _adds_recorded(plugin_class, **kwargs):
    """An instance of ``plugin_class`` that records the term its
    ``before_backward`` adds to the loss at each iteration."""

    class Recorded(plugin_class):
        def before_backward(self, strategy, **kw):
            before = strategy.loss.detach().clone()
            super().before_backward(strategy, **kw)
            self.added.append(strategy.loss.detach() - before)

    plugin = Recorded(**kwargs)
    plugin.added = []
    return plugin


class FinalLoss(SupervisedPlugin):
    """Records, after each backward, the loss and its parts: the criterion on
    the minibatch and on the replay (the model is not updated yet)."""

    def __init__(self, replay_plugin):
        super().__init__()
        self.replay_plugin = replay_plugin
        self.records = []

    @torch.no_grad()
    def after_backward(self, strategy, **kwargs):
        replay = self.replay_plugin.last_replay
        if replay is None:
            return
        self.records.append(
            dict(
                loss=strategy.loss.detach().clone(),
                current=F.cross_entropy(strategy.mb_output, strategy.mb_y),
                replay=F.cross_entropy(strategy.model(replay.x), replay.y),
            )
        )


def _replay_with(tiny_stream, other_class, other_kwargs, replay_first):
    torch.manual_seed(0)
    model = solver()
    replay = SolverReplayPlugin(
        ConvGenerator(SHAPE, channels=8), importance_ratio=0.25, replay_mb_size=6
    )
    other = _adds_recorded(other_class, **other_kwargs)
    final = FinalLoss(replay)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=8,
        evaluator=quiet(),
        plugins=([replay, other] if replay_first else [other, replay]) + [final],
    )
    for experience in tiny_stream.train_stream[:2]:
        strategy.train(experience)
    added = other.added[-len(final.records) :]  # those of the replay iterations
    return added, final.records


@pytest.mark.parametrize(
    "other_class, other_kwargs",
    [
        (EWCPlugin, dict(ewc_lambda=1000.0)),
        (LwFPlugin, dict(alpha=100.0, temperature=2.0)),
    ],
    ids=["EWC", "LwF"],
)
def test_other_plugins_terms_are_not_scaled_by_the_ratio(
    tiny_stream, other_class, other_kwargs
):
    """With EWC or LwF beside replay, in either order, the loss is
    ``r * loss(current) + (1 - r) * loss(replay) + their term``; rescaling
    the whole loss (``r * strategy.loss``) would halve their term when they
    come first, and the two orders would train differently."""
    runs = [
        _replay_with(tiny_stream, other_class, other_kwargs, replay_first)
        for replay_first in (True, False)
    ]
    for added, records in runs:
        assert len(records) > 1
        # the other plugin's term is large enough to tell a scaled one apart
        assert max(term.item() for term in added) > 0.01
        for term, record in zip(added, records):
            expected = 0.25 * record["current"] + 0.75 * record["replay"] + term
            assert torch.allclose(record["loss"], expected, atol=1e-5)
    first, second = ([record["loss"] for record in run[1]] for run in runs)
    assert torch.allclose(torch.stack(first), torch.stack(second), atol=1e-4)


def _untrained_generator_warnings(strategy, experiences):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for experience in experiences:
            strategy.train(experience)
    return [w for w in caught if issubclass(w.category, UntrainedGeneratorWarning)]


def test_replay_from_a_generator_that_never_learned_warns_once(tiny_stream):
    """Avalanche issue #1138: replay without generator training is noise."""
    model = solver()
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        train_mb_size=16,
        evaluator=quiet(),
        plugins=[SolverReplayPlugin(MlpVAE(SHAPE, nhid=4))],
    )
    caught = _untrained_generator_warnings(strategy, tiny_stream.train_stream)
    assert len(caught) == 1  # at the second experience, not again at the third
    assert "SolverReplayPlugin replays samples of a MlpVAE" in str(caught[0].message)


def _strategy_of(name):
    model = solver()
    common = dict(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        generator_iterations=2,
        progress_bar=False,
        train_mb_size=16,
        evaluator=quiet(),
    )
    if name == "DGR":
        # one critic step per generator step: the generator learns in 2 steps
        generator = ConvGenerator(SHAPE, channels=8)
        return DGR(generator=generator, critic_steps=1, **common)
    if name == "DGM":
        return DGM(
            input_shape=SHAPE,
            num_classes=6,
            generator_channels=(8, 4),
            discriminator_channels=8,
            **common,
        )
    diffusion = DiffusionGenerator(SHAPE, 6, base_channels=8, sampling_steps=2)
    return DDGR(generator=diffusion, samples_per_class=2, **common)


@pytest.mark.parametrize("name", ["DGR", "DGM", "DDGR"])
def test_no_untrained_generator_warning_when_the_generator_learns(tiny_stream, name):
    """The generators (and DDGR's replay pool, filled from a diffusion model
    that learned) change between experiences: no false alarm."""
    strategy = _strategy_of(name)
    assert not _untrained_generator_warnings(strategy, tiny_stream.train_stream)


def test_default_ratio_is_the_share_of_the_current_task(tiny_stream):
    strategy = small_dgr(solver())
    ratios = []

    class Ratio(SupervisedPlugin):
        def before_training_exp(self, strategy, **kwargs):
            ratios.append(strategy.replay_plugin.current_ratio())

    strategy.plugins.append(Ratio())
    for experience in tiny_stream.train_stream:
        strategy.train(experience)
    assert ratios == pytest.approx([1.0, 1 / 2, 1 / 3])


def test_soft_targets_distil_over_past_classes(tiny_stream):
    strategy = small_dgr(solver(), soft_targets=True, temperature=2.0)
    recorder = Recorder(strategy.replay_plugin)
    strategy.plugins.append(recorder)
    for experience in tiny_stream.train_stream[:2]:
        strategy.train(experience)
    for record in recorder.of(1):
        probabilities = F.softmax(record["replay"].logits, dim=1)
        assert torch.all(probabilities[:, 2:] < 1e-6)  # only classes 0 and 1
        assert torch.isfinite(record["loss"])


def _multitask_calls(model):
    """Records, at each call of ``model`` on a replayed batch, the task labels
    it was given and whether each sample's output is its task's head's."""
    calls = []

    def hook(module, args, output):
        if module is not model:  # the old solver, a deep copy, has the hook too
            return
        x, tasks = args
        with torch.no_grad():
            heads_agree = all(
                torch.allclose(
                    output[tasks == task],
                    module.forward_single_task(x[tasks == task], int(task)),
                    atol=1e-6,
                )
                for task in tasks.unique()
            )
        calls.append((x, tasks.clone(), heads_agree))

    model.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("conditional", [False, True])
def test_task_incremental_replay_reaches_the_head_of_its_task(conditional):
    """Each replayed sample carries the task label of its class and is scored
    by that task's head (a MultiTaskModule's), not by head 0."""
    stream = synthetic_benchmark(
        input_shape=SHAPE, num_classes=6, n_experiences=3, per_class=16, scenario="task"
    )
    model = as_multitask(solver(), "classifier")
    generator = ConvGenerator(SHAPE, channels=8, num_classes=6 if conditional else None)
    strategy = small_dgr(model, generator=generator)
    recorder = Recorder(strategy.replay_plugin)
    strategy.plugins.append(recorder)
    calls = _multitask_calls(model)
    for experience in stream.train_stream:
        strategy.train(experience)
    records = recorder.of(2)
    assert records
    assert {t for r in records for t in r["replay"].t.tolist()} == {0, 1}
    task_of_class = {0: 0, 1: 0, 2: 1, 3: 1}
    for record in records:
        replay = record["replay"]
        assert replay.t.tolist() == [task_of_class[c] for c in replay.y.tolist()]
        tasks, heads_agree = next((t, agree) for x, t, agree in calls if x is replay.x)
        assert torch.equal(tasks, replay.t) and heads_agree


def _head_inputs(model, tasks):
    """Records the input of each of the heads of ``tasks`` of a multi-head
    solver at each call (the old solver, a deep copy, has the hooks too)."""
    inputs = {task: [] for task in tasks}
    for task in tasks:
        head = model.classifier.classifiers[str(task)]

        def hook(module, args, output, task=task, head=head):
            if module is head:
                inputs[task].append(args[0].detach().clone())

        head.register_forward_hook(hook)
    return inputs


def test_score_every_head_gives_each_past_head_every_replayed_sample():
    """From the third task on, each replayed sample reaches the heads of both
    past tasks, labelled on each by the old solver among that task's classes,
    and the current task's head gets none; one task label drawn per sample
    would split the samples between the heads."""
    torch.set_num_threads(1)
    stream = synthetic_benchmark(
        input_shape=SHAPE, num_classes=6, n_experiences=3, per_class=16, scenario="task"
    )
    model = as_multitask(solver(), "classifier")
    strategy = small_dgr(model, replay_mb_size=8, score_every_head=True)
    recorder = Recorder(strategy.replay_plugin)
    strategy.plugins.append(recorder)
    for experience in stream.train_stream[:2]:
        strategy.train(experience)
    inputs = _head_inputs(model, (0, 1))
    strategy.train(stream.train_stream[2])
    records = recorder.of(2)
    assert records and len(inputs[0]) == len(inputs[1]) == len(records)
    for record, head_0, head_1 in zip(records, inputs[0], inputs[1]):
        replay = record["replay"]
        assert len(head_0) == 8 and torch.equal(head_0, head_1)
        assert replay.t.tolist() == [0] * 8 + [1] * 8
        assert torch.equal(replay.x[:8], replay.x[8:])
        assert set(replay.y[:8].tolist()) <= {0, 1}
        assert set(replay.y[8:].tolist()) <= {2, 3}
    counts = strategy.replay_plugin.replayed_class_counts[2]
    assert sum(counts.values()) == 2 * 8 * len(records)


class TableHeads(MultiTaskModule):
    """A multi-head solver of 3 outputs whose head ``t`` gives sample ``i``
    (an input filled with ``i``) the logits ``table[t][i]``."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table))
        self.max_class_label = 3

    def forward_single_task(self, x, task_label):
        return self.table[task_label][x.flatten(1)[:, 0].long()]


class Indices(nn.Module):
    """An unconditional stand-in generator: sample ``i`` is filled with ``i``."""

    def generate(self, n):
        return torch.arange(float(n)).view(n, 1, 1, 1).expand(n, *SHAPE)


@pytest.mark.parametrize("soft_targets", [False, True])
def test_score_every_head_loss_is_the_mean_over_the_past_heads(soft_targets):
    """Task 0 has classes 0 and 1, task 1 class 2. The replay loss is the mean
    over both heads of the loss of both samples: distillation of the old
    head's probabilities over its task's classes (KL x T^2, T = 2), or
    cross-entropy on its arg-max over them. With r = 0.25 and a criterion of
    1 on the minibatch, the loss becomes 1 - 0.75 + 0.75 x replay loss."""
    t = 2.0
    old = [[[2.0, 0.0, 9.0], [0.0, 1.0, 9.0]], [[5.0, 0.0, 1.0], [0.0, 3.0, 2.0]]]
    new = [[[0.5, 0.0, 1.0], [1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0], [2.0, 0.0, 1.0]]]
    plugin = SolverReplayPlugin(
        Indices(),
        importance_ratio=0.25,
        replay_mb_size=2,
        soft_targets=soft_targets,
        temperature=t,
        score_every_head=True,
    )
    plugin.past.add(0, [0, 1])
    plugin.past.add(1, [2])
    plugin.old_generator, plugin.old_solver = plugin.generator, TableHeads(old)
    strategy = SimpleNamespace(
        mb_x=torch.zeros(5, *SHAPE),
        device=torch.device("cpu"),
        model=TableHeads(new),
        loss=torch.tensor(1.0),
        criterion=lambda: torch.tensor(1.0),
        _criterion=F.cross_entropy,
    )
    plugin.before_backward(strategy)

    def log_softmax(logits):
        total = math.log(sum(math.exp(v) for v in logits))
        return [v - total for v in logits]

    classes = {0: [0, 1], 1: [2]}
    losses = []
    for head, past in classes.items():
        for i in range(2):
            student = log_softmax(
                [v / (t if soft_targets else 1) for v in new[head][i]]
            )
            if soft_targets:
                teacher = log_softmax([old[head][i][c] / t for c in past])
                losses.append(
                    t**2
                    * sum(math.exp(q) * (q - student[c]) for q, c in zip(teacher, past))
                )
            else:
                label = max(past, key=lambda c: old[head][i][c])
                losses.append(-student[label])
    replay_loss = sum(losses) / 4  # the mean of each head's mean over 2 samples
    assert strategy.loss.item() == pytest.approx(0.25 + 0.75 * replay_loss, rel=1e-5)
    assert plugin.last_replay.t.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("soft_targets", [False, True])
def test_domain_incremental_replay_keeps_to_the_past_classes(soft_targets):
    """With more outputs (6) than classes per experience (2), replayed labels
    and distillation targets stay on the classes the past experiences had."""
    stream = synthetic_benchmark(
        input_shape=SHAPE,
        num_classes=6,
        n_experiences=3,
        per_class=16,
        scenario="domain",
    )
    strategy = small_dgr(solver(num_classes=6), soft_targets=soft_targets)
    recorder = Recorder(strategy.replay_plugin)
    strategy.plugins.append(recorder)
    for experience in stream.train_stream:
        assert experience_classes(experience) == [0, 1]
        strategy.train(experience)
    assert recorder.of(2)
    for record in recorder.of(2):
        replay = record["replay"]
        assert set(replay.y.tolist()) <= {0, 1}
        if soft_targets:
            assert torch.all(F.softmax(replay.logits, dim=1)[:, 2:] < 1e-6)


def test_conditional_generator_replays_each_past_class_equally(tiny_stream):
    generator = ConvGenerator(SHAPE, channels=8, num_classes=6)
    strategy = small_dgr(solver(), generator=generator, replay_mb_size=40)
    recorder = Recorder(strategy.replay_plugin)
    strategy.plugins.append(recorder)
    for experience in tiny_stream.train_stream:
        strategy.train(experience)
    counts = torch.bincount(recorder.of(2)[0]["replay"].y, minlength=6)
    assert counts[:4].tolist() == [10, 10, 10, 10] and counts[4:].sum() == 0


class RecordingFlip:
    """A deterministic stand-in for a random transformation: mirrors the
    images and keeps what it was given and gave."""

    def __init__(self):
        self.calls = []

    def __call__(self, x):
        out = torch.flip(x, dims=[-1])
        self.calls.append((x.clone(), out.clone()))
        return out


class ForwardWatcher(SupervisedPlugin):
    """Records the minibatch around the solver's forward and the replay."""

    def __init__(self, replay_plugin):
        super().__init__()
        self.replay_plugin = replay_plugin
        self.steps = []

    def before_forward(self, strategy, **kwargs):
        self.steps.append(dict(forward_input=strategy.mb_x.clone()))

    def after_forward(self, strategy, **kwargs):
        model_output = strategy.model(self.steps[-1]["forward_input"])
        self.steps[-1].update(
            output_matches=torch.allclose(strategy.mb_output, model_output),
        )

    def after_backward(self, strategy, **kwargs):
        self.steps[-1].update(after=strategy.mb_x.clone())

    def before_backward(self, strategy, **kwargs):
        plugin = self.replay_plugin
        replay = plugin.last_replay
        if plugin.old_generator is None:
            return
        last_input, last_output = plugin.augment.calls[-1]
        old = plugin.old_solver(replay.x)
        past = sorted(plugin.past.by_task[0])
        self.steps[-1].update(
            replay_transformed=torch.equal(replay.x, last_output)
            and torch.equal(last_input.flip(-1), last_output),
            labelled_after=torch.allclose(old[:, past], replay.logits[:, past]),
        )


def test_augmentation_transforms_solver_minibatches_and_replay_alike(tiny_stream):
    flip = RecordingFlip()
    strategy = small_dgr(solver(), augment=flip, soft_targets=True)
    watcher = ForwardWatcher(strategy.replay_plugin)
    strategy.plugins.append(watcher)
    for experience in tiny_stream.train_stream[:2]:
        strategy.train(experience)
    assert len(watcher.steps) > 2
    for step in watcher.steps:
        # the solver's forward saw the mirrored batch, plugins after the
        # backward pass the original one (a generator trained alongside
        # learns the real data)
        assert torch.equal(step["forward_input"], step["after"].flip(-1))
        assert step["output_matches"]
    replayed = [s for s in watcher.steps if "replay_transformed" in s]
    assert replayed and len(replayed) < len(watcher.steps)
    assert all(s["replay_transformed"] and s["labelled_after"] for s in replayed)


def test_without_augmentation_the_solver_sees_the_minibatch_as_is(tiny_stream):
    strategy = small_dgr(solver())
    watcher = ForwardWatcher(strategy.replay_plugin)
    watcher.before_backward = lambda strategy, **kwargs: None
    strategy.plugins.append(watcher)
    strategy.train(tiny_stream.train_stream[0])
    assert all(torch.equal(s["forward_input"], s["after"]) for s in watcher.steps)


class RecordingTrainer(WGANGPTrainer):
    """Keeps each batch the generator is trained on."""

    def __init__(self, generator, **kwargs):
        super().__init__(generator, **kwargs)
        self.batches = []
        self.losses = []

    def train_step(self, x, y=None):
        self.batches.append(x.clone())
        losses = super().train_step(x, y)
        self.losses.append(losses)
        return losses


def naive_with(plugin):
    model = solver()
    return Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        evaluator=quiet(),
        plugins=[plugin],
    )


def test_generator_batches_mix_real_data_and_replay(tiny_stream):
    trainer = RecordingTrainer(ConvGenerator(SHAPE, channels=8))
    plugin = GeneratorTrainingPlugin(
        trainer, train_iterations=4, train_mb_size=12, progress_bar=False
    )
    strategy = naive_with(plugin)
    strategy.train(tiny_stream.train_stream[0])
    assert plugin.current_replay_share() == pytest.approx(1 / 2)
    strategy.train(tiny_stream.train_stream[1])
    assert plugin.current_replay_share() == pytest.approx(2 / 3)
    assert [len(x) for x in trainer.batches] == [12] * 8
    assert len(plugin.loss_history) == 2


def test_alongside_the_generator_takes_the_solvers_minibatches_plus_replay(
    tiny_stream,
):
    trainer = RecordingTrainer(ConvGenerator(SHAPE, channels=8))
    plugin = GeneratorTrainingPlugin(
        trainer, schedule="alongside", replay_share=0.5, progress_bar=False
    )
    strategy = naive_with(plugin)
    strategy.train_mb_size = 8
    strategy.train(tiny_stream.train_stream[0])
    # 32 samples in minibatches of 8: one generator step per solver iteration
    assert [len(x) for x in trainer.batches] == [8] * 4
    strategy.train(tiny_stream.train_stream[1])
    # then each step adds as much replay as real data (share 0.5)
    assert [len(x) for x in trainer.batches[4:]] == [16] * 4
    # the losses of each experience's steps, averaged, as with "after"
    assert len(plugin.loss_history) == 2
    last = [trainer.losses[i]["critic"] for i in range(4, 8)]
    assert plugin.loss_history[1]["critic"] == pytest.approx(sum(last) / 4)


def test_train_epochs_sets_the_generator_steps_from_the_data(tiny_stream):
    trainer = RecordingTrainer(ConvGenerator(SHAPE, channels=8))
    plugin = GeneratorTrainingPlugin(
        trainer, train_epochs=2, train_mb_size=12, progress_bar=False
    )
    naive_with(plugin).train(tiny_stream.train_stream[0])
    # 2 passes over 32 samples in batches of 12: 2 x 3 steps
    assert len(trainer.batches) == 6


def test_preloaded_data_gives_the_generator_the_same_batches(tiny_stream):
    def real_batches(preload):
        torch.manual_seed(0)
        trainer = RecordingTrainer(ConvGenerator(SHAPE, channels=8))
        plugin = GeneratorTrainingPlugin(
            trainer,
            train_iterations=5,  # 32 samples in batches of 12: past one epoch
            train_mb_size=12,
            progress_bar=False,
            preload=preload,
        )
        naive_with(plugin).train(tiny_stream.train_stream[0])
        return trainer.batches

    loaded, preloaded = real_batches(False), real_batches(True)
    assert len(loaded) == len(preloaded) == 5
    assert all(torch.equal(a, b) for a, b in zip(loaded, preloaded))


@pytest.mark.parametrize("schedule", ["after", "alongside"])
def test_without_train_after_last_the_last_experience_trains_no_generator(
    tiny_stream, schedule
):
    def steps_per_experience(train_after_last):
        trainer = RecordingTrainer(ConvGenerator(SHAPE, channels=8))
        plugin = GeneratorTrainingPlugin(
            trainer,
            train_iterations=2,
            schedule=schedule,
            progress_bar=False,
            train_after_last=train_after_last,
        )
        strategy = naive_with(plugin)
        strategy.train_mb_size = 16
        counts = []
        for experience in tiny_stream.train_stream:
            strategy.train(experience)
            counts.append(len(trainer.batches) - sum(counts))
        return counts, plugin

    # 3 experiences: the last one of the stream is skipped, the others not
    assert steps_per_experience(True)[0] == [2, 2, 2]
    counts, plugin = steps_per_experience(False)
    assert counts == [2, 2, 0]
    # the bookkeeping still runs
    assert plugin.past.experiences == 3


def test_train_after_last_needs_the_experiences_stream():
    plugin = GeneratorTrainingPlugin(
        RecordingTrainer(ConvGenerator(SHAPE, channels=8)),
        progress_bar=False,
        train_after_last=False,
    )
    # an experience that does not know its stream (no origin_stream)
    strategy = SimpleNamespace(
        device="cpu", experience=SimpleNamespace(current_experience=0)
    )
    with pytest.raises(ValueError, match="origin_stream"):
        plugin.before_training_exp(strategy)


def _conditional(strategy_class):
    """A builder of a class-conditional strategy (DGM, DDGR) on SHAPE."""

    def build(model, **kwargs):
        return strategy_class(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            input_shape=SHAPE,
            num_classes=6,
            evaluator=quiet(),
            **kwargs,
        )

    return build


@pytest.mark.parametrize(
    "build",
    [small_dgr, _conditional(DGM), _conditional(DDGR)],
    ids=["dgr", "dgm", "ddgr"],
)
def test_strategies_pass_generator_train_after_last_on(build):
    assert build(solver()).generator_plugin.train_after_last
    strategy = build(solver(), generator_train_after_last=False)
    assert not strategy.generator_plugin.train_after_last


def test_dgr_passes_its_generator_replay_share_on():
    model = solver()
    strategy = DGR(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        input_shape=SHAPE,
        generator_replay_share=0.25,
        evaluator=quiet(),
    )
    strategy.generator_plugin.past.add(0, [0, 1])
    assert strategy.generator_plugin.current_replay_share() == 0.25


def test_avalanche_mlp_vae_is_a_replay_generator(tiny_stream):
    """Avalanche's own generator fits the plugin (its generate takes no
    condition)."""
    model = solver()
    replay = SolverReplayPlugin(MlpVAE(SHAPE, nhid=4), replay_mb_size=6)
    recorder = Recorder(replay)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        train_mb_size=10,
        evaluator=quiet(),
        plugins=[replay, recorder],
    )
    strategy.train(tiny_stream.train_stream[0])
    strategy.train(tiny_stream.train_stream[1])
    assert all(r["replay"].x.shape == (6, *SHAPE) for r in recorder.of(1))


def test_generator_of_the_wrong_shape_fails_before_training(tiny_stream):
    model = solver()
    weights = [p.clone() for p in model.parameters()]
    strategy = small_dgr(model, generator=ConvGenerator((3, 12, 12), channels=8))
    with pytest.raises(ValueError, match=r"shape \(3, 12, 12\).*\(1, 12, 12\)"):
        strategy.train(tiny_stream.train_stream[0])
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(importance_ratio=1.5), "importance_ratio"),
        (dict(importance_ratio=-0.1), "importance_ratio"),
        (dict(replay_mb_size=0), "replay_mb_size"),
        (dict(temperature=0.0), "temperature"),
        (dict(augment="affine"), "augment"),
        (dict(replay_bank_size=0), "replay_bank_size"),
        (dict(bank_mb_size=0), "bank_mb_size"),
    ],
)
def test_bad_replay_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SolverReplayPlugin(ConvGenerator(SHAPE, channels=8), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(replay_share=2.0), "replay_share"),
        (dict(train_mb_size=0), "train_mb_size"),
        (dict(schedule="before"), "schedule"),
        (dict(train_iterations=0), "train_iterations"),
        (dict(train_epochs=0), "train_epochs"),
    ],
)
def test_bad_generator_training_settings_are_refused(kwargs, message):
    trainer = WGANGPTrainer(ConvGenerator(SHAPE, channels=8))
    with pytest.raises(ValueError, match=message):
        GeneratorTrainingPlugin(trainer, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(check_every=0), "check_every"),
        (dict(check_samples=1), "check_samples"),
        (dict(max_retries=-1), "max_retries"),
        (dict(lr_decay=0.0), "lr_decay"),
        (dict(lr_decay=1.5), "lr_decay"),
    ],
)
def test_bad_guard_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainingGuard(**kwargs)


def test_class_balancing_gives_every_replayed_label_the_same_weight():
    from avl_genreplay.replay import class_balancing_weights

    labels = torch.tensor([0, 0, 0, 1, 3, 3])
    weights = class_balancing_weights(labels)
    assert weights.sum().item() == pytest.approx(1.0)
    totals = [weights[labels == c].sum().item() for c in (0, 1, 3)]
    assert totals == pytest.approx([1 / 3] * 3)


def test_class_balancing_by_head_gives_every_head_the_same_weight():
    """Scored on every head, head 0 replays labels 0, 0, 1 and head 1 labels
    2, 2, 2: each head weighs 1/2, split evenly among its labels."""
    from avl_genreplay.replay import class_balancing_weights

    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    heads = torch.tensor([0, 0, 0, 1, 1, 1])
    weights = class_balancing_weights(labels, groups=heads)
    expected = [1 / 8, 1 / 8, 1 / 4, 1 / 6, 1 / 6, 1 / 6]
    assert weights.tolist() == pytest.approx(expected)


def test_balanced_replay_loss_is_the_class_weighted_cross_entropy(tiny_stream):
    from avl_genreplay.replay import class_balancing_weights

    model = solver()
    generator = ConvGenerator(SHAPE, channels=8)
    replay = SolverReplayPlugin(
        generator, importance_ratio=0.5, replay_mb_size=9, balance_classes=True
    )
    before, after = Recorder(replay), Recorder(replay)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        train_mb_size=8,
        evaluator=quiet(),
        plugins=[before, replay, after],
    )
    strategy.train(tiny_stream.train_stream[0])
    strategy.train(tiny_stream.train_stream[1])
    assert after.of(1)
    for first, second in zip(before.of(1), after.of(1)):
        batch = second["replay"]
        per_sample = F.cross_entropy(model(batch.x), batch.y, reduction="none")
        balanced = (class_balancing_weights(batch.y) * per_sample).sum()
        expected = 0.5 * first["loss"] + 0.5 * balanced
        assert torch.allclose(second["loss"], expected, atol=1e-5)


def test_an_experience_without_class_list_takes_its_classes_from_targets():
    experience = SimpleNamespace(dataset=SimpleNamespace(targets=[3, 1, 3, 0]))
    assert experience_classes(experience) == [0, 1, 3]
    with pytest.raises(ValueError, match="no class information"):
        experience_classes(SimpleNamespace(dataset=SimpleNamespace()))


def test_task_labels_of_an_experience():
    assert experience_task_label(SimpleNamespace(task_labels=[2])) == 2
    assert experience_task_label(SimpleNamespace()) == 0
    with pytest.raises(ValueError, match="several task labels"):
        experience_task_label(SimpleNamespace(task_labels=[0, 1]))


def test_distillation_loss_is_the_masked_tempered_kl_times_t_squared():
    """Two samples, three classes, T = 2: the teacher's class 2 is masked for
    the first sample (its logit, 5, would otherwise dominate)."""
    t = 2.0
    student = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, t * math.log(2)]])
    teacher = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 0.0]])
    allowed = torch.tensor([[True, True, False], [True, True, True]])
    # sample 0: q = (1/2, 1/2, 0), p = (1/3, 1/3, 1/3)
    kl_0 = math.log(3 / 2)
    # sample 1: q = (1/3, 1/3, 1/3), p = (1/4, 1/4, 1/2)
    kl_1 = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    plain = distillation_loss(student, teacher, allowed, t)
    assert plain.item() == pytest.approx(t**2 * (kl_0 + kl_1) / 2, rel=1e-5)
    weights = torch.tensor([0.25, 0.75])
    weighted = distillation_loss(student, teacher, allowed, t, weights)
    assert weighted.item() == pytest.approx(
        t**2 * (0.25 * kl_0 + 0.75 * kl_1), rel=1e-5
    )


class FixedConditional(nn.Module):
    """A class-conditional stand-in generator: blank images, the classes it
    was asked for recorded."""

    num_classes = 6

    def __init__(self):
        super().__init__()
        self.asked = []

    def generate(self, n, condition):
        self.asked.append(condition.clone())
        return torch.zeros(n, *SHAPE)


class Prefers(nn.Module):
    """A solver whose logits rank class 5 (not yet seen) first and class 1
    second, whatever the input."""

    def forward(self, x):
        logits = torch.tensor([0.0, 2.0, 1.0, 0.5, -1.0, 9.0])
        return logits.expand(len(x), -1)


@pytest.mark.parametrize("relabel", [False, True])
def test_relabel_takes_the_old_solvers_arg_max_over_past_classes(relabel):
    plugin = SolverReplayPlugin(FixedConditional(), relabel=relabel)
    plugin.past.add(0, [0, 1])
    plugin.past.add(0, [2, 3])
    plugin.old_generator = plugin.generator
    plugin.old_solver = Prefers()
    replay = plugin.sample(8, torch.device("cpu"))
    requested = plugin.generator.asked[-1]
    assert sorted(requested.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    if relabel:
        # the solver disagrees with the requested class: its pick among the
        # past classes (1), not its overall favourite (5), is the label
        assert replay.y.tolist() == [1] * 8
    else:
        assert torch.equal(replay.y, requested)


class Tagged(nn.Module):
    """An unconditional stand-in generator: each image is one random value,
    so a replayed input tells which draw it came from."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def generate(self, n, condition=None):
        return torch.rand(n, 1, 1, 1).expand(n, *SHAPE).clone()


def test_a_replay_bank_is_drawn_once_per_experience_and_replayed_evenly(
    tiny_stream,
):
    plugin = SolverReplayPlugin(Tagged(), replay_mb_size=7, replay_bank_size=30)
    recorder = Recorder(plugin)
    model = solver()
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        train_mb_size=4,
        train_epochs=3,
        evaluator=quiet(),
        plugins=[plugin, recorder],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedGeneratorWarning)
        for experience in tiny_stream.train_stream:
            strategy.train(experience)
    seen = []
    for index in (1, 2):
        tags = torch.cat([r["replay"].x[:, 0, 0, 0] for r in recorder.of(index)])
        assert len(tags) == 7 * len(recorder.of(index)) > 30
        values, uses = tags.unique(return_counts=True)
        # the 30 draws of the bank, each used as often as any other (up to
        # one: the last pass through the bank is cut short)
        assert len(values) == 30 and uses.max() - uses.min() <= 1
        seen.append(set(values.tolist()))
    # a new bank for each experience
    assert not seen[0] & seen[1]


class KeepBatches(GeneratorTrainer):
    """Keeps each batch; learns nothing."""

    def __init__(self, generator):
        self.generator = generator
        self.batches = []

    def train_step(self, x, y=None):
        self.batches.append(x.clone())
        return {"loss": 0.0}

    def optimizers(self):
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_the_generators_replay_comes_from_a_bank_drawn_once_per_experience(
    tiny_stream,
):
    trainer = KeepBatches(Tagged())
    plugin = GeneratorTrainingPlugin(
        trainer,
        train_iterations=20,
        train_mb_size=20,
        replay_share=0.5,
        progress_bar=False,
        guard=None,
        replay_bank_size=50,
    )
    strategy = naive_with(plugin)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedGeneratorWarning)
        for index, experience in enumerate(tiny_stream.train_stream):
            strategy.train(experience)
            if index:
                batches = trainer.batches[20 * index : 20 * (index + 1)]
                tags = torch.cat([x[10:, 0, 0, 0] for x in batches])
                values, uses = tags.unique(return_counts=True)
                # 200 replayed inputs: each of the bank's 50 four times
                assert len(values) == 50 and uses.tolist() == [4] * 50
                seen.append(set(values.tolist()))
    assert not seen[0] & seen[1]
