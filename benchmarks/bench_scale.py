"""ILSVRC-scale benchmark: time per image, peak memory per process and open files of every step that
touches the whole dataset, against the number of images N, on generated ILSVRC-like data.

Data (made once into ``--data``, default ``/tmp/bench_scale``, and reused): real JPEGs of ILSVRC sizes
(500x375 mostly; smooth noise with rectangles, a pool of ``--pool`` distinct images hard-linked under N
distinct names, so that every step sees N distinct paths while the disk holds a few hundred files), one
ILSVRC XML per image (1-4 objects of the 200 DET classes, read by :func:`detector.data.read_ilsvrc_det`),
an image list per N, and synthetic proposal stores (2,000 random boxes per image plus jittered copies of
the objects, written by :mod:`proposals.store`; one compacted store per N, and stores in 64-image parts,
precompute's chunks, at each N and at 100k and 480k images).

Each row is one fresh Python process (``--child``, under ``RLIMIT_NOFILE`` ``--nofile``), so its peak RSS
(``VmHWM``) is its own; data-loading workers report their own with each batch. Beside it, the largest
anonymous RSS (``RssAnon``, sampled every 20 ms and per batch): the memory a process keeps, without the
file pages of a mapped store and the shared memory of a MultiBox preload, which ``VmHWM`` counts too.
Open files are the entries of ``/proc/self/fd``, sampled every 20 ms (the peak) and after the step.
Every process that imports torch starts near 1 GB of RSS; each row prints that "ready" figure. Rows:

  precompute        ``proposals.precompute.precompute`` (ss-fast, ``--workers`` spawned processes) on a
                    store that already holds N - S images in 64-image parts: computes the S sampled images,
                    verifies every part, compacts. s/img is the sample's (flat in N); the time the whole N
                    would take is ``S/img x N / workers`` + the overhead column (verify + compaction at N).
  store             ``ProposalStore(folder)`` of N images in 64-image parts (N/64 part files), then 10,000
                    random lookups: open time, lookup median, open files after open and after lookups.
  worker-start      what a spawned data-loading worker receives: a training source over N records (built in
                    memory, also at 100k and 480k) pickled, then unpickled in a fresh spawned process: its
                    size, the unpickling time and the RSS it adds to the worker.
  train             ``RegionBatchSource`` (default ``RegionDataConfig``, sampler and caches; crops of
                    ``--train-size`` px) through the training engine's data loader with ``--workers``
                    spawned workers, visiting every one of the N images once (N / 2 iterations); the
                    per-worker peak RSS is the figure that must not grow with N. Also: the source's
                    pickled size (what each worker receives) and the time to the first batch.
  validation        ``Validator(model)`` over N images (a random 200-class classifier of ``--val-size`` px,
                    ``--val-proposals`` proposals per image: the classifier's cost is not the point,
                    the image cache is).
  multibox          ``ResizedImages`` (MultiBox training's default preload) and ``MultiBoxBatches``
                    through the data loader's ``--workers`` workers, every image once.
  detect-runner     ``dataset_runner.run_detection`` on a sample of S images (random classifier as above,
                    proposals from the store): the runner's per-image overhead, flat in N.
  results-ilsvrc    ``dataset_runner.write_results`` (merge the parts of N images, ~200 detections each,
  results-coco      then write the result file) in the ILSVRC submission / COCO JSON format.
  eval-ilsvrc       ``evaluate_ilsvrc`` / ``evaluate_coco`` of that result file against the N XML files
  eval-coco         (reading included).

The extrapolation to 480,000 images is a least-squares line through (N, peak RSS), (N, anonymous RSS) and
(N, seconds for the whole N) of each row, stated as such (stores and worker start-up are also measured
directly at 100k and 480k). At an idle core's per-image times the full default needs roughly 25 minutes on
2 cores (an estimate: the README's run, at load 4 to 24, took over an hour of wall time, in parts run side
by side); ``--quick`` (N = 200 and 1,000) a few minutes. Runs of different components are printed as one
table with ``--merge A.json B.json``.

    python benchmarks/bench_scale.py [--n 1000 5000 20000] [--quick] [--json OUT] [--components ...]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SEED = 17
DATA_VERSION = 1
PART_IMAGES = 64  # images per part file: precompute's default chunk
ILSVRC_TRAIN = 480_000
# (h, w) of ILSVRC DET images, roughly as often as they occur (most are 500 on the long side)
SIZES = (((375, 500), 6), ((500, 375), 2), ((333, 500), 2), ((500, 500), 1), ((400, 500), 1), ((500, 334), 1))
COMPONENTS = ("precompute", "store", "worker-start", "train", "validation", "multibox", "detect-runner",
              "results-ilsvrc", "results-coco", "eval-ilsvrc", "eval-coco")


def image_name(i: int) -> str:
    return f"ILSVRC2014_train_{i:08d}"


# -- generated data --------------------------------------------------------------------------------------------

def _pool_image(args) -> dict:
    """One distinct JPEG: smooth colour noise, 1-4 filled rectangles (the objects), fine noise."""
    import cv2

    folder, i = args
    rng = np.random.default_rng([SEED, i])
    sizes, weights = zip(*SIZES)
    h, w = sizes[rng.choice(len(sizes), p=np.array(weights) / sum(weights))]
    coarse = rng.uniform(0, 255, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.float32)
    image = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    rects = []
    for _ in range(int(rng.integers(1, 5))):
        bw, bh = (int(v) for v in rng.uniform(0.1, 0.8, 2) * [w, h])
        x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        texture = cv2.resize(rng.uniform(-40, 40, (4, 4, 3)).astype(np.float32), (bw, bh))
        image[y1:y1 + bh, x1:x1 + bw] = rng.uniform(0, 255, 3).astype(np.float32) + texture
        rects.append([x1, y1, x1 + bw, y1 + bh])  # project xyxy, pixels
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    path = Path(folder) / f"pool_{i:05d}.JPEG"
    cv2.imwrite(str(path), np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return {"file": path.name, "size": [int(h), int(w)], "rects": rects}


def _xml(name: str, size, rects, wnids) -> str:
    objects = "".join(
        f"\t<object>\n\t\t<name>{wnid}</name>\n\t\t<bndbox>\n\t\t\t<xmin>{x1 + 1}</xmin>\n\t\t\t<ymin>{y1 + 1}</ymin>\n"
        f"\t\t\t<xmax>{x2}</xmax>\n\t\t\t<ymax>{y2}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for (x1, y1, x2, y2), wnid in zip(rects, wnids))  # XML: 1-based, inclusive
    return (f"<annotation>\n\t<folder>ILSVRC2014_DET_train</folder>\n\t<filename>{name}</filename>\n"
            f"\t<source>\n\t\t<database>ILSVRC_2014</database>\n\t</source>\n\t<size>\n\t\t<width>{size[1]}</width>\n"
            f"\t\t<height>{size[0]}</height>\n\t</size>\n\t<segmented>0</segmented>\n{objects}</annotation>\n")


class Pool:
    """The distinct images; image ``i`` is pool image ``i % len(pool)``, its objects' classes drawn from ``i``."""

    def __init__(self, data: Path):
        self.data = Path(data)
        self.meta = json.loads((self.data / "pool.json").read_text())

    def __len__(self) -> int:
        return len(self.meta)

    def of(self, i: int) -> dict:
        return self.meta[i % len(self.meta)]

    def labels(self, i: int) -> np.ndarray:
        """1..200 labels of image ``i``'s objects."""
        return np.random.default_rng([SEED, 1, i]).integers(1, 201, len(self.of(i)["rects"]))


def _write_images(args) -> None:
    data, start, stop = args
    from detector.base.vocab import ilsvrc_det_vocabulary

    wnids = ilsvrc_det_vocabulary().wnids
    pool = Pool(data)
    for i in range(start, stop):
        meta, name = pool.of(i), image_name(i)
        link = data / "images" / f"{name}.JPEG"
        if not link.exists():
            os.link(data / "pool" / meta["file"], link)
        xml = _xml(name, meta["size"], meta["rects"], [wnids[c - 1] for c in pool.labels(i)])
        (data / "annotations" / f"{name}.xml").write_text(xml)


def _ranges(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, stop)) for a in range(start, stop, step)]


def generate(data: str | os.PathLike, n: int, pool_size: int = 256, procs: int = 2) -> Path:
    """ILSVRC-like images and XML for images ``0 .. n - 1`` in ``data`` (kept; only what is missing is made),
    and ``lists/n<N>.txt`` lists. Returns the folder."""
    data = Path(data)
    manifest = data / "manifest.json"
    state = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if state.get("version") != DATA_VERSION or state.get("pool") != pool_size:
        if data.exists():
            shutil.rmtree(data)
        state = {"version": DATA_VERSION, "pool": pool_size, "images": 0}
    for sub in ("pool", "images", "annotations", "lists", "stores"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    with ctx.Pool(procs) as workers:
        if not (data / "pool.json").is_file():
            meta = workers.map(_pool_image, [(str(data / "pool"), i) for i in range(pool_size)])
            (data / "pool.json").write_text(json.dumps(meta))
        if state["images"] < n:
            workers.map(_write_images, [(data, a, b) for a, b in _ranges(state["images"], n, 2000)])
            state["images"] = n
            manifest.write_text(json.dumps(state))
    return data


def image_list(data: Path, n: int) -> Path:
    path = data / "lists" / f"n{n}.txt"
    if not path.is_file():
        path.write_text("".join(f"{image_name(i)} {i + 1}\n" for i in range(n)))
    return path


def _proposals(pool: Pool, i: int, num_boxes: int) -> tuple[tuple[int, int], np.ndarray]:
    """``(h, w)`` and float32 ``(num_boxes, 4)`` xyxy: jittered copies of the objects, then random boxes."""
    meta = pool.of(i)
    h, w = meta["size"]
    rng = np.random.default_rng([SEED, 2, i])
    gt = np.asarray(meta["rects"], np.float32).reshape(-1, 4)
    near = np.repeat(gt, 8, 0)[:num_boxes]
    near = near + rng.normal(0, 0.08, near.shape).astype(np.float32) * np.tile(near[:, 2:] - near[:, :2], 2)
    k = num_boxes - len(near)
    xy = rng.uniform(0, 0.9, (k, 2)) * [w, h]
    wh = rng.uniform(0.05, 0.6, (k, 2)) * [w, h]
    rand = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1)
    boxes = np.clip(np.concatenate([near, rand]), 0, [w, h, w, h]).astype(np.float32)
    return (h, w), boxes


PROPOSAL_META = {"method": "ss-fast", "options": {}}  # precompute's default method: its stores can be extended


def _write_parts(args) -> None:
    from proposals.store import ImageProposals, encode_boxes, write_part

    data, folder, ranges, num_boxes = args
    pool = Pool(data)
    for start, stop in ranges:
        entries = []
        for i in range(start, stop):
            size, boxes = _proposals(pool, i, num_boxes)
            entries.append(ImageProposals(image_name(i), size, encode_boxes(boxes, size)))
        write_part(Path(folder) / f"chunk-{start // PART_IMAGES:07d}-bench.pstore", entries, PROPOSAL_META)


def proposal_store(data: Path, n: int, num_boxes: int, compacted: bool, procs: int = 2) -> Path:
    """A store of images ``0 .. n - 1`` (names as the lists give them): in 64-image parts, or compacted into
    one part as precompute leaves it. Made once; the folder name carries the store format's version."""
    from proposals import part

    version = part.MAGIC.decode("ascii", "replace").lower()
    folder = data / "stores" / f"{'one' if compacted else 'parts'}-{n}-{num_boxes}-{version}"
    if (folder / "done").is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    ranges = _ranges(0, n, PART_IMAGES)
    per = math.ceil(len(ranges) / (procs * 4))
    with mp.get_context("spawn").Pool(procs) as workers:
        workers.map(_write_parts, [(data, folder, ranges[a:a + per], num_boxes) for a in range(0, len(ranges), per)])
    if compacted:
        from proposals.store import compact

        compact(folder)
    (folder / "done").write_text("")
    return folder


class _Dets:
    """What a detection part holds per image (``write_chunk`` reads boxes, scores, labels and the count)."""

    def __init__(self, boxes, scores, labels):
        self.boxes, self.scores, self.labels = boxes, scores, labels

    def __len__(self) -> int:
        return len(self.scores)


def synthetic_detections(pool: Pool, i: int, num: int) -> _Dets:
    """``num`` detections of image ``i``, best first: 5 jittered copies of each object with its label, then
    random boxes with random labels; scores in (0.05, 1)."""
    meta = pool.of(i)
    h, w = meta["size"]
    rng = np.random.default_rng([SEED, 3, i])
    gt = np.asarray(meta["rects"], np.float32).reshape(-1, 4)
    near = np.repeat(gt, 5, 0)
    near = near + rng.normal(0, 0.1, near.shape).astype(np.float32) * np.tile(near[:, 2:] - near[:, :2], 2)
    k = num - len(near)
    xy = rng.uniform(0, 0.9, (k, 2)) * [w, h]
    boxes = np.concatenate([near, np.concatenate([xy, np.minimum(xy + rng.uniform(0.05, 0.6, (k, 2)) * [w, h],
                                                                 [w, h])], 1)])
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    labels = np.concatenate([np.repeat(pool.labels(i), 5), rng.integers(1, 201, k)]).astype(np.int64)
    scores = np.sort(rng.uniform(0.05, 1.0, num).astype(np.float32))[::-1].copy()
    return _Dets(boxes, scores, labels)


def detection_parts(data: Path, n: int, per_image: int, chunk_size: int) -> Path:
    """A complete parts folder of dataset detection (``dataset_runner``'s format) for images ``0 .. n - 1``."""
    from detector.dataset_runner import chunk_path, write_chunk

    folder = data / "detections" / f"parts-{n}-{per_image}-{chunk_size}"
    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    pool = Pool(data)
    for chunk, (a, b) in enumerate(_ranges(0, n, chunk_size)):
        write_chunk(chunk_path(folder, chunk), [(i, f"{image_name(i)}.JPEG", synthetic_detections(pool, i, per_image), "")
                                                for i in range(a, b)])
    (folder / "done").write_text("")
    return folder


# -- measuring inside a child process ----------------------------------------------------------------------------

def memory_mb() -> dict:
    """This process's resident set now and its peak (``VmRSS``, ``VmHWM`` of ``/proc/self/status``) and the
    anonymous part of the resident set now (``RssAnon``: not file pages such as a mapped proposal store's,
    which the kernel drops and processes share), MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:")):
                key = {"VmRSS:": "rss", "VmHWM:": "hwm", "RssAnon:": "anon"}[line.split()[0]]
                out[key] = int(line.split()[1]) / 1024
    return out


def open_files() -> int:
    """Open file descriptors of this process (``/proc/self/fd``; the listing's own one not counted)."""
    return len(os.listdir("/proc/self/fd")) - 1


class FdPeak(threading.Thread):
    """The most file descriptors this process held, and its largest anonymous RSS, sampled every 20 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.anon, self._stop_event = open_files(), memory_mb()["anon"], threading.Event()
        self.start()

    def run(self):
        while not self._stop_event.wait(0.02):
            self.peak = max(self.peak, open_files())
            self.anon = max(self.anon, memory_mb()["anon"])

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, open_files())


class Measured:
    """A training batch source whose batches also carry the worker's pid, RSS, peak RSS and open files."""

    def __init__(self, source):
        self.source = source

    def batch(self, iteration: int) -> dict:
        import torch

        out = self.source.batch(iteration)
        mem = memory_mb()
        out["worker_stats"] = torch.tensor([os.getpid(), mem["rss"], mem["hwm"], open_files(), mem["anon"]],
                                           dtype=torch.float64)
        return out


def load_all(source, iterations: int, workers: int) -> dict:
    """Run the training engine's data loader (``workers`` spawned processes) over ``iterations`` batches."""
    # the loader train() uses: spawned workers, prefetch, the source pickled to each
    from detector.training.engine import _batches

    start = time.perf_counter()
    first, seen = None, {}
    for batch in _batches(Measured(source), 0, iterations, workers):
        if first is None:
            first = time.perf_counter() - start
        pid, rss, hwm, fds, anon = batch.pop("worker_stats").tolist()
        w = seen.setdefault(int(pid), {"first_rss_mb": rss, "first_anon_mb": anon, "batches": 0, "peak_anon_mb": 0})
        w.update(rss_mb=rss, peak_rss_mb=hwm, open_files=int(fds), anon_mb=anon, peak_anon_mb=max(w["peak_anon_mb"], anon))
        w["batches"] += 1
        del batch
    return {"seconds": time.perf_counter() - start, "first_batch_s": first, "workers": list(seen.values())}


def _dataset(data: Path, n: int):
    from detector.data import read_ilsvrc_det

    return read_ilsvrc_det(image_list(data, n), data / "annotations", image_root=data / "images")


def store_boxes(n: int, args) -> int:
    return args.boxes if n <= args.n_boxes_up_to else args.big_store_boxes


def run_precompute(data: Path, n: int, args, work: Path) -> dict:
    from proposals.precompute import PrecomputeConfig, list_file, precompute
    from proposals.store import ProposalStore, part_files, write_part

    files = part_files(proposal_store(data, n, args.boxes, compacted=False))
    out = work / f"precompute-{n}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tail = 1  # the last parts, enough to hold the sample: their images but the sample's stay done
    while tail < len(files) and sum(len(ProposalStore(f)) for f in files[-tail:]) < args.sample:
        tail += 1
    for f in files[:-tail]:
        os.link(f, out / f.name)
    last = [e for f in files[-tail:] for e in ProposalStore(f).entries()]
    sample = min(args.sample, len(last))
    if len(last) > sample:
        write_part(out / files[-1].name, last[: len(last) - sample], PROPOSAL_META)
    entries = list_file(image_list(data, n), data / "images")
    start = time.perf_counter()
    report = precompute(entries, out, PrecomputeConfig(method="ss-fast", workers=args.workers), progress=False)
    seconds = time.perf_counter() - start
    assert report.done == sample and not report.failures, (report.done, report.failures)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    num_parts = len(part_files(out))
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": report.seconds, "images": sample, "overhead_s": seconds - report.seconds,
            "workers": [{"peak_rss_mb": children}] if args.workers > 1 else [],
            "notes": f"sample {sample} of {n}; {len(files)} parts in, {num_parts} out; "
                     f"verify+compact {seconds - report.seconds:.1f} s"}


def run_store(data: Path, n: int, args, work: Path) -> dict:
    from proposals.store import ProposalStore, part_files

    folder = proposal_store(data, n, store_boxes(n, args), compacted=False)
    before = open_files()
    start = time.perf_counter()
    store = ProposalStore(folder)
    open_s = time.perf_counter() - start
    after_open = open_files() - before
    mem_open = memory_mb()["rss"]
    names = store.names()
    rng = np.random.default_rng(0)
    lat = []
    for i in rng.integers(0, len(names), args.lookups):
        t = time.perf_counter()
        boxes, _ = store[names[i]]
        lat.append(time.perf_counter() - t)
    assert len(store) == n and len(boxes) == store_boxes(n, args)
    lookup_ms = float(np.median(lat) * 1e3)
    return {"seconds": open_s, "images": n, "open_s": open_s, "lookup_ms": lookup_ms,
            "open_files_after_open": after_open, "open_files_after_lookups": open_files() - before,
            "rss_after_open_mb": mem_open, "parts": len(part_files(folder)), "boxes_per_image": store_boxes(n, args),
            "notes": f"{len(part_files(folder))} parts x {store_boxes(n, args)} boxes/img; open {open_s:.2f} s, "
                     f"lookup {lookup_ms:.3f} ms; fds +{after_open} after open, "
                     f"+{open_files() - before} after {args.lookups} lookups"}


def run_train(data: Path, n: int, args, work: Path) -> dict:
    import pickle

    from detector.training.data import RegionBatchSource, RegionDataConfig
    from detector.training.rcnn import StoreProposals
    from detector.training.sampler import SamplerConfig

    dataset = _dataset(data, n)
    proposals = StoreProposals(proposal_store(data, n, args.boxes, compacted=True))
    sampler = SamplerConfig()
    source = RegionBatchSource(dataset, proposals, sampler, RegionDataConfig(input_size=args.train_size))
    pickled = len(pickle.dumps(source))
    loaded = load_all(source, math.ceil(n / sampler.images_per_batch), args.workers)
    return loaded | {"images": n, "pickled_mb": pickled / 1e6,
                     "notes": f"source pickled {pickled / 1e6:.1f} MB; first batch {loaded['first_batch_s']:.1f} s"}


def _worker_start(blob_path: str, queue) -> None:
    """In a spawned process: what a data-loading worker pays to receive the source (imports first)."""
    import pickle

    import detector.training.data  # noqa: F401 - imported before the baseline, as a worker has it
    import detector.training.rcnn  # noqa: F401

    before = memory_mb()["rss"]
    blob = Path(blob_path).read_bytes()
    start = time.perf_counter()
    source = pickle.loads(blob)
    seconds = time.perf_counter() - start
    del blob  # the pickle's bytes are transient (in the peak); what stays is the source
    queue.put({"unpickle_s": seconds, "rss_added_mb": memory_mb()["rss"] - before, "rss_mb": memory_mb()["rss"],
               "peak_rss_mb": memory_mb()["hwm"], "records": len(source.dataset)})


def run_worker_start(data: Path, n: int, args, work: Path) -> dict:
    import pickle

    from detector.base.vocab import ilsvrc_det_vocabulary
    from detector.data.records import Dataset, ImageRecord
    from detector.training.data import RegionBatchSource, RegionDataConfig
    from detector.training.rcnn import StoreProposals

    pool = Pool(data)  # records as the XML reader makes them, built here for N beyond the generated images
    records = [ImageRecord(image_id=i + 1, file_name=f"{image_name(i)}.JPEG", image_size=tuple(pool.of(i)["size"]),
                           gt_boxes=pool.of(i)["rects"], gt_labels=pool.labels(i)) for i in range(n)]
    dataset = Dataset(records, ilsvrc_det_vocabulary(), data / "images", f"synthetic-{n}")
    proposals = StoreProposals(proposal_store(data, n, store_boxes(n, args), compacted=False))
    source = RegionBatchSource(dataset, proposals, config=RegionDataConfig(input_size=args.train_size))
    start = time.perf_counter()
    blob = pickle.dumps(source)
    dump_s = time.perf_counter() - start
    (work / "source.pkl").write_bytes(blob)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    worker = ctx.Process(target=_worker_start, args=(str(work / "source.pkl"), queue))
    worker.start()
    got = queue.get(timeout=args.timeout)
    worker.join()
    assert got["records"] == n
    return {"seconds": got["unpickle_s"], "images": n, "pickled_mb": len(blob) / 1e6, "pickle_s": dump_s,
            "workers": [got],
            "notes": f"source pickled {len(blob) / 1e6:.1f} MB in {dump_s:.2f} s; a spawned worker unpickles it in "
                     f"{got['unpickle_s']:.2f} s, +{got['rss_added_mb']:.0f} MB"}


def run_validation(data: Path, n: int, args, work: Path) -> dict:
    import torch
    from bench_dataset_detection import random_classifier  # this folder: run as a script

    from detector.training.rcnn import StoreProposals
    from detector.training.validation import Validator

    torch.set_num_threads(1)
    dataset = _dataset(data, n)
    model = random_classifier(args.val_size)
    validator = Validator(dataset, StoreProposals(proposal_store(data, n, args.boxes, compacted=True)),
                          args.val_proposals, precision="fp32", batch_size=64)
    start = time.perf_counter()
    result = validator(model)
    return {"seconds": time.perf_counter() - start, "images": n,
            "notes": f"{args.val_proposals} proposals/img at {args.val_size} px; {result['num_detections']} dets"}


def run_multibox(data: Path, n: int, args, work: Path) -> dict:
    from detector.training.multibox import MultiBoxTrainConfig
    from detector.training.multibox_data import BatchConfig, MultiBoxBatches, ResizedImages
    from proposals.multibox import MultiBoxConfig

    dataset = _dataset(data, n)
    preload = MultiBoxTrainConfig.__dataclass_fields__["preload"].default  # what gdet-train-multibox does
    size = MultiBoxConfig().input_size
    start = time.perf_counter()
    images = ResizedImages(dataset, size, preload=preload, progress=False)
    images_s = time.perf_counter() - start
    mem = memory_mb()["rss"]
    config = BatchConfig()
    loaded = load_all(MultiBoxBatches(images, config), math.ceil(n / config.batch_size), args.workers)
    loaded["seconds"] += images_s
    return loaded | {"images": n, "rss_after_images_mb": mem,
                     "notes": f"preload={preload}, {size} px; ResizedImages {images_s:.1f} s, main RSS then "
                              f"{mem:.0f} MB"}


def run_detect_runner(data: Path, n: int, args, work: Path) -> dict:
    from dataclasses import replace

    from bench_dataset_detection import random_model  # this folder: run as a script

    from detector.base.jobs import Shard
    from detector.dataset_runner import RunConfig, claim_parts_folder, run_detection, run_settings
    from detector.pipeline import Detector
    from proposals.store import ProposalStore

    dataset = _dataset(data, n)
    model = random_model(work, args.val_size)
    detector = Detector.from_checkpoint(model, device="cpu", precision="fp32", batch_size=64,
                                        max_proposals=args.val_proposals, workers=1)
    detector.proposals = replace(detector.proposals, source=ProposalStore(proposal_store(data, n, args.boxes, True)))
    chunk = RunConfig().chunk_size
    config = RunConfig(shard=Shard(0, math.ceil(n / chunk)))  # one chunk of the N: the rest is the same work
    out = claim_parts_folder(work / f"parts-{n}", run_settings([model], detector, dataset, chunk))
    start = time.perf_counter()
    report = run_detection(detector, dataset, out, config, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": report.done,
            "notes": f"{report.done} of {n} images (one chunk), {args.val_proposals} proposals/img at "
                     f"{args.val_size} px"}


def _results(data: Path, n: int, args, work: Path, fmt: str) -> dict:
    from detector.dataset_runner import RunConfig, write_results

    chunk = RunConfig().chunk_size
    parts = detection_parts(data, n, args.detections, chunk)
    dataset = _dataset(data, n)
    out = data / "detections" / f"results-{n}-{args.detections}"
    start = time.perf_counter()
    path, count, _ = write_results(parts, dataset, chunk, out, fmt)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": n, "detections": count, "file_mb": path.stat().st_size / 1e6,
            "notes": f"{count:,} detections, file {path.stat().st_size / 1e6:.0f} MB"}


def _evaluate(data: Path, n: int, args, work: Path, fmt: str) -> dict:
    from detector.data import read_ilsvrc_det
    from detector.evaluation.coco import evaluate_coco
    from detector.evaluation.ilsvrc import evaluate_ilsvrc
    from detector.evaluation.result_files import RESULT_FILES

    path = data / "detections" / f"results-{n}-{args.detections}" / RESULT_FILES[fmt]
    start = time.perf_counter()
    dataset = read_ilsvrc_det(image_list(data, n), data / "annotations")
    result = (evaluate_ilsvrc if fmt == "ilsvrc" else evaluate_coco)(dataset, path)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": n, "mAP": float(result.mAP),
            "notes": f"mAP {result.mAP:.4f} of {path.stat().st_size / 1e6:.0f} MB (XML reading included)"}


RUNNERS = {
    "precompute": run_precompute, "store": run_store, "worker-start": run_worker_start, "train": run_train,
    "validation": run_validation,
    "multibox": run_multibox, "detect-runner": run_detect_runner,
    "results-ilsvrc": lambda *a: _results(*a, "ilsvrc"), "results-coco": lambda *a: _results(*a, "coco"),
    "eval-ilsvrc": lambda *a: _evaluate(*a, "ilsvrc"), "eval-coco": lambda *a: _evaluate(*a, "coco"),
}


IMPORTS = {  # imported before the row's baseline RSS is read: the baseline is the process ready to work
    "precompute": ["proposals.precompute"], "store": ["proposals.store"],
    "worker-start": ["detector.training.data", "detector.training.rcnn"],
    "train": ["detector.training.data", "detector.training.rcnn", "detector.training.engine"],
    "validation": ["detector.training.validation", "detector.training.rcnn"],
    "multibox": ["detector.training.multibox", "detector.training.multibox_data", "detector.training.engine"],
    "detect-runner": ["detector.dataset_runner"], "results-ilsvrc": ["detector.dataset_runner"],
    "results-coco": ["detector.dataset_runner"], "eval-ilsvrc": ["detector.evaluation.ilsvrc"],
    "eval-coco": ["detector.evaluation.coco", "pycocotools.cocoeval"],
}


def child(args) -> int:
    """One measurement in this fresh process; its figures as JSON in ``args.child_out``."""
    import importlib

    from detector.base.threads import configure_threads

    configure_threads(1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = args.nofile if hard == resource.RLIM_INFINITY else min(args.nofile, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    for module in IMPORTS[args.child]:
        importlib.import_module(module)
    data, work = Path(args.data), Path(args.data) / "work" / f"{args.child}-{args.child_n}-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    fds = FdPeak()
    base = memory_mb()
    try:
        figures = RUNNERS[args.child](data, args.child_n, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = args.child_n
    figures |= {"component": args.child, "n": n, "peak_rss_mb": memory_mb()["hwm"], "ready_rss_mb": base["rss"],
                "open_files_peak": fds.stop(), "peak_anon_mb": fds.anon, "nofile_limit": limit}
    figures["seconds_per_image"] = figures["seconds"] / max(1, figures["images"])
    # the whole N's time: sampled rows scale their sample (plus precompute's verify and compaction at N)
    figures["seconds_at_n"] = (figures["seconds_per_image"] * n + figures.get("overhead_s", 0.0)
                               if figures["images"] != n else figures["seconds"])
    workers = figures.get("workers", [])
    figures["worker_peak_rss_mb"] = max((w["peak_rss_mb"] for w in workers), default=None)
    figures["worker_peak_anon_mb"] = max((w["peak_anon_mb"] for w in workers if "peak_anon_mb" in w), default=None)
    if "first_rss_mb" in (workers[0] if workers else {}):
        figures["notes"] += (f"; worker RSS after its first batch {max(w['first_rss_mb'] for w in workers):.0f} MB"
                             f", anonymous {max(w['first_anon_mb'] for w in workers):.0f} MB then at most "
                             f"{figures['worker_peak_anon_mb']:.0f} MB; open files {max(w['open_files'] for w in workers)}")
    Path(args.child_out).write_text(json.dumps(figures))
    return 0


# -- the driver ----------------------------------------------------------------------------------------------------

PASSED = ("workers", "sample", "train_size", "val_size", "val_proposals", "boxes", "big_store_boxes",
          "n_boxes_up_to", "detections", "lookups", "nofile", "data")


def run_child(component: str, n: int, args) -> dict:
    """``component`` at ``n`` images in a fresh Python process; its figures, or ``{"error": ...}``."""
    out = Path(args.data) / "work" / f"{component}-{n}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", component, "--child-n", str(n),
               "--child-out", str(out)]
    for name in PASSED:
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"component": component, "n": n, "error": f"over {args.timeout} s (--timeout)"}
    if done.returncode != 0 or not out.is_file():
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"component": component, "n": n, "error": lines[-1] if lines else f"exit {done.returncode}"}
    return json.loads(out.read_text())


def _mb(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def row_text(r: dict) -> str:
    if "error" in r:
        return f"{r['component']:<15}{r['n']:>9,}  failed: {r['error']}"
    return (f"{r['component']:<15}{r['n']:>9,}{r['seconds_per_image'] * 1e3:>10.2f}{_mb(r['peak_rss_mb']):>8}"
            f"{_mb(r.get('peak_anon_mb')):>7}{_mb(r['worker_peak_rss_mb']):>8}{_mb(r.get('worker_peak_anon_mb')):>7}"
            f"{r['open_files_peak']:>6}  ready {r['ready_rss_mb']:.0f} MB; {r.get('notes', '')}")


HEADER = (f"{'':<34}{'main MB':>15}{'worker MB':>15}\n"
          f"{'component':<15}{'N':>9}{'ms/img':>10}{'RSS':>8}{'anon':>7}{'RSS':>8}{'anon':>7}{'fds':>6}  notes")


FITTED = ("peak_rss_mb", "worker_peak_rss_mb", "peak_anon_mb", "worker_peak_anon_mb", "seconds_at_n", "pickled_mb")


def extrapolate(rows: list[dict], target: int = ILSVRC_TRAIN) -> list[dict]:
    """Per component, least-squares lines against N of the peak RSS and anonymous RSS (main process, worst
    worker), of the whole N's seconds (the slope is the time per image) and of the training source's
    pickled size, read at ``target``."""
    out = []
    for comp in dict.fromkeys(r["component"] for r in rows):
        good = [r for r in rows if r["component"] == comp and "error" not in r]
        ns = np.array([r["n"] for r in good], float)
        if len(set(ns)) < 2:
            continue
        fit = {"component": comp, "n_measured": sorted(int(v) for v in set(ns)), "n": target}
        for key in FITTED:
            ys = [r.get(key) for r in good]
            if any(y is None for y in ys):
                continue
            slope, intercept = np.polyfit(ns, np.array(ys, float), 1)
            fit[key], fit[key + "_per_image"] = float(intercept + slope * target), float(slope)
        out.append(fit)
    return out


def fit_text(f: dict) -> str:
    def mb(key, width=10):
        if key not in f:
            return f"{'-':>{width + 14}}"
        return f"{_mb(f[key]):>{width}} ({f[key + '_per_image'] * 1e3:+7.1f}/1k)"

    extra = f"  pickled source {f['pickled_mb']:.0f} MB" if "pickled_mb" in f else ""
    return (f"{f['component']:<15}{mb('peak_rss_mb')}{mb('peak_anon_mb', 8)}{mb('worker_peak_rss_mb')}"
            f"{mb('worker_peak_anon_mb', 8)}{f['seconds_at_n_per_image'] * 1e3:>10.2f}{f['seconds_at_n'] / 3600:>9.2f}"
            f"{extra}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--n", type=int, nargs="+", help="dataset sizes (default 1000 5000 20000; --quick: 200 1000)")
    p.add_argument("--store-n", type=int, nargs="*", help="extra synthetic store sizes for the store row "
                   "(default 100000 480000; --quick: none)")
    p.add_argument("--quick", action="store_true", help="a smoke test: N = 200 and 1000, small samples")
    p.add_argument("--components", nargs="+", choices=COMPONENTS, default=list(COMPONENTS), metavar="NAME",
                   help=f"rows to measure (default all: {', '.join(COMPONENTS)})")
    p.add_argument("--data", default="/tmp/bench_scale", help="where the generated data is kept (default "
                   "/tmp/bench_scale; made once, reused)")
    p.add_argument("--workers", type=int, default=2, help="data-loading and precompute processes (default 2)")
    p.add_argument("--sample", type=int, help="images of the precompute sample (default 16; --quick 4)")
    p.add_argument("--train-size", type=int, default=64, help="training crop size, px (default 64: the crop "
                   "size changes the batch, not what grows with N)")
    p.add_argument("--val-size", type=int, default=32, help="validation / runner classifier input, px (default 32)")
    p.add_argument("--val-proposals", type=int, default=4, help="proposals classified per image in validation "
                   "and the runner (default 4)")
    p.add_argument("--boxes", type=int, default=2000, help="proposals per image in the stores (default 2000)")
    p.add_argument("--big-store-boxes", type=int, default=200, help="boxes per image of the stores above "
                   "--n-boxes-up-to (default 200: opening does not read boxes; keeps 480k at 0.8 GB)")
    p.add_argument("--n-boxes-up-to", type=int, default=20000, help=argparse.SUPPRESS)
    p.add_argument("--detections", type=int, default=200, help="detections per image in result files (default 200)")
    p.add_argument("--lookups", type=int, default=10000, help="random store lookups (default 10000)")
    p.add_argument("--nofile", type=int, default=1024, help="RLIMIT_NOFILE of every measured process "
                   "(default 1024, the usual limit)")
    p.add_argument("--pool", type=int, default=256, help="distinct JPEGs behind the N names (default 256)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per measured process (default 3600)")
    p.add_argument("--json", help="write every row and the extrapolation as JSON here")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="measure nothing: print the table and the "
                   "extrapolation of the rows of these --json files (runs of different components), later "
                   "files' rows replacing earlier ones'")
    p.add_argument("--child", choices=COMPONENTS, help=argparse.SUPPRESS)
    p.add_argument("--child-n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.n = sorted(set(args.n or ([200, 1000] if args.quick else [1000, 5000, 20000])))
    args.store_n = sorted(set(args.store_n if args.store_n is not None else ([] if args.quick else [100000, 480000])))
    args.sample = args.sample or (4 if args.quick else 16)
    if args.quick and args.lookups == 10000:
        args.lookups = 1000
    if min(args.n) < 1 or args.workers < 0 or args.sample < 1:
        p.error("--n must be >= 1, --workers >= 0, --sample >= 1")
    return args


def prepare(args) -> Path:
    """Everything the rows read, made (or found) before any row is timed."""
    start = time.perf_counter()
    data = generate(args.data, max(args.n), args.pool, procs=max(2, args.workers))
    comps = set(args.components)
    if comps & {"train", "validation", "detect-runner"}:
        for n in args.n:
            proposal_store(data, n, args.boxes, compacted=True)
    if "precompute" in comps:
        for n in args.n:
            proposal_store(data, n, args.boxes, compacted=False)
    if comps & {"store", "worker-start"}:
        for n in sorted(set(args.n) | set(args.store_n)):
            proposal_store(data, n, store_boxes(n, args), compacted=False)
    if comps & {"results-ilsvrc", "results-coco", "eval-ilsvrc", "eval-coco"}:
        from detector.dataset_runner import RunConfig

        for n in args.n:
            detection_parts(data, n, args.detections, RunConfig().chunk_size)
    for n in args.n:
        image_list(data, n)
    print(f"data in {data} ({time.perf_counter() - start:.0f} s to make or find)", flush=True)
    return data


def print_fits(fits: list[dict]) -> None:
    if fits:
        print(f"\nextrapolated to {ILSVRC_TRAIN:,} images: a least-squares line through the measured N "
              "(peak RSS and ms/img against N), read at 480k")
        print(f"{'':<15}{'main: RSS MB':>24}{'anon MB':>22}{'worker: RSS MB':>24}{'anon MB':>22}\n"
              f"{'component':<15}{'(slope per 1k images)':>24}{'':>22}{'':>24}{'':>22}{'ms/img':>10}{'hours':>9}")
        for f in fits:
            print(fit_text(f))


def merge(args) -> int:
    """The table and the extrapolation of rows measured by several runs (``--merge``)."""
    rows: dict[tuple[str, int], dict] = {}
    for path in args.merge:
        for r in json.loads(Path(path).read_text())["rows"]:
            rows[r["component"], r["n"]] = r
    ordered = sorted(rows.values(), key=lambda r: (COMPONENTS.index(r["component"]), r["n"]))
    print(HEADER)
    for r in ordered:
        print(row_text(r))
    fits = extrapolate(ordered)
    print_fits(fits)
    if args.json:
        Path(args.json).write_text(json.dumps({"merged": args.merge, "rows": ordered, "extrapolation": fits},
                                              indent=1))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    if args.merge:
        return merge(args)
    started = time.perf_counter()
    data = prepare(args)
    from detector.base.jobs import default_workers

    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; {args.workers} workers "
          f"(default_workers() here: {default_workers()}); "
          f"RLIMIT_NOFILE {args.nofile} in every measured process", flush=True)
    print(HEADER, flush=True)
    rows: list[dict] = []
    settings = {k: v for k, v in vars(args).items() if not k.startswith("child")}

    def save(fits=None):  # after every row: a run cut short keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps({"settings": settings, "cores": os.cpu_count(), "rows": rows,
                                                   "extrapolation": fits or extrapolate(rows)}, indent=1))

    for comp in args.components:
        for n in (sorted(set(args.n) | set(args.store_n)) if comp in ("store", "worker-start") else args.n):
            if comp.startswith("eval-"):
                from detector.evaluation.result_files import RESULT_FILES

                fmt = comp.split("-")[1]
                if not (data / "detections" / f"results-{n}-{args.detections}" / RESULT_FILES[fmt]).is_file():
                    run_child(f"results-{fmt}", n, args)  # the file to evaluate; not a row
            rows.append(run_child(comp, n, args) | {"load_average": os.getloadavg()[0]})
            print(row_text(rows[-1]), flush=True)
            save()
    fits = extrapolate(rows)
    print_fits(fits)
    print(f"\n{time.perf_counter() - started:.0f} s in all; load average now {os.getloadavg()[0]:.1f}")
    save(fits)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
