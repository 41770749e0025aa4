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

import math
import numbers
from collections.abc import Mapping
from dataclasses import fields

import numpy as np

from detector.base.checkpoint import checkpoint_paths, load_checkpoint_config
from detector.base.defaults import PROPOSAL_METHODS, SS_BACKENDS
from detector.base.errors import UserError
from proposals.selective_search import MODES, selective_search

METHODS = PROPOSAL_METHODS
SS_ONLY_OPTIONS = ("backend", "max_side", "superpixel_scale", "min_size", "max_boxes", "seed", "sigma")
MULTIBOX_KIND = "multibox"  # proposals.multibox.MODEL_KIND, named here without importing torch


def _whole(low: int, high: int | None = None, none: bool = False):
    def check(value) -> str | None:
        want = f"a whole number {f'>= {low}' if high is None else f'in [{low}, {high}]'}" + (" or null" if none else "")
        if value is None and none:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return f"expected {want}"
        if value < low or (high is not None and value > high):
            return f"expected {want}"
        return None
    return check


def _number(low: float, high: float | None = None, low_open: bool = False):
    def check(value) -> str | None:
        want = (f"> {low:g}" if low_open else f">= {low:g}") if high is None else \
            f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return f"expected a finite number {want}"
        if value < low or (low_open and value == low) or (high is not None and value > high):
            return f"expected a finite number {want}"
        return None
    return check


def _one_of(choices: tuple[str, ...]):
    return lambda value: None if value in choices else f"expected one of {', '.join(choices)}"


def _text(value) -> str | None:
    return None if isinstance(value, str) else "expected a text"


def _multibox_model(value) -> str | None:
    """A MultiBox checkpoint that is there (weights and config) and says it is one; None: the shipped one."""
    if value is None:
        return None
    if not isinstance(value, str):
        return "expected the path of a MultiBox checkpoint"
    weights, _ = checkpoint_paths(value)
    if not weights.is_file():
        return f"no MultiBox checkpoint there ({weights} is missing)"
    try:
        kind = load_checkpoint_config(value).get("kind")
    except UserError as err:
        return str(err)
    return None if kind == MULTIBOX_KIND else f"not a MultiBox checkpoint (kind {kind!r})"


# Every option of every method and what it accepts (see the module docstring and the functions behind).
_SS_OPTIONS = {
    "backend": _one_of(SS_BACKENDS),
    "max_side": _whole(1, 65535, none=True),  # the working image's longest side; null: the input size
    "superpixel_scale": _number(0.0, low_open=True),
    "min_size": _whole(0),  # working pixels; 0 keeps every box
    "max_boxes": _whole(1, none=True),  # null: all; 0 would keep nothing
    "seed": _whole(0),
    "sigma": _number(0.0),  # 0: no smoothing
}
_MULTIBOX_OPTIONS = {
    "model": _multibox_model,
    "device": _text,
    "top_k": _whole(1),
    "nms_iou": _number(0.0, 1.0, low_open=True),
    "batch_size": _whole(1),
}
_GOOGLENET_OPTIONS = {
    **_SS_OPTIONS,
    "ss_mode": _one_of(MODES),
    "multibox_top_k": _whole(0),  # 0: Selective Search alone
    "duplicate_iou": _number(0.0, 1.0, low_open=True),
    "multibox_model": _multibox_model,
}
METHOD_OPTIONS = {
    "ss-fast": _SS_OPTIONS, "ss-quality": _SS_OPTIONS, "ss-single": _SS_OPTIONS,
    # MultiBox accepts the Selective Search options (tools pass them to every method) and ignores them
    "multibox": {**_SS_OPTIONS, **_MULTIBOX_OPTIONS},
    "googlenet": _GOOGLENET_OPTIONS,
}


def check_options(method: str, options: Mapping) -> None:
    """Check ``method`` and its ``options`` for :func:`propose` without running anything: a known method,
    known option names, values of the right type and range, and a MultiBox checkpoint that is there.

    Raises ``ValueError`` naming the first bad option (``"seed='abc': expected a whole number >= 0"``);
    tools call it before any work so that a bad option is one line, not every image failed.
    """
    if method not in METHOD_OPTIONS:
        raise ValueError(f"unknown proposal method {method!r}; use one of {', '.join(METHODS)}")
    known = METHOD_OPTIONS[method]
    for key, value in options.items():
        check = known.get(key)
        if check is None:
            raise ValueError(f"{key}: not an option of method {method}; its options: {', '.join(sorted(known))}")
        problem = check(value)
        if problem:
            raise ValueError(f"{key}={value!r}: {problem}")


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
