"""COCO evaluation: ``pycocotools``' COCOeval, run by ``faster-coco-eval`` (its C++ port, measured equal).

Ground truth is either a COCO instances JSON (used as is, so segment areas drive the area ranges,
exactly as the official evaluation) or a :class:`Dataset` from any reader, converted to an in-memory
COCO ground truth: box areas stand in for segment areas, VOC ``difficult`` objects become
``iscrowd`` (ignored regions, as in common VOC-to-COCO conversions), string image ids are numbered
1..N in record order. Detections are the standard COCO results JSON (a list of ``{"image_id",
"category_id", "bbox": [x, y, w, h], "score"}``) or the in-memory mapping.

At ILSVRC scale (millions of results) nothing holds a Python dict per result longer than it must: the
results file is read into arrays (:mod:`detector.evaluation.coco_results`), checked and filtered there,
and only the results on known images become the dicts COCOeval indexes. ``faster-coco-eval`` runs
COCOeval's ``evaluate``/``accumulate`` in C++ with pycocotools' rules (the same matching, ignore and
tie-breaking), which keeps 2M results at a fraction of pycocotools' time and memory; the tests hold its
12 numbers equal to pycocotools' own (``backend="pycocotools"`` runs pycocotools itself).

Results are checked as the ILSVRC and VOC readers check lines, so the mAP never moves without a word: a
malformed result, a non-finite number, a category that is not in the ground truth, or a negative width
or height is a :class:`UserError` naming the result's index (pycocotools would ignore the category, and
count a negative box as outside every area range). Results on images that are not in the ground truth
are dropped and counted with a warning (``num_dropped_unlisted``), as in the other protocols; boxes of
zero width or height are scored as pycocotools does (never a match, so false positives) and counted with
a warning (``num_empty_boxes``).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from detector.base.boxes import coco_to_xyxy, xyxy_to_coco
from detector.data.coco import coco_vocabulary, load_coco_json
from detector.data.records import Dataset
from detector.evaluation.coco_results import (
    CocoResults,
    check_coco_results,
    read_coco_results,
    write_coco_result_chunks,
)
from detector.evaluation.detections import unpack, warn_outside_dataset
from detector.evaluation.result import EvalResult

STAT_NAMES = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)
VARIANT = "pycocotools COCOeval, AP at IoU .50:.95, all areas, 100 detections"
BACKENDS = ("faster-coco-eval", "pycocotools")


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


def detections_to_results(detections: Mapping, vocab, image_ids: dict | None = None,
                          order=None) -> tuple[CocoResults, int]:
    """COCO result arrays of in-memory detections (labels ``1..C`` -> category ids, xyxy -> xywh), and the
    number of detections left out because their image is not in ``image_ids`` (dataset id -> COCO id;
    None: every image, under its own id). ``order``: the image ids to take, in that order (default: the
    mapping's)."""
    parts = list(_result_parts(detections, vocab, image_ids, order))
    return CocoResults.concatenate(parts), _num_unlisted(detections, image_ids)


def _num_unlisted(detections: Mapping, image_ids: dict | None) -> int:
    if image_ids is None:
        return 0
    return sum(len(unpack(v)[1]) for k, v in detections.items() if k not in image_ids)


def _result_parts(detections: Mapping, vocab, image_ids: dict | None, order=None) -> Iterator[CocoResults]:
    """One :class:`CocoResults` per image of ``detections`` (those in ``image_ids`` when given)."""
    category_of = np.asarray(vocab.ids, dtype=np.int64)
    keys = detections.keys() if order is None else (k for k in order if k in detections)
    for image_id in keys:
        if image_ids is not None and image_id not in image_ids:
            continue
        boxes, scores, labels = unpack(detections[image_id])
        if len(labels) and (labels.min() < 1 or labels.max() > len(category_of)):
            raise ValueError(f"detections of image {image_id}: labels must be in 1..{len(category_of)}")
        coco_id = image_ids[image_id] if image_ids is not None else int(image_id)
        yield CocoResults(np.full(len(scores), coco_id, dtype=np.int64), category_of[labels - 1],
                          xyxy_to_coco(boxes), scores)


def detections_to_coco(detections: Mapping, dataset: Dataset | None = None, vocab=None,
                       image_ids: dict | None = None) -> list[dict]:
    """COCO results list of in-memory detections, a dict per result (small cases; the evaluator and the
    writer use the arrays of :func:`detections_to_results`)."""
    vocab = vocab or dataset.vocab
    image_ids = image_ids or (_coco_image_ids(dataset) if dataset is not None else None)
    results, _ = detections_to_results(detections, vocab, image_ids)
    return [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in zip(
        results.image_ids.tolist(), results.category_ids.tolist(), results.boxes.tolist(), results.scores.tolist())]


def write_coco_results(path: str | Path, detections: Mapping, dataset: Dataset) -> int:
    """Write detections (image id -> ``(boxes float (N, 4) project xyxy, scores (N,), labels (N,) 1..C)``) as
    a standard COCO results JSON, streamed (one image at a time, in the dataset's record order, one result
    a line) and atomically; returns the number of results written.

    Detections of images that are not in ``dataset`` are not written: they are counted and said in a
    warning (``dropped N detections on M images that are not in the dataset``), as the evaluators do.
    Non-finite boxes or scores, or labels outside ``1..C``, are a ``ValueError`` (nothing is written).
    """
    image_ids = _coco_image_ids(dataset)
    warn_outside_dataset(path, detections, image_ids)
    order = [r.image_id for r in dataset.records]
    return write_coco_result_chunks(path, _result_parts(detections, dataset.vocab, image_ids, order))


def evaluate_coco(dataset_or_coco_json: Dataset | str | Path, detections: Mapping | str | Path | list,
                  keep_curves: bool = True, backend: str = "faster-coco-eval") -> EvalResult:
    """COCO box mAP by COCOeval and its 12 summary numbers (in ``extra["stats"]``).

    dataset_or_coco_json: a COCO instances JSON path (official areas) or a :class:`Dataset`.
    detections: image id -> ``(boxes float (N, 4) project xyxy, scores (N,), labels (N,) 1..C)``, a COCO
        results list, or the path of a COCO results JSON (read in chunks into arrays).
    backend: ``"faster-coco-eval"`` (default: C++, the same numbers) or ``"pycocotools"`` (the reference).
    Per-class AP (keyed by category id) is the mean of COCOeval's precision over IoU .50:.95 and recall,
    all areas, 100 detections, for the categories with ground truth; mAP equals stats[0].
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
    category_ids = [c["id"] for c in gt_dict["categories"]]
    skipped = 0  # in-memory detections of images the dataset does not have
    if isinstance(detections, (str, Path, list)):
        source = str(detections) if isinstance(detections, (str, Path)) else "COCO results"
        read = read_coco_results(detections, category_ids)
        results, num_empty, first_empty = read.results, read.num_empty_boxes, read.first_empty
    else:
        source = "detections"
        results, skipped = detections_to_results(detections, vocab, image_ids)
        if skipped:
            warnings.warn(f"dropped {skipped} detections on images that are not in the dataset", stacklevel=2)
        num_empty, first_empty = check_coco_results(results, source, category_ids)
    known = np.isin(results.image_ids, np.asarray([int(img["id"]) for img in gt_dict["images"]], dtype=np.int64))
    unlisted = len(results) - int(known.sum())
    if unlisted:
        warnings.warn(f"{source}: dropped {unlisted} results on images that are not in the ground truth",
                      stacklevel=2)
        results = results.select(known)
    if num_empty:
        warnings.warn(f"{source}: {num_empty} results have zero width or height (first: result {first_empty}); "
                      "scored as pycocotools does, as false positives", stacklevel=2)
    num_predictions = len(results)
    run = _run_pycocotools if backend == "pycocotools" else _run_by_category_groups
    evaluator, summary = run(gt_dict, results)
    del results
    stats = [float(s) for s in evaluator.stats[:len(STAT_NAMES)]]
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
    extra = {"stats": dict(zip(STAT_NAMES, stats)), "summary": summary, "num_dropped_unlisted": unlisted + skipped,
             "num_empty_boxes": num_empty, "backend": backend}
    return EvalResult(
        protocol="coco", variant=VARIANT, mAP=stats[0], ap=aps, positives=positives, class_names=names,
        num_images=len(gt_dict["images"]), num_predictions=num_predictions, curves=curves, extra=extra,
    )


def _result_dicts(results: CocoResults, ids: np.ndarray | None = None) -> list[dict]:
    """The annotations COCOeval indexes, a dict per result as ``COCO.loadRes`` makes them (``area`` w*h,
    ``ids`` (default 1..P in order), not crowd), less the box polygon that bbox evaluation never reads."""
    ids = range(1, len(results) + 1) if ids is None else ids.tolist()
    return [{"image_id": i, "category_id": c, "bbox": b, "score": s, "area": b[2] * b[3], "id": n, "iscrowd": 0}
            for n, i, c, b, s in zip(ids, results.image_ids.tolist(), results.category_ids.tolist(),
                                     results.boxes.tolist(), results.scores.tolist())]


def _run_pycocotools(gt_dict: dict, results: CocoResults):
    """pycocotools' COCOeval on every result at once (the reference): ``(evaluator, 12 summary lines)``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        coco_dt = COCO()
        coco_dt.dataset = {"images": gt_dict["images"], "categories": gt_dict["categories"],
                           "annotations": _result_dicts(results)}
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator, [line for line in log.getvalue().splitlines() if line.startswith(" Average")]


GROUP_RESULTS = 250_000  # results per category group: their dicts (~0.6 KB each) are all that is in Python
GROUP_PAIRS = 50_000  # (image, category) pairs per group: at 20k images, 2 categories (less memory, less time)


def _category_groups(cat_ids: np.ndarray, per_category: np.ndarray, num_images: int) -> list[slice]:
    """Consecutive runs of categories with at most ``GROUP_RESULTS`` results (or one category) and at most
    ``GROUP_PAIRS`` image-category pairs each."""
    max_categories = max(1, GROUP_PAIRS // max(num_images, 1))
    groups, start, count = [], 0, 0
    for k, n in enumerate(per_category.tolist()):
        if k > start and (count + n > GROUP_RESULTS or k - start >= max_categories):
            groups.append(slice(start, k))
            start, count = k, 0
        count += n
    if len(cat_ids) > start:
        groups.append(slice(start, len(cat_ids)))
    return groups


def _run_by_category_groups(gt_dict: dict, results: CocoResults):
    """COCOeval by ``faster-coco-eval``, a group of categories at a time: ``(evaluator, 12 summary lines)``.

    With ``useCats`` (bbox evaluation), COCOeval's matches and its precision and recall of a category
    depend only on that category's objects and results, so each group is evaluated alone, on the images
    where it has an object or a result (an image with neither is ``None`` in COCOeval's accumulation and
    left out there too; the others keep their order, so equal scores rank as in one run), and its rows of
    the precision and recall tables are put in place. The 12 numbers are then COCOeval's ``summarize`` of
    the whole tables. Only one group's results are Python dicts at a time.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    cat_ids = np.asarray(sorted(int(c["id"]) for c in gt_dict["categories"]), dtype=np.int64)
    categories = {int(c["id"]): c for c in gt_dict["categories"]}
    images = {int(img["id"]): img for img in gt_dict["images"]}
    gt_by_category: dict[int, list[dict]] = {}
    for ann in gt_dict["annotations"]:
        gt_by_category.setdefault(int(ann["category_id"]), []).append(ann)
    order = np.argsort(results.category_ids, kind="stable")  # file order kept within a category
    bounds = np.searchsorted(results.category_ids[order], np.r_[cat_ids, np.iinfo(np.int64).max])
    per_category = np.diff(bounds)
    lines: list[str] = []
    evaluator, precision, recall = None, None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # faster-coco-eval's own note on annotation id 0 (said above)
        for group in _category_groups(cat_ids, per_category, len(images)):
            rows = order[bounds[group.start]:bounds[group.stop]]
            part = results.select(rows)
            gt_anns = [ann for c in cat_ids[group].tolist() for ann in gt_by_category.get(c, [])]
            image_ids = np.union1d(part.image_ids, [int(a["image_id"]) for a in gt_anns]).astype(np.int64).tolist()
            if not image_ids:
                continue  # no object and no result in these categories: COCOeval's -1 (left as is)
            group_categories = [categories[c] for c in cat_ids[group].tolist()]
            coco_gt, coco_dt = COCO(), COCO()
            coco_gt.dataset = {"images": [images[i] for i in image_ids], "categories": group_categories,
                               "annotations": gt_anns}
            coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": group_categories,
                               "annotations": _result_dicts(part, rows + 1)}
            del part
            for coco in (coco_gt, coco_dt):
                coco.print_function = _quiet
                coco.createIndex()
            evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=_quiet)
            evaluator.evaluate()
            evaluator.accumulate()
            if precision is None:
                shape = evaluator.eval["precision"].shape
                precision = np.full((shape[0], shape[1], len(cat_ids), shape[3], shape[4]), -1.0)
                recall = np.full((shape[0], len(cat_ids), shape[3], shape[4]), -1.0)
            precision[:, :, group] = evaluator.eval["precision"]
            recall[:, group] = evaluator.eval["recall"]
            del coco_gt, coco_dt
        if evaluator is None:  # neither objects nor results: COCOeval's tables of -1
            coco_gt = COCO()
            coco_gt.print_function = _quiet
            coco_gt.dataset = {"images": gt_dict["images"], "categories": gt_dict["categories"], "annotations": []}
            coco_gt.createIndex()
            evaluator = COCOeval_faster(coco_gt, coco_gt, iouType="bbox", print_function=_quiet)
            p = evaluator.params
            precision = np.full((len(p.iouThrs), len(p.recThrs), len(cat_ids), len(p.areaRng), len(p.maxDets)), -1.0)
            recall = np.full((len(p.iouThrs), len(cat_ids), len(p.areaRng), len(p.maxDets)), -1.0)
        evaluator.params.catIds = cat_ids.tolist()
        evaluator.params.imgIds = sorted(images)
        evaluator.eval = {**evaluator.eval, "precision": precision, "recall": recall}
        evaluator.print_function = lines.append
        evaluator.summarize()
    summary = [line for line in lines if line.startswith(" Average")]
    return evaluator, summary[:len(STAT_NAMES)]  # faster-coco-eval adds AR at IoU .50 and .75


def _quiet(*_args, **_kwargs) -> None:
    """faster-coco-eval's progress messages, not shown."""


def coco_results_to_detections(results: list[dict] | str | Path, dataset: Dataset) -> dict:
    """Image id -> ``(boxes float64 (N, 4) project xyxy, scores (N,), labels (N,) 1..C)`` of COCO results
    (a list or a results JSON path, read in chunks) on ``dataset``, in file order per image. Refused as by
    :func:`~detector.evaluation.coco_results.read_coco_results` (e.g. a category not in the dataset's
    vocabulary is a :class:`UserError` with the result's index); results on images the dataset lacks are
    kept under their COCO id (a string id under ``OTHER_IMAGE``), for the evaluator to drop and count."""
    results = read_coco_results(results, dataset.vocab.ids).results
    ids = np.asarray(dataset.vocab.ids, dtype=np.int64)
    order = np.argsort(ids)
    labels = order[np.searchsorted(ids, results.category_ids, sorter=order)] + 1  # every id is one (checked)
    back = {coco_id: image_id for image_id, coco_id in _coco_image_ids(dataset).items()}
    by_image = np.argsort(results.image_ids, kind="stable")
    image_ids = results.image_ids[by_image]
    starts = np.flatnonzero(np.r_[True, image_ids[1:] != image_ids[:-1]]) if len(by_image) else np.zeros(0, int)
    boxes = coco_to_xyxy(results.boxes)
    out = {}
    for start, stop in zip(starts.tolist(), np.r_[starts[1:], len(by_image)].astype(int).tolist()):
        idx = by_image[start:stop]
        coco_id = int(image_ids[start])
        out[back.get(coco_id, coco_id)] = (boxes[idx], results.scores[idx], labels[idx].astype(np.int64))
    return out
