"""``avl-genreplay bench``: compare strategies on a benchmark, with Avalanche's
evaluators, and write results, a table, plots and images of replayed samples.

The command line is parsed here; the work is the harness's modules, in the
order data flows: :mod:`~avl_genreplay.bench.plan` (config and flags to a
validated plan), :mod:`~avl_genreplay.bench.runner` (runs to records),
:mod:`~avl_genreplay.bench.store` (the results file) and
:mod:`~avl_genreplay.bench.report` (tables and plots).

Run ``avl-genreplay bench --help`` (or ``python -m avl_genreplay bench``).
"""

import argparse
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import List, Optional

from avl_genreplay.bench import data
from avl_genreplay.bench.plan import Plan, PlanError, make_plan
from avl_genreplay.bench.strategies import STRATEGIES

__all__ = ["main", "build_parser", "CLIError"]


class CLIError(Exception):
    """A user error, reported as one line on stderr with exit code 2."""


def _version() -> str:
    try:
        return version("avl_genreplay")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avl-genreplay", description="Generative replay for Avalanche."
    )
    parser.add_argument(
        "--version", action="version", version=f"avl-genreplay {_version()}"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="compare strategies on a benchmark",
        description="Compare continual-learning strategies with Avalanche's "
        "evaluators. Each command writes to a new folder runs/<benchmark>-<UTC "
        "time>/ unless --output is given; a cut-off command continues with the "
        "same command and --resume.",
    )
    bench.add_argument(
        "--benchmark", default="splitmnist", help=f"one of {sorted(data.BENCHMARKS)}"
    )
    bench.add_argument(
        "--scenario",
        default=None,
        help="class, task or domain (incremental); default: class, or domain for "
        "permutedmnist, which has no other",
    )
    bench.add_argument(
        "--strategies",
        default=None,
        help=f"comma-separated, from {sorted(STRATEGIES)}; default: all in the config",
    )
    bench.add_argument(
        "--protocol",
        default="plain",
        help="the input pipeline every strategy shares: plain (no input "
        "transformation; the literature's) or one of the config's [protocols.*], "
        "e.g. augmented",
    )
    bench.add_argument(
        "--experiences", type=int, default=None, help="number of experiences"
    )
    bench.add_argument(
        "--first-half",
        action="store_true",
        help="SplitCIFAR100: the first experience holds 50 classes, the others share "
        "the rest (with --experiences 6: 10 per experience; 11: 5 per experience)",
    )
    bench.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="solver epochs per experience (overrides the config)",
    )
    bench.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds (default: the config's, else 0)",
    )
    bench.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu or cuda:0"
    )
    bench.add_argument(
        "--data-root",
        default=None,
        help=f"dataset folder (default: ${data.DATA_ROOT_ENV}, else Avalanche's, downloading)",
    )
    bench.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's, or 1 per process with "
        "--jobs above 1)",
    )
    bench.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="independent (strategy, seed) runs at a time, each in a process "
        "of its own that ends with the bench; the results are those of a "
        "serial run",
    )
    bench.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes each run trains on, data-parallel, started through "
        "torchrun's launcher (gloo on CPUs; nccl with --device cuda, one GPU per "
        "process); batch sizes are divided among them, so the total batch is a "
        "single process's",
    )
    bench.add_argument(
        "--output",
        default=None,
        help="output folder (default: a new runs/<benchmark>-<UTC time>/)",
    )
    bench.add_argument(
        "--config", default=None, help="config file (default: the benchmark's own)"
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="a smoke comparison of a few minutes (its files end in _quick; "
        "never written into the committed results)",
    )
    bench.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="training samples kept per experience (drawn at random)",
    )
    bench.add_argument(
        "--tensorboard", action="store_true", help="also log to TensorBoard (OUTPUT/tb)"
    )
    bench.add_argument(
        "--no-images",
        action="store_true",
        help="skip images of replayed samples (they draw from the run's random "
        "numbers, so a run without them goes another way than one with them: "
        "compare runs made alike)",
    )
    bench.add_argument(
        "--no-replay-quality",
        action="store_true",
        help="skip the replay-quality metrics of the generative strategies (a "
        "reference classifier's accuracy on their samples of each past class, "
        "and the Fréchet distance in its feature space)",
    )
    kept = bench.add_mutually_exclusive_group()
    kept.add_argument(
        "--update",
        action="store_true",
        help="merge into an existing results file of the same setup, replacing "
        "the runs of the same strategy and seed",
    )
    kept.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing results file",
    )
    kept.add_argument(
        "--resume",
        action="store_true",
        help="continue a cut-off command: skip its finished runs and continue "
        "its interrupted one from its last finished experience (default "
        "output: the newest runs/<benchmark>-*/)",
    )
    return parser


def bench(plan: Plan) -> int:
    """Runs a validated plan, writing results as each run finishes."""
    from avl_genreplay.bench import report, runner
    from avl_genreplay.bench.store import ResultsStore, StoreError

    try:
        store = ResultsStore(plan)
    except StoreError as error:
        raise CLIError(str(error)) from None
    title = (
        f"{plan.benchmark}, {plan.scenario}-incremental, "
        f"{plan.protocol['name']} protocol"
    )
    markdown = plan.output / f"{plan.stem}.md"
    done = store.finished()
    store.start()
    pending = [run for run in plan.runs if run not in done]
    if done:
        print(f"== resuming: {len(done)} runs finished, {len(pending)} to go")
    for name, seed in store.drop_stale_state(pending):
        print(
            f"== {name}, seed {seed}: starts afresh, dropping the state a cut-off "
            f"command left for it (--resume would continue it)"
        )
    for name, why in plan.left_out.items():
        print(f"== {name} left out: {why}")
    print(
        f"== results in {plan.output}; if cut off, continue with: "
        f"{_resume_command(plan)}"
    )
    try:
        for record in runner.run_plan(plan, pending, store.resume_paths):
            summary = store.add(record)
            report.write_markdown(markdown, title, summary, complete=False)
            print(
                f"== {record['strategy']}, seed {record['seed']}: final average "
                f"accuracy {record['final_avg_acc']:.4f}, "
                f"{record['wall_seconds']:.0f} s",
                flush=True,
            )
    except runner.RunsFailed as failed:
        # every other run is in the file; the comparison stays incomplete
        raise CLIError(
            f"{failed}\nthe other runs are in {plan.results_path}; after a fix, "
            f"continue with: {_resume_command(plan)}"
        ) from None
    summary = store.finish()
    table = report.write_markdown(markdown, title, summary, complete=True)
    report.write_plots(
        summary,
        plan.output / plan.stem,
        f"{title}, {plan.n_experiences} experiences",
    )
    print(table)
    print(f"results in {plan.results_path}")
    return 0


def _resume_command(plan: Plan) -> str:
    """The plan's command with ``--resume`` and its output folder."""
    program, *arguments = plan.command.split()
    for flag in ("--update", "--overwrite", "--resume"):
        while flag in arguments:
            arguments.remove(flag)
    if "--output" not in arguments:
        arguments += ["--output", str(plan.output)]
    return shlex.join([program, *arguments, "--resume"])


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            try:
                plan = make_plan(args, argv)
            except PlanError as error:
                raise CLIError("\n".join(error.problems)) from None
            return bench(plan)
    except CLIError as error:
        for line in str(error).splitlines():
            print(f"avl-genreplay: error: {line}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
