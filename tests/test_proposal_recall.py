"""Proposal recall metrics (proposals/recall.py) and tools/proposal_recall.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detector.apps.proposal_recall import main as tool_main
from detector.data import ImageRecord, read_voc
from proposals.precompute import PrecomputeConfig, list_file, precompute
from proposals.recall import RecallAccumulator, best_overlaps, evaluation_boxes


def test_best_overlaps_by_hand():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 40]], np.float32)
    boxes = np.array([[0, 0, 10, 5],     # IoU with gt0: 50 / 100 = 0.5
                      [0, 0, 10, 10],    # gt0 exactly: 1.0
                      [20, 20, 30, 30]],  # IoU with gt1: 100 / 200 = 0.5
                     np.float32)
    np.testing.assert_allclose(best_overlaps(gt, boxes), [1.0, 0.5])
    # With only the first 1, 2, 3 proposals.
    np.testing.assert_allclose(best_overlaps(gt, boxes, counts=[1, 2, 3, 10]), [[0.5, 1, 1, 1], [0, 0, 0.5, 0.5]])
    assert best_overlaps(gt, np.zeros((0, 4))).tolist() == [0.0, 0.0]


def test_summary_by_hand():
    acc = RecallAccumulator(counts=(1, 2))
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 40]], np.float32)
    acc.add(gt, np.array([[0, 0, 10, 8], [20, 20, 30, 30]], np.float32), seconds=0.5)  # IoUs 0.8, 0.5
    acc.add(np.array([[0, 0, 4, 4]], np.float32), np.zeros((0, 4), np.float32), seconds=1.5)  # missed: 0
    s = acc.summary()
    assert s["num_gt"] == 3 and s["num_images"] == 2
    assert s["recall@0.5"] == pytest.approx(2 / 3) and s["recall@0.7"] == pytest.approx(1 / 3)
    assert s["mabo"] == pytest.approx((0.8 + 0.5 + 0.0) / 3)
    assert s["boxes_per_image"] == 1.0 and s["seconds_per_image"] == 1.0
    assert s["recall_curve"]["recall@0.5"] == pytest.approx([1 / 3, 2 / 3])


def test_crowd_and_difficult_boxes_are_left_out():
    record = ImageRecord(1, "x.jpg", gt_boxes=np.array([[0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 3, 3]]),
                         gt_labels=[1, 1, 1], difficult=[False, True, False], iscrowd=[False, False, True])
    assert evaluation_boxes(record).tolist() == [[0, 0, 1, 1]]


@pytest.fixture(scope="module")
def bccd_store(shared_data, tmp_path_factory):
    """A store of ss-single proposals (working size 120) for the first 3 BCCD test images."""
    root = shared_data / "bccd"
    names = [r.file_name for r in read_voc(root, "test").records[:3]]
    folder = tmp_path_factory.mktemp("bccd")
    (folder / "list.txt").write_text("\n".join(names) + "\n")
    entries = list_file(folder / "list.txt", image_root=root / "JPEGImages")
    config = PrecomputeConfig(method="ss-single", options=(("max_side", 120),))
    precompute(entries, folder / "store", config, progress=False)
    return folder / "store"


def test_tool_compares_methods_and_stores(shared_data, bccd_store, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = tool_main(["--voc", str(shared_data / "bccd"), "--max-images", "3", "--method", "ss-single",
                      "--method", "ss-single:opencv", "--store", str(bccd_store), "--max-side", "120",
                      "--json", str(out), "--plot", str(tmp_path / "r.png"), "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    assert "ss-single:opencv" in table and "store:store" in table
    results = json.loads(out.read_text())["results"]
    live, stored = results["ss-single"], results["store:store"]
    # The store holds the same proposals (to 1/65535 of the image size): the same figures.
    assert stored["num_images"] == live["num_images"] == 3 and stored["missing"] == 0
    assert stored["boxes_per_image"] == live["boxes_per_image"]
    assert stored["recall@0.5"] == pytest.approx(live["recall@0.5"])
    assert stored["mabo"] == pytest.approx(live["mabo"], abs=1e-3)
    assert stored["seconds_per_image"] is None and live["seconds_per_image"] > 0
    assert 0 < live["recall@0.5"] <= 1 and live["num_gt"] > 10
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tool_on_coco(shared_data, capsys):
    coco = shared_data / "coco128"
    assert tool_main(["--coco", str(coco / "annotations" / "instances.json"), "--image-root", str(coco / "images"),
                      "--max-images", "2", "--method", "ss-single", "--max-side", "100", "--no-progress"]) == 0
    assert "ss-single" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--method", "ss-slow"], "unknown method"),
    (["--store", "/nonexistent/store"], "no such store"),
    ([], "nothing to measure"),
])
def test_bad_arguments_are_one_line(shared_data, argv, message, capsys):
    from detector.base.cli import run_tool

    assert run_tool(tool_main, ["--voc", str(shared_data / "bccd"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
