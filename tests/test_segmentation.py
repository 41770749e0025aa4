"""Felzenszwalb-Huttenlocher segmentation (proposals/segmentation.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from proposals.segmentation import segment, segment_scales


def test_two_flat_halves_give_two_regions():
    # A black left half and a white right half, unsmoothed: the only edges with weight > 0 cross
    # the border (weight 255 * sqrt(3), far above k / |C|), so the halves are the two components.
    img = np.zeros((20, 30, 3), np.uint8)
    img[:, 15:] = 255
    labels, n = segment(img, k=10, sigma=0, min_size=1)
    assert n == 2
    assert (labels[:, :15] == 0).all() and (labels[:, 15:] == 1).all()
    # Smoothed (sigma 0.8), the border becomes a ramp of 20-pixel columns; with min_size 50 they
    # are joined to a neighbour and the two halves remain, split at the ramp's middle.
    labels, n = segment(img, k=10, min_size=50)
    assert n == 2
    assert (labels[:, :13] == 0).all() and (labels[:, 17:] == 1).all()


def test_labels_are_numbered_in_raster_order():
    # Four flat quadrants: raster order meets top-left, top-right, bottom-left, bottom-right.
    img = np.zeros((16, 16, 3), np.uint8)
    img[:8, 8:] = (255, 0, 0)
    img[8:, :8] = (0, 255, 0)
    img[8:, 8:] = (0, 0, 255)
    labels, n = segment(img, k=5, sigma=0, min_size=1)
    assert n == 4
    assert [labels[0, 0], labels[0, 15], labels[15, 0], labels[15, 15]] == [0, 1, 2, 3]


def test_min_size_is_respected_and_k_coarsens(shared_data):
    img = np.asarray(Image.open(shared_data / "coco128/images/000000000025.jpg").convert("RGB").resize((200, 150)))
    counts = []
    for k in (50, 100, 300):
        labels, n = segment(img, k)
        sizes = np.bincount(labels.ravel(), minlength=n)
        assert sizes.min() >= k  # min_size defaults to k; every component was joined up to it
        assert labels.max() == n - 1 and len(np.unique(labels)) == n
        counts.append(n)
    assert counts[0] > counts[1] > counts[2]


def test_segment_scales_equals_separate_segmentations(shared_data):
    img = np.asarray(Image.open(shared_data / "coco128/images/000000000009.jpg").convert("RGB").resize((120, 90)))
    shared = segment_scales(img, [50, 150])
    for (labels, n), k in zip(shared, (50, 150)):
        alone, m = segment(img, k)
        assert n == m and np.array_equal(labels, alone)


@pytest.mark.parametrize("k", [50, 300])
def test_agrees_with_scikit_image(shared_data, k):
    # Reference: scikit-image's felzenszwalb implements the same paper (8-connected grid, Euclidean
    # colour distance of the Gaussian-smoothed image, min_size post-merge). Tie order and the
    # smoothing kernel's truncation differ, so compare partitions, not labels: for each of our
    # regions the best-overlapping reference region covers almost all its pixels, and the region
    # counts are within 10%.
    from skimage.segmentation import felzenszwalb

    img = np.asarray(Image.open(shared_data / "coco128/images/000000000025.jpg").convert("RGB").resize((250, 185)))
    labels, n = segment(img, k)
    ref = felzenszwalb(img, scale=k, sigma=0.8, min_size=k)
    m = int(ref.max()) + 1
    table = np.zeros((n, m), np.int64)
    np.add.at(table, (labels.ravel(), ref.ravel()), 1)
    assert table.max(axis=1).sum() / labels.size > 0.97
    assert table.max(axis=0).sum() / labels.size > 0.97
    assert abs(n - m) <= 0.1 * m


def test_grayscale_and_tiny_images():
    labels, n = segment(np.full((1, 1), 7, np.uint8), k=50)
    assert n == 1 and labels.shape == (1, 1)
    labels, n = segment(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, k=1, min_size=1)
    assert labels.shape == (3, 4) and 1 <= n <= 12
