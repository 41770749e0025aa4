"""``cached_njit``: numba's ``njit`` with its on-disk cache, so only the first process after an install
compiles (seconds to a minute); every later one loads the machine code (about a second for numba's
own start-up).

numba writes the cache beside the source (``proposals/__pycache__``) and, where that folder cannot be
written (a read-only or system-wide install), in the user's cache folder (``~/.cache/numba``), or in
``NUMBA_CACHE_DIR`` when that is set. Where none of them can be written numba would refuse to import
the module; the functions then compile in every process instead, with one warning saying so.
"""

from __future__ import annotations

import warnings

from numba import njit

_warned = False


def cached_njit(fn):
    """``numba.njit(cache=True)(fn)``, or ``numba.njit(fn)`` where no cache folder can be written."""
    global _warned
    try:
        return njit(cache=True)(fn)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        if not _warned:
            _warned = True
            warnings.warn("numba cannot write its cache beside the package or in ~/.cache/numba, so Selective "
                          "Search compiles in every process (about 15 s); set NUMBA_CACHE_DIR to a writable "
                          "folder", stacklevel=2)
        return njit(fn)
