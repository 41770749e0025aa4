"""gdet-train (detector/apps/train_detector.py) end to end on a few real chess photos, and its answers to bad
input: in-process where only the answer matters, as a process (tools/train_detector.py) for real runs and
for the exit code and stderr of a whole program."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.apps import train_detector
from detector.base.cli import run_tool as run_in_process

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TOOL = PROJECT_ROOT / "tools" / "train_detector.py"


def subset_json(chess: Path, split: str, count: int, out: Path, extra_images=(), extra_categories=()) -> Path:
    """A COCO file with the first ``count`` images of a chess split, their images linked beside it."""
    data = json.loads((chess / split / "_annotations.coco.json").read_text())
    images = data["images"][:count]
    ids = {im["id"] for im in images}
    out.mkdir(parents=True, exist_ok=True)
    for im in images:
        link = out / im["file_name"]
        if not link.exists():
            link.symlink_to(chess / split / im["file_name"])
    subset = {**data, "images": images + list(extra_images),
              "categories": data["categories"] + list(extra_categories),
              "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
    path = out / "_annotations.coco.json"
    path.write_text(json.dumps(subset))
    return path


def run_tool(*args, timeout=600):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=PROJECT_ROOT)


TINY = ["--input-size", "48", "--iterations", "2", "--regions-per-batch", "8", "--warmup-iters", "1",
        "--checkpoint-every", "1", "--log-every", "1", "--eval-max-proposals", "16", "--max-proposals", "200",
        "--threads", "1", "--no-progress", "--proposal-options", '{"max_side": 200}']


@pytest.mark.slow  # about 30 s on 2 busy cores: a real (tiny) training run, evaluation and detection
def test_tiny_run_writes_a_loadable_detector_and_lists_corrupt_images(chess, tmp_path):
    corrupt = {"id": 999, "file_name": "broken.jpg", "height": 1371, "width": 2048}
    train = subset_json(chess, "valid", 2, tmp_path / "train", extra_images=[corrupt])
    (tmp_path / "train" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    val = subset_json(chess, "valid", 1, tmp_path / "val")
    out = tmp_path / "run"
    result = run_tool("--train", train, "--val", val, "--out", out, *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    # the corrupt image is skipped, counted and listed, not silently dropped
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]  # on stderr
    assert len(failed) == 1 and "broken.jpg: cannot read image" in failed[0], result.stderr
    assert "1 image failed; left out of training" in result.stderr
    assert "broken.jpg" in (out / "skipped_images.txt").read_text()
    for name in ("last.safetensors", "last.json", "best.safetensors", "last.state.pt", "metrics.jsonl",
                 "curves.png"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2]
    assert any("mAP" in r.get("eval", {}) for r in records)
    config = json.loads((out / "last.json").read_text())
    assert config["classifier"]["input_size"] == 48 and config["classifier"]["num_classes"] == 13
    assert config["proposals"] == {"method": "ss-fast", "options": {"max_side": 200}, "max_proposals": 16}
    assert config["training"]["sampler"]["regions_per_batch"] == 8

    from detector.pipeline import Detector

    detector = Detector.from_checkpoint(out / "last", device="cpu")
    image = next((tmp_path / "val").glob("*.jpg"))
    detections = detector(str(image))
    assert detections.boxes.shape[1] == 4 and len(detections) <= 100

    # the export for shipping drops the auxiliary classifiers, stores float16 and still loads
    from safetensors.torch import load_file

    export = subprocess.run([sys.executable, str(PROJECT_ROOT / "tools" / "export_detector.py"), str(out / "last"),
                             str(tmp_path / "shipped"), "--note", "test_ap50=0.5"], capture_output=True, text=True,
                            cwd=PROJECT_ROOT, timeout=300)
    assert export.returncode == 0, export.stderr[-2000:]
    shipped = load_file(tmp_path / "shipped.safetensors")
    assert not any(k.startswith("trunk.aux") for k in shipped)
    assert {v.dtype for v in shipped.values() if v.is_floating_point()} == {torch.float16}
    shipped_config = json.loads((tmp_path / "shipped.json").read_text())
    assert shipped_config["training"]["test_ap50"] == 0.5 and shipped_config["classifier"]["aux_logits"] is False
    again_detections = Detector.from_checkpoint(tmp_path / "shipped", device="cpu")(str(image))
    assert again_detections.boxes.shape[1] == 4 and len(again_detections) <= 100

    # resuming with another configuration is refused with one line
    again = run_tool("--train", train, "--out", out, "--resume", out, *TINY, "--input-size", "64")
    assert again.returncode == 2, again.stderr[-2000:]
    last = again.stderr.splitlines()[-1]  # after the skipped image's lines
    assert last.startswith("error: ") and "different configuration" in last, again.stderr[-2000:]
    assert "Traceback" not in again.stderr
    # ... and so is resuming with other proposals (it would mix two proposal sources in one run), even
    # with a fresh cache folder that holds nothing to compare
    again = run_tool("--train", train, "--out", out, "--resume", out, *TINY, "--proposal-options", '{"max_side": 120}',
                     "--proposal-cache", tmp_path / "other-cache")
    assert again.returncode == 2 and "proposals.options.max_side: 200 in the file, 120 now" in again.stderr, \
        again.stderr[-2000:]


def test_missing_dataset_is_one_line(tmp_path):
    result = run_tool("--train", tmp_path / "nope.json", "--out", tmp_path / "run")
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_empty_split_is_refused(chess, tmp_path, capsys):
    train = subset_json(chess, "valid", 0, tmp_path / "empty")
    assert run_in_process(train_detector.main, ["--train", str(train), "--out", str(tmp_path / "run")]) == 2
    assert "has no images" in capsys.readouterr().err


def test_validation_class_missing_from_the_vocabulary(chess, tmp_path):
    train = subset_json(chess, "valid", 1, tmp_path / "train")
    extra = [{"id": 99, "name": "unicorn", "supercategory": "pieces"}]
    val = subset_json(chess, "valid", 1, tmp_path / "val", extra_categories=extra)
    data = json.loads(val.read_text())
    data["annotations"].append({"id": 12345, "image_id": data["images"][0]["id"], "category_id": 99,
                                "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0})
    val.write_text(json.dumps(data))
    result = run_tool("--train", train, "--val", val, "--out", tmp_path / "run", *TINY)
    assert result.returncode == 2 and "unicorn" in result.stderr and "not in the training vocabulary" in result.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--proposal-options", "[1, 2]", "--proposal-options"),
    ("--bg-iou-high", "0.7", "thresholds"),
])
def test_bad_settings_are_one_line(chess, tmp_path, flag, value, message, capsys):
    train = subset_json(chess, "valid", 1, tmp_path / "train")
    argv = ["--train", str(train), "--out", str(tmp_path / "run"), flag, value]
    assert run_in_process(train_detector.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_resume_compares_every_proposal_setting(tmp_path):
    from detector.training.rcnn import ProposalConfig, proposal_settings
    from detector.training.state import differences
    from proposals.store import ImageProposals, write_part

    def settings(**kw):
        return proposal_settings(ProposalConfig(**{"options": {"max_side": 200}, **kw}))

    def store(folder, max_side):
        write_part(tmp_path / folder / "a.pstore", [ImageProposals("x.jpg", (10, 10), np.zeros((1, 4), np.uint16))],
                   {"method": "ss-fast", "options": {"max_side": max_side}})
        return str(tmp_path / folder)

    base = settings()
    assert differences(base, settings()) == []
    assert differences(base, settings(method="ss-quality")) == ["method: 'ss-fast' in the file, 'ss-quality' now"]
    assert differences(base, settings(options={"max_side": 120})) == ["options.max_side: 200 in the file, 120 now"]
    assert differences(base, settings(max_proposals=100)) and differences(base, settings(eval_max_proposals=5))
    with_store = settings(store=store("s", 200))
    assert [d.split(":")[0] for d in differences(base, with_store)] == ["store"]  # a store instead of computing
    assert differences(with_store, settings(store=store("copy", 200))) == []  # a copied or moved store resumes
    assert differences(with_store, settings(store=store("other", 500))) == [
        "store.options.max_side: 200 in the file, 500 now"]
    assert differences(base, settings(cache_dir=str(tmp_path / "cache"))) == []  # a cache changes no result
