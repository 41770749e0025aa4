"""The box convention and its conversions: hand-computed cases and round trips."""

import numpy as np
import torch

from detector.base import boxes as B


def test_voc_is_one_based_inclusive():
    # A VOC box covering pixel columns 1..10 and rows 1..5 (1-based, inclusive) is 10 wide and 5 tall:
    # in continuous 0-based coordinates it spans [0, 10) x [0, 5).
    voc = np.array([[1, 1, 10, 5]], dtype=np.float32)
    xyxy = B.voc_to_xyxy(voc)
    np.testing.assert_array_equal(xyxy, [[0, 0, 10, 5]])
    assert B.box_areas(xyxy)[0] == 50  # (xmax - xmin + 1) * (ymax - ymin + 1) = 10 * 5
    np.testing.assert_array_equal(B.xyxy_to_voc(xyxy), voc)


def test_coco_round_trip():
    coco = np.array([[832, 373, 118, 187], [0, 0, 1, 1]], dtype=np.float32)
    xyxy = B.coco_to_xyxy(coco)
    np.testing.assert_array_equal(xyxy, [[832, 373, 950, 560], [0, 0, 1, 1]])
    np.testing.assert_array_equal(B.xyxy_to_coco(xyxy), coco)


def test_normalized_round_trip_uses_height_width_order():
    image_size = (100, 200)  # (h, w)
    xyxy = np.array([[20, 10, 200, 100]], dtype=np.float32)
    norm = B.xyxy_to_normalized(xyxy, image_size)
    np.testing.assert_allclose(norm, [[0.1, 0.1, 1.0, 1.0]])
    np.testing.assert_allclose(B.normalized_to_xyxy(norm, image_size), xyxy)


def test_cxcywh_round_trip():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (50, 2))
    wh = rng.uniform(1, 50, (50, 2))
    xyxy = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    np.testing.assert_allclose(B.cxcywh_to_xyxy(B.xyxy_to_cxcywh(xyxy)), xyxy, atol=1e-4)


def test_numpy_ops_equal_the_torchvision_ops_the_torch_stages_use():
    # base.boxes is numpy only; the torch stages use torchvision.ops, which must agree bit for bit
    from torchvision.ops import box_convert, box_iou, clip_boxes_to_image

    rng = np.random.default_rng(1)
    xy = rng.uniform(-20, 120, (40, 2))
    xyxy = np.concatenate([xy, xy + rng.uniform(0, 60, (40, 2))], 1).astype(np.float32)
    t = torch.from_numpy(xyxy)
    np.testing.assert_array_equal(B.clip_boxes(xyxy, (100, 80)), clip_boxes_to_image(t, (100, 80)).numpy())
    cxcywh = B.xyxy_to_cxcywh(xyxy)
    np.testing.assert_array_equal(B.cxcywh_to_xyxy(cxcywh),
                                  box_convert(torch.from_numpy(cxcywh), "cxcywh", "xyxy").numpy())
    np.testing.assert_array_equal(B.box_iou(xyxy, xyxy[:7]), box_iou(t, t[:7]).numpy())


def test_conversions_do_not_mutate_and_keep_float32():
    voc = np.array([[5, 6, 7, 8]], dtype=np.float32)
    before = voc.copy()
    out = B.voc_to_xyxy(voc)
    np.testing.assert_array_equal(voc, before)
    assert out.dtype == np.float32
    assert B.coco_to_xyxy(np.array([[1, 2, 3, 4]])).dtype == np.float32  # ints become float32


def test_empty_inputs():
    empty = np.zeros((0, 4), np.float32)
    for fn in (B.voc_to_xyxy, B.xyxy_to_voc, B.coco_to_xyxy, B.xyxy_to_coco):
        assert fn(empty).shape == (0, 4)


def test_clip_and_valid_mask():
    xyxy = np.array([[-5, -5, 10, 10], [50, 50, 300, 120], [3, 3, 3, 9]], dtype=np.float32)
    clipped = B.clip_boxes(xyxy, (100, 200))
    np.testing.assert_array_equal(clipped, [[0, 0, 10, 10], [50, 50, 200, 100], [3, 3, 3, 9]])
    np.testing.assert_array_equal(B.valid_box_mask(clipped), [True, True, False])


def test_box_iou_matches_hand_computation():
    # Two 10x10 boxes overlapping in a 5x10 strip: IoU = 50 / (100 + 100 - 50) = 1/3.
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    np.testing.assert_allclose(B.box_iou(a, b), [[1 / 3, 0.0]], rtol=1e-6)
