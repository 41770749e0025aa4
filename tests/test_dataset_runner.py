"""The engine's batches across images (Detector.detect_batch, detect_stream) and detector/dataset_runner.py:
shards, chunks, resume,
unreadable images, the parts on disk. Real chess photos, small random checkpoints made here (never shipped)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from detector.base.checkpoint import make_checkpoint_config, save_checkpoint
from detector.base.errors import UserError
from detector.base.io import load_image
from detector.base.jobs import Shard
from detector.base.vocab import Vocabulary, ilsvrc_det_vocabulary
from detector.classifier import ClassifierConfig, RegionClassifier
from detector.data import read_coco
from detector.data.records import Dataset, ImageRecord
from detector.dataset_runner import (
    RunConfig,
    chunk_path,
    claim_parts_folder,
    collect_parts,
    read_chunk,
    run_detection,
    run_settings,
    wait_for_parts,
    write_chunk,
)
from detector.pipeline import Detections, Detector, label_map
from detector.postprocess import PostprocessConfig

RECORDS = (1, 3, 4, 10)  # chess/test photos with 1, 1, 7 and 1 pieces


def random_checkpoint(path, vocab, seed, input_size=64):
    """Random weights whose scores differ between regions (Kaiming-initialized convolutions keep the
    activations from vanishing); every (region, class) pair kept."""
    torch.manual_seed(seed)
    config = ClassifierConfig(num_classes=vocab.num_classes, input_size=input_size)
    model = RegionClassifier(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    post = PostprocessConfig(score_threshold=0.0, nms_iou=0.5, max_detections=50)
    save_checkpoint(path, model.state_dict(), make_checkpoint_config(config, vocab, postprocess=post))
    return path


@pytest.fixture(scope="module")
def scene(chess, tmp_path_factory):
    """Four chess photos, proposals per image (jittered pieces and random boxes), two checkpoints."""
    source = read_coco(chess / "test" / "_annotations.coco.json")
    records = [source.records[i] for i in RECORDS]
    rng = np.random.default_rng(0)
    proposals = {}
    for rec, count in zip(records, (30, 0, 45, 7)):  # 0: an image without proposals
        h, w = rec.image_size
        corners = rng.uniform(0, [w, h], (count, 2))
        sizes = rng.uniform(40, 400, (count, 2))
        boxes = np.concatenate([corners, corners + sizes], axis=1)
        boxes[: len(rec.gt_boxes)] = rec.gt_boxes[:count] + rng.uniform(-8, 8, (min(count, len(rec.gt_boxes)), 4))
        proposals[rec.file_name] = boxes.astype(np.float32)
    folder = tmp_path_factory.mktemp("runner_models")
    models = [random_checkpoint(folder / "a", source.vocab, 0), random_checkpoint(folder / "b", source.vocab, 1, 80)]
    dataset = Dataset(records=records, vocab=source.vocab, image_root=source.image_root, name="chess-4")
    return dataset, proposals, models


def make_detector(models, proposals, batch_size=16):
    return Detector.from_checkpoint(models, device="cpu", precision="fp32", batch_size=batch_size,
                                    proposals=proposals)


@pytest.mark.numeric
def test_batches_across_images_give_the_per_image_detections(scene):
    dataset, proposals, models = scene
    detector = make_detector(models, proposals)  # an ensemble of two input sizes, batches of 16
    images = [load_image(dataset.image_path(r)) for r in dataset.records]
    boxes = [proposals[r.file_name] for r in dataset.records]
    batched = detector.detect_batch(images, boxes)
    for image, b, got in zip(images, boxes, batched):
        expected = detector(image, proposals=b)
        assert len(got) == len(expected) == min(50, 13 * len(b))
        np.testing.assert_array_equal(got.labels, expected.labels)
        np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got.boxes, expected.boxes, atol=1e-3)


def test_the_stream_keeps_batches_full_and_order(scene):
    dataset, proposals, models = scene
    detector = make_detector(models[:1], proposals)
    sizes = []
    original = detector.models[0].forward
    detector.models[0].forward = lambda crops: (sizes.append(len(crops)), original(crops))[1]
    items = ((i, load_image(dataset.image_path(rec)), None, rec.file_name) for i, rec in enumerate(dataset.records))
    finished = list(detector.detect_stream(items))
    assert [key for key, _ in finished] == [0, 1, 2, 3]  # submission order
    assert sizes == [16] * 5 + [2]  # 30 + 0 + 45 + 7 = 82 crops: five full batches across images, one partial
    for _, dets in finished:
        assert set(dets.timings) == {"proposals", "warp", "classify", "postprocess", "total"}


def test_labels_map_by_class_id_and_other_classes_are_refused():
    det = ilsvrc_det_vocabulary()
    picked = (3, 50, 200)
    model = Vocabulary(ids=picked, names=tuple(det.names[c - 1] for c in picked),
                       wnids=tuple(det.wnids[c - 1] for c in picked))
    np.testing.assert_array_equal(label_map(model, det), [0, 3, 50, 200])  # DET id c is label c
    wrong = Vocabulary(ids=(3, 50), names=("x", "y"), wnids=(det.wnids[2], det.wnids[0]))
    with pytest.raises(UserError, match="class id 50 is 'n"):
        label_map(wrong, det)
    with pytest.raises(UserError, match="class 201"):
        label_map(Vocabulary(ids=(201,), names=("z",)), det)


def test_a_part_reads_back_exactly_and_bad_parts_are_refused(scene, tmp_path):
    dataset = scene[0]
    rng = np.random.default_rng(1)
    dets = Detections(boxes=rng.uniform(0, 500, (5, 4)).astype(np.float32), scores=rng.random(5).astype(np.float32),
                      labels=np.array([1, 13, 2, 2, 7]), class_names=("",) * 5, class_ids=np.zeros(5, np.int64),
                      image_size=(10, 10))
    names = [r.file_name for r in dataset.records]
    write_chunk(tmp_path / "chunk-0000000.npz", [(0, names[0], dets, ""), (1, names[1], None, "unreadable: x")])
    rows = read_chunk(tmp_path / "chunk-0000000.npz", dataset)
    assert [(p, e) for p, _, e in rows] == [(0, ""), (1, "unreadable: x")]
    boxes, scores, labels = rows[0][1]
    assert boxes.dtype == np.float32 and np.array_equal(boxes, dets.boxes) and np.array_equal(scores, dets.scores)
    np.testing.assert_array_equal(labels, dets.labels)
    assert rows[1][1] is None
    write_chunk(tmp_path / "other.npz", [(0, "another.jpg", dets, "")])  # made for another image list
    with pytest.raises(UserError, match="another image list"):
        read_chunk(tmp_path / "other.npz", dataset)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="corrupt part file"):
        read_chunk(tmp_path / "bad.npz", dataset)


def test_shards_resume_and_unreadable_images(scene, tmp_path):
    dataset, proposals, models = scene
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a JPEG")
    records = list(dataset.records) + [ImageRecord(image_id=99, file_name=str(broken)),
                                       ImageRecord(image_id=98, file_name=str(tmp_path / "missing.jpg"))]
    data = Dataset(records=records, vocab=dataset.vocab, image_root=dataset.image_root, name="chess-6")
    detector = make_detector(models[:1], proposals)
    settings = run_settings(models[:1], detector, data, chunk_size=2)

    def run(out, shard=Shard(), workers=0):
        return run_detection(detector, data, claim_parts_folder(out, settings),
                             RunConfig(chunk_size=2, shard=shard, workers=workers), progress=False)

    single = run(tmp_path / "single", workers=1)
    assert (single.total, single.skipped, single.done, single.missing_chunks) == (6, 0, 6, [])
    assert set(single.failures) == {str(broken), str(tmp_path / "missing.jpg")}
    assert "no such file" in single.failures[str(tmp_path / "missing.jpg")]
    second = run(tmp_path / "sharded", shard=Shard(1, 2))  # chunk 1 of chunks 0, 1, 2
    assert (second.total, second.done, second.missing_chunks) == (2, 2, [0, 2])
    first = run(tmp_path / "sharded", shard=Shard(0, 2))
    assert (first.total, first.done, first.missing_chunks) == (4, 4, [])
    again = run(tmp_path / "sharded")  # a rerun of a complete folder does nothing
    assert (again.total, again.skipped, again.done) == (6, 6, 0)
    a = collect_parts(tmp_path / "single", data, 2)
    b = collect_parts(tmp_path / "sharded", data, 2)
    assert a.failures == b.failures and list(a.detections) == [r.image_id for r in dataset.records]
    for image_id, (boxes, scores, labels) in a.detections.items():  # workers=1 and workers=0, sharded or not
        for x, y in zip((boxes, scores, labels), b.detections[image_id]):
            assert np.array_equal(x, y)


def test_spawned_readers_computing_proposals_give_the_serial_parts(scene, tmp_path):
    # proposals computed on the fly: the readers are spawned processes (Selective Search holds the GIL)
    dataset, _, models = scene
    detector = Detector.from_checkpoint(models[:1], device="cpu", precision="fp32", batch_size=16,
                                        proposals="ss-fast", proposal_options={"max_side": 64}, max_proposals=40)
    settings = run_settings(models[:1], detector, dataset, chunk_size=2)
    parts = {}
    for workers in (0, 2):
        out = claim_parts_folder(tmp_path / f"w{workers}", settings)
        report = run_detection(detector, dataset, out, RunConfig(chunk_size=2, workers=workers), progress=False)
        assert (report.done, report.failures) == (4, {}) and report.timings["proposals"] > 0
        parts[workers] = [chunk_path(out, c).read_bytes() for c in range(2)]
    assert parts[0] == parts[2]


def test_failed_images_are_retried_with_retry_failed(scene, tmp_path):
    dataset, proposals, models = scene
    partial = {k: v for k, v in proposals.items() if k != dataset.records[2].file_name}
    out = claim_parts_folder(tmp_path, run_settings(models[:1], make_detector(models[:1], partial), dataset, 2))
    first = run_detection(make_detector(models[:1], partial), dataset, out, RunConfig(chunk_size=2, workers=0),
                          progress=False)
    assert list(first.failures) == [dataset.records[2].file_name]
    again = run_detection(make_detector(models[:1], proposals), dataset, out, RunConfig(chunk_size=2, workers=0),
                          progress=False)
    assert (again.done, list(again.failures)) == (0, [dataset.records[2].file_name])  # recorded: listed, not redone
    retried = run_detection(make_detector(models[:1], proposals), dataset, out,
                            RunConfig(chunk_size=2, workers=0, retry_failed=True), progress=False)
    assert (retried.skipped, retried.done, retried.failures) == (2, 2, {})  # the chunk holding it, redone whole
    assert dataset.records[2].image_id in collect_parts(out, dataset, 2).detections


def test_an_image_missing_from_the_store_is_recorded(scene, tmp_path):
    dataset, proposals, models = scene
    partial = {k: v for k, v in proposals.items() if k != dataset.records[2].file_name}
    detector = make_detector(models[:1], partial)
    out = claim_parts_folder(tmp_path, run_settings(models[:1], detector, dataset, 4))
    report = run_detection(detector, dataset, out, RunConfig(chunk_size=4, workers=0), progress=False)
    assert list(report.failures) == [dataset.records[2].file_name]
    assert "proposals: proposal store has no proposals" in report.failures[dataset.records[2].file_name]


def test_a_parts_folder_refuses_other_settings(scene, tmp_path):
    dataset, proposals, models = scene
    detector = make_detector(models[:1], proposals)
    claim_parts_folder(tmp_path, run_settings(models[:1], detector, dataset, 2))
    claim_parts_folder(tmp_path, run_settings(models[:1], detector, dataset, 2))  # the same: fine
    with pytest.raises(UserError, match=r"other settings \(chunk_size 2 there, 3 now\)"):
        claim_parts_folder(tmp_path, run_settings(models[:1], detector, dataset, 3))
    with pytest.raises(UserError, match=r"other settings \(models"):
        claim_parts_folder(tmp_path, run_settings(models, detector, dataset, 2))


def test_waiting_for_the_other_shards(scene, tmp_path):
    dataset = scene[0]  # 4 images, chunk size 2: chunks 0 and 1
    write_chunk(chunk_path(tmp_path, 0), [(0, dataset.records[0].file_name, None, "x"),
                                          (1, dataset.records[1].file_name, None, "x")])
    with pytest.raises(UserError, match="1 chunks still missing"):
        wait_for_parts(tmp_path, dataset, 2, poll_seconds=0.05, timeout=0.2, progress=False)
    late = threading.Timer(0.3, write_chunk, (chunk_path(tmp_path, 1), [(2, dataset.records[2].file_name, None, "x"),
                                                                      (3, dataset.records[3].file_name, None, "x")]))
    late.start()
    # no clock in the assertion (a loaded machine stretches any time): it waits while chunk 1 is missing
    # (the timeout above), returns once the late shard has written it (30 s would raise instead) and never
    # before, so the part is there when it does
    wait_for_parts(tmp_path, dataset, 2, poll_seconds=0.05, timeout=30, progress=False)
    assert chunk_path(tmp_path, 1).is_file()  # checked at once: an early return finds it missing
    late.join()
