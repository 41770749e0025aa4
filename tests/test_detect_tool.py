"""gdet-detect (detector/apps/detect.py, tools/detect.py): the table, the JSON schema, drawn output, the missing default model and bad inputs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detector.apps.detect as detect_tool
import detector.pipeline as pipeline
from detector.base.checkpoint import checkpoint_paths, make_checkpoint_config, save_checkpoint
from detector.base.cli import run_tool
from detector.classifier import ClassifierConfig, RegionClassifier
from detector.data import read_coco
from detector.draw import class_colour, draw_detections
from detector.pipeline import Detections

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TOOL = PROJECT_ROOT / "tools" / "detect.py"  # run as a process only where exit codes and stderr matter


@pytest.fixture(scope="module")
def chess_images(chess):
    return sorted(str(p) for p in (chess / "test").glob("*.jpg"))[:2]


@pytest.fixture(scope="module")
def model(tmp_path_factory, chess):
    """A random 64-px classifier (made here, never shipped) that favours one class, with cheap
    proposals (selective search on a 160-pixel copy, 30 boxes)."""
    vocab = read_coco(chess / "test" / "_annotations.coco.json").vocab
    torch.manual_seed(0)
    config = ClassifierConfig(num_classes=vocab.num_classes, input_size=64)
    net = RegionClassifier(config)
    with torch.no_grad():
        net.cls_score.bias[5] = 8.0
    meta = make_checkpoint_config(config, vocab, proposals={"method": "ss-fast", "options": {"max_side": 160},
                                                             "max_proposals": 30})
    path = tmp_path_factory.mktemp("model") / "random"
    save_checkpoint(path, net.state_dict(), meta)
    return path, vocab


def run(argv):
    return run_tool(detect_tool.main, [str(a) for a in argv])


def test_json_schema_table_and_drawn_folder(model, chess_images, tmp_path, capsys):
    path, vocab = model
    out_json, out_dir = tmp_path / "dets.json", tmp_path / "drawn"
    code = run([*chess_images, "--model", path, "--json", out_json, "--out", out_dir, "--device", "cpu"])
    assert code == 0
    records = json.loads(out_json.read_text())
    assert [r["image"] for r in records] == chess_images
    for r in records:
        assert set(r) == {"image", "width", "height", "detections", "timings_s"}
        assert (r["width"], r["height"]) == (2048, 1371)  # the chess photos' size
        assert set(r["timings_s"]) == {"proposals", "classify", "total"}
        assert all(isinstance(v, float) for v in r["timings_s"].values())
        assert r["detections"], "the favoured class scores ~0.99 everywhere, so something is found"
        for d in r["detections"]:
            assert set(d) == {"label", "class_id", "score", "box"}
            assert d["label"] == vocab.names[4] and d["class_id"] == vocab.ids[4]
            assert 0.5 <= d["score"] <= 1 and len(d["box"]) == 4
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= 2048 and 0 <= y1 < y2 <= 1371
    table = capsys.readouterr().out
    assert vocab.names[4] in table and "score" in table and "(2048x1371)" in table
    drawn = sorted(out_dir.iterdir())
    assert len(drawn) == 2 and all(Image.open(p).size == (2048, 1371) for p in drawn)


def test_one_drawn_file(model, chess_images, tmp_path):
    out = tmp_path / "one.png"
    assert run([chess_images[0], "--model", model[0], "--out", out, "--max-proposals", "5",
                "--device", "cpu"]) == 0
    drawn = np.asarray(Image.open(out))
    original = np.asarray(Image.open(chess_images[0]).convert("RGB"))
    assert drawn.shape == original.shape and not np.array_equal(drawn, original)


def test_draw_detections_hand_built():
    image = np.zeros((100, 120, 3), np.uint8)
    dets = Detections(boxes=np.array([[10, 40, 60, 90]], np.float32), scores=np.array([0.9], np.float32),
                      labels=np.array([2]), class_names=("rook",), class_ids=np.array([7]),
                      image_size=(100, 120))
    out = draw_detections(image, dets)
    colour = class_colour(2)
    assert tuple(out[65, 10]) == colour and tuple(out[65, 59]) == colour  # left and right edges
    assert tuple(out[65, 35]) == (0, 0, 0)  # inside the box: untouched
    assert (out[:40] == colour).all(axis=2).any()  # the tag sits above the box
    assert image.max() == 0  # the input is not modified


def test_bad_image_is_reported_and_others_processed(model, chess_images, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    out_json = tmp_path / "dets.json"
    code = run([broken, chess_images[0], tmp_path / "absent.jpg", "--model", model[0], "--json", out_json,
                "--device", "cpu", "--max-proposals", "5"])
    assert code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and "broken.jpg" in lines[0] and "absent.jpg" in lines[1]
    assert "failed: 2 of 3 images" in err
    assert [r["image"] for r in json.loads(out_json.read_text())] == [chess_images[0]]


def test_missing_default_model_is_one_line(monkeypatch, chess_images, capsys, tmp_path):
    monkeypatch.setattr(pipeline, "DEFAULT_MODEL", tmp_path / "default_detector")
    assert run([chess_images[0]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no model is installed" in err and "--model" in err


def test_bad_checkpoints(model, chess_images, tmp_path, capsys):
    assert run([chess_images[0], "--model", tmp_path / "nothing"]) == 2
    assert "missing" in capsys.readouterr().err
    weights, config = checkpoint_paths(tmp_path / "corrupt")
    weights.write_bytes(b"\x00" * 100)
    config.write_text(checkpoint_paths(model[0])[1].read_text())
    assert run([chess_images[0], "--model", tmp_path / "corrupt"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt" in err


def test_command_line_has_no_traceback(tmp_path, chess_images):
    result = subprocess.run([sys.executable, str(TOOL), chess_images[0], "--model", str(tmp_path / "nope")],
                            capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        detect_tool.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--json", "--out", "--threshold", "--max-proposals", "--proposals", "--device",
                 "--precision"):
        assert flag in text
