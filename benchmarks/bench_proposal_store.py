"""Proposal store scale figures and precompute worker scaling.

1. Store: a synthetic store of ``--images`` x ``--boxes`` (default 20,000 x 2,000, the issue's
   ILSVRC-sized case) written as one part: bytes on disk per box, file size, time to open, and
   random-access latency of ``store[name]`` (median and 99th percentile over 10,000 random names,
   file in the page cache).
2. Many parts (issue 17): stores of ``--part-stores`` images (default 100,000 and 480,000: ILSVRC's
   training set) in parts of 64 images, as precompute leaves them before compaction (1,563 and 7,500
   parts; synthetic, ``--part-boxes`` boxes per image, default 4: the number of boxes does not change
   what is measured, opening reads only the names). Each is opened in a fresh process under
   ``RLIMIT_NOFILE = --nofile`` (default 256): open time, RSS added by opening, open files after opening
   and after lookups, ``store[name]`` median in a part already mapped and in a random part (opened
   then), and the time of a full verify (every image's checksum).
3. Scaling: ``tools/precompute_proposals.py``'s library on real photos (coco128, ss-fast at longest
   side 500) with 1 and then 2 worker processes: images per second and the speedup, with the cores
   each run obtained and, as the ceiling, what a pure CPU loop gains from 2 processes at the same
   moment (2.0 on an idle machine; a shared machine gives less).

    python benchmarks/bench_proposal_store.py
    python benchmarks/bench_proposal_store.py --images 2000 --scaling-images 16
    python benchmarks/bench_proposal_store.py --skip-store --skip-scaling   # only the many-part stores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from detector.base.cli import run_tool
from proposals.precompute import PrecomputeConfig, list_folder, precompute
from proposals.store import ImageProposals, ProposalStore, compact, part_files, verify, write_part

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128" / "images"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--images", type=int, default=20000, help="synthetic store: images (default 20000)")
    p.add_argument("--boxes", type=int, default=2000, help="synthetic store: boxes per image (default 2000)")
    p.add_argument("--scaling-images", type=int, default=32, help="real photos for the worker scaling (default 32)")
    p.add_argument("--image-folder", default=str(DATA), help="photos for the scaling run (default coco128)")
    p.add_argument("--part-stores", default="100000,480000",
                   help="many-part stores: images, comma-separated (default 100000,480000)")
    p.add_argument("--part-boxes", type=int, default=4, help="many-part stores: boxes per image (default 4)")
    p.add_argument("--nofile", type=int, default=256, help="RLIMIT_NOFILE the many-part stores open under (default 256)")
    p.add_argument("--keep", help="keep the many-part stores in this folder (reused when there)")
    p.add_argument("--skip-parts", action="store_true", help="no many-part stores")
    p.add_argument("--no-compact", action="store_true", help="many-part stores: do not time their compaction")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: measure this store
    p.add_argument("--skip-store", action="store_true", help="only the scaling run")
    p.add_argument("--skip-scaling", action="store_true", help="only the store figures")
    p.add_argument("--json", help="write the figures as JSON here")
    return p.parse_args(argv)


def store_figures(num_images: int, num_boxes: int, folder: Path) -> dict:
    rng = np.random.default_rng(0)
    entries = [ImageProposals(f"ILSVRC2013_train_{i:08d}", (375, 500),
                              rng.integers(0, 65536, (num_boxes, 4), dtype=np.uint16)) for i in range(num_images)]
    start = time.perf_counter()
    path = write_part(folder / "part-bench.pstore", entries, {"method": "synthetic", "options": {}})
    write_s = time.perf_counter() - start
    del entries
    start = time.perf_counter()
    store = ProposalStore(folder)
    open_s = time.perf_counter() - start
    names = store.names()
    order = rng.integers(0, len(names), 10000)
    lat = np.empty(len(order))
    for j, i in enumerate(order):
        t = time.perf_counter()
        boxes, _ = store[names[i]]
        lat[j] = time.perf_counter() - t
    assert boxes.shape == (num_boxes, 4)
    size = path.stat().st_size
    return {"images": num_images, "boxes_per_image": num_boxes, "file_mb": size / 1e6,
            "bytes_per_box": size / (num_images * num_boxes), "write_s": write_s, "open_s": open_s,
            "access_median_ms": float(np.median(lat) * 1e3), "access_p99_ms": float(np.percentile(lat, 99) * 1e3)}


PART_IMAGES = 64  # precompute's default chunk


def write_many_parts(folder: Path, num_images: int, num_boxes: int) -> Path:
    """A store of ``num_images`` synthetic images in parts of 64, named as precompute names them, with its
    ``store.json``; fsync is skipped (a benchmark's scratch data). Reused when complete."""
    from proposals import part as part_module

    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"method": "synthetic", "options": {"boxes": num_boxes}}
    (folder / "store.json").write_text(json.dumps({"format": "proposal-store", "settings": meta}))
    rng = np.random.default_rng(0)
    boxes = rng.integers(0, 65536, (num_boxes, 4), dtype=np.uint16)
    fsync, part_module.os.fsync = part_module.os.fsync, lambda fd: None
    try:
        for c in range(0, num_images, PART_IMAGES):
            entries = [ImageProposals(f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG", (375, 500), boxes)
                       for i in range(c, min(num_images, c + PART_IMAGES))]
            write_part(lambda digest, c=c: folder / f"chunk-{c // PART_IMAGES:07d}-00000000-{digest}.pstore",
                       entries, meta)
    finally:
        part_module.os.fsync = fsync
    (folder / "done").write_text("")
    return folder


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def measure_many_parts(folder: str) -> dict:
    """In the child process (under the file limit): open, look up, verify."""
    rss, files = _rss_mb(), _open_files()
    start, cpu = time.perf_counter(), time.process_time()
    store = ProposalStore(folder)
    open_s, open_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    out = {"images": len(store), "parts": store.num_parts, "open_s": open_s, "open_cpu_s": open_cpu_s, "rss_open_mb": _rss_mb() - rss,
           "files_after_open": _open_files() - files, "max_open_parts": store.max_open_parts,
           "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}
    rng = np.random.default_rng(0)
    ix = store._ix
    hot = [ix.name(k) for k in range(min(len(store), PART_IMAGES * store.max_open_parts // 2))]
    for name in hot:  # their parts mapped
        store[name]
    for key, names in (("hot", hot), ("random", None)):
        lat = []
        for i in rng.integers(0, len(hot) if names else len(store), 5000):
            name = names[i] if names else ix.name(int(i))
            t = time.perf_counter()
            store[name]
            lat.append(time.perf_counter() - t)
        out[f"lookup_{key}_ms"] = float(np.median(lat) * 1e3)
    out["files_after_lookups"] = _open_files() - files
    out["rss_after_lookups_mb"] = _rss_mb() - rss
    start = time.perf_counter()
    report = verify(folder)
    out["verify_s"] = time.perf_counter() - start
    assert report.images == len(store) and not report.damaged, report
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's, imports too
    out["base_rss_mb"] = rss
    del store, ix, hot
    if os.environ.get("BENCH_COMPACT") == "1":  # on a copy made of hard links: the store is kept
        copy = Path(folder).with_name(Path(folder).name + "-compacting")
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir()
        for f in Path(folder).iterdir():
            os.link(f, copy / f.name)
        start, cpu = time.perf_counter(), time.process_time()
        compact(copy)
        out["compact_s"], out["compact_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
        out["compact_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        assert len(part_files(copy)) == 1
        shutil.rmtree(copy)
    return out


def many_part_figures(sizes: list[int], num_boxes: int, nofile: int, folder: Path, compact_too: bool) -> list[dict]:
    rows = []
    for n in sizes:
        start = time.perf_counter()
        store = write_many_parts(folder / f"parts-{n}-{num_boxes}", n, num_boxes)
        written = time.perf_counter() - start

        def limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

        env = dict(os.environ, BENCH_COMPACT="1" if compact_too else "0")
        result = subprocess.run([sys.executable, __file__, "--measure", str(store)], preexec_fn=limit, env=env,
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"measuring {store} failed:\n{result.stderr}")
        rows.append({**json.loads(result.stdout), "write_s": written, "boxes_per_image": num_boxes})
    return rows


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers), seconds."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _spin(seconds: float) -> int:
    """A pure CPU loop: how many iterations fit in ``seconds`` of wall time."""
    end, count = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        count += 1
    return count


def ceiling(seconds: float = 3.0) -> float:
    """What 2 processes get over 1 on this machine right now: a pure CPU loop's work ratio.

    2.0 on two idle cores; less when other processes (or the scheduler's per-session fairness)
    take part of the machine. The precompute speedup is read against this ceiling.
    """
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    work = {}
    for n in (1, 2):
        with ctx.Pool(n) as pool:
            work[n] = sum(pool.map(_spin, [seconds] * n))
    return work[2] / work[1]


def scaling_figures(image_folder: str, num_images: int, folder: Path) -> dict:
    entries = list_folder(image_folder)[:num_images]
    out = {"ceiling_before": ceiling()}
    for workers in (1, 2):
        config = PrecomputeConfig(method="ss-fast", workers=workers, chunk_size=8)
        before = _cpu_seconds()
        report = precompute(entries, folder / f"w{workers}", config, progress=False)
        cpu = _cpu_seconds() - before
        # cores_used = CPU seconds / wall seconds: about 1 and 2 on an idle machine; less when other
        # processes share the cores, and then the speedup is bounded by what the scheduler gave.
        out[workers] = {"images": report.done, "seconds": report.seconds, "images_per_second": report.items_per_second,
                        "cpu_seconds": cpu, "cores_used": cpu / report.seconds}
    out["ceiling_after"] = ceiling()
    out["speedup"] = out[2]["images_per_second"] / out[1]["images_per_second"]
    # Images per CPU second of 2 workers relative to 1: the parallel overhead, independent of how
    # much of the machine the scheduler granted. 2 x this is the speedup two idle cores would give.
    out["cpu_efficiency"] = (out[2]["images"] / out[2]["cpu_seconds"]) / (out[1]["images"] / out[1]["cpu_seconds"])
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure_many_parts(args.measure)))
        return 0
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_parts:
            sizes = [int(v) for v in args.part_stores.split(",") if v]
            figures["parts"] = many_part_figures(sizes, args.part_boxes, args.nofile,
                                                 Path(args.keep) if args.keep else tmp, not args.no_compact)
        if not args.skip_scaling:
            # Warm the compiled code once so neither run pays for loading it.
            precompute(list_folder(args.image_folder)[:1], tmp / "warm", PrecomputeConfig(), progress=False)
            figures["scaling"] = scaling_figures(args.image_folder, args.scaling_images, tmp)
        if not args.skip_store:
            figures["store"] = store_figures(args.images, args.boxes, tmp / "store")
    if "store" in figures:
        s = figures["store"]
        print(f"store: {s['images']} images x {s['boxes_per_image']} boxes: {s['file_mb']:.0f} MB, "
              f"{s['bytes_per_box']:.3f} bytes/box; write {s['write_s']:.1f} s, open {s['open_s']:.2f} s; "
              f"store[name] median {s['access_median_ms']:.3f} ms, p99 {s['access_p99_ms']:.3f} ms")
    if "parts" in figures:
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (open s: wall clock, CPU s: this process)")
        print(f"many-part stores (parts of {PART_IMAGES} images, opened under RLIMIT_NOFILE = {args.nofile}; lookups: "
              "median, hot: in a mapped part, random: its part opened then; RSS, peak and files: added to the "
              "process's own):")
        print(f"{'images':>8}{'parts':>7}{'boxes':>6}{'open s':>8}{'CPU s':>7}{'RSS MB':>8}{'files':>7}{'maps max':>9}"
              f"{'files after':>12}{'hot ms':>8}{'random ms':>10}{'verify s':>9}{'peak +MB':>9}")
        for r in figures["parts"]:
            print(f"{r['images']:>8}{r['parts']:>7}{r['boxes_per_image']:>6}{r['open_s']:>8.2f}{r['open_cpu_s']:>7.2f}{r['rss_open_mb']:>8.1f}"
                  f"{r['files_after_open']:>7}{r['max_open_parts']:>9}{r['files_after_lookups']:>12}"
                  f"{r['lookup_hot_ms']:>8.3f}{r['lookup_random_ms']:>10.3f}{r['verify_s']:>9.1f}"
                  f"{r['peak_rss_mb'] - r['base_rss_mb']:>9.0f}")
        for r in figures["parts"]:
            if "compact_s" in r:
                print(f"compaction of {r['images']} images in {r['parts']} parts (same limit): {r['compact_s']:.1f} s "
                      f"({r['compact_cpu_s']:.1f} s CPU), peak RSS +{r['compact_peak_rss_mb'] - r['base_rss_mb']:.0f} MB")
    if "scaling" in figures:
        s = figures["scaling"]
        print(f"{'workers':>8}{'images':>8}{'seconds':>9}{'img/s':>8}{'cores used':>12}")
        for w in (1, 2):
            print(f"{w:>8}{s[w]['images']:>8}{s[w]['seconds']:>9.1f}{s[w]['images_per_second']:>8.2f}"
                  f"{s[w]['cores_used']:>12.2f}")
        print(f"speedup 2 workers / 1 worker: {s['speedup']:.2f}x (load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores); images per CPU second, 2 workers / 1: {s['cpu_efficiency']:.2f}")
        print(f"ceiling now (pure CPU loop, 2 processes / 1): {s['ceiling_before']:.2f}x before, "
              f"{s['ceiling_after']:.2f}x after; 2.00x on idle cores")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
