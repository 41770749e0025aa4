"""The R-CNN fine-tuning sampler: labels as intervals of the max IoU, batch composition, flips, and the
batch source on the real chess data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.box_coder import BoxCoder
from detector.training.sampler import (
    FG_BALANCE,
    IGNORE,
    LabelledRegions,
    SamplerConfig,
    flip_boxes,
    label_regions,
    regression_mask,
    sample_regions,
)

GT = np.array([[0, 0, 10, 10]], np.float32)  # area 100


def box_with_iou(iou: float) -> np.ndarray:
    """A box [0, 0, 10, 10 * k] nested in or containing the gt: IoU = min(k, 1/k), so k = iou (k <= 1)."""
    return np.array([0, 0, 10, 10 * iou], np.float32)


def test_labels_follow_the_iou_intervals():
    config = SamplerConfig(add_gt=False)  # fg [0.5, 1], bg [0.1, 0.5), ignored [0, 0.1)
    ious = [1.0, 0.5, 0.49, 0.1, 0.09, 0.0]
    proposals = np.stack([box_with_iou(i) if i > 0 else np.array([50, 50, 60, 60], np.float32) for i in ious])
    regions = label_regions(proposals, GT, np.array([7]), config)
    np.testing.assert_allclose(regions.max_iou, ious, atol=1e-6)
    # IoU 1 and 0.5 are foreground (class 7); 0.49 and 0.1 background; 0.09 and 0 in neither interval
    assert regions.labels.tolist() == [7, 7, 0, 0, IGNORE, IGNORE]
    np.testing.assert_array_equal(regions.matched_gt[0], GT[0])


def test_background_from_zero_iou_when_configured():
    config = SamplerConfig(add_gt=False, bg_iou_low=0.0)  # background: max IoU in [0, 0.5)
    regions = label_regions(np.array([[50, 50, 60, 60]], np.float32), GT, np.array([3]), config)
    assert regions.labels.tolist() == [0]


def test_ground_truth_is_added_as_positive_and_picks_the_best_match():
    gts = np.array([[0, 0, 10, 10], [100, 100, 120, 120]], np.float32)
    proposals = np.array([[100, 100, 120, 118]], np.float32)  # IoU 0.9 with the second box only
    regions = label_regions(proposals, gts, np.array([2, 5]), SamplerConfig())
    assert len(regions) == 3  # the 2 gt boxes first, then the proposal
    assert regions.labels.tolist() == [2, 5, 5]
    np.testing.assert_allclose(regions.max_iou, [1.0, 1.0, 0.9], atol=1e-6)


def test_crowd_boxes_are_neither_positive_nor_background():
    gts = np.array([[0, 0, 10, 10], [100, 100, 200, 200]], np.float32)
    proposals = np.array([[100, 100, 200, 180],  # IoU 0.8 with the crowd box: ignored, not class 4
                          [100, 100, 150, 120]], np.float32)  # IoU 0.1 with the crowd: not background
    regions = label_regions(proposals, gts, np.array([1, 4]), SamplerConfig(), ignore_gt=np.array([False, True]))
    assert len(regions) == 3  # only the counted gt box is added
    assert regions.labels.tolist() == [1, IGNORE, IGNORE]


def test_image_without_objects_gives_background_only_in_the_interval():
    regions = label_regions(np.array([[0, 0, 5, 5]], np.float32), np.zeros((0, 4), np.float32),
                            np.zeros(0, np.int64), SamplerConfig(bg_iou_low=0.0))
    assert regions.labels.tolist() == [0]
    regions = label_regions(np.array([[0, 0, 5, 5]], np.float32), np.zeros((0, 4), np.float32),
                            np.zeros(0, np.int64), SamplerConfig())
    assert regions.labels.tolist() == [IGNORE]  # max IoU 0 is outside [0.1, 0.5)


def _regions(num_fg: int, num_bg: int, num_ignored: int):
    from detector.training.sampler import LabelledRegions

    labels = np.array([3] * num_fg + [0] * num_bg + [IGNORE] * num_ignored, np.int64)
    n = len(labels)
    return LabelledRegions(np.tile(GT, (n, 1)), labels, np.zeros(n, np.float32), np.zeros((n, 4), np.float32))


def test_batch_has_the_requested_foreground_share():
    config = SamplerConfig()  # 128 regions from 2 images: 64 per image, 16 foreground
    assert (config.regions_per_image, config.fg_per_image) == (64, 16)
    regions = _regions(num_fg=40, num_bg=200, num_ignored=30)
    keep = sample_regions(regions, config.regions_per_image, config.fg_per_image, np.random.default_rng(0))
    labels = regions.labels[keep]
    assert len(keep) == 64 and len(set(keep.tolist())) == 64  # without replacement
    assert (labels > 0).sum() == 16 and (labels == 0).sum() == 48 and (labels != IGNORE).all()


def test_missing_foreground_is_filled_with_background():
    regions = _regions(num_fg=5, num_bg=100, num_ignored=0)
    keep = sample_regions(regions, 64, 16, np.random.default_rng(1))
    labels = regions.labels[keep]
    assert (labels > 0).sum() == 5 and (labels == 0).sum() == 59


def test_few_regions_give_a_smaller_batch():
    regions = _regions(num_fg=2, num_bg=3, num_ignored=10)
    keep = sample_regions(regions, 64, 16, np.random.default_rng(2))
    assert sorted(keep.tolist()) == [0, 1, 2, 3, 4]


def test_sampling_is_deterministic_per_generator():
    regions = _regions(num_fg=50, num_bg=500, num_ignored=0)
    a = sample_regions(regions, 64, 16, np.random.default_rng(5))
    b = sample_regions(regions, 64, 16, np.random.default_rng(5))
    c = sample_regions(regions, 64, 16, np.random.default_rng(6))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_class_balance_gives_each_class_in_the_image_an_equal_share():
    # one image: 6 regions of class 1 (a small object), 150 of class 2 (many objects), 30 of class 3 (a
    # large one), 500 background; 15 foreground drawn per batch
    labels = np.array([1] * 6 + [2] * 150 + [3] * 30 + [0] * 500)
    n = len(labels)
    regions = LabelledRegions(np.zeros((n, 4), np.float32), labels, np.zeros(n, np.float32),
                              np.zeros((n, 4), np.float32))
    rng = np.random.default_rng(0)
    counts = {balance: np.zeros(4) for balance in FG_BALANCE}
    for _ in range(400):
        for balance in FG_BALANCE:
            keep = sample_regions(regions, 64, 15, rng, balance)
            assert len(set(keep.tolist())) == 64 and (labels[keep] > 0).sum() == 15  # the shares stay
            counts[balance] += np.bincount(labels[keep], minlength=4)
    uniform, balanced = counts["none"][1:] / 400, counts["class"][1:] / 400
    # uniform: by the regions' counts (15 * 6 / 186 = 0.48 of class 1); balanced: each class 1/3 of the
    # draw by weight (without replacement the 6 regions of class 1 cap it below 5: about 3.9 measured)
    np.testing.assert_allclose(uniform, 15 * np.array([6, 150, 30]) / 186, rtol=0.1)
    assert balanced[0] > 6 * uniform[0] and balanced[1] < 0.5 * uniform[1]
    assert abs(balanced[1] - balanced[2]) < 1.0  # the two plentiful classes split the rest evenly
    with pytest.raises(ValueError, match="fg_balance"):
        SamplerConfig(fg_balance="object")


def test_flip_mirrors_about_the_image_width():
    boxes = np.array([[10, 5, 30, 25]], np.float32)
    flipped = flip_boxes(boxes, width=100)  # x1' = 100 - 30, x2' = 100 - 10
    np.testing.assert_array_equal(flipped, [[70, 5, 90, 25]])
    np.testing.assert_array_equal(flip_boxes(flipped, 100), boxes)


def test_regression_mask_uses_its_own_interval():
    config = SamplerConfig(add_gt=False)  # regression on IoU in [0.6, 1]
    proposals = np.stack([box_with_iou(0.6), box_with_iou(0.59), box_with_iou(0.9)])
    regions = label_regions(proposals, GT, np.array([1]), config)
    assert regions.labels.tolist() == [1, 1, 1]
    assert regression_mask(regions, config).tolist() == [True, False, True]


def test_invalid_thresholds_are_refused():
    with pytest.raises(ValueError, match="thresholds"):
        SamplerConfig(bg_iou_high=0.6, fg_iou=0.5)


def test_batch_source_on_chess(chess):
    from detector.data import read_coco
    from detector.training.data import RegionBatchSource, RegionDataConfig

    dataset = read_coco(chess / "valid" / "_annotations.coco.json")
    dataset.records = dataset.records[:4]

    def proposals(record, image):
        # jittered copies of the ground truth plus a coarse grid: both foreground and background exist
        rng = np.random.default_rng(int(record.image_id))
        jitter = record.gt_boxes + rng.normal(0, 15, record.gt_boxes.shape).astype(np.float32)
        h, w = image.shape[:2]
        grid = np.array([[x, y, x + 200, y + 300] for x in range(0, w - 200, 150) for y in range(0, h - 300, 150)],
                        np.float32)
        return np.concatenate([jitter, grid])

    config = SamplerConfig(regions_per_batch=32, images_per_batch=2, bg_iou_low=0.0)  # bg: IoU in [0, 0.5)
    data = RegionDataConfig(input_size=64)
    source = RegionBatchSource(dataset, proposals, config, data)
    batch = source.batch(3)
    assert batch["crops"].shape == (32, 3, 64, 64) and batch["crops"].dtype == torch.float32
    labels = batch["labels"]
    for part in (labels[:16], labels[16:]):  # per image: up to 4 foreground first, background fills the rest
        num_fg = int((part > 0).sum())
        assert 1 <= num_fg <= 4 and (part[:num_fg] > 0).all() and (part[num_fg:] == 0).all()
    assert not batch["regress"][labels == 0].any()
    assert batch["regress"].any() and torch.isfinite(batch["box_targets"]).all()
    assert (batch["box_targets"][~batch["regress"]] == 0).all()
    again = source.batch(3)
    assert all(torch.equal(batch[k], again[k]) for k in batch)  # a pure function of the iteration
    # two ranks read disjoint images of the same global batch
    r0 = RegionBatchSource(dataset, proposals, config, data, rank=0, world_size=2).image_indices(0)
    r1 = RegionBatchSource(dataset, proposals, config, data, rank=1, world_size=2).image_indices(0)
    assert sorted(r0 + r1) == [0, 1, 2, 3]
    # one epoch visits every image once
    seen = sum((source.image_indices(i) for i in range(2)), [])
    assert sorted(seen) == [0, 1, 2, 3]


def test_regression_targets_decode_back_to_the_ground_truth():
    # a region's target is the box coder's encoding of its matched gt; decoding must give that gt back
    config = SamplerConfig(add_gt=False)
    proposals = np.array([[1, 0, 11, 9], [0, 1, 10, 12]], np.float32)
    regions = label_regions(proposals, GT, np.array([1]), config)
    coder = BoxCoder()
    targets = coder.encode(regions.matched_gt, regions.boxes)
    np.testing.assert_allclose(coder.decode(targets, regions.boxes), np.tile(GT, (2, 1)), atol=1e-4)
