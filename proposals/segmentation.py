"""Graph-based image segmentation (Felzenszwalb and Huttenlocher, IJCV 2004): Selective Search's
initial regions.

The image is a graph whose nodes are pixels and whose edges join each pixel to its 8 neighbours,
weighted by the Euclidean distance of the Gaussian-smoothed colours. Edges are visited by increasing
weight; an edge joins its two components when its weight is at most both components' internal
difference plus ``k / size`` (the paper's threshold function ``tau(C) = k / |C|``). A last pass over
the same sorted edges joins components smaller than ``min_size`` to a neighbour, as the authors'
reference code does.

The sorted edge list depends on the image and ``sigma`` only, so :func:`segment_scales` sorts it once
and reuses it for every ``k`` (Selective Search segments each colour space at several ``k``).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from proposals.jit import cached_njit


def smooth(image: np.ndarray, sigma: float = 0.8) -> np.ndarray:
    """Gaussian-smooth each channel as the reference code does (kernel radius ``ceil(4 sigma)``).

    image: ``(H, W)`` or ``(H, W, C)``, any numeric dtype. Returns float32 ``(H, W, C)``.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = img[:, :, None]
    if sigma <= 0:
        return np.ascontiguousarray(img)
    radius = int(math.ceil(4.0 * sigma))
    out = cv2.GaussianBlur(img, (2 * radius + 1, 2 * radius + 1), sigmaX=sigma, sigmaY=sigma,
                           borderType=cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(out.reshape(img.shape))


@cached_njit
def _edge_keys(img):
    """Sort keys of the 8-connected grid's edges: each pixel ``p`` to its right (d=0), down (1),
    down-right (2) and up-right (3) neighbour is edge ``e = 4 p + d``. A key holds the edge's
    float32 Euclidean colour distance in its high 32 bits (a non-negative float's bit pattern
    orders like its value) and ``e`` in its low bits, so every key is unique and any sort gives the
    stable order. Edges that leave the image get the largest key. img: float32 ``(C, H, W)``.
    """
    c, h, w = img.shape
    keys = np.empty(4 * h * w, np.uint64)
    top = np.uint64(0xFFFFFFFFFFFFFFFF)
    weight = np.empty(w, np.float32)
    bits = weight.view(np.uint32)
    offsets = ((0, 1), (1, 0), (1, 1), (-1, 1))
    for y in range(h):
        for d in range(4):
            dy, dx = offsets[d]
            yy = y + dy
            n = w - dx
            if yy < 0 or yy >= h:
                n = 0
            for x in range(n):
                weight[x] = 0.0
            for ch in range(c):
                for x in range(n):
                    diff = img[ch, y, x] - img[ch, yy, x + dx]
                    weight[x] += diff * diff
            for x in range(n):
                weight[x] = math.sqrt(weight[x])
            base = 4 * (y * w)
            for x in range(n):
                keys[base + 4 * x + d] = (np.uint64(bits[x]) << np.uint64(32)) | np.uint64(base + 4 * x + d)
            for x in range(n, w):
                keys[base + 4 * x + d] = top
    return keys


@cached_njit
def _find(parent, x):
    while parent[x] != x:  # path halving
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@cached_njit
def _segment_sorted(sorted_keys, num_edges, width, num_pixels, k, min_size):
    """Union-find over the first ``num_edges`` sorted keys; labels ``0..n-1`` in raster order."""
    pairs = sorted_keys.view(np.uint32)  # little-endian: [edge, weight bits] per key
    weights = sorted_keys.view(np.float32)
    step = (1, width, width + 1, 1 - width)
    parent = np.arange(num_pixels, dtype=np.int32)
    size = np.ones(num_pixels, np.int32)
    thresh = np.full(num_pixels, k, np.float32)  # tau of a single pixel: k / 1
    pending = np.empty(num_edges, np.int64)  # edges still between two components after pass 1
    num_pending = 0
    for i in range(num_edges):
        e = np.int64(pairs[2 * i])
        pa = e >> 2
        ra = _find(parent, pa)
        rb = _find(parent, pa + step[e & 3])
        if ra == rb:
            continue
        w = weights[2 * i + 1]
        if w <= thresh[ra] and w <= thresh[rb]:
            if size[ra] < size[rb]:
                ra, rb = rb, ra
            parent[rb] = ra  # union by size
            size[ra] += size[rb]
            thresh[ra] = w + k / size[ra]
        else:
            pending[num_pending] = e
            num_pending += 1
    # Join components smaller than min_size to a neighbour, in the same edge order. Edges that
    # were inside one component in pass 1 stay inside, so only the pending ones are revisited.
    for i in range(num_pending):
        e = pending[i]
        pa = e >> 2
        ra = _find(parent, pa)
        rb = _find(parent, pa + step[e & 3])
        if ra != rb and (size[ra] < min_size or size[rb] < min_size):
            if size[ra] < size[rb]:
                ra, rb = rb, ra
            parent[rb] = ra
            size[ra] += size[rb]
    labels = np.empty(num_pixels, np.int32)
    remap = np.full(num_pixels, -1, np.int32)
    n = 0
    for p in range(num_pixels):
        r = _find(parent, p)
        if remap[r] < 0:
            remap[r] = n
            n += 1
        labels[p] = remap[r]
    return labels, n


def segment_scales(image: np.ndarray, ks, sigma: float = 0.8, min_sizes=None) -> list[tuple[np.ndarray, int]]:
    """Felzenszwalb-Huttenlocher segmentations of one image at several ``k``, sharing one edge sort.

    image: ``(H, W)`` or ``(H, W, C)`` with values on a 0..255 scale (``k`` is in those units).
    ks: the scale parameters; min_sizes: the minimum component size per ``k`` in pixels
    (default ``k`` itself, as Selective Search uses). Returns, per ``k``, ``(labels, n)``:
    int32 ``(H, W)`` labels ``0..n-1`` numbered in raster order of first appearance.
    """
    img = smooth(image, sigma)
    h, w = img.shape[:2]
    ks = [float(k) for k in ks]
    min_sizes = [int(round(k)) for k in ks] if min_sizes is None else [int(m) for m in min_sizes]
    if len(min_sizes) != len(ks):
        raise ValueError("segment_scales: give one min_size per k")
    keys = _edge_keys(np.ascontiguousarray(img.transpose(2, 0, 1)))
    keys.sort()  # by weight, ties by edge index: the same order on every machine
    num_edges = (h * (w - 1) + (h - 1) * w + 2 * (h - 1) * (w - 1))
    out = []
    for k, min_size in zip(ks, min_sizes):
        labels, n = _segment_sorted(keys, num_edges, w, h * w, np.float32(k), min_size)
        out.append((labels.reshape(h, w), int(n)))
    return out


def segment(image: np.ndarray, k: float, sigma: float = 0.8, min_size: int | None = None) -> tuple[np.ndarray, int]:
    """One Felzenszwalb-Huttenlocher segmentation: int32 ``(H, W)`` labels ``0..n-1`` and ``n``.

    image: ``(H, W)`` or ``(H, W, C)``, values on a 0..255 scale. ``min_size`` defaults to ``k``.
    """
    return segment_scales(image, [k], sigma, None if min_size is None else [min_size])[0]
