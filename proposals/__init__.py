"""Region proposals: Selective Search, MultiBox, and the GoogLeNet recipe that merges them.

- :func:`selective_search` (``proposals/selective_search.py``): Uijlings et al.'s Selective Search.
- :func:`propose`: one entry point for every method (``"ss-fast"``, ``"ss-quality"``, ...).
"""

from proposals.propose import METHODS, propose
from proposals.selective_search import selective_search

__all__ = ["METHODS", "propose", "selective_search"]
