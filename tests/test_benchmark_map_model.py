"""tools/benchmark_map.py --model: detect a whole dataset, write its result file, evaluate it.

The data: three real chess photos (``chess/test``) laid out as ILSVRC DET (images renamed
``ILSVRC2013_val_*.JPEG``, XML written here from the COCO JSON, the 13 chess classes mapped onto 13
ILSVRC DET classes and their wnids, a made-up image list with unordered ids, a blacklist pair, and one
unreadable image) and as a COCO JSON subset. The model: a small randomly initialized checkpoint made
here (never shipped) with zero box regression, so detections sit exactly on the proposals, no NMS and
no threshold, so every (proposal, class) pair is a detection. The proposals (a store made here): each
ground-truth box, and copies shifted by about a third of its size, whose devkit IoU with it is right at
the 0.5 threshold, so a one-pixel slip in a coordinate conversion changes which detections match.
Runs compared byte for byte use the same torch thread count (one, set in conftest.py; torchrun's ranks
get OMP_NUM_THREADS=1): oneDNN's reductions differ in the last bits between thread counts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.apps.benchmark_map import main
from detector.base.boxes import xyxy_to_voc
from detector.base.checkpoint import make_checkpoint_config, save_checkpoint
from detector.base.cli import run_tool
from detector.base.io import load_image
from detector.base.vocab import Vocabulary, ilsvrc_det_vocabulary
from detector.classifier import ClassifierConfig, RegionClassifier
from detector.data import read_coco, read_ilsvrc_det
from detector.dataset_runner import collect_parts
from detector.evaluation import evaluate_coco, evaluate_ilsvrc
from detector.pipeline import Detector
from detector.postprocess import PostprocessConfig
from proposals.store import ImageProposals, encode_boxes, write_part

ROOT = Path(__file__).resolve().parents[1]
RECORDS = (0, 4, 23)  # chess/test images with 14, 7 and 8 pieces
LIST_IDS = (205, 17, 3, 42)  # made-up ILSVRC image ids, not in list order; 42 is the unreadable image
DET_IDS = tuple(range(7, 200, 15))[:13]  # the 13 ILSVRC DET classes the 13 chess classes are mapped onto


@pytest.fixture(scope="module")
def bccd(shared_data) -> Path:
    return shared_data / "bccd"


def shifted_proposals(gt: np.ndarray) -> np.ndarray:
    """Two copies of each box moved sideways by about a third of its width w: a shift d gives the devkit
    IoU (w - d) / (w + d) (inclusive widths are w here), 0.5 at d = w / 3. Left by w/3 - 0.2: IoU just
    above 0.5, and a box one pixel larger to the left and top (the slip) falls below; right by w/3 + 0.2:
    just below, and the slip lifts it above."""
    w = (gt[:, 2] - gt[:, 0])[:, None]
    left, right = gt.copy(), gt.copy()
    left[:, [0, 2]] -= w / 3 - 0.2
    right[:, [0, 2]] += w / 3 + 0.2
    return np.concatenate([left, right]).astype(np.float32)


def write_xml(path: Path, name: str, size: tuple[int, int], wnids: list[str], voc_boxes: np.ndarray) -> None:
    objects = "".join(
        f"<object><name>{w}</name><bndbox><xmin>{b[0]:g}</xmin><ymin>{b[1]:g}</ymin><xmax>{b[2]:g}</xmax>"
        f"<ymax>{b[3]:g}</ymax></bndbox></object>" for w, b in zip(wnids, voc_boxes))
    path.write_text(f"<annotation><filename>{name}</filename><size><width>{size[1]}</width><height>{size[0]}"
                    f"</height></size>{objects}</annotation>")


@pytest.fixture(scope="module")
def data(tmp_path_factory, chess):
    """Both layouts, the proposal store and the checkpoints (paths in a dict)."""
    root = tmp_path_factory.mktemp("bench")
    source = read_coco(chess / "test" / "_annotations.coco.json")
    det_vocab = ilsvrc_det_vocabulary()
    chess_vocab = source.vocab
    records = [source.records[i] for i in RECORDS]
    # ILSVRC layout: images/, Annotations/, list, blacklist
    (root / "images").mkdir()
    (root / "Annotations").mkdir()
    wnid_of = {label: det_vocab.wnids[cid - 1] for label, cid in enumerate(DET_IDS, start=1)}
    lines, store_entries = [], []
    for n, (rec, image_id) in enumerate(zip(records, LIST_IDS)):
        name = f"ILSVRC2013_val_{n + 1:08d}"
        lines.append(f"{name} {image_id}")
        shutil.copy(source.image_path(rec), root / "images" / f"{name}.JPEG")
        voc = xyxy_to_voc(rec.gt_boxes.astype(np.float64))  # COCO JSON -> project xyxy (reader) -> 1-based
        write_xml(root / "Annotations" / f"{name}.xml", name, rec.image_size,
                  [wnid_of[int(lab)] for lab in rec.gt_labels], voc)
        boxes = shifted_proposals(rec.gt_boxes)
        for key in (name, rec.file_name):  # one store for both layouts
            store_entries.append(ImageProposals(key, rec.image_size, encode_boxes(boxes, rec.image_size)))
    broken = f"ILSVRC2013_val_{len(records) + 1:08d}"
    lines.append(f"{broken} {LIST_IDS[-1]}")
    (root / "images" / f"{broken}.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    write_xml(root / "Annotations" / f"{broken}.xml", broken, (100, 100), [wnid_of[2]], np.array([[5, 5, 60, 80]]))
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    first_label = int(records[0].gt_labels[0])
    (root / "blacklist.txt").write_text(f"{LIST_IDS[0]} {wnid_of[first_label]}\n")
    write_part(root / "store" / "proposals.pstore", store_entries, {"method": "test-shifted-gt"})
    # COCO layout: the same three photos, annotations numbered from 1
    coco = json.loads((chess / "test" / "_annotations.coco.json").read_text())
    keep = {coco["images"][i]["id"] for i in RECORDS}
    coco["images"] = [img for img in coco["images"] if img["id"] in keep]
    coco["annotations"] = [dict(a, id=n) for n, a in
                           enumerate((a for a in coco["annotations"] if a["image_id"] in keep), start=1)]
    (root / "coco.json").write_text(json.dumps(coco))
    # checkpoints: the same random weights with the chess vocabulary and the ILSVRC-mapped one
    torch.manual_seed(0)
    config = ClassifierConfig(num_classes=chess_vocab.num_classes, input_size=64)
    model = RegionClassifier(config)
    with torch.no_grad():
        for module in model.modules():  # keep activations from vanishing, so scores differ between regions
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        # no box regression: a detection is its proposal
        model.bbox_pred.weight.zero_()
        model.bbox_pred.bias.zero_()
    post = PostprocessConfig(score_threshold=0.0, nms_iou=1.0, max_detections=1000)  # every pair kept
    ilsvrc_vocab = Vocabulary(ids=DET_IDS, names=tuple(det_vocab.names[c - 1] for c in DET_IDS),
                              wnids=tuple(det_vocab.wnids[c - 1] for c in DET_IDS))
    for name, vocab in (("chess", chess_vocab), ("ilsvrc", ilsvrc_vocab)):
        meta = make_checkpoint_config(config, vocab, postprocess=post, proposals={"max_proposals": 200},
                                      training={"note": "random weights made by tests/test_benchmark_map_model.py"})
        save_checkpoint(root / f"{name}_model", model.state_dict(), meta)
    return root


def ilsvrc_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(data / "ilsvrc_model"), "--dataset", "ilsvrc", "--images", str(data / "images"),
            "--image-list", str(data / "val.txt"), "--annotations", str(data / "Annotations"),
            "--blacklist", str(data / "blacklist.txt"), "--proposals", str(data / "store"), "--out", str(out),
            "--precision", "fp32", "--batch-size", "32", "--workers", "0", "--chunk-size", "1", "--quiet", *extra]


def coco_argv(data: Path, chess: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(data / "chess_model"), "--dataset", "coco", "--annotations", str(data / "coco.json"),
            "--images", str(chess / "test"), "--proposals", str(data / "store"), "--out", str(out),
            "--precision", "fp32", "--batch-size", "32", "--workers", "0", "--quiet", *extra]


def ilsvrc_dataset(data: Path):
    return read_ilsvrc_det(data / "val.txt", data / "Annotations", blacklist=data / "blacklist.txt",
                           image_root=data / "images")


@pytest.fixture(scope="module")
def ilsvrc_run(data, tmp_path_factory):
    """One uninterrupted ILSVRC run with a background worker (the reference of the sharding/resume tests)."""
    out = tmp_path_factory.mktemp("ilsvrc_run")
    assert run_tool(main, ilsvrc_argv(data, out, "--workers", "1")) == 0
    return out


@pytest.mark.numeric
def test_ilsvrc_submission_scores_as_the_detections_in_memory(data, ilsvrc_run, capsys):
    out = ilsvrc_run
    dataset = ilsvrc_dataset(data)
    rows = np.loadtxt(out / "ilsvrc_submission.txt", ndmin=2)
    assert set(rows[:, 0].astype(int)) == set(LIST_IDS[:3])  # ids from the list; the unreadable image has none
    assert set(rows[:, 1].astype(int)) <= set(DET_IDS)
    assert (rows[:, 3:5] >= 1).all()  # 1-based
    in_memory = collect_parts(out / "parts", dataset, chunk_size=1)
    assert len(rows) == in_memory.num_detections
    from_file = evaluate_ilsvrc(dataset, out / "ilsvrc_submission.txt")
    direct = evaluate_ilsvrc(dataset, in_memory.detections)
    assert from_file.ap == direct.ap and from_file.mAP == direct.mAP
    # some detections match (a real test of the equality), not all: strictly between 0 and 1, no figure
    # (0.116 measured with AVX-512, AVX2 and SSE kernels; random weights rank the boxes, so a machine
    # whose kernels break a near-tie differently may give another value)
    assert 0 < direct.mAP < 1.0
    assert json.loads((out / "evaluation.json").read_text())["mAP"] == direct.mAP
    # The equality is sensitive: the same detections written one pixel off (xmin, ymin without the +1
    # of the 1-based conversion) score differently.
    slipped = out.parent / "slipped.txt"
    slipped.write_text("".join(f"{int(r[0])} {int(r[1])} {r[2]!r} {r[3] - 1!r} {r[4] - 1!r} {r[5]!r} {r[6]!r}\n"
                               for r in rows.tolist()))
    assert evaluate_ilsvrc(dataset, slipped).ap != direct.ap
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["unreadable"] == 1 and "ILSVRC2013_val_00000004.JPEG" in summary["failures"]
    assert summary["done"] == 4 and summary["items_per_second"] > 0
    for name in ("per_class.txt", "pr_curves.png", "ap_per_class.png"):
        assert (out / name).stat().st_size > 100


def test_ilsvrc_test_list_without_annotations_is_detection_only(data, ilsvrc_run, tmp_path, capsys):
    argv = ilsvrc_argv(data, tmp_path)
    for flag in ("--annotations", "--blacklist"):
        i = argv.index(flag)
        del argv[i:i + 2]
    assert run_tool(main, argv) == 0
    assert "nothing evaluated" in capsys.readouterr().out
    assert (tmp_path / "ilsvrc_submission.txt").read_bytes() == (ilsvrc_run / "ilsvrc_submission.txt").read_bytes()
    assert not (tmp_path / "evaluation.json").exists()
    assert json.loads((tmp_path / "run_summary.json").read_text())["unreadable"] == 1


@pytest.mark.numeric
def test_tool_detections_are_the_detectors_own(data, ilsvrc_run):
    """The parts hold what Detector returns for each image on its own (labels mapped to the dataset's)."""
    from proposals import ProposalStore

    dataset = ilsvrc_dataset(data)
    merged = collect_parts(ilsvrc_run / "parts", dataset, chunk_size=1)
    detector = Detector.from_checkpoint(data / "ilsvrc_model", device="cpu", precision="fp32",
                                        proposals=ProposalStore(data / "store"))
    for rec in dataset.records[:3]:
        expected = detector(load_image(dataset.image_path(rec)), image_name=rec.file_name)
        boxes, scores, labels = merged.detections[rec.image_id]
        np.testing.assert_allclose(scores, expected.scores, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(boxes, expected.boxes, atol=1e-3)
        # model label l is DET id DET_IDS[l - 1], which is dataset label DET_IDS[l - 1] (vocab ids 1..200)
        np.testing.assert_array_equal(labels, np.asarray(DET_IDS)[expected.labels - 1])


@pytest.mark.numeric
def test_coco_results_score_as_pycocotools_on_the_detections(data, chess, tmp_path, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    assert run_tool(main, coco_argv(data, chess, tmp_path)) == 0
    dataset = read_coco(data / "coco.json", image_root=chess / "test")
    in_memory = collect_parts(tmp_path / "parts", dataset, chunk_size=32)
    direct = evaluate_coco(data / "coco.json", in_memory.detections)
    # pycocotools itself on the written file
    gt = COCO(str(data / "coco.json"))
    evaluator = COCOeval(gt, gt.loadRes(str(tmp_path / "coco_results.json")), iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    # faster-coco-eval's sums may round differently from numpy's (~1e-16); any real difference is >= 1e-4
    np.testing.assert_allclose(evaluator.stats, list(direct.extra["stats"].values()), rtol=0, atol=1e-12)
    # some detections match: 0.011 measured (AVX-512, AVX2, SSE), too close to any fixed bound for random
    # weights, whose ranking a near-tie may change; the 12 stats above are the real comparison
    assert direct.mAP > 0
    assert json.loads((tmp_path / "evaluation.json").read_text())["mAP"] == direct.mAP
    results = json.loads((tmp_path / "coco_results.json").read_text())
    assert {r["image_id"] for r in results} == {rec.image_id for rec in dataset.records}
    assert "mean AP" in capsys.readouterr().out


def test_voc_protocol_on_coco_data(data, chess, tmp_path, capsys):
    assert run_tool(main, coco_argv(data, chess, tmp_path, "--protocol", "voc")) == 0
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert result["protocol"] == "voc" and 0 < result["mAP"] <= 1


def test_two_shards_merge_to_the_single_run(data, ilsvrc_run, tmp_path, capsys):
    out = tmp_path / "sharded"
    assert run_tool(main, ilsvrc_argv(data, out, "--shard", "1/2")) == 0
    assert "chunks of other shards are still missing" in capsys.readouterr().err
    assert not (out / "ilsvrc_submission.txt").exists()
    assert run_tool(main, ilsvrc_argv(data, out, "--shard", "0/2")) == 0  # the last shard merges
    for name in ("ilsvrc_submission.txt", "evaluation.json", "per_class.txt"):
        assert (out / name).read_bytes() == (ilsvrc_run / name).read_bytes()


def test_resume_after_an_interrupted_run_equals_the_uninterrupted_run(data, ilsvrc_run, tmp_path, capsys,
                                                                      monkeypatch):
    import detector.dataset_runner as runner

    write_chunk = runner.write_chunk
    written = []

    def killed_after_two(path, results):
        if len(written) == 2:
            path.with_name(f".{path.name}.x.tmp").write_bytes(b"half a part")  # what a kill mid-write leaves
            raise KeyboardInterrupt
        written.append(path)
        write_chunk(path, results)

    monkeypatch.setattr(runner, "write_chunk", killed_after_two)
    out = tmp_path / "resumed"
    assert run_tool(main, ilsvrc_argv(data, out)) == 130
    assert len(list((out / "parts").glob("chunk-*.npz"))) == 2
    monkeypatch.setattr(runner, "write_chunk", write_chunk)
    assert run_tool(main, ilsvrc_argv(data, out)) == 0
    assert "4 images, 2 already done, 2 detected" in capsys.readouterr().err
    for name in ("ilsvrc_submission.txt", "evaluation.json"):
        assert (out / name).read_bytes() == (ilsvrc_run / name).read_bytes()


def test_rerun_into_the_same_out_says_it_replaces_the_evaluation(data, ilsvrc_run, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(ilsvrc_run, out)
    assert run_tool(main, ilsvrc_argv(data, out)) == 0  # the same settings: a resume, then a new evaluation
    err = capsys.readouterr().err
    assert "already done" in err and "replaces evaluation.json" in err


@pytest.mark.slow  # two processes importing torch: 7 s on the idle 2-core machine, 25-35 s when busy
def test_torchrun_two_ranks_merge_to_the_single_run(data, ilsvrc_run, tmp_path):
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0",
           str(ROOT / "tools" / "benchmark_map.py"), *ilsvrc_argv(data, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shard 0/2" in proc.stderr and "shard 1/2" in proc.stderr
    assert proc.stdout.count("mean AP") == 1  # rank 0 alone merges and evaluates
    for name in ("ilsvrc_submission.txt", "evaluation.json"):
        assert (out / name).read_bytes() == (ilsvrc_run / name).read_bytes()


@pytest.mark.parametrize("change, message", [
    (["--predictions", "x.txt"], "not both"),
    (["--shard", "2/2"], "0 <= K < N"),
    (["--proposals", "no-such-store"], "no proposal store here"),
    (["--dataset", "coco"], "for the model but 'black-rook' in the dataset"),  # chess ids are other classes
])
def test_bad_input_is_one_line(data, tmp_path, capsys, change, message):
    argv = ilsvrc_argv(data, tmp_path)
    if change[0] == "--dataset":
        argv = coco_argv(data, data, tmp_path)
        argv[argv.index("--model") + 1] = str(data / "ilsvrc_model")
    elif change[0] in argv:
        argv[argv.index(change[0]) + 1] = change[1]
    else:
        argv += change
    assert run_tool(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_voc_layout(data, bccd, tmp_path, capsys):
    """--dataset voc on three BCCD photos: the written VOC lines score as the detections in memory."""
    from detector.data import read_voc
    from detector.evaluation import evaluate_voc, read_voc_predictions

    root = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    names = (bccd / "ImageSets" / "Main" / "test.txt").read_text().split()[:3]
    for name in names:
        shutil.copy(bccd / "Annotations" / f"{name}.xml", root / "Annotations")
        shutil.copy(bccd / "JPEGImages" / f"{name}.jpg", root / "JPEGImages")
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(names) + "\n")
    dataset = read_voc(root, "test")
    entries = [ImageProposals(r.file_name, r.image_size, encode_boxes(shifted_proposals(r.gt_boxes), r.image_size))
               for r in dataset.records]
    write_part(tmp_path / "store" / "p.pstore", entries, {"method": "test-shifted-gt"})
    torch.manual_seed(0)
    config = ClassifierConfig(num_classes=dataset.vocab.num_classes, input_size=64)
    post = PostprocessConfig(score_threshold=0.0, nms_iou=1.0, max_detections=1000)
    save_checkpoint(tmp_path / "voc_model", RegionClassifier(config).state_dict(),
                    make_checkpoint_config(config, dataset.vocab, postprocess=post))
    out = tmp_path / "out"
    argv = ["--model", str(tmp_path / "voc_model"), "--dataset", "voc", "--annotations", str(root),
            "--proposals", str(tmp_path / "store"), "--out", str(out), "--precision", "fp32", "--workers", "0",
            "--quiet"]
    assert run_tool(main, argv) == 0
    in_memory = collect_parts(out / "parts", dataset, chunk_size=32)
    from_file = evaluate_voc(dataset, read_voc_predictions(out / "voc_detections.txt", dataset))
    direct = evaluate_voc(dataset, in_memory.detections)
    assert from_file.ap == direct.ap and direct.mAP > 0
    assert json.loads((out / "evaluation.json").read_text())["mAP"] == direct.mAP


def test_other_settings_in_the_same_out_are_refused(data, ilsvrc_run, capsys):
    assert run_tool(main, ilsvrc_argv(data, ilsvrc_run, "--threshold", "0.5")) == 2
    err = capsys.readouterr().err
    assert "other settings (postprocess.score_threshold 0.0 there, 0.5 now)" in err and err.count("\n") == 1


def test_model_of_other_classes_is_refused(data, tmp_path, capsys):
    argv = ilsvrc_argv(data, tmp_path)
    argv[argv.index("--model") + 1] = str(data / "chess_model")  # COCO chess ids 1..13 are other DET classes
    assert run_tool(main, argv) == 2
    assert "is 'bishop' for the model but" in capsys.readouterr().err
