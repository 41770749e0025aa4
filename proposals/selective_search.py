"""Selective Search (Uijlings, van de Sande, Gevers and Smeulders, IJCV 2013).

For each *strategy* (a colour space, a segmentation scale ``k`` and a similarity combination):

1. Initial regions: a Felzenszwalb-Huttenlocher segmentation (sigma 0.8, minimum size ``k``) of
   the image in that colour space (:mod:`proposals.segmentation`).
2. Hierarchical grouping: repeatedly merge the two most similar *neighbouring* regions until one
   region is left. Similarity is a sum of any of colour (histogram intersection of 25-bin colour
   histograms), texture (intersection of 8-orientation x 10-bin gradient histograms), size
   ``1 - (|a| + |b|) / |image|`` and fill ``1 - (|bbox(a u b)| - |a| - |b|) / |image|``. A merged
   region's histograms are the size-weighted average of its parts'. Every region, initial or
   merged, gives one box: ``2 n - 1`` boxes for ``n`` initial regions.
3. Ranking (paper, sec. 3.3): a box's hierarchy position ``i`` (1 = the last merge, the whole
   image; every initial region one level below the first merge, as in the authors' code) times a
   uniform random number in ``(0, 1]``. All strategies' boxes are merged, sorted by that value
   ascending, and exact duplicates removed keeping the best-ranked copy. Fast mode then keeps the
   2000 best (``max_boxes``).

Sharing work across strategies: one segmentation per (colour space, k), one descriptor pass per
segmentation and one set of per-pixel bins per colour space serve every similarity combination.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detector.base.defaults import MAX_PROPOSALS
from proposals import colour
from proposals.backends import run_backend
from proposals.jit import cached_njit
from proposals.segmentation import segment_scales
from proposals.working_image import as_rgb, resize_to, working_size

# Default cap on boxes per image: fast mode keeps the 2000 best-ranked (the budget R-CNN-style
# detectors score per image); single mode stays below it anyway and quality mode exists to give more.
MODE_MAX_BOXES = {"single": None, "fast": MAX_PROPOSALS, "quality": None}
SIMILARITIES = ("CTSF", "TSF", "F", "S")  # C colour, T texture, S size, F fill
MODES = ("single", "fast", "quality")


@dataclass(frozen=True)
class Strategy:
    """One diversification strategy: segment ``colour_space`` at scale ``k``, group by ``similarity``."""

    colour_space: str
    k: float
    similarity: str


def mode_strategies(mode: str, superpixel_scale: float = 1.0) -> tuple[Strategy, ...]:
    """The paper's strategies for a mode (sec. 5.2), every ``k`` multiplied by ``superpixel_scale``.

    single: HSV, k=100, C+T+S+F (1 strategy). fast: HSV and Lab x k in {50, 100} x {C+T+S+F,
    T+S+F} (8). quality: HSV, Lab, rgI, H, I x k in {50, 100, 150, 300} x all four combinations (80).
    """
    if mode == "single":
        spaces, ks, sims = ("hsv",), (100,), ("CTSF",)
    elif mode == "fast":
        spaces, ks, sims = ("hsv", "lab"), (50, 100), ("CTSF", "TSF")
    elif mode == "quality":
        spaces, ks, sims = colour.COLOUR_SPACES, (50, 100, 150, 300), SIMILARITIES
    else:
        raise ValueError(f"unknown Selective Search mode {mode!r}; use one of {', '.join(MODES)}")
    if not superpixel_scale > 0:
        raise ValueError(f"superpixel_scale must be > 0, got {superpixel_scale}")
    return tuple(Strategy(s, k * superpixel_scale, sim) for s in spaces for k in ks for sim in sims)


@dataclass(frozen=True)
class SearchResult:
    """Native Selective Search output at the working size.

    boxes: int32 ``(N, 4)``, ``[xmin, ymin, xmax, ymax]`` inclusive pixel indices of the working
    image, best-ranked first. ranks: float64 ``(N,)`` the ranking values, ascending.
    working_size / image_size: ``(h, w)`` of the working and the input image.
    """

    boxes: np.ndarray
    ranks: np.ndarray
    working_size: tuple[int, int]
    image_size: tuple[int, int]

    def boxes_xyxy(self) -> np.ndarray:
        """float32 ``(N, 4)`` xyxy boxes in pixels of the input image."""
        (hw, ww), (h, w) = self.working_size, self.image_size
        sx, sy = w / ww, h / hw
        b = self.boxes.astype(np.float64)
        out = np.stack([b[:, 0] * sx, b[:, 1] * sy, (b[:, 2] + 1) * sx, (b[:, 3] + 1) * sy], axis=1)
        return out.astype(np.float32).reshape(-1, 4)


# ----------------------------------------------------------------------------------------------
# Region statistics and the grouping loop (numba).


@cached_njit
def _region_boxes_and_pairs(labels, n):
    """Bounding boxes (inclusive ``xmin, ymin, xmax, ymax``), sizes and 8-connected neighbour pairs
    ``(a, b)`` with ``a < b`` (sorted, unique) of the ``n`` regions of int32 ``labels (H, W)``."""
    h, w = labels.shape
    boxes = np.empty((n, 4), np.int32)
    boxes[:, 0] = w
    boxes[:, 1] = h
    boxes[:, 2] = -1
    boxes[:, 3] = -1
    sizes = np.zeros(n, np.int64)
    keys = np.empty(4 * h * w, np.int64)
    m = 0
    for y in range(h):
        for x in range(w):
            r = labels[y, x]
            sizes[r] += 1
            if x < boxes[r, 0]:
                boxes[r, 0] = x
            if x > boxes[r, 2]:
                boxes[r, 2] = x
            if y < boxes[r, 1]:
                boxes[r, 1] = y
            if y > boxes[r, 3]:
                boxes[r, 3] = y
            for d in range(4):
                if d == 0:
                    if x + 1 >= w:
                        continue
                    q = labels[y, x + 1]
                elif d == 1:
                    if y + 1 >= h:
                        continue
                    q = labels[y + 1, x]
                elif d == 2:
                    if y + 1 >= h or x + 1 >= w:
                        continue
                    q = labels[y + 1, x + 1]
                else:
                    if y + 1 >= h or x < 1:
                        continue
                    q = labels[y + 1, x - 1]
                if q != r:
                    keys[m] = min(r, q) * np.int64(n) + max(r, q)
                    m += 1
    keys = np.unique(keys[:m])
    pairs = np.empty((keys.shape[0], 2), np.int32)
    for i in range(keys.shape[0]):
        pairs[i, 0] = keys[i] // n
        pairs[i, 1] = keys[i] % n
    return boxes, sizes, pairs


@cached_njit
def _similarity(a, b, sizes, boxes, hist, num_colour, w_colour, w_texture, w_size, w_fill, image_area):
    s = 0.0
    if w_colour != 0.0:
        acc = 0.0
        for d in range(num_colour):
            acc += min(hist[a, d], hist[b, d])
        s += w_colour * acc
    if w_texture != 0.0:
        acc = 0.0
        for d in range(num_colour, hist.shape[1]):
            acc += min(hist[a, d], hist[b, d])
        s += w_texture * acc
    if w_size != 0.0:
        s += w_size * (1.0 - (sizes[a] + sizes[b]) / image_area)
    if w_fill != 0.0:
        bw = max(boxes[a, 2], boxes[b, 2]) - min(boxes[a, 0], boxes[b, 0]) + 1
        bh = max(boxes[a, 3], boxes[b, 3]) - min(boxes[a, 1], boxes[b, 1]) + 1
        s += w_fill * (1.0 - (bw * bh - sizes[a] - sizes[b]) / image_area)
    return s


@cached_njit
def _heap_push(hs, ha, hb, size, s, a, b):
    if size == hs.shape[0]:
        cap = 2 * size + 16
        hs2 = np.empty(cap, hs.dtype)
        ha2 = np.empty(cap, ha.dtype)
        hb2 = np.empty(cap, hb.dtype)
        hs2[:size] = hs[:size]
        ha2[:size] = ha[:size]
        hb2[:size] = hb[:size]
        hs, ha, hb = hs2, ha2, hb2
    i = size
    while i > 0:  # sift up (max-heap on similarity)
        parent = (i - 1) >> 1
        if hs[parent] >= s:
            break
        hs[i] = hs[parent]
        ha[i] = ha[parent]
        hb[i] = hb[parent]
        i = parent
    hs[i] = s
    ha[i] = a
    hb[i] = b
    return hs, ha, hb, size + 1


@cached_njit
def _heap_pop(hs, ha, hb, size):
    """Remove the root; the caller has read ``hs[0], ha[0], hb[0]`` first."""
    size -= 1
    s, a, b = hs[size], ha[size], hb[size]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= size:
            break
        if c + 1 < size and hs[c + 1] > hs[c]:
            c += 1
        if hs[c] <= s:
            break
        hs[i] = hs[c]
        ha[i] = ha[c]
        hb[i] = hb[c]
        i = c
    if size > 0:
        hs[i] = s
        ha[i] = a
        hb[i] = b
    return size


@cached_njit
def _group(init_boxes, init_sizes, pairs, init_hist, num_colour, w_colour, w_texture, w_size, w_fill,
           image_area):
    """Hierarchical grouping of ``n`` initial regions; returns int32 ``(2n-1, 4)`` inclusive boxes in
    creation order (initial regions, then each merge; the last is the whole image)."""
    n = init_boxes.shape[0]
    total = 2 * n - 1
    boxes = np.empty((total, 4), np.int32)
    boxes[:n] = init_boxes
    sizes = np.empty(total, np.int64)
    sizes[:n] = init_sizes
    use_hist = w_colour != 0.0 or w_texture != 0.0
    dims = init_hist.shape[1] if use_hist else 0
    hist = np.empty((total, dims), np.float32)
    if use_hist:
        hist[:n] = init_hist
    lo = 0 if w_colour != 0.0 else num_colour
    hi = dims if w_texture != 0.0 else num_colour
    merged_into = np.full(total, -1, np.int32)
    # Neighbour lists: region r's are pool[start[r]:start[r] + count[r]] (ids may since be merged).
    count = np.zeros(total, np.int64)
    for i in range(pairs.shape[0]):
        count[pairs[i, 0]] += 1
        count[pairs[i, 1]] += 1
    start = np.zeros(total, np.int64)
    for r in range(1, n):
        start[r] = start[r - 1] + count[r - 1]
    used = 2 * pairs.shape[0]
    pool = np.empty(2 * used + 64, np.int32)
    fill = start[:n].copy()
    for i in range(pairs.shape[0]):
        a, b = pairs[i, 0], pairs[i, 1]
        pool[fill[a]] = b
        fill[a] += 1
        pool[fill[b]] = a
        fill[b] += 1
    hs = np.empty(pairs.shape[0] + 16, np.float64)
    ha = np.empty(pairs.shape[0] + 16, np.int32)
    hb = np.empty(pairs.shape[0] + 16, np.int32)
    heap = 0
    for i in range(pairs.shape[0]):
        a, b = pairs[i, 0], pairs[i, 1]
        s = _similarity(a, b, sizes, boxes, hist, num_colour, w_colour, w_texture, w_size, w_fill, image_area)
        hs, ha, hb, heap = _heap_push(hs, ha, hb, heap, s, a, b)
    mark = np.full(total, -1, np.int32)
    t = n
    while t < total and heap > 0:
        a, b = ha[0], hb[0]
        heap = _heap_pop(hs, ha, hb, heap)
        if merged_into[a] >= 0 or merged_into[b] >= 0:
            continue  # a stale pair: one side has been merged already
        sa, sb = sizes[a], sizes[b]
        sizes[t] = sa + sb
        boxes[t, 0] = min(boxes[a, 0], boxes[b, 0])
        boxes[t, 1] = min(boxes[a, 1], boxes[b, 1])
        boxes[t, 2] = max(boxes[a, 2], boxes[b, 2])
        boxes[t, 3] = max(boxes[a, 3], boxes[b, 3])
        if use_hist:
            fa, fb = sa / (sa + sb), sb / (sa + sb)
            for d in range(lo, hi):
                hist[t, d] = fa * hist[a, d] + fb * hist[b, d]
        merged_into[a] = t
        merged_into[b] = t
        # Neighbours of t: the current regions of a's and b's neighbours, each once.
        need = count[a] + count[b]
        if used + need > pool.shape[0]:
            pool2 = np.empty(2 * (used + need), np.int32)
            pool2[:used] = pool[:used]
            pool = pool2
        start[t] = used
        mark[t] = t
        for side in range(2):
            r0 = a if side == 0 else b
            for i in range(start[r0], start[r0] + count[r0]):
                q = pool[i]
                while merged_into[q] >= 0:
                    q = merged_into[q]
                p = pool[i]  # path compression so later lookups are short
                while merged_into[p] >= 0 and merged_into[p] != q:
                    nxt = merged_into[p]
                    merged_into[p] = q
                    p = nxt
                if mark[q] == t:
                    continue
                mark[q] = t
                pool[used] = q
                used += 1
                s = _similarity(t, q, sizes, boxes, hist, num_colour, w_colour, w_texture, w_size, w_fill,
                                image_area)
                hs, ha, hb, heap = _heap_push(hs, ha, hb, heap, s, t, q)
        count[t] = used - start[t]
        t += 1
    return boxes[:t]


# ----------------------------------------------------------------------------------------------
# Strategies, ranking and the public entry point.

_WEIGHTS = {"CTSF": (1.0, 1.0, 1.0, 1.0), "TSF": (0.0, 1.0, 1.0, 1.0), "F": (0.0, 0.0, 0.0, 1.0),
            "S": (0.0, 0.0, 1.0, 0.0)}


def hierarchies(image: np.ndarray, strategies, sigma: float = 0.8) -> list[np.ndarray]:
    """Every strategy's boxes in hierarchy order.

    image: RGB ``uint8 (H, W, 3)`` (already at the working size). Returns, per strategy, int32
    ``(2n-1, 4)`` inclusive ``[xmin, ymin, xmax, ymax]`` boxes in creation order.
    """
    h, w = image.shape[:2]
    out: list[np.ndarray | None] = [None] * len(strategies)
    for space in dict.fromkeys(s.colour_space for s in strategies):
        mine = [i for i, s in enumerate(strategies) if s.colour_space == space]
        converted = colour.convert(image, space)
        needs_hist = any(_WEIGHTS[strategies[i].similarity][:2] != (0.0, 0.0) for i in mine)
        feats = colour.pixel_features(converted) if needs_hist else None
        num_colour = colour.descriptor_sizes(converted.shape[2])[0]
        ks = list(dict.fromkeys(strategies[i].k for i in mine))
        # The authors segment one-channel spaces as three identical channels, which scales every
        # edge weight by sqrt(3); doing that to the single channel gives the same segmentation.
        to_segment = converted if converted.shape[2] == 3 else converted.astype(np.float32) * np.sqrt(3.0)
        for k, (labels, n) in zip(ks, segment_scales(to_segment, ks, sigma)):
            boxes, sizes, pairs = _region_boxes_and_pairs(labels, n)
            users = [i for i in mine if strategies[i].k == k]
            if feats is not None and any(_WEIGHTS[strategies[i].similarity][:2] != (0.0, 0.0) for i in users):
                hist = colour.region_histograms(labels, n, feats, converted.shape[2])
            else:
                hist = np.zeros((n, 0), np.float32)
            for i in users:
                wc, wt, ws, wf = _WEIGHTS[strategies[i].similarity]
                out[i] = _group(boxes, sizes, pairs, hist, num_colour, wc, wt, ws, wf, float(h * w))
    return out


def rank_boxes(hierarchy_boxes: list[np.ndarray], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Merge strategies' hierarchies into one ranked list (paper, sec. 3.3).

    hierarchy_boxes: per strategy, int32 ``(2n - 1, 4)`` boxes in creation order: ``n`` initial
    regions, then ``n - 1`` merges. Merge ``j`` (1-based) has hierarchy position ``n - j`` (1 = the
    last merge, the whole image); every initial region has position ``n``, as in the authors' code
    (Image2HierarchicalGrouping.m). A box's rank value is its position times a uniform random number
    in ``(0, 1]`` drawn from ``numpy.random.default_rng(seed)``, strategy by strategy. Returns the
    boxes sorted by rank value ascending (ties: strategy order, then row) with exact duplicates
    removed keeping the best-ranked copy, and their rank values.
    """
    rng = np.random.default_rng(seed)
    ranks = []
    for boxes in hierarchy_boxes:
        t = len(boxes)
        n = (t + 1) // 2  # initial regions
        position = np.empty(t, np.float64)
        position[:n] = n  # every initial region sits one level below the first merge
        position[n:] = np.arange(t - n, 0, -1)
        ranks.append(position * (1.0 - rng.random(t)))  # 1 - [0, 1) is (0, 1]
    boxes = np.concatenate(hierarchy_boxes).astype(np.int64) if hierarchy_boxes else np.zeros((0, 4), np.int64)
    ranks = np.concatenate(ranks) if ranks else np.zeros(0)
    order = np.argsort(ranks, kind="stable")
    boxes, ranks = boxes[order], ranks[order]
    key = boxes[:, 0] | (boxes[:, 1] << 16) | (boxes[:, 2] << 32) | (boxes[:, 3] << 48)
    _, first = np.unique(key, return_index=True)  # index of each box's first (best) occurrence
    keep = np.sort(first)
    return boxes[keep].astype(np.int32), ranks[keep]


def _max_boxes(max_boxes: int | None | str, mode: str) -> int | None:
    if max_boxes == "mode":
        return MODE_MAX_BOXES.get(mode)
    if max_boxes is not None and (isinstance(max_boxes, str) or max_boxes < 0):
        raise ValueError(f"max_boxes must be a count >= 0, None or 'mode', got {max_boxes!r}")
    return max_boxes


def search(image: np.ndarray, mode: str = "fast", *, max_side: int | None = 500, superpixel_scale: float = 1.0,
           min_size: int = 0, max_boxes: int | None | str = "mode", seed: int = 0, sigma: float = 0.8,
           strategies=None) -> SearchResult:
    """Native Selective Search at the working size; see :func:`selective_search` for the options.

    ``strategies`` (a sequence of :class:`Strategy`) overrides ``mode`` and ``superpixel_scale``.
    """
    rgb = as_rgb(image)
    if max_side is not None and not 1 <= max_side <= 65535:
        raise ValueError(f"max_side must be in [1, 65535], got {max_side}")
    size = working_size(rgb.shape[:2], max_side)
    work = resize_to(rgb, size)
    strategies = tuple(strategies) if strategies is not None else mode_strategies(mode, superpixel_scale)
    boxes, ranks = rank_boxes(hierarchies(work, strategies, sigma), seed)
    if min_size > 0:  # keep boxes at least min_size working pixels wide and high
        keep = ((boxes[:, 2] - boxes[:, 0] + 1) >= min_size) & ((boxes[:, 3] - boxes[:, 1] + 1) >= min_size)
        boxes, ranks = boxes[keep], ranks[keep]
    cap = _max_boxes(max_boxes, mode)
    if cap is not None:
        boxes, ranks = boxes[:cap], ranks[:cap]
    return SearchResult(boxes, ranks, size, rgb.shape[:2])


def selective_search(image: np.ndarray, mode: str = "fast", *, backend: str = "native", max_side: int | None = 500,
                     superpixel_scale: float = 1.0, min_size: int = 0, max_boxes: int | None | str = "mode",
                     seed: int = 0, sigma: float = 0.8) -> np.ndarray:
    """Selective Search object proposals for one image.

    image: RGB ``uint8 (H, W, 3)`` (grayscale ``(H, W)`` is accepted too).
    mode: ``"single"`` (1 strategy), ``"fast"`` (8) or ``"quality"`` (80); see :func:`mode_strategies`.
    backend: ``"native"`` (this module), ``"opencv"`` (``cv2.ximgproc``) or ``"selectivesearch"``
    (the PyPI package); see :mod:`proposals.backends`.
    max_side: the image is resized so its longest side is ``max_side`` pixels (R-CNN ran Selective
    Search at width 500) and the boxes scaled back; ``None`` works at the input size.
    superpixel_scale: multiplies every ``k`` (GoogLeNet's detector used 2: larger superpixels,
    about half the proposals).
    min_size: drop boxes narrower or lower than this many working-image pixels (R-CNN: 20; 0 keeps all).
    max_boxes: keep at most this many best-ranked boxes; None keeps all. ``"mode"`` (default):
    2000 in fast mode, the budget R-CNN-style detectors score per image (the paper's fast mode
    gives ~2,100 boxes on PASCAL VOC, ~3,700 on cluttered COCO photos, measured), all otherwise.
    seed: seeds the random part of the ranking; the same seed gives the same boxes.

    Returns float32 ``(N, 4)`` xyxy boxes in pixels of the input image, best-ranked first.
    """
    if backend != "native":
        boxes = run_backend(backend, image, mode, max_side=max_side, superpixel_scale=superpixel_scale,
                            min_size=min_size, sigma=sigma)
        cap = _max_boxes(max_boxes, mode)
        return boxes if cap is None else boxes[:cap]
    return search(image, mode, max_side=max_side, superpixel_scale=superpixel_scale, min_size=min_size,
                  max_boxes=max_boxes, seed=seed, sigma=sigma).boxes_xyxy()
