"""Runs strategies over a benchmark and collects Avalanche's metrics.

Evaluation goes only through Avalanche's ``EvaluationPlugin``: after each
training experience the whole test stream is evaluated, which gives the
accuracy matrix ``acc[i][j]`` (accuracy on experience ``j`` after training
experience ``i``), forgetting and BWT.
"""

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from avalanche.evaluation.metrics import (
    accuracy_metrics,
    bwt_metrics,
    forgetting_metrics,
    ram_usage_metrics,
    timing_metrics,
)
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin

from avl_genreplay.bench.strategies import (
    STRATEGIES,
    StrategyContext,
    build_solver,
    build_strategy,
)

__all__ = [
    "RunSpec",
    "make_evaluator",
    "run_strategy",
    "summarise",
    "generator_of",
    "replayed_class_counts",
    "replay_sampling",
    "generator_growth",
    "module_bytes",
    "mean_std",
    "peak_ram_mb",
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


def make_evaluator(loggers: list) -> EvaluationPlugin:
    """Accuracy (stream, experience), forgetting, BWT, timing and RAM."""
    return EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        timing_metrics(experience=True),
        ram_usage_metrics(every=1.0, experience=True),
        loggers=loggers,
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


def run_strategy(
    spec: RunSpec,
    benchmark,
    after_experience: Optional[Callable] = None,
) -> dict:
    """Trains one strategy on the benchmark's train stream, evaluating on the
    whole test stream after each experience.

    :param after_experience: called as ``f(strategy, index)`` after each
        experience (e.g. to save images of replayed samples).
    :return: the run's figures (see the keys below).
    """
    RNGManager.set_random_seeds(spec.seed)
    model = build_solver(spec.solver, spec.input_shape, spec.num_classes, spec.scenario)
    evaluator = make_evaluator(spec.loggers)
    ctx = StrategyContext(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=spec.solver.get("lr", 1e-3)),
        input_shape=spec.input_shape,
        num_classes=spec.num_classes,
        train_mb_size=spec.solver.get("train_mb_size", 128),
        train_epochs=spec.solver.get("train_epochs", 1),
        device=spec.device,
        evaluator=evaluator,
        plugins=spec.plugins,
    )
    strategy = build_strategy(spec.strategy, ctx, spec.settings)
    from avl_genreplay.bench.data import subsample_experience

    train = [
        subsample_experience(e, spec.train_subset, spec.seed)
        for e in benchmark.train_stream
    ]
    test = benchmark.test_stream
    matrix: List[List[float]] = []
    start = time.time()
    if spec.strategy == "joint":
        strategy.train(train)
        last = strategy.eval(test)
        matrix.append(
            [_metric(last, "Top1_Acc_Exp/eval_phase")[j] for j in range(len(test))]
        )
    else:
        for index, experience in enumerate(train):
            strategy.train(experience)
            last = strategy.eval(test)
            accuracies = _metric(last, "Top1_Acc_Exp/eval_phase")
            matrix.append([accuracies[j] for j in range(len(test))])
            if after_experience is not None:
                after_experience(strategy, index)
    wall = time.time() - start
    ram_mb = peak_ram_mb(evaluator.get_all_metrics())
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
        "generator_bytes": module_bytes(generator_of(strategy)),
        "replayed_class_counts": replayed_class_counts(strategy),
        "replay_sampling": replay_sampling(strategy),
        "generator_growth": generator_growth(strategy),
    }


def mean_std(values: List[Optional[float]]):
    """Mean and sample standard deviation of the values that are not ``None``
    or NaN (``(None, None)`` if none is left)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def summarise(runs: List[dict]) -> Dict[str, dict]:
    """Mean and standard deviation over seeds, per strategy.

    Strategies come in the harness's order (baselines first), whatever order
    they ran in.
    """
    summary: Dict[str, dict] = {}
    order = list(STRATEGIES)
    names = dict.fromkeys(r["strategy"] for r in runs)
    for name in sorted(names, key=lambda n: order.index(n) if n in order else 99):
        mine = [r for r in runs if r["strategy"] == name]
        entry = {"seeds": [r["seed"] for r in mine]}
        for key in (
            "final_avg_acc",
            "avg_forgetting",
            "bwt",
            "wall_seconds",
            "peak_ram_mb",
        ):
            entry[key], entry[f"{key}_std"] = mean_std([r[key] for r in mine])
        entry["generator_bytes"] = mine[0]["generator_bytes"]
        entry["runs"] = mine
        summary[name] = entry
    return summary


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
