"""Detection speed on a shared CPU: the default thread setting against one thread and spin-waiting ones.

    python benchmarks/bench_threads.py [--images 8] [--max-proposals 2000] [--model PATH]
        [--settings default,1-thread,2-spin] [--conditions busy,idle] [--busy 2] [--json OUT]

Each setting runs the default model on the same chess/test photos in a fresh process (OpenMP reads its
settings when torch is imported), one warm-up photo first, then the median seconds per photo of
``detector(image, proposals)``: warp, network, NMS. Proposals are fast Selective Search boxes computed
once beforehand, so only the threaded part is timed. Settings:

  default         what the tools do: ``detector.base.threads.configure_threads()`` with nothing set
  1-thread        ``OMP_NUM_THREADS=1``
  2-spin          ``OMP_NUM_THREADS=2 OMP_WAIT_POLICY=ACTIVE``: two threads that spin-wait at barriers
  2-passive       ``OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE``
  torch-default   nothing set: torch's own thread count and OpenMP's default wait policy

Conditions: ``busy`` runs ``--busy`` CPU-bound Python loops beside each setting (started before it,
stopped after it); ``idle`` runs nothing beside it (other users of the machine still count: the load
average before and after each run is printed). Settings alternate within a condition.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CHESS_TEST = PROJECT_ROOT.parent / "shared" / "data" / "chess" / "test"
SETTINGS = {
    "default": {},
    "1-thread": {"OMP_NUM_THREADS": "1"},
    "2-spin": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"},
    "2-passive": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "torch-default": {},
}
BUSY_LOOP = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--images", type=int, default=8, help="chess/test photos (default 8)")
    p.add_argument("--max-proposals", type=int, default=2000, help="proposals per photo (default 2000)")
    p.add_argument("--model", help="checkpoint (default: the installed default model)")
    p.add_argument("--settings", default="default,1-thread,2-spin",
                   help=f"comma-separated, from {', '.join(SETTINGS)} (default: default,1-thread,2-spin)")
    p.add_argument("--conditions", default="busy,idle", help="busy, idle or both (default busy,idle)")
    p.add_argument("--busy", type=int, default=2, help="CPU-bound processes beside a busy run (default 2)")
    p.add_argument("--max-seconds", type=float, default=300,
                   help="a setting's run is cut after this long (its busy loops too; default 300)")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one setting ...
    p.add_argument("--data", help=argparse.SUPPRESS)  # ... on this proposal file
    return p.parse_args(argv)


def photos(count: int) -> list[Path]:
    found = sorted(p for p in CHESS_TEST.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(found) < count:
        raise SystemExit(f"need {count} photos in {CHESS_TEST}, found {len(found)}")
    return found[:count]


def compute_proposals(paths: list[Path], max_proposals: int, out: Path) -> None:
    from detector.base.io import load_image
    from proposals import propose

    boxes = {str(p): propose(load_image(p), "ss-fast")[:max_proposals] for p in paths}
    np.savez(out, **{f"b{i}": b for i, b in enumerate(boxes.values())}, names=np.array(list(boxes)))


def child(setting: str, data: Path, model: str | None) -> None:
    """One setting in this fresh process: prints its thread count, then each photo's seconds as it goes."""
    from detector.base.threads import configure_threads

    if setting == "default":
        configure_threads()
    import torch

    from detector.base.io import load_image
    from detector.pipeline import load_detector

    stored = np.load(data)
    names = [str(n) for n in stored["names"]]
    boxes = [stored[f"b{i}"] for i in range(len(names))]
    images = [load_image(n) for n in names]
    detector = load_detector(model, device="cpu")
    detector(images[0], proposals=boxes[0])  # warm-up: oneDNN kernels, allocator
    print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
    for image, b in zip(images, boxes):
        start = time.perf_counter()
        detector(image, proposals=b)
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def run_setting(setting: str, data: Path, model: str | None, busy: int, max_seconds: float, photos: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_"))}
    env.update(SETTINGS[setting])
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=max_seconds + 60)])
             for _ in range(busy)]
    load_before = os.getloadavg()[0]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", setting, "--data", str(data)]
    if model:
        cmd += ["--model", model]
    cut = False
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max_seconds)
        output, failed = done.stdout, done.returncode != 0 and done.stderr.strip().splitlines()[-1:]
    except subprocess.TimeoutExpired as err:  # keep the photos it finished
        output, failed, cut = err.stdout or "", False, True
        output = output.decode() if isinstance(output, bytes) else output
    finally:
        for loop in loops:
            loop.terminate()
        for loop in loops:
            loop.wait()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    seconds = [line["seconds"] for line in lines if "seconds" in line]
    row = {"setting": setting, "busy": busy, "load_before": round(load_before, 2),
           "load_after": round(os.getloadavg()[0], 2), "seconds": seconds,
           "threads": next((line["threads"] for line in lines if "threads" in line), None),
           "median_s": statistics.median(seconds) if seconds else float("nan")}
    if failed:
        row["error"] = str(failed)
    elif cut and len(seconds) < photos:
        row["error"] = (f"cut after {max_seconds:.0f} s: {len(seconds)} photos timed"
                        + ("" if seconds else f", so > {max_seconds / 2:.0f} s/photo (warm-up + 1)"))
    return row


def format_table(rows: list[dict]) -> str:
    lines = [f"{'condition':<10} {'setting':<14} {'threads':>7} {'s/photo':>8} {'vs 1-thread':>11} "
             f"{'load avg before/after':>22}"]
    for condition in dict.fromkeys(r["condition"] for r in rows):
        group = [r for r in rows if r["condition"] == condition]
        one = next((r["median_s"] for r in group if r["setting"] == "1-thread"), float("nan"))
        for r in group:
            ratio = r["median_s"] / one if one == one and one > 0 else float("nan")
            lines.append(f"{condition:<10} {r['setting']:<14} {r['threads'] or '-':>7} {r['median_s']:8.2f} "
                         f"{ratio:10.2f}x {r['load_before']:>10.2f} / {r['load_after']:<10.2f}"
                         + (f"  {r['error']}" if "error" in r else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child, Path(args.data), args.model)
        return 0
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; use {', '.join(SETTINGS)}")
    conditions = args.conditions.split(",")
    if any(c not in ("busy", "idle") for c in conditions):
        raise SystemExit("--conditions takes busy, idle or both")
    print(f"{args.images} chess/test photos, {args.max_proposals} proposals each, {os.cpu_count()} cores "
          f"visible, busy = {args.busy} CPU-bound loops", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "proposals.npz"
        compute_proposals(photos(args.images), args.max_proposals, data)
        for condition in conditions:
            for setting in settings:
                row = run_setting(setting, data, args.model, args.busy if condition == "busy" else 0,
                                  args.max_seconds, args.images)
                rows.append({"condition": condition} | row)
                print(f"  {condition} {setting}: {row['median_s']:.2f} s/photo, {row['threads']} threads, "
                      f"load {row['load_before']:.2f} -> {row['load_after']:.2f}", flush=True)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
