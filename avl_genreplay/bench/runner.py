"""Runs a plan: one (strategy, seed) run to one result record, run after run
or in parallel processes.

Evaluation goes only through Avalanche's ``EvaluationPlugin``: after each
training experience the whole test stream is evaluated, which gives the
accuracy matrix ``acc[i][j]`` (accuracy on experience ``j`` after training
experience ``i``), forgetting and BWT. With resume paths, a run saves its
strategy (through :mod:`avl_genreplay.checkpoint`) and its rows after each
experience, and a restarted run continues from the last one saved.

With ``--nproc N`` each run trains on N processes, data-parallel, started
through ``torchrun``'s launcher (:func:`avl_genreplay.distributed.launch`):
every process runs :func:`run_planned` on its share of each batch, and rank
0's record comes back to the plan's loop like a serial run's. Rank 0 alone
writes (logs, images of replayed samples, resume state); every rank
evaluates the whole test stream, so the figures are a single process's.
"""

import json
import multiprocessing
import os
import statistics
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from avalanche.distributed import DistributedHelper
from avalanche.evaluation.metrics import (
    accuracy_metrics,
    bwt_metrics,
    forgetting_metrics,
    ram_usage_metrics,
    timing_metrics,
)
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin

from avl_genreplay.allocator import keep_freed_memory, keeps_freed_memory
from avl_genreplay.bench import data
from avl_genreplay.bench.plan import Plan
from avl_genreplay.bench.strategies import (
    StrategyContext,
    build_solver,
    build_strategy,
    input_transform,
    per_process_settings,
)
from avl_genreplay.checkpoint import maybe_load_checkpoint, save_checkpoint
from avl_genreplay.devices import native_bfloat16
from avl_genreplay.distributed import DataParallelPlugin, launch
from avl_genreplay.retained import retained_bytes

__all__ = [
    "RunSpec",
    "make_evaluator",
    "run_strategy",
    "run_planned",
    "run_plan",
    "RunsFailed",
    "machine_facts",
    "generator_of",
    "replayed_class_counts",
    "replay_sampling",
    "generator_growth",
    "generator_rollbacks",
    "module_bytes",
    "peak_ram_mb",
    "replay_quality",
    "reference_classifier",
    "GENERATIVE",
]


@dataclass
class RunSpec:
    """One run: a strategy, a seed and the settings it needs."""

    strategy: str
    seed: int
    solver: dict
    settings: dict
    input_shape: Sequence[int]
    num_classes: int
    scenario: str
    device: torch.device
    train_subset: Optional[int] = None
    loggers: list = field(default_factory=list)
    plugins: list = field(default_factory=list)
    metrics: list = field(default_factory=list)
    progress_bar: bool = True
    protocol: dict = field(default_factory=dict)
    normalization: Optional[tuple] = None


# the strategies whose generator the replay-quality metrics judge
GENERATIVE = ("gr", "dgr", "dgm_w", "dgm_a", "ddgr")
_REPLAY_QUALITY_PREFIXES = (
    "ReplayClassifierAccuracy",
    "ReplayClassCoverage",
    "ReplayClassShare",
    "ReplayFrechetDistance",
    "GeneratorLoss",
)


def make_evaluator(loggers: list, metrics: Sequence = ()) -> EvaluationPlugin:
    """Accuracy (stream, experience), forgetting, BWT, timing and RAM, and
    any further ``metrics`` (e.g. replay quality)."""
    return EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        timing_metrics(experience=True),
        ram_usage_metrics(every=1.0, experience=True),
        *metrics,
        loggers=loggers,
    )


def replay_quality(all_metrics: Dict[str, tuple]) -> Optional[Dict[str, list]]:
    """The replay-quality metrics of a run, one value per experience, by name
    without the phase and stream (e.g. ``ReplayClassifierAccuracy``,
    ``ReplayFrechetDistance/Class003``); ``None`` if none was measured.

    :param all_metrics: ``EvaluationPlugin.get_all_metrics()``.
    """
    found = {}
    for name, (_, values) in all_metrics.items():
        if name.startswith(_REPLAY_QUALITY_PREFIXES):
            short = name.replace("/train_phase/train_stream", "")
            found[short] = [float(v) for v in values]
    return found or None


def _reference_data(plan: Plan):
    """The training data the reference classifier of the replay-quality
    metrics learns: the plan's benchmark, subsampled as its runs are (seed 0),
    so a smoke run trains a small reference."""
    benchmark = data.make_benchmark(
        plan.benchmark,
        scenario="class",
        n_experiences=plan.n_experiences,
        data_root=plan.data_root,
        first_experience_half=plan.first_half,
    )
    train = [
        data.subsample_experience(e, plan.train_subset, 0)
        for e in benchmark.train_stream
    ]
    return train, benchmark.test_stream


def reference_classifier(plan: Plan, verbose: bool = True):
    """The plan's reference classifier for the replay-quality metrics
    (trained once, then loaded from the package's cache)."""
    from avl_genreplay.reference import train_reference_classifier

    train, test = _reference_data(plan)
    return train_reference_classifier(
        train,
        test_data=test,
        num_classes=plan.num_classes,
        name=f"reference-{plan.benchmark}",
        device=plan.device,
        progress_bar=verbose,
        verbose=verbose,
    )


def _measures_replay_quality(plan: Plan, name: str) -> bool:
    return plan.replay_quality and name in GENERATIVE and plan.scenario == "class"


def _replay_quality_metrics(plan: Plan, name: str, benchmark, reference):
    if not _measures_replay_quality(plan, name):
        return []
    from avl_genreplay.metrics import replay_quality_metrics

    return replay_quality_metrics(
        reference,
        benchmark.test_stream,
        samples_per_class=100,
        grid=plan.tensorboard,
        # Avalanche's GenerativeReplay trains its VAE without this package's
        # generator-training plugin, whose losses the metric reads
        losses=name != "gr",
    )


def peak_ram_mb(all_metrics: Dict[str, tuple]) -> Optional[float]:
    """Largest ``MaxRAMUsage`` reading of a run, ``None`` when none was taken.

    Avalanche's RAM metric samples from a thread every ``every`` seconds and
    reports its initial 0 when the thread took no sample (a phase shorter than
    the thread's start-up on a busy machine, or no RSS reading from the OS), so
    0 means "not measured", not "no memory".

    :param all_metrics: ``EvaluationPlugin.get_all_metrics()``.
    """
    readings = [
        value
        for name, (_, values) in all_metrics.items()
        if name.startswith("MaxRAMUsage")
        for value in values
        if value > 0
    ]
    return max(readings) if readings else None


def module_bytes(module: Optional[torch.nn.Module]) -> Optional[int]:
    """Bytes of a module's parameters and buffers (``None`` without one)."""
    if module is None:
        return None
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def generator_of(strategy) -> Optional[torch.nn.Module]:
    """The generator of a generative strategy, ``None`` for the others."""
    return getattr(strategy, "generator", None)


def replayed_class_counts(strategy) -> Optional[list]:
    """Per experience, how often each class was replayed to the solver
    (``None`` for strategies without this package's replay plugin)."""
    plugin = getattr(strategy, "replay_plugin", None)
    return getattr(plugin, "replayed_class_counts", None)


def generator_growth(strategy) -> Optional[list]:
    """Per experience, what a growing generator (DGM) reserved and its size
    after growing (``None`` for generators that do not grow)."""
    return getattr(generator_of(strategy), "growth_log", None)


def replay_sampling(strategy) -> Optional[list]:
    """Per refill of a replay pool (DDGR): images, seconds, images per second
    (``None`` for strategies without a pool)."""
    plugin = getattr(strategy, "pool_plugin", None)
    return getattr(plugin, "sampling_log", None)


def generator_rollbacks(strategy) -> Optional[list]:
    """Every rollback of the generator's training guard (experience, step,
    reason, step resumed from), so a table's reader can tell a run that
    recovered from one that did not need to (``None`` without a guard)."""
    plugin = getattr(strategy, "generator_plugin", None)
    return getattr(getattr(plugin, "guard", None), "rollbacks", None)


def _metric(results: dict, prefix: str) -> Dict[int, float]:
    """Per-experience values of a metric, keyed by experience index."""
    found = {}
    for key, value in results.items():
        if key.startswith(prefix) and "/Exp" in key:
            found[int(key.rsplit("/Exp", 1)[1])] = float(value)
    return found


def _stream_metric(results: dict, prefix: str) -> Optional[float]:
    for key, value in results.items():
        if key.startswith(prefix):
            return float(value)
    return None


def _save_progress(
    strategy, matrix: List[List[float]], wall: float, paths: Tuple[Path, Path]
) -> None:
    """Saves the rows first, then the strategy, each through a temporary
    file: a kill between the two leaves rows ahead of the checkpoint, which
    a restart cuts back (rows behind it could not be recovered). Rank 0
    writes (every rank holds the same state)."""
    checkpoint, rows = paths
    main = DistributedHelper.is_main_process
    if main:
        temporary = rows.with_suffix(".json.tmp")
        text = json.dumps({"accuracy_matrix": matrix, "wall": wall})
        try:
            temporary.write_text(text)
        except FileNotFoundError:
            # the first save, or another command finishing has just removed
            # the emptied folder (ResultsStore.finish)
            rows.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(text)
        os.replace(temporary, rows)
    temporary = checkpoint.with_suffix(".ckpt.tmp")
    save_checkpoint(strategy, temporary)  # every rank, for its barrier
    if main:
        os.replace(temporary, checkpoint)


def _load_progress(strategy, paths: Tuple[Path, Path], device):
    """The strategy, rows and wall seconds of an interrupted run, or the
    strategy unchanged with none."""
    checkpoint, rows = paths
    if not (checkpoint.exists() and rows.exists()):
        return strategy, [], 0.0
    strategy, done = maybe_load_checkpoint(strategy, checkpoint, map_location=device)
    saved = json.loads(rows.read_text())
    matrix = saved["accuracy_matrix"][:done]
    if len(matrix) < done:  # cannot happen with _save_progress's order
        raise RuntimeError(f"{rows} holds fewer rows than {checkpoint}")
    return strategy, matrix, float(saved["wall"])


def run_strategy(
    spec: RunSpec,
    benchmark,
    after_experience: Optional[Callable] = None,
    resume_paths: Optional[Tuple[Path, Path]] = None,
    on_experience: Optional[Callable[[int, int], None]] = None,
) -> dict:
    """Trains one strategy on the benchmark's train stream, evaluating on the
    whole test stream after each experience.

    :param after_experience: called as ``f(strategy, index)`` after each
        experience (e.g. to save images of replayed samples).
    :param resume_paths: ``(checkpoint, rows)`` files: the run saves its
        state there after each experience and, when they exist, continues
        from the last experience saved (joint training starts again).
    :param on_experience: called as ``f(index, count)`` before each
        experience is trained (progress messages).
    :return: the run's figures (see the keys below).

    Under distributed training (called on every rank alike) the batch sizes
    are divided among the processes and the solver trains data-parallel
    (:class:`~avl_genreplay.distributed.DataParallelPlugin`).
    The run's process keeps the memory it frees for reuse
    (:func:`~avl_genreplay.allocator.keep_freed_memory`): the same figures,
    without page faults at every step.
    """
    keep_freed_memory()
    RNGManager.set_random_seeds(spec.seed)
    model = build_solver(spec.solver, spec.input_shape, spec.num_classes, spec.scenario)
    evaluator = make_evaluator(spec.loggers, spec.metrics)
    processes = DistributedHelper.world_size
    plugins = list(spec.plugins)
    if DistributedHelper.is_distributed:
        plugins.append(DataParallelPlugin())
    replay_mb_size = spec.protocol.get("replay_mb_size")
    ctx = StrategyContext(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=spec.solver.get("lr", 1e-3)),
        input_shape=spec.input_shape,
        num_classes=spec.num_classes,
        # per process, as the plan checked that they divide
        train_mb_size=spec.solver.get("train_mb_size", 128) // processes,
        train_epochs=spec.solver.get("train_epochs", 1),
        device=spec.device,
        evaluator=evaluator,
        plugins=plugins,
        progress_bar=spec.progress_bar,
        augment=input_transform(spec.protocol.get("augment")),
        replay_mb_size=None if replay_mb_size is None else replay_mb_size // processes,
        normalization=spec.normalization,
        scenario=spec.scenario,
    )
    settings = per_process_settings(spec.strategy, spec.settings, processes)
    strategy = build_strategy(spec.strategy, ctx, settings)
    train = [
        data.subsample_experience(e, spec.train_subset, spec.seed)
        for e in benchmark.train_stream
    ]
    test = benchmark.test_stream
    matrix: List[List[float]] = []
    earlier_wall = 0.0
    if resume_paths is not None and spec.strategy != "joint":
        strategy, matrix, earlier_wall = _load_progress(
            strategy, resume_paths, spec.device
        )
    start = time.time()
    last = None
    # the most the strategy kept between experiences; a resumed run starts
    # from what its restored state keeps (that of its last saved experience)
    retained = retained_bytes(strategy) if matrix else 0
    if spec.strategy == "joint":
        if on_experience is not None:
            on_experience(0, 1)
        strategy.train(train)
        retained = retained_bytes(strategy)
        last = strategy.eval(test)
        matrix.append(
            [_metric(last, "Top1_Acc_Exp/eval_phase")[j] for j in range(len(test))]
        )
    else:
        for index in range(len(matrix), len(train)):
            if on_experience is not None:
                on_experience(index, len(train))
            strategy.train(train[index])
            retained = max(retained, retained_bytes(strategy))
            last = strategy.eval(test)
            accuracies = _metric(last, "Top1_Acc_Exp/eval_phase")
            matrix.append([accuracies[j] for j in range(len(test))])
            if after_experience is not None:
                after_experience(strategy, index)
            if resume_paths is not None:
                wall = earlier_wall + time.time() - start
                _save_progress(strategy, matrix, wall, resume_paths)
        if last is None:  # killed after the last checkpoint, before the record
            last = strategy.eval(test)
    wall = earlier_wall + time.time() - start
    all_metrics = strategy.evaluator.get_all_metrics()
    ram_mb = peak_ram_mb(all_metrics)
    forgetting = _stream_metric(last, "StreamForgetting/eval_phase")
    bwt = _stream_metric(last, "StreamBWT/eval_phase")
    return {
        "strategy": spec.strategy,
        "seed": spec.seed,
        "final_avg_acc": statistics.fmean(matrix[-1]),
        "final_stream_acc": _stream_metric(last, "Top1_Acc_Stream/eval_phase"),
        "avg_forgetting": None if spec.strategy == "joint" else forgetting,
        "bwt": None if spec.strategy == "joint" else bwt,
        "accuracy_matrix": matrix,
        "wall_seconds": wall,
        "peak_ram_mb": ram_mb,
        "retained_mb": retained / 2**20,
        "generator_bytes": module_bytes(generator_of(strategy)),
        "replayed_class_counts": replayed_class_counts(strategy),
        "replay_sampling": replay_sampling(strategy),
        "generator_growth": generator_growth(strategy),
        "generator_rollbacks": generator_rollbacks(strategy),
        "replay_quality": replay_quality(all_metrics),
        "processes": processes,
    }


def _loggers(plan: Plan, name: str, seed: int, interactive: bool) -> list:
    from avalanche.logging import CSVLogger, InteractiveLogger, TextLogger

    if not DistributedHelper.is_main_process:
        return []  # Avalanche's loggers live on the main process only

    logs = plan.output / "logs" / plan.stem
    logs.mkdir(parents=True, exist_ok=True)
    loggers = [
        TextLogger(open(logs / f"{name}_seed{seed}.txt", "a")),
        CSVLogger(str(logs / f"{name}_seed{seed}_csv")),
    ]
    if interactive:
        loggers.insert(0, InteractiveLogger())
    if plan.tensorboard:
        from avalanche.logging import TensorboardLogger

        loggers.append(
            TensorboardLogger(
                str(plan.output / "tb" / plan.stem / f"{name}_seed{seed}")
            )
        )
    return loggers


def run_planned(
    plan: Plan,
    name: str,
    seed: int,
    resume_paths: Optional[Tuple[Path, Path]] = None,
    interactive: bool = True,
    reference: Optional[torch.nn.Module] = None,
) -> dict:
    """One run of the plan, from its benchmark to its result record (the
    command and commit added).

    :param interactive: Avalanche's interactive logger and progress bars
        (off for runs in parallel processes, whose bars would interleave).
    :param reference: the replay-quality metrics' reference classifier
        (:func:`reference_classifier`); ``None`` to load it where needed.
    """
    from avl_genreplay.bench.report import ReplayImageSaver

    benchmark = data.make_benchmark(
        plan.benchmark,
        scenario=plan.scenario,
        n_experiences=plan.n_experiences,
        data_root=plan.data_root,
        seed=seed,
        first_experience_half=plan.first_half,
    )
    if reference is None and _measures_replay_quality(plan, name):
        reference = reference_classifier(plan, verbose=interactive)
    loggers = _loggers(plan, name, seed, interactive)
    saver = None
    if plan.images:
        saver = ReplayImageSaver(
            plan.output / "replay" / plan.stem, f"{name}_seed{seed}", loggers, benchmark
        )

    def progress(index: int, count: int) -> None:
        if DistributedHelper.is_main_process:
            print(f"== {name}, seed {seed}: experience {index + 1}/{count}", flush=True)

    try:
        run = run_strategy(
            RunSpec(
                strategy=name,
                seed=seed,
                solver=plan.solver,
                settings=plan.settings[name],
                input_shape=plan.input_shape,
                num_classes=plan.solver_outputs,
                scenario=plan.scenario,
                # under distributed training, this rank's (cuda:rank on GPUs)
                device=(
                    DistributedHelper.make_device()
                    if DistributedHelper.is_distributed
                    else torch.device(plan.device)
                ),
                train_subset=plan.train_subset,
                loggers=loggers,
                metrics=_replay_quality_metrics(plan, name, benchmark, reference),
                progress_bar=interactive,
                protocol=plan.protocol,
                normalization=data.BENCHMARKS[plan.benchmark].normalization,
            ),
            benchmark,
            after_experience=saver,
            resume_paths=resume_paths,
            on_experience=progress,
        )
    finally:
        for logger in loggers:
            getattr(logger, "close", lambda: None)()
    if DistributedHelper.is_main_process:  # the other ranks' records are unused
        run.update(
            command=plan.command,
            commit=code_commit(),
            torch_threads=torch.get_num_threads(),
            machine=machine_facts(),
        )
    return run


def machine_facts() -> Dict[str, object]:
    """What the run's floating-point results depend on besides the code:
    the CPU, the kernels torch picked for it and torch's version; and,
    for its wall time only, whether its process keeps freed memory.

    A generative strategy's run is chaotic: one rounding difference early on
    (another CPU, hence other vectorised or oneDNN kernels) changes every
    later figure, so a run that does not repeat elsewhere can be told apart
    from one that changed.
    """
    import platform

    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as info:
            fields = dict(
                (key.strip(), value.strip())
                for key, _, value in (line.partition(":") for line in info)
                if value
            )
        family, model = fields.get("cpu family"), fields.get("model")
        cpu = fields.get("model name", cpu)
        if family and model:
            cpu = f"{cpu} (family {family}, model {model})"
    except OSError:  # not Linux
        pass
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # what precision "auto" picks on this CPU (DDGR's UNet)
        "native_bfloat16": native_bfloat16("cpu"),
        "torch": torch.__version__,
        # speed only: the same figures either way
        "keeps_freed_memory": keeps_freed_memory(),
        "cuda_device": (
            torch.cuda.get_device_name() if torch.cuda.is_available() else None
        ),
        # settings that make torch or oneDNN pick other kernels on this CPU
        "kernel_settings": {
            name: os.environ[name]
            for name in (
                "ATEN_CPU_CAPABILITY",
                "ONEDNN_MAX_CPU_ISA",
                "DNNL_MAX_CPU_ISA",
            )
            if os.environ.get(name)
        },
    }


def code_commit() -> Optional[str]:
    """The package's git commit (``+dirty`` with uncommitted changes outside
    ``benchmarks/results``, which earlier runs may have written), or ``None``
    outside a git checkout, so results say which code made them."""
    import subprocess

    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=here, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git(
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ":/",
            ":(top,exclude)benchmarks/results",
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty else "")


class RunsFailed(Exception):
    """Raised by :func:`run_plan` after every other run has finished (and
    been yielded) when some runs failed.

    :param failures: ``(strategy, seed, error)`` of each failed run, the
        error as its exception's one-line description.
    """

    def __init__(self, failures: List[Tuple[str, int, str]]):
        self.failures = failures
        lines = [f"{name}, seed {seed}: {error}" for name, seed, error in failures]
        super().__init__(f"{len(failures)} run(s) failed: " + "; ".join(lines))


def _described(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _end_with_parent() -> None:
    """Ends this process as soon as the process that started it ends.

    A signal that reaches only the bench's own process (``kill``, a
    scheduler's time limit, an out-of-memory kill) would otherwise leave its
    workers training: on the cores a restarted bench needs, writing the same
    resume files as the runs it resumes, with results nobody collects. A run
    saves its progress after each experience through temporary files, so
    ending it at any moment loses only the experience in progress."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def end_when_parent_ends():
        parent.join()  # returns when the parent's sentinel closes
        os._exit(1)

    threading.Thread(target=end_when_parent_ends, daemon=True).start()


def _run_in_worker(plan: Plan, name: str, seed: int, resume_paths, reference) -> dict:
    """A run in a process of its own (``--jobs``): one torch thread unless
    the plan sets ``threads``; the process ends with the bench's."""
    _end_with_parent()
    torch.set_num_threads(plan.threads or 1)
    return run_planned(plan, name, seed, resume_paths, False, reference)


def _run_in_rank(
    plan: Plan, name: str, seed: int, resume_paths, reference
) -> Optional[dict]:
    """One rank of a run on ``plan.nproc`` processes (``--nproc``): one torch
    thread unless the plan sets ``threads``; rank 0's record, ``None`` from
    the others (torchrun's launcher ends the ranks with the bench)."""
    torch.set_num_threads(plan.threads or 1)
    main = DistributedHelper.is_main_process
    run = run_planned(plan, name, seed, resume_paths, main, reference)
    return run if main else None


def run_plan(
    plan: Plan,
    runs: Sequence[Tuple[str, int]],
    resume_paths: Callable[[str, int], Tuple[Path, Path]],
) -> Iterator[dict]:
    """Runs ``runs`` of the plan and yields each record as it finishes: one
    after the other in this process, or ``plan.jobs`` at a time in as many
    processes (each run's figures depend on its seed alone, not on the
    process, so the records are those of a serial run), or one after the
    other on ``plan.nproc`` processes each.

    A run that raises does not stop the others: its traceback is printed,
    the other runs go on and are yielded, and :class:`RunsFailed` is raised
    at the end, so that no finished run is lost to another's failure.
    Interruptions (``KeyboardInterrupt``) stop everything at once."""
    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    failures: List[Tuple[str, int, str]] = []
    # trained (or loaded from the cache) once, for every run that needs it
    reference = None
    if any(_measures_replay_quality(plan, name) for name, _ in runs):
        reference = reference_classifier(plan)
    if plan.nproc > 1:
        for name, seed in runs:
            print(f"== {name}, seed {seed} on {plan.nproc} processes", flush=True)
            try:
                records = launch(
                    plan.nproc,
                    _run_in_rank,
                    plan,
                    name,
                    seed,
                    resume_paths(name, seed),
                    reference,
                    use_cuda=torch.device(plan.device).type == "cuda",
                )
            except Exception as error:
                _report_failure(failures, name, seed, error)
                continue
            yield records[0]
    elif plan.jobs == 1:
        for name, seed in runs:
            print(f"== {name}, seed {seed}", flush=True)
            try:
                record = run_planned(
                    plan, name, seed, resume_paths(name, seed), reference=reference
                )
            except Exception as error:
                _report_failure(failures, name, seed, error)
                continue
            yield record
    else:
        yield from _run_in_processes(plan, runs, resume_paths, reference, failures)
    if failures:
        raise RunsFailed(failures)


def _report_failure(
    failures: List[Tuple[str, int, str]], name: str, seed: int, error: Exception
) -> None:
    """Prints a failed run's traceback and notes it in ``failures``."""
    traceback.print_exception(error)
    print(f"== {name}, seed {seed}: failed ({_described(error)})", flush=True)
    failures.append((name, seed, _described(error)))


def _run_in_processes(
    plan: Plan,
    runs: Sequence[Tuple[str, int]],
    resume_paths: Callable[[str, int], Tuple[Path, Path]],
    reference,
    failures: List[Tuple[str, int, str]],
) -> Iterator[dict]:
    """``plan.jobs`` runs at a time, each in a fresh process; yields the
    records as they finish and notes the failed runs in ``failures``."""
    context = multiprocessing.get_context("spawn")
    # a fresh process per run: a reused worker's resident memory would carry
    # the earlier runs' peak into this run's peak RAM
    with ProcessPoolExecutor(
        max_workers=plan.jobs, mp_context=context, max_tasks_per_child=1
    ) as pool:
        futures = {
            pool.submit(
                _run_in_worker, plan, name, seed, resume_paths(name, seed), reference
            ): (name, seed)
            for name, seed in runs
        }
        try:
            for future in as_completed(futures):
                try:
                    record = future.result()
                except Exception as error:
                    _report_failure(failures, *futures[future], error)
                    continue
                yield record
        except BaseException:
            for future in futures:
                future.cancel()
            raise
