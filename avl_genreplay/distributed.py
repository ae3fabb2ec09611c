"""Data-parallel training under Avalanche's ``DistributedHelper`` (``torchrun``).

Every process (rank) holds the whole model, solver and generator alike, and
trains on its own share of each batch; before each optimiser step the
gradients are averaged across ranks, so every rank takes the same step and
the models stay identical, as if one process had trained on the batches of
all ranks together. This is what ``DistributedDataParallel`` does, done at the
optimiser instead of through a wrapped module: the critics here differentiate
with ``torch.autograd.grad`` (WGAN-GP's gradient penalty), which
``DistributedDataParallel``'s documentation says it does not support, and
DGM's generator grows, which a wrapped module would have to be rebuilt for.

Random numbers follow Avalanche's convention: the global generators hold the
same state on every rank (``DistributedHelper.init_distributed`` seeds them
alike), so whatever Avalanche draws (model initialisation, exemplar
selection) is the same everywhere. What ranks must not share (replayed
samples, a generator's noise, random input transformations) is drawn from a
stream of each rank's own (:class:`RankRandom`). In a single process none of
this applies and every function here leaves things as they are.

Sizes are per process, as Avalanche's ``train_mb_size``: divide the
single-process batch sizes (the solver's, the replay's, the generator's) by
the number of processes to keep the total.
"""

import uuid
import zlib
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

import torch
import torch.distributed as dist
from avalanche.benchmarks.utils.data_loader import SingleDatasetDataLoader
from avalanche.core import SupervisedPlugin
from avalanche.distributed import DistributedHelper
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

__all__ = [
    "DataParallelPlugin",
    "RankRandom",
    "average_gradients",
    "average_values",
    "broadcast_modules",
    "gather_shares",
    "shard_sampler",
    "any_rank",
    "first_found",
    "extreme",
    "sum_counts",
    "union",
    "with_data_parallel",
    "launch",
]


def _distributed() -> bool:
    return DistributedHelper.is_distributed


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Replaces the gradient of every parameter of ``optimizer`` by its mean
    across ranks (a parameter without a gradient on a rank counts as zero
    there, as in ``DistributedDataParallel``; one without a gradient on every
    rank keeps none, so the optimiser skips it as it would in one process).
    Call it between the backward pass and ``optimizer.step()``, on every rank
    alike. No-op in a single process."""
    if not _distributed():
        return
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if not parameters:
        return
    device = parameters[0].device
    # one collective for all: a presence flag per parameter, then the gradients
    flags = torch.tensor([float(p.grad is not None) for p in parameters], device=device)
    grads = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
        for p in parameters
    ]
    flat = torch.cat([flags, *[g.to(flags.dtype) for g in grads]])
    dist.all_reduce(flat)
    flat /= DistributedHelper.world_size
    present, offset = flat[: len(parameters)] > 0, len(parameters)
    for parameter, seen in zip(parameters, present.tolist()):
        size = parameter.numel()
        if seen:
            mean = flat[offset : offset + size].view_as(parameter).to(parameter.dtype)
            if parameter.grad is None:
                parameter.grad = mean.clone()
            else:
                parameter.grad.copy_(mean)
        offset += size


def average_values(values: Dict[str, float], device=None) -> Dict[str, float]:
    """The mean of each value across ranks (every rank passes the same keys),
    e.g. a training step's losses; the values themselves in a single
    process."""
    if not _distributed() or not values:
        return values
    names = sorted(values)
    device = DistributedHelper.make_device() if device is None else device
    flat = torch.tensor([float(values[n]) for n in names], device=device)
    dist.all_reduce(flat)
    flat /= DistributedHelper.world_size
    return dict(zip(names, flat.tolist()))


@torch.no_grad()
def broadcast_modules(
    *modules: Optional[nn.Module], buffers_only: bool = False
) -> None:
    """Copies rank 0's parameters and buffers (or its buffers only) into
    every rank's modules (in place, so optimisers keep their references), as
    ``DistributedDataParallel`` does when it wraps a module: whatever a rank
    initialised at random on its own (a grown layer, a fresh embedding) or
    measured on its own data (batch-norm statistics) becomes rank 0's.
    Anything that is not a module is skipped. No-op in a single process."""
    if not _distributed():
        return
    for module in modules:
        if not isinstance(module, nn.Module):
            continue
        parameters = [] if buffers_only else list(module.parameters())
        for tensor in parameters + list(module.buffers()):
            DistributedHelper.broadcast(tensor.data)


def any_rank(flag: bool, device=None) -> bool:
    """Whether ``flag`` holds on at least one rank; ``flag`` in a single
    process."""
    if not _distributed():
        return flag
    device = DistributedHelper.make_device() if device is None else device
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def first_found(found: Optional[str], device=None) -> Optional[str]:
    """The first rank's ``found`` that is not ``None`` (in rank order), the
    same on every rank, e.g. a problem that any rank found; ``found`` in a
    single process. Objects are exchanged only when a rank found one."""
    if not any_rank(found is not None, device):
        return None
    if not _distributed():
        return found
    found = DistributedHelper.gather_all_objects(found)
    return next(f for f in found if f is not None)


def extreme(values: Tensor, *, largest: bool) -> Tensor:
    """The elementwise maximum (``largest``) or minimum of ``values`` across
    ranks (for booleans: any / all); ``values`` in a single process."""
    if not _distributed():
        return values
    # gloo reduces no booleans: reduce them as bytes
    reduced = values.to(torch.uint8) if values.dtype == torch.bool else values.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX if largest else dist.ReduceOp.MIN)
    return reduced.to(values.dtype)


def sum_counts(counts: Dict[int, int]) -> Dict[int, int]:
    """Counts summed over ranks, by key in ascending order."""
    if not _distributed():
        return dict(sorted(counts.items()))
    total: Dict[int, int] = {}
    for each in DistributedHelper.gather_all_objects(dict(counts)):
        for key, value in each.items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items()))


def union(items: Iterable[int]) -> Set[int]:
    """The union over ranks of each rank's ``items``."""
    items = set(int(i) for i in items)
    if not _distributed():
        return items
    return set().union(*DistributedHelper.gather_all_objects(sorted(items)))


def gather_shares(total: int, make: Callable[[Tensor], Tensor]) -> Tensor:
    """Splits ``range(total)`` into one contiguous share per rank, has each
    rank ``make`` the rows of its share (``make(indices)`` returns one row per
    index) and returns all rows in order, the same on every rank. Shares have
    equal sizes (collectives need them): the last ranks pad theirs with
    copies of the last index, whose rows are dropped. In a single process,
    ``make(torch.arange(total))``."""
    if not _distributed():
        return make(torch.arange(total))
    world, rank = DistributedHelper.world_size, DistributedHelper.rank
    size = -(-total // world)
    indices = torch.arange(rank * size, (rank + 1) * size).clamp(max=total - 1)
    rows = make(indices)
    return DistributedHelper.cat_all(rows)[:total]


def shard_sampler(dataset) -> Optional[DistributedSampler]:
    """A sampler of this rank's share of ``dataset``, shuffled alike on every
    rank so that the shares do not overlap (call its ``set_epoch`` before each
    pass for a new order); ``None`` in a single process. Its seed comes from
    the global generators (advanced alike on every rank) and rank 0's is
    taken, so the shares are disjoint whatever the ranks' random states."""
    if not _distributed():
        return None
    seed = DistributedHelper.broadcast_object(int(torch.randint(2**31 - 1, ())))
    return DistributedSampler(dataset, shuffle=True, seed=seed)


class RankRandom:
    """A random stream of this rank alone, for draws that ranks must not
    share (replayed samples, a generator's noise, random transformations):
    ``with stream(device): ...`` runs the block on this rank's stream and
    leaves the global generators as they were, so they stay the same on
    every rank as Avalanche expects.

    The stream is seeded at its first use after :meth:`reset` from the global
    generators (the same on every rank, and untouched by drawing the seed),
    the rank and ``name``, so two objects do not share a stream and a run
    resumed at an experience draws what it drew. In a single process the
    block runs on the global generators, as it would without this.

    :param name: tells the streams of different objects apart.
    """

    def __init__(self, name: str):
        self.salt = zlib.crc32(name.encode())
        self._states: Optional[tuple] = None

    def reset(self) -> None:
        """Seeds the stream again at its next use (call it before each
        experience)."""
        self._states = None

    @contextmanager
    def __call__(self, device):
        if not _distributed():
            yield
            return
        device = torch.device(device)
        cuda = device.type == "cuda"
        index = None
        if cuda:
            index = (
                torch.cuda.current_device() if device.index is None else device.index
            )
        with torch.random.fork_rng(devices=[index] if cuda else []):
            if self._states is None:
                base = int(torch.randint(2**31 - 1, ()))
                seed = hash((base, self.salt, DistributedHelper.rank)) % 2**63
                torch.random.default_generator.manual_seed(seed)
                if cuda:
                    torch.cuda.default_generators[index].manual_seed(seed)
            else:
                cpu_state, cuda_state = self._states
                torch.set_rng_state(cpu_state)
                if cuda:
                    torch.cuda.set_rng_state(cuda_state, index)
            yield
            self._states = (
                torch.get_rng_state(),
                torch.cuda.get_rng_state(index) if cuda else None,
            )

    def __getstate__(self):
        # seeded again after a resume: a checkpoint holds rank 0's stream
        return {"salt": self.salt, "_states": None}


def _wrapped(model: nn.Module) -> bool:
    return isinstance(model, DistributedDataParallel)


class DataParallelPlugin(SupervisedPlugin, supports_distributed=True):
    """Trains the solver data-parallel under ``torchrun``, where Avalanche
    0.6's templates do not: they shard each experience across ranks (its
    data loaders' ``DistributedSampler``) but neither wrap the model nor
    average its gradients, so without this plugin every rank would train a
    solver of its own on its share of the data.

    Before each update the solver's gradients are averaged across ranks
    (:func:`average_gradients`); each experience starts from rank 0's solver
    and each training epoch ends with rank 0's buffers (e.g. batch-norm
    statistics, as ``DistributedDataParallel`` keeps them). A solver the user
    wrapped with ``DistributedHelper.wrap_model`` averages its own gradients
    and is left alone. With ``whole_evaluation`` every rank evaluates the
    whole evaluation data: Avalanche 0.6 shards it too (padded with repeated
    samples) but does not gather the metrics, so each rank would report those
    of its share only. In a single process the plugin does nothing.

    :param whole_evaluation: evaluate every rank on all the evaluation data,
        so every rank's metrics are those of a single process.
    """

    def __init__(self, *, whole_evaluation: bool = True):
        super().__init__()
        self.whole_evaluation = whole_evaluation

    def before_training_exp(self, strategy, **kwargs):
        if not _wrapped(strategy.model):
            broadcast_modules(strategy.model)

    def before_update(self, strategy, **kwargs):
        if not _wrapped(strategy.model):
            average_gradients(strategy.optimizer)

    def after_training_epoch(self, strategy, **kwargs):
        model = DistributedHelper.unwrap_model(strategy.model)
        broadcast_modules(model, buffers_only=True)

    def before_eval_exp(self, strategy, **kwargs):
        loader = strategy.dataloader
        if (
            not self.whole_evaluation
            or not isinstance(loader, SingleDatasetDataLoader)
            or not loader.distributed_sampling
        ):
            return
        strategy.dataloader = SingleDatasetDataLoader(
            strategy.adapted_dataset,
            batch_size=loader.batch_sizes[0],
            distributed_sampling=False,
            **loader.loader_kwargs,
        )


def with_data_parallel(plugins: Optional[List[SupervisedPlugin]]) -> list:
    """``plugins`` and, under distributed training, a
    :class:`DataParallelPlugin` if they hold none (what this package's
    strategies train with)."""
    plugins = list(plugins or [])
    if _distributed() and not any(isinstance(p, DataParallelPlugin) for p in plugins):
        plugins.append(DataParallelPlugin())
    return plugins


def _in_process_group(use_cuda: bool, entrypoint: Callable, *args) -> Any:
    """A rank of :func:`launch`: joins the process group, runs the entry
    point and leaves the group."""
    DistributedHelper.init_distributed(random_seed=0, use_cuda=use_cuda)
    try:
        return entrypoint(*args)
    finally:
        dist.destroy_process_group()


def launch(nproc: int, entrypoint: Callable, *args, use_cuda: bool = False) -> Dict:
    """Runs ``entrypoint(*args)`` in ``nproc`` new processes on this machine,
    through ``torchrun``'s launcher (``torch.distributed.launcher``), each in
    the process group Avalanche's ``DistributedHelper.init_distributed``
    makes (gloo on CPUs; nccl with ``use_cuda``, rank ``r`` on GPU ``r``).

    :return: each rank's return value, by rank.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        # torchrun --standalone: a rendezvous on a free local port
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        run_id=str(uuid.uuid4()),
        max_restarts=0,
    )
    return elastic_launch(config, _in_process_group)(use_cuda, entrypoint, *args)
