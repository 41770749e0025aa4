"""Dataset-scale detection throughput, side by side in one run, and the time the full 20,121-image
ILSVRC 2014 DET val set would take:

  per-image   ``detector(image, proposals)`` one image after another
  batched     ``detector.detect_batch(images, proposals)``: the network's batches filled across images
              (what tools/detect.py does through ``detect_stream``)
  runner      :func:`detector.dataset_runner.run_detection` from a proposal store: batched per chunk, images
              read by ``--workers`` threads, atomic part files (what ``benchmark_map.py --model`` does)

and with ``--with-ss``, fast Selective Search computed on the fly (it then dominates):

  per-image+ss  one image after another, proposals in this process
  batched+ss    ``detect_batch(images)``: proposals from ``--workers`` spawned processes running ahead of
                the network
  runner+ss     the runner, its ``--workers`` spawned processes reading images and computing proposals

    python benchmarks/bench_dataset_detection.py [--model PATH|default] [--size 112] [--proposals 300]
        [--images 6] [--batch-size 64] [--precision auto] [--threads 1] [--workers 1] [--with-ss]
        [--repeats 2] [--json OUT]

Images are chess/test photos (2048x1371; only Selective Search's cost depends on the size, and it works
at 500 px whatever the input). Proposals (except for runner+ss) are random boxes of realistic sizes, the
same for every mode: the network's cost does not depend on where they are. Without --model a random
200-class classifier of --size is used (speed does not depend on the weights; class biases are drawn so
that a realistic number of (region, class) pairs pass the 0.05 threshold). Times are medians over
--repeats runs after one warm-up, modes alternating so that load changes hit all alike; CPU seconds
(all threads of this process and of its finished worker processes) are printed beside them, since on a
shared machine they say what an idle one would take with one thread. The load average is printed too.
The last line
extrapolates the batched crops/s to the paper's setting (about 2,000 proposals per image).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from detector.base.threads import configure_threads

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CHESS_TEST = PROJECT_ROOT.parent / "shared" / "data" / "chess" / "test"
ILSVRC_VAL_IMAGES = 20121  # lines of the devkit's data/det_lists/val.txt
PAPER_PROPOSALS = 2000  # Selective Search (quality) + 200 MultiBox boxes per image, roughly


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", help="checkpoint, or 'default' for the installed default model "
                   "(default: a random 200-class classifier of --size)")
    p.add_argument("--size", type=int, default=112, help="input size of the random classifier (default 112)")
    p.add_argument("--proposals", type=int, default=300, help="proposals per image (default 300)")
    p.add_argument("--images", type=int, default=6, help="chess/test photos to detect (default 6)")
    p.add_argument("--batch-size", type=int, default=64, help="regions per forward pass (default 64)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--workers", type=int, default=1,
                   help="the runner's readers, and the engine's proposal processes (default 1)")
    p.add_argument("--with-ss", action="store_true", help="also time the modes with Selective Search on the fly")
    p.add_argument("--modes", help="comma-separated modes to time (default: all; e.g. batched+ss,runner+ss)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per mode after one warm-up (default 2)")
    p.add_argument("--json", help="write the table as JSON here")
    return p.parse_args(argv)


def random_classifier(size: int, num_classes: int = 200):
    """A region classifier with random weights whose scores look like a trained model's (also used by
    bench_gpu.py)."""
    import torch

    from detector.classifier import ClassifierConfig, RegionClassifier

    torch.manual_seed(0)
    model = RegionClassifier(ClassifierConfig(num_classes=num_classes, input_size=size))
    with torch.no_grad():
        for module in model.modules():  # activations of a realistic scale (the default init makes them vanish)
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        model.cls_score.weight.mul_(0.01)
        model.cls_score.bias.normal_(0, 2.0)  # a few classes per region above 0.05, as a trained model
    return model


def random_model(folder: Path, size: int) -> Path:
    """:func:`random_classifier` for the 200 ILSVRC classes, saved as a checkpoint in ``folder``."""
    from detector.base.checkpoint import make_checkpoint_config, save_checkpoint
    from detector.base.vocab import ilsvrc_det_vocabulary

    vocab = ilsvrc_det_vocabulary()
    model = random_classifier(size, vocab.num_classes)
    path = folder / f"random_{size}"
    save_checkpoint(path, model.state_dict(), make_checkpoint_config(model.config, vocab))
    return path


def random_boxes(image_size: tuple[int, int], num: int, rng: np.random.Generator) -> np.ndarray:
    """float32 ``(num, 4)`` xyxy boxes, sides 5-60% of the image's."""
    h, w = image_size
    xy = rng.uniform(0, 0.9, (num, 2)) * [w, h]
    wh = rng.uniform(0.05, 0.6, (num, 2)) * [w, h]
    return np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)


def median_times(fns: dict, repeats: int) -> dict:
    """Mode -> (median wall seconds, median CPU seconds); on a shared machine the CPU time is what an idle
    one would take (with one thread), the wall time what this one took. CPU time counts finished worker
    processes too (their pools end with each run)."""
    def cpu_seconds() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), cpu_seconds()
            fn()
            times[name].append((time.perf_counter() - wall, cpu_seconds() - cpu))
    return {name: tuple(statistics.median(x) for x in zip(*t)) for name, t in times.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_threads(args.threads)  # before torch is imported: passive OpenMP waits, as the tools run
    from detector.base.io import load_image
    from detector.data.records import Dataset, ImageRecord
    from detector.dataset_runner import RunConfig, claim_parts_folder, run_detection, run_settings
    from detector.pipeline import Detector, default_model

    work = Path(tempfile.mkdtemp(prefix="bench_dataset_"))
    if args.model == "default":
        model = default_model()
        if model is None:
            sys.exit("no default model is installed yet; pass --model PATH or leave --model out")
    else:
        model = Path(args.model) if args.model else random_model(work, args.size)
    files = sorted(CHESS_TEST.glob("*.jpg"))[: args.images]
    records = [ImageRecord(image_id=i, file_name=f.name) for i, f in enumerate(files)]
    detector = Detector.from_checkpoint(model, device=args.device, precision=args.precision,
                                        batch_size=args.batch_size, max_proposals=args.proposals,
                                        workers=args.workers)
    computed = detector.proposals  # the checkpoint's method and options, --proposals at most
    images = [load_image(f) for f in files]
    rng = np.random.default_rng(0)
    boxes = [random_boxes(im.shape[:2], args.proposals, rng) for im in images]
    store = {f.name: b for f, b in zip(files, boxes)}  # a mapping serves as the runner's proposal store
    dataset = Dataset(records=records, vocab=detector.vocabulary, image_root=CHESS_TEST, name="chess-test")
    runs = iter(range(1 << 30))

    def using(source, fn):
        def run():
            detector.proposals = replace(computed, source=source)
            fn()
        return run

    def runner():
        out = claim_parts_folder(work / f"parts{next(runs)}", run_settings([model], detector, dataset, 8))
        run_detection(detector, dataset, out, RunConfig(chunk_size=8, workers=args.workers), progress=False)

    modes = {
        "per-image": lambda: [detector(im, proposals=b) for im, b in zip(images, boxes)],
        "batched": lambda: detector.detect_batch(images, boxes),
        "runner": using(store, runner),
    }
    if args.with_ss:
        ss = computed.source if computed.computed else "ss-fast"
        modes["per-image+ss"] = using(ss, lambda: [detector(im) for im in images])
        modes["batched+ss"] = using(ss, lambda: detector.detect_batch(images))
        modes["runner+ss"] = using(ss, runner)
    if args.modes:
        unknown = set(args.modes.split(",")) - set(modes)
        if unknown:
            sys.exit(f"unknown modes {sorted(unknown)}; choose from {', '.join(modes)} (+ss ones with --with-ss)")
        modes = {k: v for k, v in modes.items() if k in args.modes.split(",")}
    seconds = median_times(modes, args.repeats)
    crops = len(files) * args.proposals * len(detector.models)
    cfg = detector.models[0].config
    print(f"{len(files)} images, {args.proposals} proposals each, input {cfg.input_size} px, "
          f"{detector.vocabulary.num_classes} classes, {detector.dtype}, batch {args.batch_size}, "
          f"{args.threads} torch thread(s), {args.workers} worker(s), device {detector.device}, on-the-fly "
          f"proposals (+ss): {computed.source if computed.computed else 'ss-fast'}; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'mode':<13} {'s/image':>8} {'CPU s/image':>11} {'images/s':>9} {'crops/s':>8} "
          f"{'ILSVRC val (20,121 images)':>27}")
    rows = []
    for name, (wall, cpu) in seconds.items():
        per_image, cpu_per_image = wall / len(files), cpu / len(files)
        val_hours = ILSVRC_VAL_IMAGES * per_image / 3600
        rate = crops / wall if not name.endswith("+ss") else None
        rows.append({"mode": name, "seconds_per_image": per_image, "cpu_seconds_per_image": cpu_per_image,
                     "images_per_second": 1 / per_image, "crops_per_second": rate, "ilsvrc_val_hours": val_hours})
        rate_text = f"{rate:8.1f}" if rate else f"{'-':>8}"
        print(f"{name:<13} {per_image:8.3f} {cpu_per_image:11.3f} {1 / per_image:9.3f} {rate_text} {val_hours:25.1f} h")
    if "batched" not in seconds:
        return 0
    batched_rate = crops / seconds["batched"][0]
    paper_hours = ILSVRC_VAL_IMAGES * PAPER_PROPOSALS * len(detector.models) / batched_rate / 3600
    print(f"extrapolated: {PAPER_PROPOSALS} proposals per image at the batched {batched_rate:.1f} crops/s: "
          f"{PAPER_PROPOSALS * len(detector.models) / batched_rate:.1f} s/image, ILSVRC val in {paper_hours:.1f} h "
          "(proposals precomputed)")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args) | {"model": str(model)}, "rows": rows,
                                               "paper_extrapolation_hours": paper_hours}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
