"""How well proposals cover ground truth: recall at an IoU, MABO, and recall against proposal count.

Definitions (as in Uijlings et al. 2013 and Hosang et al., "What makes for effective detection
proposals?", 2015):

- best overlap of a ground-truth box: the largest IoU of any proposal with it (0 with no proposals);
- recall at IoU t: the fraction of ground-truth boxes whose best overlap is at least t;
- MABO here: the mean over ground-truth boxes of the best overlap (the paper's ABO of all
  objects; its per-class mean is not used because proposals are class-agnostic).

IoU is on the project's continuous boxes (:func:`detector.base.boxes.box_iou`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from detector.base.boxes import box_iou
from detector.base.io import load_image
from detector.base.plots import pyplot, save_figure
from proposals.propose import propose
from proposals.store import ProposalStore

DEFAULT_COUNTS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def best_overlaps(gt_boxes: np.ndarray, boxes: np.ndarray, counts=None) -> np.ndarray:
    """Best IoU of each ground-truth box over the proposals.

    gt_boxes: float32 ``(G, 4)``; boxes: float32 ``(N, 4)`` best-first, both xyxy in the same pixels.
    counts: optional increasing proposal counts; then returns ``(G, len(counts))``, column ``j`` the
    best overlap using only the first ``counts[j]`` proposals. Otherwise returns ``(G,)``.
    """
    gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    g = len(gt_boxes)
    if counts is None:
        if g == 0 or len(boxes) == 0:
            return np.zeros(g, np.float64)
        return box_iou(gt_boxes, boxes).max(axis=1).astype(np.float64)
    counts = np.asarray(counts, np.int64)
    if g == 0 or len(boxes) == 0:
        return np.zeros((g, len(counts)), np.float64)
    running = np.maximum.accumulate(box_iou(gt_boxes, boxes), axis=1)
    return running[:, np.minimum(counts, len(boxes)) - 1].astype(np.float64)


@dataclass
class RecallAccumulator:
    """Collects best overlaps image by image; ``summary()`` gives the figures of one method."""

    counts: tuple[int, ...] = DEFAULT_COUNTS
    best: list[np.ndarray] = field(default_factory=list)  # per image (G,)
    curve: list[np.ndarray] = field(default_factory=list)  # per image (G, len(counts))
    num_boxes: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def add(self, gt_boxes: np.ndarray, boxes: np.ndarray, seconds: float | None = None) -> None:
        """gt_boxes ``(G, 4)`` and proposals ``(N, 4)`` (best-first) of one image, xyxy pixels."""
        curve = best_overlaps(gt_boxes, boxes, self.counts)
        self.curve.append(curve)
        self.best.append(curve[:, -1] if len(boxes) <= self.counts[-1] else best_overlaps(gt_boxes, boxes))
        self.num_boxes.append(len(boxes))
        if seconds is not None:
            self.seconds.append(seconds)

    def summary(self) -> dict:
        """``recall@0.5``, ``recall@0.7``, ``mabo``, ``boxes_per_image``, ``seconds_per_image`` (mean and
        median), ``num_images``, ``num_gt`` and ``recall_curve`` (recall@0.5 and @0.7 per count)."""
        best = np.concatenate(self.best) if self.best else np.zeros(0)
        curve = np.concatenate(self.curve) if self.curve else np.zeros((0, len(self.counts)))
        num_gt = len(best)

        def frac(x):
            return float(x.mean()) if num_gt else 0.0

        return {
            "num_images": len(self.num_boxes),
            "num_gt": num_gt,
            "recall@0.5": frac(best >= 0.5),
            "recall@0.7": frac(best >= 0.7),
            "mabo": frac(best),
            "boxes_per_image": float(np.mean(self.num_boxes)) if self.num_boxes else 0.0,
            "seconds_per_image": float(np.mean(self.seconds)) if self.seconds else None,
            "median_seconds_per_image": float(np.median(self.seconds)) if self.seconds else None,
            "recall_curve": {
                "counts": list(self.counts),
                "recall@0.5": [frac(curve[:, j] >= 0.5) for j in range(len(self.counts))],
                "recall@0.7": [frac(curve[:, j] >= 0.7) for j in range(len(self.counts))],
            },
        }


def evaluation_boxes(record) -> np.ndarray:
    """The ground-truth boxes proposals are scored against: all but COCO crowd and VOC difficult ones."""
    keep = ~(record.iscrowd | record.difficult)
    return record.gt_boxes[keep]


@dataclass(frozen=True)
class MethodSpec:
    """A proposal source to evaluate: a method run now (``method``, ``options``) or a store (``store``)."""

    label: str
    method: str | None = None
    options: tuple[tuple[str, object], ...] = ()
    store: str | None = None


def evaluate(dataset, specs: list[MethodSpec], max_images: int | None = None, progress: bool = True) -> dict:
    """Recall figures of every spec on the dataset's records (in order, the first ``max_images``).

    dataset: a :class:`detector.data.Dataset`. Methods are timed per image (seconds per image);
    stores are looked up by each record's ``file_name``; an image missing from a store counts as
    zero proposals and is counted in ``missing``. Returns ``{label: summary}`` (see
    :meth:`RecallAccumulator.summary`).
    """
    import time

    from tqdm import tqdm

    records = dataset.records[:max_images] if max_images else dataset.records
    stores = {s.label: ProposalStore(s.store) for s in specs if s.store is not None}
    acc = {s.label: RecallAccumulator() for s in specs}
    missing = {s.label: 0 for s in specs}
    warm = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for spec in specs:  # load compiled code and caches before anything is timed
        if spec.store is None:
            propose(warm, spec.method, **dict(spec.options))
    for record in tqdm(records, desc="images", unit="img", disable=not progress):
        gt = evaluation_boxes(record)
        image = None
        for spec in specs:
            if spec.store is not None:
                try:
                    boxes, _ = stores[spec.label][record.file_name]
                except KeyError:
                    boxes = np.zeros((0, 4), np.float32)
                    missing[spec.label] += 1
                acc[spec.label].add(gt, boxes)
                continue
            if image is None:
                image = load_image(dataset.image_path(record))
            start = time.perf_counter()
            result = propose(image, spec.method, **dict(spec.options))
            seconds = time.perf_counter() - start
            boxes = result[0] if isinstance(result, tuple) else result
            acc[spec.label].add(gt, boxes, seconds)
    out = {}
    for spec in specs:
        out[spec.label] = acc[spec.label].summary()
        out[spec.label]["missing"] = missing[spec.label]
    return out


def format_table(results: dict) -> str:
    """A fixed-width table of :func:`evaluate`'s results, one row per method."""
    lines = [f"{'method':<28}{'images':>7}{'boxes/img':>10}{'s/img':>8}{'R@0.5':>7}{'R@0.7':>7}{'MABO':>7}"]
    for label, r in results.items():
        secs = "-" if r["seconds_per_image"] is None else f"{r['seconds_per_image']:.3f}"
        lines.append(f"{label:<28}{r['num_images']:>7}{r['boxes_per_image']:>10.0f}{secs:>8}{r['recall@0.5']:>7.3f}"
                     f"{r['recall@0.7']:>7.3f}{r['mabo']:>7.3f}")
    return "\n".join(lines)


def plot_recall(results: dict, path: str, title: str = "") -> None:
    """PNG of recall (IoU 0.5 solid, 0.7 dashed) against the number of proposals per image."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (label, r) in enumerate(results.items()):
        curve = r["recall_curve"]
        colour = f"C{i % 10}"
        ax.plot(curve["counts"], curve["recall@0.5"], "-", color=colour, label=f"{label} (IoU 0.5)")
        ax.plot(curve["counts"], curve["recall@0.7"], "--", color=colour, label=f"{label} (IoU 0.7)")
    ax.set_xscale("log")
    ax.set_xlabel("proposals per image (best first)")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
