"""COCO evaluation: the numbers equal pycocotools' own COCOeval run on coco128 with generated predictions."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from detector.boxes import coco_to_xyxy
from detector.data import read_coco, read_voc
from detector.evaluation import coco_results_to_detections, evaluate_coco, write_coco_results
from detector.evaluation.coco import STAT_NAMES


def generated_results(instances: dict, seed: int = 0) -> list[dict]:
    """Jittered copies of most ground-truth boxes (some with a wrong class) plus random boxes."""
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in instances["categories"]]
    sizes = {img["id"]: (img["width"], img["height"]) for img in instances["images"]}
    results = []
    for ann in instances["annotations"]:
        if rng.random() < 0.8:
            x, y, w, h = ann["bbox"]
            jitter = rng.normal(0, 0.08, size=4) * [w, h, w, h]
            cat = ann["category_id"] if rng.random() < 0.9 else int(rng.choice(cats))
            results.append({"image_id": ann["image_id"], "category_id": cat, "score": float(rng.random()),
                            "bbox": [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)]})
    for image_id, (width, height) in sizes.items():
        for _ in range(3):
            w, h = rng.uniform(10, width / 2), rng.uniform(10, height / 2)
            results.append({"image_id": image_id, "category_id": int(rng.choice(cats)), "score": float(rng.random()),
                            "bbox": [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]})
    return results


def pycocotools_stats(gt_path, results_path) -> np.ndarray:
    """The reference: pycocotools used the documented way, on the files."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(str(results_path)), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.fixture(scope="module")
def coco128(shared_data, tmp_path_factory):
    gt_path = shared_data / "coco128" / "annotations" / "instances.json"
    results = generated_results(json.loads(gt_path.read_text()))
    results_path = tmp_path_factory.mktemp("coco") / "results.json"
    results_path.write_text(json.dumps(results))
    return gt_path, results_path, results


def test_coco128_equals_pycocotools(coco128):
    gt_path, results_path, _ = coco128
    expected = pycocotools_stats(gt_path, results_path)
    r = evaluate_coco(gt_path, results_path)
    got = np.array([r.extra["stats"][k] for k in STAT_NAMES])
    np.testing.assert_array_equal(got, expected)
    assert r.mAP == expected[0]
    assert 0.05 < r.mAP < 0.95  # the generated predictions are neither useless nor perfect
    # Per-class APs (categories with ground truth: 71 of 80 in coco128) average to stats[0].
    assert len(r.ap) == 71
    assert np.mean(list(r.ap.values())) == pytest.approx(expected[0], abs=1e-12)
    assert len(r.extra["summary"]) == 12


def test_in_memory_detections_and_writer_agree(coco128, shared_data, tmp_path):
    gt_path, results_path, results = coco128
    ds = read_coco(gt_path, image_root=shared_data / "coco128" / "images")
    detections = coco_results_to_detections(results_path, ds)
    r_mem = evaluate_coco(gt_path, detections)
    r_file = evaluate_coco(gt_path, results_path)
    for k in STAT_NAMES:
        assert r_mem.extra["stats"][k] == pytest.approx(r_file.extra["stats"][k], abs=1e-9)
    out = tmp_path / "written.json"
    assert write_coco_results(out, detections, ds) == len(results)
    written = json.loads(out.read_text())
    assert written[0]["category_id"] == results[0]["category_id"]
    np.testing.assert_allclose(coco_to_xyxy(np.array(written[0]["bbox"])[None]),
                               coco_to_xyxy(np.array(results[0]["bbox"])[None]), atol=1e-9)


def test_dataset_ground_truth_and_empty_detections(chess, shared_data, tmp_path):
    # Chess areas are box areas (w*h), so the dataset route (box areas) equals the JSON route here, once
    # annotation ids start at 1: the Roboflow file starts at 0, and pycocotools records matches by
    # annotation id with 0 meaning "unmatched", so a match to annotation 0 counts as a false positive.
    instances = json.loads((chess / "valid" / "_annotations.coco.json").read_text())
    for ann in instances["annotations"]:
        ann["id"] += 1
    gt_path = tmp_path / "valid.json"
    gt_path.write_text(json.dumps(instances))
    # 'pieces' (id 0) is not in the dataset's vocabulary (a parent category without boxes): no results for it.
    results = [x for x in generated_results(instances, seed=1) if x["category_id"] != 0]
    ds = read_coco(gt_path)
    r_json = evaluate_coco(gt_path, results)
    r_ds = evaluate_coco(ds, coco_results_to_detections(results, ds))
    for k in STAT_NAMES:
        assert r_ds.extra["stats"][k] == pytest.approx(r_json.extra["stats"][k], abs=1e-9)
    assert 0.05 < r_ds.mAP < 0.95
    assert r_json.num_images == r_ds.num_images == 58
    assert evaluate_coco(ds, {}).mAP == 0.0
    # VOC ground truth (string image ids, difficult -> crowd) under COCO: perfect detections give AP 1.
    bccd = read_voc(shared_data / "bccd", "test")
    perfect = {r.image_id: (r.gt_boxes, np.ones(len(r.gt_labels)), r.gt_labels) for r in bccd.records}
    assert evaluate_coco(bccd, perfect).mAP == pytest.approx(1.0)
