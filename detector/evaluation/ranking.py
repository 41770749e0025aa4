"""Fast stable orderings for millions of detections.

``np.lexsort`` over several keys of 4M elements costs seconds; packing the keys into one unique int64
(mixed radix, when it fits) and sorting that once is several times faster and gives the same order.
"""

from __future__ import annotations

import numpy as np

_LIMIT = 1 << 62


def descending_ranks(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks of ``scores`` (D,) by descending value.

    Returns ``(stable, dense)``, int64 ``(D,)``: ``stable`` is the position in a stable descending sort
    (ties in the given order, all distinct); ``dense`` numbers the distinct values 0, 1, ... from the
    largest (ties equal).
    """
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    stable = np.empty(len(scores), dtype=np.int64)
    stable[order] = np.arange(len(scores), dtype=np.int64)
    ordered = scores[order]
    new = np.ones(len(scores), dtype=np.int64)
    if len(scores):
        new[1:] = ordered[1:] != ordered[:-1]
    dense = np.empty(len(scores), dtype=np.int64)
    dense[order] = np.cumsum(new) - 1
    return stable, dense


def order_by(*keys: np.ndarray, unique: bool = False) -> np.ndarray:
    """Indices sorting by ``keys[0]``, then ``keys[1]``, ... (non-negative int64 arrays), ties in the given
    order: the same as ``np.lexsort(keys[::-1] + (arange,))``. ``unique``: the keys together are already
    distinct, so no position key is needed."""
    n = len(keys[0])
    combined = np.zeros(n, dtype=np.int64)
    span = 1
    bounds = [int(k.max()) + 1 if n else 1 for k in keys] + ([] if unique else [n])
    for bound in bounds:
        span *= max(bound, 1)
    if span >= _LIMIT:
        return np.lexsort((np.arange(n),) + tuple(keys[::-1]))
    for key, bound in zip(keys, bounds):
        combined *= max(bound, 1)
        combined += key
    if not unique:
        combined *= max(n, 1)
        combined += np.arange(n, dtype=np.int64)
    return np.argsort(combined)  # unique keys: any sort algorithm gives the stable order


def group_by_small_int(values: np.ndarray) -> np.ndarray:
    """Stable argsort of small non-negative integers (labels): a radix sort on int16 when they fit."""
    values = np.asarray(values)
    if len(values) and values.max() < (1 << 15):
        return np.argsort(values.astype(np.int16), kind="stable")
    return np.argsort(values, kind="stable")
