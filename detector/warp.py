"""R-CNN's context-padded warp: every proposal of an image to one ``S x S`` crop, in one batch.

R-CNN (Girshick et al. 2014, appendix A) dilates each proposal so that, after the anisotropic warp to
``S x S``, the original box is surrounded by ``p`` pixels of context on every side (``S = 224``,
``p = 16`` here, ``227``/``16`` in R-CNN): the box is scaled about its centre by ``S / (S - 2p)``.
Context beyond the image is filled with the normalization mean, i.e. zero after normalization.

All crops of an image come from :func:`torchvision.ops.roi_align` on the normalized image (one call
per pyramid level in use, see below; ``aligned=True``: a box ``[x1, x2)`` in continuous pixels covers exactly pixels ``x1 .. x2 - 1``), so
the warp runs wherever the image tensor lives (CPU or GPU). The normalized image gets a one-pixel border of zeros:
roi_align clamps samples that fall less than one pixel outside its input to the border, and returns zero
further out, so a one-pixel zero border makes it behave exactly as if the image were surrounded by an
infinite zero (= mean) border.

Each output pixel averages ``sampling_ratio x sampling_ratio`` bilinear samples of its bin. With
``sampling_ratio=1`` and ``antialias=False`` the warp equals ``cv2.resize(crop, (S, S),
interpolation=cv2.INTER_LINEAR)`` of the (mean-padded) dilated crop, which aliases badly when a large
box shrinks several times. R-CNN's MATLAB ``imresize`` low-pass filters before shrinking; here the
same is done the cheap way (``antialias=True``, the default): a pyramid of 2x2 box-filtered levels is
built once per image and each box is sampled, one bilinear sample per output pixel, from the level
that leaves its smaller side a shrink factor in ``[0.71, 1.41)`` (mip-mapping). Exactly 2^k-times
shrinks then equal ``cv2.INTER_AREA``. For a ``uint8`` image warped on the CPU the levels are made
by OpenCV on the 8-bit image and normalized by table lookup, about four times faster than in float;
they differ from float levels by at most half a grey level per level (rounding). The alternative,
``sampling_ratio=2`` on the full image, costs about twice as much and still aliases boxes more than
twice the output size; measured in ``benchmarks/bench_detector.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import roi_align

from detector.base.defaults import IMAGENET_MEAN, IMAGENET_STD


def default_context(output_size: int) -> int:
    """R-CNN's 16 pixels of context at 224 px, scaled to ``output_size`` (8 at 112 px)."""
    return max(0, round(16 * output_size / 224))


def context_scale(output_size: int, context: int) -> float:
    """Factor ``S / (S - 2p)`` by which a box is dilated about its centre before the warp."""
    if not 0 <= 2 * context < output_size:
        raise ValueError(f"context {context} must be in [0, output_size/2) = [0, {output_size / 2:g})")
    return output_size / (output_size - 2 * context)


def dilate_boxes(boxes: torch.Tensor, output_size: int, context: int) -> torch.Tensor:
    """The region each warped crop covers.

    boxes: float ``(N, 4)`` xyxy, pixels.
    Returns: float ``(N, 4)`` xyxy, pixels, each box scaled about its centre by ``S / (S - 2p)``;
    not clipped (the part beyond the image is filled with the mean).
    """
    scale = context_scale(output_size, context)
    cx = 0.5 * (boxes[:, 0] + boxes[:, 2])
    cy = 0.5 * (boxes[:, 1] + boxes[:, 3])
    half_w = 0.5 * scale * (boxes[:, 2] - boxes[:, 0])
    half_h = 0.5 * scale * (boxes[:, 3] - boxes[:, 1])
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1)


def normalize_image(image, mean=IMAGENET_MEAN, std=IMAGENET_STD, device=None, border: int = 0) -> torch.Tensor:
    """An image as a normalized float32 tensor ``(3, H + 2b, W + 2b)``: ``(pixel / 255 - mean) / std``,
    surrounded by ``b = border`` pixels of zeros (the mean).

    image: RGB ``uint8`` ``(H, W, 3)`` numpy array, or a ``(3, H, W)`` tensor (``uint8`` with values
        0..255, or float with values in [0, 1]).
    device: where the result lives (default: the tensor's device, CPU for numpy).
    """
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be (3, H, W), got {tuple(image.shape)}")
        scale = 1.0 / 255.0 if image.dtype == torch.uint8 else 1.0
        planes = image.to(device=device)
    else:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"an image array must be (H, W, 3) RGB, got {arr.shape}")
        if arr.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8, got {arr.dtype}")
        # uint8 planes first, then one float conversion: several times faster than permuting floats
        planes = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(device)
        scale = 1.0 / 255.0
    _, h, w = planes.shape
    out = torch.empty((3, h + 2 * border, w + 2 * border), dtype=torch.float32, device=planes.device)
    if border:
        out[:, :border].zero_()
        out[:, -border:].zero_()
        out[:, :, :border].zero_()
        out[:, :, -border:].zero_()
    inner = out[:, border:border + h, border:border + w]
    inner.copy_(planes)
    m = torch.tensor(mean, dtype=torch.float32, device=out.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=out.device).view(3, 1, 1)
    inner.mul_(scale / s).sub_(m / s)
    return out


def build_pyramid(padded: torch.Tensor, num_levels: int) -> list[torch.Tensor]:
    """Box-filtered levels of an image with a one-pixel zero border, each with its own border.

    padded: float ``(3, H + 2, W + 2)``, the image inside a one-pixel border of zeros.
    Level ``l`` averages ``2^l x 2^l`` blocks (its pixel ``i`` covers ``[2^l i, 2^l (i+1))`` of the
    image; an odd last row or column is averaged with what exists). Stops early if a level would be
    smaller than 2 pixels.
    """
    levels = [padded]
    for _ in range(1, num_levels):
        inner = levels[-1][:, 1:-1, 1:-1]
        if min(inner.shape[-2:]) < 2:
            break
        down = torch.nn.functional.avg_pool2d(inner[None], 2, ceil_mode=True)[0]
        levels.append(torch.nn.functional.pad(down, (1, 1, 1, 1)))
    return levels


def _lut(mean: float, std: float) -> np.ndarray:
    """``uint8`` value -> normalized float32, ``(v / 255 - mean) / std``, as a 256-entry table."""
    return ((np.arange(256, dtype=np.float64) / 255.0 - mean) / std).astype(np.float32)


def _pyramid_from_uint8(image: np.ndarray, mean, std, num_levels: int) -> list[torch.Tensor]:
    """:func:`build_pyramid` for an ``(H, W, 3)`` ``uint8`` image on the CPU, several times faster:
    levels are made by ``cv2.resize(INTER_AREA)`` on the 8-bit image (exact 2x2 means rounded to 8 bits;
    an odd last row or column is replicated first, which gives the same means as the float path) and
    normalized by table lookup straight into their bordered buffers."""
    import cv2

    luts = [_lut(m, s) for m, s in zip(mean, std)]
    levels, current = [], np.ascontiguousarray(image)
    for level in range(num_levels):
        h, w = current.shape[:2]
        if level:
            if min(h, w) < 2:
                break
            if h % 2 or w % 2:
                current = cv2.copyMakeBorder(current, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
            h, w = current.shape[0] // 2, current.shape[1] // 2
            current = cv2.resize(current, (w, h), interpolation=cv2.INTER_AREA)
        out = np.empty((3, h + 2, w + 2), np.float32)
        out[:, [0, -1], :] = 0.0
        out[:, :, [0, -1]] = 0.0
        for c, plane in enumerate(cv2.split(current)):
            cv2.LUT(plane, luts[c], dst=out[c, 1:-1, 1:-1])
        levels.append(torch.from_numpy(out))
    return levels


def image_pyramid(image, boxes, output_size: int, context: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  antialias: bool = True, device=None) -> list[torch.Tensor]:
    """The normalized, bordered pyramid levels that warping ``boxes`` of ``image`` will read.

    Build it once per image and warp the boxes in batches with :func:`warp_pyramid`. Equivalent to
    ``pyramid_for(normalize_image(image, mean, std, device, border=1), boxes, ...)``; a ``uint8``
    numpy image warped on the CPU takes a faster path (levels rounded to 8 bits, see
    :func:`_pyramid_from_uint8`).
    image: RGB ``uint8`` ``(H, W, 3)`` numpy array or ``(3, H, W)`` tensor (see :func:`normalize_image`).
    boxes: float ``(N, 4)`` xyxy, pixels of the image.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    num_levels = 1
    if antialias and boxes.shape[0]:
        level_of = pyramid_levels(dilate_boxes(boxes, output_size, context), output_size, num_levels=16)
        num_levels = int(level_of.max()) + 1
    on_cpu = device is None or torch.device(device).type == "cpu"
    if on_cpu and isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 \
            and image.shape[2] == 3:
        return _pyramid_from_uint8(image, mean, std, num_levels)
    return build_pyramid(normalize_image(image, mean, std, device, border=1), num_levels)


def pyramid_levels(regions: torch.Tensor, output_size: int, num_levels: int) -> torch.Tensor:
    """Which pyramid level each dilated region is sampled from: ``round(log2(f))`` clamped to
    ``[0, num_levels - 1]``, where ``f = min(w, h) / S`` is the region's smaller shrink factor, so the
    remaining shrink of the smaller side is in ``[0.71, 1.41)`` (one bilinear sample per pixel suffices).

    regions: float ``(N, 4)`` xyxy, pixels. Returns: int64 ``(N,)``.
    """
    side = torch.minimum(regions[:, 2] - regions[:, 0], regions[:, 3] - regions[:, 1])
    factor = (side / output_size).clamp(min=1e-6)
    return torch.round(torch.log2(factor)).clamp(0, num_levels - 1).long()


def _roi_align_padded(padded: torch.Tensor, regions: torch.Tensor, output_size: int,
                      sampling_ratio: int) -> torch.Tensor:
    """roi_align of image-pixel ``regions`` on an image inside a one-pixel zero border."""
    rois = torch.cat([regions.new_zeros((regions.shape[0], 1)), regions + 1.0], dim=1)
    return roi_align(padded[None], rois, output_size=(output_size, output_size), spatial_scale=1.0,
                     sampling_ratio=sampling_ratio, aligned=True)


def pyramid_for(padded: torch.Tensor, boxes, output_size: int, context: int,
                antialias: bool = True) -> list[torch.Tensor]:
    """The pyramid levels (see :func:`build_pyramid`) that warping ``boxes`` will read.

    Build it once per image and warp the boxes in batches with :func:`warp_pyramid`.
    padded: float ``(3, H + 2, W + 2)`` from ``normalize_image(..., border=1)``.
    boxes: float ``(N, 4)`` xyxy, pixels of the image.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if not antialias or boxes.shape[0] == 0:
        return [padded]
    level_of = pyramid_levels(dilate_boxes(boxes, output_size, context), output_size, num_levels=16)
    return build_pyramid(padded, int(level_of.max()) + 1)


def warp_pyramid(pyramid: list[torch.Tensor], boxes, output_size: int = 224, context: int = 16,
                 sampling_ratio: int = 1) -> torch.Tensor:
    """Warp boxes from a pyramid of a normalized image (see :func:`pyramid_for`).

    pyramid: level 0 is the normalized image (mean 0) inside a one-pixel zero border, float
        ``(3, H + 2, W + 2)``; further levels as :func:`build_pyramid` makes them. A one-level pyramid
        samples every box from the full-resolution image (no antialiasing).
    boxes: float ``(N, 4)`` xyxy, pixels of the image (without the border). Boxes on the CPU (numpy or
        tensor) are grouped by level there, so a pyramid on a GPU is never waited for; only the regions
        travel to it.
    Returns: float32 ``(N, 3, S, S)`` on the pyramid's device, in the order of ``boxes``.
    """
    device = pyramid[0].device
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return pyramid[0].new_zeros((0, 3, output_size, output_size))
    regions = dilate_boxes(boxes, output_size, context)
    level_of = pyramid_levels(regions, output_size, num_levels=len(pyramid))
    used = torch.unique(level_of).tolist()  # on the boxes' device: the CPU in the engine, no GPU sync
    regions = regions.to(device, non_blocking=True)
    if len(used) == 1:
        return _roi_align_padded(pyramid[used[0]], regions / 2 ** used[0], output_size, sampling_ratio)
    out = pyramid[0].new_empty((boxes.shape[0], 3, output_size, output_size))
    for level in used:
        idx = torch.nonzero(level_of == level).squeeze(1).to(device, non_blocking=True)
        crops = _roi_align_padded(pyramid[level], regions[idx] / 2 ** level, output_size, sampling_ratio)
        out.index_copy_(0, idx, crops)
    return out


def warp_regions(image, boxes, output_size: int = 224, context: int = 16, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, sampling_ratio: int = 1, antialias: bool = True,
                 device=None) -> torch.Tensor:
    """Context-padded, anisotropic warp of every box to ``S x S``, normalized, as one batch.

    image: RGB ``uint8`` ``(H, W, 3)`` numpy array or ``(3, H, W)`` tensor (see :func:`normalize_image`).
    boxes: float ``(N, 4)`` xyxy, pixels of ``image`` (numpy or tensor).
    output_size: ``S``; context: ``p`` pixels of context per side in the output, ``0 <= 2p < S``.
    mean, std: per-channel normalization of ``[0, 1]`` pixels; context beyond the image becomes 0.
    sampling_ratio: bilinear samples per output pixel and axis, >= 1 (see the module docstring).
    antialias: sample large boxes from a 2x-per-level box-filtered pyramid (see the module docstring);
        ``False`` samples every box from the full-resolution image.
    device: where to warp (default: the image tensor's device, or CPU for numpy).
    Returns: float32 ``(N, 3, S, S)``.
    """
    if sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be >= 1, got {sampling_ratio}")
    context_scale(output_size, context)  # validates context before any work
    pyramid = image_pyramid(image, boxes, output_size, context, mean, std, antialias, device)
    return warp_pyramid(pyramid, boxes, output_size, context, sampling_ratio)
