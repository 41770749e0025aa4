"""Other Selective Search implementations behind the same call, for comparison.

- ``"opencv"``: ``cv2.ximgproc.segmentation.createSelectiveSearchSegmentation`` (opencv-contrib),
  modes ``single`` / ``fast`` / ``quality`` mapped to ``switchToSingleStrategy`` /
  ``switchToSelectiveSearchFast`` / ``switchToSelectiveSearchQuality`` with OpenCV's own defaults
  (its ``k`` values, strategies and ranking are OpenCV's, not the paper's).
- ``"selectivesearch"``: the ``selectivesearch`` package from PyPI (one strategy: RGB + HSV
  similarities on a scikit-image segmentation); ``mode`` is ignored and ``superpixel_scale``
  multiplies its ``scale``. Its boxes come unranked, in the order it lists regions.

Both run at the same working size as the native code (longest side ``max_side``) and return float32
``(N, 4)`` xyxy boxes in pixels of the input image.
"""

from __future__ import annotations

import cv2
import numpy as np

from detector.base.defaults import SS_BACKENDS
from proposals.working_image import as_rgb, resize_to, working_size

BACKENDS = SS_BACKENDS


def _xywh_to_input(xywh: np.ndarray, working: tuple[int, int], image_size: tuple[int, int],
                   min_size: int) -> np.ndarray:
    """Integer ``[x, y, w, h]`` boxes of the working image -> float32 xyxy boxes of the input image."""
    b = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    if min_size > 0:
        b = b[(b[:, 2] >= min_size) & (b[:, 3] >= min_size)]
    sy, sx = image_size[0] / working[0], image_size[1] / working[1]
    out = np.stack([b[:, 0] * sx, b[:, 1] * sy, (b[:, 0] + b[:, 2]) * sx, (b[:, 1] + b[:, 3]) * sy], axis=1)
    return out.astype(np.float32).reshape(-1, 4)


def opencv_selective_search(image: np.ndarray, mode: str = "fast", *, max_side: int | None = 500,
                            superpixel_scale: float = 1.0, min_size: int = 0, sigma: float = 0.8) -> np.ndarray:
    """OpenCV's Selective Search (threads as set by ``cv2.setNumThreads``)."""
    rgb = as_rgb(image)
    size = working_size(rgb.shape[:2], max_side)
    bgr = np.ascontiguousarray(resize_to(rgb, size)[:, :, ::-1])
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    if mode == "single":
        ss.switchToSingleStrategy(int(round(200 * superpixel_scale)), sigma)
    elif mode == "fast":
        ss.switchToSelectiveSearchFast(int(round(150 * superpixel_scale)), int(round(150 * superpixel_scale)), sigma)
    elif mode == "quality":
        ss.switchToSelectiveSearchQuality(int(round(150 * superpixel_scale)), int(round(150 * superpixel_scale)),
                                          sigma)
    else:
        raise ValueError(f"unknown Selective Search mode {mode!r}; use single, fast or quality")
    return _xywh_to_input(ss.process(), size, rgb.shape[:2], min_size)


def package_selective_search(image: np.ndarray, mode: str = "fast", *, max_side: int | None = 500,
                             superpixel_scale: float = 1.0, min_size: int = 0, sigma: float = 0.8) -> np.ndarray:
    """The ``selectivesearch`` package (its defaults: scale 500, sigma 0.9, min_size 10)."""
    import warnings

    import selectivesearch

    rgb = as_rgb(image)
    size = working_size(rgb.shape[:2], max_side)
    work = resize_to(rgb, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, regions = selectivesearch.selective_search(work, scale=500 * superpixel_scale, sigma=0.9, min_size=10)
    xywh = np.array([r["rect"] for r in regions], dtype=np.float64).reshape(-1, 4)
    xywh[:, 2:] += 1  # the package's width is xmax - xmin (inclusive pixels): one pixel short
    return _xywh_to_input(xywh, size, rgb.shape[:2], min_size)


def run_backend(backend: str, image: np.ndarray, mode: str = "fast", **options) -> np.ndarray:
    """Dispatch to a non-native backend; ``options`` as in :func:`proposals.selective_search`."""
    options.pop("seed", None)  # the other backends have no seed of ours
    if backend == "opencv":
        return opencv_selective_search(image, mode, **options)
    if backend == "selectivesearch":
        return package_selective_search(image, mode, **options)
    raise ValueError(f"unknown Selective Search backend {backend!r}; use one of {', '.join(BACKENDS)}")
