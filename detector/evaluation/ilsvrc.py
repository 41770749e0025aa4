"""ILSVRC DET evaluation with the semantics of the ILSVRC2014 devkit's ``eval_detection.m``.

The rules (devkit ``readme.txt`` section 2.3 and ``eval_detection.m``), all in file coordinates
(1-based, inclusive), so the devkit's "+1" arithmetic lives here and nowhere else:

- Each object has its own IoU threshold ``thr = min(0.5, w*h / ((w + 10) * (h + 10)))`` with
  ``w = xmax - xmin + 1``, ``h = ymax - ymin + 1``: a detection matches if IoU is in ``[thr, 1]``.
- IoU with inclusive areas: ``iw = min(x2) - max(x1) + 1``, ``ih`` likewise; only when ``iw > 0`` and
  ``ih > 0``, ``IoU = iw*ih / ((dx2-dx1+1)(dy2-dy1+1) + (gx2-gx1+1)(gy2-gy1+1) - iw*ih)``.
- Per image, detections by descending confidence, ties in their given order (stable). A detection of a
  class blacklisted for its image is ignored (neither true nor false positive). Otherwise it takes,
  among the not-yet-matched objects of its class, the one with the largest IoU at or above that object's
  own threshold (the earlier object wins a tie); found: true positive; none: false positive.
- Positives of a class: its objects in the listed images, minus those whose (image, class) is blacklisted.
- Ranking: images by ascending image id, each in its per-image order, then one stable sort by
  descending confidence; per class, cumulative precision/recall and the all-point AP
  (:func:`detector.evaluation.ap.average_precision`); mAP: the mean over classes with positives.

Everything is vectorized: the greedy matching runs in rounds, each round matching, in every
(image, class) group at once, the first detection that still has an unmatched eligible object. A
detection skipped in a round has no unmatched eligible object left, and matching only grows, so it is
a false positive in the sequential order too; the number of rounds is at most the largest number of
objects of one class in one image.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from detector.base.boxes import xyxy_to_voc
from detector.data.ilsvrc import read_blacklist
from detector.data.records import Dataset
from detector.evaluation.ap import average_precision, mean_of, precision_recall
from detector.evaluation.detections import flatten_detections, flatten_ground_truth
from detector.evaluation.ranking import descending_ranks, group_by_small_int, order_by
from detector.evaluation.result import EvalResult
from detector.evaluation.submission import read_ilsvrc_predictions

DEFAULT_IOU_THRESHOLD = 0.5  # objects of at least ~25x25 pixels match at IoU in [0.5, 1]
PIXEL_TOLERANCE = 10  # smaller objects: thr = w*h / ((w + 10)(h + 10)), ~5 pixels of slack per side
VARIANT = "all-point AP, per-object IoU threshold (ILSVRC2014 devkit)"


def object_thresholds(gt_boxes: np.ndarray) -> np.ndarray:
    """Per-object IoU thresholds, float64 ``(G,)``, of ``gt_boxes`` float ``(G, 4)`` 1-based inclusive."""
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    w = gt_boxes[:, 2] - gt_boxes[:, 0] + 1
    h = gt_boxes[:, 3] - gt_boxes[:, 1] + 1
    return np.minimum(DEFAULT_IOU_THRESHOLD, (w * h) / ((w + PIXEL_TOLERANCE) * (h + PIXEL_TOLERANCE)))


def inclusive_iou(det: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise IoU of paired boxes ``(K, 4)`` (1-based inclusive), in the devkit's operation order.

    Returns ``iou`` float64 ``(K,)`` and ``overlaps`` bool ``(K,)`` (``iw > 0`` and ``ih > 0``); ``iou``
    is only meaningful where ``overlaps``.
    """
    iw = np.minimum(det[:, 2], gt[:, 2]) - np.maximum(det[:, 0], gt[:, 0]) + 1
    ih = np.minimum(det[:, 3], gt[:, 3]) - np.maximum(det[:, 1], gt[:, 1]) + 1
    overlaps = (iw > 0) & (ih > 0)
    inter = iw * ih
    union = ((det[:, 2] - det[:, 0] + 1) * (det[:, 3] - det[:, 1] + 1)
             + (gt[:, 2] - gt[:, 0] + 1) * (gt[:, 3] - gt[:, 1] + 1) - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(overlaps, inter / np.where(overlaps, union, 1.0), 0.0)
    return iou, overlaps


def _greedy_rounds(pair_det: np.ndarray, pair_gt: np.ndarray, pair_iou: np.ndarray, det_group: np.ndarray,
                   num_det: int, num_gt: int) -> np.ndarray:
    """Greedy matching of eligible (detection, object) pairs; returns tp bool ``(num_det,)``.

    Pairs are sorted by detection position (the processing order; ``det_group`` is non-decreasing in it),
    then by object position (file order within a group).
    """
    tp = np.zeros(num_det, dtype=bool)
    matched = np.zeros(num_gt, dtype=bool)
    while pair_det.size:
        live = ~matched[pair_gt]
        if not live.all():
            pair_det, pair_gt, pair_iou = pair_det[live], pair_gt[live], pair_iou[live]
            if not pair_det.size:
                break
        group = det_group[pair_det]
        starts = np.empty(len(group), dtype=bool)
        starts[0] = True
        np.not_equal(group[1:], group[:-1], out=starts[1:])
        # The first detection of each group that still has a live pair; it will certainly match.
        chosen = pair_det == pair_det[starts][np.cumsum(starts) - 1]
        c_det, c_gt, c_iou = pair_det[chosen], pair_gt[chosen], pair_iou[chosen]
        order = np.lexsort((c_gt, -c_iou, c_det))  # per detection: largest IoU, then the earlier object
        c_det, c_gt = c_det[order], c_gt[order]
        best = np.empty(len(c_det), dtype=bool)
        best[0] = True
        np.not_equal(c_det[1:], c_det[:-1], out=best[1:])
        tp[c_det[best]] = True
        matched[c_gt[best]] = True
        rest = ~chosen
        pair_det, pair_gt, pair_iou = pair_det[rest], pair_gt[rest], pair_iou[rest]
    return tp


def _concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``, vectorized."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    nonzero = lengths > 0
    starts, lengths = starts[nonzero], lengths[nonzero]
    steps = np.ones(total, dtype=np.int64)
    heads = np.cumsum(lengths) - lengths
    steps[0] = starts[0]
    steps[heads[1:]] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
    return np.cumsum(steps)


def match_detections(gt_rank: np.ndarray, gt_labels: np.ndarray, gt_boxes: np.ndarray,
                     det_rank: np.ndarray, det_labels: np.ndarray, det_scores: np.ndarray, det_boxes: np.ndarray,
                     num_classes: int, score_rank: np.ndarray | None = None) -> np.ndarray:
    """True positives of detections under the ILSVRC matching rule (blacklisted ones already removed).

    gt_rank, det_rank: int64 ``(G,)``, ``(D,)``, the image of each object/detection (any integer key).
    gt_labels, det_labels: int64 labels ``1..num_classes``.
    gt_boxes, det_boxes: float64 ``(G, 4)``, ``(D, 4)``, 1-based inclusive.
    det_scores: float64 ``(D,)``; ties keep the detections' given order.
    score_rank: optional, the stable descending rank of ``det_scores`` (:func:`ranking.descending_ranks`).
    Returns tp bool ``(D,)`` in the given order (the rest are false positives).
    """
    num_det = len(det_scores)
    tp = np.zeros(num_det, dtype=bool)
    if num_det == 0 or len(gt_labels) == 0:
        return tp
    stride = num_classes + 1
    gt_key = gt_rank * stride + gt_labels
    gt_order = np.argsort(gt_key, kind="stable")  # groups, file order inside a group
    gt_key_sorted = gt_key[gt_order]
    gt_sorted = gt_boxes[gt_order]
    thr_sorted = object_thresholds(gt_sorted)
    det_key = det_rank * stride + det_labels
    if score_rank is None:
        score_rank, _ = descending_ranks(det_scores)
    order = order_by(det_key, score_rank, unique=True)  # per group: confidence descending, ties in given order
    key = det_key[order]
    # Each object group (image, class) finds its run of detections in the sorted keys: G searches in D
    # instead of D searches in G; only detections that share a group with objects get pairs.
    groups, group_start, group_size = np.unique(gt_key_sorted, return_index=True, return_counts=True)
    run_lo = np.searchsorted(key, groups, side="left")
    run_len = np.searchsorted(key, groups, side="right") - run_lo
    has = _concat_ranges(run_lo, run_len)  # detection positions (in `order`) that have objects
    if has.size == 0:
        return tp
    count_has = np.repeat(group_size, run_len)
    lo = np.repeat(group_start, run_len)
    pair_det = np.repeat(has, count_has)
    pair_gt = np.repeat(lo, count_has) + _concat_ranges(np.zeros(len(has), np.int64), count_has)
    iou, overlaps = inclusive_iou(det_boxes[order[pair_det]], gt_sorted[pair_gt])
    eligible = overlaps & (iou >= thr_sorted[pair_gt])  # a match needs IoU in [thr, 1]
    tp_sorted = _greedy_rounds(pair_det[eligible], pair_gt[eligible], iou[eligible], key, num_det, len(gt_key))
    tp[order] = tp_sorted
    return tp


def _class_aps(labels: np.ndarray, tp: np.ndarray, positives: np.ndarray, num_classes: int, keep_curves: bool):
    """Per-class AP of ranked detections (``labels``, ``tp`` in global rank order)."""
    by_class = group_by_small_int(labels)
    labels_sorted, tp_sorted = labels[by_class], tp[by_class]
    bounds = np.searchsorted(labels_sorted, np.arange(1, num_classes + 2))
    aps, curves = {}, {}
    for label in range(1, num_classes + 1):
        if positives[label] <= 0:
            continue
        recall, precision = precision_recall(tp_sorted[bounds[label - 1]:bounds[label]], int(positives[label]))
        aps[label] = average_precision(recall, precision)
        if keep_curves:
            curves[label] = (recall, precision)
    return aps, curves


def _image_ranks(dataset: Dataset) -> np.ndarray:
    """Rank of each record in ascending image id (record order if the ids are not all integers)."""
    ids = [r.image_id for r in dataset.records]
    if all(isinstance(i, (int, np.integer)) for i in ids):
        ranks = np.empty(len(ids), dtype=np.int64)
        ranks[np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")] = np.arange(len(ids))
        return ranks
    return np.arange(len(ids), dtype=np.int64)


def _blacklist_keys(dataset: Dataset, blacklist, stride: int) -> np.ndarray:
    if blacklist is None:
        blacklist = getattr(dataset, "blacklist", None) or ()
    elif isinstance(blacklist, (str, Path)):
        blacklist = read_blacklist(blacklist, dataset.vocab)
    index_of = {r.image_id: i for i, r in enumerate(dataset.records)}
    keys = [index_of[image_id] * stride + int(label) for image_id, label in blacklist if image_id in index_of]
    return np.unique(np.asarray(keys, dtype=np.int64))


def evaluate_arrays(dataset: Dataset, det_index: np.ndarray, det_labels: np.ndarray, det_scores: np.ndarray,
                    det_boxes: np.ndarray, blacklist: Iterable[tuple[int, int]] | str | Path | None = None,
                    keep_curves: bool = True, extra: dict | None = None) -> EvalResult:
    """ILSVRC evaluation of detections given as arrays, in their given (file) order.

    det_index: int64 ``(D,)``, position of each detection's image in ``dataset.records``.
    det_labels: int64 ``(D,)``, ``1..C``; det_scores: float64 ``(D,)``.
    det_boxes: float64 ``(D, 4)``, 1-based inclusive (ILSVRC file coordinates, not project xyxy).
    blacklist: ``(image id, label)`` pairs or a blacklist file; default: ``dataset.blacklist`` if any.
    """
    num_classes = dataset.vocab.num_classes
    stride = num_classes + 1
    gt = flatten_ground_truth(dataset)
    gt_boxes = xyxy_to_voc(gt.boxes)  # project xyxy -> the devkit's 1-based inclusive coordinates
    bl_keys = _blacklist_keys(dataset, blacklist, stride)
    gt_blacklisted = np.isin(gt.image_index * stride + gt.labels, bl_keys)
    positives = np.bincount(gt.labels[~gt_blacklisted], minlength=stride)
    det_index = np.asarray(det_index, dtype=np.int64)
    det_labels = np.asarray(det_labels, dtype=np.int64)
    d_scores = np.asarray(det_scores, dtype=np.float64)
    d_boxes = np.asarray(det_boxes, dtype=np.float64)
    ignored = np.isin(det_index * stride + det_labels, bl_keys) if len(bl_keys) else np.zeros(len(d_scores), bool)
    num_ignored = int(ignored.sum())
    if num_ignored:  # blacklisted (image, class): neither true nor false positive
        keep = np.flatnonzero(~ignored)
        det_index, det_labels, d_scores, d_boxes = det_index[keep], det_labels[keep], d_scores[keep], d_boxes[keep]
    ranks = _image_ranks(dataset)
    d_rank, d_labels = ranks[det_index], det_labels
    stable, dense = descending_ranks(d_scores)
    tp = match_detections(ranks[gt.image_index], gt.labels, gt_boxes, d_rank, d_labels, d_scores, d_boxes,
                          num_classes, score_rank=stable)
    # Global ranking: image id ascending, per-image order, then one stable sort by confidence, i.e.
    # by (confidence descending, image rank, given order).
    ranking = order_by(dense, d_rank)
    aps, curves = _class_aps(d_labels[ranking], tp[ranking], positives, num_classes, keep_curves)
    vocab = dataset.vocab
    info = {"num_ignored_blacklisted": num_ignored, "num_blacklisted_pairs": int(len(bl_keys))}
    info.update(extra or {})
    return EvalResult(
        protocol="ilsvrc",
        variant=VARIANT,
        mAP=mean_of(aps.values()),
        ap={vocab.id_of_label(c): v for c, v in aps.items()},
        positives={vocab.id_of_label(c): int(positives[c]) for c in aps},
        class_names={cid: name for cid, name in zip(vocab.ids, vocab.names)},
        num_images=len(dataset),
        num_predictions=len(d_scores) + num_ignored,
        curves={vocab.id_of_label(c): v for c, v in curves.items()},
        extra=info,
    )


def evaluate_ilsvrc(dataset: Dataset, detections: Mapping | str | Path,
                    blacklist: Iterable[tuple[int, int]] | str | Path | None = None,
                    keep_curves: bool = True, strict_boxes: bool = False, progress: bool = False) -> EvalResult:
    """ILSVRC DET mAP of ``detections`` on ``dataset`` (any reader; image ids as in the dataset).

    detections: image id -> ``(boxes float (N, 4) project xyxy, scores (N,), labels (N,) 1..C)`` (a tuple
        or an object with ``boxes``, ``scores``, ``labels``), or the path of an ILSVRC submission file
        (``<image id> <class id> <confidence> <xmin> <ymin> <xmax> <ymax>``, 1-based inclusive).
    blacklist: ``(image id, label)`` pairs or a blacklist file; default: ``dataset.blacklist`` if any.
    strict_boxes: for a file, reject lines with ``xmax < xmin`` or ``ymax < ymin`` (default: evaluate them
        as the devkit does; see :func:`~detector.evaluation.submission.read_ilsvrc_predictions`).
    Detections on images not in the dataset are dropped with a warning (the devkit would crash).
    """
    if isinstance(detections, (str, Path)):
        preds = read_ilsvrc_predictions(detections, dataset.vocab.ids, strict_boxes=strict_boxes, progress=progress)
        return evaluate_predictions(dataset, preds, blacklist=blacklist, keep_curves=keep_curves)
    flat = flatten_detections(dataset, detections)
    return evaluate_arrays(dataset, flat.image_index, flat.labels, flat.scores, xyxy_to_voc(flat.boxes),
                           blacklist=blacklist, keep_curves=keep_curves,
                           extra={"num_dropped_unlisted": flat.num_dropped})


def evaluate_predictions(dataset: Dataset, preds, blacklist=None, keep_curves: bool = True) -> EvalResult:
    """ILSVRC evaluation of parsed submission lines (:class:`~detector.evaluation.submission.IlsvrcPredictions`)."""
    ids = np.asarray([r.image_id for r in dataset.records], dtype=np.int64)
    pred_ids = preds.image_ids
    if len(ids) and ids.min() >= 0 and ids.max() < 4 * len(ids) + (1 << 20):
        # Image ids are small integers (val.txt numbers them): a lookup table instead of a search.
        table = np.full(int(ids.max()) + 2, -1, dtype=np.int64)  # the last entry: any id outside the list
        table[ids] = np.arange(len(ids))
        index = table[np.where((pred_ids >= 0) & (pred_ids <= ids.max()), pred_ids, len(table) - 1)]
    else:
        by_id = np.argsort(ids, kind="stable")
        pos = np.minimum(np.searchsorted(ids[by_id], pred_ids), max(len(ids) - 1, 0))
        index = np.where(ids[by_id][pos] == pred_ids, by_id[pos], -1) if len(ids) else np.full(len(pred_ids), -1)
    listed = index >= 0
    num_dropped = int(len(listed) - np.count_nonzero(listed))
    label_of_id = np.zeros(max(dataset.vocab.ids) + 1, dtype=np.int64)
    label_of_id[list(dataset.vocab.ids)] = np.arange(1, dataset.vocab.num_classes + 1)
    labels, scores, boxes = label_of_id[preds.class_ids], preds.scores, preds.boxes
    if num_dropped:
        warnings.warn(f"dropped {num_dropped} predictions on images that are not in the image list", stacklevel=2)
        keep = np.flatnonzero(listed)
        index, labels, scores, boxes = index[keep], labels[keep], scores[keep], boxes[keep]
    return evaluate_arrays(dataset, index, labels, scores, boxes, blacklist=blacklist, keep_curves=keep_curves,
                           extra={"num_dropped_unlisted": num_dropped,
                                  "num_inverted_boxes": int(getattr(preds, "num_inverted", 0))})
