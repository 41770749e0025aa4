"""gdet-benchmark (detector/apps/benchmark_map.py): the ILSVRC flags on the devkit demo, VOC and COCO runs,
one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detector.apps.benchmark_map import main
from detector.base.cli import run_tool

ROOT = Path(__file__).resolve().parents[1]


def test_help_runs_as_a_script():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark_map.py"), "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "--image-list" in out.stdout and "--protocol" in out.stdout


def test_ilsvrc_demo_on_val2(devkit, tmp_path, capsys):
    d = devkit
    argv = ["--protocol", "ilsvrc", "--predictions", str(d / "evaluation" / "demo.val.pred.det.txt"),
            "--annotations", str(d / "ilsvrc13_val2" / "Annotations"),
            "--image-list", str(d / "ilsvrc13_val2" / "val2_in_val_ids.txt"),
            "--meta", str(d / "data" / "meta_det.mat"),
            "--blacklist", str(d / "data" / "ILSVRC2014_det_validation_blacklist.txt"),
            "--json", str(tmp_path / "out.json"), "--plot", str(tmp_path / "plots"), "--quiet"]
    assert run_tool(main, argv) == 0
    captured = capsys.readouterr()
    assert "mean AP" in captured.out and "0.601683" in captured.out  # README: devkit mean AP 0.601683
    assert "dropped 25423 predictions" in captured.err
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["protocol"] == "ilsvrc" and len(data["ap"]) == 200
    assert data["mAP"] == pytest.approx(0.601683, abs=1e-6) and data["ap"]["1"] == pytest.approx(0.482046, abs=1e-6)
    assert data["num_images"] == 9917 and data["num_predictions"] == 49013 - 25423
    assert (tmp_path / "plots" / "pr_curves.png").stat().st_size > 10_000
    assert (tmp_path / "plots" / "ap_per_class.png").stat().st_size > 5_000


def _ilsvrc_args(devkit, pred):
    d = devkit
    return ["--protocol", "ilsvrc", "--predictions", str(pred), "--annotations", str(d / "ilsvrc13_val2" / "Annotations"),
            "--image-list", str(d / "ilsvrc13_val2" / "val2_in_val_ids.txt"), "--quiet"]


@pytest.mark.parametrize("bad_line", ["2 159 0.5 1 1 10", "2 159 0.5 1 1 10 nan", "2 300 0.5 1 1 10 10",
                                      "2 159 x 1 1 10 10"])
def test_malformed_prediction_is_one_line_and_exit_2(devkit, tmp_path, capsys, bad_line):
    pred = tmp_path / "pred.txt"
    pred.write_text("2 159 0.9 105 204 358 279\n" + bad_line + "\n")
    assert run_tool(main, _ilsvrc_args(devkit, pred)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "pred.txt:2:" in err[0]


def test_strict_rejects_inverted_boxes(devkit, tmp_path, capsys):
    pred = tmp_path / "pred.txt"
    pred.write_text("2 159 0.9 105 204 358 279\n2 159 0.8 358 204 105 279\n")
    assert run_tool(main, _ilsvrc_args(devkit, pred) + ["--strict"]) == 2
    assert "pred.txt:2: xmax < xmin" in capsys.readouterr().err
    assert run_tool(main, _ilsvrc_args(devkit, pred)) == 0


def test_missing_inputs_are_user_errors(devkit, tmp_path, capsys):
    assert run_tool(main, _ilsvrc_args(devkit, tmp_path / "none.txt")) == 2
    assert "prediction file not found" in capsys.readouterr().err
    args = ["--protocol", "ilsvrc", "--predictions", "p", "--annotations", str(tmp_path)]
    assert run_tool(main, args) == 2
    assert "--image-list is required" in capsys.readouterr().err


def test_voc_and_coco_protocols(shared_data, tmp_path, capsys):
    from detector.data import read_voc

    ds = read_voc(shared_data / "bccd", "test")
    lines = []
    for rec in ds.records:  # ground truth as detections, 1-based inclusive
        for box, label in zip(rec.gt_boxes, rec.gt_labels):
            lines.append(f"{rec.image_id} {ds.vocab.name_of_label(int(label))} 0.9 {box[0] + 1} {box[1] + 1} "
                         f"{box[2]} {box[3]}")
    pred = tmp_path / "voc.txt"
    pred.write_text("\n".join(lines) + "\n")
    out = tmp_path / "voc.json"
    assert run_tool(main, ["--protocol", "voc", "--predictions", str(pred), "--annotations",
                           str(shared_data / "bccd"), "--split", "test", "--use-07-metric", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["protocol"] == "voc" and "11-point" in data["variant"] and data["mAP"] == pytest.approx(1.0)

    coco = shared_data / "coco128" / "annotations" / "instances.json"
    instances = json.loads(coco.read_text())
    rng = np.random.default_rng(0)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.random()),
                "bbox": a["bbox"]} for a in instances["annotations"] if not a["iscrowd"]]
    res = tmp_path / "res.json"
    res.write_text(json.dumps(results))
    out = tmp_path / "coco.json"
    assert run_tool(main, ["--protocol", "coco", "--predictions", str(res), "--annotations", str(coco),
                           "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["protocol"] == "coco" and len(data["stats"]) == 12 and data["mAP"] > 0.9
    # The same COCO ground truth and results under the VOC protocol (crowd boxes ignored): AP 1.
    assert run_tool(main, ["--protocol", "voc", "--gt-format", "coco", "--predictions", str(res),
                           "--annotations", str(coco), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["mAP"] == pytest.approx(1.0)
    assert "mean AP" in capsys.readouterr().out
