"""Avalanche's Synaptic Intelligence plugin, keeping copies of the weights.

In avalanche-lib 0.6.0, ``SynapticIntelligencePlugin.extract_weights`` stores
``param.detach().cpu().flatten()``. On a CPU, ``.cpu()`` and ``flatten()``
return the parameter's own storage, so what the plugin keeps as "the weights
before this step" and "the weights at the start of the experience" move with
every optimizer step: each step's contribution to the trajectory is
``grad * 0``, every importance is zero, and the anchor of the penalty is the
live weights. SI then trains exactly as Naive (the harness's SI rows equalled
Naive's to the last digit). On a GPU ``.cpu()`` copies and the plugin works.
"""

from avalanche.training.plugins import SynapticIntelligencePlugin
from avalanche.training.utils import ParamData

__all__ = ["CopyingSynapticIntelligencePlugin"]


class CopyingSynapticIntelligencePlugin(SynapticIntelligencePlugin):
    """:class:`SynapticIntelligencePlugin` whose stored weights are copies,
    on any device. Everything else, the importance and the penalty included,
    is Avalanche's."""

    def before_training_exp(self, strategy, **kwargs):
        super().before_training_exp(strategy, **kwargs)
        _own_storage(self.ewc_data[0])  # the penalty's anchor

    def before_training_iteration(self, strategy, **kwargs):
        super().before_training_iteration(strategy, **kwargs)
        _own_storage(self.syn_data["old_theta"])  # the weights before the step


def _own_storage(params: "dict[str, ParamData]") -> None:
    for param in params.values():
        param.data = param.data.clone()
