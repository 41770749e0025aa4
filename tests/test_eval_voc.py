"""PASCAL VOC evaluation: both AP variants, difficult objects and the VOC matching rule, computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from detector.base.boxes import voc_to_xyxy
from detector.base.vocab import Vocabulary
from detector.data import Dataset, ImageRecord, read_coco, read_voc
from detector.evaluation import evaluate_ilsvrc, evaluate_voc, read_voc_predictions
from detector.evaluation.ap import average_precision, average_precision_11point, precision_recall

VOCAB = Vocabulary(ids=(1, 2), names=("cat", "dog"))


def dataset(images: dict) -> Dataset:
    """images: id -> [(label, [xmin, ymin, xmax, ymax] 1-based inclusive, difficult), ...]."""
    return Dataset(records=[
        ImageRecord(image_id=i, file_name=f"{i}.jpg",
                    gt_boxes=voc_to_xyxy(np.asarray([b for _, b, _ in objs], np.float64).reshape(-1, 4)),
                    gt_labels=[lab for lab, _, _ in objs], difficult=[d for _, _, d in objs])
        for i, objs in images.items()], vocab=VOCAB)


def dets(*rows) -> dict:
    out: dict = {}
    for image_id, label, score, box in rows:
        out.setdefault(image_id, []).append((label, score, box))
    return {i: (voc_to_xyxy(np.asarray([b for _, _, b in r], np.float64)), np.asarray([s for _, s, _ in r]),
                np.asarray([lab for lab, _, _ in r])) for i, r in out.items()}


def test_ap_variants_by_hand():
    # tp [1, 0, 1] with 2 positives: recall [.5, .5, 1], precision [1, .5, 2/3].
    recall, precision = precision_recall(np.array([1, 0, 1], bool), 2)
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3])
    # All-point: recall 0 -> .5 at precision 1, .5 -> 1 at 2/3: 0.5 + 1/3.
    assert average_precision(recall, precision) == pytest.approx(0.5 + 1 / 3)
    # 11-point: t = 0..0.5 (6 points) -> 1; t = 0.6..1 (5 points) -> 2/3: (6 + 10/3) / 11.
    assert average_precision_11point(recall, precision) == pytest.approx((6 + 10 / 3) / 11)
    # No detections: both 0.
    assert average_precision(np.zeros(0), np.zeros(0)) == 0.0
    assert average_precision_11point(np.zeros(0), np.zeros(0)) == 0.0


def test_11_point_threshold_is_k_over_10():
    # 3 TPs of 10 positives, then a FP: recall reaches exactly 3/10 at precision 1. t = 0, .1, .2, .3
    # count (4 of 11); with t = 3 * 0.1 = 0.30000000000000004 only 3 would.
    recall, precision = precision_recall(np.array([1, 1, 1, 0], bool), 10)
    assert average_precision_11point(recall, precision) == pytest.approx(4 / 11)


def test_difficult_objects_are_neither_positive_nor_false_positive():
    ds = dataset({"a": [(1, [1, 1, 100, 100], True), (1, [201, 201, 300, 300], False)]})
    # det on the difficult object, ranked first: ignored; det on the other: TP. 1 positive -> AP 1.
    r = evaluate_voc(ds, dets(("a", 1, 0.9, [1, 1, 100, 100]), ("a", 1, 0.8, [201, 201, 300, 300])))
    assert r.positives == {1: 1} and r.ap[1] == pytest.approx(1.0)
    assert r.extra["num_ignored_difficult"] == 1
    # A FP ranked first, then the TP (the difficult object is not detected, and is not missed either).
    r = evaluate_voc(ds, dets(("a", 1, 0.95, [500, 500, 600, 600]), ("a", 1, 0.8, [201, 201, 300, 300])))
    # tp [0, 1], 1 positive: recall [0, 1], precision [0, .5] -> AP 0.5.
    assert r.ap[1] == pytest.approx(0.5)


def test_voc_takes_the_best_object_even_if_detected():
    # Objects A [1,1,100,100], B [21,1,120,100]; det1 = A; det2 [9,1,108,100] overlaps A 0.852, B 0.786.
    # VOC compares det2 with every object, picks A (already detected) -> duplicate, FP: tp [1, 0],
    # 2 positives -> all-point AP 0.5. (ILSVRC would give det2 to B: AP 1; see test_eval_ilsvrc.)
    ds = dataset({"a": [(1, [1, 1, 100, 100], False), (1, [21, 1, 120, 100], False)]})
    rows = [("a", 1, 0.9, [1, 1, 100, 100]), ("a", 1, 0.8, [9, 1, 108, 100])]
    assert evaluate_voc(ds, dets(*rows)).ap[1] == pytest.approx(0.5)
    # 11-point: t <= .5 -> 1 (6 points), t > .5 -> 0: 6/11.
    assert evaluate_voc(ds, dets(*rows), use_07_metric=True).ap[1] == pytest.approx(6 / 11)
    ilsvrc_ds = Dataset(records=[ImageRecord(image_id=1, file_name="a", gt_boxes=ds[0].gt_boxes,
                                             gt_labels=ds[0].gt_labels)], vocab=VOCAB)
    assert evaluate_ilsvrc(ilsvrc_ds, {1: dets(*rows)["a"]}).ap[1] == pytest.approx(1.0)


def test_iou_threshold_is_inclusive_with_inclusive_areas():
    ds = dataset({"a": [(2, [1, 1, 10, 10], False)]})
    # [1,1,10,20]: 100 / 200 = 0.5 -> a match ([0.5, 1]); [1,1,10,21]: 100 / 210 -> not.
    assert evaluate_voc(ds, dets(("a", 2, 0.9, [1, 1, 10, 20]))).ap[2] == pytest.approx(1.0)
    assert evaluate_voc(ds, dets(("a", 2, 0.9, [1, 1, 10, 21]))).ap[2] == 0.0
    assert evaluate_voc(ds, dets(("a", 2, 0.9, [1, 1, 10, 21])), iou_threshold=0.45).ap[2] == pytest.approx(1.0)


def test_wrong_class_and_other_images_are_false_positives():
    ds = dataset({"a": [(1, [1, 1, 100, 100], False)], "b": []})
    r = evaluate_voc(ds, dets(("b", 1, 0.9, [1, 1, 100, 100]), ("a", 2, 0.8, [1, 1, 100, 100]),
                              ("a", 1, 0.7, [1, 1, 100, 100])))
    # cat: tp [0, 1] (the empty image's detection first) -> 0.5; dog has no positives -> no AP.
    assert r.ap == {1: pytest.approx(0.5)} and r.mAP == pytest.approx(0.5)
    assert r.variant.startswith("all-point (VOC2010+)")
    assert evaluate_voc(ds, {}, use_07_metric=True).variant.startswith("11-point (VOC2007)")


def _perfect(ds: Dataset) -> dict:
    return {r.image_id: (r.gt_boxes, np.linspace(1, 0.5, len(r.gt_labels)), r.gt_labels) for r in ds.records}


def test_ground_truth_from_every_reader(shared_data, chess):
    # Detections equal to the ground truth give AP 1 for every class, whatever reader made the dataset.
    bccd = read_voc(shared_data / "bccd", "test")
    for use_07 in (False, True):
        r = evaluate_voc(bccd, _perfect(bccd), use_07_metric=use_07)
        assert r.mAP == pytest.approx(1.0) and set(r.ap) == {1, 2, 3}
    pieces = read_coco(chess / "valid" / "_annotations.coco.json")
    r = evaluate_voc(pieces, _perfect(pieces))
    assert r.mAP == pytest.approx(1.0) and len(r.ap) == 12  # 'bishop' (id 1) has no box in valid
    assert evaluate_ilsvrc(pieces, _perfect(pieces)).mAP == pytest.approx(1.0)


def test_voc_prediction_file(tmp_path, shared_data):
    ds = read_voc(shared_data / "bccd", "test")
    rec = ds[0]
    path = tmp_path / "pred.txt"
    box = rec.gt_boxes[0] + np.array([1, 1, 0, 0])  # back to 1-based inclusive
    path.write_text(f"{rec.image_id} {ds.vocab.name_of_label(int(rec.gt_labels[0]))} 0.9 "
                    f"{box[0]} {box[1]} {box[2]} {box[3]}\n")
    dets_read = read_voc_predictions(path, ds)
    np.testing.assert_allclose(dets_read[rec.image_id][0], rec.gt_boxes[:1])
    path.write_text("x RBC 0.9 1 1 10\n")
    with pytest.raises(Exception, match="pred.txt:1: expected 7 columns"):
        read_voc_predictions(path, ds)
    path.write_text("\nx Cat 0.9 1 1 10 10\n")
    with pytest.raises(Exception, match="pred.txt:2: class 'Cat'"):
        read_voc_predictions(path, ds)
