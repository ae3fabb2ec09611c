"""What a strategy carries from one experience to the next, besides its solver.

A continual learner is judged by what it keeps as well as by its accuracy:
generators and their critics, frozen copies of past networks, optimiser
states that live on, replay pools and exemplar buffers.
:func:`retained_bytes` measures that from the objects themselves, so every
strategy (this package's and Avalanche's) is measured the same way.
"""

from typing import Any, Set

import torch
from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.training.templates import BaseTemplate
from torch import nn
from torch.utils.data import Dataset

__all__ = ["retained_bytes"]

# the template's own per-experience state (the current data, the minibatch,
# the evaluation), not something the strategy keeps for later experiences
_TEMPLATE_STATE = {
    "model",
    "optimizer",
    "evaluator",
    "experience",
    "adapted_dataset",
    "dataloader",
    "mbatch",
    "mb_output",
    "loss",
    "clock",
    "_criterion",
    "current_eval_stream",
    "_eval_streams",
    "_experiences",
}


class _Walker:
    def __init__(self, skip_storages: Set[int]):
        self.storages = set(skip_storages)
        self.visited: Set[int] = set()
        self.total = 0

    def tensor(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self.storages or storage.nbytes() == 0:
            return
        self.storages.add(storage.data_ptr())
        self.total += storage.nbytes()

    def dataset(self, dataset) -> None:
        # a buffer of samples (e.g. Avalanche's exemplar memory): its samples'
        # size, not the size of the underlying dataset it indexes into
        if len(dataset) == 0:
            return
        first = dataset[0]
        x = first[0] if isinstance(first, (tuple, list)) else first
        if isinstance(x, torch.Tensor):
            self.total += len(dataset) * x.numel() * x.element_size()

    def visit(self, value: Any, depth: int = 0) -> None:
        if depth > 12 or value is None or isinstance(value, (str, bytes, int, float)):
            return
        if isinstance(value, torch.Tensor):
            self.tensor(value)
            return
        if id(value) in self.visited:
            return
        self.visited.add(id(value))
        if isinstance(value, nn.Module):
            for tensor in value.state_dict(keep_vars=True).values():
                self.tensor(tensor)
            return
        if isinstance(value, torch.optim.Optimizer):
            for state in value.state.values():
                self.visit(state, depth + 1)
            return
        if isinstance(value, (Dataset, AvalancheDataset)):
            self.dataset(value)
            return
        if isinstance(value, BaseTemplate):
            # a template inside the strategy (e.g. Avalanche's generator
            # strategy): its networks count, its current data does not
            for name, item in vars(value).items():
                if name not in _TEMPLATE_STATE or name in ("model", "optimizer"):
                    self.visit(item, depth + 1)
            return
        if isinstance(value, dict):
            for item in value.values():
                self.visit(item, depth + 1)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                self.visit(item, depth + 1)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            for item in vars(value).values():
                self.visit(item, depth + 1)


def retained_bytes(strategy) -> int:
    """Bytes of what ``strategy`` keeps besides its solver, measured between
    experiences (e.g. after ``strategy.train(experience)``): every tensor
    reachable from its attributes and plugins (networks, frozen copies,
    optimiser states, replay pools), each storage counted once, and the
    samples of datasets it holds (exemplar buffers). The solver's parameters
    and its optimiser's state, the current experience's data and the
    evaluation plugin are left out.

    :param strategy: an Avalanche template.
    :return: the size in bytes.
    """
    solver = set()
    for tensor in strategy.model.state_dict(keep_vars=True).values():
        solver.add(tensor.untyped_storage().data_ptr())
    for state in getattr(strategy.optimizer, "state", {}).values():
        for tensor in state.values():
            if isinstance(tensor, torch.Tensor):
                solver.add(tensor.untyped_storage().data_ptr())
    walker = _Walker(solver)
    walker.visited.update({id(strategy), id(strategy.model), id(strategy.optimizer)})
    walker.visited.add(id(getattr(strategy, "evaluator", None)))
    experience = getattr(strategy, "experience", None)
    for current in (experience, getattr(experience, "dataset", None)):
        if current is not None:
            walker.visited.add(id(current))
    for name, value in vars(strategy).items():
        if name in _TEMPLATE_STATE or name == "plugins":
            continue
        walker.visit(value)
    for plugin in getattr(strategy, "plugins", []):
        if plugin is getattr(strategy, "evaluator", None):
            continue
        walker.visit(plugin)
    return walker.total
