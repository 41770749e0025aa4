"""The context-padded warp against a per-crop reference (mean-padded crop + cv2.resize)."""

import cv2
import numpy as np
import pytest
import torch

from detector.base.io import load_image
from detector.warp import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    context_scale,
    default_context,
    dilate_boxes,
    normalize_image,
    warp_regions,
)

pytestmark = pytest.mark.numeric  # warped crops compared with references by a fraction of a grey level (select with -m numeric)


@pytest.fixture(scope="module")
def photo(chess):
    path = sorted((chess / "test").glob("*.jpg"))[0]
    return load_image(path)  # 2048 x 1371 RGB


def reference_crop(image, box, size, context, interpolation):
    """R-CNN's warp one crop at a time: normalize, pad with the mean (0), crop the dilated box, resize.

    Only for dilated boxes with integer corners, so the crop needs no sub-pixel shift.
    """
    norm = (image.astype(np.float32) / 255 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    x1, y1, x2, y2 = dilate_boxes(torch.tensor([box], dtype=torch.float32), size, context)[0].tolist()
    x1, y1, x2, y2 = (int(round(v)) for v in (x1, y1, x2, y2))
    margin = max(0, -x1, -y1, x2 - image.shape[1], y2 - image.shape[0])
    padded = cv2.copyMakeBorder(norm, margin, margin, margin, margin, cv2.BORDER_CONSTANT, value=0)
    crop = padded[y1 + margin:y2 + margin, x1 + margin:x2 + margin]
    return cv2.resize(crop, (size, size), interpolation=interpolation).transpose(2, 0, 1)


def test_dilation_gives_context_pixels():
    # S = 224, p = 16: a 192-pixel box dilates to 224 (scale 224/192), centred where it was
    assert context_scale(224, 16) == pytest.approx(224 / 192)
    region = dilate_boxes(torch.tensor([[100.0, 50.0, 292.0, 434.0]]), 224, 16)[0]
    np.testing.assert_allclose(region.numpy(), [84, 18, 308, 466], atol=1e-4)
    assert default_context(224) == 16 and default_context(112) == 8
    with pytest.raises(ValueError):
        context_scale(224, 112)


def test_matches_per_crop_cv2_linear(photo):
    size, context = 224, 16
    boxes = [[100, 50, 292, 242],      # dilates to 224 x 224: a 1:1 copy
             [300, 200, 684, 392],     # 448 x 224: shrinks 2x horizontally only
             [1000, 600, 1576, 1176]]  # 672 x 672: shrinks 3x
    crops = warp_regions(photo, np.array(boxes, np.float32), size, context, antialias=False, sampling_ratio=1)
    assert crops.shape == (3, 3, size, size) and crops.dtype == torch.float32
    for crop, box in zip(crops, boxes):
        ref = reference_crop(photo, box, size, context, cv2.INTER_LINEAR)
        np.testing.assert_allclose(crop.numpy(), ref, atol=1e-4)


def test_enlarged_crop_matches_cv2_inside(photo):
    # a 48-pixel box grows 4x; cv2 replicates the crop's edge where roi_align reads the next image
    # pixel, so compare away from the outermost 2 output pixels
    size, context = 224, 16
    box = [400, 300, 448, 348]  # dilates to 56 x 56 at integer corners
    crop = warp_regions(photo, np.array([box], np.float32), size, context, antialias=False)[0]
    ref = reference_crop(photo, box, size, context, cv2.INTER_LINEAR)
    np.testing.assert_allclose(crop.numpy()[:, 2:-2, 2:-2], ref[:, 2:-2, 2:-2], atol=1e-4)


def test_antialiased_shrink_matches_cv2_area(photo):
    # a 768-pixel box dilates to 896 = 4 x 224 at corners divisible by 4: the pyramid's level 2 (4x4
    # block means) sampled 1:1, which is exactly what INTER_AREA computes for a 4x shrink
    size, context = 224, 16
    box = [164, 264, 932, 1032]
    crop = warp_regions(photo, np.array([box], np.float32), size, context)[0]
    ref = reference_crop(photo, box, size, context, cv2.INTER_AREA)
    exact = warp_regions(torch.from_numpy(photo.copy()).permute(2, 0, 1), np.array([box], np.float32), size,
                         context)[0]  # a tensor image takes the float path
    np.testing.assert_allclose(exact.numpy(), ref, atol=1e-4)
    # the CPU path makes levels from the 8-bit image: level 2 is rounded twice, <= 2 x 0.5 grey levels
    one_grey = 1 / 255 / min(IMAGENET_STD)
    np.testing.assert_allclose(crop.numpy(), ref, atol=1.01 * one_grey)
    assert np.abs(crop.numpy() - ref).mean() < 0.5 * one_grey  # rounding errors, not a shifted grid
    aliased = warp_regions(photo, np.array([box], np.float32), size, context, antialias=False)[0]
    # without the pyramid one bilinear sample per output pixel departs from the area mean
    aliased_err = np.abs(aliased.numpy() - ref).mean()
    assert aliased_err > 100 * np.abs(exact.numpy() - ref).mean()
    assert aliased_err > 3 * np.abs(crop.numpy() - ref).mean()


def test_mixed_levels_keep_box_order(photo):
    size, context = 112, 8
    boxes = np.array([[164, 264, 932, 1032], [100, 50, 196, 146], [300, 200, 684, 392]], np.float32)
    together = warp_regions(photo, boxes, size, context)
    for i in range(len(boxes)):
        alone = warp_regions(photo, boxes[i:i + 1], size, context)[0]
        np.testing.assert_allclose(together[i].numpy(), alone.numpy(), atol=1e-5)


def test_context_beyond_the_image_is_the_mean():
    white = np.full((300, 400, 3), 255, np.uint8)
    inside = (1 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    boxes = np.array([[0, 0, 192, 192], [0.5, 0.5, 192.5, 192.5]], np.float32)
    crop, shifted = warp_regions(white, boxes, 224, 16).numpy()
    # the first box dilates to [-16, 208), 1:1: output row j samples the pixel centre -16 + j + 0.5, so
    # rows (and columns) 0..15 lie beyond the image (the mean, 0 after normalization), 16.. inside it
    assert np.all(crop[:, :16, :] == 0) and np.all(crop[:, :, :16] == 0)
    np.testing.assert_allclose(crop[:, 16:, 16:], np.broadcast_to(inside[:, None, None], (3, 208, 208)),
                               rtol=1e-5)
    # shifted by half a pixel, row 15 samples y = 0: halfway between the mean and the first image row
    assert np.all(shifted[:, :15, :] == 0)
    np.testing.assert_allclose(shifted[:, 15, 20], inside / 2, rtol=1e-5)
    np.testing.assert_allclose(shifted[:, 16, 20], inside, rtol=1e-5)


def test_tensor_input_and_empty_boxes(photo):
    boxes = np.array([[10, 20, 200, 300]], np.float32)
    from_array = warp_regions(photo, boxes, 96, 7)
    from_tensor = warp_regions(torch.from_numpy(photo.copy()).permute(2, 0, 1), torch.from_numpy(boxes), 96, 7)
    from_float = warp_regions(torch.from_numpy(photo.copy()).permute(2, 0, 1).float() / 255, boxes, 96, 7)
    np.testing.assert_allclose(from_tensor.numpy(), from_float.numpy(), atol=1e-5)
    # numpy uint8 on the CPU: pyramid levels rounded to 8 bits (here level 1: half a grey level)
    np.testing.assert_allclose(from_array.numpy(), from_tensor.numpy(), atol=1.01 / 255 / min(IMAGENET_STD))
    level0 = np.array([[10, 20, 80, 100]], np.float32)  # small enough for level 0: identical
    np.testing.assert_allclose(warp_regions(photo, level0, 96, 7).numpy(),
                               warp_regions(torch.from_numpy(photo.copy()).permute(2, 0, 1), level0, 96, 7).numpy(),
                               atol=1e-5)
    assert warp_regions(photo, np.zeros((0, 4), np.float32), 96, 7).shape == (0, 3, 96, 96)


def test_normalize_border():
    image = np.zeros((2, 3, 3), np.uint8)
    out = normalize_image(image, border=1)
    assert out.shape == (3, 4, 5)
    assert torch.all(out[:, 0] == 0) and torch.all(out[:, :, -1] == 0)
    np.testing.assert_allclose(out[:, 1, 1].numpy(), -np.float32(IMAGENET_MEAN) / np.float32(IMAGENET_STD),
                               rtol=1e-6)
    with pytest.raises(ValueError):
        normalize_image(np.zeros((4, 4), np.uint8))


def test_odd_sized_image_levels_agree_between_paths():
    # odd height and width: the last row/column of each level averages what exists (float path) or a
    # replicated copy (8-bit path), the same mean; boxes reaching the far edges read those pixels
    image = np.random.default_rng(3).integers(0, 256, (301, 203, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 203, 301], [100, 150, 203, 301], [3, 5, 150, 140]], np.float32)
    fast = warp_regions(image, boxes, 32, 2)
    exact = warp_regions(torch.from_numpy(image.copy()).permute(2, 0, 1), boxes, 32, 2)
    # the first box shrinks ~10x (level 3): three roundings of at most half a grey level each
    one_grey = 1 / 255 / min(IMAGENET_STD)
    np.testing.assert_allclose(fast.numpy(), exact.numpy(), atol=1.5 * one_grey)
    assert np.abs(fast.numpy() - exact.numpy()).mean() < 0.5 * one_grey
