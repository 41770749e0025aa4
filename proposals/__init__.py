"""Region proposals: Selective Search, MultiBox, and the GoogLeNet recipe that merges them.

- :func:`selective_search` (``proposals/selective_search.py``): Uijlings et al.'s Selective Search.
- :func:`propose`: one entry point for every method (``"ss-fast"``, ``"ss-quality"``, ...).
- :class:`ProposalStore` (``proposals/store.py``): precomputed proposals on disk,
  ``store[image_name] -> (boxes, scores or None)``; written by ``tools/precompute_proposals.py``.
"""

from proposals.propose import METHODS, propose
from proposals.selective_search import selective_search
from proposals.store import ProposalStore

__all__ = ["METHODS", "ProposalStore", "propose", "selective_search"]
