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


def _load_raw(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    with path.open("rb") as handle:
        config = tomllib.load(handle)
    parent = config.pop("inherit", None)
    if parent is not None:  # beside this file, else among the package's configs
        parent_path = path.with_name(f"{parent}.toml")
        if not parent_path.is_file():
            parent_path = CONFIG_DIR / f"{parent}.toml"
        config = merge(_load_raw(parent_path), config)
    return config


def load_config(benchmark: str, path: Optional[Path] = None, quick: bool = False):
    """The config of ``benchmark`` (or the file at ``path``); with ``quick``,
    its ``[quick]`` table applied on top. A config may name another with
    ``inherit = "NAME"`` and hold only what differs from it."""
    config = _load_raw(Path(path) if path else CONFIG_DIR / f"{benchmark}.toml")
    quick_table = config.pop("quick", {})
    if quick:
        config = merge(config, quick_table)
    config.setdefault("solver", {})
    config.setdefault("strategies", {})
    return config
