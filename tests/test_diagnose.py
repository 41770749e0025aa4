"""detector/evaluation/diagnose.py and ``benchmark_map.py --diagnose``: Hoiem's false-positive types on
hand-built cases where each type is known by construction, the AP each type costs, the confusion matrix,
agreement with ``evaluate_voc``, and the tool writing its files in both modes.

Boxes are integers in project xyxy, so the VOC evaluator's inclusive IoU (``x1 + 1 .. x2``) equals the
plain continuous IoU and every expected IoU below is exact arithmetic on areas.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from detector.apps import benchmark_map
from detector.base.boxes import xyxy_to_coco
from detector.base.cli import run_tool
from detector.base.vocab import Vocabulary
from detector.data.records import Dataset, ImageRecord
from detector.evaluation import DiagnoseConfig, diagnose, evaluate_voc

CAT, DOG = 1, 2
VOCAB = Vocabulary(ids=(1, 2), names=("cat", "dog"))

# One image, 200 x 100: a cat and a dog, each 100 x 10 (area 1000), far apart.
TYPES_GT = ImageRecord("a", "a.jpg", (100, 200), gt_boxes=[[0, 0, 100, 10], [0, 50, 100, 60]],
                       gt_labels=[CAT, DOG])
# Cat detections, best first, and what each is by construction:
TYPES_DETS = [
    ([0, 0, 100, 10], 0.90, "tp"),            # the cat itself: IoU 1
    ([0, 0, 50, 10], 0.80, "duplicate"),      # cat IoU 500/1000 = 0.5, in [0.5, 1], but the cat is taken
    ([0, 0, 10, 10], 0.70, "localization"),   # cat IoU 100/1000 = 0.1, in [0.1, 0.5)
    ([0, 0, 49, 10], 0.65, "localization"),   # cat IoU 490/1000 = 0.49, in [0.1, 0.5)
    ([0, 0, 9, 10], 0.60, "background"),      # cat IoU 90/1000 = 0.09 < 0.1, touches nothing else
    ([0, 50, 100, 60], 0.50, "confusion"),    # the dog itself: IoU 1 with another class
    ([0, 50, 10, 60], 0.45, "confusion"),     # dog IoU 0.1, in [0.1, 1]
    ([0, 50, 9, 60], 0.40, "background"),     # dog IoU 0.09 < 0.1
    ([150, 70, 190, 90], 0.30, "background"),  # overlaps nothing
]


def detections_of(rows, label=CAT):
    boxes = np.array([r[0] for r in rows], dtype=np.float64)
    scores = np.array([r[1] for r in rows])
    labels = np.array([r[3] if len(r) > 3 else label for r in rows], dtype=np.int64)
    return boxes, scores, labels


def types_case():
    return Dataset([TYPES_GT], VOCAB), {"a": detections_of(TYPES_DETS)}


def test_each_false_positive_type_by_construction():
    dataset, dets = types_case()
    d = diagnose(dataset, dets, DiagnoseConfig(top=None))  # every detection
    cat, dog = d.per_class
    assert (cat.name, cat.positives, cat.detections, cat.considered, cat.tp) == ("cat", 1, 9, 9, 1)
    assert cat.fp == {"localization": 2, "duplicate": 1, "confusion": 2, "background": 3}
    assert cat.confused_with == {"dog": 2}
    assert cat.fp_fraction("background") == pytest.approx(3 / 8)
    assert cat.ap == 1.0 and all(g == 0.0 for g in cat.ap_gain.values())  # the TP ranks first: nothing to gain
    # the dog has an object and no detection: a row with nothing analysed, AP 0
    assert (dog.positives, dog.considered, dog.num_fp, dog.ap) == (1, 0, 0, 0.0)
    assert d.total.fp == cat.fp and d.total.tp == 1 and d.total.ap == 0.5
    assert (d.num_images, d.num_detections, d.num_ignored) == (1, 9, 0)


def test_top_ranked_detections_as_hoiem():
    dataset, dets = types_case()
    # Hoiem's default: the N_j = 1 most confident cat detection, the true positive
    cat = diagnose(dataset, dets).per_class[0]
    assert (cat.considered, cat.tp, cat.num_fp) == (1, 1, 0)
    # top 3 x N_j: the TP, the duplicate and the first localization error
    cat = diagnose(dataset, dets, DiagnoseConfig(top=3)).per_class[0]
    assert (cat.considered, cat.tp) == (3, 1)
    assert cat.fp == {"localization": 1, "duplicate": 1, "confusion": 0, "background": 0}
    # ceil(2.5 x 1) = 3 as well; AP always uses every detection
    again = diagnose(dataset, dets, DiagnoseConfig(top=2.5)).per_class[0]
    assert again.considered == 3 and again.ap == cat.ap == 1.0


def test_thresholds_move_the_boundaries():
    dataset, dets = types_case()
    # correct at IoU >= 0.6: the half box (IoU 0.5) is no longer a duplicate but a localization error;
    # background below 0.095: the 0.09 boxes (cat and dog) stay background, nothing else moves
    cat = diagnose(dataset, dets, DiagnoseConfig(iou_threshold=0.6, min_overlap=0.095, top=None)).per_class[0]
    assert cat.fp == {"localization": 3, "duplicate": 0, "confusion": 2, "background": 3}
    # background below 0.05: the two 0.09 boxes become localization / confusion
    cat = diagnose(dataset, dets, DiagnoseConfig(min_overlap=0.05, top=None)).per_class[0]
    assert cat.fp == {"localization": 3, "duplicate": 1, "confusion": 3, "background": 1}
    with pytest.raises(ValueError):
        DiagnoseConfig(min_overlap=0.5)
    with pytest.raises(ValueError):
        DiagnoseConfig(top=0)


def test_localization_before_confusion_and_difficult_objects_ignored():
    # Image b: a cat [0, 100] x [0, 100] and a dog [60, 160] x [0, 100]. A cat detection [65, 160] has
    # IoU 9500/10000 = 0.95 with the dog and 3500/16000 = 0.22 with the cat: Hoiem checks its own class
    # first, so it is a localization error, not a confusion.
    # Image c: a difficult cat; a cat detection on it is ignored (neither TP nor FP), as in VOC.
    b = ImageRecord("b", "b.jpg", (100, 200), gt_boxes=[[0, 0, 100, 100], [60, 0, 160, 100]],
                    gt_labels=[CAT, DOG])
    c = ImageRecord("c", "c.jpg", (100, 200), gt_boxes=[[0, 0, 100, 100]], gt_labels=[CAT], difficult=[True])
    dets = {"b": detections_of([([65, 0, 160, 100], 0.9)]), "c": detections_of([([0, 0, 100, 100], 0.8)])}
    d = diagnose(Dataset([b, c], VOCAB), dets, DiagnoseConfig(top=None))
    cat = d.per_class[0]
    assert cat.positives == 1 and cat.detections == 1 and cat.tp == 0
    assert cat.fp == {"localization": 1, "duplicate": 0, "confusion": 0, "background": 0}
    assert d.num_ignored == 1 and d.num_detections == 2
    # the cat of b is missed (IoU 0.22 only), the difficult cat of c is no row's object; the dog counts as
    # a cat (the cat detection at IoU 0.95)
    assert d.confusion.matrix.tolist() == [[0, 0, 1], [1, 0, 0]]


def test_ap_gain_of_removing_each_type():
    # Two cats, A and B, 100 x 100; the ranking is: background, TP on A, localization on B
    # (IoU 4000/10000 = 0.4), TP on B. Precision/recall: F T F T, AP = 0.5 * 0.5 + 0.5 * 0.5 = 0.5.
    # Without the background: T F T, AP = 0.5 * 1 + 0.5 * 2/3 = 5/6 (gain 1/3).
    # Without the localization error: F T T, AP = 0.5 * 2/3 + 0.5 * 2/3 = 2/3 (gain 1/6).
    rec = ImageRecord("a", "a.jpg", (100, 500), gt_boxes=[[0, 0, 100, 100], [200, 0, 300, 100]],
                      gt_labels=[CAT, CAT])
    rows = [([400, 0, 450, 50], 0.9), ([0, 0, 100, 100], 0.8), ([200, 0, 240, 100], 0.7), ([200, 0, 300, 100], 0.6)]
    d = diagnose(Dataset([rec], VOCAB), {"a": detections_of(rows)})
    cat = d.per_class[0]
    assert cat.ap == pytest.approx(0.5)
    assert cat.ap_gain["background"] == pytest.approx(1 / 3)
    assert cat.ap_gain["localization"] == pytest.approx(1 / 6)
    assert cat.ap_gain["duplicate"] == cat.ap_gain["confusion"] == 0.0
    # top N_j = 2: the background box and the TP on A
    assert (cat.considered, cat.tp, cat.fp["background"], cat.fp_fraction("background")) == (2, 1, 1, 1.0)
    assert len(d.per_class) == 1  # no dog objects and no dog detections: no dog row


def test_confusion_matrix_by_construction():
    # Cats A, B and E, a dog D and a difficult dog F, each 100 x 100, far apart.
    rec = ImageRecord("a", "a.jpg", (300, 600), gt_labels=[CAT, CAT, DOG, CAT, DOG],
                      gt_boxes=[[0, 0, 100, 100], [200, 0, 300, 100], [0, 200, 100, 300], [200, 200, 300, 300],
                                [400, 0, 500, 100]],
                      difficult=[False, False, False, False, True])
    rows = [
        ([0, 0, 100, 100], 0.6, None, CAT),      # A: a cat at 0.6 ...
        ([0, 0, 100, 100], 0.8, None, DOG),      # ... and a dog at 0.8, the highest score: A counts as dog
        ([200, 0, 300, 100], 0.7, None, CAT),    # B: a cat at IoU 1 and a dog at IoU 0.9 with the same
        ([200, 0, 290, 100], 0.7, None, DOG),    # score 0.7: the larger IoU wins, B counts as cat
        ([0, 200, 100, 300], 0.5, None, DOG),    # D: dog
        ([200, 200, 240, 300], 0.9, None, CAT),  # E: IoU 0.4 < 0.5 only: missed
        ([400, 0, 500, 100], 0.9, None, DOG),    # F: difficult, not counted
    ]
    d = diagnose(Dataset([rec], VOCAB), {"a": detections_of(rows)})
    cm = d.confusion
    assert cm.columns == ("cat", "dog", "missed")
    assert cm.matrix.tolist() == [[1, 1, 1], [0, 1, 0]]
    assert d.to_dict()["confusion"]["matrix"] == [[1, 1, 1], [0, 1, 0]]


def test_agrees_with_evaluate_voc_on_random_cases():
    """True positives and AP are the VOC evaluator's; every detection is in exactly one bucket."""
    rng = np.random.default_rng(3)
    vocab = Vocabulary(ids=(1, 2, 3), names=("a", "b", "c"))
    records, dets = [], {}
    for i in range(12):
        n = int(rng.integers(0, 6))
        xy = rng.integers(0, 150, size=(n, 2))
        gt = np.c_[xy, xy + rng.integers(10, 60, size=(n, 2))].astype(np.float32)
        labels = rng.integers(1, 4, size=n)
        records.append(ImageRecord(i, f"{i}.jpg", (220, 220), gt_boxes=gt, gt_labels=labels,
                                   difficult=rng.random(n) < 0.25))
        near = np.repeat(gt, 3, axis=0) + rng.normal(0, 6, size=(3 * n, 4))  # three noisy copies of each
        near_labels = np.where(rng.random(3 * n) < 0.7, np.repeat(labels, 3), rng.integers(1, 4, size=3 * n))
        xy = rng.uniform(0, 150, size=(5, 2))
        far = np.c_[xy, xy + rng.uniform(10, 60, size=(5, 2))]
        boxes = np.concatenate([near.reshape(-1, 4), far])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        dets[i] = (boxes, rng.random(len(boxes)).round(2), np.r_[near_labels, rng.integers(1, 4, size=5)])
    dataset = Dataset(records, vocab)
    d = diagnose(dataset, dets, DiagnoseConfig(top=None))
    voc = evaluate_voc(dataset, dets)
    assert {c.class_id: c.ap for c in d.per_class if c.ap is not None} == pytest.approx(voc.ap, abs=1e-12)
    assert sum(c.considered for c in d.per_class) + d.num_ignored == d.num_detections == voc.num_predictions
    assert d.num_ignored == voc.extra["num_ignored_difficult"] > 0
    assert all(c.tp + c.num_fp == c.considered for c in d.per_class)
    assert all(sum(c.confused_with.values()) == c.fp["confusion"] for c in d.per_class)
    assert d.confusion.matrix.sum(axis=1).tolist() == [voc.positives.get(k, 0) for k in (1, 2, 3)]
    assert sum(d.total.fp.values()) > 20 and min(d.total.fp.values()) > 0  # every type occurs


def coco_files(tmp_path):
    """The types case as a COCO instances JSON (annotations numbered from 1) and a results JSON."""
    images = [{"id": 1, "file_name": "a.jpg", "height": 100, "width": 200}]
    annotations = [{"id": k + 1, "image_id": 1, "category_id": int(lab), "bbox": box, "area": box[2] * box[3],
                    "iscrowd": 0}
                   for k, (box, lab) in enumerate(zip(xyxy_to_coco(TYPES_GT.gt_boxes.astype(float)).tolist(),
                                                      TYPES_GT.gt_labels))]
    gt = tmp_path / "instances.json"
    gt.write_text(json.dumps({"images": images, "annotations": annotations,
                              "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}))
    boxes, scores, _ = detections_of(TYPES_DETS)
    results = [{"image_id": 1, "category_id": CAT, "bbox": b, "score": float(s)}
               for b, s in zip(xyxy_to_coco(boxes).tolist(), scores)]
    res = tmp_path / "results.json"
    res.write_text(json.dumps(results))
    return gt, res


def check_outputs(out_dir, fp, considered):
    data = json.loads((out_dir / "diagnose.json").read_text())
    cat = data["per_class"][0]
    assert cat["name"] == "cat" and cat["fp"] == fp and cat["considered"] == considered
    # the cat found as a cat; the dog as a cat too (the cat detection on it at IoU 1, score 0.5)
    assert data["confusion"]["matrix"] == [[1, 0, 0], [1, 0, 0]]
    for name in ("diagnose.png", "confusion.png"):
        assert (out_dir / name).stat().st_size > 5_000


def test_tool_result_file_mode_writes_the_diagnosis(tmp_path, capsys):
    gt, res = coco_files(tmp_path)
    out = tmp_path / "diag"
    argv = ["--protocol", "coco", "--predictions", str(res), "--annotations", str(gt), "--diagnose", str(out),
            "--diagnose-top", "all", "--quiet"]
    assert run_tool(benchmark_map.main, argv) == 0
    check_outputs(out, {"localization": 2, "duplicate": 1, "confusion": 2, "background": 3}, 9)
    printed = capsys.readouterr().out
    assert "mean AP" in printed and "false positives (Hoiem et al. 2012)" in printed
    assert "confusion matrix" in printed and f"wrote {out / 'confusion.png'}" in printed
    # the VOC protocol on the same COCO files, Hoiem's default top N_j: the cat's single TP
    argv = ["--protocol", "voc", "--gt-format", "coco", "--predictions", str(res), "--annotations", str(gt),
            "--diagnose", str(out), "--quiet"]
    assert run_tool(benchmark_map.main, argv) == 0
    check_outputs(out, {"localization": 0, "duplicate": 0, "confusion": 0, "background": 0}, 1)


def test_tool_model_mode_writes_the_diagnosis(tmp_path, capsys, monkeypatch):
    """The --model path: detection itself is tested in test_benchmark_map_model.py; here it is replaced by
    a result file, so only the wiring after it (evaluate, report, diagnose) runs."""
    from detector.data import read_coco

    gt, res = coco_files(tmp_path)

    def fake_detect_dataset(args):
        args.gt_format, args.protocol = args.dataset, args.protocol or args.dataset
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(res, args.out / "coco_results.json")
        return args.out / "coco_results.json", read_coco(gt), {"shard": [0, 1]}

    monkeypatch.setattr(benchmark_map, "detect_dataset", fake_detect_dataset)
    out = tmp_path / "run"
    argv = ["--model", "unused", "--dataset", "coco", "--annotations", str(gt), "--out", str(out),
            "--diagnose", str(out / "diag"), "--diagnose-top", "9", "--quiet"]
    assert run_tool(benchmark_map.main, argv) == 0
    check_outputs(out / "diag", {"localization": 2, "duplicate": 1, "confusion": 2, "background": 3}, 9)
    assert (out / "evaluation.json").is_file() and "confusion matrix" in capsys.readouterr().out


def test_bad_top_is_one_line(tmp_path, capsys):
    gt, res = coco_files(tmp_path)
    argv = ["--protocol", "coco", "--predictions", str(res), "--annotations", str(gt), "--diagnose",
            str(tmp_path / "d"), "--diagnose-top", "many", "--quiet"]
    assert run_tool(benchmark_map.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --diagnose-top: ") and "'many'" in err[0]
