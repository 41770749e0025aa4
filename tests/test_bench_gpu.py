"""benchmarks/bench_gpu.py runs end to end on the CPU with tiny settings (its figures need a GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about a minute on 2 shared cores (dynamo traces GoogLeNet twice)
def test_bench_gpu_quick_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu",
                           "--quick", "--json", str(out)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    names = {(r["group"], r["name"]) for r in rows}
    assert {g for g, _ in names} == {"network", "classifier", "engine", "train", "process"}
    timed = [r for r in rows if r["group"] != "process" or r["unit"] == "images"]
    assert len(timed) == 12 and all(r["per_second"] > 0 for r in timed), rows
    processes = [r for r in rows if r["group"] == "process" and r["unit"] == "s"]
    assert len(processes) == 2 and all(r["seconds"] > 0 for r in processes), processes  # cold, then warm
    engine = [r for r in rows if r["group"] == "engine"]
    assert all(r["images_per_second"] > 0 for r in engine) and len(engine) == 4
    assert "best engine (precomputed proposals) / best bare network" in done.stdout
