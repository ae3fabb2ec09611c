"""The results file of a comparison: read, merge, write, and resume state.

A results file (``<stem>.json``) holds the setup (see
:meth:`~avl_genreplay.bench.plan.Plan.header`), the finished runs grouped by
strategy with their mean and standard deviation over seeds, and whether the
comparison is ``complete``. It is rewritten after every finished run, under a
lock and through a temporary file, so a comparison that is cut off keeps
what it measured and several commands (e.g. one per seed) may add to one
file at the same time. The state of an interrupted run (its checkpoint and
the accuracy rows it had) lies beside it, under ``.resume/``.
"""

import fcntl
import json
import math
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

from avl_genreplay.bench.plan import Plan
from avl_genreplay.bench.strategies import STRATEGIES

__all__ = [
    "ResultsStore",
    "StoreError",
    "SETUP_KEYS",
    "mean_std",
    "summarise",
    "write_json",
]

# what must match for runs of two commands to share one results file
SETUP_KEYS = (
    "benchmark",
    "scenario",
    "n_experiences",
    "train_subset",
    "solver",
    "protocol",
)


class StoreError(ValueError):
    """A results file that cannot be read or belongs to another setup."""


def write_json(path: Path, payload: dict) -> None:
    """Writes ``payload`` through a temporary file, so a reader (or a kill)
    never meets half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(temporary, path)


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
        mine = sorted(
            (r for r in runs if r["strategy"] == name), key=lambda r: r["seed"]
        )
        entry = {"seeds": [r["seed"] for r in mine]}
        for key in (
            "final_avg_acc",
            "avg_forgetting",
            "bwt",
            "wall_seconds",
            "peak_ram_mb",
            "retained_mb",
        ):
            values = [r.get(key) for r in mine]
            entry[key], entry[f"{key}_std"] = mean_std(values)
        entry["generator_bytes"] = mine[0]["generator_bytes"]
        entry["runs"] = mine
        summary[name] = entry
    return summary


def _runs_of(payload: dict) -> List[dict]:
    return [
        run for entry in payload.get("strategies", {}).values() for run in entry["runs"]
    ]


class ResultsStore:
    """The results file of a plan, and the resume state of its runs.

    :param plan: the comparison; its ``update``, ``overwrite`` and ``resume``
        flags say what becomes of a results file already there.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self.path = plan.results_path
        self.header = plan.header()
        self._lock_path = plan.output / f".{plan.stem}.lock"
        self._resume_folder = plan.output / ".resume" / plan.stem
        self._runs: List[dict] = []
        self._earlier: List[dict] = []
        if plan.update or plan.resume:
            old = self.read()
            if old is not None:
                self._earlier = _runs_of(old)
            if plan.resume and old is not None and old.get("settings"):
                self._check_same_settings(old)

    @contextmanager
    def _locked(self):
        with open(self._lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def read(self) -> Optional[dict]:
        """The results file (``None`` if absent); refuses one of another setup."""
        if not self.path.exists():
            return None
        try:
            old = json.loads(self.path.read_text())
        except (OSError, ValueError) as error:
            raise StoreError(f"cannot read {self.path}: {error}") from None
        for key in SETUP_KEYS:
            if old.get(key) != self.header[key]:
                raise StoreError(
                    f"{self.path} holds another setup ({key}: {old.get(key)!r}, "
                    f"now {self.header[key]!r}); drop --update/--resume or choose "
                    f"another --output"
                )
        return old

    def _check_same_settings(self, old: dict) -> None:
        for name in self.plan.strategies:
            before = old["settings"].get(name)
            if before is not None and before != self.header["settings"][name]:
                raise StoreError(
                    f"--resume: {name}'s settings differ from those of the runs "
                    f"in {self.path}; resume with the same config"
                )

    def finished(self) -> Set[Tuple[str, int]]:
        """``(strategy, seed)`` of the runs already in the file (``--resume``
        skips them)."""
        if not self.plan.resume:
            return set()
        return {(r["strategy"], r["seed"]) for r in self._earlier}

    def start(self) -> Dict[str, dict]:
        """Writes the file before the first run ends, so a command cut off
        in its first run can be resumed; returns the summary."""
        return self._write(complete=False)

    def add(self, run: dict) -> Dict[str, dict]:
        """Records a finished run and rewrites the file; returns the summary
        of every run the file holds."""
        self._runs.append(run)
        self.clear_resume_state(run["strategy"], run["seed"])
        return self._write(complete=False)

    def finish(self) -> Dict[str, dict]:
        """Marks the comparison complete and removes its emptied resume
        folders; returns the summary."""
        summary = self._write(complete=True)
        # a run's files go when it ends; the folders go once nothing is left
        # in them (another command's runs may still keep theirs there)
        for folder in (self._resume_folder, self._resume_folder.parent):
            try:
                folder.rmdir()
            except OSError:  # absent, or still holding a run's state
                break
        return summary

    def _write(self, complete: bool) -> Dict[str, dict]:
        with self._locked():
            runs, settings = self._runs, dict(self.header["settings"])
            old = None  # the file before this write, read when merging into it
            if self.plan.update or self.plan.resume:
                # read again: another command may have added runs meanwhile
                old = self.read()
                earlier = _runs_of(old) if old is not None else self._earlier
                mine = {(r["strategy"], r["seed"]) for r in runs}
                kept = []
                for run in earlier:
                    if (run["strategy"], run["seed"]) not in mine:
                        run.setdefault("command", (old or {}).get("command"))
                        kept.append(run)
                runs = kept + runs
                settings = {**(old or {}).get("settings", {}), **settings}
            summary = summarise(runs)
            wall = time.time() - self.plan.started
            payload = dict(self.header, settings=settings)
            payload.update(
                complete=complete,
                total_wall_seconds=wall,
                commands=self._commands(old, wall, complete),
                strategies=summary,
            )
            write_json(self.path, payload)
        return summary

    def _commands(self, old: Optional[dict], wall: float, complete: bool):
        """Every command that wrote runs into the file, in order, this one
        last, each with its own wall time: the header's ``command`` and
        ``total_wall_seconds`` are the last command's, which after ``--update``
        or ``--resume`` are not the first's."""
        mine = dict(
            command=self.header["command"],
            started=self.plan.started,
            total_wall_seconds=wall,
            complete=complete,
        )
        if old is None:
            return [mine]
        earlier = old.get("commands") or [
            {  # a file written before commands were listed
                "command": old.get("command"),
                "started": None,
                "total_wall_seconds": old.get("total_wall_seconds"),
                "complete": old.get("complete"),
            }
        ]
        return [c for c in earlier if c["started"] != self.plan.started] + [mine]

    # --- the state of an interrupted run -----------------------------------

    def resume_paths(self, strategy: str, seed: int) -> Tuple[Path, Path]:
        """Where a run keeps its checkpoint and its rows so far."""
        stem = self._resume_folder / f"{strategy}_seed{seed}"
        return stem.with_suffix(".ckpt"), stem.with_suffix(".json")

    def drop_stale_state(self, runs: List[Tuple[str, int]]) -> List[Tuple[str, int]]:
        """Without ``--resume`` every run starts afresh: removes the state that
        a cut-off command left for any of ``runs`` (they would otherwise
        continue it, whatever that command's settings or code) and returns
        those runs.

        :param runs: ``(strategy, seed)`` pairs this command will run.
        """
        if self.plan.resume:
            return []
        dropped = []
        for strategy, seed in runs:
            if any(path.exists() for path in self.resume_paths(strategy, seed)):
                self.clear_resume_state(strategy, seed)
                dropped.append((strategy, seed))
        return dropped

    def clear_resume_state(self, strategy: str, seed: int) -> None:
        for path in self.resume_paths(strategy, seed):
            path.unlink(missing_ok=True)
