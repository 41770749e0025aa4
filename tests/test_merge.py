"""The GoogLeNet recipe: Selective Search (superpixels x2) then the top MultiBox boxes, near-duplicates out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.base.boxes import box_iou
from detector.base.io import load_image
from proposals.merge import GoogLeNetRecipe, googlenet_proposals, merge_proposals, remove_near_duplicates
from proposals.multibox import MultiBox, MultiBoxConfig


def test_merge_keeps_selective_search_order_then_multibox_and_drops_near_duplicates():
    # IoUs by hand (areas in px^2):
    #   a2 = a shrunk by 2 px at the bottom: 100*98 / (100*100) = 0.98 > 0.95 -> dropped (a is earlier)
    #   b2 = b shifted by 1 px: overlap 49*50 / (2*2500 - 2450) = 0.961 > 0.95 -> dropped (MultiBox copy)
    #   d  = a cut to 100 x 94: 0.94 <= 0.95 -> kept
    a = [0, 0, 100, 100]
    a2 = [0, 0, 100, 98]
    b = [200, 200, 250, 250]
    b2 = [201, 200, 251, 250]
    c = [300, 0, 340, 60]
    d = [0, 0, 100, 94]
    boxes, from_multibox = merge_proposals(np.array([a, b, a2]), np.array([c, b2, d]), duplicate_iou=0.95)
    np.testing.assert_array_equal(boxes, np.array([a, b, c, d], np.float32))
    assert from_multibox.tolist() == [False, False, True, True]
    assert boxes.dtype == np.float32


def test_merge_of_empty_inputs():
    boxes, source = merge_proposals(np.zeros((0, 4)), np.zeros((0, 4)))
    assert boxes.shape == (0, 4) and source.shape == (0,)
    boxes, source = merge_proposals(np.zeros((0, 4)), np.array([[0, 0, 5, 5]]))
    assert boxes.shape == (1, 4) and source.tolist() == [True]


def test_remove_near_duplicates_equals_a_brute_force_greedy_pass():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (300, 2))
    wh = rng.uniform(5, 20, (300, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    boxes = np.concatenate([boxes, boxes + rng.uniform(-0.3, 0.3, boxes.shape).astype(np.float32)])
    iou = box_iou(boxes, boxes)
    for threshold in (0.5, 0.95):
        expected = []
        for i in range(len(boxes)):  # keep i unless an earlier kept box overlaps it by more than threshold
            if all(iou[i, j] <= threshold for j in expected):
                expected.append(i)
        assert remove_near_duplicates(boxes, threshold).tolist() == expected


def test_recipe_rejects_bad_thresholds():
    with pytest.raises(ValueError):
        GoogLeNetRecipe(duplicate_iou=0.0)
    with pytest.raises(ValueError):
        GoogLeNetRecipe(multibox_top_k=-1)


def test_googlenet_proposals_on_a_real_photo(chess):
    # A real chess photo, Selective Search fast with superpixel_scale 2, plus an untrained tiny MultiBox:
    # the list starts with Selective Search's boxes in its own order and ends with at most 7 MultiBox boxes.
    from proposals import selective_search

    image = load_image(sorted((chess / "test").glob("*.jpg"))[0])
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    priors = np.column_stack([rng.uniform(0.2, 0.8, (30, 2)), rng.uniform(0.05, 0.3, (30, 2))])
    config = MultiBoxConfig(num_priors=30, input_size=64, trunk_end="inception3b", head_channels=8,
                            head_grid=2, head_hidden=16)
    model = MultiBox(config, priors)
    recipe = GoogLeNetRecipe(multibox_top_k=7)
    boxes = googlenet_proposals(image, recipe, multibox=model)
    ss = selective_search(image, mode="fast", superpixel_scale=2)
    mb = model.propose([image], top_k=7)[0][0]
    h, w = image.shape[:2]
    kept_ss = ss[remove_near_duplicates(ss, 0.95)]
    assert boxes.dtype == np.float32 and boxes.ndim == 2
    assert len(kept_ss) < len(boxes) <= len(kept_ss) + 7
    np.testing.assert_array_equal(boxes[:len(kept_ss)], kept_ss)
    tail = boxes[len(kept_ss):]
    assert all(any(np.array_equal(t, m) for m in mb) for t in tail)
    assert np.all(boxes[:, [0, 2]] <= w) and np.all(boxes[:, [1, 3]] <= h) and np.all(boxes >= 0)
