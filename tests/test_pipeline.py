"""The Detector end to end on a real chess photo, with small randomly initialized checkpoints made here
(never shipped): its output against the stages run by hand, ensembles, proposal sources, precision."""

import numpy as np
import pytest
import torch

import detector.pipeline as pipeline
from detector.base.checkpoint import make_checkpoint_config, save_checkpoint
from detector.base.errors import UserError
from detector.base.io import load_image
from detector.base.vocab import Vocabulary
from detector.box_coder import BoxCoder
from detector.classifier import ClassifierConfig, RegionClassifier
from detector.data import read_coco
from detector.pipeline import Detector, load_detector
from detector.postprocess import PostprocessConfig, postprocess
from detector.warp import warp_regions

SIZE = 64  # tiny crops keep the random GoogLeNet fast on 2 cores


def make_checkpoint(path, vocab, seed, favourite=None, input_size=SIZE):
    """A random classifier. An untrained trunk's features are almost zero in eval mode, so the heads'
    biases are drawn too (giving every model its own outputs); ``favourite`` (a label) gets a large
    logit bias, so every region is confidently that class and detections survive a 0.5 threshold."""
    torch.manual_seed(seed)
    config = ClassifierConfig(num_classes=vocab.num_classes, input_size=input_size)
    model = RegionClassifier(config)
    with torch.no_grad():
        model.cls_score.bias.normal_(0, 1)
        model.bbox_pred.bias.normal_(0, 0.5)
        if favourite is not None:
            model.cls_score.bias[favourite] = 8.0
    meta = make_checkpoint_config(config, vocab, proposals={"method": "ss-fast", "max_proposals": 300},
                                  training={"note": "random weights made by tests/test_pipeline.py"})
    save_checkpoint(path, model.state_dict(), meta)
    return path


@pytest.fixture(scope="module")
def chess_scene(chess):
    dataset = read_coco(chess / "test" / "_annotations.coco.json")
    record = dataset[0]
    image = load_image(dataset.image_path(record))
    rng = np.random.default_rng(0)
    gt = record.gt_boxes
    # proposals: the pieces' boxes, each also jittered by up to 10% of its size
    jitter = gt + rng.uniform(-0.1, 0.1, gt.shape) * np.tile(gt[:, 2:] - gt[:, :2], 2)
    boxes = np.concatenate([gt, jitter]).astype(np.float32)
    return image, boxes, dataset.vocab


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, chess_scene):
    vocab = chess_scene[2]
    folder = tmp_path_factory.mktemp("models")
    return [make_checkpoint(folder / f"random{i}", vocab, seed=i, favourite=3) for i in range(2)]


def test_detections_match_the_stages_run_by_hand(chess_scene, checkpoints):
    image, boxes, vocab = chess_scene
    det = Detector.from_checkpoint(checkpoints[0], device="cpu", precision="fp32", score_threshold=0.0,
                                   batch_size=16)
    out = det(image, proposals=boxes)
    # the same stages, one call each, no batching
    model = det.models[0]
    crops = warp_regions(image, boxes, SIZE, model.config.context)
    with torch.inference_mode():
        raw = model(crops)
    probs = raw.class_logits.softmax(1)
    class_boxes = BoxCoder().decode(raw.box_deltas, torch.from_numpy(boxes))
    ref = postprocess(probs, class_boxes, image.shape[:2], PostprocessConfig(score_threshold=0.0))
    assert len(out) == len(ref.scores) > 0
    np.testing.assert_allclose(out.scores, ref.scores.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(out.labels, ref.labels.numpy())
    np.testing.assert_allclose(out.boxes, ref.boxes.numpy(), atol=1e-2)
    assert out.class_names == tuple(vocab.names[label - 1] for label in out.labels)
    np.testing.assert_array_equal(out.class_ids, [vocab.ids[label - 1] for label in out.labels])


def test_end_to_end_detections_are_well_formed(chess_scene, checkpoints):
    image, boxes, vocab = chess_scene
    det = Detector.from_checkpoint(checkpoints[0], device="cpu", score_threshold=0.5, max_detections=5)
    out = det(image, proposals=boxes)
    h, w = image.shape[:2]
    assert out.image_size == (h, w)
    assert 1 <= len(out) <= 5
    assert set(out.labels.tolist()) == {3}  # the favoured class, confident everywhere
    assert np.all(np.diff(out.scores) <= 0) and np.all(out.scores >= 0.5)
    assert np.all(out.boxes[:, :2] >= 0) and np.all(out.boxes[:, 2] <= w) and np.all(out.boxes[:, 3] <= h)
    assert np.all(out.boxes[:, 2:] > out.boxes[:, :2])
    assert {"proposals", "warp", "classify", "postprocess", "total"} <= set(out.timings)
    assert out.timings["total"] >= out.timings["classify"] > 0
    records = out.to_records()
    assert records[0]["label"] == vocab.names[2] and len(records[0]["box"]) == 4


def test_ensemble_averages_probabilities_and_deltas(chess_scene, checkpoints):
    image, boxes, _ = chess_scene
    kwargs = {"device": "cpu", "precision": "fp32"}
    singles = [Detector.from_checkpoint(p, **kwargs) for p in checkpoints]
    ensemble = Detector.from_checkpoint(checkpoints, **kwargs)
    t = torch.from_numpy(boxes[:12])
    (p0, d0), (p1, d1) = (s.classify(image, t) for s in singles)
    pe, de = ensemble.classify(image, t)
    torch.testing.assert_close(pe, (p0 + p1) / 2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(de, (d0 + d1) / 2, rtol=1e-5, atol=1e-7)
    # two different networks, so averaging means something
    assert (p0 - p1).abs().max() > 1e-3 and (d0 - d1).abs().max() > 1e-2


def test_ensemble_of_different_vocabularies_refused(tmp_path, checkpoints):
    other = make_checkpoint(tmp_path / "other", Vocabulary(ids=(1, 2), names=("a", "b")), seed=5)
    with pytest.raises(UserError, match="ensemble"):
        Detector.from_checkpoint([checkpoints[0], other], device="cpu")


def test_bf16_close_to_fp32(chess_scene, checkpoints):
    image, boxes, _ = chess_scene
    t = torch.from_numpy(boxes[:8])
    p32, _ = Detector.from_checkpoint(checkpoints[0], device="cpu", precision="fp32").classify(image, t)
    p16, _ = Detector.from_checkpoint(checkpoints[0], device="cpu", precision="bf16").classify(image, t)
    assert (p32 - p16).abs().max() < 0.05  # bf16 keeps 8 bits of mantissa


def test_proposal_sources(chess_scene, checkpoints):
    image, boxes, _ = chess_scene
    store = {"board.jpg": (boxes[:5], None)}  # anything indexable by image name, like ProposalStore
    det = Detector.from_checkpoint(checkpoints[0], device="cpu", proposals=store, score_threshold=0.0)
    assert len(det.propose(image, image_name="photos/board.jpg")) == 5  # found by file name
    with pytest.raises(UserError, match="no proposals for .*precompute"):
        det(image, image_name="other.jpg")
    capped = Detector.from_checkpoint(checkpoints[0], device="cpu", max_proposals=7)
    assert len(capped.propose(image, boxes)) == 7
    # the checkpoint's method (fast selective search), made cheap by working on a 160-pixel copy
    det = Detector.from_checkpoint(checkpoints[0], device="cpu", proposal_options={"max_side": 160},
                                   max_proposals=40)
    found = det.propose(image)
    assert 0 < len(found) <= 40 and found.dtype == torch.float32
    assert torch.all(found[:, 2:] > found[:, :2])


def test_no_default_model(monkeypatch, tmp_path):
    monkeypatch.setattr(pipeline, "DEFAULT_MODEL", tmp_path / "default_detector")
    assert pipeline.default_model() is None
    with pytest.raises(UserError, match="no model is installed"):
        load_detector()


def test_bad_settings(checkpoints):
    with pytest.raises(UserError, match="precision"):
        Detector.from_checkpoint(checkpoints[0], device="cpu", precision="fp8")
    with pytest.raises(UserError, match="device"):
        Detector.from_checkpoint(checkpoints[0], device="tpu")
    with pytest.raises(UserError, match="score_threshold"):
        Detector.from_checkpoint(checkpoints[0], device="cpu", score_threshold=2.0)


def test_real_proposal_store(tmp_path, chess_scene, checkpoints):
    from proposals.store import ImageProposals, encode_boxes, write_part

    image, boxes, _ = chess_scene
    h, w = image.shape[:2]
    write_part(tmp_path / "store" / "part0.pstore",
               [ImageProposals(name="board.jpg", image_size=(h, w), boxes=encode_boxes(boxes[:6], (h, w))),
                ImageProposals(name="small.jpg", image_size=(h // 2, w // 2),
                               boxes=encode_boxes(boxes[:6] / 2, (h // 2, w // 2)))],
               meta={"method": "test"})
    from proposals import ProposalStore

    det = Detector.from_checkpoint(checkpoints[0], device="cpu", proposals=ProposalStore(tmp_path / "store"))
    found = det.propose(image, image_name="board.jpg")
    np.testing.assert_allclose(found.numpy(), boxes[:6], atol=0.1)  # stored as 1/65535ths of the size
    with pytest.raises(UserError, match="recompute"):  # proposals made for another image size
        det.propose(image, image_name="small.jpg")
