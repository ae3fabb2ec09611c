"""Checkpoint and resume, through Avalanche's own mechanism.

Thin wrappers of :func:`avalanche.checkpointing.save_checkpoint` and
:func:`avalanche.checkpointing.maybe_load_checkpoint`. The whole strategy is
pickled, so every plugin's state (generator and its optimiser, the frozen
previous solver and generator, classes seen) travels with it, and Avalanche
stores the RNG states.

Why wrap them: once a torch (2.x) optimiser has stepped, torch patches its
class's ``step``, after which ``dill`` no longer finds the class by name and
tries to pickle it by value, which fails ("Can't pickle sentinel"). Pickling
classes by reference while checkpointing avoids it. And Avalanche's RAM
metrics keep a handle on the process that saved them: in a restarted process
they would watch a process that is gone, so the restored ones are pointed at
the current process.

Under distributed training (``torchrun``) every rank holds the same state:
rank 0 alone writes the file, and every rank reads it (a run over several
machines needs it on a file system they share). The checkpoint then holds no
loggers (Avalanche creates them on the main process only, and a non-main
rank that unpickled them would reopen and write to their files): a restored
strategy keeps the loggers it was built with.
"""

import os
import warnings
from contextlib import contextmanager
from typing import Any, Collection, Optional

import dill
from avalanche.checkpointing import checkpoint as _avalanche
from avalanche.distributed import DistributedHelper

__all__ = ["save_checkpoint", "maybe_load_checkpoint"]


@contextmanager
def _classes_by_reference():
    previous = dill.settings["byref"]
    dill.settings["byref"] = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dill.PicklingWarning)
            yield
    finally:
        dill.settings["byref"] = previous


@contextmanager
def _without_loggers(strategy):
    evaluator = getattr(strategy, "evaluator", None)
    loggers = getattr(evaluator, "loggers", None)
    if loggers is None or not DistributedHelper.is_distributed:
        yield
        return
    evaluator.loggers = []
    try:
        yield
    finally:
        evaluator.loggers = loggers


def save_checkpoint(strategy, fname, exclude: Optional[Collection[str]] = None):
    """Saves the strategy's state (see Avalanche's ``save_checkpoint``); call it
    between experiences, e.g. after each ``strategy.train(experience)``, on
    every rank alike under distributed training (rank 0 writes; the others
    wait for it)."""
    if DistributedHelper.is_main_process:
        with _classes_by_reference(), _without_loggers(strategy):
            _avalanche.save_checkpoint(strategy, fname, exclude=exclude)
    DistributedHelper.barrier()


def maybe_load_checkpoint(
    strategy, fname, map_location: Any = None, unique_objects: Any = None
):
    """Restores a saved strategy if ``fname`` exists (see Avalanche's
    ``maybe_load_checkpoint``).

    :return: ``(strategy, index of the next experience to train)``.
    """
    evaluator = getattr(strategy, "evaluator", None)
    loggers = getattr(evaluator, "loggers", None)
    with _classes_by_reference():
        strategy, start = _avalanche.maybe_load_checkpoint(
            strategy, fname, map_location=map_location, unique_objects=unique_objects
        )
    restored = getattr(strategy, "evaluator", None)
    if loggers is not None and restored is not None and not restored.loggers:
        # a checkpoint written under distributed training holds no loggers
        restored.loggers = loggers
    _watch_this_process(strategy)
    return strategy, start


def _watch_this_process(strategy) -> None:
    from avalanche.evaluation.metrics.ram_usage import MaxRAM
    from psutil import Process

    evaluator = getattr(strategy, "evaluator", None)
    for metric in getattr(evaluator, "metrics", []):
        ram = getattr(metric, "_metric", None)
        if isinstance(ram, MaxRAM):
            ram._process_handle = Process(os.getpid())
