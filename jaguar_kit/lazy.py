"""Package names that load their module on first use (PEP 562), so importing a package is cheap.

Written here rather than taken from ``lazy_loader`` (scientific-python): the wheel installs on
Kaggle with ``--no-deps``, and these ten lines are all the kit needs of it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from importlib import import_module


def lazy_exports(package: str, home: Mapping[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``home`` maps each public name to the submodule
    that defines it; a name is imported when first looked up, then kept in the package."""

    def __getattr__(name: str):
        if name in home:
            value = getattr(import_module(f".{home[name]}", package), name)
            setattr(sys.modules[package], name, value)  # later look-ups skip this function
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(list(vars(sys.modules[package])) + list(home))

    return __getattr__, __dir__
