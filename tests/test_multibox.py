"""MultiBox: Hungarian matching, the loss, decoding, the network and its checkpoints."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detector.base.errors import UserError
from detector.training.multibox_data import to_input
from proposals.multibox import (
    MultiBox,
    MultiBoxConfig,
    MultiBoxOutput,
    decode_proposals,
    load_multibox,
    match,
    multibox_loss,
    preprocess_images,
    save_multibox,
)

pytestmark = pytest.mark.numeric  # the MultiBox loss, network and decoding compared with hand-computed values (select with -m numeric)

LOG2 = math.log(2.0)


def test_match_pairs_each_ground_truth_with_its_own_prediction():
    # Predictions 0 and 1 sit exactly on ground truths 1 and 0; prediction 2 is elsewhere.
    gt = torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9]])
    pred = torch.tensor([[0.5, 0.5, 0.9, 0.9], [0.1, 0.1, 0.3, 0.3], [0.0, 0.6, 0.2, 1.0]])
    rows, cols = match(pred, torch.zeros(3), gt)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 1, 1: 0}


def test_match_trades_location_against_confidence_through_alpha():
    # One ground truth g. Prediction 0 is exactly on g with logit -2: cost 0 - (-2) = 2.
    # Prediction 1 is 0.5 off in each coordinate (||l - g||^2 = 1) with logit 0: cost alpha/2 * 1 - 0.
    # alpha = 0.3: 0.15 < 2, prediction 1 wins; alpha = 10: 5 > 2, prediction 0 wins.
    gt = torch.tensor([[0.2, 0.2, 0.4, 0.4]])
    pred = torch.tensor([[0.2, 0.2, 0.4, 0.4], [0.7, 0.7, 0.9, 0.9]])
    logits = torch.tensor([-2.0, 0.0])
    assert match(pred, logits, gt, alpha=0.3)[0].tolist() == [1]
    assert match(pred, logits, gt, alpha=10.0)[0].tolist() == [0]


def test_match_is_the_minimum_cost_assignment_by_brute_force():
    # The cost written out with log-sigmoids (not the -c identity match() uses), minimized by trying every
    # injective assignment of 3 ground truths to 6 predictions (120 of them).
    rng = np.random.default_rng(0)
    for trial in range(5):
        pred = torch.tensor(rng.uniform(0, 1, (6, 4)))
        gt = torch.tensor(rng.uniform(0, 1, (3, 4)))
        logits = torch.tensor(rng.normal(0, 2, 6))
        alpha = 0.3

        def cost(i, j, pred=pred, gt=gt, logits=logits, alpha=alpha):
            c = logits[i]
            return (alpha / 2 * float(((pred[i] - gt[j]) ** 2).sum())
                    - float(F.logsigmoid(c)) + float(F.logsigmoid(c) - c))  # log(1 - sigmoid(c))

        best = min(sum(cost(i, j) for j, i in enumerate(perm)) for perm in itertools.permutations(range(6), 3))
        rows, cols = match(pred, logits, gt, alpha)
        assert sorted(cols.tolist()) == [0, 1, 2], trial
        assert sum(cost(i, j) for i, j in zip(rows, cols)) == pytest.approx(best, abs=1e-9)


def test_match_with_more_ground_truth_than_predictions_and_with_none():
    gt = torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.4, 0.4, 0.5, 0.5], [0.7, 0.7, 0.8, 0.8]])
    pred = torch.tensor([[0.4, 0.4, 0.5, 0.5], [0.7, 0.7, 0.8, 0.8]])
    rows, cols = match(pred, torch.zeros(2), gt)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 2}
    rows, cols = match(pred, torch.zeros(2), torch.zeros((0, 4)))
    assert len(rows) == len(cols) == 0


def test_loss_by_hand():
    # Image 0: one ground truth g; prediction 0 is g shifted by 0.1 in x1, prediction 1 is far; logits 0.
    #   matched: prediction 0. location = alpha/2 * 0.1^2 = 0.0015; confidence = BCE(0, 1) + BCE(0, 0) = 2 log 2.
    # Image 1: no ground truth, logits 0: location 0, confidence 2 log 2.
    # Batch means: location 0.00075, confidence 2 log 2.
    gt = torch.tensor([[0.2, 0.2, 0.4, 0.4]])
    boxes = torch.tensor([[[0.3, 0.2, 0.4, 0.4], [0.8, 0.8, 1.0, 1.0]],
                          [[0.3, 0.2, 0.4, 0.4], [0.8, 0.8, 1.0, 1.0]]], requires_grad=True)
    logits = torch.zeros(2, 2, requires_grad=True)
    loss = multibox_loss(MultiBoxOutput(boxes, logits), [gt, torch.zeros((0, 4))], alpha=0.3)
    assert float(loss.location.detach()) == pytest.approx(0.00075)
    assert float(loss.confidence.detach()) == pytest.approx(2 * LOG2)
    assert float(loss.total.detach()) == pytest.approx(0.00075 + 2 * LOG2)
    assert loss.num_matched == 1
    loss.total.backward()
    # d/dx1 of (1/B) alpha/2 (x1 - g)^2 = alpha (x1 - g) / B = 0.3 * 0.1 / 2; other boxes get no gradient.
    assert float(boxes.grad[0, 0, 0]) == pytest.approx(0.015)
    assert float(boxes.grad[0, 1].abs().sum()) == 0.0 and float(boxes.grad[1].abs().sum()) == 0.0
    # d/dc BCE(c, t) = sigmoid(c) - t, over B = 2: matched -0.25, others +0.25.
    np.testing.assert_allclose(logits.grad.numpy(), [[-0.25, 0.25], [0.25, 0.25]], atol=1e-7)


def test_loss_matching_to_priors_uses_the_priors_locations_only():
    # Prediction 0 has drifted onto g and is confident (logit 10), but prior 1 is the one on g: prior
    # matching ignores predictions and confidences, makes prediction 1 the positive, and its location
    # error (0.5 in x1 and x2: ||.||^2 = 0.5) enters the loss: alpha/2 * 0.5 = 0.075.
    gt = torch.tensor([[0.2, 0.2, 0.4, 0.4]])
    boxes = torch.tensor([[[0.2, 0.2, 0.4, 0.4], [0.7, 0.2, 0.9, 0.4]]])
    logits = torch.tensor([[10.0, -10.0]])
    priors = torch.tensor([[0.6, 0.6, 0.9, 0.9], [0.2, 0.2, 0.4, 0.4]])
    on_predictions = multibox_loss(MultiBoxOutput(boxes, logits), [gt], alpha=0.3)
    on_priors = multibox_loss(MultiBoxOutput(boxes, logits), [gt], alpha=0.3, priors_xyxy=priors)
    assert float(on_predictions.location) == pytest.approx(0.0)
    assert float(on_priors.location) == pytest.approx(0.075)
    # confidence targets follow the match: BCE(10, 0) + BCE(-10, 1) = 2 * softplus(10)
    assert float(on_priors.confidence) == pytest.approx(2 * float(F.softplus(torch.tensor(10.0))))
    assert match(priors, None, gt)[0].tolist() == [1]


def test_decode_clips_scales_suppresses_and_ranks():
    # A 100 x 200 (h x w) image. Normalized boxes and logits:
    #   0: [0.1, 0.1, 0.5, 0.5], logit 3 -> best; pixels [20, 10, 100, 50]
    #   1: box 0 shifted by 0.02 in x: IoU 0.905 with box 0 > 0.7 -> suppressed
    #   2: [0.3, 0.1, 0.7, 0.5], IoU with box 0: overlap 0.2 / union 0.6 = 0.333 <= 0.7 -> kept
    #   3: [-0.2, 0.6, 0.3, 1.4] -> clipped to [0, 0.6, 0.3, 1.0] -> pixels [0, 60, 60, 100]
    #   4: [1.1, 0.2, 1.3, 0.4] lies right of the image: no area after clipping -> dropped
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.52, 0.5], [0.3, 0.1, 0.7, 0.5],
                          [-0.2, 0.6, 0.3, 1.4], [1.1, 0.2, 1.3, 0.4]])
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, 5.0])
    pixels, scores = decode_proposals(boxes, logits, (100, 200), nms_iou=0.7, top_k=10)
    assert pixels.dtype == np.float32 and scores.dtype == np.float32
    np.testing.assert_allclose(pixels, [[20, 10, 100, 50], [60, 10, 140, 50], [0, 60, 60, 100]], atol=1e-4)
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-np.array([3.0, 1.0, 0.0]))), rtol=1e-6)
    pixels, _ = decode_proposals(boxes, logits, (100, 200), nms_iou=0.7, top_k=2)
    assert len(pixels) == 2
    pixels, _ = decode_proposals(boxes, logits, (100, 200), nms_iou=0.95, top_k=10)
    assert len(pixels) == 4  # 0.905 is in [0, 0.95]: box 1 survives


def _tiny_config(**changes) -> MultiBoxConfig:
    base = dict(num_priors=12, input_size=64, trunk_end="inception3b", head_channels=8, head_grid=2,
                head_hidden=16, top_k=5)
    return MultiBoxConfig(**{**base, **changes})


def _priors(k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(0.2, 0.8, (k, 2)), rng.uniform(0.05, 0.3, (k, 2))]).astype(np.float32)


def test_network_starts_at_the_priors_with_the_expected_confidence():
    torch.manual_seed(0)
    model = MultiBox(_tiny_config(), _priors(12), expected_per_image=3.0).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.boxes.shape == (2, 12, 4) and out.logits.shape == (2, 12)
    assert float((out.boxes - model.prior_boxes()[None]).abs().max().detach()) < 0.05
    np.testing.assert_allclose(torch.sigmoid(out.logits).detach().numpy(), 3.0 / 12, atol=0.02)


def test_propose_returns_pixel_boxes_inside_the_image_best_first():
    torch.manual_seed(0)
    model = MultiBox(_tiny_config(), _priors(12))
    images = [np.random.default_rng(i).integers(0, 256, (90 + 10 * i, 130, 3), dtype=np.uint8) for i in range(3)]
    results = model.propose(images, batch_size=2)
    assert model.training  # propose() restores the mode it found
    for image, (boxes, scores) in zip(images, results):
        h, w = image.shape[:2]
        assert boxes.dtype == np.float32 and boxes.shape[1] == 4 and 1 <= len(boxes) <= 5
        assert np.all(boxes[:, [0, 2]] >= 0) and np.all(boxes[:, [0, 2]] <= w)
        assert np.all(boxes[:, [1, 3]] >= 0) and np.all(boxes[:, [1, 3]] <= h)
        assert np.all(np.diff(scores) <= 0)


def test_training_batches_and_inference_preprocess_alike():
    # The training data resize the image once to S x S (uint8) and normalize on the device; inference
    # does both in preprocess_images: the network must see the same numbers.
    import cv2

    config = _tiny_config()
    image = np.random.default_rng(3).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    small = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA)
    via_training = to_input(torch.from_numpy(small[None]), config.mean, config.std)
    torch.testing.assert_close(preprocess_images([image], config), via_training)


def test_checkpoint_round_trip_keeps_priors_and_outputs(tmp_path):
    torch.manual_seed(1)
    model = MultiBox(_tiny_config(), _priors(12, seed=4)).eval()
    x = torch.randn(1, 3, 64, 64)
    save_multibox(tmp_path / "mb.safetensors", model)
    loaded = load_multibox(tmp_path / "mb.json")
    assert loaded.config == model.config
    torch.testing.assert_close(loaded.priors, model.priors)
    torch.testing.assert_close(loaded(x).boxes, model(x).boxes)
    save_multibox(tmp_path / "half.safetensors", model, half=True)
    half = load_multibox(tmp_path / "half.safetensors")
    torch.testing.assert_close(half.priors, model.priors, rtol=0, atol=0)  # priors are never rounded
    assert float((half(x).boxes - model(x).boxes).abs().max()) < 1e-2


def test_loading_a_checkpoint_of_another_kind_is_a_user_error(tmp_path):
    from detector.base.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, {"kind": "detector"})
    with pytest.raises(UserError, match="not a MultiBox checkpoint"):
        load_multibox(tmp_path / "other.safetensors")


def test_backbone_weights_from_a_local_file(tmp_path):
    from torchvision.models import googlenet

    torch.manual_seed(2)
    reference = googlenet(weights=None, aux_logits=False, init_weights=True)
    torch.save(reference.state_dict(), tmp_path / "googlenet.pth")
    model = MultiBox(_tiny_config(), _priors(12), backbone_weights=tmp_path / "googlenet.pth")
    torch.testing.assert_close(model.trunk[0].conv.weight, reference.conv1.conv.weight)
    torch.testing.assert_close(model.trunk[-1].branch1.conv.weight, reference.inception3b.branch1.conv.weight)
    (tmp_path / "broken.pth").write_bytes(b"not a state dict")
    with pytest.raises(UserError, match="unreadable"):
        MultiBox(_tiny_config(), _priors(12), backbone_weights=tmp_path / "broken.pth")
