"""Package faces that load their public names on first use (PEP 562).

``detector/__init__.py`` and ``proposals/__init__.py`` name their public API here instead of importing it,
so that importing a light submodule (``detector.base.boxes``, ``detector.evaluation``) never runs the
package's heavy modules (torch, numba) through its ``__init__``.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, public: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for ``package``'s ``__init__``; ``public`` maps each public name to the
    module that defines it. A name is imported on its first look-up and then kept in the package."""

    def __getattr__(name: str):
        module = public.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        vars(sys.modules[package])[name] = value  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(public))

    return __getattr__, __dir__
