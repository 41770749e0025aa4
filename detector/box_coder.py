"""R-CNN's box parameterization: regression targets between a proposal and a box, and back.

For a proposal ``P`` (centre ``px, py``, size ``pw, ph``) and a box ``G`` (R-CNN, Girshick et al. 2014,
appendix C)::

    dx = (gx - px) / pw      dy = (gy - py) / ph      dw = log(gw / pw)      dh = log(gh / ph)

The targets are divided by their typical spread ``(0.1, 0.1, 0.2, 0.2)`` so that all four have roughly
unit variance; :class:`BoxCoder` stores the inverse, ``weights = (10, 10, 5, 5)``, and multiplies.

Boxes are the project's convention (:mod:`detector.base.boxes`): ``xyxy`` in continuous pixels, so a width
is ``x2 - x1`` (no "+1").
"""

from __future__ import annotations

import math

import numpy as np
import torch

from detector.base.defaults import BOX_CODER_WEIGHTS

# Largest allowed dw, dh after un-weighting: a box may grow at most 1000/16 = 62.5 times per side in
# one step, which keeps exp() finite for any network output.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _as_tensor(x) -> tuple[torch.Tensor, bool]:
    if isinstance(x, torch.Tensor):
        return x, False
    return torch.as_tensor(np.asarray(x, dtype=np.float32)), True


class BoxCoder:
    """Encode boxes as deltas relative to proposals and decode them back.

    weights: ``(wx, wy, ww, wh)``, the factors applied to ``(dx, dy, dw, dh)``; ``(10, 10, 5, 5)`` is
        R-CNN's normalization by ``(0.1, 0.1, 0.2, 0.2)``.
    scale_clamp: ``dw``, ``dh`` (after dividing by the weights) are clamped to ``(-inf, scale_clamp]``.

    Both methods take numpy arrays or tensors and return the same kind.
    """

    def __init__(self, weights: tuple[float, float, float, float] = BOX_CODER_WEIGHTS,
                 scale_clamp: float = DEFAULT_SCALE_CLAMP):
        if len(weights) != 4 or any(w <= 0 for w in weights):
            raise ValueError(f"BoxCoder weights must be 4 positive numbers, got {weights!r}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights})"

    def encode(self, gt_boxes, proposals):
        """Regression targets of ``gt_boxes`` relative to ``proposals``.

        gt_boxes, proposals: float ``(N, 4)`` xyxy, pixels; proposals must have positive width and height.
        Returns: float32 ``(N, 4)`` weighted deltas ``(wx*dx, wy*dy, ww*dw, wh*dh)``.
        """
        g, g_np = _as_tensor(gt_boxes)
        p, _ = _as_tensor(proposals)
        g = g.float().reshape(-1, 4)
        p = p.to(g.device).float().reshape(-1, 4)
        pw = p[:, 2] - p[:, 0]
        ph = p[:, 3] - p[:, 1]
        px = p[:, 0] + 0.5 * pw
        py = p[:, 1] + 0.5 * ph
        gw = g[:, 2] - g[:, 0]
        gh = g[:, 3] - g[:, 1]
        gx = g[:, 0] + 0.5 * gw
        gy = g[:, 1] + 0.5 * gh
        wx, wy, ww, wh = self.weights
        deltas = torch.stack([wx * (gx - px) / pw, wy * (gy - py) / ph,
                              ww * torch.log(gw / pw), wh * torch.log(gh / ph)], dim=1)
        return deltas.numpy() if g_np else deltas

    def decode(self, deltas, proposals):
        """Apply deltas to proposals.

        deltas: float ``(N, 4 * K)``, ``K`` sets of weighted deltas per proposal (``K = 1`` or one per
            class, as the classifier's ``box_deltas``).
        proposals: float ``(N, 4)`` xyxy, pixels.
        Returns: float32 ``(N, 4 * K)`` xyxy boxes, pixels, not clipped (see
            :func:`detector.base.boxes.clip_boxes`).
        """
        d, d_np = _as_tensor(deltas)
        p, _ = _as_tensor(proposals)
        d = d.float()
        num = d.shape[0]
        d = d.reshape(num, d.shape[-1] // 4, 4)
        p = p.to(d.device).float().reshape(-1, 1, 4)
        pw = p[..., 2] - p[..., 0]
        ph = p[..., 3] - p[..., 1]
        px = p[..., 0] + 0.5 * pw
        py = p[..., 1] + 0.5 * ph
        wx, wy, ww, wh = self.weights
        dx = d[..., 0] / wx
        dy = d[..., 1] / wy
        dw = (d[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (d[..., 3] / wh).clamp(max=self.scale_clamp)
        cx = px + dx * pw
        cy = py + dy * ph
        half_w = 0.5 * pw * torch.exp(dw)
        half_h = 0.5 * ph * torch.exp(dh)
        boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1).reshape(num, d.shape[1] * 4)
        return boxes.numpy() if d_np else boxes


def select_class_deltas(deltas, labels):
    """Pick each row's 4 deltas for its own class from class-specific deltas.

    deltas: float ``(N, 4 * C)``; columns ``4*(c-1) .. 4*(c-1)+3`` belong to label ``c`` in ``1..C``.
    labels: int ``(N,)`` in ``0..C``; background (0) rows get zero deltas (the proposal is kept).
    Returns: float ``(N, 4)``, the same kind (numpy or tensor) as ``deltas``.
    """
    d, d_np = _as_tensor(deltas)
    lab = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    lab = lab.to(d.device).long().reshape(-1)
    num = d.shape[0]
    per_class = d.reshape(num, d.shape[-1] // 4, 4)
    if lab.numel() and (lab.min() < 0 or lab.max() > per_class.shape[1]):
        raise ValueError(f"labels must be in 0..{per_class.shape[1]}, got {int(lab.min())}..{int(lab.max())}")
    picked = per_class[torch.arange(num, device=d.device), (lab - 1).clamp(min=0)]
    picked = torch.where((lab > 0)[:, None], picked, torch.zeros_like(picked))
    return picked.numpy() if d_np else picked
