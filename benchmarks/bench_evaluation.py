"""Speed and memory of the ILSVRC DET evaluation.

1. val2 end to end: meta_det.mat, the 9,917 val2 XML files, the devkit's demo predictions (49,013 lines),
   evaluation; beside it, the same evaluation step written as the devkit's per-image loops in plain Python
   (the reference semantics; the devkit itself under GNU Octave takes about 47 s here, not re-run).
2. Full ILSVRC val scale, synthetic: 20,121 images, ~60,000 objects, 4,000,000 predictions, evaluated
   in memory and from a submission file, each in a fresh process so that its peak RSS is its own.

    python benchmarks/bench_evaluation.py [--repeats 3] [--skip-synthetic] [--predictions 4000000]

Prints a table (median wall time over the repeats, the CPU time of that run, peak RSS) and the mAPs,
which must agree. The evaluation is single-threaded, so on a shared machine CPU time is the better
estimate of the unloaded wall time.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median reported)")
    parser.add_argument("--predictions", type=int, default=4_000_000, help="synthetic predictions")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]))
        return
    print(f"load average before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print(f"{'case':<62} {'wall s':>7} {'CPU s':>7} {'mAP':>10} {'peak RSS MB':>12}")
    for name, (wall, cpu), value in bench_val2(args.repeats):
        print(f"{name:<62} {wall:7.3f} {cpu:7.3f} {value:10.6f} {'':>12}")
    if not args.skip_synthetic:
        for name, (wall, cpu), value, rss, objects in bench_synthetic(args.predictions, args.repeats):
            print(f"{name:<62} {wall:7.3f} {cpu:7.3f} {value:10.6f} {rss:12.0f}   ({objects} objects)")
    print(f"load average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


if __name__ == "__main__":
    main()
