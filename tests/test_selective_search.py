"""Selective Search (proposals/selective_search.py, proposals/colour.py, proposals/backends.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import proposals
from proposals import colour
from proposals.selective_search import (
    Strategy,
    _group,
    _region_boxes_and_pairs,
    hierarchies,
    mode_strategies,
    rank_boxes,
    search,
    selective_search,
)


@pytest.fixture(scope="module")
def photo(shared_data):
    """A real COCO photo (640x480), as RGB uint8."""
    return np.asarray(Image.open(shared_data / "coco128/images/000000000009.jpg").convert("RGB"))


def quadrants(size=40):
    """Four flat colours, one per quadrant; top-left is red-ish and bottom-right blue-ish."""
    img = np.zeros((size, size, 3), np.uint8)
    h = size // 2
    img[:h, :h] = (200, 30, 30)
    img[:h, h:] = (30, 200, 30)
    img[h:, :h] = (30, 30, 200)
    img[h:, h:] = (200, 200, 30)
    return img


def test_mode_strategy_counts_and_superpixel_scale():
    # Paper, sec. 5.2: single = 1, fast = 2 colour spaces x 2 k x 2 similarities, quality = 5 x 4 x 4.
    assert len(mode_strategies("single")) == 1
    fast = mode_strategies("fast")
    assert len(fast) == 8 and {s.colour_space for s in fast} == {"hsv", "lab"}
    assert {s.k for s in fast} == {50, 100} and {s.similarity for s in fast} == {"CTSF", "TSF"}
    quality = mode_strategies("quality")
    assert len(quality) == 80 and len(set(quality)) == 80
    assert {s.k for s in mode_strategies("fast", superpixel_scale=2)} == {100, 200}
    with pytest.raises(ValueError, match="mode"):
        mode_strategies("slow")


def test_region_statistics_of_quadrants():
    labels = np.zeros((4, 6), np.int32)
    labels[:, 3:] = 1
    labels[2:, :3] = 2
    boxes, sizes, pairs = _region_boxes_and_pairs(labels, 3)
    assert boxes.tolist() == [[0, 0, 2, 1], [3, 0, 5, 3], [0, 2, 2, 3]]
    assert sizes.tolist() == [6, 12, 6]
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 2]]


def test_grouping_merges_most_similar_neighbours_first():
    # Regions 0 | 1 | 2 in a row, sizes 10, 10, 20 in a 40-pixel image, size similarity only:
    # s(0,1) = 1 - 20/40 = 0.5 > s(1,2) = 1 - 30/40, so 0 and 1 merge first (region 3), then 3 and 2.
    boxes = np.array([[0, 0, 0, 9], [1, 0, 1, 9], [2, 0, 3, 9]], np.int32)
    sizes = np.array([10, 10, 20], np.int64)
    pairs = np.array([[0, 1], [1, 2]], np.int32)
    out = _group(boxes, sizes, pairs, np.zeros((3, 0), np.float32), 0, 0.0, 0.0, 1.0, 0.0, 40.0)
    assert out.tolist() == boxes.tolist() + [[0, 0, 1, 9], [0, 0, 3, 9]]


def test_colour_similarity_decides_the_first_merge():
    # Three flat stripes, unsmoothed (sigma 0) so each is one initial region: red | dark red | blue.
    # In HSV the reds share hue and saturation bins (colour intersection 2/3) while dark red and blue
    # share only saturation (1/3); size and fill are symmetric, so red + dark red merge first.
    img = np.zeros((36, 36, 3), np.uint8)
    img[:, :12] = (200, 30, 30)
    img[:, 12:24] = (150, 22, 22)
    img[:, 24:] = (30, 30, 200)
    (hier,) = hierarchies(img, [Strategy("hsv", 5.0, "CTSF")], sigma=0)
    assert hier.tolist() == [[0, 0, 11, 35], [12, 0, 23, 35], [24, 0, 35, 35], [0, 0, 23, 35], [0, 0, 35, 35]]
    (hier,) = hierarchies(np.ascontiguousarray(img[:, ::-1]), [Strategy("hsv", 5.0, "CTSF")], sigma=0)
    assert hier[3].tolist() == [12, 0, 35, 35]  # mirrored: still the two reds


def test_quadrants_give_four_regions_and_the_whole_image_last():
    (hier,) = hierarchies(quadrants(), [Strategy("lab", 5.0, "TSF")], sigma=0)
    assert len(hier) == 2 * 4 - 1
    assert sorted(hier[:4].tolist()) == [[0, 0, 19, 19], [0, 20, 19, 39], [20, 0, 39, 19], [20, 20, 39, 39]]
    assert hier[-1].tolist() == [0, 0, 39, 39]


def test_histograms_are_l1_normalized(photo):
    img = np.ascontiguousarray(photo[:60, :80])
    conv = colour.convert(img, "lab")
    labels = np.zeros((60, 80), np.int32)
    labels[30:] = 1
    hist = colour.region_histograms(labels, 2, colour.pixel_features(conv), 3)
    dc, dt = colour.descriptor_sizes(3)
    assert hist.shape == (2, dc + dt) == (2, 75 + 240)
    np.testing.assert_allclose(hist[:, :dc].sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(hist[:, dc:].sum(1), 1.0, rtol=1e-5)
    # Region 0's colour histogram counted by hand with numpy: bin = value * 25 // 256 per channel.
    top = conv[:30].reshape(-1, 3).astype(int)
    expect = np.concatenate([np.bincount(top[:, c] * 25 // 256, minlength=25) for c in range(3)]) / (3 * top.shape[0])
    np.testing.assert_allclose(hist[0, :dc], expect, atol=1e-6)


def test_rank_boxes_orders_by_position_times_uniform_and_drops_duplicates():
    a = np.array([[0, 0, 4, 4], [5, 5, 9, 9], [0, 0, 9, 9]], np.int32)
    b = np.array([[5, 5, 9, 9], [0, 0, 2, 2], [0, 0, 9, 9]], np.int32)
    boxes, ranks = rank_boxes([a, b], seed=3)
    # The same draws by hand: 2 initial regions (position 2 each) and one merge (position 1) per
    # strategy, times 1 - U[0, 1).
    rng = np.random.default_rng(3)
    ra = np.array([2, 2, 1]) * (1 - rng.random(3))
    rb = np.array([2, 2, 1]) * (1 - rng.random(3))
    best = {}
    for box, r in list(zip(map(tuple, a), ra)) + list(zip(map(tuple, b), rb)):
        best[box] = min(best.get(box, np.inf), r)
    expect = sorted(best, key=best.get)
    assert [tuple(x) for x in boxes.tolist()] == expect
    assert np.all(np.diff(ranks) >= 0) and len(boxes) == 4


def test_deterministic_for_a_seed_and_boxes_valid(photo):
    first = selective_search(photo, "fast", max_side=160, seed=1)
    again = selective_search(photo, "fast", max_side=160, seed=1)
    other = selective_search(photo, "fast", max_side=160, seed=2)
    assert first.dtype == np.float32 and first.shape[1] == 4
    np.testing.assert_array_equal(first, again)
    # Another seed reorders the same set of boxes.
    assert not np.array_equal(first, other)
    assert {tuple(b) for b in first.tolist()} == {tuple(b) for b in other.tolist()}
    h, w = photo.shape[:2]
    assert (first[:, 0] >= 0).all() and (first[:, 1] >= 0).all()
    assert (first[:, 2] <= w).all() and (first[:, 3] <= h).all()
    assert (first[:, 2] > first[:, 0]).all() and (first[:, 3] > first[:, 1]).all()
    assert len(np.unique(first, axis=0)) == len(first)  # exact duplicates removed
    assert [0, 0, w, h] in first.tolist()  # the last merge covers the whole image


def test_boxes_scale_back_to_the_input_image(photo):
    result = search(photo, "single", max_side=160)
    assert result.working_size == (120, 160) and result.image_size == (480, 640)
    xyxy = result.boxes_xyxy()
    np.testing.assert_allclose(xyxy[:, 0], result.boxes[:, 0] * 4.0)
    np.testing.assert_allclose(xyxy[:, 3], (result.boxes[:, 3] + 1) * 4.0)
    assert np.array_equal(proposals.propose(photo, "ss-single", max_side=160), xyxy)


def test_modes_and_superpixel_scale_change_the_count(photo):
    single = selective_search(photo, "single", max_side=160)
    fast = selective_search(photo, "fast", max_side=160)
    coarse = selective_search(photo, "fast", max_side=160, superpixel_scale=2)
    assert len(single) < len(fast)
    assert len(coarse) < 0.8 * len(fast)  # larger superpixels, fewer regions, fewer boxes


def test_max_boxes_keeps_the_best_ranked(photo):
    every = search(photo, "fast", max_side=160, max_boxes=None)
    top = search(photo, "fast", max_side=160, max_boxes=100)
    assert len(every.boxes) > 100 and len(top.boxes) == 100
    np.testing.assert_array_equal(top.boxes, every.boxes[:100])
    with pytest.raises(ValueError, match="max_boxes"):
        search(photo, "fast", max_side=160, max_boxes=-1)


def test_fast_mode_caps_at_2000_by_default(photo):
    # At 500 pixels this photo gives more than 2000 distinct boxes in fast mode (about 3500).
    capped = search(photo, "fast")
    assert len(capped.boxes) == 2000
    np.testing.assert_array_equal(capped.boxes, search(photo, "fast", max_boxes=None).boxes[:2000])
    # Quality and single modes keep every box by default.
    small = search(photo, "single", max_side=200)
    assert len(small.boxes) == len(search(photo, "single", max_side=200, max_boxes=None).boxes)


def test_min_size_drops_small_boxes(photo):
    boxes = search(photo, "fast", max_side=160, min_size=20).boxes
    assert len(boxes) > 0
    assert ((boxes[:, 2] - boxes[:, 0] + 1) >= 20).all() and ((boxes[:, 3] - boxes[:, 1] + 1) >= 20).all()


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (7, 5, 1), (3, 9, 3)])
def test_tiny_and_grayscale_images(shape):
    img = (np.arange(np.prod(shape)) * 37 % 256).astype(np.uint8).reshape(shape)
    boxes = selective_search(img, "fast", max_side=None)
    h, w = shape[:2]
    assert len(boxes) >= 1 and [0, 0, w, h] in boxes.tolist()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()


def test_grayscale_equals_replicated_rgb(photo):
    gray = np.ascontiguousarray(photo[:, :, 1])
    np.testing.assert_array_equal(selective_search(gray, "single", max_side=100),
                                  selective_search(np.stack([gray] * 3, axis=2), "single", max_side=100))


def test_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        selective_search(np.zeros((4, 4, 3), np.float32))


@pytest.mark.parametrize("backend", ["opencv", "selectivesearch"])
def test_other_backends_return_input_coordinates(photo, backend):
    boxes = selective_search(photo, "single", backend=backend, max_side=120)
    h, w = photo.shape[:2]
    assert boxes.dtype == np.float32 and len(boxes) > 0
    assert (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()
    assert (boxes[:, 2] > boxes[:, 0]).all()
    # The whole image is one of the regions of every hierarchical method.
    assert np.isclose(boxes, [0, 0, w, h], atol=1e-3).all(axis=1).any()
