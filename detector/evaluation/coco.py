"""COCO evaluation through ``pycocotools.cocoeval.COCOeval`` itself (not re-implemented).

Ground truth is either a COCO instances JSON (used as is, so segment areas drive the area ranges,
exactly as the official evaluation) or a :class:`Dataset` from any reader, converted to an in-memory
COCO ground truth: box areas stand in for segment areas, VOC ``difficult`` objects become
``iscrowd`` (ignored regions, as in common VOC-to-COCO conversions), string image ids are numbered
1..N in record order. Detections are the standard COCO results JSON (a list of ``{"image_id",
"category_id", "bbox": [x, y, w, h], "score"}``) or the in-memory mapping.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from detector.boxes import coco_to_xyxy, xyxy_to_coco
from detector.data.coco import coco_vocabulary, load_coco_json, read_json_file
from detector.data.records import Dataset
from detector.errors import UserError
from detector.evaluation.detections import unpack
from detector.evaluation.result import EvalResult
from detector.evaluation.submission import write_atomic

STAT_NAMES = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)
VARIANT = "pycocotools COCOeval, AP at IoU .50:.95, all areas, 100 detections"


def _coco_image_ids(dataset: Dataset) -> dict:
    """Dataset image id -> COCO integer image id (itself when every id is an integer)."""
    ids = [r.image_id for r in dataset.records]
    if all(isinstance(i, (int, np.integer)) for i in ids):
        return {i: int(i) for i in ids}
    return {i: n for n, i in enumerate(ids, start=1)}


def dataset_to_coco(dataset: Dataset) -> dict:
    """A COCO instances dict of a dataset's ground truth (project xyxy -> COCO xywh)."""
    image_ids = _coco_image_ids(dataset)
    images, annotations = [], []
    for rec in dataset.records:
        h, w = rec.image_size or (0, 0)
        images.append({"id": image_ids[rec.image_id], "file_name": rec.file_name, "height": h, "width": w})
        xywh = xyxy_to_coco(rec.gt_boxes.astype(np.float64))
        for box, label, crowd in zip(xywh.tolist(), rec.gt_labels.tolist(), (rec.iscrowd | rec.difficult).tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_ids[rec.image_id],
                                "category_id": dataset.vocab.id_of_label(label), "bbox": box,
                                "area": box[2] * box[3], "iscrowd": int(crowd)})
    categories = [{"id": cid, "name": name} for cid, name in zip(dataset.vocab.ids, dataset.vocab.names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def detections_to_coco(detections: Mapping, dataset: Dataset | None = None, vocab=None,
                       image_ids: dict | None = None) -> list[dict]:
    """COCO results list of in-memory detections (labels ``1..C`` -> category ids, xyxy -> xywh)."""
    vocab = vocab or dataset.vocab
    image_ids = image_ids or (_coco_image_ids(dataset) if dataset is not None else None)
    out = []
    for image_id, value in detections.items():
        boxes, scores, labels = unpack(value)
        if image_ids is not None:
            if image_id not in image_ids:
                continue
            image_id = image_ids[image_id]
        for box, score, label in zip(xyxy_to_coco(boxes).tolist(), scores.tolist(), labels.tolist()):
            out.append({"image_id": int(image_id), "category_id": vocab.id_of_label(int(label)),
                        "bbox": box, "score": score})
    return out


def write_coco_results(path: str | Path, detections: Mapping, dataset: Dataset) -> int:
    """Write detections as a standard COCO results JSON (atomically); returns the number of results."""
    results = detections_to_coco(detections, dataset)
    write_atomic(path, lambda f: json.dump(results, f))
    return len(results)


def _load_results(path: Path) -> list[dict]:
    results = read_json_file(path, "COCO results file")
    if not isinstance(results, list):
        raise UserError(f"{path}: expected a COCO results list [{{'image_id', 'category_id', 'bbox', 'score'}}, ...]")
    for n, r in enumerate(results):
        if not (isinstance(r, dict) and {"image_id", "category_id", "bbox", "score"} <= r.keys()
                and isinstance(r["bbox"], list) and len(r["bbox"]) == 4
                and all(isinstance(v, (int, float)) and np.isfinite(v) for v in [*r["bbox"], r["score"]])):
            raise UserError(f"{path}: result {n} is not {{'image_id', 'category_id', 'bbox': [x, y, w, h], "
                            "'score'}} with finite numbers")
    return results


def evaluate_coco(dataset_or_coco_json: Dataset | str | Path, detections: Mapping | str | Path | list,
                  keep_curves: bool = True) -> EvalResult:
    """COCO box mAP via ``pycocotools`` and its 12 summary numbers (in ``extra["stats"]``).

    dataset_or_coco_json: a COCO instances JSON path (official areas) or a :class:`Dataset`.
    detections: image id -> ``(boxes float (N, 4) project xyxy, scores (N,), labels (N,) 1..C)``, a COCO
        results list, or the path of a COCO results JSON.
    Per-class AP (keyed by category id) is the mean of COCOeval's precision over IoU .50:.95 and recall,
    all areas, 100 detections, for the categories with ground truth; mAP equals stats[0].
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if isinstance(dataset_or_coco_json, Dataset):
        gt_dict = dataset_to_coco(dataset_or_coco_json)
        vocab = dataset_or_coco_json.vocab
        image_ids = _coco_image_ids(dataset_or_coco_json)
    else:
        gt_dict = load_coco_json(dataset_or_coco_json)
        vocab = coco_vocabulary(gt_dict["categories"])
        image_ids = None
        if any(ann.get("id") == 0 for ann in gt_dict["annotations"]):
            warnings.warn(f"{dataset_or_coco_json}: an annotation has id 0; pycocotools counts a match to it as a "
                          "false positive (pass the dataset from read_coco to number annotations from 1)",
                          stacklevel=2)
    if isinstance(detections, (str, Path)):
        results = _load_results(Path(detections))
    elif isinstance(detections, list):
        results = detections
    else:
        results = detections_to_coco(detections, vocab=vocab, image_ids=image_ids)
    known_images = {img["id"] for img in gt_dict["images"]}
    listed = [r for r in results if r["image_id"] in known_images]
    num_dropped = len(results) - len(listed)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        if listed:
            coco_dt = coco_gt.loadRes([dict(r) for r in listed])
        else:
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt_dict["images"], "categories": gt_dict["categories"], "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(s) for s in evaluator.stats]
    precision = evaluator.eval["precision"]  # (T iou thresholds, R recall points, K classes, A areas, M maxDets)
    cat_ids = list(evaluator.params.catIds)
    recall_points = np.asarray(evaluator.params.recThrs)
    aps, curves, positives = {}, {}, {}
    num_gt = {}
    for ann in gt_dict["annotations"]:
        if not ann.get("iscrowd", 0):
            num_gt[ann["category_id"]] = num_gt.get(ann["category_id"], 0) + 1
    for k, cid in enumerate(cat_ids):
        p = precision[:, :, k, 0, -1]
        if not (p > -1).any():
            continue
        aps[int(cid)] = float(np.mean(p[p > -1]))
        positives[int(cid)] = num_gt.get(cid, 0)
        if keep_curves:
            curves[int(cid)] = (recall_points, precision[0, :, k, 0, -1].clip(0))  # the IoU 0.5 curve
    names = {int(c["id"]): str(c["name"]) for c in gt_dict["categories"]}
    summary = [line for line in log.getvalue().splitlines() if line.startswith(" Average")]
    extra = {"stats": dict(zip(STAT_NAMES, stats)), "summary": summary, "num_dropped_unlisted": num_dropped}
    return EvalResult(
        protocol="coco", variant=VARIANT, mAP=stats[0], ap=aps, positives=positives, class_names=names,
        num_images=len(gt_dict["images"]), num_predictions=len(listed), curves=curves, extra=extra,
    )


def coco_results_to_detections(results: list[dict] | str | Path, dataset: Dataset) -> dict:
    """Image id -> ``(boxes float64 (N, 4) project xyxy, scores (N,), labels (N,) 1..C)`` of COCO results
    (a list or a results JSON path) on ``dataset``; results of unknown categories are a :class:`UserError`."""
    if isinstance(results, (str, Path)):
        results = _load_results(Path(results))
    back = {coco_id: image_id for image_id, coco_id in _coco_image_ids(dataset).items()}
    grouped: dict = {}
    for n, r in enumerate(results):
        try:
            label = dataset.vocab.label_of_id(int(r["category_id"]))
        except KeyError:
            raise UserError(f"result {n}: category {r['category_id']} is not in the dataset's vocabulary") from None
        grouped.setdefault(back.get(r["image_id"], r["image_id"]), []).append((r["bbox"], r["score"], label))
    out = {}
    for image_id, items in grouped.items():
        boxes = coco_to_xyxy(np.asarray([b for b, _, _ in items], dtype=np.float64).reshape(-1, 4))
        out[image_id] = (boxes, np.asarray([s for _, s, _ in items], dtype=np.float64),
                         np.asarray([lab for _, _, lab in items], dtype=np.int64))
    return out
