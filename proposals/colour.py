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

from proposals.jit import cached_njit

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


@cached_njit
def _texture_bins(ix, iy, feats, row):
    """Write each pixel's texture bin (0..9: 10 bins over ``[0, max]`` of each orientation's
    response) for the 8 orientations of one channel into ``feats[row:row + 8]``.

    Orientation ``o`` (angle ``o * 45`` degrees) responds ``cos(a) Ix + sin(a) Iy`` clipped at 0;
    ``o + 4`` is the negated response, so the four steered values give all eight.
    """
    n = ix.shape[0]
    d = np.float32(math.sqrt(0.5))
    top = np.zeros(8, np.float32)
    for p in range(n):
        a, b = ix[p], iy[p]
        r0, r1, r2, r3 = a, (a + b) * d, b, (b - a) * d
        top[0] = max(top[0], r0)
        top[1] = max(top[1], r1)
        top[2] = max(top[2], r2)
        top[3] = max(top[3], r3)
        top[4] = max(top[4], -r0)
        top[5] = max(top[5], -r1)
        top[6] = max(top[6], -r2)
        top[7] = max(top[7], -r3)
    scale = np.empty(8, np.float32)
    for o in range(8):
        scale[o] = TEXTURE_BINS / top[o] if top[o] > 0 else 0.0
    last = TEXTURE_BINS - 1
    for p in range(n):
        a, b = ix[p], iy[p]
        for o in range(4):
            if o == 0:
                r = a
            elif o == 1:
                r = (a + b) * d
            elif o == 2:
                r = b
            else:
                r = (b - a) * d
            pos = min(last, int(r * scale[o])) if r > 0 else 0
            neg = min(last, int(-r * scale[o + 4])) if r < 0 else 0
            feats[row + o, p] = pos
            feats[row + o + 4, p] = neg


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
    """Histogram bin of every pixel for each colour channel and each (channel, orientation).

    image: ``uint8 (H, W, C)`` in one colour space. Returns ``uint8 (9 C, H*W)``: rows ``0..C-1``
    the colour bin (0..24) of each channel, then for channel ``c`` and orientation ``o`` (see
    :func:`oriented_gradients`) row ``C + 8 c + o`` the texture bin (0..9), the response binned
    over ``[0, max]`` of that (channel, orientation) in the image.
    """
    h, w, c = image.shape
    feats = np.empty((c + ORIENTATIONS * c, h * w), np.uint8)
    for ch in range(c):
        feats[ch] = (image[:, :, ch].reshape(-1).astype(np.uint16) * COLOUR_BINS) >> 8
    for ch in range(c):
        ix, iy = gaussian_derivatives(image[:, :, ch])
        _texture_bins(ix.reshape(-1), iy.reshape(-1), feats, c + ch * ORIENTATIONS)
    return feats


def descriptor_sizes(num_channels: int) -> tuple[int, int]:
    """``(colour dims, texture dims)`` of a region descriptor for ``num_channels`` channels."""
    return COLOUR_BINS * num_channels, ORIENTATIONS * TEXTURE_BINS * num_channels


@cached_njit
def _histograms(labels, num_regions, feats, num_channels):
    num_colour = COLOUR_BINS * num_channels
    num_dims = num_colour + ORIENTATIONS * TEXTURE_BINS * num_channels
    counts = np.zeros((num_regions, num_dims), np.int32)
    sizes = np.zeros(num_regions, np.int64)
    for p in range(labels.shape[0]):
        sizes[labels[p]] += 1
    first = np.empty(feats.shape[0], np.int64)  # descriptor offset of each feature row
    for f in range(feats.shape[0]):
        first[f] = f * COLOUR_BINS if f < num_channels else num_colour + (f - num_channels) * TEXTURE_BINS
    for p in range(labels.shape[0]):
        r = labels[p]
        for f in range(feats.shape[0]):
            counts[r, first[f] + feats[f, p]] += 1
    hist = np.empty((num_regions, num_dims), np.float32)
    for r in range(num_regions):
        sc = 1.0 / (sizes[r] * num_channels)
        st = 1.0 / (sizes[r] * num_channels * ORIENTATIONS)
        for d in range(num_colour):
            hist[r, d] = counts[r, d] * sc
        for d in range(num_colour, num_dims):
            hist[r, d] = counts[r, d] * st
    return hist


def region_histograms(labels: np.ndarray, num_regions: int, feats: np.ndarray, num_channels: int) -> np.ndarray:
    """Colour and texture descriptors of every region, each part L1-normalized.

    labels: int32 ``(H, W)`` with values ``0..num_regions-1``; feats: :func:`pixel_features` of the
    same image. Returns float32 ``(num_regions, 25 C + 80 C)``: columns ``[0, 25 C)`` are the colour
    histogram (summing to 1), the rest the texture histogram (summing to 1).
    """
    return _histograms(labels.reshape(-1), num_regions, feats, num_channels)
