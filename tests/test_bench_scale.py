"""benchmarks/bench_scale.py at a tiny N: the generated data is ILSVRC-like and readable by the project's
readers, and the store row and the extrapolation have their structure (timings are not checked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from detector.base.io import read_image_size
from detector.data import read_ilsvrc_det
from proposals.store import ProposalStore

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_bench_scale_generates_ilsvrc_data_and_measures_the_store(tmp_path):
    data, out = tmp_path / "data", tmp_path / "scale.json"
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "benchmarks" / "bench_scale.py"), "--n", "30", "70",
                           "--store-n", "--components", "store", "--pool", "8", "--lookups", "20",
                           "--data", str(data), "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]

    # 70 distinct image paths (8 distinct JPEGs behind them), ILSVRC XML over the 200 DET classes
    dataset = read_ilsvrc_det(data / "lists" / "n70.txt", data / "annotations", image_root=data / "images")
    assert len(dataset) == 70 and len({dataset.image_path(r) for r in dataset.records}) == 70
    assert len({os.stat(dataset.image_path(r)).st_ino for r in dataset.records}) == 8
    for record in dataset.records[:10]:
        h, w = record.image_size
        assert read_image_size(dataset.image_path(record)) == (h, w) and max(h, w) == 500
        assert 1 <= len(record.gt_labels) <= 4 and ((record.gt_labels >= 1) & (record.gt_labels <= 200)).all()
        assert (record.gt_boxes[:, 2:] <= [w, h]).all() and (record.gt_boxes[:, :2] >= 0).all()

    # the stores are in 64-image parts, looked up by the records' file names, boxes inside the image
    store_dir = next((data / "stores").glob("parts-70-2000-*"))
    assert len(list(store_dir.glob("*.pstore"))) == 2
    store = ProposalStore(store_dir)
    record = dataset.records[65]
    boxes, _ = store[store.find(record.file_name, record.image_id)]
    assert boxes.shape == (2000, 4) and (boxes[:, 2:] <= np.array(record.image_size[::-1]) + 0.5).all()

    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["component"], r["n"]) for r in rows] == [("store", 30), ("store", 70)]
    for r in rows:
        assert r["peak_rss_mb"] > 0 and r["open_files_peak"] >= 1 and r["parts"] == (1 if r["n"] == 30 else 2)
        assert r["lookup_ms"] > 0 and r["seconds_per_image"] >= 0 and r["nofile_limit"] == 1024
    (fit,) = report["extrapolation"]
    assert fit["component"] == "store" and fit["n"] == 480_000 and fit["n_measured"] == [30, 70]
    assert {"peak_rss_mb", "peak_rss_mb_per_image", "seconds_at_n", "seconds_at_n_per_image"} <= set(fit)
    assert "extrapolated to 480,000 images" in done.stdout
