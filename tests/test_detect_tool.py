"""gdet-detect (detector/apps/detect.py; tools/detect.py in a checkout): the table, the JSON Lines schema, drawn
output, the missing default model, bad inputs; folders and patterns, --classes, the header naming the model,
the "no detection" line, output paths refused before any work. In-process (``main``) except where a real process
matters (exit code, stderr)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detector.apps.detect as detect_tool
import detector.base.checkpoint as checkpoint
import detector.pipeline as pipeline
from detector.base.checkpoint import checkpoint_paths, make_checkpoint_config, save_checkpoint
from detector.base.cli import run_tool
from detector.base.errors import UserError
from detector.base.io import load_image
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


def read_json_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_json_schema_table_and_drawn_folder(model, chess_images, tmp_path, capsys):
    path, vocab = model
    out_json, out_dir = tmp_path / "dets.json", tmp_path / "drawn"
    code = run([*chess_images, "--model", path, "--json", out_json, "--out", out_dir, "--device", "cpu"])
    assert code == 0
    records = read_json_lines(out_json)
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
    assert [r["image"] for r in read_json_lines(out_json)] == [chess_images[0]]


def test_missing_default_model_is_one_line(monkeypatch, chess_images, capsys, tmp_path):
    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL", tmp_path / "default_detector")
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
    for flag in ("--model", "--classes", "--json", "--out", "--threshold", "--max-proposals", "--proposals",
                 "--device", "--precision", "--threads"):
        assert flag in text


# --- what users of detect.py expect: inputs, --classes, streaming JSON Lines, the header, honest output ---
# Most of these replace the network by FakeDetector (hand-built detections), so they test the tool alone
# and take milliseconds; the end-to-end runs above use a real (random) model.

CHESS_NAMES = ("bishop", "black-bishop", "black-king", "black-knight", "black-pawn", "black-queen",
               "black-rook", "white-bishop", "white-king", "white-knight", "white-pawn", "white-queen",
               "white-rook")


class FakeDetector:
    """Stands in for ``load_detector(...)``: per image, a white-king at 0.9 and a black-pawn at 0.6, or
    nothing for images whose name contains "empty"; records the images it saw and can run a check first."""

    def __init__(self, check=None):
        self.seen, self.check = [], check

    def __call__(self, image, image_name=None):
        if self.check is not None:
            self.check(len(self.seen))
        self.seen.append(image_name)
        h, w = image.shape[:2]
        if "empty" in image_name:
            return Detections(boxes=np.zeros((0, 4), np.float32), scores=np.zeros(0, np.float32),
                              labels=np.zeros(0, np.int64), class_names=(), class_ids=np.zeros(0, np.int64),
                              image_size=(h, w), timings={"total": 0.01})
        return Detections(boxes=np.array([[1, 2, 10, 12], [3, 3, 9, 9]], np.float32),
                          scores=np.array([0.9, 0.6], np.float32), labels=np.array([9, 5]),
                          class_names=("white-king", "black-pawn"), class_ids=np.array([9, 5]),
                          image_size=(h, w), timings={"total": 0.01, "proposals": 0.005})

    def detect_stream(self, items, errors="raise"):
        """``Detector.detect_stream``'s contract: ``(key, Detections or UserError)`` per
        ``(key, image or path, proposals, image_name)``."""
        for key, image, _, name in items:
            try:
                array = load_image(image) if isinstance(image, (str, os.PathLike)) else image
            except UserError as err:
                if errors == "raise":
                    raise
                yield key, err
                continue
            yield key, self(array, image_name=name or str(image))


@pytest.fixture
def fake(monkeypatch):
    """The FakeDetector that detect.py will load; ``fake.loaded`` counts the loads (0: no work was done)."""
    detector = FakeDetector()
    detector.loaded = 0

    def load(*args, **kwargs):
        detector.loaded += 1
        return detector

    monkeypatch.setattr(pipeline, "load_detector", load)
    return detector


@pytest.fixture
def photos(tmp_path):
    """photos/: b.jpg, a.png, c.JPEG, empty.jpg (nothing is found in it), notes.txt, .hidden.jpg, sub/d.jpg."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.jpg", "a.png", "c.JPEG", "empty.jpg", ".hidden.jpg", "sub/d.jpg"):
        Image.new("RGB", (24, 16), (90, 120, 30)).save(folder / name, format="PNG" if name.endswith("png") else "JPEG")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_folder_is_every_image_directly_inside_sorted(photos):
    # not notes.txt (not an image name), not .hidden.jpg (hidden), not sub/d.jpg (a subfolder); sorted by name
    assert detect_tool.expand_inputs([str(photos)]) == [str(photos / n) for n in ("a.png", "b.jpg", "c.JPEG",
                                                                                   "empty.jpg")]


def test_patterns_are_expanded_sorted_and_files_kept_as_given(photos):
    assert detect_tool.expand_inputs([str(photos / "*.jpg")]) == [str(photos / "b.jpg"), str(photos / "empty.jpg")]
    # ** reaches every depth; a file given by name is kept even if it is not an image (read and reported later)
    assert detect_tool.expand_inputs([str(photos / "**" / "d.jpg"), str(photos / "notes.txt")]) == [
        str(photos / "sub" / "d.jpg"), str(photos / "notes.txt")]


@pytest.mark.parametrize("make_input, message", [
    (lambda p: p / "sub" / "none", "has no image files"),  # an empty folder (made below)
    (lambda p: p / "*.gif", "matches no image file"),
])
def test_folder_or_pattern_without_images_is_one_line_before_work(photos, fake, capsys, make_input, message):
    (photos / "sub" / "none").mkdir()
    assert run([make_input(photos)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and fake.loaded == 0


def test_folder_input_end_to_end_streams_json_lines(photos, fake, tmp_path, capsys):
    out = tmp_path / "dets.jsonl"

    def partial_holds_every_finished_image(done):  # checked before each image: the run streams
        partial = tmp_path / "dets.jsonl.partial"
        assert partial.exists() and not out.exists()
        assert len(partial.read_text().splitlines()) == done

    fake.check = partial_holds_every_finished_image
    assert run([photos, "--json", out]) == 0
    records = read_json_lines(out)
    assert [r["image"] for r in records] == fake.seen == detect_tool.expand_inputs([str(photos)])
    assert [d["label"] for d in records[0]["detections"]] == ["white-king", "black-pawn"]
    assert records[3]["detections"] == []  # empty.jpg: a line all the same, one per image
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dets.jsonl", "photos"]  # no .partial left


def test_json_to_stdout_is_only_json_lines(photos, fake, capsys):
    assert run([photos / "a.png", photos / "b.jpg", "--json", "-"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["image"] for line in captured.out.splitlines()] == [str(photos / "a.png"),
                                                                                  str(photos / "b.jpg")]
    assert captured.err.startswith("default model: chess pieces") and "white-king" in captured.err


def test_classes_keeps_those_classes_only(photos, fake, tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    assert run([photos / "a.png", "--classes", "Black-Pawn", "--json", out]) == 0  # names match ignoring case
    assert [d["label"] for d in read_json_lines(out)[0]["detections"]] == ["black-pawn"]
    printed = capsys.readouterr().out
    assert "reporting black-pawn only" in printed.splitlines()[0] and "white-king" not in printed.split("\n", 1)[1]
    assert run([photos / "a.png", "--classes", "black-queen,white-rook"]) == 0
    assert "no black-queen or white-rook above 0.50 in" in capsys.readouterr().out


def test_unknown_class_is_one_line_listing_the_known_ones_before_work(photos, fake, capsys):
    assert run([photos / "a.png", "--classes", "white-king,queen"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no class 'queen'" in err and fake.loaded == 0
    assert err.endswith(", ".join(CHESS_NAMES))  # every class the default model knows


def test_header_names_the_default_model_and_help_too(photos, fake, capsys):
    assert run([photos / "a.png"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    # the name comes from the default model's JSON ("name"); the classes from its vocabulary
    assert first.startswith("default model: chess pieces, 13 classes (bishop, black-bishop, ")
    assert checkpoint.model_info(checkpoint.DEFAULT_MODEL).description  # and it says what it is in a sentence
    with pytest.raises(SystemExit):
        detect_tool.main(["--help"])
    assert first in capsys.readouterr().out


def test_header_of_a_given_model_without_a_name(model, photos, fake, capsys):
    path, vocab = model
    assert run([photos / "a.png", "--model", path, "--model", path]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"ensemble of 2 models ({path}, {path}): 13 classes (bishop, ")
    assert first.endswith("white-rook)")  # every name fits in 200 characters


def test_photo_without_detection_says_so_and_what_the_model_knows(photos, fake, capsys):
    assert run([photos / "empty.jpg", "--threshold", "0.5"]) == 0
    out = capsys.readouterr().out
    assert f"no detection above 0.50 in {photos / 'empty.jpg'} (the model knows: chess pieces)" in out


@pytest.mark.parametrize("flags, message", [
    (["--json", "{tmp}"], "is a folder"),                           # a directory as the JSON file
    (["--json", "{tmp}/file.txt/dets.jsonl"], "cannot write in"),   # its folder cannot be made
    (["--out", "{tmp}/file.txt"], "is a file; with several images give a folder"),
    (["--out", "{tmp}/file.txt/drawn"], "cannot write in"),
])
def test_output_paths_are_refused_before_any_work(photos, fake, tmp_path, capsys, flags, message):
    (tmp_path / "file.txt").write_text("a file")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run([photos / "a.png", photos / "b.jpg", *[f.format(tmp=tmp_path) for f in flags]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert fake.loaded == 0 and fake.seen == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no .tmp, .partial or probe left


def test_progress_bar_for_several_images(photos, fake, capsys):
    assert run([photos]) == 0
    err = capsys.readouterr().err
    assert "detect: 100%" in err and "4/4" in err  # tqdm on stderr, the tables on stdout


def test_workers_and_compile_reach_the_engine(photos, monkeypatch, capsys):
    given = {}

    def load(*args, **kwargs):
        given.update(kwargs)
        return FakeDetector()

    monkeypatch.setattr(pipeline, "load_detector", load)
    assert run([photos / "a.png", photos / "b.jpg", "--workers", "0", "--compile"]) == 0
    assert given["workers"] == 0 and given["compile"] is True
    assert run([photos / "a.png", "--workers", "-1"]) == 2  # refused in one line, before any work
    assert "--workers" in capsys.readouterr().err


def test_labels_never_hide_each_other_on_a_crowded_image():
    from detector.draw import font_size, place_labels

    # 60 boxes packed in a 5 x 12 grid of 40 x 30 cells on a 480 x 200 image: every tag (60 x 16) is wider
    # than its box, so the places above and inside collide with the neighbours' tags
    image_size = (200, 480)
    boxes = np.array([[40 * c, 30 * r + 40, 40 * c + 38, 30 * r + 68] for r in range(5) for c in range(12)], float)
    placed = place_labels(boxes, [(60.0, 16.0)] * len(boxes), image_size)
    rects = [r for r in placed if r is not None]
    assert len(rects) >= 40  # most tags find a place; none is drawn over another
    for i, a in enumerate(rects):
        assert 0 <= a[0] and a[2] <= 480 and 0 <= a[1] and a[3] <= 200
        for b in rects[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    # the first (best) tag gets its first choice, above its box; a box at the top edge gets its tag inside
    assert placed[0] == (0.0, 24.0, 60.0, 40.0)
    assert place_labels(np.array([[5.0, 0, 50, 40]]), [(30.0, 10.0)], (100, 100)) == [(5.0, 0.0, 35.0, 10.0)]
    # the same box three times: above, then (above taken) inside at the top, then below the box
    three = place_labels(np.array([[10.0, 20, 40, 50]] * 3), [(30.0, 10.0)] * 3, (100, 100))
    assert three == [(10.0, 10.0, 40.0, 20.0), (10.0, 20.0, 40.0, 30.0), (10.0, 50.0, 40.0, 60.0)]
    assert font_size((480, 640)) == 11 and font_size((1371, 2048)) == 34 and font_size((100, 120)) == 10


def test_drawn_crowded_detections_keep_every_tag_readable():
    # 30 detections of 3 classes on a 200 x 300 image: the drawing succeeds and each tag colour appears
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 250, (30, 2)) * [1, 0.6]
    boxes = np.c_[xy, xy + 40].astype(np.float32)
    labels = np.array([1, 2, 3] * 10)
    dets = Detections(boxes=boxes, scores=np.linspace(0.99, 0.5, 30, dtype=np.float32), labels=labels,
                      class_names=tuple(["a", "b", "c"][i - 1] for i in labels), class_ids=labels,
                      image_size=(200, 300))
    out = draw_detections(np.zeros((200, 300, 3), np.uint8), dets)
    for label in (1, 2, 3):
        assert (out == class_colour(label)).all(axis=2).sum() > 100


def test_agnostic_nms_option(model, chess_images, tmp_path):
    path, _ = model
    plain, agnostic = tmp_path / "plain.json", tmp_path / "agnostic.json"
    common = [chess_images[0], "--model", path, "--device", "cpu", "--threshold", "0.01"]
    assert run([*common, "--json", plain]) == 0
    assert run([*common, "--json", agnostic, "--agnostic-nms", "0.3"]) == 0
    before, after = read_json_lines(plain)[0]["detections"], read_json_lines(agnostic)[0]["detections"]
    assert 0 < len(after) <= len(before) and after[0] == before[0]  # the best detection always stays
    boxes = np.array([d["box"] for d in after])
    from detector.base.boxes import box_iou

    iou = box_iou(boxes, boxes)
    assert (iou[np.triu_indices(len(boxes), 1)] <= 0.3 + 1e-3).all()
    assert run([*common, "--agnostic-nms", "0"]) == 2  # (0, 1]: refused in one line
