"""Strategies: Avalanche templates wired with this package's plugins."""

from avl_genreplay.strategies.dgr import DGR

__all__ = ["DGR"]
