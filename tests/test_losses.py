"""The training loss: cross-entropy, auxiliary weight 0.3, smooth-L1 on the class-specific deltas."""

from __future__ import annotations

import math

import pytest
import torch

from detector.training.losses import LossConfig, class_specific_deltas, detection_loss

pytestmark = pytest.mark.numeric  # the detection loss compared with hand-computed values (select with -m numeric)


def test_cross_entropy_by_hand():
    # two classes + background; logits [0, ln 3, 0] give p(label 1) = 3 / 5 (hand computation)
    logits = torch.tensor([[0.0, math.log(3.0), 0.0]])
    loss, parts = detection_loss(logits, None, torch.tensor([1]))
    assert math.isclose(float(loss), -math.log(3 / 5), rel_tol=1e-6)
    assert parts["accuracy"] == 1.0 and parts["loss_box"] == 0.0


def test_auxiliary_losses_weigh_0_3_each():
    logits = torch.zeros(2, 4)  # uniform: CE = ln 4
    aux = (torch.zeros(2, 4), torch.zeros(2, 4))
    loss, parts = detection_loss(logits, None, torch.tensor([0, 2]), aux_logits=aux)
    assert math.isclose(parts["loss_aux"], 2 * math.log(4), rel_tol=1e-6)
    assert math.isclose(float(loss), math.log(4) * (1 + 0.3 * 2), rel_tol=1e-6)
    loss, _ = detection_loss(logits, None, torch.tensor([0, 2]), aux_logits=aux, config=LossConfig(aux_weight=0.0))
    assert math.isclose(float(loss), math.log(4), rel_tol=1e-6)


def test_class_specific_deltas_pick_the_label_columns():
    deltas = torch.arange(2 * 12, dtype=torch.float32).reshape(2, 12)  # C = 3 classes x 4
    picked = class_specific_deltas(deltas, torch.tensor([1, 3]))
    assert picked.tolist() == [[0, 1, 2, 3], [20, 21, 22, 23]]  # row 0 cols 0..3, row 1 cols 8..11


def test_smooth_l1_on_regression_regions_averaged_over_the_batch():
    logits = torch.zeros(4, 3)
    labels = torch.tensor([1, 2, 0, 2])
    deltas = torch.zeros(4, 8)
    deltas[0, 0:4] = torch.tensor([0.5, 0.0, 0.0, 0.0])  # class 1 of row 0: |d| = 0.5 < 1 -> 0.5 * 0.25 = 0.125
    deltas[1, 4:8] = torch.tensor([0.0, 3.0, 0.0, 0.0])  # class 2 of row 1: |d| = 3 >= 1 -> 3 - 0.5 = 2.5
    deltas[3, 4:8] = torch.tensor([9.0, 9.0, 9.0, 9.0])  # row 3 is not a regression region: not counted
    targets = torch.zeros(4, 4)
    regress = torch.tensor([True, True, False, False])
    _, parts = detection_loss(logits, deltas, labels, targets, regress)
    # (0.125 + 2.5) / 4 regions in the batch (Fast R-CNN normalization)
    assert math.isclose(parts["loss_box"], (0.125 + 2.5) / 4, rel_tol=1e-6)
    loss, _ = detection_loss(logits, deltas, labels, targets, regress, config=LossConfig(box_weight=2.0))
    assert math.isclose(float(loss), math.log(3) + 2.0 * (0.125 + 2.5) / 4, rel_tol=1e-6)


def test_gradients_reach_only_the_chosen_deltas():
    logits = torch.zeros(2, 3, requires_grad=True)
    deltas = torch.zeros(2, 8, requires_grad=True)
    loss, _ = detection_loss(logits, deltas, torch.tensor([2, 1]), torch.ones(2, 4), torch.tensor([True, False]))
    loss.backward()
    grad = deltas.grad
    assert grad[0, 4:8].abs().sum() > 0  # row 0, class 2
    assert grad[0, :4].abs().sum() == 0 and grad[1].abs().sum() == 0


def test_no_regression_regions_gives_zero_box_loss_and_full_graph():
    deltas = torch.zeros(2, 8, requires_grad=True)
    loss, parts = detection_loss(torch.zeros(2, 3), deltas, torch.tensor([0, 0]), torch.zeros(2, 4),
                                 torch.tensor([False, False]))
    loss.backward()
    assert parts["loss_box"] == 0.0 and deltas.grad is not None
    assert math.isnan(parts["fg_accuracy"])
