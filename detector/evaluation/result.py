"""The typed result every evaluator returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class EvalResult:
    """Average precision of one evaluation.

    protocol: ``"ilsvrc"``, ``"voc"`` or ``"coco"``.
    variant: how AP was computed, e.g. ``"all-point (ILSVRC devkit)"``, ``"11-point (VOC2007)"``.
    mAP: the mean of ``ap`` (for COCO: AP at IoU .50:.95, all areas, 100 detections).
    ap: AP per dataset class id, for the classes that have positives.
    positives: number of positives per dataset class id (only classes in ``ap``).
    class_names: dataset class id -> name (every class of the vocabulary).
    num_images: images evaluated.
    num_predictions: predictions on those images (predictions naming other images are not counted).
    curves: dataset class id -> ``(recall, precision)`` float64 arrays in rank order (for plots; not in JSON).
    extra: protocol-specific numbers for JSON (e.g. COCO's 12 stats, dropped/ignored prediction counts).
    """

    protocol: str
    variant: str
    mAP: float
    ap: dict[int, float]
    positives: dict[int, int]
    class_names: dict[int, str]
    num_images: int
    num_predictions: int
    curves: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False, compare=False)
    extra: dict = field(default_factory=dict)

    @property
    def median_ap(self) -> float:
        return float(np.median(list(self.ap.values()))) if self.ap else 0.0

    def to_dict(self) -> dict:
        """The JSON document: protocol, variant, mAP, ap (keys are class ids as strings), counts, extras."""
        out = {
            "protocol": self.protocol,
            "variant": self.variant,
            "mAP": float(self.mAP),
            "median_ap": self.median_ap,
            "ap": {str(cid): float(v) for cid, v in sorted(self.ap.items())},
            "positives": {str(cid): int(v) for cid, v in sorted(self.positives.items())},
            "class_names": {str(cid): self.class_names[cid] for cid in sorted(self.ap)},
            "num_images": int(self.num_images),
            "num_predictions": int(self.num_predictions),
        }
        out.update(self.extra)
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self, max_rows: int | None = None) -> str:
        """A readable per-class table: rows ``id  name  positives  AP`` (class id order), the mean and median.

        max_rows: show at most this many rows (the first and last halves), ``None`` for all.
        """
        ids = sorted(self.ap)
        width = max([len("name")] + [len(self.class_names.get(c, "")) for c in ids])
        lines = [f"{self.protocol} evaluation: {self.variant}",
                 f"{'id':>5}  {'name':<{width}}  {'positives':>9}  {'AP':>8}"]
        shown = ids
        if max_rows is not None and len(ids) > max_rows:
            half = max(max_rows // 2, 1)
            shown = ids[:half] + [None] + ids[-half:]
        for cid in shown:
            if cid is None:
                lines.append(f"{'...':>5}  ({len(ids) - 2 * half} classes)")
                continue
            lines.append(f"{cid:>5}  {self.class_names.get(cid, ''):<{width}}  {self.positives.get(cid, 0):>9}  "
                         f"{self.ap[cid]:8.6f}")
        lines.append(f"{'':>5}  {'mean AP':<{width}}  {sum(self.positives.values()):>9}  {self.mAP:8.6f}")
        lines.append(f"{'':>5}  {'median AP':<{width}}  {'':>9}  {self.median_ap:8.6f}")
        lines.append(f"{len(ids)} classes with positives, {self.num_images} images, "
                     f"{self.num_predictions} predictions")
        stats = self.extra.get("stats")
        if stats:
            lines.append("COCO: " + "  ".join(f"{k}={v:.3f}" for k, v in stats.items()))
        return "\n".join(lines)
