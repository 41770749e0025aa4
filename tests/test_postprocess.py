"""Post-processing: threshold, clipping, per-class NMS against a brute-force greedy NMS, top-k."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from detector.base.boxes import box_iou
from detector.postprocess import PostprocessConfig, postprocess


def brute_force_detections(probs, class_boxes, image_size, config):
    """R-CNN's greedy NMS written out: per class, visit boxes by falling score and keep one unless a
    kept box of that class overlaps it with IoU > nms_iou; then the top max_detections overall."""
    h, w = image_size
    num_classes = probs.shape[1] - 1
    boxes = class_boxes.reshape(len(probs), num_classes, 4)
    found = []
    for c in range(num_classes):
        cand = []
        for r in range(len(probs)):
            s = probs[r, c + 1]
            b = np.clip(boxes[r, c], [0, 0, 0, 0], [w, h, w, h])
            if s >= config.score_threshold and b[2] > b[0] and b[3] > b[1]:
                cand.append((s, b))
        cand.sort(key=lambda t: -t[0])
        kept = []
        for s, b in cand:
            if all(box_iou(b[None], k[None])[0, 0] <= config.nms_iou for _, k in kept):
                kept.append((s, b))
        found += [(s, c + 1, tuple(b)) for s, b in kept]
    found.sort(key=lambda t: -t[0])
    return found[: config.max_detections]


def test_hand_built_case():
    # 3 regions, 2 classes; region boxes per class given directly (no decoding here)
    probs = torch.tensor([[0.1, 0.8, 0.1],
                          [0.2, 0.7, 0.1],
                          [0.5, 0.01, 0.49]])
    boxes = torch.tensor([[[0, 0, 10, 10], [0, 0, 10, 10]],
                          [[1, 0, 11, 10], [1, 0, 11, 10]],      # IoU with region 0 = 90/110 > 0.3
                          [[50, 50, 60, 60], [0, 0, 10, 10]]], dtype=torch.float32)
    kept = postprocess(probs, boxes, (100, 100), PostprocessConfig(score_threshold=0.05))
    # class 1: region 1 suppressed by region 0; region 2's 0.01 is under the threshold
    # class 2: regions 0, 1 score 0.1 and region 2 0.49 on the same box as region 0 -> 0.49 kept,
    #          region 0's box suppressed by it, region 1's overlaps it too (IoU 0.82)
    assert kept.labels.tolist() == [1, 2]
    np.testing.assert_allclose(kept.scores.numpy(), [0.8, 0.49])
    np.testing.assert_allclose(kept.boxes.numpy(), [[0, 0, 10, 10], [0, 0, 10, 10]])


def test_matches_brute_force_on_random_scenes():
    rng = np.random.default_rng(0)
    for trial in range(5):
        n, c = 60, 4
        xy = rng.uniform(-20, 180, (n, c, 2))
        wh = rng.uniform(5, 80, (n, c, 2))
        class_boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)  # some cross the border
        logits = rng.normal(0, 2, (n, c + 1))
        probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
        config = PostprocessConfig(score_threshold=0.1, nms_iou=[0.3, 0.5][trial % 2], max_detections=25)
        kept = postprocess(torch.from_numpy(probs), torch.from_numpy(class_boxes.reshape(n, 4 * c)),
                           (150, 200), config)
        expected = brute_force_detections(probs, class_boxes, (150, 200), config)
        assert len(kept.scores) == len(expected)
        np.testing.assert_allclose(kept.scores.numpy(), [e[0] for e in expected], rtol=1e-6)
        assert kept.labels.tolist() == [e[1] for e in expected]
        np.testing.assert_allclose(kept.boxes.numpy(), [e[2] for e in expected], atol=1e-4)


def test_clipping_drops_boxes_outside_and_one_box_for_all_classes():
    probs = torch.tensor([[0.0, 0.9, 0.1], [0.0, 0.5, 0.5]])
    boxes = torch.tensor([[-10, -10, 20, 30], [300, 300, 400, 400]], dtype=torch.float32)  # (N, 4)
    kept = postprocess(probs, boxes, (100, 200), PostprocessConfig(score_threshold=0.05))
    # the second box lies wholly outside a 200 x 100 image: no area after clipping
    assert kept.labels.tolist() == [1, 2]
    np.testing.assert_allclose(kept.boxes.numpy(), [[0, 0, 20, 30]] * 2)


def test_empty_and_config_checks():
    kept = postprocess(torch.zeros((0, 3)), torch.zeros((0, 8)), (10, 10))
    assert kept.boxes.shape == (0, 4) and kept.labels.shape == (0,)
    for bad in ({"score_threshold": 1.5}, {"nms_iou": -0.1}, {"max_detections": 0}):
        with pytest.raises(ValueError):
            PostprocessConfig(**bad)
    assert PostprocessConfig.from_dict(PostprocessConfig().to_dict()) == PostprocessConfig()


def test_box_voting_moves_each_kept_box_to_the_weighted_mean_of_its_class():
    # 4 regions, 2 classes, per-class NMS at 0.5; by hand (IoUs of 10 x 10 boxes shifted by d: (10 - d) / (10 + d))
    probs = torch.tensor([[0.4, 0.6, 0.0], [0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.1, 0.9, 0.0]])
    boxes = torch.tensor([[[0, 0, 10, 10], [0, 0, 10, 10]],
                          [[2, 0, 12, 10], [2, 0, 12, 10]],     # IoU with [0, 0, 10, 10]: 8 / 12 = 0.667
                          [[6, 0, 16, 10], [0, 0, 10, 10]],     # class 1: IoU 0.25 with region 0, 0.43 with 1
                          [[50, 50, 60, 60], [50, 50, 60, 60]]], dtype=torch.float32)
    config = PostprocessConfig(score_threshold=0.05, nms_iou=0.5)
    plain = postprocess(probs, boxes, (100, 100), config)
    voted = postprocess(probs, boxes, (100, 100), replace(config, box_voting=0.5))
    # kept: class 1 regions 3 (0.9), 0 (0.6), 2 (0.1; region 1 is suppressed by 0); class 2 region 2 (0.4;
    # region 1's 0.1 suppressed). Voting moves boxes only: the same scores, labels and order
    np.testing.assert_array_equal(voted.scores.numpy(), plain.scores.numpy())
    np.testing.assert_allclose(plain.scores.numpy(), [0.9, 0.6, 0.4, 0.1])
    assert voted.labels.tolist() == plain.labels.tolist() == [1, 1, 2, 1]
    np.testing.assert_allclose(plain.boxes.numpy(), [[50, 50, 60, 60], [0, 0, 10, 10], [0, 0, 10, 10], [6, 0, 16, 10]])
    expected = [[50, 50, 60, 60],  # alone
                # region 0 and the suppressed region 1 (IoU 0.667) vote: (0.6 * [0, 0, 10, 10] + 0.3 * [2, 0, 12, 10]) / 0.9
                [2 / 3, 0, 10 + 2 / 3, 10],
                # class 2: (0.4 * [0, 0, 10, 10] + 0.1 * [2, 0, 12, 10]) / 0.5; class 1's boxes do not vote
                [0.4, 0, 10.4, 10],
                [6, 0, 16, 10]]  # region 2, class 1: no other box of its class at IoU >= 0.5
    np.testing.assert_allclose(voted.boxes.numpy(), expected, atol=1e-5)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="box_voting"):
            PostprocessConfig(box_voting=bad)


def _detections(boxes, scores, labels, names):
    from detector.detections import Detections

    return Detections(boxes=np.array(boxes, np.float32), scores=np.array(scores, np.float32),
                      labels=np.array(labels, np.int64), class_names=tuple(names),
                      class_ids=np.array(labels, np.int64) + 100, image_size=(100, 100))


def test_agnostic_nms_keeps_the_best_of_overlapping_cross_class_boxes():
    from detector.postprocess import suppress_across_classes

    # one piece seen as bishop 0.9, pawn 0.6 and knight 0.3 (boxes a pixel apart: IoU 0.82 with the
    # bishop's, above 0.5), and a pawn elsewhere (IoU 0 with all of them)
    dets = _detections([[10, 10, 20, 20], [11, 10, 21, 20], [10, 11, 20, 21], [50, 50, 60, 60]],
                       [0.9, 0.6, 0.3, 0.5], [1, 2, 3, 2], ["bishop", "pawn", "knight", "pawn"])
    kept = suppress_across_classes(dets, 0.5)
    assert kept.class_names == ("bishop", "pawn") and kept.scores.tolist() == pytest.approx([0.9, 0.5])
    assert kept.class_ids.tolist() == [101, 102] and kept.boxes[1].tolist() == [50, 50, 60, 60]
    # IoU 0.82 is not in (0.9, 1]: at 0.9 all four stay
    assert len(suppress_across_classes(dets, 0.9)) == 4
    # the same against a brute-force greedy pass over every class at once
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 60, (40, 2))
    boxes = np.c_[xy, xy + rng.uniform(5, 30, (40, 2))]
    scores = np.sort(rng.uniform(0, 1, 40))[::-1]
    dets = _detections(boxes, scores, rng.integers(1, 4, 40), ["x"] * 40)
    kept_ref = []
    for i in range(40):
        if all(box_iou(boxes[i][None], boxes[k][None])[0, 0] <= 0.4 for k in kept_ref):
            kept_ref.append(i)
    assert suppress_across_classes(dets, 0.4).scores.tolist() == pytest.approx(scores[kept_ref].tolist())
    with pytest.raises(ValueError):
        suppress_across_classes(dets, 0.0)
