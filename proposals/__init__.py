"""Region proposals: Selective Search, MultiBox, and the GoogLeNet recipe that merges them.

- :func:`selective_search` (``proposals/selective_search.py``): Uijlings et al.'s Selective Search.
- :func:`propose`: one entry point for every method (``"ss-fast"``, ``"ss-quality"``, ...).
- :class:`ProposalStore` (``proposals/store.py``): precomputed proposals on disk,
  ``store[image_name] -> (boxes, scores or None)``; written by ``tools/precompute_proposals.py``.

The names are loaded on first use (PEP 562): Selective Search compiles with numba and MultiBox needs
torch, and neither should be paid for by a module that only reads a store.
"""

from __future__ import annotations

import sys
import types

from detector.base.lazy import lazy_exports

# public name -> the module that defines it
_PUBLIC = {
    "METHODS": "proposals.propose",
    "propose": "proposals.propose",
    "selective_search": "proposals.selective_search",
    "ProposalStore": "proposals.store",
}
__all__ = sorted(_PUBLIC)

__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)


class _Face(types.ModuleType):
    """This package, refusing the submodules ``propose`` and ``selective_search`` as attributes: importing
    them would otherwise make ``proposals.propose`` the module instead of the function of the same name."""

    def __setattr__(self, name: str, value) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return  # the submodule stays reachable as sys.modules["proposals.<name>"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Face
