"""R-CNN box parameterization: hand-computed encodings, round trips, class-specific decoding."""

import math

import numpy as np
import pytest
import torch

from detector.box_coder import BoxCoder, select_class_deltas

pytestmark = pytest.mark.numeric  # box encoding and decoding in torch compared with hand-computed values (select with -m numeric)


def test_encode_hand_computed():
    coder = BoxCoder()  # weights (10, 10, 5, 5) = 1 / (0.1, 0.1, 0.2, 0.2)
    proposals = np.array([[0, 0, 10, 20], [0, 0, 10, 20]], np.float32)  # centre (5, 10), size 10 x 20
    gt = np.array([[2, 4, 12, 24],     # centre (7, 14), same size: dx = 2/10, dy = 4/20, dw = dh = 0
                   [0, 0, 20, 20]],    # centre (10, 10), size 20 x 20: dx = 5/10, dw = log 2, dh = 0
                  np.float32)
    deltas = coder.encode(gt, proposals)
    assert isinstance(deltas, np.ndarray)
    np.testing.assert_allclose(deltas[0], [10 * 0.2, 10 * 0.2, 0, 0], atol=1e-6)
    np.testing.assert_allclose(deltas[1], [10 * 0.5, 0, 5 * math.log(2), 0], atol=1e-6)


def test_round_trip_numpy_and_torch():
    rng = np.random.default_rng(0)
    # sides in [10, 300): size ratios stay below 30, inside the decoder's clamp of 1000 / 16 = 62.5
    xy = rng.uniform(0, 500, (200, 2))
    proposals = np.concatenate([xy, xy + rng.uniform(10, 300, (200, 2))], 1).astype(np.float32)
    xy = rng.uniform(0, 500, (200, 2))
    gt = np.concatenate([xy, xy + rng.uniform(10, 300, (200, 2))], 1).astype(np.float32)
    coder = BoxCoder()
    back = coder.decode(coder.encode(gt, proposals), proposals)
    np.testing.assert_allclose(back, gt, rtol=1e-4, atol=1e-2)
    back_t = coder.decode(coder.encode(torch.from_numpy(gt), torch.from_numpy(proposals)),
                          torch.from_numpy(proposals))
    assert isinstance(back_t, torch.Tensor)
    np.testing.assert_allclose(back_t.numpy(), gt, rtol=1e-4, atol=1e-2)


def test_other_weights_scale_the_deltas():
    proposals = np.array([[10, 10, 50, 30]], np.float32)
    gt = np.array([[15, 5, 45, 45]], np.float32)
    plain = BoxCoder(weights=(1, 1, 1, 1)).encode(gt, proposals)
    weighted = BoxCoder().encode(gt, proposals)
    np.testing.assert_allclose(weighted, plain * np.array([10, 10, 5, 5]), rtol=1e-6)
    np.testing.assert_allclose(BoxCoder(weights=(1, 1, 1, 1)).decode(plain, proposals), gt, atol=1e-4)


def test_decode_many_classes_matches_one_by_one():
    rng = np.random.default_rng(1)
    proposals = np.array([[10, 20, 110, 70], [0, 0, 30, 30], [5, 5, 6, 9]], np.float32)
    deltas = rng.normal(0, 1, (3, 4 * 5)).astype(np.float32)  # 5 classes
    coder = BoxCoder()
    all_boxes = coder.decode(deltas, proposals)
    assert all_boxes.shape == (3, 20)
    for c in range(5):
        np.testing.assert_allclose(all_boxes[:, 4 * c:4 * c + 4], coder.decode(deltas[:, 4 * c:4 * c + 4], proposals),
                                   rtol=1e-6)


def test_decode_clamps_size_growth():
    coder = BoxCoder(weights=(1, 1, 1, 1))
    boxes = coder.decode(np.array([[0, 0, 100, 100]], np.float32), np.array([[0, 0, 10, 10]], np.float32))
    # dw = dh = 100 is clamped to log(1000 / 16): the 10-pixel box grows to 625 pixels, centred at 5
    np.testing.assert_allclose(boxes[0], [5 - 312.5, 5 - 312.5, 5 + 312.5, 5 + 312.5], rtol=1e-5)
    assert np.isfinite(boxes).all()


def test_select_class_deltas():
    deltas = np.arange(2 * 12, dtype=np.float32).reshape(2, 12)  # 3 classes
    picked = select_class_deltas(deltas, np.array([3, 0]))
    # row 0, label 3 -> columns 8..11; row 1 is background -> zeros (the proposal stays as it is)
    np.testing.assert_array_equal(picked, [[8, 9, 10, 11], [0, 0, 0, 0]])
    picked_t = select_class_deltas(torch.from_numpy(deltas), torch.tensor([1, 2]))
    np.testing.assert_array_equal(picked_t.numpy(), [[0, 1, 2, 3], [16, 17, 18, 19]])
    with pytest.raises(ValueError):
        select_class_deltas(deltas, np.array([4, 1]))


def test_bad_weights_refused():
    with pytest.raises(ValueError):
        BoxCoder(weights=(10, 10, 5, 0))


def test_no_boxes():
    coder = BoxCoder()
    assert coder.decode(np.zeros((0, 12), np.float32), np.zeros((0, 4), np.float32)).shape == (0, 12)
    assert coder.encode(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32)).shape == (0, 4)
    assert select_class_deltas(np.zeros((0, 12), np.float32), np.zeros((0,), np.int64)).shape == (0, 4)
