"""The benchmark harness: data roots, configs, the CIFAR-shaped path and the CLI."""

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from avalanche.core import SupervisedPlugin

from avl_genreplay.bench import data
from avl_genreplay.bench.cli import build_parser, main
from avl_genreplay.bench.plan import PlanError, _writable_problem, make_plan
from avl_genreplay.bench.config import load_config
from avl_genreplay.bench.report import sampling_table
from avl_genreplay.bench.runner import RunSpec, peak_ram_mb, run_strategy
from avl_genreplay.bench.strategies import (
    STRATEGIES,
    StrategyContext,
    build_solver,
    build_strategy,
)


def test_data_root_comes_from_the_flag_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_ROOT_ENV, str(tmp_path / "env"))
    assert data.resolve_data_root(None) == tmp_path / "env"
    assert data.resolve_data_root(str(tmp_path / "flag")) == tmp_path / "flag"
    monkeypatch.delenv(data.DATA_ROOT_ENV)
    assert data.resolve_data_root(None) is None  # Avalanche's default


def test_a_data_root_without_the_dataset_is_refused(tmp_path):
    with pytest.raises(data.DataRootError, match="does not hold splitmnist"):
        data.make_benchmark("splitmnist", data_root=tmp_path)
    with pytest.raises(data.DataRootError, match="not a directory"):
        data.make_benchmark("splitfmnist", data_root=tmp_path / "missing")


def test_real_splitmnist_has_the_fixed_class_order(mnist):
    classes = [e.classes_in_this_experience for e in mnist.train_stream]
    assert classes == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert mnist.train_stream[0].dataset[0][0].shape == (1, 28, 28)


def test_real_permutedmnist_permutes_the_pixels_of_all_ten_classes(data_root):
    """Each experience holds the 10 classes, labelled alike, and shows the
    same image under another permutation of its pixels."""
    permuted = data.make_benchmark(
        "permutedmnist", scenario="domain", n_experiences=2, data_root=data_root
    )
    assert [e.task_label for e in permuted.train_stream] == [0, 0]
    first, second = (e.dataset[0] for e in permuted.train_stream)
    for experience in permuted.train_stream:
        assert experience.classes_in_this_experience == list(range(10))
    assert first[1] == second[1] and first[0].shape == (1, 28, 28)
    assert not torch.equal(first[0], second[0])
    assert torch.equal(
        first[0].flatten().sort().values, second[0].flatten().sort().values
    )


def test_every_benchmark_has_a_config_with_every_runnable_strategy():
    for name in data.BENCHMARKS:
        config = load_config(name)
        assert config["solver"] and set(config["run"]) <= set(config["strategies"])
        quick = load_config(name, quick=True)
        assert quick["seeds"] == [0] and quick["train_subset"]
    assert load_config("splitcifar100")["solver"]["model"] == "slim_resnet18"


@pytest.mark.parametrize("first_half", [False, True])
def test_cifar_shaped_runs_with_a_small_resnet(first_half):
    stream = data.synthetic_benchmark(
        input_shape=(3, 32, 32),
        num_classes=100,
        n_experiences=6 if first_half else 10,
        per_class=2,
        first_experience_half=first_half,
    )
    sizes = [len(e.classes_in_this_experience) for e in stream.train_stream]
    assert sizes == ([50] + [10] * 5 if first_half else [10] * 10)
    config = load_config("splitcifar100", quick=True)
    run = run_strategy(
        RunSpec(
            strategy="dgr",
            seed=0,
            solver=config["solver"],
            settings=dict(config["strategies"]["dgr"], progress_bar=False),
            input_shape=(3, 32, 32),
            num_classes=100,
            scenario="class",
            device=torch.device("cpu"),
        ),
        _first_experiences(stream, 2),
    )
    assert len(run["accuracy_matrix"]) == 2 and len(run["accuracy_matrix"][0]) == 2
    assert run["generator_bytes"] > 0


class _Truncated:
    """The first ``n`` experiences of a benchmark's streams."""

    def __init__(self, benchmark, n):
        self.train_stream = benchmark.train_stream[:n]
        self.test_stream = benchmark.test_stream[:n]


def _first_experiences(benchmark, n):
    return _Truncated(benchmark, n)


def _tiny_config(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(
        'inherit = "splitmnist"\n'
        "train_subset = 300\n"
        "[solver]\ntrain_epochs = 1\n"
        "[strategies.dgr]\ngenerator_iterations = 10\n"
    )
    return path


def test_cli_writes_results_table_and_plots(data_root, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "bench",
            "--strategies",
            "naive,dgr",
            "--seeds",
            "0",
            "1",
            "--experiences",
            "5",
            "--data-root",
            str(data_root),
            "--config",
            str(_tiny_config(tmp_path)),
            "--output",
            str(out),
        ]
    )
    assert code == 0
    results = json.loads((out / "splitmnist_class_il.json").read_text())
    assert results["n_experiences"] == 5 and results["train_subset"] == 300
    for name in ("naive", "dgr"):
        entry = results["strategies"][name]
        assert entry["seeds"] == [0, 1] and len(entry["runs"]) == 2
        for run in entry["runs"]:
            matrix = run["accuracy_matrix"]
            assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
            assert run["final_avg_acc"] == pytest.approx(sum(matrix[-1]) / 5)
            # Avalanche's stream forgetting: over experiences 0-3, the
            # accuracy right after learning each minus the final one
            drops = [matrix[j][j] - matrix[-1][j] for j in range(4)]
            assert run["avg_forgetting"] == pytest.approx(sum(drops) / 4, abs=1e-6)
        finals = [run["final_avg_acc"] for run in entry["runs"]]
        assert entry["final_avg_acc"] == pytest.approx(sum(finals) / 2)
    assert results["strategies"]["dgr"]["generator_bytes"] > 0
    assert results["strategies"]["naive"]["generator_bytes"] is None
    # replay quality: one value per experience for the generative row alone
    for run in results["strategies"]["dgr"]["runs"]:
        quality = run["replay_quality"]
        assert len(quality["ReplayClassCoverage"]) == 5
        assert len(quality["ReplayFrechetDistance"]) == 5
        # the config skips the generator's training on the last experience
        assert len(quality["GeneratorLoss/critic"]) == 4
        # after experience 0 the share of classes 0 and 1 is the coverage
        shares = [quality[f"ReplayClassShare/Class00{c}"][0] for c in (0, 1)]
        assert quality["ReplayClassCoverage"][0] == pytest.approx(
            sum(min(share, 0.5) for share in shares)
        )
    assert results["strategies"]["naive"]["runs"][0]["replay_quality"] is None
    table = (out / "splitmnist_class_il.md").read_text()
    assert sum(line.startswith("| naive") for line in table.splitlines()) == 1
    # a row in the results table and one in the replay-quality table
    assert sum(line.startswith("| dgr |") for line in table.splitlines()) == 2
    assert "| dgr | coverage |" in table
    for png in [
        out / "splitmnist_class_il_accuracy.png",
        out / "splitmnist_class_il_matrices.png",
        out / "replay" / "splitmnist_class_il" / "dgr_seed0_exp4.png",
    ]:
        with Image.open(png) as image:
            assert image.size[0] > 10 and image.size[1] > 10
    assert not (
        out / "replay" / "splitmnist_class_il" / "naive_seed0_exp0.png"
    ).exists()
    assert "| dgr" in capsys.readouterr().out


def test_update_merges_runs_by_strategy_and_seed(data_root, tmp_path, capsys):
    config = _tiny_config(tmp_path)
    config.write_text("experiences = 2\n" + config.read_text())
    out = tmp_path / "out"
    common = ["bench", "--data-root", str(data_root), "--config", str(config)]
    common += ["--output", str(out), "--seeds", "0", "--train-subset", "100"]
    assert main([*common, "--strategies", "naive,lwf"]) == 0
    path = out / "splitmnist_class_il.json"
    first_file = json.loads(path.read_text())
    first = first_file["strategies"]
    # another seed of one strategy joins the file...
    assert main([*common, "--strategies", "lwf", "--seeds", "1", "--update"]) == 0
    merged = json.loads(path.read_text())["strategies"]
    assert list(merged) == ["naive", "lwf"] and merged["lwf"]["seeds"] == [0, 1]
    assert merged["naive"]["runs"] == first["naive"]["runs"]
    assert merged["lwf"]["runs"][0] == first["lwf"]["runs"][0]
    # ...and a run of the same strategy and seed replaces the old one
    assert main([*common, "--strategies", "lwf", "--update"]) == 0
    merged = json.loads(path.read_text())["strategies"]
    assert merged["lwf"]["seeds"] == [0, 1]
    assert merged["lwf"]["runs"][0]["command"].endswith("--update")
    assert "--update" not in merged["naive"]["runs"][0]["command"]
    assert merged["lwf"]["runs"][0]["torch_threads"] >= 1
    assert "commit" in merged["lwf"]["runs"][0]
    # and the machine its rounding came from
    machine = merged["lwf"]["runs"][0]["machine"]
    assert machine["torch"] == torch.__version__
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["keeps_freed_memory"] is True  # the harness sets it
    # the header lists every command that wrote into the file, each with its
    # own wall time: the first command's is kept after the updates
    commands = json.loads(path.read_text())["commands"]
    assert ["--update" in c["command"] for c in commands] == [False, True, True]
    assert commands[0]["total_wall_seconds"] == first_file["total_wall_seconds"]
    assert commands[0]["complete"] and commands[-1]["complete"]
    capsys.readouterr()
    assert main([*common, "--strategies", "naive", "--epochs", "2", "--update"]) == 2
    assert "holds another setup (solver" in capsys.readouterr().err
    # another number of experiences writes files of its own
    assert main([*common, "--strategies", "naive", "--experiences", "5"]) == 0
    five = json.loads((out / "splitmnist_class_il_5exp.json").read_text())
    assert five["n_experiences"] == 5
    assert len(five["strategies"]["naive"]["runs"][0]["accuracy_matrix"]) == 5


def test_a_command_without_resume_starts_its_runs_afresh(data_root, tmp_path, capsys):
    """The state a cut-off command left is continued only with --resume: any
    other command drops it, so that no run mixes two commands' settings."""
    config = _tiny_config(tmp_path)
    config.write_text("experiences = 2\n" + config.read_text())
    out = tmp_path / "out"
    state = out / ".resume" / "splitmnist_class_il"
    state.mkdir(parents=True)
    for suffix in (".ckpt", ".json"):
        (state / f"naive_seed0{suffix}").write_text("another command's state")
    command = ["bench", "--data-root", str(data_root), "--config", str(config)]
    command += ["--output", str(out), "--seeds", "0", "--train-subset", "100"]
    assert main([*command, "--strategies", "naive", "--no-images"]) == 0
    assert "naive, seed 0: starts afresh" in capsys.readouterr().out
    assert not (out / ".resume").exists()
    results = json.loads((out / "splitmnist_class_il.json").read_text())
    assert len(results["strategies"]["naive"]["runs"][0]["accuracy_matrix"]) == 2


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--strategies", "naive,bogus"], "unknown strategy bogus"),
        (["--benchmark", "splitcifar10"], "unknown benchmark 'splitcifar10'"),
        (["--scenario", "online"], "unknown scenario"),
        (["--data-root", "/nonexistent/data"], "is not a directory"),
        (["--device", "cuda:7"], "does not exist"),
        (["--first-half"], "splitcifar100 only"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_cli_errors_are_one_line_and_nonzero(arguments, message, tmp_path, capsys):
    code = main(["bench", "--output", str(tmp_path / "out"), *arguments])
    error = capsys.readouterr().err
    assert code == 2
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "splitmnist_class_il.json").exists()


def _plan(*arguments, data_root, tmp_path):
    args = build_parser().parse_args(
        ["bench", "--data-root", str(data_root), "--output", str(tmp_path / "out")]
        + list(arguments)
    )
    return make_plan(args, arguments)


def test_permutedmnist_plans_a_domain_incremental_comparison(data_root, tmp_path):
    """PermutedMNIST defaults to its only scenario, domain-incremental, with
    10 experiences (any number from 1: each holds all 10 classes) and one
    10-way head; --quick takes 3."""
    plan = _plan("--benchmark", "permutedmnist", data_root=data_root, tmp_path=tmp_path)
    assert (plan.scenario, plan.n_experiences) == ("domain", 10)
    assert plan.stem == "permutedmnist_domain_il"
    assert plan.solver_outputs == 10
    assert plan.header()["scenario"] == "domain-incremental"
    quick = _plan(
        "--benchmark",
        "permutedmnist",
        "--quick",
        data_root=data_root,
        tmp_path=tmp_path,
    )
    assert (quick.n_experiences, quick.stem) == (3, "permutedmnist_domain_il_quick")
    seven = _plan(
        "--benchmark",
        "permutedmnist",
        "--experiences",
        "7",
        data_root=data_root,
        tmp_path=tmp_path,
    )
    assert seven.stem == "permutedmnist_domain_il_7exp"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--experiences", "0"], "the number of experiences must be at least 1"),
        (["--scenario", "class"], "has the domain-incremental scenario only"),
        (["--scenario", "task"], "has the domain-incremental scenario only"),
    ],
)
def test_permutedmnist_refuses_a_bad_plan_before_training(
    arguments, message, data_root, tmp_path
):
    with pytest.raises(PlanError, match=message):
        _plan(
            "--benchmark",
            "permutedmnist",
            *arguments,
            data_root=data_root,
            tmp_path=tmp_path,
        )
    assert not (tmp_path / "out").exists()


def test_split_benchmarks_keep_the_divisor_rule(data_root, tmp_path):
    with pytest.raises(PlanError, match="must divide the 10 classes equally"):
        _plan("--experiences", "7", data_root=data_root, tmp_path=tmp_path)


def test_a_strategy_that_cannot_run_in_the_scenario_is_left_out(data_root, tmp_path):
    """Avalanche's GenerativeReplay labels its replay without task labels: a
    task-incremental comparison of the config's strategies leaves it out
    (and says so in its results), and one that names it is refused."""
    plan = _plan("--scenario", "task", data_root=data_root, tmp_path=tmp_path)
    assert "gr" not in plan.strategies and "dgr" in plan.strategies
    assert "without task labels" in plan.header()["left_out"]["gr"]
    assert "gr" in _plan(data_root=data_root, tmp_path=tmp_path).strategies
    with pytest.raises(PlanError, match="--strategies gr: no task-incremental run"):
        _plan(
            "--scenario",
            "task",
            "--strategies",
            "naive,gr",
            data_root=data_root,
            tmp_path=tmp_path,
        )


@pytest.mark.parametrize(
    "name, scenario, n_experiences, first_half, outputs",
    [
        ("splitmnist", "domain", 5, False, 2),
        ("splitmnist", "domain", 2, False, 5),
        ("splitmnist", "class", 5, False, 10),
        ("splitmnist", "task", 5, False, 10),
        ("splitcifar100", "domain", 6, True, 50),
        ("permutedmnist", "domain", 10, False, 10),
    ],
)
def test_domain_incremental_split_solvers_have_one_output_per_label(
    name, scenario, n_experiences, first_half, outputs
):
    """Domain-incremental Split* streams label each experience's classes from
    0, so the solver needs as many outputs as an experience has classes."""
    assert (
        data.solver_outputs(
            name,
            scenario=scenario,
            n_experiences=n_experiences,
            first_experience_half=first_half,
        )
        == outputs
    )


def test_domain_incremental_splitmnist_runs_a_solver_of_its_labels(
    data_root, tmp_path, monkeypatch
):
    """Two experiences of 5 classes, labelled 0..4 in each: the harness
    builds a 5-way solver and records it in the results."""
    from avl_genreplay.bench import runner

    built = []

    def recorded(*args, **kwargs):
        model = build_solver(*args, **kwargs)
        built.append(model)
        return model

    monkeypatch.setattr(runner, "build_solver", recorded)
    out = tmp_path / "out"
    arguments = ["bench", "--scenario", "domain", "--experiences", "2"]
    arguments += ["--strategies", "naive", "--seeds", "0", "--epochs", "1"]
    arguments += ["--train-subset", "50", "--no-images", "--output", str(out)]
    assert main(arguments + ["--data-root", str(data_root)]) == 0
    results = json.loads((out / "splitmnist_domain_il_2exp.json").read_text())
    assert results["solver_outputs"] == 5
    assert [m.classifier.out_features for m in built] == [5]
    assert len(results["strategies"]["naive"]["runs"][0]["accuracy_matrix"]) == 2


def test_permutedmnist_quick_run_writes_domain_incremental_results(data_root, tmp_path):
    """--quick on two permutations of 150 training images: one run per
    strategy, the whole test stream after each experience."""
    torch.set_num_threads(1)
    out = tmp_path / "out"
    arguments = ["bench", "--benchmark", "permutedmnist", "--quick"]
    arguments += ["--experiences", "2", "--train-subset", "150", "--epochs", "1"]
    arguments += ["--strategies", "naive,dgr", "--output", str(out)]
    assert main(arguments + ["--data-root", str(data_root)]) == 0
    results = json.loads((out / "permutedmnist_domain_il_2exp_quick.json").read_text())
    assert results["benchmark"] == "permutedmnist"
    assert results["scenario"] == "domain-incremental"
    assert (results["n_experiences"], results["solver_outputs"]) == (2, 10)
    assert results["complete"] and list(results["strategies"]) == ["naive", "dgr"]
    for entry in results["strategies"].values():
        (run,) = entry["runs"]
        assert [len(row) for row in run["accuracy_matrix"]] == [2, 2]
    counts = results["strategies"]["dgr"]["runs"][0]["replayed_class_counts"]
    assert counts[0] == {} and set(counts[1]) <= set(map(str, range(10)))


def test_cli_refuses_an_output_folder_it_cannot_write(data_root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(
        ["bench", "--data-root", str(data_root), "--output", str(blocker / "x")]
    )
    error = capsys.readouterr().err
    assert (
        code == 2 and "not writable" in error and len(error.strip().splitlines()) == 1
    )


def test_commands_started_together_all_find_the_output_folder_writable(tmp_path):
    # one command per seed starts at the same moment; their write probes must
    # not delete each other's (a fixed probe name failed one of two commands)
    folder = tmp_path / "out"
    errors = []

    def probe():
        for _ in range(200):
            problem = _writable_problem(folder)
            if problem:
                errors.append(problem)

    threads = [threading.Thread(target=probe) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert list(folder.iterdir()) == []


def test_python_dash_m_entry_point_reports_errors_with_exit_code():
    completed = subprocess.run(
        [sys.executable, "-m", "avl_genreplay", "bench", "--strategies", "bogus"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert "avl-genreplay: error: unknown strategy bogus" in completed.stderr


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_of_the_harness_runs(name, tiny_stream):
    config = load_config("splitmnist", quick=True)
    settings = dict(config["strategies"].get(name, {}))
    if name == "dgr":
        settings.update(generator_iterations=4, progress_bar=False)
    if name.startswith("dgm"):
        settings.update(
            generator_iterations=4,
            noise_dim=8,
            generator_channels=(8, 4),
            discriminator_channels=8,
            progress_bar=False,
        )
    if name == "ddgr":
        settings.update(
            generator_iterations=4,
            samples_per_class=4,
            sampling_steps=2,
            base_channels=8,
            progress_bar=False,
        )
    run = run_strategy(
        _tiny_spec(name, config, settings), _first_experiences(tiny_stream, 2)
    )
    rows = 1 if name == "joint" else 2
    assert len(run["accuracy_matrix"]) == rows
    if name == "ddgr":
        assert [log["images"] for log in run["replay_sampling"]] == [8]
        assert run["replay_sampling"][0]["denoising_steps"] == 2
        assert run["replay_sampling"][0]["sampler"] == "ddim"
    if name.startswith("dgm"):
        growth = run["generator_growth"]
        assert [record["task"] for record in growth] == [0, 1]
        assert growth[1]["parameters"] >= growth[0]["parameters"]
    # the last row holds the final accuracy on each test experience: with
    # test experiences of equal size, its mean is the stream's accuracy
    final = run["accuracy_matrix"][-1]
    assert len(final) == 2
    assert run["final_stream_acc"] == pytest.approx(sum(final) / 2)


def test_a_run_records_the_rollbacks_of_its_generators_guard(tiny_stream, monkeypatch):
    # the guard finds a non-finite loss once, at the third step of the first
    # experience (the bench trains no generator after the last); the run
    # recovers, and its record must say so
    from avl_genreplay import generator_training

    calls = []

    def nonfinite_once(losses):
        calls.append(1)
        return "the g loss is not finite" if len(calls) == 3 else None

    monkeypatch.setattr(generator_training, "_nonfinite", nonfinite_once)
    config = load_config("splitmnist", quick=True)
    settings = dict(
        config["strategies"]["dgr"], generator_iterations=4, progress_bar=False
    )
    run = run_strategy(
        _tiny_spec("dgr", config, settings), _first_experiences(tiny_stream, 2)
    )
    assert run["generator_rollbacks"] == [
        dict(experience=0, step=3, reason="the g loss is not finite", resumed_from=0)
    ]
    naive = run_strategy(
        _tiny_spec("naive", config, {}), _first_experiences(tiny_stream, 2)
    )
    assert naive["generator_rollbacks"] is None


def _tiny_spec(name: str, config: dict, settings: dict) -> RunSpec:
    """A class-incremental run of ``name`` on the tiny stream (1x12x12
    inputs, 6 classes): one epoch of the config's solver, on the CPU."""
    return RunSpec(
        strategy=name,
        seed=0,
        solver=dict(config["solver"], train_epochs=1),
        settings=settings,
        input_shape=(1, 12, 12),
        num_classes=6,
        scenario="class",
        device=torch.device("cpu"),
    )


def _tiny_context(model, optimizer, scenario="class"):
    """A builder's context for 1x12x12 inputs of 6 classes, one epoch of
    batches of 8 on the CPU, without evaluator or progress bars."""
    return StrategyContext(
        model=model,
        optimizer=optimizer,
        input_shape=(1, 12, 12),
        num_classes=6,
        train_mb_size=8,
        train_epochs=1,
        device=torch.device("cpu"),
        evaluator=None,
        plugins=[],
        progress_bar=False,
        scenario=scenario,
    )


@pytest.mark.parametrize(
    "scenario, settings, every_head",
    [
        ("task", {}, True),
        ("class", {}, False),
        ("domain", {}, False),
        ("task", {"score_every_head": False}, False),
    ],
)
def test_task_incremental_dgr_scores_replay_on_every_head(
    scenario, settings, every_head
):
    """The harness's DGR scores each replayed sample on every past head in
    the task-incremental scenario only, unless its config section says
    otherwise; DGM and DDGR (class-conditional) keep to each sample's task."""
    model = build_solver({"hidden_size": 8}, (1, 12, 12), 6, scenario)
    ctx = _tiny_context(model, torch.optim.SGD(model.parameters(), lr=0.1), scenario)
    dgr = build_strategy("dgr", ctx, dict(settings))
    assert dgr.replay_plugin.score_every_head is every_head
    dgm = build_strategy("dgm_a", ctx, {"noise_dim": 8, "generator_channels": [8, 4]})
    assert dgm.replay_plugin.score_every_head is False


def test_peak_ram_ignores_readings_the_ram_thread_never_took():
    metrics = {
        "MaxRAMUsage_Experience/eval_phase/test_stream/Task000/Exp000": ([0], [0]),
        "MaxRAMUsage_Experience/eval_phase/test_stream/Task000/Exp001": (
            [1, 2],
            [512.0, 640.5],
        ),
        "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000": ([0], [900.0]),
    }
    assert peak_ram_mb(metrics) == 640.5
    unmeasured = {k: v for k, v in metrics.items() if k.endswith("Exp000")}
    assert peak_ram_mb(unmeasured) is None


def test_the_sampling_table_sums_each_run_and_skips_strategies_without_a_pool():
    def log(*entries):
        return [
            dict(images=i, seconds=t, sampler="ddim", denoising_steps=20)
            for i, t in entries
        ]

    summary = {
        "naive": {"runs": [{"replay_sampling": None}]},
        "ddgr": {
            "runs": [
                {"replay_sampling": log((100, 1.0), (200, 3.0))},
                {"replay_sampling": log((100, 2.0), (200, 6.0))},
            ]
        },
    }
    table = sampling_table(summary)
    rows = [line for line in table.splitlines() if line.startswith("| ddgr")]
    # 300 images per run, in 4 s and 8 s: 75 and 37.5 images/s
    assert rows == ["| ddgr | 300 ± 0 | 6 ± 3 | 56.2 ± 26.5 | ddim | 20 |"]
    assert "naive" not in table
    assert sampling_table({"naive": summary["naive"]}) == ""


def test_splitfmnist_loads_offline_in_a_fixed_class_order(data_root):
    if not (data_root / "FashionMNIST").is_dir():
        pytest.skip(f"real Fashion-MNIST not found under {data_root}")
    benchmark = data.make_benchmark("splitfmnist", data_root=data_root, seed=3)
    classes = [sorted(e.classes_in_this_experience) for e in benchmark.train_stream]
    assert classes == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    x, y, *_ = benchmark.train_stream[2].dataset[0]
    assert x.shape == (1, 28, 28) and int(y) in (4, 5)


@pytest.mark.parametrize("name", ["splitmnist", "splitfmnist"])
def test_preloaded_split_benchmarks_hold_avalanches_samples(data_root, name):
    folder = data.BENCHMARKS[name].folder
    if not (data_root / folder).is_dir():
        pytest.skip(f"real {folder} not found under {data_root}")
    options = dict(scenario="task", data_root=data_root, seed=3)
    per_sample = data.make_benchmark(name, preload=False, **options)
    preloaded = data.make_benchmark(name, **options)
    for stream in ("train_stream", "test_stream"):
        experiences = zip(getattr(per_sample, stream), getattr(preloaded, stream))
        for avalanches, ours in experiences:
            assert ours.classes_in_this_experience == (
                avalanches.classes_in_this_experience
            )
            assert len(ours.dataset) == len(avalanches.dataset)
            # every sample of one experience a stream, a few of the others
            step = 1 if ours.current_experience == 1 else 997
            for index in range(0, len(ours.dataset), step):
                x, y, task = ours.dataset[index]
                expected_x, expected_y, expected_task = avalanches.dataset[index]
                assert torch.equal(x, expected_x)
                assert (int(y), task) == (int(expected_y), expected_task)


def test_splitcifar100_gets_the_half_first_experience_option(monkeypatch):
    # CIFAR-100 cannot be downloaded here: check what Avalanche is asked for
    from avalanche.benchmarks import classic

    calls = []
    monkeypatch.setattr(classic, "SplitCIFAR100", lambda **kw: calls.append(kw))
    data.make_benchmark("splitcifar100", n_experiences=6, first_experience_half=True)
    assert calls[0]["first_exp_with_half_classes"] is True
    assert calls[0]["n_experiences"] == 6
    assert calls[0]["fixed_class_order"] == list(range(100))


def test_an_augment_table_becomes_a_per_sample_random_affine():
    from kornia.augmentation import RandomAffine

    from avl_genreplay.bench.strategies import input_transform

    table = {"degrees": 10.0, "translate": [0.1, 0.1], "scale": [0.9, 1.1]}
    augment = input_transform(table)
    assert isinstance(augment, RandomAffine)
    assert table == {"degrees": 10.0, "translate": [0.1, 0.1], "scale": [0.9, 1.1]}
    digit = torch.zeros(1, 1, 12, 12)
    digit[..., 3:9, 5:7] = 1.0
    out = augment(digit.repeat(8, 1, 1, 1))
    assert out.shape == (8, 1, 12, 12)
    # each sample gets its own transformation; the border fills the background
    assert len({tuple(o.flatten().tolist()) for o in out}) == 8
    assert out[..., 0, :].abs().max() < 0.2
    assert input_transform(None) is None
    with pytest.raises(ValueError, match="RandomAffine"):
        input_transform(10.0)


# --- a bench that never loses a result or an hour -----------------------------


def _bench(data_root, *arguments):
    return main(["bench", "--data-root", str(data_root), "--threads", "1", *arguments])


def _tiny(tmp_path, strategies="naive"):
    """A run of a few seconds: two experiences of 60 images."""
    config = str(_tiny_config(tmp_path))
    return ["--config", config, "--strategies", strategies, "--seeds", "0"] + [
        "--experiences",
        "2",
        "--train-subset",
        "60",
        "--no-images",
        "--no-replay-quality",
    ]


def test_an_existing_results_file_is_kept_unless_update_or_overwrite(
    data_root, tmp_path, capsys
):
    out = tmp_path / "out"
    assert _bench(data_root, *_tiny(tmp_path), "--output", str(out)) == 0
    path = out / "splitmnist_class_il_2exp.json"
    before = path.read_bytes()
    capsys.readouterr()
    assert _bench(data_root, *_tiny(tmp_path), "--output", str(out)) == 2
    error = capsys.readouterr().err
    assert "exists" in error and "--overwrite" in error
    assert len(error.strip().splitlines()) == 1
    assert path.read_bytes() == before
    arguments = [*_tiny(tmp_path), "--output", str(out), "--overwrite"]
    assert _bench(data_root, *arguments) == 0
    assert path.read_bytes() != before  # a new command, a new file


def test_each_command_writes_a_folder_of_its_own_by_default(
    data_root, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert _bench(data_root, *_tiny(tmp_path)) == 0
    assert _bench(data_root, *_tiny(tmp_path)) == 0
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2
    for folder in folders:
        assert folder.name.startswith("splitmnist-")
        assert (folder / "splitmnist_class_il_2exp.json").is_file()


def test_quick_leaves_the_results_of_its_folder_byte_identical(
    data_root, tmp_path, monkeypatch, capsys
):
    from avl_genreplay.bench.plan import COMMITTED_RESULTS

    monkeypatch.chdir(tmp_path)
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    for suffix in (".json", ".md", "_accuracy.png", "_matrices.png"):
        (results / f"splitmnist_class_il{suffix}").write_bytes(b"committed")
    committed = {p: p.read_bytes() for p in results.iterdir()}
    quick = ["--quick", *_tiny(tmp_path)]
    assert _bench(data_root, *quick) == 0  # default output: runs/
    assert _bench(data_root, *quick, "--output", str(results)) == 0
    assert {p: p.read_bytes() for p in committed} == committed
    assert (results / "splitmnist_class_il_2exp_quick.json").is_file()
    capsys.readouterr()
    assert _bench(data_root, *quick, "--output", str(COMMITTED_RESULTS)) == 2
    assert "never writes into the committed results" in capsys.readouterr().err


class _Recorder:
    def __init__(self):
        self.runs = []

    def __call__(self, spec, *args, **kwargs):
        self.runs.append(spec.strategy)
        raise AssertionError("trained despite a bad plan")


@pytest.mark.parametrize(
    "section, message",
    [
        ("[strategies.lwf]\nalpah = 1.0\n", "[strategies.lwf] alpah: not a setting"),
        ('[strategies.lwf]\nalpha = "high"\n', "[strategies.lwf] alpha: 'high' is"),
        ("[strategies.dgr]\ncritic_step = 2\n", "[strategies.dgr] critic_step"),
        ("[strategies.dgr]\nsoft_targets = 1\n", "[strategies.dgr] soft_targets"),
        ("[strategies.ddgr]\nsampling_steps = 2.5\n", "sampling_steps: 2.5 is"),
        ('[solver]\nmodel = "resnet"\n', "[solver] model: unknown model 'resnet'"),
        ('[solver]\ntrain_epochs = "4"\n', "[solver] train_epochs: '4' is"),
        ("[strategies.lfw]\n", "[strategies.lfw]: unknown strategy"),
        ("seed = [0]\n", "seed: not a config key"),
        ("[strategies.dgm_w]\naugment = { degrees = 10.0 }\n", "a protocol setting"),
        ("[strategies.ddgr]\nreplay_mb_size = 128\n", "replay_mb_size: a protocol"),
        ("[strategies.lwf]\ntrain_epochs = 8\n", "train_epochs: a protocol"),
        ("[protocols.augmented]\naugment = 10\n", "augment: 10 is not of type"),
    ],
)
def test_a_config_error_is_one_line_naming_file_and_key_before_training(
    data_root, tmp_path, monkeypatch, capsys, section, message
):
    from avl_genreplay.bench import runner

    recorder = _Recorder()
    monkeypatch.setattr(runner, "run_strategy", recorder)
    config = tmp_path / "bad.toml"
    config.write_text('inherit = "splitmnist"\n' + section)
    arguments = ["--config", str(config), "--output", str(tmp_path / "out")]
    # lwf runs last: its typo must still stop the bench before the first run
    arguments += ["--strategies", "naive,dgr,ddgr,lwf"]
    assert _bench(data_root, *arguments) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0] and "bad.toml" in error[0]
    assert recorder.runs == []
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "experiences, message",
    [("0", "must lie in 1..10"), ("3", "divide the 10 classes"), ("11", "1..10")],
)
def test_a_number_of_experiences_the_benchmark_cannot_split_is_refused(
    data_root, tmp_path, capsys, experiences, message
):
    arguments = ["--experiences", experiences, "--output", str(tmp_path / "out")]
    assert _bench(data_root, "--strategies", "naive", *arguments) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"--experiences {experiences}" in error[0]
    assert message in error[0]


def test_version():
    completed = subprocess.run(
        [sys.executable, "-m", "avl_genreplay", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0
    assert completed.stdout.startswith("avl-genreplay ")
    assert "QP solver" not in completed.stderr


def _matrices(path):
    results = json.loads(path.read_text())["strategies"]
    return {
        (name, run["seed"]): run["accuracy_matrix"]
        for name, entry in results.items()
        for run in entry["runs"]
    }


def test_two_jobs_write_the_runs_and_figures_of_one(data_root, tmp_path):
    runs = [*_tiny(tmp_path, "lwf,dgr"), "--seeds", "0", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert _bench(data_root, *runs, "--output", str(one)) == 0
    assert _bench(data_root, *runs, "--jobs", "2", "--output", str(two)) == 0
    name = "splitmnist_class_il_2exp.json"
    serial, parallel = _matrices(one / name), _matrices(two / name)
    assert sorted(serial) == [("dgr", 0), ("dgr", 1), ("lwf", 0), ("lwf", 1)]
    assert parallel == serial
    assert json.loads((two / name).read_text())["jobs"] == 2


class _ThreadPool(ThreadPoolExecutor):
    """A process pool's stand-in, so that a test's patches reach its runs."""

    def __init__(self, max_workers, **process_options):
        super().__init__(max_workers=max_workers)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failed_run_loses_none_of_the_other_runs(monkeypatch, jobs):
    from avl_genreplay.bench import runner

    def run_planned(plan, name, seed, *args, **kwargs):
        if name == "dgm_a":
            raise RuntimeError("the samples have near-zero variance")
        return {"strategy": name, "seed": seed}

    monkeypatch.setattr(runner, "run_planned", run_planned)
    monkeypatch.setattr(runner, "ProcessPoolExecutor", _ThreadPool)
    monkeypatch.setattr(runner, "_measures_replay_quality", lambda *_: False)
    # the worker would set the torch threads of this test process
    monkeypatch.setattr(runner.torch, "set_num_threads", lambda n: None)
    plan = SimpleNamespace(threads=None, nproc=1, jobs=jobs)
    runs = [("dgm_w", 2), ("dgm_a", 2), ("gr", 2), ("dgm_a", 1), ("replay", 2)]
    finished = []
    with pytest.raises(runner.RunsFailed) as failed:
        for record in runner.run_plan(plan, runs, lambda name, seed: None):
            finished.append((record["strategy"], record["seed"]))
    assert sorted(finished) == [("dgm_w", 2), ("gr", 2), ("replay", 2)]
    failures = sorted(failed.value.failures)
    assert [(name, seed) for name, seed, _ in failures] == [("dgm_a", 1), ("dgm_a", 2)]
    assert "near-zero variance" in failures[0][2]


def test_a_bench_killed_in_a_run_resumes_to_the_same_figures(data_root, tmp_path):
    import signal

    command = [sys.executable, "-m", "avl_genreplay", "bench"]
    command += ["--data-root", str(data_root), "--threads", "1"]
    command += ["--config", str(_tiny_config(tmp_path)), "--no-images"]
    command += ["--no-replay-quality"]
    command += ["--strategies", "naive,dgr", "--seeds", "0", "--train-subset", "60"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run([*command, "--output", str(whole)], check=True, capture_output=True)
    started = subprocess.Popen(
        [*command, "--output", str(cut)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in started.stdout:
        if line.startswith("== dgr, seed 0: experience 3/5"):
            started.send_signal(signal.SIGKILL)
            break
    assert started.wait(timeout=300) == -signal.SIGKILL
    name = "splitmnist_class_il.json"
    # naive had finished: it is in the file, and dgr left its state
    assert set(_matrices(cut / name)) == {("naive", 0)}
    assert list((cut / ".resume").rglob("dgr_seed0.*"))
    resumed = subprocess.run(
        [*command, "--output", str(cut), "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # naive is not run again; dgr continues at its third experience
    assert "== naive, seed 0" not in resumed.stdout
    assert "== dgr, seed 0: experience 1/5" not in resumed.stdout
    assert _matrices(cut / name) == _matrices(whole / name)
    assert json.loads((cut / name).read_text())["complete"] is True
    # a finished comparison leaves no resume state, not even empty folders
    assert not (whole / ".resume").exists()
    assert not (cut / ".resume").exists()


@pytest.mark.parametrize("processes", [["--jobs", "2"], ["--nproc", "2"]])
def test_a_bench_killed_leaves_none_of_its_workers_running(
    data_root, tmp_path, processes
):
    import signal

    import psutil

    config = _tiny_config(tmp_path)
    # runs far longer than the test waits for them to end
    config.write_text(config.read_text().replace("= 10\n", "= 100000\n"))
    command = [sys.executable, "-m", "avl_genreplay", "bench"]
    command += ["--data-root", str(data_root), "--threads", "1", *processes]
    command += ["--config", str(config), "--no-images", "--no-replay-quality"]
    command += ["--strategies", "dgr", "--seeds", "0", "1", "--train-subset", "60"]
    started = subprocess.Popen(
        [*command, "--output", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    workers = []
    try:
        for line in started.stdout:
            if ": experience 1/" in line:  # the workers are training
                workers = psutil.Process(started.pid).children(recursive=True)
                started.send_signal(signal.SIGKILL)
                break
        assert started.wait(timeout=300) == -signal.SIGKILL
        assert len(workers) >= 2
        _, running = psutil.wait_procs(workers, timeout=30)
        assert running == []
    finally:
        for process in workers:
            if process.is_running():
                process.kill()


def test_si_penalises_moving_away_from_the_last_experiences_weights(tiny_stream):
    """The harness's SI keeps copies of the weights: while it trains the
    second experience, its penalty is lambda/2 * sum(importance * (weights -
    the first experience's final weights)^2), not zero. (Avalanche's own
    plugin keeps views on a CPU: zero importance, the live weights as anchor,
    and SI trains as Naive.)"""
    si_lambda = 100.0
    model = build_solver({"hidden_size": 16}, (1, 12, 12), 6, "class")
    ctx = _tiny_context(model, torch.optim.Adam(model.parameters(), lr=0.01))
    strategy = build_strategy("si", ctx, {"si_lambda": si_lambda})

    class Probe(SupervisedPlugin):
        """The loss SI added at the last step, and the weights it saw."""

        def before_backward(self, strategy, **kwargs):
            plain = strategy._criterion(strategy.mb_output, strategy.mb_y)
            self.penalty = (strategy.loss - plain).item()
            self.weights = {
                n: p.detach().flatten().clone() for n, p in model.named_parameters()
            }

    probe = Probe()
    strategy.plugins.append(probe)  # after SI's own before_backward
    (si,) = [p for p in strategy.plugins if hasattr(p, "syn_data")]
    strategy.train(tiny_stream.train_stream[0])
    anchor = {n: p.detach().flatten().clone() for n, p in model.named_parameters()}
    importance = {n: d.data.clone() for n, d in si.ewc_data[1].items()}

    strategy.train(tiny_stream.train_stream[1])
    expected = sum(
        (importance[n] * (probe.weights[n] - anchor[n]) ** 2).sum() for n in anchor
    ).item() * (si_lambda / 2)
    assert abs(expected) > 1e-4
    assert probe.penalty == pytest.approx(expected, rel=1e-4)


def test_a_run_records_the_settings_that_change_its_kernels(monkeypatch):
    from avl_genreplay.bench.runner import machine_facts

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    facts = machine_facts()
    assert facts["kernel_settings"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert facts["cpu"]
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert machine_facts()["kernel_settings"] == {}
