"""PASCAL VOC evaluation, with the semantics of the VOC devkit's ``VOCevaldet.m``.

Per class, detections are ranked by descending confidence (ties in their given order: record order,
then each image's order). Each detection is compared, with the devkit's inclusive areas (1-based
coordinates, ``+1`` on widths and heights), to every object of its class in its image, matched or not,
and keeps the one with the largest IoU (the earlier object on a tie). Then:

- IoU in ``[iou_threshold, 1]`` and the object is ``difficult``: ignored (neither true nor false positive);
- IoU in ``[iou_threshold, 1]`` and the object not yet detected: true positive, the object is detected;
- otherwise (IoU in ``[0, iou_threshold)``, no object, or the object already detected): false positive.

Positives are the objects that are not difficult. AP: VOC2007 11-point or VOC2010+ all-point
(:mod:`detector.evaluation.ap`). ``iscrowd`` objects (COCO ground truth) count as difficult here.

Unlike ILSVRC, a detection's best object is chosen among all objects, so each detection is decided by
the first earlier detection that chose the same object: fully vectorized, no greedy loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from detector.base.boxes import voc_to_xyxy, xyxy_to_voc
from detector.base.errors import UserError
from detector.base.files import atomic_write
from detector.data.records import Dataset
from detector.evaluation.ap import average_precision, average_precision_11point, mean_of, precision_recall
from detector.evaluation.detections import flatten_detections, flatten_ground_truth, warn_outside_dataset
from detector.evaluation.ilsvrc import inclusive_iou
from detector.evaluation.result import EvalResult

VARIANTS = {True: "11-point (VOC2007)", False: "all-point (VOC2010+)"}


def voc_true_positives(gt_image: np.ndarray, gt_labels: np.ndarray, gt_boxes: np.ndarray, gt_ignore: np.ndarray,
                       det_image: np.ndarray, det_labels: np.ndarray, det_scores: np.ndarray, det_boxes: np.ndarray,
                       num_classes: int, iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Decide each detection.

    gt_image, det_image: int64 image keys; gt_labels, det_labels: int64 ``1..num_classes``.
    gt_boxes, det_boxes: float64 ``(G, 4)``, ``(D, 4)``, 1-based inclusive.
    gt_ignore: bool ``(G,)`` (difficult). det_scores: float64 ``(D,)``, ties kept in the given order.
    Returns ``tp`` and ``ignored``, bool ``(D,)`` in the given order; the rest are false positives.
    """
    num_det = len(det_scores)
    tp = np.zeros(num_det, dtype=bool)
    ignored = np.zeros(num_det, dtype=bool)
    if num_det == 0 or len(gt_labels) == 0:
        return tp, ignored
    stride = num_classes + 1
    gt_key = gt_image * stride + gt_labels
    gt_order = np.argsort(gt_key, kind="stable")
    gt_key_sorted = gt_key[gt_order]
    det_key = det_image * stride + det_labels
    lo = np.searchsorted(gt_key_sorted, det_key, side="left")
    count = np.searchsorted(gt_key_sorted, det_key, side="right") - lo
    has = np.flatnonzero(count)
    count_has = count[has]
    pair_det = np.repeat(has, count_has)
    first_pair = np.cumsum(count_has) - count_has
    pair_gt = gt_order[lo[pair_det] + (np.arange(len(pair_det)) - np.repeat(first_pair, count_has))]
    iou, overlaps = inclusive_iou(det_boxes[pair_det], gt_boxes[pair_gt])
    pair_det, pair_gt, iou = pair_det[overlaps], pair_gt[overlaps], iou[overlaps]
    # Best object per detection: the largest IoU, the earlier object on a tie (pairs are in object order).
    order = np.lexsort((np.arange(len(pair_det)), -iou, pair_det))
    pair_det, pair_gt, iou = pair_det[order], pair_gt[order], iou[order]
    first = np.ones(len(pair_det), dtype=bool)
    first[1:] = pair_det[1:] != pair_det[:-1]
    best_det, best_gt, best_iou = pair_det[first], pair_gt[first], iou[first]
    hit = best_iou >= iou_threshold  # a match needs IoU in [iou_threshold, 1]
    best_det, best_gt = best_det[hit], best_gt[hit]
    difficult = gt_ignore[best_gt]
    ignored[best_det[difficult]] = True
    best_det, best_gt = best_det[~difficult], best_gt[~difficult]
    # The first detection (per class ranking) that chose an object detects it; later ones are duplicates.
    ranking = np.lexsort((np.arange(num_det), -det_scores))
    rank = np.empty(num_det, dtype=np.int64)
    rank[ranking] = np.arange(num_det)
    by_rank = np.argsort(rank[best_det], kind="stable")
    _, first_hit = np.unique(best_gt[by_rank], return_index=True)
    tp[best_det[by_rank][first_hit]] = True
    return tp, ignored


def evaluate_voc(dataset: Dataset, detections: Mapping, iou_threshold: float = 0.5, use_07_metric: bool = False,
                 keep_curves: bool = True) -> EvalResult:
    """PASCAL VOC mAP of ``detections`` (image id -> ``(boxes float (N, 4) project xyxy, scores (N,),
    labels (N,) 1..C)``) on ``dataset`` (any reader).

    iou_threshold: a detection matches at IoU in ``[iou_threshold, 1]`` (VOC: 0.5).
    use_07_metric: VOC2007 11-point AP; default VOC2010+ all-point AP.
    """
    num_classes = dataset.vocab.num_classes
    gt = flatten_ground_truth(dataset)
    flat = flatten_detections(dataset, detections)
    gt_ignore = gt.difficult | gt.iscrowd
    tp, ignored = voc_true_positives(
        gt.image_index, gt.labels, xyxy_to_voc(gt.boxes), gt_ignore,  # project xyxy -> VOC inclusive
        flat.image_index, flat.labels, flat.scores, xyxy_to_voc(flat.boxes), num_classes, iou_threshold)
    positives = np.bincount(gt.labels[~gt_ignore], minlength=num_classes + 1)
    keep = np.flatnonzero(~ignored)
    ranking = keep[np.lexsort((keep, -flat.scores[keep]))]
    labels, tp_ranked = flat.labels[ranking], tp[ranking]
    by_class = np.argsort(labels, kind="stable")
    labels, tp_ranked = labels[by_class], tp_ranked[by_class]
    bounds = np.searchsorted(labels, np.arange(1, num_classes + 2))
    ap_fn = average_precision_11point if use_07_metric else average_precision
    aps, curves = {}, {}
    vocab = dataset.vocab
    for label in range(1, num_classes + 1):
        if positives[label] <= 0:
            continue
        recall, precision = precision_recall(tp_ranked[bounds[label - 1]:bounds[label]], int(positives[label]))
        cid = vocab.id_of_label(label)
        aps[cid] = ap_fn(recall, precision)
        if keep_curves:
            curves[cid] = (recall, precision)
    return EvalResult(
        protocol="voc",
        variant=f"{VARIANTS[use_07_metric]}, IoU >= {iou_threshold:g}",
        mAP=mean_of(aps.values()),
        ap=aps,
        positives={cid: int(positives[vocab.label_of_id(cid)]) for cid in aps},
        class_names={cid: name for cid, name in zip(vocab.ids, vocab.names)},
        num_images=len(dataset),
        num_predictions=len(flat.scores),
        curves=curves,
        extra={"iou_threshold": float(iou_threshold), "use_07_metric": bool(use_07_metric),
               "num_ignored_difficult": int(ignored.sum()), "num_dropped_unlisted": flat.num_dropped},
    )


def read_voc_predictions(path, dataset: Dataset) -> dict:
    """Read ``<image id> <class> <confidence> <xmin> <ymin> <xmax> <ymax>`` lines (class: name or id of
    ``dataset.vocab``; coordinates 1-based inclusive, like the VOC devkit's result files).

    Returns image id -> ``(boxes float64 (N, 4) project xyxy, scores (N,), labels (N,) 1..C)``, in file order.
    Lines naming images outside the dataset are kept (the evaluators drop and count them). A malformed line
    is a :class:`UserError` naming its line number.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prediction file not found")
    vocab = dataset.vocab
    label_of = {name: i + 1 for i, name in enumerate(vocab.names)}
    label_of.update({str(cid): i + 1 for i, cid in enumerate(vocab.ids)})
    image_of = {str(r.image_id): r.image_id for r in dataset.records}
    rows: dict = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 7:
                raise UserError(f"{path}:{lineno}: expected 7 columns '<image id> <class> <confidence> <xmin> <ymin> "
                                f"<xmax> <ymax>', got {len(fields)}")
            label = label_of.get(fields[1])
            if label is None:
                raise UserError(f"{path}:{lineno}: class {fields[1]!r} is not a class name or id of the dataset")
            try:
                values = [float(v) for v in fields[2:]]
            except ValueError:
                raise UserError(f"{path}:{lineno}: confidence and coordinates must be numbers") from None
            if not np.isfinite(values).all():
                raise UserError(f"{path}:{lineno}: NaN or infinite value")
            if values[3] < values[1] or values[4] < values[2]:
                raise UserError(f"{path}:{lineno}: xmax < xmin or ymax < ymin")
            rows.setdefault(image_of.get(fields[0], fields[0]), []).append((label, values))
    out = {}
    for image_id, items in rows.items():
        labels = np.asarray([lab for lab, _ in items], dtype=np.int64)
        values = np.asarray([v for _, v in items], dtype=np.float64)
        out[image_id] = (voc_to_xyxy(values[:, 1:5]), values[:, 0], labels)
    return out


def write_voc_detections(path: str | Path, detections: dict, dataset: Dataset) -> int:
    """Write ``<image id> <class id> <confidence> <xmin> <ymin> <xmax> <ymax>`` lines (1-based inclusive, the
    format :func:`detector.evaluation.read_voc_predictions` reads), in record order; returns the line count."""
    ids = np.asarray(dataset.vocab.ids)
    warn_outside_dataset(path, detections, {r.image_id for r in dataset.records})
    lines = []
    for record in dataset.records:
        if record.image_id not in detections:
            continue
        boxes, scores, labels = detections[record.image_id]
        voc = xyxy_to_voc(np.asarray(boxes, np.float64))  # project xyxy -> 1-based inclusive
        lines += [f"{record.image_id} {cid} {s!r} {b[0]!r} {b[1]!r} {b[2]!r} {b[3]!r}\n"
                  for cid, s, b in zip(ids[np.asarray(labels) - 1].tolist(), np.asarray(scores, np.float64).tolist(),
                                       voc.tolist())]
    atomic_write(path, "".join(lines))
    return len(lines)
