"""Per-benchmark config files: hyperparameters of every strategy, readable TOML."""

import copy
import sys
from pathlib import Path
from typing import Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["CONFIG_DIR", "load_config", "merge"]

CONFIG_DIR = Path(__file__).with_name("configs")


def merge(base: dict, override: dict) -> dict:
    """``base`` updated by ``override``, recursively for tables."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(benchmark: str, path: Optional[Path] = None, quick: bool = False):
    """The config of ``benchmark`` (or the file at ``path``); with ``quick``,
    its ``[quick]`` table applied on top."""
    path = Path(path) if path else CONFIG_DIR / f"{benchmark}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    with path.open("rb") as handle:
        config = tomllib.load(handle)
    quick_table = config.pop("quick", {})
    if quick:
        config = merge(config, quick_table)
    config.setdefault("solver", {})
    config.setdefault("strategies", {})
    return config
