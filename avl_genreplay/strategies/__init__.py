"""Strategies of this package: Avalanche templates wiring its plugins."""

from avl_genreplay.strategies.ddgr import DDGR
from avl_genreplay.strategies.dgm import DGM
from avl_genreplay.strategies.dgr import DGR

__all__ = ["DGR", "DGM", "DDGR"]
