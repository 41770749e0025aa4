"""Throughput on one GPU, side by side in one run: the bare network, the detection engine, training.

    python benchmarks/bench_gpu.py [--device cuda] [--size 224] [--batch-size 1024] [--proposals 2000]
        [--images 16] [--budget 360] [--json OUT]
    python benchmarks/bench_gpu.py --device cpu --quick      # tiny settings: the test of this script

Rows (the paper's setting by default: 224 px crops, 2,000 proposals per image, 200 classes):

  network     torchvision's GoogLeNet alone, batch --batch-size: crops/s with fp32 weights under bf16
              autocast; with bf16 weights, channels-last; and that compiled (``torch.compile``)
  classifier  the project's region classifier prepared by :func:`detector.classifier.prepare_for_inference`
              (bf16 weights, channels-last), eager and compiled
  engine      :class:`detector.pipeline.Detector` on the examples/ photos: images/s and crops/s with
              precomputed proposals (random boxes of realistic sizes: the network's cost does not depend
              on where they are) through ``detect_batch`` (batches across images), one image per call,
              and ``detect_batch`` compiled; and with fast Selective Search computed on the fly by
              --workers processes ahead of the network
  train       regions/s at --size: the network's training step alone (a synthetic batch already on the
              device, bf16 autocast, SGD), and the training engine (:func:`detector.training.engine.train`)
              fed by :class:`detector.training.data.RegionBatchSource` from --workers processes
  process     as a user's shell sees it: precompute_proposals.py with --workers processes (images/s), and
              detect.py on one photo in the first cold process against a second process

The weights are random (speed does not depend on them; class biases are drawn so that a realistic number
of (region, class) pairs pass the 0.05 threshold). Each row runs a warm-up first (compilation included
there, its seconds printed), then times at least --min-seconds. Rows run in order of importance and
are skipped, with a note, once --budget seconds have passed. On a GPU the timed loops end with a
synchronize. The engine-facing code is :func:`engine_rows` and :func:`train_rows`; adapt them when the
engine changes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bench_dataset_detection import random_boxes, random_classifier  # this folder: run as a script

from detector.base.threads import add_threads_argument, configure_threads

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = PROJECT_ROOT / "examples"
QUICK = {"size": 64, "batch_size": 16, "proposals": 40, "images": 2, "train_regions": 8, "train_iterations": 4,
         "min_seconds": 0.0, "workers": 0, "precompute_images": 2}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--size", type=int, default=224, help="crop side, pixels (default 224)")
    p.add_argument("--batch-size", type=int, default=1024, help="crops per forward pass (default 1024)")
    p.add_argument("--proposals", type=int, default=2000, help="proposals per image (default 2000)")
    p.add_argument("--images", type=int, default=16, help="images per engine measurement (default 16)")
    p.add_argument("--train-regions", type=int, default=128, help="regions per training batch (R-CNN: 128)")
    p.add_argument("--train-iterations", type=int, default=40, help="timed training iterations (default 40)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data-loading processes of the training engine, and the detection engine's proposal "
                        "processes (default: cores, at most 8)")
    p.add_argument("--min-seconds", type=float, default=3.0, help="time each row at least this long (default 3)")
    p.add_argument("--precompute-images", type=int, default=48,
                   help="photos for the precompute row (default 48)")
    p.add_argument("--budget", type=float, default=360.0,
                   help="skip the timed rows left after this many seconds (default 360: with start-up and the "
                        "process rows, the whole run fits in 8 minutes of a GPU machine)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; with --quick on the CPU: eager)")
    p.add_argument("--skip", default="", help="comma-separated row groups to leave out: network, classifier, "
                   "engine, train, process, compile")
    p.add_argument("--quick", action="store_true", help="tiny settings, for a test on the CPU")
    p.add_argument("--json", help="write the rows as JSON here")
    add_threads_argument(p)
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.train_iterations = QUICK["train_iterations"]
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.quick and args.device == "cpu" else "inductor"
    args.skip = {s for s in args.skip.split(",") if s}
    return args


class Bench:
    """Times rows within a budget and collects them for the table."""

    def __init__(self, device, budget: float, min_seconds: float):
        self.device, self.budget, self.min_seconds = device, budget, min_seconds
        self.start = time.perf_counter()
        self.rows: list[dict] = []

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, group: str, name: str, fn: Callable[[], int], unit: str, per_image: int | None = None) -> None:
        """``fn()`` does one step and returns the items it handled; items/s over >= min_seconds."""
        row = {"group": group, "name": name, "unit": unit}
        if time.perf_counter() - self.start > self.budget:
            self.rows.append(row | {"note": "skipped: over the time budget"})
            print(f"  {group} {name}: skipped (budget)", flush=True)
            return
        t0 = time.perf_counter()
        fn()  # warm-up: compilation, cuDNN's algorithm search, the allocator
        self.sync()
        warmup = time.perf_counter() - t0
        items, steps, t0 = 0, 0, time.perf_counter()
        while steps < 2 or time.perf_counter() - t0 < self.min_seconds:
            items += fn()
            steps += 1
        self.sync()
        seconds = time.perf_counter() - t0
        row |= {"per_second": items / seconds, "warmup_s": round(warmup, 2), "steps": steps}
        if per_image:
            row["images_per_second"] = items / seconds / per_image
        self.rows.append(row)
        print(f"  {group} {name}: {row['per_second']:,.0f} {unit}/s (warm-up {warmup:.1f} s)", flush=True)


def network_rows(bench: Bench, args) -> None:
    """Bare torchvision GoogLeNet, then the project's classifier through prepare_for_inference."""
    import torch
    from torchvision.models import googlenet

    from detector.classifier import ClassifierConfig, RegionClassifier, prepare_for_inference

    dev, size, batch = bench.device, args.size, args.batch_size
    crops = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    crops_bf16 = crops.to(torch.bfloat16)

    def forward(model, inputs, autocast: bool = False) -> Callable[[], int]:
        def step() -> int:
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                model(inputs)
            return batch
        return step

    if "network" not in args.skip:
        net = googlenet(weights=None, aux_logits=False, init_weights=False).eval()
        net = net.to(dev, memory_format=torch.channels_last)
        bench.run("network", "fp32 weights + bf16 autocast", forward(net, crops, autocast=True), "crops")
        net = net.to(dtype=torch.bfloat16)
        bench.run("network", "bf16 weights, channels-last", forward(net, crops_bf16), "crops")
        if "compile" not in args.skip:
            compiled = torch.compile(net, backend=args.compile_backend)
            bench.run("network", f"bf16, channels-last, compiled ({args.compile_backend})",
                      forward(compiled, crops_bf16), "crops")
            del compiled
        del net
    if "classifier" not in args.skip:
        config = ClassifierConfig(num_classes=200, input_size=size)
        model = prepare_for_inference(RegionClassifier(config), dev, dtype=torch.bfloat16)
        bench.run("classifier", "bf16 weights, channels-last", forward(model, crops), "crops")
        if "compile" not in args.skip:
            model = prepare_for_inference(RegionClassifier(config), dev, dtype=torch.bfloat16, compile=True,
                                          compile_backend=args.compile_backend)
            bench.run("classifier", f"bf16, channels-last, compiled ({args.compile_backend})",
                      forward(model, crops), "crops")


def example_images(count: int) -> list[np.ndarray]:
    from detector.base.io import load_image

    photos = [load_image(p) for p in sorted(EXAMPLES.glob("*.jpg"))]
    return [photos[i % len(photos)] for i in range(count)]


def engine_rows(bench: Bench, args) -> None:
    """The detection engine (:class:`detector.pipeline.Detector`, bf16 weights and channels-last on CUDA):
    ``detect_batch`` over all images (batches filled across them), one image per call, ``detect_batch``
    compiled, and fast Selective Search computed on the fly by --workers processes ahead of the network."""
    from detector.base.vocab import ilsvrc_det_vocabulary
    from detector.pipeline import Detector, ProposalSettings

    images = example_images(args.images)
    rng = np.random.default_rng(0)
    boxes = [random_boxes(im.shape[:2], args.proposals, rng) for im in images]
    vocab = ilsvrc_det_vocabulary()
    crops = len(images) * args.proposals

    def build(source="ss-fast", options=None, compile=False) -> Detector:
        settings = ProposalSettings(source=source, options=options or {}, max_proposals=args.proposals)
        return Detector([random_classifier(args.size)], vocab, settings, device=bench.device, precision="bf16",
                        batch_size=args.batch_size, workers=args.workers, compile=compile)

    def batched(detector, with_boxes: bool = True) -> Callable[[], int]:
        def step() -> int:
            detector.detect_batch(images, boxes if with_boxes else None)
            return crops
        return step

    def per_image(detector) -> Callable[[], int]:
        def step() -> int:
            for image, b in zip(images, boxes):
                detector(image, proposals=b)
            return crops
        return step

    detector = build()
    per = args.proposals
    bench.run("engine", "precomputed, detect_batch", batched(detector), "crops", per)
    bench.run("engine", "precomputed, one image per call", per_image(detector), "crops", per)
    if "compile" not in args.skip:
        compiled = build(compile=args.compile_backend)
        bench.run("engine", f"precomputed, detect_batch, compiled ({args.compile_backend})", batched(compiled),
                  "crops", per)
        del compiled
    # fast mode keeps its 2,000 best boxes: with --proposals 2000 every image gets about that many
    options = {"max_boxes": args.proposals} | ({"max_side": 160} if args.quick else {})
    # crops/s counts --proposals per image (fast Selective Search gives about 1,990 on these photos)
    bench.run("engine", f"ss-fast on the fly ({args.workers} processes), detect_batch",
              batched(build("ss-fast", options), with_boxes=False), "crops", per)


class RandomProposals:
    """Proposal function for the training engine: random boxes, the same for an image every time."""

    def __init__(self, num: int):
        self.num = num

    def __call__(self, record, image: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(abs(hash(str(record.image_id))) % (2**32))
        return random_boxes(image.shape[:2], self.num, rng)


def train_rows(bench: Bench, args) -> None:
    """The training step alone, then the training engine with its data loading."""
    import torch

    from detector.base.vocab import ilsvrc_det_vocabulary
    from detector.data.records import Dataset, ImageRecord
    from detector.training.data import RegionBatchSource, RegionDataConfig
    from detector.training.distributed import DistContext
    from detector.training.engine import EngineConfig, train
    from detector.training.losses import LossConfig, detection_loss
    from detector.training.rcnn import region_loss
    from detector.training.sampler import SamplerConfig
    from detector.training.schedule import ScheduleConfig

    dev, regions, size = bench.device, args.train_regions, args.size
    model = random_classifier(size).to(dev, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    generator = torch.Generator(device="cpu").manual_seed(0)
    crops = torch.randn(regions, 3, size, size, generator=generator).to(dev).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, 201, (regions,), generator=generator).to(dev)
    targets = (0.1 * torch.randn(regions, 4, generator=generator)).to(dev)
    regress = labels > 0

    def step() -> int:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = model(crops)
            loss, _ = detection_loss(out.class_logits, out.box_deltas, labels, targets, regress, out.aux_logits,
                                     LossConfig())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return regions

    bench.run("train", f"step alone, {regions} regions, bf16 autocast", step, "regions")

    # the engine: RegionBatchSource over the examples/ photos (decoded once per worker), 2 images per batch
    vocab = ilsvrc_det_vocabulary()
    rng = np.random.default_rng(0)
    records = []
    for i, (path, image) in enumerate(zip(sorted(EXAMPLES.glob("*.jpg")) * 4, example_images(12))):
        gt = random_boxes(image.shape[:2], 4, rng)
        records.append(ImageRecord(image_id=i, file_name=str(path), gt_boxes=gt,
                                   gt_labels=rng.integers(1, vocab.num_classes + 1, 4)))
    sampler = SamplerConfig(regions_per_batch=regions, images_per_batch=2)
    source = RegionBatchSource(Dataset(records, vocab), RandomProposals(args.proposals), sampler,
                               RegionDataConfig(input_size=size, max_proposals=args.proposals))
    ctx = DistContext(device=dev)
    short, long = max(2, args.train_iterations // 4), args.train_iterations

    def run_engine(iterations: int) -> float:
        model = random_classifier(size).to(dev, memory_format=torch.channels_last)
        with tempfile.TemporaryDirectory() as tmp:
            config = EngineConfig(out_dir=tmp, schedule=ScheduleConfig(base_lr=1e-3, iterations=iterations),
                                  checkpoint_every=0, log_every=max(1, iterations), precision="bf16",
                                  num_workers=args.workers, progress=False)
            return train(model, source, region_loss(LossConfig()), config, ctx, report=lambda *_: None).seconds

    name = f"engine, {regions} regions, {args.workers} workers"
    if time.perf_counter() - bench.start > bench.budget:
        bench.rows.append({"group": "train", "name": name, "unit": "regions", "note": "skipped: over the time budget"})
        return
    # two runs of different length: the difference cancels start-up (workers, first batch, final checkpoint)
    t_short, t_long = run_engine(short), run_engine(long)
    per_second = (long - short) * regions / max(1e-9, t_long - t_short)
    bench.rows.append({"group": "train", "name": name, "unit": "regions", "per_second": per_second,
                       "warmup_s": round(t_short, 2), "steps": long})
    print(f"  train {name}: {per_second:,.0f} regions/s ({short} and {long} iterations: {t_short:.1f} s, "
          f"{t_long:.1f} s)", flush=True)


def timed_command(command: list[str], timeout: float) -> float:
    """Wall seconds of ``command`` run in a fresh process from the project root (raises if it fails)."""
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-800:]}")
    return time.perf_counter() - t0


def process_rows(bench: Bench, args) -> None:
    """What a user's shell sees: ``precompute_proposals.py`` over --precompute-images photos with --workers
    processes (images/s, process start included), and ``detect.py`` on one photo in a cold process (the
    first after this benchmark's start: imports, the model, the first batch) against the same command run
    again (the disk cache and numba's cache warm)."""
    tools = PROJECT_ROOT / "tools"
    photos = sorted(EXAMPLES.glob("*.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "images")
        folder.mkdir()
        for i in range(args.precompute_images):  # distinct names: the store holds each image once
            os.symlink(photos[i % len(photos)], folder / f"{i:05d}.jpg")
        if time.perf_counter() - bench.start > bench.budget:
            bench.rows.append({"group": "process", "name": "precompute", "note": "skipped: over the time budget"})
        else:
            options = ["--max-side", "160"] if args.quick else []
            seconds = timed_command([sys.executable, str(tools / "precompute_proposals.py"), str(folder),
                                     "--method", "ss-fast", "--out", str(Path(tmp, "store")),
                                     "--workers", str(max(1, args.workers)), *options], timeout=600)
            rate = args.precompute_images / seconds
            bench.rows.append({"group": "process", "name": f"precompute ss-fast, {args.workers} processes",
                               "unit": "images", "per_second": rate, "images_per_second": rate, "warmup_s": 0.0})
            print(f"  process precompute: {rate:.2f} images/s", flush=True)
        if time.perf_counter() - bench.start > bench.budget:
            bench.rows.append({"group": "process", "name": "detect.py", "note": "skipped: over the time budget"})
            return
        detect = [sys.executable, str(tools / "detect.py"), str(photos[0]), "--device", str(bench.device),
                  "--json", str(Path(tmp, "dets.json"))]
        cold, warm = timed_command(detect, 600), timed_command(detect, 600)
        for name, seconds in (("detect.py, one photo, first process", cold),
                              ("detect.py, one photo, second process", warm)):
            bench.rows.append({"group": "process", "name": name, "unit": "s", "seconds": round(seconds, 2),
                               "note": f"{seconds:.1f} s per process"})
        print(f"  process detect.py: first {cold:.1f} s, second {warm:.1f} s ({cold / warm:.2f}x)", flush=True)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'group':<11} {'what':<52} {'per second':>14} {'images/s':>9} {'warm-up s':>9}"]
    for r in rows:
        if "per_second" not in r:
            lines.append(f"{r['group']:<11} {r['name']:<52} {r.get('note', '')}")
            continue
        ips = f"{r['images_per_second']:9.2f}" if "images_per_second" in r else f"{'':>9}"
        lines.append(f"{r['group']:<11} {r['name']:<52} {r['per_second']:>8,.0f} {r['unit']:<5} {ips} "
                     f"{r['warmup_s']:9.1f}")
    return "\n".join(lines)


def machine(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} cores, torch {torch.__version__}"
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_threads(args.threads)  # before torch is imported
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here; use --device cpu (with --quick for a short run)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"{machine(device)}; {args.size} px, batch {args.batch_size}, {args.proposals} proposals/image, "
          f"{args.images} images, load average {os.getloadavg()[0]:.2f}", flush=True)
    bench = Bench(device, args.budget, args.min_seconds)
    network_rows(bench, args)
    if "engine" not in args.skip:
        engine_rows(bench, args)
    if "train" not in args.skip:
        train_rows(bench, args)
    if "process" not in args.skip:
        process_rows(bench, args)
    print(format_table(bench.rows))
    network = {r["name"]: r.get("per_second") for r in bench.rows if r["group"] == "network"}
    engine = max((r.get("per_second") or 0 for r in bench.rows
                  if r["group"] == "engine" and r["name"].startswith("precomputed")), default=None)
    best = max((v for v in network.values() if v), default=None)
    if engine and best:
        print(f"best engine (precomputed proposals) / best bare network: {engine / best:.2f}x")
    print(f"total {time.perf_counter() - bench.start:.0f} s, load average {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(device), "rows": bench.rows}, indent=2) + "\n",
                                   encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
