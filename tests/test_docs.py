"""Every code block of README.md and docs/*.md runs here, so no snippet can break silently.

How a block is treated follows its fence's language:

- ``python``: written to a file and run by this interpreter; ``bash``: run by ``bash -e -o pipefail``.
  Both run in a sandbox folder made for their document (one per document; the blocks of a document run
  in order, so a later block finds what an earlier one wrote), laid out like the project root: ``tools/``,
  ``examples/`` and ``benchmarks/`` are links to this checkout, ``../shared`` is the real data, and the
  names the block uses as placeholders (``a.jpg``, ``runs/mine/best``, ``val.txt``, ``VOCdevkit/VOC2007``,
  ...) are real files made by the document's setup below: small real photos and annotations from
  ``../shared/data``, and small checkpoints with random weights where a block needs "your model".
- ``json``: parsed (one value per line).
- ``text``: not code (a folder layout, a diagram); nothing to run. Every fence must name one of these four.

A block runs exactly as written unless an HTML comment right above it says otherwise:

    <!-- docs-test: illustrative
    reason: why it cannot run as written here (days of training, data this machine does not have)
    replace: TEXT AS WRITTEN => TEXT THE TEST RUNS
    expect: a string the output must contain
    -->

Such a block is *illustrative*: its first line must say so (a ``# illustrative: ...`` comment), so that a
reader of the rendered page sees which blocks run as written; the comment must give a reason, and every
``replace`` must still match the block (a stale override fails). ``{repo}`` in a replacement is this
checkout. ``expect`` (also allowed on blocks that run as written) checks a figure the text quotes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LANGUAGES = ("python", "bash", "json", "text")
BLOCK_TIMEOUT_S = 900  # one block; the slowest (ILSVRC.md's training loop) takes about a minute here


@dataclass
class Block:
    doc: str  # file name relative to the project root
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    illustrative: bool = False
    reason: str = ""
    replaces: list[tuple[str, str]] = field(default_factory=list)
    expects: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    def runnable_code(self) -> str:
        code = self.code
        for old, new in self.replaces:
            assert old in code, f"{self.where}: the override's text '{old}' is not in the block any more"
            code = code.replace(old, new.replace("{repo}", str(REPO)))
        return code


def read_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the ``docs-test`` comment right above each (if any)."""
    doc = str(path.relative_to(REPO))
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks, note, i = [], None, 0
    while i < len(lines):
        text = lines[i]
        if text.startswith("<!-- docs-test"):
            start = i
            while "-->" not in lines[i]:
                i += 1
            note = (start + 1, "\n".join(lines[start:i + 1]).removeprefix("<!-- docs-test").removesuffix("-->"))
        elif m := re.match(r"^(\s*)```(.*)$", text):
            indent, lang = m.group(1), m.group(2).strip()
            end = i + 1
            while not lines[end].startswith(indent + "```"):
                end += 1
            code = "\n".join(line[len(indent):] for line in lines[i + 1:end]) + "\n"
            block = Block(doc, i + 1, lang, code)
            if note is not None:
                apply_note(block, *note)
                note = None
            blocks.append(block)
            i = end
        elif text.strip() and note is not None:
            raise AssertionError(f"{doc}:{note[0]}: a docs-test comment must stand right above a code block")
        i += 1
    return blocks


def apply_note(block: Block, line: int, note: str) -> None:
    """``note``: the comment's text after ``<!-- docs-test``: ``: illustrative`` then ``key: value`` lines."""
    for raw in note.strip().split("\n"):
        key, _, value = raw.strip().partition(":")
        key, value = key.strip(), value.strip()
        if key == "" and value == "illustrative":
            block.illustrative = True
        elif key == "reason":
            block.reason = value
        elif key == "replace":
            old, sep, new = value.partition(" => ")
            assert sep, f"{block.doc}:{line}: 'replace: OLD => NEW' expected, got '{raw}'"
            block.replaces.append((old, new))
        elif key == "expect":
            block.expects.append(value)
        elif raw.strip():
            raise AssertionError(f"{block.doc}:{line}: unknown docs-test line '{raw}'")


BLOCKS = [block for path in DOCS for block in read_blocks(path)]


# ---------------------------------------------------------------------------------------------------------
# Small real data and checkpoints, made once per session

def downscaled(src: Path, dst: Path, longest: int) -> None:
    with Image.open(src) as im:
        im = im.convert("RGB")
        scale = longest / max(im.size)
        im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR).save(dst, quality=92)


def chess_subset(dst: Path, split: str, count: int, json_path: Path | None = None) -> Path:
    """``dst/`` with the first ``count`` photos of chess/``split`` and a COCO JSON of just those
    (``dst/_annotations.coco.json``, or ``json_path`` with file names relative to its folder)."""
    coco = json.loads((DATA / "chess" / split / "_annotations.coco.json").read_text())
    coco["images"] = sorted(coco["images"], key=lambda im: im["id"])[:count]
    keep = {im["id"] for im in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    dst.mkdir(parents=True, exist_ok=True)
    for im in coco["images"]:
        os.symlink(DATA / "chess" / split / im["file_name"], dst / im["file_name"])
    json_path = json_path or dst / "_annotations.coco.json"
    for im in coco["images"]:
        im["file_name"] = os.path.relpath(dst / im["file_name"], json_path.parent)
    json_path.write_text(json.dumps(coco))
    return json_path


def coco128_subset(dst: Path, count: int) -> Path:
    """``dst/instances.json`` (the first ``count`` coco128 images, COCO's own annotations) and ``dst/images``."""
    coco = json.loads((DATA / "coco128" / "annotations" / "instances.json").read_text())
    coco["images"] = sorted(coco["images"], key=lambda im: im["id"])[:count]
    keep = {im["id"] for im in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    (dst / "images").mkdir(parents=True, exist_ok=True)
    for im in coco["images"]:
        os.symlink(DATA / "coco128" / "images" / im["file_name"], dst / "images" / im["file_name"])
    (dst / "instances.json").write_text(json.dumps(coco))
    return dst / "instances.json"


def bccd_subset(dst: Path, counts: dict[str, int]) -> Path:
    """A VOC folder with the first ``counts[split]`` images of each BCCD split (real photos, real XML)."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for split, count in counts.items():
        names = (DATA / "bccd" / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[:count]
        (dst / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            for sub, ext in (("Annotations", ".xml"), ("JPEGImages", ".jpg")):
                if not (dst / sub / f"{name}{ext}").exists():
                    os.symlink(DATA / "bccd" / sub / f"{name}{ext}", dst / sub / f"{name}{ext}")
    return dst


def random_checkpoint(path: Path, vocab, input_size: int = 64) -> Path:
    """A checkpoint with random weights (never shipped) and cheap proposals: Selective Search fast on a
    160-pixel copy, at most 30 boxes. Stands in for "your model" where a block names one."""
    import torch

    from detector.base.checkpoint import make_checkpoint_config, save_checkpoint
    from detector.classifier import ClassifierConfig, RegionClassifier

    torch.manual_seed(0)
    config = ClassifierConfig(num_classes=vocab.num_classes, input_size=input_size)
    net = RegionClassifier(config)
    meta = make_checkpoint_config(config, vocab, proposals={"method": "ss-fast", "options": {"max_side": 160},
                                                             "max_proposals": 30},
                                  training={"note": "random weights made by tests/test_docs.py"})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, net.state_dict(), meta)
    return path


def chess_vocab():
    from detector.data import read_coco

    return read_coco(DATA / "chess" / "test" / "_annotations.coco.json").vocab


ILSVRC_DET_IDS = tuple(range(7, 200, 15))[:13]  # the 13 ILSVRC DET classes the chess classes stand in for


def ilsvrc_vocab():
    from detector.base.vocab import Vocabulary, ilsvrc_det_vocabulary

    det = ilsvrc_det_vocabulary()
    return Vocabulary(ids=ILSVRC_DET_IDS, names=tuple(det.names[c - 1] for c in ILSVRC_DET_IDS),
                      wnids=tuple(det.wnids[c - 1] for c in ILSVRC_DET_IDS))


def write_ilsvrc_xml(path: Path, name: str, size: tuple[int, int], wnids, voc_boxes) -> None:
    objects = "".join(
        f"<object><name>{w}</name><bndbox><xmin>{b[0]:g}</xmin><ymin>{b[1]:g}</ymin><xmax>{b[2]:g}</xmax>"
        f"<ymax>{b[3]:g}</ymax></bndbox></object>" for w, b in zip(wnids, voc_boxes))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>{name}</filename><size><width>{size[1]}</width><height>{size[0]}"
                    f"</height></size>{objects}</annotation>")


def mini_ilsvrc(root: Path) -> None:
    """The ILSVRC 2014 layout of docs/ILSVRC.md in miniature, in ``root``: real chess photos downscaled
    to ILSVRC's size (longest side 500) under ILSVRC names, their real boxes as XML with 13 DET classes'
    wnids, the real devkit's meta_det.mat and blacklist, and lists in the devkit's formats: train 4
    images, val 4 (val2 = the last 2, val1 = the first 2: one for training, one held out), test 2."""
    from detector.base.boxes import xyxy_to_voc
    from detector.data import read_coco

    source = read_coco(DATA / "chess" / "test" / "_annotations.coco.json")
    vocab = ilsvrc_vocab()
    devkit = root / "ILSVRC2014_devkit"
    (devkit / "data" / "det_lists").mkdir(parents=True)
    (devkit / "ilsvrc13_val2").mkdir()
    for name in ("meta_det.mat", "ILSVRC2014_det_validation_blacklist.txt"):
        os.symlink(DATA / "ilsvrc2014_devkit" / "data" / name, devkit / "data" / name)
    records = source.records
    train, val, test = records[:4], records[4:8], records[8:10]
    for n, rec in enumerate(train):
        name = f"ILSVRC2014_train_0000/ILSVRC2014_train_{n + 1:08d}"
        put_ilsvrc_image(rec, source, root / "ILSVRC2014_DET_train" / f"{name}.JPEG",
                         root / "ILSVRC2014_DET_bbox_train" / f"{name}.xml", vocab, xyxy_to_voc)
    for n, rec in enumerate(val):
        name = f"ILSVRC2013_val_{n + 1:08d}"
        put_ilsvrc_image(rec, source, root / "ILSVRC2013_DET_val" / f"{name}.JPEG",
                         root / "ILSVRC2013_DET_bbox_val" / f"{name}.xml", vocab, xyxy_to_voc)
    (root / "ILSVRC2014_DET_test").mkdir()
    for n, rec in enumerate(test):
        downscaled(source.image_path(rec), root / "ILSVRC2014_DET_test" / f"ILSVRC2014_test_{n + 1:08d}.JPEG", 500)
    val_lines = [f"ILSVRC2013_val_{n + 1:08d} {n + 1}" for n in range(4)]
    (devkit / "data" / "det_lists" / "val.txt").write_text("\n".join(val_lines) + "\n")
    (devkit / "data" / "det_lists" / "test.txt").write_text(
        "".join(f"ILSVRC2014_test_{n + 1:08d} {n + 1}\n" for n in range(2)))
    (devkit / "ilsvrc13_val2" / "val2_in_val_ids.txt").write_text("\n".join(val_lines[2:]) + "\n")
    train_lines = [f"train/ILSVRC2014_train_0000/ILSVRC2014_train_{n + 1:08d} {n + 1}" for n in range(4)]
    (root / "train_val1.txt").write_text("\n".join([*train_lines, "val/ILSVRC2013_val_00000001 5"]) + "\n")
    (root / "val1_holdout.txt").write_text("val/ILSVRC2013_val_00000002 1\n")


def put_ilsvrc_image(rec, source, image: Path, xml: Path, vocab, xyxy_to_voc) -> None:
    image.parent.mkdir(parents=True, exist_ok=True)
    downscaled(source.image_path(rec), image, 500)
    scale = 500 / max(rec.image_size)
    with Image.open(image) as im:
        w, h = im.size
    boxes = rec.gt_boxes.astype(np.float64) * scale
    wnids = [vocab.wnids[int(label) - 1] for label in rec.gt_labels]
    write_ilsvrc_xml(xml, image.stem, (h, w), wnids, np.round(xyxy_to_voc(boxes)))


def fake_imagenet_googlenet(path: Path) -> None:
    """A file laid out as torchvision's ImageNet GoogLeNet weights (``googlenet-1378be20.pth``), with
    random weights: the real file needs a download this machine cannot make."""
    import torch
    from torchvision.models import googlenet

    torch.manual_seed(0)
    torch.save(googlenet(weights=None, aux_logits=True, init_weights=True).state_dict(), path)


def precompute(folder_or_list: str, out: str, cwd: Path, *extra: str) -> None:
    run_command([sys.executable, str(REPO / "tools" / "precompute_proposals.py"), folder_or_list,
                 "--method", "ss-fast", "--max-side", "160", "--workers", "1", "--out", out, *extra], cwd)


def run_command(argv: list[str], cwd: Path) -> None:
    proc = subprocess.run(argv, cwd=cwd, env=block_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"setup: {' '.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def fake_detections(dataset, seed: int = 0) -> dict:
    """Detections made from the ground truth (each box moved by up to 10 % of its size, a random score)
    plus one random box per image: real-looking input for the evaluators' examples."""
    rng = np.random.default_rng(seed)
    out = {}
    for rec in dataset.records:
        boxes = rec.gt_boxes.astype(np.float32).copy()
        if len(boxes):
            wh = np.repeat(boxes[:, 2:] - boxes[:, :2], 2, axis=1)[:, [0, 2, 1, 3]]
            boxes += (rng.uniform(-0.1, 0.1, boxes.shape) * wh).astype(np.float32)
        h, w = rec.image_size
        boxes = np.concatenate([boxes, [[0.1 * w, 0.1 * h, 0.4 * w, 0.4 * h]]]).astype(np.float32)
        labels = np.concatenate([rec.gt_labels, [1]]).astype(np.int64)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        out[rec.image_id] = (boxes, rng.uniform(0.05, 1, len(boxes)).astype(np.float32), labels)
    return out


# ---------------------------------------------------------------------------------------------------------
# One sandbox per document; each document's setup makes the files its blocks name

def setup_readme(box: Path) -> None:
    pass  # the Quickstart needs only examples/ and tools/


def setup_detector(box: Path) -> None:
    photos = sorted((DATA / "chess" / "test").glob("*.jpg"))
    downscaled(photos[0], box / "a.jpg", 640)
    downscaled(photos[1], box / "b.jpg", 640)
    (box / "photos").mkdir()
    downscaled(photos[2], box / "photos" / photos[2].name, 640)
    (box / "shots" / "day1").mkdir(parents=True)
    downscaled(photos[4], box / "shots" / "day1" / "board.jpg", 640)
    vocab = chess_vocab()
    for name in ("runs/chess/best", "m", "m1", "m2", "m3"):
        random_checkpoint(box / name, vocab)
    (box / "val_images").mkdir()
    shutil.copy(box / "a.jpg", box / "val_images" / "a.jpg")
    precompute("val_images", "stores/val", box)


def setup_evaluation(box: Path) -> None:
    devkit = DATA / "ilsvrc2014_devkit"
    links = {"Annotations": devkit / "ilsvrc13_val2" / "Annotations",
             "val2_in_val_ids.txt": devkit / "ilsvrc13_val2" / "val2_in_val_ids.txt",
             "val.txt": devkit / "ilsvrc13_val2" / "val2_in_val_ids.txt",
             "meta_det.mat": devkit / "data" / "meta_det.mat",
             "blacklist.txt": devkit / "data" / "ILSVRC2014_det_validation_blacklist.txt",
             "submission.txt": devkit / "evaluation" / "demo.val.pred.det.txt",
             "bccd": DATA / "bccd"}
    for name, target in links.items():
        os.symlink(target, box / name)
    (box / "VOCdevkit").mkdir()
    os.symlink(DATA / "bccd", box / "VOCdevkit" / "VOC2007")
    from detector.data import read_coco, read_voc
    from detector.evaluation import write_coco_results, write_voc_detections

    bccd = read_voc(DATA / "bccd", "test")
    write_voc_detections(box / "voc_detections.txt", fake_detections(bccd), bccd)
    coco_json = coco128_subset(box / "coco128", 16)
    os.symlink(coco_json, box / "instances.json")
    coco = read_coco(coco_json)
    write_coco_results(box / "results.json", fake_detections(coco), coco)
    chess_subset(box / "chess_test2", "test", 2)


def setup_benchmarking(box: Path) -> None:
    mini_ilsvrc(box)
    vocab = ilsvrc_vocab()
    for name in ("runs/mine/best", "runs/s1/best", "runs/s2/best"):
        random_checkpoint(box / name, vocab)
    from detector.data import read_voc

    random_checkpoint(box / "runs/voc/best", read_voc(DATA / "bccd", "test").vocab)
    precompute("ILSVRC2013_DET_val", "stores/val_ss", box)
    precompute("ILSVRC2014_DET_test", "stores/test_ss", box)
    (box / "VOCdevkit").mkdir()
    bccd_subset(box / "VOCdevkit" / "VOC2007", {"test": 6})
    chess_subset(box / "chess_test2", "test", 2)


def setup_ilsvrc(box: Path) -> None:
    mini_ilsvrc(box)
    fake_imagenet_googlenet(box / "googlenet-1378be20.pth")


def setup_multibox(box: Path) -> None:
    # "runs/mb/best", the checkpoint of the first block: a copy of the shipped model (the second block
    # trains its own into runs/mb)
    (box / "runs" / "mb").mkdir(parents=True)
    for ext in (".safetensors", ".json"):
        shutil.copy(REPO / "proposals" / "resources" / f"default_multibox{ext}", box / "runs" / "mb" / f"best{ext}")
    for split, count in (("train", 8), ("valid", 4), ("test", 3)):
        chess_subset(box / f"chess_{split}{count}", split, count)


def setup_proposals(box: Path) -> None:
    mini_ilsvrc(box)
    (box / "val.txt").write_text((box / "ILSVRC2014_devkit" / "data" / "det_lists" / "val.txt").read_text())
    run_command([sys.executable, str(REPO / "tools" / "precompute_proposals.py"), "val.txt", "--image-root",
                 "ILSVRC2013_DET_val", "--out", "runs/val.store", "--workers", "2"], box)
    coco128_subset(box / "coco128_4", 4)
    run_command([sys.executable, str(REPO / "tools" / "precompute_proposals.py"), "coco128_4/images",
                 "--method", "ss-fast", "--out", "runs/coco.store", "--workers", "1"], box)


def setup_training(box: Path) -> None:
    for split, name, count in (("train", "train", 4), ("valid", "val", 2)):
        chess_subset(box / "data" / name, split, count, box / "data" / f"{name}.json")


def setup_train_your_own(box: Path) -> None:
    bccd_subset(box / "bccd_small", {"trainval": 16, "test": 3})


SETUPS = {"README.md": setup_readme, "docs/DETECTOR.md": setup_detector, "docs/EVALUATION.md": setup_evaluation,
          "docs/BENCHMARKING.md": setup_benchmarking, "docs/ILSVRC.md": setup_ilsvrc,
          "docs/MULTIBOX.md": setup_multibox, "docs/PROPOSALS.md": setup_proposals,
          "docs/TRAINING.md": setup_training, "docs/TRAIN_YOUR_OWN.md": setup_train_your_own}


def block_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # python, gdet-*, torchrun
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    return env


class Sandbox:
    """A document's folder: made and set up on first use; remembers which of its blocks ran."""

    def __init__(self, doc: str, root: Path):
        self.doc, self.root = doc, root
        self.path = root / "project"
        self.path.mkdir(parents=True)
        os.symlink(SHARED, root / "shared")  # ../shared from the sandbox, as from the project root
        for name in ("tools", "examples", "benchmarks"):
            os.symlink(REPO / name, self.path / name)
        SETUPS.get(doc, lambda box: None)(self.path)
        self.results: dict[int, str | None] = {}  # block line -> None (passed) or why it failed


_SANDBOXES: dict[str, Sandbox] = {}


@pytest.fixture
def sandbox_for(tmp_path_factory):
    def get(doc: str) -> Sandbox:
        if doc not in _SANDBOXES:
            name = re.sub(r"\W", "_", doc)
            _SANDBOXES[doc] = Sandbox(doc, tmp_path_factory.mktemp(name))
        return _SANDBOXES[doc]
    return get


def run_block(block: Block, box: Sandbox) -> subprocess.CompletedProcess:
    code = block.runnable_code()
    if block.lang == "python":
        script = box.path / f"_block_{block.line}.py"
        script.write_text(code)
        argv = [sys.executable, script.name]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", code]
    return subprocess.run(argv, cwd=box.path, env=block_env(), capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)


def execute(block: Block, box: Sandbox) -> None:
    """Run ``block`` in its document's sandbox, after every earlier block of the document."""
    for earlier in (b for b in BLOCKS if b.doc == block.doc and b.line < block.line and b.lang in ("python", "bash")):
        if earlier.line not in box.results:
            execute(earlier, box)
        if box.results[earlier.line] is not None:
            pytest.fail(f"{block.where}: not run, an earlier block of the document failed ({earlier.where})")
    proc = run_block(block, box)
    output = proc.stdout + proc.stderr
    problem = None
    if proc.returncode != 0:
        problem = (f"{block.where}: exit code {proc.returncode}\n--- the block as run:\n{block.runnable_code()}"
                   f"--- stdout (end):\n{proc.stdout[-4000:]}\n--- stderr (end):\n{proc.stderr[-6000:]}")
    else:
        missing = [e for e in block.expects if e not in output]
        if missing:
            problem = f"{block.where}: the output lacks {missing}\n{output[-4000:]}"
    box.results[block.line] = problem
    if problem:
        pytest.fail(problem)


# ---------------------------------------------------------------------------------------------------------

def test_every_block_names_a_known_language():
    unknown = [f"{b.where} ```{b.lang}" for b in BLOCKS if b.lang not in LANGUAGES]
    assert not unknown, f"fences must say {', '.join(LANGUAGES)}: {unknown}"


def test_illustrative_blocks_say_so_and_why():
    for b in BLOCKS:
        if b.replaces or b.illustrative:
            assert b.illustrative, f"{b.where}: a block with overrides must be marked 'illustrative'"
            assert b.reason, f"{b.where}: an illustrative block needs 'reason: ...'"
            first = b.code.lstrip().split("\n", 1)[0]
            assert first.startswith("#") and "illustrative" in first, \
                f"{b.where}: the first line must tell the reader, e.g. '# illustrative: ...'"
            b.runnable_code()  # every override still matches


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "json"], ids=lambda b: b.where)
def test_json_block_parses(block):
    for line in block.code.splitlines():
        if line.strip():
            json.loads(line)


@pytest.mark.slow  # the whole set: about 45 minutes at load average 20 on the 2-core machine (see the report)
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in ("python", "bash")], ids=lambda b: b.where)
def test_block_runs(block, sandbox_for):
    box = sandbox_for(block.doc)
    if block.line in box.results:  # already run for a later block of the document
        if box.results[block.line] is not None:
            pytest.fail(box.results[block.line])
        return
    execute(block, box)


def test_detector_json_example_has_the_tool_schema():
    """DETECTOR.md's JSON Lines example has the keys gdet-detect writes (top level, detection, timings)."""
    from detector.apps.detect import json_record
    from detector.detections import Detections

    (example,) = [b for b in BLOCKS if b.doc == "docs/DETECTOR.md" and b.lang == "json"]
    doc = json.loads(example.code)
    dets = Detections(boxes=np.array([[1, 2, 3, 4]], np.float32), scores=np.array([0.9], np.float32),
                      labels=np.array([1]), class_names=("king",), class_ids=np.array([12]), image_size=(10, 20),
                      timings={"proposals": 0.1, "classify": 0.2, "total": 0.3})
    tool = json_record("a.jpg", dets)
    assert doc.keys() == tool.keys()
    assert doc["detections"][0].keys() == tool["detections"][0].keys()
    assert doc["timings_s"].keys() == tool["timings_s"].keys()
