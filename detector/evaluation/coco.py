"""COCO evaluation through ``pycocotools.cocoeval.COCOeval`` itself (not re-implemented).

Ground truth is either a COCO instances JSON (used as is, so segment areas drive the area ranges,
exactly as the official evaluation) or a :class:`Dataset` from any reader, converted to an in-memory
COCO ground truth: box areas stand in for segment areas, VOC ``difficult`` objects become
``iscrowd`` (ignored regions, as in common VOC-to-COCO conversions), string image ids are numbered
1..N in record order. Detections are the standard COCO results JSON (a list of ``{"image_id",
"category_id", "bbox": [x, y, w, h], "score"}``) or the in-memory mapping.

Results are checked as the ILSVRC and VOC readers check lines (:func:`check_results`), so the mAP never
moves without a word: a malformed result, a non-finite number, a category that is not in the ground
truth, or a negative width or height is a :class:`UserError` naming the result's index (pycocotools
would ignore the category, and count a negative box as outside every area range). Results on images
that are not in the ground truth are dropped and counted with a warning (``num_dropped_unlisted``), as
in the other protocols; boxes of zero width or height are scored as pycocotools does (never a match,
so false positives) and counted with a warning (``num_empty_boxes``).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from detector.base.boxes import coco_to_xyxy, xyxy_to_coco
from detector.base.errors import UserError
from detector.base.files import atomic_open
from detector.data.coco import coco_vocabulary, load_coco_json, read_json_file
from detector.data.records import Dataset
from detector.evaluation.detections import unpack
from detector.evaluation.result import EvalResult

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
    with atomic_open(path) as f:
        json.dump(results, f)
    return len(results)


def _load_results(path: Path) -> list[dict]:
    results = read_json_file(path, "COCO results file")
    if not isinstance(results, list):
        raise UserError(f"{path}: expected a COCO results list [{{'image_id', 'category_id', 'bbox', 'score'}}, ...]")
    return results


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _result_problem(r, category_ids) -> str | None:
    """What is wrong with one COCO result, or None (see :func:`check_results`)."""
    if not (isinstance(r, dict) and {"image_id", "category_id", "bbox", "score"} <= r.keys()):
        return "is not {'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}"
    bbox, cid, image_id = r["bbox"], r["category_id"], r["image_id"]
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
            and _is_number(r["score"])):
        return "needs 'bbox': [x, y, w, h] and 'score' as numbers"
    if not all(np.isfinite(v) for v in [*bbox, r["score"]]):
        return "has a NaN or infinite number"
    if not isinstance(image_id, (int, str, np.integer)) or isinstance(image_id, bool):
        return f"image_id {image_id!r} is not an integer"
    if not isinstance(cid, (int, np.integer)) or isinstance(cid, bool) or cid not in category_ids:
        return f"category_id {cid!r} is not a category of the ground truth ({len(category_ids)} categories)"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"negative width or height {bbox[2]!r} x {bbox[3]!r}"
    return None


def check_results(results: list, source: str, category_ids, image_ids=None) -> tuple[list, dict]:
    """Check a COCO results list: returns the results on known images (all if ``image_ids`` is None) and
    counts ``{"num_dropped_unlisted", "num_empty_boxes"}``, each with a warning when not zero.

    Refused with a :class:`UserError` naming ``source`` and the result's index (0-based): a result that
    is not ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``, a NaN or infinite number, a
    ``category_id`` not in ``category_ids``, a negative width or height.
    """
    category_ids = {int(c) for c in category_ids}
    listed, empty, first_empty = [], 0, None
    for n, r in enumerate(results):
        problem = _result_problem(r, category_ids)
        if problem is not None:
            raise UserError(f"{source}: result {n} {problem}; fix or remove it")
        if r["bbox"][2] == 0 or r["bbox"][3] == 0:
            empty += 1
            first_empty = n if first_empty is None else first_empty
        if image_ids is None or r["image_id"] in image_ids:
            listed.append(r)
    dropped = len(results) - len(listed)
    if dropped:
        warnings.warn(f"{source}: dropped {dropped} results on images that are not in the ground truth",
                      stacklevel=3)
    if empty:
        warnings.warn(f"{source}: {empty} results have zero width or height (first: result {first_empty}); "
                      "scored as pycocotools does, as false positives", stacklevel=3)
    return listed, {"num_dropped_unlisted": dropped, "num_empty_boxes": empty}


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
    skipped = 0  # in-memory detections of images the dataset does not have
    if isinstance(detections, (str, Path)):
        source, results = str(detections), _load_results(Path(detections))
    elif isinstance(detections, list):
        source, results = "COCO results", detections
    else:
        source, results = "detections", detections_to_coco(detections, vocab=vocab, image_ids=image_ids)
        if image_ids is not None:
            skipped = sum(len(unpack(v)[1]) for k, v in detections.items() if k not in image_ids)
            if skipped:
                warnings.warn(f"dropped {skipped} detections on images that are not in the dataset", stacklevel=2)
    known_images = {img["id"] for img in gt_dict["images"]}
    listed, counts = check_results(results, source, [c["id"] for c in gt_dict["categories"]], known_images)
    num_dropped = counts["num_dropped_unlisted"] + skipped
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
    extra = {"stats": dict(zip(STAT_NAMES, stats)), "summary": summary, "num_dropped_unlisted": num_dropped,
             "num_empty_boxes": counts["num_empty_boxes"]}
    return EvalResult(
        protocol="coco", variant=VARIANT, mAP=stats[0], ap=aps, positives=positives, class_names=names,
        num_images=len(gt_dict["images"]), num_predictions=len(listed), curves=curves, extra=extra,
    )


def coco_results_to_detections(results: list[dict] | str | Path, dataset: Dataset) -> dict:
    """Image id -> ``(boxes float64 (N, 4) project xyxy, scores (N,), labels (N,) 1..C)`` of COCO results
    (a list or a results JSON path) on ``dataset``. Refused as by :func:`check_results` (e.g. a category not
    in the dataset's vocabulary is a :class:`UserError` with the result's index); results on images the
    dataset lacks are kept under their id, for the evaluator to drop and count."""
    source = str(results) if isinstance(results, (str, Path)) else "COCO results"
    if isinstance(results, (str, Path)):
        results = _load_results(Path(results))
    category_ids = {int(c) for c in dataset.vocab.ids}
    for n, r in enumerate(results):  # refused as check_results does; the evaluator counts and warns
        problem = _result_problem(r, category_ids)
        if problem is not None:
            raise UserError(f"{source}: result {n} {problem}; fix or remove it")
    back = {coco_id: image_id for image_id, coco_id in _coco_image_ids(dataset).items()}
    grouped: dict = {}
    for r in results:
        label = dataset.vocab.label_of_id(int(r["category_id"]))
        grouped.setdefault(back.get(r["image_id"], r["image_id"]), []).append((r["bbox"], r["score"], label))
    out = {}
    for image_id, items in grouped.items():
        boxes = coco_to_xyxy(np.asarray([b for b, _, _ in items], dtype=np.float64).reshape(-1, 4))
        out[image_id] = (boxes, np.asarray([s for _, s, _ in items], dtype=np.float64),
                         np.asarray([lab for _, _, lab in items], dtype=np.int64))
    return out
