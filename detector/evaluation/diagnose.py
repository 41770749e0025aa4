"""False-positive analysis after Hoiem, Chodpathumwan and Dai, "Diagnosing error in object detectors"
(ECCV 2012), as the R-CNN paper used it, and a class confusion matrix.

Every detection is decided with the PASCAL VOC rule (:func:`detector.evaluation.voc.voc_true_positives`,
inclusive 1-based IoU, so the true positives and AP50 here equal ``evaluate_voc``'s at the same
threshold): it takes the object of its class with the largest IoU; IoU in ``[iou_threshold, 1]`` with
an object not yet detected: true positive; with a ``difficult`` or ``iscrowd`` object: ignored. Every
other detection is a false positive of exactly one type, checked in this order (Hoiem's definitions):

- ``duplicate``: its best object of its class has IoU in ``[iou_threshold, 1]`` but was already detected
  by a higher-ranked detection (Hoiem counts these as localization errors; reported apart here);
- ``localization``: its best object of its class has IoU in ``[min_overlap, iou_threshold)``;
- ``confusion``: IoU in ``[min_overlap, 1]`` with an object of another class (Hoiem's "similar" and
  "other" together; the classes it was confused with are counted per class);
- ``background``: IoU in ``[0, min_overlap)`` with every object of the image.

Hoiem looks at the top-ranked detections of each class: the ``N_j`` most confident ones, ``N_j`` being
the class's objects (``top=1.0``); ``top=k`` takes the ``ceil(k * N_j)`` most confident, ``None`` all.
Removing the false positives of one type from the full ranking and recomputing AP (all-point, VOC2010+)
gives the AP that type costs (Hoiem's "impact of removing" bars).

The confusion matrix has one row per class of objects (not difficult, not crowd) and one column per
class plus ``missed``: each object counts for the class of the highest-scoring detection with IoU in
``[iou_threshold, 1]`` with it, of any class (a larger IoU wins a tied score), or ``missed`` when none.

numpy only (no torch), like every evaluator.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from detector.base.boxes import xyxy_to_voc
from detector.base.files import atomic_open
from detector.data.records import Dataset
from detector.evaluation.ap import average_precision, precision_recall
from detector.evaluation.detections import flatten_detections, flatten_ground_truth
from detector.evaluation.ilsvrc import inclusive_iou
from detector.evaluation.voc import voc_true_positives

FP_TYPES = ("localization", "duplicate", "confusion", "background")
_TP, _LOC, _DUP, _CONF, _BG, _IGNORED = 0, 1, 2, 3, 4, -1  # codes of ``kind``; FP_TYPES[code - 1]
MISSED = "missed"


@dataclass(frozen=True)
class DiagnoseConfig:
    """How detections are judged.

    iou_threshold: a detection is correct at IoU in ``[iou_threshold, 1]`` with an undetected object of
        its class (VOC and Hoiem: 0.5); the confusion matrix uses the same threshold.
    min_overlap: localization if the best IoU with its class is in ``[min_overlap, iou_threshold)``,
        confusion if IoU in ``[min_overlap, 1]`` with another class's object, background if IoU in
        ``[0, min_overlap)`` with every object (Hoiem: 0.1).
    top: per class, analyse the ``ceil(top * N_j)`` most confident detections (``N_j``: the class's
        objects); Hoiem's choice is 1.0; ``None``: every detection given (all above the score threshold).
    """

    iou_threshold: float = 0.5
    min_overlap: float = 0.1
    top: float | None = 1.0

    def __post_init__(self):
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold {self.iou_threshold} is outside (0, 1]")
        if not 0.0 < self.min_overlap < self.iou_threshold:
            raise ValueError(f"min_overlap {self.min_overlap} is outside (0, iou_threshold)")
        if self.top is not None and not self.top > 0:
            raise ValueError(f"top {self.top} must be > 0 (or None for every detection)")


@dataclass(frozen=True)
class ClassDiagnosis:
    """One class's top-ranked detections.

    positives: the class's objects (not difficult, not crowd), ``N_j``.
    considered: detections analysed, ``min(ceil(top * N_j), detections of the class)``.
    tp: correct among them; fp: false positives among them by type (``FP_TYPES``).
    confused_with: other class name -> confusion false positives on its objects (among ``considered``).
    ap: AP at IoU ``>= iou_threshold`` of every detection of the class (all-point); ``None`` without positives.
    ap_gain: type -> AP with every false positive of that type removed, minus ``ap``.
    """

    class_id: int
    name: str
    positives: int
    detections: int
    considered: int
    tp: int
    fp: dict[str, int]
    confused_with: dict[str, int]
    ap: float | None
    ap_gain: dict[str, float]

    @property
    def num_fp(self) -> int:
        return sum(self.fp.values())

    def fp_fraction(self, fp_type: str) -> float:
        """Share of ``fp_type`` among the false positives (0 when there are none)."""
        return self.fp[fp_type] / self.num_fp if self.num_fp else 0.0


@dataclass(frozen=True)
class ConfusionMatrix:
    """matrix: int64 ``(C, C + 1)``; row = the object's class, column = the class of the highest-scoring
    detection at IoU ``>= iou_threshold`` with it, the last column ``missed``. class_names: ``C`` names."""

    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    matrix: np.ndarray

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.class_names, MISSED)

    def to_dict(self) -> dict:
        return {"class_ids": list(self.class_ids), "rows": list(self.class_names), "columns": list(self.columns),
                "matrix": self.matrix.tolist()}


@dataclass(frozen=True)
class Diagnosis:
    """The false-positive analysis of one set of detections: per class (classes with objects or analysed
    detections, in vocabulary order), the total over them, and the confusion matrix."""

    config: DiagnoseConfig
    per_class: list[ClassDiagnosis]
    confusion: ConfusionMatrix
    num_images: int
    num_detections: int
    num_ignored: int = 0
    extra: dict = field(default_factory=dict)

    @cached_property
    def total(self) -> ClassDiagnosis:
        """Every class together; ``ap`` is the mean AP over classes with positives, gains likewise."""
        rows = self.per_class
        with_ap = [c for c in rows if c.ap is not None]
        confused: dict[str, int] = {}
        for c in rows:
            for name, n in c.confused_with.items():
                confused[name] = confused.get(name, 0) + n
        return ClassDiagnosis(
            class_id=0, name="all classes", positives=sum(c.positives for c in rows),
            detections=sum(c.detections for c in rows), considered=sum(c.considered for c in rows),
            tp=sum(c.tp for c in rows), fp={t: sum(c.fp[t] for c in rows) for t in FP_TYPES},
            confused_with=dict(sorted(confused.items(), key=lambda kv: -kv[1])),
            ap=float(np.mean([c.ap for c in with_ap])) if with_ap else None,
            ap_gain={t: float(np.mean([c.ap_gain[t] for c in with_ap])) if with_ap else 0.0 for t in FP_TYPES})

    def to_dict(self) -> dict:
        """The JSON document: config, per-class and total counts (``fp`` by type, ``fp_fraction`` of the
        false positives), AP and AP gains, and the confusion matrix."""
        def row(c: ClassDiagnosis) -> dict:
            out = asdict(c)
            out["num_fp"] = c.num_fp
            out["fp_fraction"] = {t: c.fp_fraction(t) for t in FP_TYPES}
            return out
        return {
            "method": "false positives of the top-ranked detections (Hoiem et al., ECCV 2012)",
            "config": asdict(self.config),
            "fp_types": list(FP_TYPES),
            "num_images": self.num_images,
            "num_detections": self.num_detections,
            "num_ignored": self.num_ignored,
            "total": row(self.total),
            "per_class": [row(c) for c in self.per_class],
            "confusion": self.confusion.to_dict(),
            **self.extra,
        }


def save_diagnosis_json(diagnosis: Diagnosis, path: str | Path) -> None:
    """Write ``diagnosis.to_dict()`` to ``path`` atomically."""
    with atomic_open(path) as f:
        json.dump(diagnosis.to_dict(), f, indent=2)


def _same_image_pairs(gt_image: np.ndarray, det_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (detection, object) pair of the same image; ``gt_image`` is non-decreasing (record order)."""
    lo = np.searchsorted(gt_image, det_image, side="left")
    count = np.searchsorted(gt_image, det_image, side="right") - lo
    pair_det = np.repeat(np.arange(len(det_image)), count)
    offset = np.arange(len(pair_det)) - np.repeat(np.cumsum(count) - count, count)
    return pair_det, np.repeat(lo, count) + offset


def _first_per_group(group: np.ndarray) -> np.ndarray:
    """Mask of the first element of each run of equal values in ``group`` (already sorted by it)."""
    first = np.ones(len(group), dtype=bool)
    first[1:] = group[1:] != group[:-1]
    return first


def classify_detections(dataset: Dataset, detections: Mapping, config: DiagnoseConfig = DiagnoseConfig()):
    """Decide every detection. Returns ``(gt, flat, kind, other_label, pairs)``:

    gt, flat: the flattened ground truth and detections (:mod:`detector.evaluation.detections`).
    kind: int8 ``(P,)``: 0 true positive, 1 localization, 2 duplicate, 3 confusion, 4 background,
        -1 ignored (its best object of its class is difficult or crowd).
    other_label: int64 ``(P,)``, for confusions the class (``1..C``) of the other-class object with the
        largest IoU, else 0.
    pairs: ``(pair_det, pair_gt, iou)`` of every same-image (detection, object) pair, IoU inclusive.
    """
    gt = flatten_ground_truth(dataset)
    flat = flatten_detections(dataset, detections)
    num_det = len(flat.scores)
    gt_voc, det_voc = xyxy_to_voc(gt.boxes), xyxy_to_voc(flat.boxes)  # the VOC evaluator's inclusive IoU
    tp, ignored = voc_true_positives(gt.image_index, gt.labels, gt_voc, gt.difficult | gt.iscrowd,
                                     flat.image_index, flat.labels, flat.scores, det_voc,
                                     dataset.vocab.num_classes, config.iou_threshold)
    pair_det, pair_gt = _same_image_pairs(gt.image_index, flat.image_index)
    iou, overlaps = inclusive_iou(det_voc[pair_det], gt_voc[pair_gt])
    iou = np.where(overlaps, iou, 0.0)
    same = flat.labels[pair_det] == gt.labels[pair_gt]
    best_same = np.zeros(num_det)
    np.maximum.at(best_same, pair_det[same], iou[same])
    other_label = np.zeros(num_det, dtype=np.int64)
    best_other = np.zeros(num_det)
    o_det, o_gt, o_iou = pair_det[~same], pair_gt[~same], iou[~same]
    order = np.lexsort((o_gt, -o_iou, o_det))  # per detection: the largest IoU, the earlier object on a tie
    o_det, o_gt, o_iou = o_det[order], o_gt[order], o_iou[order]
    first = _first_per_group(o_det)
    best_other[o_det[first]] = o_iou[first]
    other_label[o_det[first]] = gt.labels[o_gt[first]]

    kind = np.full(num_det, _BG, dtype=np.int8)  # background: IoU in [0, min_overlap) with every object
    kind[best_other >= config.min_overlap] = _CONF  # another class's object at IoU in [min_overlap, 1]
    kind[best_same >= config.min_overlap] = _LOC  # its class at IoU in [min_overlap, iou_threshold)
    kind[best_same >= config.iou_threshold] = _DUP  # its class at IoU >= iou_threshold, already detected
    kind[tp] = _TP
    kind[ignored] = _IGNORED
    other_label[kind != _CONF] = 0
    return gt, flat, kind, other_label, (pair_det, pair_gt, iou)


def confusion_matrix(dataset: Dataset, gt, flat, pairs, iou_threshold: float = 0.5) -> ConfusionMatrix:
    """Rows: each object's class (difficult and crowd objects left out); columns: the class of the
    highest-scoring detection with IoU in ``[iou_threshold, 1]`` with it, or ``missed``."""
    pair_det, pair_gt, iou = pairs
    num_classes = dataset.vocab.num_classes
    hit = iou >= iou_threshold
    p_det, p_gt, p_iou = pair_det[hit], pair_gt[hit], iou[hit]
    order = np.lexsort((p_det, -p_iou, -flat.scores[p_det], p_gt))  # per object: top score, then top IoU
    p_det, p_gt = p_det[order], p_gt[order]
    first = _first_per_group(p_gt)
    column = np.full(len(gt.labels), num_classes, dtype=np.int64)  # column C: missed
    column[p_gt[first]] = flat.labels[p_det[first]] - 1
    counted = ~(gt.difficult | gt.iscrowd)
    matrix = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    np.add.at(matrix, (gt.labels[counted] - 1, column[counted]), 1)
    vocab = dataset.vocab
    return ConfusionMatrix(class_ids=tuple(vocab.ids), class_names=tuple(vocab.names), matrix=matrix)


def _ap(tp_ranked: np.ndarray, positives: int) -> float:
    return average_precision(*precision_recall(tp_ranked, positives))


def diagnose(dataset: Dataset, detections: Mapping, config: DiagnoseConfig = DiagnoseConfig()) -> Diagnosis:
    """Hoiem's false-positive analysis of ``detections`` (image id -> ``(boxes float (N, 4) project xyxy,
    scores (N,), labels (N,) 1..C)``, as the evaluators take) on ``dataset`` (any reader), and the class
    confusion matrix. See the module docstring for the rules."""
    gt, flat, kind, other_label, pairs = classify_detections(dataset, detections, config)
    vocab = dataset.vocab
    num_classes = vocab.num_classes
    positives = np.bincount(gt.labels[~(gt.difficult | gt.iscrowd)], minlength=num_classes + 1)
    keep = np.flatnonzero(kind != _IGNORED)
    ranking = keep[np.lexsort((keep, -flat.scores[keep]))]  # descending score, ties in the given order
    ranking = ranking[np.argsort(flat.labels[ranking], kind="stable")]  # grouped by class, rank kept
    bounds = np.searchsorted(flat.labels[ranking], np.arange(1, num_classes + 2))
    rows = []
    for label in range(1, num_classes + 1):
        ranked = ranking[bounds[label - 1]:bounds[label]]
        n_pos = int(positives[label])
        if n_pos == 0 and len(ranked) == 0:
            continue
        n_top = len(ranked) if config.top is None else min(len(ranked), math.ceil(config.top * n_pos))
        top_kind = kind[ranked[:n_top]]
        confused = np.bincount(other_label[ranked[:n_top]][top_kind == _CONF], minlength=num_classes + 1)
        ap, gain = None, {t: 0.0 for t in FP_TYPES}
        if n_pos:
            ranked_kind = kind[ranked]
            ap = _ap(ranked_kind == _TP, n_pos)
            for code, name in enumerate(FP_TYPES, start=1):
                rest = ranked_kind[ranked_kind != code]
                gain[name] = _ap(rest == _TP, n_pos) - ap
        rows.append(ClassDiagnosis(
            class_id=vocab.id_of_label(label), name=vocab.name_of_label(label), positives=n_pos,
            detections=len(ranked), considered=n_top, tp=int(np.sum(top_kind == _TP)),
            fp={name: int(np.sum(top_kind == code)) for code, name in enumerate(FP_TYPES, start=1)},
            confused_with={vocab.name_of_label(int(o)): int(confused[o])
                           for o in np.argsort(-confused, kind="stable") if confused[o] > 0},
            ap=ap, ap_gain=gain))
    return Diagnosis(
        config=config, per_class=rows,
        confusion=confusion_matrix(dataset, gt, flat, pairs, config.iou_threshold),
        num_images=len(dataset), num_detections=len(flat.scores), num_ignored=int(np.sum(kind == _IGNORED)),
        extra={"num_dropped_unlisted": flat.num_dropped} if flat.num_dropped else {})
