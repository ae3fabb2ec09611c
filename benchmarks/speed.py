"""Wall time of each generative strategy against Joint's, in one invocation.

Runs Joint and each generative strategy (one seed) through the bench
harness's own API (its config, benchmark and ``run_strategy``) and prints,
per strategy, its wall seconds, their ratio to Joint's wall in the same
invocation, and its final average accuracy (the same for the process's CPU
seconds, steadier on a shared machine). Ratios, not seconds, carry a
comparison between machines or commits. Nothing is written unless asked
(``--json``, ``--profile``), and never into ``benchmarks/results/``.

Usage (from the repository root)::

    python benchmarks/speed.py --threads 1                      # SplitMNIST
    python benchmarks/speed.py --strategies dgr --train-subset 2000
    python benchmarks/speed.py --device cuda
    python benchmarks/speed.py --profile /tmp/prof --config my.toml

``--profile DIR`` runs each strategy under cProfile, writes ``DIR/NAME.prof``
and prints where the time went (generator training, replay-pool generation,
replay sampling and loss per solver step, the rest of the solver steps,
evaluation, data loading); profiling slows the runs, so its walls are not
the ones to compare.
"""

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from avl_genreplay.bench import data
from avl_genreplay.bench.config import load_config
from avl_genreplay.bench.plan import read_protocol
from avl_genreplay.bench.runner import RunSpec, machine_facts, run_strategy
from avl_genreplay.devices import check_device

__all__ = ["main", "run_one", "profile_breakdown"]

GENERATIVE = ("dgr", "dgm_w", "dgm_a", "ddgr")
RESULTS = (Path(__file__).resolve().parent / "results").resolve()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default="splitmnist")
    parser.add_argument(
        "--protocol",
        default="plain",
        help="the config's protocol every strategy runs under (default: plain)",
    )
    parser.add_argument(
        "--strategies",
        default=",".join(GENERATIVE),
        help="comma-separated strategies run after Joint (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="training samples kept per experience (default: all)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:0")
    parser.add_argument("--data-root", default=None)
    parser.add_argument(
        "--config",
        default=None,
        help="a config file instead of the benchmark's (may `inherit` it)",
    )
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument(
        "--profile", default=None, help="folder for a cProfile of each run"
    )
    return parser


def _outside_results(path: str) -> Path:
    resolved = Path(path).resolve()
    if resolved == RESULTS or RESULTS in resolved.parents:
        raise SystemExit(f"speed.py does not write into {RESULTS}")
    return resolved


def run_one(name: str, args, config: dict, device: torch.device) -> dict:
    """One run of strategy ``name`` through the harness, without loggers; adds
    the process's CPU seconds during the run (``cpu_seconds``), steadier than
    the wall on a machine shared with other jobs."""
    spec = data.BENCHMARKS[args.benchmark]
    benchmark = data.make_benchmark(
        args.benchmark,
        data_root=data.resolve_data_root(args.data_root),
        n_experiences=config.get("experiences", 5),
        seed=args.seed,
    )
    settings = dict(config["strategies"].get(name, {}))
    protocol, problems = read_protocol(config, args.protocol, args.benchmark)
    if problems:
        raise SystemExit("\n".join(problems))
    if name in GENERATIVE:
        settings["progress_bar"] = False
    started = time.process_time()
    run = run_strategy(
        RunSpec(
            strategy=name,
            seed=args.seed,
            solver=dict(config["solver"]),
            settings=settings,
            input_shape=spec.input_shape,
            num_classes=spec.num_classes,
            scenario="class",
            device=device,
            train_subset=args.train_subset,
            protocol=protocol,
            normalization=spec.normalization,
        ),
        benchmark,
    )
    run["cpu_seconds"] = time.process_time() - started
    return run


def _cumulative(stats: pstats.Stats, file_part: str, function: str) -> float:
    return sum(
        value[3]
        for (filename, _, name), value in stats.stats.items()
        if name == function and file_part in filename
    )


def _from_callers(
    stats: pstats.Stats, file_part: str, function: str, callers: Dict[str, str]
) -> Dict[str, float]:
    """Cumulative seconds of a function, split by which caller (a function
    name in ``callers``, mapped to a label) called it."""
    split = {label: 0.0 for label in callers.values()}
    for (filename, _, name), value in stats.stats.items():
        if name != function or file_part not in filename:
            continue
        for (_, _, caller), timing in value[4].items():
            if caller in callers:
                split[callers[caller]] += timing[3]
    return split


def profile_breakdown(stats: pstats.Stats, wall: float) -> Dict[str, float]:
    """Seconds per part of a run, from its cProfile; the parts do not overlap
    and ``other`` is what is left of ``wall``."""
    # the solver's and evaluation's loaders are Avalanche's (a generator
    # around torch's); the generator's own loader is torch's
    loading = _from_callers(
        stats,
        "avalanche/benchmarks/utils/data_loader.py",
        "__iter__",
        {"training_epoch": "solver", "eval_epoch": "eval"},
    )
    loading.update(
        _from_callers(
            stats,
            "torch/utils/data/dataloader.py",
            "__next__",
            {"_batches": "generator"},
        )
    )
    sample = _cumulative(stats, "avl_genreplay/replay.py", "sample")
    backward_hook = _cumulative(stats, "avl_genreplay/replay.py", "before_backward")
    forward_hook = _cumulative(stats, "avl_genreplay/replay.py", "before_forward")
    alongside = _cumulative(
        stats, "avl_genreplay/generator_training.py", "after_training_iteration"
    )
    epochs = _cumulative(stats, "update_type/sgd_update.py", "training_epoch")
    generator = _cumulative(
        stats, "avl_genreplay/generator_training.py", "_train_on_experience"
    )
    parts = {
        "generator training": generator + alongside - loading["generator"],
        "replay-pool generation": _cumulative(
            stats, "avl_genreplay/replay_pool.py", "_generate"
        ),
        "replay sampling per solver step": sample,
        "replay loss per solver step": backward_hook - sample,
        "solver input transformation": forward_hook,
        "solver steps (rest)": epochs
        - backward_hook
        - forward_hook
        - alongside
        - loading["solver"],
        "evaluation (without its data loading)": _cumulative(
            stats, "templates/base_sgd.py", "eval"
        )
        - loading["eval"],
        "data loading (solver)": loading["solver"],
        "data loading (evaluation)": loading["eval"],
        "data loading (generator)": loading["generator"],
    }
    parts["other"] = wall - sum(parts.values())
    return parts


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    names = ["joint"] + [n for n in names if n != "joint"]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = check_device(args.device)
    config = load_config(args.benchmark, args.config)
    data.check_data_root(
        data.BENCHMARKS[args.benchmark], data.resolve_data_root(args.data_root)
    )
    profile_dir = _outside_results(args.profile) if args.profile else None
    json_path = _outside_results(args.json) if args.json else None
    rows = []
    for name in names:
        print(f"== {name}", flush=True)
        if profile_dir is None:
            run = run_one(name, args, config, device)
        else:
            profile_dir.mkdir(parents=True, exist_ok=True)
            profiler = cProfile.Profile()
            run = profiler.runcall(run_one, name, args, config, device)
            profiler.dump_stats(str(profile_dir / f"{name}.prof"))
            stats = pstats.Stats(profiler)
            run["profile"] = profile_breakdown(stats, run["wall_seconds"])
            for part, seconds in run["profile"].items():
                share = seconds / run["wall_seconds"]
                print(f"   {part:<40} {seconds:8.1f} s  {share:6.1%}", flush=True)
        rows.append(
            dict(
                strategy=name,
                wall_seconds=run["wall_seconds"],
                cpu_seconds=run["cpu_seconds"],
                final_avg_acc=run["final_avg_acc"],
                profile=run.get("profile"),
            )
        )
        print(
            f"== {name}: {run['wall_seconds']:.1f} s, "
            f"CPU {run['cpu_seconds']:.1f} s, "
            f"accuracy {run['final_avg_acc']:.4f}",
            flush=True,
        )
    joint, joint_cpu = rows[0]["wall_seconds"], rows[0]["cpu_seconds"]
    print(
        f"\n{args.benchmark}, seed {args.seed}, train subset "
        f"{args.train_subset or 'all'}, device {device}, "
        f"{torch.get_num_threads()} torch thread(s)"
    )
    # ratios compare only within one machine's kernels
    machine = machine_facts()
    print(
        f"machine: {machine['cpu']}, {machine['cpu_capability']}, "
        f"torch {machine['torch']}"
        + (f", {machine['cuda_device']}" if machine["cuda_device"] else "")
    )
    print(
        f"{'strategy':<10} {'wall s':>8} {'x joint':>8} {'CPU s':>8} "
        f"{'x joint':>8} {'accuracy':>9}"
    )
    for row in rows:
        row["ratio_to_joint"] = row["wall_seconds"] / joint
        row["cpu_ratio_to_joint"] = row["cpu_seconds"] / joint_cpu
        row["machine"] = machine
        print(
            f"{row['strategy']:<10} {row['wall_seconds']:8.1f} "
            f"{row['ratio_to_joint']:8.2f} {row['cpu_seconds']:8.1f} "
            f"{row['cpu_ratio_to_joint']:8.2f} {row['final_avg_acc']:9.4f}"
        )
    if json_path is not None:
        json_path.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
