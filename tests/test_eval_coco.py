"""COCO evaluation: the numbers equal pycocotools' own COCOeval run on coco128 with generated predictions."""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import pytest

from detector.base.boxes import coco_to_xyxy
from detector.base.errors import UserError
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
    # The same matches and the same precision table; only the order of the final float sums may differ
    # (faster-coco-eval's mean vs numpy's: ~1e-16), so 1e-12 is far above rounding and far below any
    # real difference (one match more or less moves AP by >= 1e-4 here).
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert r.mAP == pytest.approx(expected[0], abs=1e-12)
    reference = evaluate_coco(gt_path, results_path, backend="pycocotools")  # pycocotools itself: bit-equal
    np.testing.assert_array_equal([reference.extra["stats"][k] for k in STAT_NAMES], expected)
    assert reference.ap == pytest.approx(r.ap, abs=1e-12)
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
    written = json.loads(out.read_text())  # valid JSON, one result a line, images in the dataset's order
    assert len(written) == len(results) == len(out.read_text().splitlines()) - 2
    order = {r.image_id: n for n, r in enumerate(ds.records)}
    assert [order[w["image_id"]] for w in written] == sorted(order[w["image_id"]] for w in written)
    first = [x for x in results if x["image_id"] == written[0]["image_id"]][0]  # each image's own order kept
    assert written[0]["category_id"] == first["category_id"] and written[0]["score"] == first["score"]
    np.testing.assert_allclose(coco_to_xyxy(np.array(written[0]["bbox"])[None]),
                               coco_to_xyxy(np.array(first["bbox"])[None]), atol=1e-9)
    np.testing.assert_array_equal([evaluate_coco(gt_path, out).extra["stats"][k] for k in STAT_NAMES],
                                  [r_mem.extra["stats"][k] for k in STAT_NAMES])


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


# ----------------------------------------------------------------------------------------------------
# results that would move the mAP without a word: refused with their index, or dropped/counted with a warning


def tiny_ground_truth(tmp_path):
    """Two images, one object each: a cat (category 1) on image 1, a dog (category 2) on image 2."""
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "height": 100, "width": 100},
                     {"id": 2, "file_name": "b.jpg", "height": 100, "width": 100}],
          "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                           "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 2, "bbox": [30, 30, 40, 40], "area": 1600,
                           "iscrowd": 0}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


PERFECT = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
           {"image_id": 2, "category_id": 2, "bbox": [30, 30, 40, 40], "score": 0.8}]


def evaluate_file(tmp_path, gt, results):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))  # NaN and Infinity are written as JSON's common extension
    return path, evaluate_coco(gt, path)


@pytest.mark.parametrize("bad, problem", [
    ({"category_id": 7}, "category_id 7 is not a category of the ground truth"),  # pycocotools ignores it
    ({"category_id": "1"}, "category_id '1' is not a category"),
    ({"category_id": True}, "category_id True is not a category"),
    ({"category_id": 1.5}, "category_id 1.5 is not a category"),
    ({"image_id": 1.5}, "image_id 1.5 is not an integer"),
    ({"bbox": [10, 10, -20, 20]}, "negative width or height"),  # pycocotools: outside every area range
    ({"bbox": [10, 10, 20, -1e-3]}, "negative width or height"),
    ({"bbox": [10, 10, 20, float("nan")]}, "has a NaN or infinite"),
    ({"bbox": [float("inf"), 10, 20, 20]}, "has a NaN or infinite"),
    ({"score": float("nan")}, "has a NaN or infinite"),
    ({"score": "high"}, "needs .bbox.: \\[x, y, w, h\\] and .score. as numbers"),
    ({"bbox": [10, 10, 20]}, "needs .bbox.: \\[x, y, w, h\\] and .score. as numbers"),
    ({"score": None}, "needs .bbox.: \\[x, y, w, h\\] and .score. as numbers"),
])
def test_bad_results_are_refused_with_their_index(tmp_path, bad, problem):
    gt = tiny_ground_truth(tmp_path)
    results = [*PERFECT, {**PERFECT[0], **bad}]  # index 2
    with pytest.raises(UserError, match=f"results.json: result 2 {problem}.*; fix or remove it") as err:
        evaluate_file(tmp_path, gt, results)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=f"COCO results: result 2 {problem}"):
        evaluate_coco(gt, results)
    with pytest.raises(UserError, match=f"result 2 {problem}"):  # the reader benchmark_map uses
        coco_results_to_detections(tmp_path / "results.json", read_coco(gt))


def test_a_result_without_its_keys_is_refused(tmp_path):
    gt = tiny_ground_truth(tmp_path)
    with pytest.raises(UserError, match="result 1 is not {'image_id'"):
        evaluate_coco(gt, [PERFECT[0], {"image_id": 1, "bbox": [1, 2, 3, 4], "score": 1.0}])


def test_results_on_unknown_images_are_dropped_counted_and_warned(tmp_path):
    gt = tiny_ground_truth(tmp_path)
    assert evaluate_coco(gt, PERFECT).mAP == pytest.approx(1.0)  # pycocotools' float sum: 1 - 2e-16
    # A high-scoring false positive on image 99 (not in the ground truth) would cost the cat class half
    # its AP if it were scored; it is dropped, as the ILSVRC and VOC evaluators do, and said.
    stray = {"image_id": 99, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.99}
    with pytest.warns(UserWarning, match="dropped 1 results on images that are not in the ground truth"):
        _, r = evaluate_file(tmp_path, gt, [*PERFECT, stray])
    assert r.mAP == pytest.approx(1.0) and r.extra["num_dropped_unlisted"] == 1 and r.num_predictions == 2
    # In-memory detections of a dataset: the same.
    ds = read_coco(gt)
    detections = coco_results_to_detections(PERFECT, ds)
    detections["not-an-image"] = (np.array([[0.0, 0, 5, 5]]), np.array([0.99]), np.array([1]))
    with pytest.warns(UserWarning, match="dropped 1 detections on images that are not in the dataset"):
        r = evaluate_coco(ds, detections)
    assert r.mAP == pytest.approx(1.0) and r.extra["num_dropped_unlisted"] == 1


def test_empty_boxes_are_scored_as_pycocotools_does_and_counted(tmp_path):
    gt = tiny_ground_truth(tmp_path)
    # A zero-width cat box on image 1 scored above the true one: it matches nothing (IoU 0), so it is a
    # false positive ranked first. Cat: precision 1/2 at every recall -> AP 0.5; dog AP 1; mAP 0.75.
    empty = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 20], "score": 0.95}
    with pytest.warns(UserWarning, match="1 results have zero width or height \\(first: result 2\\)"):
        path, r = evaluate_file(tmp_path, gt, [*PERFECT, empty])
    assert r.mAP == pytest.approx(0.75) and r.ap == pytest.approx({1: 0.5, 2: 1.0})
    assert r.extra["num_empty_boxes"] == 1
    assert r.mAP == pycocotools_stats(gt, path)[0]  # pycocotools' own number


def test_non_finite_numbers_in_the_file_are_refused(tmp_path):
    gt = tiny_ground_truth(tmp_path)
    path = tmp_path / "results.json"
    path.write_text('[{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": Infinity}]')
    with pytest.raises(UserError, match="results.json: result 0 has a NaN or infinite number"):
        evaluate_coco(gt, path)


# ----------------------------------------------------------------------------------------------------
# ILSVRC scale: the grouped faster-coco-eval run equals pycocotools; result files read in chunks, written
# as a stream


def synthetic_case(tmp_path, seed: int = 3):
    """A ground truth and a results file that reach every rule of COCOeval: 150 images, 12 categories
    (category 12 has no object, category 11 objects but no results), 0-6 objects of 4..200 px per image
    (the three area ranges), 5% crowd; results jittered around objects (some of the wrong category),
    random boxes (some on images without objects), 130 results on one image and category (over maxDets
    100), zero-width boxes, and scores on a 0.01 grid (many ties, broken by file order as pycocotools
    does)."""
    rng = np.random.default_rng(seed)
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 400, "height": 300} for i in range(1, 151)]
    annotations = []
    for image in images:
        for _ in range(int(rng.integers(0, 7))):
            w, h = rng.uniform(4, 200, 2)
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"],
                                "category_id": int(rng.integers(1, 12)), "bbox": [*rng.uniform(0, 200, 2), w, h],
                                "area": w * h, "iscrowd": int(rng.random() < 0.05)})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 13)]}
    results = []
    for ann in annotations:
        for _ in range(int(rng.integers(0, 3))):
            x, y, w, h = ann["bbox"]
            cat = ann["category_id"] if rng.random() < 0.85 else int(rng.integers(1, 11))
            results.append({"image_id": ann["image_id"], "category_id": min(cat, 10),
                             "bbox": [x + rng.normal(0, 0.1 * w), y + rng.normal(0, 0.1 * h), w * rng.uniform(0.8, 1.2),
                                      h * rng.uniform(0.8, 1.2)], "score": round(float(rng.random()), 2)})
    for _ in range(400):
        results.append({"image_id": int(rng.integers(1, 151)), "category_id": int(rng.integers(1, 11)),
                        "bbox": [*rng.uniform(0, 300, 2), *rng.uniform(2, 150, 2)],
                        "score": round(float(rng.random()), 2)})
    crowded = annotations[0]
    results += [{"image_id": crowded["image_id"], "category_id": crowded["category_id"],
                 "bbox": [*rng.uniform(0, 100, 2), *rng.uniform(10, 100, 2)], "score": round(float(rng.random()), 2)}
                for _ in range(130)]
    results += [{"image_id": 5, "category_id": 3, "bbox": [10, 10, 0, 30], "score": 0.5}] * 3
    order = rng.permutation(len(results))
    results = [results[i] for i in order]
    gt_path, results_path = tmp_path / "gt.json", tmp_path / "results.json"
    gt_path.write_text(json.dumps(gt))
    results_path.write_text(json.dumps(results))
    return gt_path, results_path


@pytest.mark.parametrize("group_pairs", [50_000, 1])  # one group; one category per group
def test_synthetic_and_chess_equal_pycocotools(tmp_path, chess, monkeypatch, group_pairs):
    import detector.evaluation.coco as coco

    monkeypatch.setattr(coco, "GROUP_PAIRS", group_pairs)
    chess_gt = chess / "valid" / "_annotations.coco.json"  # as exported: annotation ids from 0, parent category
    chess_results = tmp_path / "chess.json"
    chess_results.write_text(json.dumps(generated_results(json.loads(chess_gt.read_text()), seed=1)))
    for gt_path, results_path in [synthetic_case(tmp_path), (chess_gt, chess_results)]:
        expected = pycocotools_stats(gt_path, results_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # annotation id 0 (chess), zero-width boxes (synthetic)
            r = evaluate_coco(gt_path, results_path)
            reference = evaluate_coco(gt_path, results_path, backend="pycocotools")
        # the bar is 1e-6; the two differ only in the order of float sums (measured: <= 1e-16)
        np.testing.assert_allclose([r.extra["stats"][k] for k in STAT_NAMES], expected, rtol=0, atol=1e-12)
        assert 0.05 < r.mAP < 0.95
        assert r.ap.keys() == reference.ap.keys() and r.ap == pytest.approx(reference.ap, abs=1e-12)
        assert r.extra["summary"] == reference.extra["summary"]
        assert r.num_predictions == reference.num_predictions == len(json.loads(results_path.read_text()))


def test_results_file_read_in_chunks_equals_json_load(tmp_path):
    from detector.evaluation.coco_results import read_coco_results

    _, path = synthetic_case(tmp_path)
    expected = json.loads(path.read_text())
    # the same results pretty-printed, with keys the evaluator does not read (nested lists and objects)
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps([{**r, "segmentation": [[1, 2, 3]], "meta": {"a": [1, {"b": "]"}]}}
                                  for r in expected[:300]], indent=2))
    for source, want, chunk in [(path, expected, 1 << 24), (path, expected, 37), (pretty, expected[:300], 5),
                                (expected, expected, 1 << 24)]:
        read = read_coco_results(source, range(1, 13), chunk_chars=chunk)
        got = read.results
        assert len(got) == len(want)
        np.testing.assert_array_equal(got.boxes, [r["bbox"] for r in want])
        np.testing.assert_array_equal(got.scores, [r["score"] for r in want])
        np.testing.assert_array_equal(got.image_ids, [r["image_id"] for r in want])
        np.testing.assert_array_equal(got.category_ids, [r["category_id"] for r in want])
        assert read.num_empty_boxes == sum(r["bbox"][2] == 0 for r in want)
    empty = tmp_path / "empty.json"
    empty.write_text(" [ ]\n")
    assert len(read_coco_results(empty, [1]).results) == 0


@pytest.mark.parametrize("text, problem", [
    ("", "not valid JSON \\(line 1: Expecting value\\)"),
    ('{"image_id": 1}', "expected a COCO results list"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5},\n{"image_id": 1,,}]',
     "not valid JSON \\(line 2: Expecting property name"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}\n\n{"image_id": 2}]',
     "not valid JSON \\(line 3: Expecting ',' delimiter\\)"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}', "not valid JSON"),  # cut short
    ('[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}]\n]',
     "not valid JSON \\(line 2: Extra data\\)"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5},]',
     "not valid JSON \\(line 1: Expecting value\\)"),
])
def test_a_malformed_results_file_is_one_line_with_its_line(tmp_path, text, problem):
    from detector.evaluation.coco_results import read_coco_results

    path = tmp_path / "results.json"
    path.write_text(text)
    for chunk in (1 << 24, 3):
        with pytest.raises(UserError, match=f"results.json: {problem}") as err:
            read_coco_results(path, [1], chunk_chars=chunk)
        assert "\n" not in str(err.value)


def test_the_result_file_is_written_as_a_stream(tmp_path):
    """40,000 results written a part at a time: valid JSON, and the writer's memory is one part's text,
    not the ~25 MB of a list of dicts and one json.dump (the parts come from a generator, so tracemalloc
    sees only what the writer holds beside them: ~0.1 MB, whatever the number of parts)."""
    import tracemalloc

    from detector.evaluation.coco_results import CocoResults, write_coco_result_chunks

    rng = np.random.default_rng(0)

    def parts():
        for image_id in range(1, 401):
            yield CocoResults(np.full(100, image_id), rng.integers(1, 201, 100), rng.uniform(0, 500, (100, 4)),
                              rng.random(100))

    path = tmp_path / "results.json"
    tracemalloc.start()
    assert write_coco_result_chunks(path, parts()) == 40_000
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 3e6, peak  # one part: ~12 KB of text, its arrays and lists
    written = json.loads(path.read_text())
    assert len(written) == 40_000 and written[-1]["image_id"] == 400
    assert list(tmp_path.iterdir()) == [path]  # the atomic write left no temporary file


def test_write_coco_results_counts_images_outside_the_dataset(tmp_path):
    """Issue 18: detections of an image that is not in the dataset are never dropped silently: they are
    not written (a COCO file names only the dataset's images), counted and said in a warning."""
    from detector.evaluation.result_files import write_result_file

    ds = read_coco(tiny_ground_truth(tmp_path))
    detections = coco_results_to_detections(PERFECT, ds)
    detections[99] = (np.array([[0.0, 0, 5, 5], [1, 1, 4, 4]]), np.array([0.9, 0.8]), np.array([1, 2]))
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="dropped 2 detections on 1 images that are not in the dataset"):
        path, count = write_result_file(out, "coco", detections, ds)
    assert count == 2 and [r["image_id"] for r in json.loads(path.read_text())] == [1, 2]
    # a detection that cannot be written (non-finite) is an error, and the old file stays as it was
    before = path.read_text()
    detections[1] = (np.array([[0.0, 0, np.nan, 5]]), np.array([0.9]), np.array([1]))
    with pytest.raises(ValueError, match="must be finite"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_result_file(out, "coco", detections, ds)
    assert path.read_text() == before and sorted(p.name for p in out.iterdir()) == ["coco_results.json"]


@pytest.mark.parametrize("result_format", ["ilsvrc", "voc"])
def test_every_result_writer_counts_images_outside_the_dataset(tmp_path, result_format):
    """The same rule for the ILSVRC submission and the VOC detections file: the 2 detections of image 99,
    which the dataset lacks, are not written and are counted in one warning; the dataset's 2 are written."""
    from detector.evaluation.result_files import write_result_file

    ds = read_coco(tiny_ground_truth(tmp_path))
    detections = coco_results_to_detections(PERFECT, ds)
    detections[99] = (np.array([[0.0, 0, 5, 5], [1, 1, 4, 4]]), np.array([0.9, 0.8]), np.array([1, 2]))
    with pytest.warns(UserWarning, match="dropped 2 detections on 1 images that are not in the dataset"):
        path, count = write_result_file(tmp_path / "out", result_format, detections, ds)
    lines = path.read_text().splitlines()
    assert count == len(lines) == 2 and not any(line.startswith("99 ") for line in lines)
