"""From a config file and the command line to a validated list of runs.

Everything a comparison needs is checked here, before any training: every
strategy section's keys and value types against its builder, the solver
model, the number of experiences, the data and the output folder. A bad
plan raises :class:`PlanError` with one line per problem, naming the config
file and key, so a typo in the last strategy's section shows at once rather
than after hours of training.
"""

import inspect
import os
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from avl_genreplay.bench import data
from avl_genreplay.bench.config import CONFIG_DIR, load_config
from avl_genreplay.bench.strategies import (
    NOT_DISTRIBUTED,
    PROTOCOL_KEYS,
    SOLVER_MODELS,
    STRATEGIES,
    UNSUPPORTED_SCENARIOS,
    input_transform,
    per_process_sizes,
    setting_parameters,
)
from avl_genreplay.devices import check_device

__all__ = [
    "Plan",
    "PlanError",
    "COMMITTED_RESULTS",
    "RUNS_FOLDER",
    "experience_count_problem",
    "make_plan",
    "read_protocol",
]

# the results committed with the repository: written only on purpose, through
# benchmarks/run_benchmark.py
COMMITTED_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
# where each invocation writes by default, one new folder per invocation
RUNS_FOLDER = Path("runs")

_SOLVER_KEYS = {
    "model": str,
    "hidden_size": int,
    "hidden_layers": int,
    "drop_rate": float,
    "lr": float,
    "train_mb_size": int,
    "train_epochs": int,
}
# what a protocol may set besides the solver: the input transformation (a
# table of Kornia RandomAffine arguments) and replayed samples per solver step
_PROTOCOL_SETTINGS = {"augment": dict, "replay_mb_size": int}
_TOP_LEVEL_KEYS = {"run", "experiences", "seeds", "train_subset", "solver"}
_TOP_LEVEL_KEYS |= {"strategies", "quick", "protocol", "protocols"}


class PlanError(ValueError):
    """A plan that cannot run; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class Plan:
    """A validated comparison: which runs, with which settings, written where.

    :param runs: ``(strategy, seed)`` pairs in the order they start.
    :param nproc: processes each run trains on, data-parallel (one GPU each
        on CUDA); batch sizes are divided among them.
    :param resume: continue the results file (and interrupted run) found in
        ``output`` instead of refusing to touch it.
    :param left_out: the config's strategies that cannot run in the
        scenario, each with the reason.
    """

    benchmark: str
    scenario: str
    n_experiences: int
    first_half: bool
    strategies: List[str]
    seeds: List[int]
    solver: Dict[str, Any]
    protocol: Dict[str, Any]
    settings: Dict[str, dict]
    train_subset: Optional[int]
    data_root: Optional[Path]
    device: str
    threads: Optional[int]
    jobs: int
    output: Path
    stem: str
    command: str
    config_file: str
    update: bool = False
    overwrite: bool = False
    resume: bool = False
    images: bool = True
    tensorboard: bool = False
    replay_quality: bool = True
    left_out: Dict[str, str] = field(default_factory=dict)
    nproc: int = 1
    started: float = field(default_factory=time.time)

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return data.BENCHMARKS[self.benchmark].input_shape

    @property
    def num_classes(self) -> int:
        return data.BENCHMARKS[self.benchmark].num_classes

    @property
    def solver_outputs(self) -> int:
        """The solver's outputs, also the class-conditional generators'
        classes (:func:`~avl_genreplay.bench.data.solver_outputs`)."""
        return data.solver_outputs(
            self.benchmark,
            scenario=self.scenario,
            n_experiences=self.n_experiences,
            first_experience_half=self.first_half,
        )

    @property
    def results_path(self) -> Path:
        return self.output / f"{self.stem}.json"

    @property
    def runs(self) -> List[Tuple[str, int]]:
        return [(name, seed) for seed in self.seeds for name in self.strategies]

    def header(self) -> dict:
        """What a results file records of the setup, before its runs."""
        return {
            "benchmark": self.benchmark,
            "scenario": f"{self.scenario}-incremental",
            "n_experiences": self.n_experiences,
            "train_subset": self.train_subset,
            "solver_outputs": self.solver_outputs,
            "solver": self.solver,
            "protocol": self.protocol,
            "command": self.command,
            "config": self.config_file,
            "device": self.device,
            "jobs": self.jobs,
            "nproc": self.nproc,
            "settings": {name: self.settings[name] for name in self.strategies},
            "left_out": self.left_out,
        }


def experience_count_problem(
    n_experiences: int,
    num_classes: int,
    first_half: bool = False,
    *,
    splits_classes: bool = True,
) -> Optional[str]:
    """Why a benchmark of ``num_classes`` classes cannot be split into
    ``n_experiences`` experiences of equal class counts, or ``None``. A
    benchmark whose experiences each hold every class (``splits_classes``
    false, e.g. PermutedMNIST) takes any number from 1."""
    if not splits_classes:
        return None if n_experiences >= 1 else "must be at least 1"
    if n_experiences < 1 or n_experiences > num_classes:
        return f"must lie in 1..{num_classes}"
    if first_half:
        rest = num_classes - num_classes // 2
        if n_experiences < 2 or rest % (n_experiences - 1):
            return (
                f"with --first-half, the other experiences must share {rest} "
                f"classes equally"
            )
    elif num_classes % n_experiences:
        return f"must divide the {num_classes} classes equally"
    return None


def _allows(annotation: Any, value: Any) -> bool:
    """Whether a TOML value fits a parameter's type annotation (unknown or
    unchecked annotations allow anything)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return any(_allows(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (tuple, list, typing.Sequence) or annotation in (tuple, list):
        return isinstance(value, (list, tuple))
    if annotation is dict:
        return isinstance(value, dict)
    if origin is not None and getattr(origin, "__name__", "") == "Callable":
        # a table that the harness turns into the callable (e.g. augment)
        return isinstance(value, dict) or callable(value)
    return True


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "")


def _setting_problems(name: str, settings: dict, source: str) -> List[str]:
    parameters = setting_parameters(name)
    problems = []
    for key, value in settings.items():
        where = f"{source}: [strategies.{name}] {key}"
        if key in PROTOCOL_KEYS:
            problems.append(
                f"{where}: a protocol setting, the same for every strategy: set it "
                f"in [solver] or [protocol], not in a strategy's section"
            )
            continue
        if key not in parameters:
            known = ", ".join(sorted(parameters)) or "none"
            problems.append(f"{where}: not a setting of {name} (settings: {known})")
            continue
        annotation = parameters[key].annotation
        if not _allows(annotation, value):
            problems.append(
                f"{where}: {value!r} is not of type {_type_name(annotation)}"
            )
    return problems


def _table_problems(table: dict, types: dict, where: str, kind: str) -> List[str]:
    """Keys of a config table that are not among ``types``, or whose values
    are not of their type; ``where`` names the table, e.g. ``file: [solver]``."""
    problems = []
    for key, value in table.items():
        if key not in types:
            known = ", ".join(sorted(types))
            problems.append(f"{where} {key}: not a {kind} setting ({known})")
        elif not _allows(types[key], value):
            name = types[key].__name__
            problems.append(f"{where} {key}: {value!r} is not of type {name}")
    return problems


def _solver_problems(solver: dict, source: str) -> List[str]:
    problems = _table_problems(solver, _SOLVER_KEYS, f"{source}: [solver]", "solver")
    model = solver.get("model", "mlp")
    if isinstance(model, str) and model not in SOLVER_MODELS:
        problems.append(
            f"{source}: [solver] model: unknown model {model!r} "
            f"(choose from {', '.join(SOLVER_MODELS)})"
        )
    for key in ("train_epochs", "train_mb_size"):
        if isinstance(solver.get(key), int) and solver[key] < 1:
            problems.append(f"{source}: [solver] {key}: must be >= 1")
    return problems


def read_protocol(config: dict, name: str, source: str) -> Tuple[dict, List[str]]:
    """The named protocol (``[protocol]`` updated by ``[protocols.NAME]``) as
    recorded in results, and the problems found in any of the config's
    protocols (a typo in one not run now would show in a later command)."""
    named = config.get("protocols", {})
    problems = []
    if name != "plain" and name not in named:
        known = ", ".join(sorted({"plain", *named}))
        problems.append(f"--protocol {name}: not in {source} (protocols: {known})")
    tables = {}
    for each in sorted({"plain", *named}):
        table = {**config.get("protocol", {}), **named.get(each, {})}
        where = f"{source}: [protocols.{each}]"
        found = _table_problems(table, _PROTOCOL_SETTINGS, where, "protocol")
        if not found:
            try:
                input_transform(table.get("augment"))
            except (TypeError, ValueError) as error:
                found.append(f"{where} augment: {error}")
        problems += found
        tables[each] = table
    table = tables.get(name, {})
    protocol = {
        "name": name,
        "augment": table.get("augment"),
        "replay_mb_size": table.get("replay_mb_size"),
    }
    return protocol, problems


def _nproc_problems(args, device, names, settings, solver, protocol) -> List[str]:
    """What keeps the runs from training on ``args.nproc`` processes."""
    nproc = args.nproc
    if nproc < 1:
        return [f"--nproc must be >= 1, got {nproc}"]
    problems = []
    if args.jobs > 1:
        problems.append(
            f"--nproc {nproc} trains each run on {nproc} processes, one run at a "
            f"time: it cannot be combined with --jobs {args.jobs}"
        )
    if device is not None and device.type == "mps":
        problems.append("--nproc: distributed training is not available on mps")
    if device is not None and device.type == "cuda":
        import torch

        if device.index is not None:
            problems.append(
                f"--nproc puts process r on cuda:r: give --device cuda, not {device}"
            )
        elif torch.cuda.device_count() < nproc:
            problems.append(
                f"--nproc {nproc} needs {nproc} GPUs (one per process), "
                f"{torch.cuda.device_count()} found"
            )
    for name in names:
        if name in NOT_DISTRIBUTED:
            problems.append(
                f"--nproc: {name} cannot run distributed: {NOT_DISTRIBUTED[name]}"
            )
    # each process takes an equal share of every batch
    sizes = {"[solver] train_mb_size": solver.get("train_mb_size", 128)}
    if protocol.get("replay_mb_size") is not None:
        sizes["[protocol] replay_mb_size"] = protocol["replay_mb_size"]
    for name in names:
        if name in STRATEGIES and name not in NOT_DISTRIBUTED:
            for key, value in per_process_sizes(name, settings[name]).items():
                sizes[f"[strategies.{name}] {key}"] = value
    for key, value in sizes.items():
        if isinstance(value, int) and value % nproc:
            problems.append(
                f"--nproc {nproc}: {key} = {value} is not divisible among "
                f"{nproc} processes"
            )
    return problems


def _default_output(benchmark: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    folder = RUNS_FOLDER / f"{benchmark}-{stamp}"
    suffix = 1
    while folder.exists():  # two invocations in the same second
        suffix += 1
        folder = RUNS_FOLDER / f"{benchmark}-{stamp}-{suffix}"
    return folder


def _latest_output(benchmark: str) -> Optional[Path]:
    """The newest default output folder of ``benchmark`` (for ``--resume``
    without ``--output``)."""
    folders = sorted(RUNS_FOLDER.glob(f"{benchmark}-*")) if RUNS_FOLDER.is_dir() else []
    return folders[-1] if folders else None


def _writable_problem(folder: Path) -> Optional[str]:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # a uniquely named probe: commands started together (one per seed)
        # must not delete each other's
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return f"output folder {folder} is not writable: {error.strerror or error}"
    return None


def _is_committed_results(folder: Path) -> bool:
    try:
        return folder.resolve() == COMMITTED_RESULTS
    except OSError:
        return False


def make_plan(args, argv: Sequence[str]) -> Plan:
    """Validates the bench's arguments and config; raises :class:`PlanError`
    with every problem found, before anything is trained or written.

    :param args: the parsed ``avl-genreplay bench`` arguments.
    :param argv: the command line, recorded in the results.
    """
    problems: List[str] = []
    if args.benchmark not in data.BENCHMARKS:
        raise PlanError(
            [
                f"unknown benchmark {args.benchmark!r}; choose from "
                f"{', '.join(sorted(data.BENCHMARKS))}"
            ]
        )
    spec = data.BENCHMARKS[args.benchmark]
    scenario = args.scenario or spec.scenarios[0]
    if scenario not in data.SCENARIOS:
        problems.append(
            f"unknown scenario {scenario!r}; choose from {', '.join(data.SCENARIOS)}"
        )
    elif scenario not in spec.scenarios:
        problems.append(
            f"--scenario {scenario}: {args.benchmark} has the "
            f"{', '.join(spec.scenarios)}-incremental scenario only (each of "
            f"its experiences holds every class)"
        )
    if args.first_half and args.benchmark != "splitcifar100":
        problems.append("--first-half applies to splitcifar100 only")
    source = str(args.config or CONFIG_DIR / f"{args.benchmark}.toml")
    try:
        config = load_config(args.benchmark, args.config, quick=args.quick)
    except (FileNotFoundError, ValueError) as error:
        raise PlanError([f"bad config {source}: {error}"]) from None
    for key in sorted(set(config) - _TOP_LEVEL_KEYS):
        problems.append(f"{source}: {key}: not a config key")
    if args.strategies:
        names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    else:
        names = list(config.get("run") or config["strategies"])
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        problems.append(
            f"unknown strategy {', '.join(unknown)}; choose from "
            f"{', '.join(sorted(STRATEGIES))}"
        )
    left_out = {
        name: UNSUPPORTED_SCENARIOS[name][scenario]
        for name in names
        if scenario in UNSUPPORTED_SCENARIOS.get(name, {})
    }
    if args.strategies:
        for name, why in left_out.items():
            problems.append(
                f"--strategies {name}: no {scenario}-incremental run: {why}"
            )
        left_out = {}
    names = [name for name in names if name not in left_out]
    for name in sorted(set(config["strategies"]) - set(STRATEGIES)):
        problems.append(f"{source}: [strategies.{name}]: unknown strategy {name!r}")
    # every section, not only those run now: a typo shows in any command
    for name in sorted(set(config["strategies"]) & set(STRATEGIES)):
        problems += _setting_problems(name, config["strategies"][name], source)
    solver = dict(config["solver"])
    if args.epochs is not None:
        solver["train_epochs"] = args.epochs
    problems += _solver_problems(solver, source)
    protocol, protocol_problems = read_protocol(config, args.protocol, source)
    problems += protocol_problems
    n_experiences = (
        args.experiences
        if args.experiences is not None
        else config.get("experiences", 5)
    )
    first_half = args.first_half and args.benchmark == "splitcifar100"
    why = experience_count_problem(
        n_experiences, spec.num_classes, first_half, splits_classes=spec.splits_classes
    )
    if why:
        problems.append(
            f"--experiences {n_experiences}: {args.benchmark} has "
            f"{spec.num_classes} classes; the number of experiences {why}"
        )
    seeds = args.seeds or config.get("seeds") or [0]
    subset = (
        args.train_subset
        if args.train_subset is not None
        else config.get("train_subset")
    )
    if subset is not None and subset < 1:
        problems.append(f"--train-subset must be >= 1, got {subset}")
    try:
        device = check_device(args.device)
    except ValueError as error:
        problems.append(str(error))
        device = None
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads must be >= 1, got {args.threads}")
    if args.jobs < 1:
        problems.append(f"--jobs must be >= 1, got {args.jobs}")
    if args.nproc != 1:
        settings = {name: config["strategies"].get(name, {}) for name in names}
        problems += _nproc_problems(args, device, names, settings, solver, protocol)
    root = data.resolve_data_root(args.data_root)
    try:
        data.check_data_root(spec, root)
    except data.DataRootError as error:
        problems.append(str(error))
    stem = f"{args.benchmark}_{scenario}_il"
    if n_experiences != config.get("experiences", 5):
        # another protocol (e.g. one class per experience) gets its own files
        stem += f"_{n_experiences}exp"
    if args.protocol != "plain":
        stem += f"_{args.protocol}"
    if args.quick:
        stem += "_quick"
    if args.output is not None:
        output = Path(args.output)
    elif args.resume:
        output = _latest_output(args.benchmark)
        if output is None:
            problems.append(
                f"--resume: no earlier run under {RUNS_FOLDER}/; give its --output"
            )
            output = _default_output(args.benchmark)
    else:
        output = _default_output(args.benchmark)
    if args.quick and _is_committed_results(output):
        problems.append(
            f"--quick never writes into the committed results ({COMMITTED_RESULTS})"
        )
    if problems:
        raise PlanError(problems)
    # the only check that writes: kept last, so a bad plan leaves no folder
    unwritable = _writable_problem(output)
    if unwritable:
        raise PlanError([unwritable])
    results = output / f"{stem}.json"
    if results.exists() and not (args.update or args.overwrite or args.resume):
        raise PlanError(
            [
                f"{results} exists: --update merges these runs into it, "
                f"--resume continues it, --overwrite replaces it"
            ]
        )
    if args.resume and not results.exists():
        raise PlanError([f"--resume: no results file {results} to continue"])
    return Plan(
        benchmark=args.benchmark,
        scenario=scenario,
        n_experiences=n_experiences,
        first_half=args.first_half,
        strategies=names,
        seeds=list(seeds),
        solver=solver,
        protocol=protocol,
        settings={name: config["strategies"].get(name, {}) for name in names},
        train_subset=subset,
        data_root=root,
        device=str(device),
        threads=args.threads,
        jobs=args.jobs,
        output=output,
        stem=stem,
        command="avl-genreplay " + " ".join(argv),
        config_file=os.path.relpath(source) if args.config else Path(source).name,
        update=args.update,
        overwrite=args.overwrite,
        resume=args.resume,
        images=not args.no_images,
        tensorboard=args.tensorboard,
        replay_quality=not args.no_replay_quality,
        left_out=left_out,
        nproc=args.nproc,
    )
