"""Speed and memory of the ILSVRC DET evaluation.

1. val2 end to end: meta_det.mat, the 9,917 val2 XML files, the devkit's demo predictions (49,013 lines),
   evaluation; beside it, the same evaluation step written as the devkit's per-image loops in plain Python
   (the reference semantics; the devkit itself under GNU Octave takes about 47 s here, not re-run).
2. Full ILSVRC val scale, synthetic: 20,121 images, ~60,000 objects, 4,000,000 predictions, evaluated
   in memory and from a submission file, each in a fresh process so that its peak RSS is its own.
3. COCO at ILSVRC scale, side by side: a synthetic COCO ground truth of ILSVRC-like size (20,121 images,
   200 categories, ~60,000 objects, 0.5% crowd) and result files of ``--coco`` sizes (default 500k and
   2M), written once by the project's streamed writer; each file evaluated by pycocotools' COCOeval alone
   (``COCO(gt).loadRes(file)``, evaluate/accumulate/summarize: the documented way) and by the project's
   path (``tools/benchmark_map.py --protocol coco``), each one subprocess, one after the other, in the
   same run; wall time, CPU time and peak RSS of each subprocess (``os.wait4``), their ratios, and the
   largest difference of the 12 COCO numbers. ``--coco-alone`` sizes (default 4M) run the project's
   path only (pycocotools needs ~25 GB there).

    python benchmarks/bench_evaluation.py [--repeats 3] [--skip-synthetic] [--predictions 4000000]
    python benchmarks/bench_evaluation.py --coco-only [--coco 500000,2000000] [--coco-alone 4000000]
        [--coco-json OUT.json]

Prints a table (median wall time over the repeats, the CPU time of that run, peak RSS) and the mAPs,
which must agree. The evaluation is single-threaded, so on a shared machine CPU time is the better
estimate of the unloaded wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEVKIT = ROOT.parent / "shared" / "data" / "ilsvrc2014_devkit"
NUM_IMAGES = 20_121
NUM_CLASSES = 200


def load_test_oracle():
    """``tests/ilsvrc_reference.py``, the loop-by-loop oracle the tests check the evaluator against; it lives
    with the tests (it is not part of the library), so it is loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ilsvrc_reference", ROOT / "tests" / "ilsvrc_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def val2_end_to_end():
    from detector.base.vocab import read_meta_det
    from detector.data import read_ilsvrc_det
    from detector.evaluation import evaluate_ilsvrc

    vocab = read_meta_det(DEVKIT / "data" / "meta_det.mat")
    ds = read_ilsvrc_det(DEVKIT / "ilsvrc13_val2" / "val2_in_val_ids.txt", DEVKIT / "ilsvrc13_val2" / "Annotations",
                         vocab=vocab, blacklist=DEVKIT / "data" / "ILSVRC2014_det_validation_blacklist.txt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate_ilsvrc(ds, DEVKIT / "evaluation" / "demo.val.pred.det.txt", keep_curves=False), ds


def loop_reference(ds, rows: np.ndarray) -> float:
    """mAP by the devkit's eval_detection.m loops, transcribed to plain Python (the shared reference)."""
    from detector.base.boxes import xyxy_to_voc

    reference_ilsvrc = load_test_oracle().reference_ilsvrc
    images = {r.image_id: list(zip(r.gt_labels.tolist(), xyxy_to_voc(r.gt_boxes.astype(np.float64)).tolist()))
              for r in ds.records}
    preds = [(int(r[0]), int(r[1]), r[2], r[3:]) for r in rows.tolist() if int(r[0]) in images]
    return float(np.mean(list(reference_ilsvrc(images, preds, set(ds.blacklist), NUM_CLASSES).values())))


def bench_val2(repeats: int) -> list[tuple]:
    times, result, ds = [], None, None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        result, ds = val2_end_to_end()
        times.append((time.perf_counter() - t, time.process_time() - c))
    rows = np.loadtxt(DEVKIT / "evaluation" / "demo.val.pred.det.txt")
    t, c = time.perf_counter(), time.process_time()
    reference_map = loop_reference(ds, rows)
    loop_time = (time.perf_counter() - t, time.process_time() - c)
    t, c = time.perf_counter(), time.process_time()
    from detector.evaluation.ilsvrc import evaluate_predictions
    from detector.evaluation.submission import IlsvrcPredictions

    preds = IlsvrcPredictions(rows[:, 0].astype(np.int64), rows[:, 1].astype(np.int64), rows[:, 2].copy(),
                              rows[:, 3:].copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eval_only = evaluate_predictions(ds, preds, keep_curves=False)
    eval_time = (time.perf_counter() - t, time.process_time() - c)
    return [
        ("val2 end to end (meta + 9,917 XML + 49,013 lines + eval)", sorted(times)[len(times) // 2], result.mAP),
        ("val2 evaluation step, vectorized", eval_time, eval_only.mAP),
        ("val2 evaluation step, per-image Python loops (reference)", loop_time, reference_map),
    ]


def make_synthetic(num_predictions: int, seed: int = 0):
    """20,121 images with ~3 objects each (classes 1..200, sizes 8..300 px, so some use thr < 0.5) and
    ``num_predictions`` predictions: a quarter jittered around objects (90% with the right class), the rest
    random boxes of random classes. Returns (gt dict for records, prediction rows (P, 7) file coordinates)."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, NUM_IMAGES)
    num_gt = int(counts.sum())
    gt_image = np.repeat(np.arange(1, NUM_IMAGES + 1), counts)
    wh = rng.integers(8, 300, size=(num_gt, 2)).astype(np.float64)
    xy = rng.integers(1, 200, size=(num_gt, 2)).astype(np.float64)
    gt_boxes = np.concatenate([xy, xy + wh - 1], axis=1)  # 1-based inclusive
    gt_labels = rng.integers(1, NUM_CLASSES + 1, num_gt)
    near = num_predictions // 4
    pick = rng.integers(0, num_gt, near)
    jitter = rng.normal(0, 0.12, size=(near, 4)) * np.repeat(wh[pick], 2, axis=0).reshape(near, 4)
    near_boxes = gt_boxes[pick] + jitter
    near_labels = np.where(rng.random(near) < 0.9, gt_labels[pick], rng.integers(1, NUM_CLASSES + 1, near))
    far = num_predictions - near
    far_xy = rng.uniform(1, 400, size=(far, 2))
    far_boxes = np.concatenate([far_xy, far_xy + rng.uniform(8, 300, size=(far, 2))], axis=1)
    boxes = np.concatenate([near_boxes, far_boxes])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
    rows = np.empty((num_predictions, 7))
    rows[:, 0] = np.concatenate([gt_image[pick], rng.integers(1, NUM_IMAGES + 1, far)])
    rows[:, 1] = np.concatenate([near_labels, rng.integers(1, NUM_CLASSES + 1, far)])
    rows[:, 2] = np.round(rng.random(num_predictions), 6)
    rows[:, 3:] = np.round(boxes, 2)
    rows = rows[rng.permutation(num_predictions)]
    return {"counts": counts, "gt_boxes": gt_boxes, "gt_labels": gt_labels}, rows


def synthetic_dataset(gt):
    from detector.base.boxes import voc_to_xyxy
    from detector.base.vocab import ilsvrc_det_vocabulary
    from detector.data import Dataset, ImageRecord

    boxes = voc_to_xyxy(gt["gt_boxes"]).astype(np.float32)
    splits = np.cumsum(gt["counts"])[:-1]
    records = [ImageRecord(image_id=i + 1, file_name=f"{i + 1}.JPEG", gt_boxes=b, gt_labels=lab)
               for i, (b, lab) in enumerate(zip(np.split(boxes, splits), np.split(gt["gt_labels"], splits)))]
    return Dataset(records=records, vocab=ilsvrc_det_vocabulary())


def worker(mode: str, folder: Path) -> None:
    """Child process: evaluate the synthetic case from ``folder`` and print a JSON line."""
    import detector.evaluation  # noqa: F401  (imports not timed)
    from detector.base.boxes import voc_to_xyxy
    from detector.evaluation import evaluate_ilsvrc

    data = np.load(folder / "gt.npz")
    ds = synthetic_dataset({k: data[k] for k in data.files})
    if mode == "memory":
        rows = np.load(folder / "rows.npy")
        order = np.argsort(rows[:, 0], kind="stable")
        ids = rows[order, 0].astype(np.int64)
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        stops = np.r_[starts[1:], len(ids)]
        xyxy = voc_to_xyxy(rows[order, 3:]).astype(np.float32)
        detections = {int(ids[a]): (xyxy[a:b], rows[order[a:b], 2].astype(np.float32),
                                    rows[order[a:b], 1].astype(np.int64)) for a, b in zip(starts, stops)}
        del rows, order, xyxy
        start_rss = peak_rss_mb()
        t, c = time.perf_counter(), time.process_time()
        result = evaluate_ilsvrc(ds, detections, keep_curves=False)
    else:
        start_rss = peak_rss_mb()
        t, c = time.perf_counter(), time.process_time()
        result = evaluate_ilsvrc(ds, folder / "pred.txt", keep_curves=False)
    elapsed, cpu = time.perf_counter() - t, time.process_time() - c
    print(json.dumps({"seconds": elapsed, "cpu_seconds": cpu, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": start_rss,
                      "mAP": result.mAP, "num_predictions": result.num_predictions,
                      "num_objects": int(sum(result.positives.values()))}))


def bench_synthetic(num_predictions: int, repeats: int) -> list[tuple]:
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        gt, rows = make_synthetic(num_predictions)
        np.savez(folder / "gt.npz", **gt)
        np.save(folder / "rows.npy", rows)
        with open(folder / "pred.txt", "w") as f:
            np.savetxt(f, rows, fmt=["%d", "%d", "%.6f", "%.2f", "%.2f", "%.2f", "%.2f"])
        print(f"generated {len(gt['gt_labels'])} objects, {len(rows)} predictions "
              f"({(folder / 'pred.txt').stat().st_size / 1e6:.0f} MB file) in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
        del rows
        for mode, label in (("memory", "in memory (dict of per-image arrays)"),
                            ("file", "from a submission file (parse included)")):
            runs = []
            for _ in range(repeats):
                out = subprocess.run([sys.executable, __file__, "--worker", mode, str(folder)], capture_output=True,
                                     text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            best = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
            rows_out.append((f"full-val synthetic, {label}", (best["seconds"], best["cpu_seconds"]), best["mAP"],
                             best["peak_rss_mb"], best["num_objects"]))
    return rows_out


# -- COCO at ILSVRC scale: pycocotools alone vs the project's path, side by side ---------------------------

def make_coco_ground_truth(seed: int = 0) -> dict:
    """A COCO instances dict of ILSVRC val's size: 20,121 images (500 x 375 or 375 x 500), 200 categories,
    Poisson(3) objects per image of 8..300 px (all three COCO area ranges), 0.5% of them crowd."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    counts = rng.poisson(3.0, NUM_IMAGES)
    wh = rng.integers(8, 300, size=(int(counts.sum()), 2)).astype(np.float64)
    xy = rng.integers(0, 200, size=(len(wh), 2)).astype(np.float64)
    labels = rng.integers(1, NUM_CLASSES + 1, len(wh))
    crowd = rng.random(len(wh)) < 0.005
    n = 0
    for i, count in enumerate(counts.tolist(), start=1):
        w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
        images.append({"id": i, "file_name": f"{i:08d}.JPEG", "width": w, "height": h})
        for _ in range(count):
            box = [*xy[n].tolist(), *wh[n].tolist()]
            annotations.append({"id": n + 1, "image_id": i, "category_id": int(labels[n]), "bbox": box,
                                "area": box[2] * box[3], "iscrowd": int(crowd[n])})
            n += 1
    categories = [{"id": c, "name": f"class{c:03d}"} for c in range(1, NUM_CLASSES + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def make_coco_results(gt: dict, num_results: int, seed: int = 1):
    """``CocoResults`` of ``num_results``: a quarter jittered around objects (90% with their category), the
    rest random boxes of random categories on random images; scores rounded to 6 decimals (ties, as real
    files have)."""
    from detector.evaluation.coco_results import CocoResults

    rng = np.random.default_rng(seed)
    anns = gt["annotations"]
    gt_boxes = np.asarray([a["bbox"] for a in anns])
    gt_images = np.asarray([a["image_id"] for a in anns])
    gt_labels = np.asarray([a["category_id"] for a in anns])
    near = num_results // 4
    pick = rng.integers(0, len(anns), near)
    boxes_near = gt_boxes[pick] + rng.normal(0, 0.1, size=(near, 4)) * gt_boxes[pick][:, [2, 3, 2, 3]]
    labels_near = np.where(rng.random(near) < 0.9, gt_labels[pick], rng.integers(1, NUM_CLASSES + 1, near))
    far = num_results - near
    boxes_far = np.concatenate([rng.uniform(0, 400, (far, 2)), rng.uniform(4, 300, (far, 2))], axis=1)
    boxes = np.round(np.concatenate([boxes_near, boxes_far]), 2)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], 1.0)
    order = rng.permutation(num_results)
    return CocoResults(image_ids=np.concatenate([gt_images[pick], rng.integers(1, NUM_IMAGES + 1, far)])[order],
                       category_ids=np.concatenate([labels_near, rng.integers(1, NUM_CLASSES + 1, far)])[order],
                       boxes=boxes[order], scores=np.round(rng.random(num_results), 6))


def coco_pycocotools_worker(gt_path: Path, results_path: Path) -> None:
    """Child process: pycocotools' COCOeval alone, the documented way, on the files; prints the 12 stats."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(str(results_path)), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    print(json.dumps({"stats": [float(v) for v in ev.stats]}))


def run_measured(command: list[str]) -> dict:
    """Run ``command`` as a subprocess; its wall time, CPU time and peak RSS (``os.wait4``: its own, not
    the largest of all children so far as ``RUSAGE_CHILDREN`` would give) and its stdout."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            "stdout": stdout}


def bench_coco(sizes: list[int], alone: list[int]) -> list[dict]:
    """Rows of the side-by-side COCO comparison (see the module's docstring), one per result file size."""
    from detector.evaluation.coco import STAT_NAMES
    from detector.evaluation.coco_results import write_coco_result_chunks

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        gt = make_coco_ground_truth()
        gt_path = folder / "instances.json"
        gt_path.write_text(json.dumps(gt))
        for size in sorted(set(sizes) | set(alone)):
            t = time.perf_counter()
            results = make_coco_results(gt, size)
            results_path = folder / f"results_{size}.json"
            step = 100_000
            count = write_coco_result_chunks(results_path, (results.select(slice(a, a + step))
                                                            for a in range(0, size, step)))
            del results
            print(f"COCO: {len(gt['images'])} images, {len(gt['annotations'])} objects, {count} results "
                  f"({results_path.stat().st_size / 1e6:.0f} MB) written in {time.perf_counter() - t:.1f} s",
                  file=sys.stderr)
            row = {"results": size, "file_mb": results_path.stat().st_size / 1e6}
            if size in sizes:
                ref = run_measured([sys.executable, __file__, "--coco-worker", str(gt_path), str(results_path)])
                row["pycocotools"] = {k: v for k, v in ref.items() if k != "stdout"}
                row["pycocotools"]["stats"] = json.loads(ref["stdout"].strip().splitlines()[-1])["stats"]
            out_json = folder / f"evaluation_{size}.json"
            ours = run_measured([sys.executable, str(ROOT / "tools" / "benchmark_map.py"), "--protocol", "coco",
                                 "--predictions", str(results_path), "--annotations", str(gt_path),
                                 "--json", str(out_json), "--quiet", "--rows", "2"])
            evaluation = json.loads(out_json.read_text())
            row["project"] = {k: v for k, v in ours.items() if k != "stdout"}
            row["project"]["stats"] = [evaluation["stats"][k] for k in STAT_NAMES]
            row["project"]["backend"] = evaluation.get("backend")
            if "pycocotools" in row:
                ref, new = row["pycocotools"], row["project"]
                row["max_stat_difference"] = float(np.max(np.abs(np.subtract(ref["stats"], new["stats"]))))
                row["time_ratio"] = new["seconds"] / ref["seconds"]
                row["cpu_ratio"] = new["cpu_seconds"] / ref["cpu_seconds"]
                row["memory_ratio"] = new["peak_rss_mb"] / ref["peak_rss_mb"]
            rows.append(row)
            results_path.unlink()
            print(format_coco_row(row), file=sys.stderr)
            print(json.dumps(row), file=sys.stderr, flush=True)  # each row as it comes: a long run keeps its rows
    return rows


COCO_HEADER = (f"{'COCO results':>12} {'pycocotools s':>13} {'CPU s':>7} {'peak MB':>8} {'project s':>9} {'CPU s':>7} "
               f"{'peak MB':>8} {'time x':>6} {'CPU x':>6} {'mem x':>6} {'max |d stat|':>12}")


def format_coco_row(row: dict) -> str:
    new = row["project"]
    if "pycocotools" not in row:
        return (f"{row['results']:>12,} {'-':>13} {'-':>7} {'-':>8} {new['seconds']:9.1f} {new['cpu_seconds']:7.1f} "
                f"{new['peak_rss_mb']:8.0f} {'-':>6} {'-':>6} {'-':>6} {'-':>12}")
    ref = row["pycocotools"]
    return (f"{row['results']:>12,} {ref['seconds']:13.1f} {ref['cpu_seconds']:7.1f} {ref['peak_rss_mb']:8.0f} "
            f"{new['seconds']:9.1f} {new['cpu_seconds']:7.1f} {new['peak_rss_mb']:8.0f} {row['time_ratio']:6.2f} "
            f"{row['cpu_ratio']:6.2f} {row['memory_ratio']:6.2f} {row['max_stat_difference']:12.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median reported)")
    parser.add_argument("--predictions", type=int, default=4_000_000, help="synthetic predictions")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--coco", default="500000,2000000",
                        help="COCO result file sizes, side by side with pycocotools (comma-separated; '' for none)")
    parser.add_argument("--coco-alone", default="4000000",
                        help="COCO result file sizes for the project's path alone (comma-separated; '' for none)")
    parser.add_argument("--coco-only", action="store_true", help="only the COCO comparison")
    parser.add_argument("--coco-json", type=Path, help="write the COCO rows as JSON here")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--coco-worker", nargs=2, metavar=("GT", "RESULTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]))
        return
    if args.coco_worker:
        coco_pycocotools_worker(Path(args.coco_worker[0]), Path(args.coco_worker[1]))
        return
    print(f"load average before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    if args.coco_only:
        sizes = [int(v) for v in args.coco.split(",") if v]
        alone = [int(v) for v in args.coco_alone.split(",") if v]
        rows = bench_coco(sizes, alone)
        print(COCO_HEADER)
        for row in rows:
            print(format_coco_row(row))
        print(json.dumps(rows, indent=1))
        if args.coco_json:
            args.coco_json.write_text(json.dumps(rows, indent=1))
        print(f"load average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
        return
    print(f"{'case':<62} {'wall s':>7} {'CPU s':>7} {'mAP':>10} {'peak RSS MB':>12}")
    for name, (wall, cpu), value in bench_val2(args.repeats):
        print(f"{name:<62} {wall:7.3f} {cpu:7.3f} {value:10.6f} {'':>12}")
    if not args.skip_synthetic:
        for name, (wall, cpu), value, rss, objects in bench_synthetic(args.predictions, args.repeats):
            print(f"{name:<62} {wall:7.3f} {cpu:7.3f} {value:10.6f} {rss:12.0f}   ({objects} objects)")
    print(f"load average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


if __name__ == "__main__":
    main()
