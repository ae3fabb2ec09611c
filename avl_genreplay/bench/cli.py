"""``avl-genreplay bench``: compare strategies on a benchmark, with Avalanche's
evaluators, and write results, a table, plots and images of replayed samples.

Run ``avl-genreplay bench --help`` (or ``python -m avl_genreplay bench``).
"""

import argparse
import fcntl
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch

from avl_genreplay.bench import data
from avl_genreplay.devices import check_device
from avl_genreplay.bench.config import load_config
from avl_genreplay.bench.report import (
    markdown_table,
    plot_accuracy_matrices,
    plot_seen_accuracy,
    replay_grid,
    sampling_table,
)
from avl_genreplay.bench.runner import (
    RunSpec,
    generator_of,
    run_strategy,
    summarise,
    write_json,
)
from avl_genreplay.bench.strategies import STRATEGIES

__all__ = ["main", "build_parser", "CLIError"]


class CLIError(Exception):
    """A user error, reported as one line on stderr with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avl-genreplay", description="Generative replay for Avalanche."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="compare strategies on a benchmark",
        description="Compare continual-learning strategies with Avalanche's evaluators.",
    )
    bench.add_argument(
        "--benchmark", default="splitmnist", help=f"one of {sorted(data.BENCHMARKS)}"
    )
    bench.add_argument(
        "--scenario", default="class", help="class, task or domain (incremental)"
    )
    bench.add_argument(
        "--strategies",
        default=None,
        help=f"comma-separated, from {sorted(STRATEGIES)}; default: all in the config",
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
        help="CPU threads for torch (default: torch's; 1 to run two benchmarks "
        "side by side on two cores)",
    )
    bench.add_argument("--output", default="benchmarks/results", help="output folder")
    bench.add_argument(
        "--config", default=None, help="config file (default: the benchmark's own)"
    )
    bench.add_argument(
        "--quick", action="store_true", help="a smoke comparison of a few minutes"
    )
    bench.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="training samples kept per experience",
    )
    bench.add_argument(
        "--tensorboard", action="store_true", help="also log to TensorBoard (OUTPUT/tb)"
    )
    bench.add_argument(
        "--no-images", action="store_true", help="skip images of replayed samples"
    )
    bench.add_argument(
        "--update",
        action="store_true",
        help="keep the other strategies' runs of an existing results file of the "
        "same setup, replacing those of the strategies run now",
    )
    return parser


def _commit() -> Optional[str]:
    """The package's git commit (``+dirty`` with uncommitted changes outside
    ``benchmarks/results``, which earlier runs may have written), or ``None``
    outside a git checkout, so results say which code made them."""
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


# what must match for runs of two commands to share one results file
_SETUP_KEYS = ("benchmark", "scenario", "n_experiences", "train_subset", "solver")


def _read_results(path: Path, header: dict) -> Optional[dict]:
    """An existing results file of the same setup (``None`` if absent);
    refuses one of another setup."""
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CLIError(f"cannot read {path} to update it: {error}") from None
    for key in _SETUP_KEYS:
        if old.get(key) != header[key]:
            raise CLIError(
                f"{path} holds another setup ({key}: {old.get(key)!r}, now "
                f"{header[key]!r}); drop --update or choose another --output"
            )
    return old


def _merged(old: Optional[dict], header: dict, runs: List[dict]) -> tuple:
    """The runs of ``old`` that ``runs`` do not replace (same strategy and
    seed), followed by ``runs``; and the settings of every strategy kept."""
    if old is None:
        return runs, header["settings"]
    replaced = {(r["strategy"], r["seed"]) for r in runs}
    kept = []
    for entry in old.get("strategies", {}).values():
        for run in entry["runs"]:
            if (run["strategy"], run["seed"]) not in replaced:
                run.setdefault("command", old.get("command"))
                kept.append(run)
    settings = {**old.get("settings", {}), **header["settings"]}
    return kept + runs, settings


def _device(name: str) -> torch.device:
    try:
        return check_device(name)
    except ValueError as error:
        raise CLIError(str(error)) from None


def _output_folder(path: str) -> Path:
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # a uniquely named probe: commands started together (one per seed) must
        # not delete each other's
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise CLIError(
            f"output folder {folder} is not writable: {error.strerror or error}"
        ) from None
    return folder


def _loggers(args, folder: Path, stem: str, name: str, seed: int) -> list:
    from avalanche.logging import CSVLogger, InteractiveLogger, TextLogger

    logs = folder / "logs" / stem
    logs.mkdir(parents=True, exist_ok=True)
    loggers = [
        InteractiveLogger(),
        TextLogger(open(logs / f"{name}_seed{seed}.txt", "w")),
        CSVLogger(str(logs / f"{name}_seed{seed}_csv")),
    ]
    if args.tensorboard:
        from avalanche.logging import TensorboardLogger

        loggers.append(
            TensorboardLogger(str(folder / "tb" / stem / f"{name}_seed{seed}"))
        )
    return loggers


def _image_saver(images: Path, run_name: str, loggers: list, benchmark):
    """Saves (and logs to TensorBoard) a grid of replayed samples per past class
    after each experience of a generative strategy."""
    from avalanche.logging import TensorboardLogger
    from avalanche.models import MultiTaskModule
    from torchvision.utils import save_image

    boards = [log for log in loggers if isinstance(log, TensorboardLogger)]

    def save(strategy, index: int) -> None:
        generator = generator_of(strategy)
        if generator is None:
            return
        seen = sorted(
            {
                c
                for e in benchmark.train_stream[: index + 1]
                for c in e.classes_in_this_experience
            }
        )
        labeller = (
            None if isinstance(strategy.model, MultiTaskModule) else strategy.model
        )
        if labeller is not None:
            labeller.eval()
        grid = replay_grid(generator, seen, labeller=labeller)
        images.mkdir(parents=True, exist_ok=True)
        save_image(grid, images / f"{run_name}_exp{index}.png")
        for board in boards:
            board.writer.add_image(f"replay/{run_name}", grid, index)

    return save


def bench(args, argv: List[str]) -> int:
    if args.benchmark not in data.BENCHMARKS:
        raise CLIError(
            f"unknown benchmark {args.benchmark!r}; choose from {', '.join(sorted(data.BENCHMARKS))}"
        )
    if args.scenario not in data.SCENARIOS:
        raise CLIError(
            f"unknown scenario {args.scenario!r}; choose from {', '.join(data.SCENARIOS)}"
        )
    if args.first_half and args.benchmark != "splitcifar100":
        raise CLIError("--first-half applies to splitcifar100 only")
    try:
        config = load_config(args.benchmark, args.config, quick=args.quick)
    except (FileNotFoundError, ValueError) as error:
        raise CLIError(f"bad config: {error}") from None
    if args.strategies:
        names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    else:
        names = config.get("run") or list(config["strategies"])
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise CLIError(
            f"unknown strategy {', '.join(unknown)}; choose from {', '.join(sorted(STRATEGIES))}"
        )
    device = _device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    root = data.resolve_data_root(args.data_root)
    spec = data.BENCHMARKS[args.benchmark]
    try:
        data.check_data_root(spec, root)
    except data.DataRootError as error:
        raise CLIError(str(error)) from None
    folder = _output_folder(args.output)
    solver = dict(config["solver"])
    if args.epochs is not None:
        solver["train_epochs"] = args.epochs
    seeds = args.seeds or config.get("seeds") or [0]
    n_experiences = args.experiences or config.get("experiences", 5)
    subset = args.train_subset or config.get("train_subset")
    stem = f"{args.benchmark}_{args.scenario}_il"
    if n_experiences != config.get("experiences", 5):
        # another protocol (e.g. one class per experience) gets its own files
        stem += f"_{n_experiences}exp"
    header = {
        "benchmark": args.benchmark,
        "scenario": f"{args.scenario}-incremental",
        "n_experiences": n_experiences,
        "train_subset": subset,
        "solver": solver,
        "command": "avl-genreplay " + " ".join(argv),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "started": time.time(),
        "settings": {name: config["strategies"].get(name, {}) for name in names},
    }
    provenance = dict(
        command=header["command"],
        commit=_commit(),
        torch_threads=header["torch_threads"],
    )
    if args.update:
        # fail before training on a file of another setup
        _read_results(folder / f"{stem}.json", header)
    runs: List[dict] = []
    for seed in seeds:
        for name in names:
            benchmark = data.make_benchmark(
                args.benchmark,
                scenario=args.scenario,
                n_experiences=n_experiences,
                data_root=root,
                seed=seed,
                first_experience_half=args.first_half,
            )
            loggers = _loggers(args, folder, stem, name, seed)
            saver = (
                None
                if args.no_images
                else _image_saver(
                    folder / "replay" / stem, f"{name}_seed{seed}", loggers, benchmark
                )
            )
            print(f"== {name}, seed {seed}", flush=True)
            run = run_strategy(
                RunSpec(
                    strategy=name,
                    seed=seed,
                    solver=solver,
                    settings=config["strategies"].get(name, {}),
                    input_shape=spec.input_shape,
                    num_classes=spec.num_classes,
                    scenario=args.scenario,
                    device=device,
                    train_subset=subset,
                    loggers=loggers,
                ),
                benchmark,
                after_experience=saver,
            )
            for logger in loggers:
                getattr(logger, "close", lambda: None)()
            run.update(provenance)
            runs.append(run)
            print(
                f"== {name}, seed {seed}: final average accuracy {run['final_avg_acc']:.4f}, {run['wall_seconds']:.0f} s",
                flush=True,
            )
            # written after every run so a long benchmark that is cut off
            # still leaves what it measured
            _write_results(folder, stem, header, runs, False, args.update)
    table, summary = _write_results(folder, stem, header, runs, True, args.update)
    title = (
        f"{args.benchmark}, {args.scenario}-incremental, {n_experiences} experiences"
    )
    plot_seen_accuracy(summary, folder / f"{stem}_accuracy.png", title)
    plot_accuracy_matrices(summary, folder / f"{stem}_matrices.png")
    print(table)
    print(f"results in {folder / (stem + '.json')}")
    return 0


def _write_results(
    folder: Path,
    stem: str,
    header: dict,
    runs: List[dict],
    complete: bool,
    update: bool = False,
) -> tuple:
    """Write the JSON and markdown results of the runs so far; return the
    table and the summary. With ``update``, the file is read again under a
    lock and merged, so several commands (e.g. one per seed) may update it
    at the same time."""
    path = folder / f"{stem}.json"
    with open(folder / f".{stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        payload = dict(header)
        started = payload.pop("started")
        if update:
            runs, payload["settings"] = _merged(
                _read_results(path, header), header, runs
            )
        summary = summarise(runs)
        payload.update(
            complete=complete,
            total_wall_seconds=time.time() - started,
            strategies=summary,
        )
        write_json(path, payload)
    table = markdown_table(summary)
    title = f"# {header['benchmark']}, {header['scenario']}"
    if not complete:
        title += " (partial: the run is still going or was cut off)"
    sampling = sampling_table(summary)
    if sampling:
        sampling = (
            f"\nCost of sampling the replay pools (all experiences):\n\n{sampling}"
        )
    (folder / f"{stem}.md").write_text(f"{title}\n\n{table}{sampling}")
    return table, summary


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            return bench(args, argv)
    except CLIError as error:
        print(f"avl-genreplay: error: {error}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
