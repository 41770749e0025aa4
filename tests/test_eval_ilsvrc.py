"""ILSVRC DET evaluation: one hand-computed case per devkit rule, a brute-force reference on random
cases, and the devkit's demo figures on val2 (../shared/data/README.md, measured with eval_detection.m)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from ilsvrc_reference import reference_ilsvrc  # the loop-by-loop oracle, tests/ilsvrc_reference.py

from detector.base.boxes import voc_to_xyxy
from detector.base.vocab import Vocabulary, read_meta_det
from detector.data import Dataset, IlsvrcDataset, ImageRecord, read_ilsvrc_det
from detector.evaluation import evaluate_ilsvrc, read_ilsvrc_predictions, write_ilsvrc_submission
from detector.evaluation.ilsvrc import inclusive_iou, object_thresholds

VOCAB3 = Vocabulary(ids=(1, 2, 3), names=("a", "b", "c"), wnids=("n1", "n2", "n3"))


def dataset(images: dict, vocab: Vocabulary = VOCAB3) -> Dataset:
    """images: image id -> [(label, [xmin, ymin, xmax, ymax] 1-based inclusive), ...]."""
    records = [ImageRecord(image_id=i, file_name=f"{i}.JPEG",
                           gt_boxes=voc_to_xyxy(np.asarray([b for _, b in objs], np.float64).reshape(-1, 4)),
                           gt_labels=[lab for lab, _ in objs]) for i, objs in images.items()]
    return Dataset(records=records, vocab=vocab)


def dets(*rows) -> dict:
    """rows: (image id, label, score, [xmin, ymin, xmax, ymax] 1-based inclusive) -> detections mapping,
    per image in the given order, boxes in project xyxy."""
    out: dict = {}
    for image_id, label, score, box in rows:
        out.setdefault(image_id, []).append((label, score, box))
    return {i: (voc_to_xyxy(np.asarray([b for _, _, b in r], np.float64)), np.asarray([s for _, s, _ in r]),
                np.asarray([lab for lab, _, _ in r])) for i, r in out.items()}


# --- the rules, by hand -----------------------------------------------------------------------------

def test_inclusive_iou_and_thresholds_by_hand():
    # [1,1,10,10] is 10x10 = 100 pixels; [6,1,15,10] overlaps columns 6..10: 5x10 = 50; union 150.
    iou, ok = inclusive_iou(np.array([[6, 1, 15, 10.0]]), np.array([[1, 1, 10, 10.0]]))
    assert ok[0] and iou[0] == pytest.approx(50 / 150)
    # Touching boxes ([11..20] vs [1..10]) share no pixel: iw = 10 - 11 + 1 = 0, no overlap.
    _, ok = inclusive_iou(np.array([[11, 1, 20, 10.0]]), np.array([[1, 1, 10, 10.0]]))
    assert not ok[0]
    # thr = min(0.5, w*h / ((w+10)(h+10))): 10x10 -> 100/400 = 0.25; 100x100 -> 0.826 -> 0.5;
    # 30x20 -> 600/1200 = 0.5 exactly.
    np.testing.assert_allclose(object_thresholds([[1, 1, 10, 10], [1, 1, 100, 100], [1, 1, 30, 20]]), [0.25, 0.5, 0.5])


def test_small_object_uses_its_own_threshold():
    ds = dataset({1: [(1, [1, 1, 10, 10])]})  # thr 0.25
    # [1,1,20,20] contains the object: IoU 100/400 = 0.25 >= 0.25 -> true positive, AP 1.
    assert evaluate_ilsvrc(ds, dets((1, 1, 0.9, [1, 1, 20, 20]))).ap[1] == pytest.approx(1.0)
    # [1,1,21,20]: IoU 100/420 < 0.25 -> false positive, AP 0.
    assert evaluate_ilsvrc(ds, dets((1, 1, 0.9, [1, 1, 21, 20]))).ap[1] == 0.0
    # A 100x100 object needs 0.5: a box with IoU 0.25 does not match it.
    big = dataset({1: [(1, [1, 1, 100, 100])]})
    assert evaluate_ilsvrc(big, dets((1, 1, 0.9, [1, 1, 200, 200]))).ap[1] == 0.0


def test_duplicates_are_false_positives():
    ds = dataset({1: [(1, [1, 1, 100, 100])]})
    # TP then duplicate: recall [1, 1], precision [1, 0.5] -> AP 1.
    r = evaluate_ilsvrc(ds, dets((1, 1, 0.9, [1, 1, 100, 100]), (1, 1, 0.8, [2, 2, 100, 100])))
    assert r.ap[1] == pytest.approx(1.0)
    # A false positive ranked first: recall [0, 1], precision [0, 0.5] -> AP 0.5.
    r = evaluate_ilsvrc(ds, dets((1, 1, 0.9, [300, 300, 400, 400]), (1, 1, 0.8, [1, 1, 100, 100])))
    assert r.ap[1] == pytest.approx(0.5)


def test_a_detection_takes_the_best_unmatched_object():
    # Objects A [1,1,100,100] and B [21,1,120,100]; det1 = A exactly (IoU 1) takes A.
    # det2 [9,1,108,100]: IoU with A = 92*100 / (10000 + 10000 - 9200) = 0.852, with B = 88*100 / 11200 = 0.786.
    # A is taken, so det2 takes B (0.786 >= 0.5): tp [1, 1] -> AP 1. (VOC would call det2 a duplicate of A.)
    ds = dataset({1: [(1, [1, 1, 100, 100]), (1, [21, 1, 120, 100])]})
    r = evaluate_ilsvrc(ds, dets((1, 1, 0.9, [1, 1, 100, 100]), (1, 1, 0.8, [9, 1, 108, 100])))
    assert r.ap[1] == pytest.approx(1.0)
    # det2 [-40,1,59,100] instead: A is taken; B overlaps 39 columns: 3900 / 16100 = 0.242 < 0.5 -> FP.
    # tp [1, 0], 2 positives: recall [.5, .5], precision [1, .5] -> AP 0.5.
    r = evaluate_ilsvrc(ds, dets((1, 1, 0.9, [1, 1, 100, 100]), (1, 1, 0.8, [-40, 1, 59, 100])))
    assert r.ap[1] == pytest.approx(0.5)


def test_equal_iou_goes_to_the_earlier_object():
    # Objects [1,1,10,10] and [11,1,20,10] (thr 0.25 each). det1 [6,1,15,10] has IoU 1/3 with both:
    # the earlier object wins (a later one must be strictly larger). det2 = the first object exactly,
    # which is now taken; the second object does not overlap it -> FP. tp [1, 0]: AP 0.5 (it would be 1
    # if det1 had taken the later object).
    ds = dataset({1: [(1, [1, 1, 10, 10]), (1, [11, 1, 20, 10])]})
    r = evaluate_ilsvrc(ds, dets((1, 1, 0.9, [6, 1, 15, 10]), (1, 1, 0.8, [1, 1, 10, 10])))
    assert r.ap[1] == pytest.approx(0.5)
    ds_swapped = dataset({1: [(1, [11, 1, 20, 10]), (1, [1, 1, 10, 10])]})
    r = evaluate_ilsvrc(ds_swapped, dets((1, 1, 0.9, [6, 1, 15, 10]), (1, 1, 0.8, [1, 1, 10, 10])))
    assert r.ap[1] == pytest.approx(1.0)


def test_ties_keep_image_id_then_given_order():
    # Image 1: an object and a FP detection (conf 0.5); image 2: an object and a TP detection (conf 0.5).
    # Global order: image ids ascending, so image 1's FP ranks first: tp [0, 1], 2 positives ->
    # recall [0, .5], precision [0, .5] -> AP 0.25, whatever the order of the mapping.
    ds = dataset({2: [(1, [1, 1, 100, 100])], 1: [(1, [1, 1, 100, 100])]})
    rows = [(2, 1, 0.5, [1, 1, 100, 100]), (1, 1, 0.5, [300, 300, 400, 400])]
    assert evaluate_ilsvrc(ds, dets(*rows)).ap[1] == pytest.approx(0.25)
    assert evaluate_ilsvrc(ds, dets(*rows[::-1])).ap[1] == pytest.approx(0.25)
    # Within one image, equal confidences keep the given order: the first detection takes the object.
    one = dataset({1: [(1, [1, 1, 100, 100])], 2: [(1, [1, 1, 100, 100])]})
    first_fp = dets((1, 1, 0.5, [300, 300, 400, 400]), (1, 1, 0.5, [1, 1, 100, 100]))
    first_tp = dets((1, 1, 0.5, [1, 1, 100, 100]), (1, 1, 0.5, [300, 300, 400, 400]))
    assert evaluate_ilsvrc(one, first_fp).ap[1] == pytest.approx(0.25)  # tp [0, 1]
    assert evaluate_ilsvrc(one, first_tp).ap[1] == pytest.approx(0.5)  # tp [1, 0]: recall .5 at precision 1


def test_blacklist_ignores_detections_and_positives():
    # Image 1 has an 'a' object, image 2 has an 'a' object and is blacklisted for 'a'.
    ds = dataset({1: [(1, [1, 1, 100, 100])], 2: [(1, [1, 1, 100, 100]), (2, [1, 1, 50, 50])]})
    rows = [(2, 1, 0.9, [500, 500, 600, 600]),  # would be a FP ranked first; ignored
            (1, 1, 0.8, [1, 1, 100, 100])]
    r = evaluate_ilsvrc(ds, dets(*rows), blacklist=[(2, 1)])
    # Positives of 'a': 2 - 1 blacklisted = 1; detections: tp [1] -> AP 1.
    assert r.positives[1] == 1 and r.ap[1] == pytest.approx(1.0)
    assert r.extra["num_ignored_blacklisted"] == 1
    # Without the blacklist: tp [0, 1], 2 positives -> AP 0.25.
    assert evaluate_ilsvrc(ds, dets(*rows)).ap[1] == pytest.approx(0.25)
    # A class whose only objects are blacklisted has no positives and no AP (b is only in image 2).
    r = evaluate_ilsvrc(ds, dets(*rows), blacklist=[(2, 1), (2, 2)])
    assert 2 not in r.ap and set(r.ap) == {1}
    # The reader's blacklist (IlsvrcDataset.blacklist) is the default.
    with_list = IlsvrcDataset(records=ds.records, vocab=ds.vocab, blacklist=frozenset({(2, 1)}))
    assert evaluate_ilsvrc(with_list, dets(*rows)).ap[1] == pytest.approx(1.0)


def test_images_without_objects_and_classes_without_positives():
    ds = dataset({1: [], 2: [(1, [1, 1, 100, 100])]})
    # A detection on the empty image is a FP; a detection of class c (no positives) does not count.
    r = evaluate_ilsvrc(ds, dets((1, 1, 0.9, [1, 1, 100, 100]), (2, 1, 0.8, [1, 1, 100, 100]),
                                 (2, 3, 0.95, [1, 1, 100, 100])))
    assert set(r.ap) == {1} and r.ap[1] == pytest.approx(0.5)  # tp [0, 1], 1 positive
    assert r.mAP == pytest.approx(0.5) and r.num_images == 2 and r.num_predictions == 3
    # No detections at all: AP 0 for every class with positives.
    assert evaluate_ilsvrc(ds, {}).ap == {1: 0.0}


def test_detections_on_unlisted_images_are_dropped_with_a_warning():
    ds = dataset({1: [(1, [1, 1, 100, 100])]})
    with pytest.warns(UserWarning, match="dropped 1"):
        r = evaluate_ilsvrc(ds, dets((9, 1, 0.9, [1, 1, 100, 100]), (1, 1, 0.5, [1, 1, 100, 100])))
    assert r.ap[1] == 1.0 and r.num_predictions == 1


@pytest.mark.parametrize("seed", range(6))
def test_vectorized_equals_the_reference_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    images = {}
    for image_id in rng.permutation(np.arange(1, 16)).tolist():
        n = int(rng.integers(0, 7))
        xy = rng.integers(1, 60, size=(n, 2))
        wh = rng.integers(3, 40, size=(n, 2))  # includes small objects (threshold below 0.5)
        images[image_id] = [(int(rng.integers(1, 4)), [*map(float, xy[k]), *map(float, xy[k] + wh[k])])
                            for k in range(n)]
    rows = []
    for _ in range(400):
        image_id = int(rng.integers(1, 16))
        objs = images[image_id]
        if objs and rng.random() < 0.7:  # jitter an object (often several detections per object)
            lab, g = objs[int(rng.integers(len(objs)))]
            box = (np.asarray(g) + rng.integers(-4, 5, size=4)).astype(float)
            lab = lab if rng.random() < 0.85 else int(rng.integers(1, 4))
        else:
            xy = rng.integers(1, 60, size=2)
            box = np.r_[xy, xy + rng.integers(3, 40, size=2)].astype(float)
            lab = int(rng.integers(1, 4))
        box[2], box[3] = max(box[2], box[0]), max(box[3], box[1])
        rows.append((image_id, lab, float(rng.integers(0, 20)) / 20, box.tolist()))  # coarse scores: many ties
    blacklist = {(int(rng.integers(1, 16)), int(rng.integers(1, 4))) for _ in range(3)}
    expected = reference_ilsvrc(images, rows, blacklist, 3)
    got = evaluate_ilsvrc(dataset(images), dets(*rows), blacklist=blacklist)
    assert got.ap.keys() == expected.keys()
    for c in expected:
        assert got.ap[c] == pytest.approx(expected[c], abs=1e-12)


# --- files: submission round trip, malformed lines, the devkit demo --------------------------------

def test_submission_round_trip_evaluates_identically(tmp_path):
    rng = np.random.default_rng(3)
    ds = dataset({i: [(int(rng.integers(1, 4)), [5.0 * i, 5.0, 5.0 * i + 40, 50.0])] for i in range(1, 9)})
    detections = {}
    for rec in ds.records:
        boxes = rec.gt_boxes + rng.normal(0, 3, size=(1, 4)).astype(np.float32)
        boxes = np.concatenate([boxes, rng.uniform(0, 60, size=(3, 4)).astype(np.float32)])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        detections[rec.image_id] = (boxes, rng.random(4).astype(np.float32), rng.integers(1, 4, size=4))
    path = tmp_path / "sub.txt"
    assert write_ilsvrc_submission(path, detections, ds) == 32
    assert evaluate_ilsvrc(ds, path).ap == evaluate_ilsvrc(ds, detections).ap
    first = path.read_text().splitlines()[0].split()
    assert first[0] == "1" and len(first) == 7


@pytest.mark.parametrize("line, message", [
    ("1 1 0.5 1 1 10", "expected 7 columns"),
    ("1 1 0.5 1 1 10 10 4", "expected 7 columns"),
    ("1 1 high 1 1 10 10", "'high' is not a number"),
    ("1 1 nan 1 1 10 10", "NaN or infinite"),
    ("1 1 0.5 1 1 inf 10", "NaN or infinite"),
    ("1.5 1 0.5 1 1 10 10", "must be integers"),
    ("1 201 0.5 1 1 10 10", "class id 201 is outside 1..200"),
    ("1 0 0.5 1 1 10 10", "class id 0 is outside 1..200"),
])
def test_malformed_lines_name_their_line(tmp_path, line, message):
    path = tmp_path / "pred.txt"
    path.write_text("1 1 0.9 1 1 10 10\n\n" + line + "\n2 3 0.1 1 1 5 5\n")
    with pytest.raises(Exception, match=rf"pred.txt:3: .*{message}") as err:
        read_ilsvrc_predictions(path)
    assert type(err.value).__name__ == "UserError"


def test_inverted_boxes_strict_or_as_the_devkit(tmp_path):
    path = tmp_path / "pred.txt"
    path.write_text("1 1 0.9 1 1 10 10\n1 1 0.8 10 1 5 10\n")
    with pytest.raises(Exception, match=r"pred.txt:2: xmax < xmin"):
        read_ilsvrc_predictions(path, strict_boxes=True)
    with pytest.warns(UserWarning, match="1 predictions have xmax < xmin .*first on line 2"):
        preds = read_ilsvrc_predictions(path)
    assert len(preds) == 2 and preds.num_inverted == 1


@pytest.fixture(scope="module")
def val2(devkit):
    vocab = read_meta_det(devkit / "data" / "meta_det.mat")
    return read_ilsvrc_det(devkit / "ilsvrc13_val2" / "val2_in_val_ids.txt", devkit / "ilsvrc13_val2" / "Annotations",
                           vocab=vocab, blacklist=devkit / "data" / "ILSVRC2014_det_validation_blacklist.txt")


def test_devkit_demo_on_val2_matches_the_official_figures(devkit, val2):
    # ../shared/data/README.md: eval_detection.m under GNU Octave on the demo predictions restricted to
    # val2: 200 APs, mean 0.601683, median 0.614881, first five 0.482046 0.565000 0.610119 0.662435 0.510035.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = evaluate_ilsvrc(val2, devkit / "evaluation" / "demo.val.pred.det.txt")
    assert len(r.ap) == 200
    assert r.mAP == pytest.approx(0.601683, abs=1e-6)
    assert r.median_ap == pytest.approx(0.614881, abs=1e-6)
    np.testing.assert_allclose([r.ap[c] for c in range(1, 6)], [0.482046, 0.565000, 0.610119, 0.662435, 0.510035],
                               atol=1e-6)
    # 49,013 lines, 25,423 of them on images outside val2 (counted with awk on the file).
    assert r.num_predictions + r.extra["num_dropped_unlisted"] == 49013
    assert sum(r.positives.values()) == 26782
