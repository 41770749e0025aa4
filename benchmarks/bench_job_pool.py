"""Which pool suits which work: the batch-job framework's serial, thread and spawned-process pools.

    python benchmarks/bench_job_pool.py [--images 12] [--workers 2] [--json OUT]

Two kinds of work over the same chess/test photos (2048 x 1371 JPEGs), each through
:func:`detector.base.jobs.imap_outcomes` as the jobs run it:

  read   ``load_image(path)``: JPEG decoding (what dataset detection does with a proposal store);
         the decoded image comes back to the caller (pickled, for processes)
  ss     ``load_image`` + ``propose(image, "ss-fast")`` (default working size 500): what proposal
         precomputation and on-the-fly proposals do; only the boxes come back

Each is timed serially (the calling thread), with ``--workers`` threads and with ``--workers`` spawned
processes; a pool's start (spawn, imports, numba's cache loaded in each worker) is timed apart, with a
trivial item per worker, and taken out of the process figures, as it is paid once per job. Speed-ups are against the serial run; the load
average before and after is printed, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from detector.base.io import load_image
from detector.base.jobs import PROCESSES, THREADS, imap_outcomes

CHESS_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "chess" / "test"


def read(path: str):
    return load_image(path)


def ss_boxes(path: str):
    from proposals.propose import propose  # numba and OpenCV: imported by the workers that run it

    return propose(load_image(path), "ss-fast")


def nothing(_):
    return None


def warm() -> None:
    """Each worker's start: import the proposals and load numba's compiled functions (one tiny image)."""
    import numpy as np

    from proposals.propose import propose  # numba and OpenCV, as in the workers of a real job

    propose(np.zeros((32, 32, 3), np.uint8), "ss-fast")


def timed(work, paths, workers, pool) -> float:
    start = time.perf_counter()
    outcomes = list(imap_outcomes(work, paths, workers, pool, initializer=warm if workers else None))
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    paths = [str(f) for f in sorted(CHESS_TEST.glob("*.jpg"))[: args.images]]
    print(f"{len(paths)} photos, {args.workers} workers, cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    warm()  # numba's compilation (or cache load) outside the timings
    startup = timed(nothing, range(args.workers), args.workers, PROCESSES)
    rows = {}
    for name, work in (("read", read), ("ss", ss_boxes)):
        serial = timed(work, paths, 0, PROCESSES)
        threads = timed(work, paths, args.workers, THREADS)
        processes = timed(work, paths, args.workers, PROCESSES) - startup
        rows[name] = {"serial_s": serial, "threads_s": threads, "processes_s": processes,
                      "threads_speedup": serial / threads, "processes_speedup": serial / processes}
    print(f"process pool start (spawn + imports): {startup:.2f} s, taken out of the process figures")
    print(f"{'work':6s} {'serial img/s':>13s} {'threads':>9s} {'processes':>10s}")
    for name, r in rows.items():
        n = len(paths)
        print(f"{name:6s} {n / r['serial_s']:13.2f} {n / r['threads_s']:9.2f} {n / r['processes_s']:10.2f}   "
              f"speed-up threads {r['threads_speedup']:.2f}x, processes {r['processes_speedup']:.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"startup_s": startup, "work": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
