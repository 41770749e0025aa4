"""One entry point for every proposal method: ``propose(image, method, **options)``.

Methods:
- ``"ss-fast"``, ``"ss-quality"``, ``"ss-single"``: Selective Search in that mode
  (:func:`proposals.selective_search.selective_search`; options: ``backend``, ``max_side``,
  ``superpixel_scale``, ``min_size``, ``seed``, ``sigma``).
"""

from __future__ import annotations

import numpy as np

METHODS = ("ss-fast", "ss-quality", "ss-single")


def propose(image: np.ndarray, method: str = "ss-fast", **options) -> np.ndarray:
    """Object proposals for one RGB ``uint8 (H, W, 3)`` image.

    Returns float32 ``(N, 4)`` xyxy boxes in pixels of ``image``, best first.
    """
    if method in ("ss-fast", "ss-quality", "ss-single"):
        from proposals.selective_search import selective_search

        return selective_search(image, mode=method[3:], **options)
    raise ValueError(f"unknown proposal method {method!r}; use one of {', '.join(METHODS)}")
