"""Random transformations of the solver's training inputs, as a plugin.

:class:`InputAugmentationPlugin` transforms each training minibatch (e.g. with
Kornia's ``RandomAffine``) before the solver's forward pass, in any Avalanche
template. Whatever is in the minibatch is transformed alike: the experience's
data, and the samples that replay plugins put into it (Avalanche's exemplar
``Replay``, its ``GenerativeReplay``). :class:`~avl_genreplay.replay.
SolverReplayPlugin` uses it for the current data and applies the same
transformation to the replay it adds, so one input pipeline serves every
strategy of a comparison.
"""

from typing import Callable, Optional

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor

from avl_genreplay.distributed import RankRandom

__all__ = ["InputAugmentationPlugin"]


class InputAugmentationPlugin(SupervisedPlugin, supports_distributed=True):
    """Trains the solver on randomly transformed minibatches.

    The transformed batch stands in ``strategy.mbatch`` from the forward pass
    to the backward pass, so that plugins that read the inputs there (e.g.
    LwF's distillation of the previous model) see what the solver saw; the
    untransformed batch is put back after the backward pass, for plugins that
    learn the data itself afterwards (a generator trained alongside the
    solver). Evaluation is never transformed. Under distributed training
    each rank draws its transformations from a random stream of its own
    (:class:`~avl_genreplay.distributed.RankRandom`), so ranks do not
    transform their shares of the batch alike.

    :param transform: a random transformation of a batch of inputs, e.g.
        ``kornia.augmentation.RandomAffine(degrees=10, p=1.0)``.
    """

    def __init__(self, transform: Callable[[Tensor], Tensor]):
        super().__init__()
        if not callable(transform):
            raise ValueError(
                f"transform must be callable, got {type(transform).__name__}"
            )
        self.transform = transform
        self._untransformed: Optional[Tensor] = None
        self.random = RankRandom(type(self).__name__)

    def before_training_exp(self, strategy, **kwargs):
        self.random.reset()

    def before_forward(self, strategy, **kwargs):
        self._untransformed = strategy.mbatch[0]
        with torch.no_grad(), self.random(strategy.device):
            strategy.mbatch[0] = self.transform(self._untransformed)

    def after_backward(self, strategy, **kwargs):
        if self._untransformed is not None:
            strategy.mbatch[0] = self._untransformed
            self._untransformed = None
