"""Colour spaces and region descriptors for Selective Search (Uijlings et al., IJCV 2013, sec. 3.2).

Each colour space turns the RGB working image into ``uint8`` channels on a 0..255 scale (as the
authors' ``Image2ColourSpace.m`` does): the image that is segmented and whose colours and textures
are described.

- ``hsv``: hue, saturation, value (hue spread over 0..255).
- ``lab``: CIE L*a*b* (L scaled to 0..255, a and b offset by 128), OpenCV's 8-bit convention.
- ``rgi``: normalized red ``R/(R+G+B)``, normalized green, and intensity ``(R+G+B)/3``.
- ``h``: the hue channel alone. ``i``: intensity (luminance ``0.299 R + 0.587 G + 0.114 B``) alone.

Per pixel, :func:`pixel_features` precomputes which bin of each histogram the pixel falls in, once
per colour space; :func:`region_histograms` then builds every region's descriptor in one pass
over the pixels for any segmentation of that image:

- colour: 25 bins per channel (paper: "bins = 25"), L1-normalized over all channels together;
- texture: Gaussian derivatives with sigma 1 in 8 orientations per channel, 10 bins per orientation
  (paper: "SIFT-like measurements"), L1-normalized together.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from numba import njit

COLOUR_SPACES = ("hsv", "lab", "rgi", "h", "i")
COLOUR_BINS = 25
TEXTURE_BINS = 10
ORIENTATIONS = 8
TEXTURE_SIGMA = 1.0


def convert(rgb: np.ndarray, space: str) -> np.ndarray:
    """RGB ``uint8 (H, W, 3)`` -> ``uint8 (H, W, C)`` in ``space`` (C = 3, or 1 for ``h`` and ``i``)."""
    if space == "hsv":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)
    if space == "lab":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)
    if space == "h":
        return np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)[:, :, :1])
    if space == "i":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:, :, None]
    total = rgb.astype(np.uint16).sum(axis=2)
    intensity = ((total + 1) // 3).astype(np.uint8)
    if space == "rgi":
        denom = np.maximum(total, 1).astype(np.float32)
        r = rgb[:, :, 0] * (255.0 / denom)
        g = rgb[:, :, 1] * (255.0 / denom)
        black = total == 0  # no chromaticity: the neutral grey point (1/3, 1/3)
        r[black] = g[black] = 85.0
        rg = np.clip(np.rint(np.stack([r, g], axis=2)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.concatenate([rg, intensity[:, :, None]], axis=2))
    raise ValueError(f"unknown colour space {space!r}; use one of {', '.join(COLOUR_SPACES)}")


def _gaussian_kernels(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    radius = int(math.ceil(3.0 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()
    dg = -x / sigma**2 * g  # derivative of the Gaussian
    dg -= dg.mean()  # exact zero response on flat regions
    return g.astype(np.float32), dg.astype(np.float32)


def gaussian_derivatives(channel: np.ndarray, sigma: float = TEXTURE_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """``(Ix, Iy)``: float32 ``(H, W)`` Gaussian derivatives (scale ``sigma``) of a 0..255 channel."""
    g, dg = _gaussian_kernels(sigma)
    img = channel.astype(np.float32)
    ix = cv2.sepFilter2D(img, cv2.CV_32F, dg, g, borderType=cv2.BORDER_REPLICATE)
    iy = cv2.sepFilter2D(img, cv2.CV_32F, g, dg, borderType=cv2.BORDER_REPLICATE)
    return ix, iy


@njit(cache=True)
def _steered(ix, iy, o):
    """Response in orientation ``o`` (angle ``o * 45`` degrees), clipped at zero."""
    d = math.sqrt(0.5)
    q = o % 4
    if q == 0:
        r = ix
    elif q == 1:
        r = (ix + iy) * d
    elif q == 2:
        r = iy
    else:
        r = (iy - ix) * d
    if o >= 4:
        r = -r
    return r if r > 0.0 else 0.0


@njit(cache=True)
def _texture_bins(ix, iy, feats, column, first_dim):
    """Write each pixel's texture bin (10 bins over ``[0, max]`` of each orientation's response)
    for the 8 orientations of one channel into ``feats[:, column:column + 8]``."""
    n = ix.shape[0]
    top = np.zeros(8, np.float32)
    for p in range(n):
        for o in range(8):
            r = _steered(ix[p], iy[p], o)
            if r > top[o]:
                top[o] = r
    scale = np.empty(8, np.float32)
    for o in range(8):
        scale[o] = TEXTURE_BINS / top[o] if top[o] > 0 else 0.0
    for p in range(n):
        for o in range(8):
            b = int(_steered(ix[p], iy[p], o) * scale[o])
            if b > TEXTURE_BINS - 1:
                b = TEXTURE_BINS - 1
            feats[p, column + o] = first_dim + o * TEXTURE_BINS + b


def oriented_gradients(channel: np.ndarray, sigma: float = TEXTURE_SIGMA) -> np.ndarray:
    """Gaussian derivative responses in 8 orientations (0, 45, ..., 315 degrees).

    channel: ``(H, W)`` on a 0..255 scale. Returns float32 ``(8, H, W)``, each non-negative: the
    response steered to angle ``o * 45`` degrees, ``cos(a) Ix + sin(a) Iy``, clipped at zero
    (orientation ``o + 4`` is the opposite sign of orientation ``o``).
    """
    ix, iy = gaussian_derivatives(channel, sigma)
    diag = np.float32(math.sqrt(0.5))
    steered = (ix, (ix + iy) * diag, iy, (iy - ix) * diag)
    out = np.empty((ORIENTATIONS,) + ix.shape, np.float32)
    for o, r in enumerate(steered):
        np.maximum(r, 0, out=out[o])
        np.maximum(-r, 0, out=out[o + 4])
    return out


def pixel_features(image: np.ndarray) -> np.ndarray:
    """Histogram bin of every pixel for every descriptor dimension group.

    image: ``uint8 (H, W, C)`` in one colour space. Returns ``uint16 (H*W, 9*C)``: per pixel the
    index, in the region descriptor of length ``25 C + 80 C`` (colour then texture), of the
    colour bin of each channel and of the texture bin of each (channel, orientation) (see
    :func:`oriented_gradients`). Texture responses are binned over ``[0, max]`` of that
    (channel, orientation) in the image.
    """
    h, w, c = image.shape
    feats = np.empty((h * w, c + ORIENTATIONS * c), np.uint16)
    for ch in range(c):
        feats[:, ch] = (image[:, :, ch].reshape(-1).astype(np.uint16) * COLOUR_BINS) >> 8
        feats[:, ch] += ch * COLOUR_BINS
    base = COLOUR_BINS * c
    for ch in range(c):
        ix, iy = gaussian_derivatives(image[:, :, ch])
        _texture_bins(ix.reshape(-1), iy.reshape(-1), feats, c + ch * ORIENTATIONS,
                      base + ch * ORIENTATIONS * TEXTURE_BINS)
    return feats


def descriptor_sizes(num_channels: int) -> tuple[int, int]:
    """``(colour dims, texture dims)`` of a region descriptor for ``num_channels`` channels."""
    return COLOUR_BINS * num_channels, ORIENTATIONS * TEXTURE_BINS * num_channels


@njit(cache=True)
def _histograms(labels, num_regions, feats, num_dims, num_colour_feats):
    hist = np.zeros((num_regions, num_dims), np.float32)
    sizes = np.zeros(num_regions, np.int64)
    for p in range(labels.shape[0]):
        r = labels[p]
        sizes[r] += 1
        for f in range(feats.shape[1]):
            hist[r, feats[p, f]] += 1.0
    num_colour = num_colour_feats * COLOUR_BINS
    for r in range(num_regions):
        sc = 1.0 / (sizes[r] * num_colour_feats)
        st = 1.0 / (sizes[r] * (feats.shape[1] - num_colour_feats))
        for d in range(num_colour):
            hist[r, d] *= sc
        for d in range(num_colour, num_dims):
            hist[r, d] *= st
    return hist


def region_histograms(labels: np.ndarray, num_regions: int, feats: np.ndarray, num_channels: int) -> np.ndarray:
    """Colour and texture descriptors of every region, each part L1-normalized.

    labels: int32 ``(H, W)`` with values ``0..num_regions-1``; feats: :func:`pixel_features` of the
    same image. Returns float32 ``(num_regions, 25 C + 80 C)``: columns ``[0, 25 C)`` are the colour
    histogram (summing to 1), the rest the texture histogram (summing to 1).
    """
    dc, dt = descriptor_sizes(num_channels)
    return _histograms(labels.reshape(-1), num_regions, feats, dc + dt, num_channels)
