"""One entry point for every proposal method: ``propose(image, method, **options)``.

Methods:
- ``"ss-fast"``, ``"ss-quality"``, ``"ss-single"``: Selective Search in that mode
  (:func:`proposals.selective_search.selective_search`; options: ``backend``, ``max_side``,
  ``superpixel_scale``, ``min_size``, ``max_boxes`` (fast mode: 2000 by default), ``seed``, ``sigma``).
- ``"multibox"``: the top MultiBox boxes (:mod:`proposals.multibox`; options: ``model`` a checkpoint
  path, default the shipped model; ``top_k`` (200); ``nms_iou`` (0.7); ``device``; Selective Search
  options are accepted and have no effect).
- ``"googlenet"``: Selective Search fast with ``superpixel_scale=2`` then the top 200 MultiBox boxes,
  near-duplicates removed (:mod:`proposals.merge`; options: the fields of
  :class:`proposals.merge.GoogLeNetRecipe` and further Selective Search options).
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from detector.base.defaults import PROPOSAL_METHODS
from proposals.selective_search import selective_search

METHODS = PROPOSAL_METHODS
SS_ONLY_OPTIONS = ("backend", "max_side", "superpixel_scale", "min_size", "max_boxes", "seed", "sigma")


def propose(image: np.ndarray, method: str = "ss-fast", **options) -> np.ndarray:
    """Object proposals for one RGB ``uint8 (H, W, 3)`` image.

    Returns float32 ``(N, 4)`` xyxy boxes in pixels of ``image``, best first.
    """
    if method in ("ss-fast", "ss-quality", "ss-single"):
        return selective_search(image, mode=method[3:], **options)
    if method == "multibox":
        # torch (~4 s to import) only for the methods that use it, not for Selective Search
        from proposals.multibox import cached_multibox

        model = options.pop("model", None)
        device = options.pop("device", "cpu")
        for name in SS_ONLY_OPTIONS:  # tools pass their Selective Search settings to every method
            options.pop(name, None)
        net = cached_multibox(None if model is None else str(model), str(device))
        return net.propose([image], **options)[0][0]
    if method == "googlenet":
        from proposals.merge import GoogLeNetRecipe, googlenet_proposals  # torch, as above

        names = {f.name for f in fields(GoogLeNetRecipe)}
        recipe = GoogLeNetRecipe(**{k: options.pop(k) for k in list(options) if k in names})
        return googlenet_proposals(image, recipe, **options)
    raise ValueError(f"unknown proposal method {method!r}; use one of {', '.join(METHODS)}")
