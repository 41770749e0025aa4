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


@pytest.mark.numeric
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


@pytest.mark.numeric
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
    # two different networks, so averaging means something (measured 0.0032 and 1.8 with AVX-512, AVX2 and SSE
    # kernels alike: the gap comes from the two seeds' weights, not from rounding)
    assert (p0 - p1).abs().max() > 1e-3 and (d0 - d1).abs().max() > 1e-2


def test_ensemble_of_different_vocabularies_refused(tmp_path, checkpoints):
    other = make_checkpoint(tmp_path / "other", Vocabulary(ids=(1, 2), names=("a", "b")), seed=5)
    with pytest.raises(UserError, match="ensemble"):
        Detector.from_checkpoint([checkpoints[0], other], device="cpu")


@pytest.mark.numeric
def test_bf16_close_to_fp32(chess_scene, checkpoints):
    image, boxes, _ = chess_scene
    t = torch.from_numpy(boxes[:8])
    p32, _ = Detector.from_checkpoint(checkpoints[0], device="cpu", precision="fp32").classify(image, t)
    p16, _ = Detector.from_checkpoint(checkpoints[0], device="cpu", precision="bf16").classify(image, t)
    assert (p32 - p16).abs().max() < 0.05  # bf16 keeps 8 bits of mantissa; measured 1.4e-5 (AVX-512, AVX2, SSE)


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


@pytest.mark.numeric
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


# -- one engine: batches across images, shared pyramids, relabelling, proposals from a pool ------------------

@pytest.fixture(scope="module")
def two_photos(chess):
    """Two chess photos with hand-made proposals (the pieces, jittered), and the vocabulary."""
    dataset = read_coco(chess / "test" / "_annotations.coco.json")
    rng = np.random.default_rng(1)
    images, boxes = [], []
    for record in dataset.records[3:5]:
        images.append(load_image(dataset.image_path(record)))
        gt = record.gt_boxes
        jitter = gt + rng.uniform(-0.1, 0.1, gt.shape) * np.tile(gt[:, 2:] - gt[:, :2], 2)
        boxes.append(np.concatenate([gt, jitter, gt * 0.9]).astype(np.float32))
    return images, boxes, dataset.vocab


def assert_same_detections(got, expected, atol=1e-3):
    assert len(got) == len(expected)
    np.testing.assert_array_equal(got.labels, expected.labels)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.boxes, expected.boxes, atol=atol)
    assert got.class_names == expected.class_names
    np.testing.assert_array_equal(got.class_ids, expected.class_ids)


@pytest.mark.numeric
def test_detect_batch_equals_one_call_per_image(two_photos, checkpoints):
    images, boxes, _ = two_photos
    # batches of 8 crops: the photos' crops share forward passes across the image boundary
    det = Detector.from_checkpoint(checkpoints, device="cpu", precision="fp32", score_threshold=0.0, batch_size=8)
    together = det.detect_batch(images, boxes)
    for image, b, got in zip(images, boxes, together):
        assert_same_detections(got, det(image, proposals=b))
        assert got.image_size == image.shape[:2] and got.timings["classify"] > 0


def test_an_ensemble_shares_one_pyramid_per_input_setting(two_photos, checkpoints, tmp_path, monkeypatch):
    images, boxes, vocab = two_photos
    built = []
    original = pipeline.image_pyramid
    monkeypatch.setattr(pipeline, "image_pyramid", lambda *a, **k: (built.append(a[2]), original(*a, **k))[1])
    same = Detector.from_checkpoint(checkpoints, device="cpu", precision="fp32")  # two models, 64 px both
    same.detect_batch(images, boxes)
    assert built == [SIZE, SIZE]  # one pyramid per image, not one per model and image
    built.clear()
    other = make_checkpoint(tmp_path / "big", vocab, seed=7, input_size=80)
    mixed = Detector.from_checkpoint([checkpoints[0], other, checkpoints[1]], device="cpu", precision="fp32")
    mixed(images[0], proposals=boxes[0])
    assert sorted(built) == [SIZE, 80]  # two input settings: two pyramids, the 64 px one shared by two models


def test_relabelled_detections_keep_labels_names_and_ids_together(two_photos, checkpoints):
    from detector.base.vocab import Vocabulary
    from detector.pipeline import Detections

    images, boxes, vocab = two_photos
    det = Detector.from_checkpoint(checkpoints[0], device="cpu", score_threshold=0.0, max_detections=30)
    found = det(images[0], proposals=boxes[0])
    # the dataset lists the same classes (same ids, same names) in reverse order
    order = list(reversed(range(vocab.num_classes)))
    dataset_vocab = Vocabulary(ids=tuple(vocab.ids[i] for i in order), names=tuple(vocab.names[i] for i in order))
    moved = found.relabel(pipeline.label_map(det.vocabulary, dataset_vocab), dataset_vocab)
    assert len(moved) == len(found) > 0
    np.testing.assert_array_equal(moved.labels, vocab.num_classes + 1 - found.labels)  # reversed order
    np.testing.assert_array_equal(moved.class_ids, found.class_ids)  # the same classes
    assert moved.class_names == found.class_names
    for label, name, cid in zip(moved.labels, moved.class_names, moved.class_ids):
        assert dataset_vocab.names[label - 1] == name and dataset_vocab.ids[label - 1] == cid
    # ImageNet-style vocabularies match by wnid; the dataset's names replace the model's
    model = Vocabulary(ids=(7, 3), names=("tv", "car"), wnids=("n04404412", "n02958343"))
    data = Vocabulary(ids=(3, 5, 7), names=("automobile", "dog", "tvmonitor"), wnids=("n02958343", "n1", "n04404412"))
    dets = Detections(boxes=np.zeros((3, 4), np.float32), scores=np.array([0.9, 0.8, 0.7], np.float32),
                      labels=np.array([2, 1, 2]), class_names=("car", "tv", "car"), class_ids=np.array([3, 7, 3]),
                      image_size=(10, 10))
    moved = dets.relabel(pipeline.label_map(model, data), data)
    np.testing.assert_array_equal(moved.labels, [1, 3, 1])
    assert moved.class_names == ("automobile", "tvmonitor", "automobile")
    np.testing.assert_array_equal(moved.class_ids, [3, 7, 3])
    with pytest.raises(UserError, match="class id 7 is 'n04404412' for the model but 'n1'"):
        pipeline.label_map(model, Vocabulary(ids=(3, 7), names=("a", "b"), wnids=("n02958343", "n1")))


def test_proposals_from_the_process_pool_equal_those_computed_here(two_photos, checkpoints):
    from detector.proposal_source import proposal_stream

    images, _, _ = two_photos
    kwargs = {"device": "cpu", "precision": "fp32", "score_threshold": 0.0, "max_proposals": 30,
              "proposal_options": {"max_side": 160}}  # fast selective search on a 160-pixel copy
    here = Detector.from_checkpoint(checkpoints[0], workers=0, **kwargs).detect_batch(images)
    pooled_detector = Detector.from_checkpoint(checkpoints[0], workers=1, **kwargs)
    pooled = pooled_detector.detect_batch(images)  # two images to compute: a spawned process computes them
    for got, expected in zip(pooled, here):
        assert_same_detections(got, expected, atol=0)
        assert got.timings["proposals"] > 0
    outcomes = list(proposal_stream([images[0], None], pooled_detector.proposals, workers=1))
    np.testing.assert_array_equal(outcomes[0].value, pooled_detector.source_proposals(images[0]))
    assert outcomes[1].ok and outcomes[1].value is None  # None: nothing to compute
    # the detector's pool is kept: a second call (even of one image) runs in the same processes, with no
    # new start; close() stops them and a later call starts a new pool
    pool = pooled_detector._proposal_pool
    assert pool.started  # the first call started it (the proposals above came from its process)
    workers_before = set(pool.executor._processes)
    again = pooled_detector.detect_batch(images[:1])
    assert_same_detections(again[0], here[0], atol=0)
    assert pooled_detector._proposal_pool is pool and set(pool.executor._processes) == workers_before
    pooled_detector.close()
    assert not pool.started and pooled_detector._proposal_pool is None


def test_a_kept_worker_pool_serves_several_jobs_and_restarts_after_close():
    from detector.base.pool import THREADS, WorkerPool, imap_outcomes

    with WorkerPool(2, THREADS) as pool:
        first = [o.value for o in imap_outcomes(abs, [-1, -2, 3], keep=pool)]
        executor = pool.executor
        second = [o.value for o in imap_outcomes(abs, [-4], keep=pool)]
        assert pool.executor is executor  # the same threads served both jobs
        # a job stopped early (a consumer that breaks off) leaves the pool usable for the next one
        for _ in imap_outcomes(abs, range(-50, 0), keep=pool):
            break
        assert [o.value for o in imap_outcomes(abs, [-5], keep=pool)] == [5]
    assert (first, second) == ([1, 2, 3], [4]) and not pool.started
    assert [o.value for o in imap_outcomes(abs, [-6], keep=pool)] == [6] and pool.started  # started anew
    pool.close()


@pytest.mark.numeric
def test_the_stream_reports_bad_images_in_order_and_goes_on(two_photos, checkpoints, tmp_path):
    images, boxes, _ = two_photos
    store = {"a.jpg": boxes[0], "c.jpg": boxes[1]}  # no proposals for b.jpg
    det = Detector.from_checkpoint(checkpoints[0], device="cpu", proposals=store, batch_size=4)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    items = [(0, images[0], None, "a.jpg"), (1, images[1], None, "b.jpg"), (2, tmp_path / "broken.jpg", None, "x"),
             (3, images[1], None, "c.jpg")]
    out = list(det.detect_stream(items, errors="return"))
    assert [key for key, _ in out] == [0, 1, 2, 3]
    assert isinstance(out[1][1], UserError) and "no proposals for 'b.jpg'" in str(out[1][1])
    assert isinstance(out[2][1], UserError)
    assert_same_detections(out[3][1], det(images[1], proposals=boxes[1]))
    with pytest.raises(UserError, match="b.jpg"):
        list(det.detect_stream(items))


def test_one_store_lookup_name_basename_stem_then_id(chess_scene, checkpoints):
    from detector.proposal_source import ProposalSettings, source_proposals

    image, boxes, _ = chess_scene
    store = {"board": boxes[:3], "17": boxes[:4]}
    settings = ProposalSettings(source=store)
    assert len(source_proposals(image, settings, "photos/board.jpg", image_id=17)) == 3  # the stem first
    assert len(source_proposals(image, settings, "photos/other.jpg", image_id=17)) == 4  # then the image id
    with pytest.raises(UserError, match="no proposals for 'x.jpg'"):
        source_proposals(image, settings, "x.jpg", image_id=18)


def test_compile_is_accepted_on_the_cpu(checkpoints):
    det = Detector.from_checkpoint(checkpoints[0], device="cpu", compile=True)  # compiles on the first batch
    assert det.compiled and all(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in det.models)
    assert det.models[0].config.input_size == SIZE  # the wrapper forwards the classifier's attributes


@pytest.mark.slow  # 25-40 s on 2 shared cores: dynamo traces GoogLeNet
@pytest.mark.numeric
def test_compiled_network_gives_the_same_detections(chess_scene, checkpoints):
    image, boxes, _ = chess_scene
    kwargs = {"device": "cpu", "precision": "fp32", "score_threshold": 0.0, "batch_size": 16}
    plain = Detector.from_checkpoint(checkpoints[0], **kwargs)
    compiled = Detector.from_checkpoint(checkpoints[0], compile="eager", **kwargs)  # traced, no code generated
    # 2 x 7 = 14 proposals: a partial batch, padded to 16 so that one shape compiles
    assert_same_detections(compiled(image, proposals=boxes), plain(image, proposals=boxes))


def test_wrong_names_and_counts_are_one_line_errors(checkpoints):
    from detector.device import resolve_device, resolve_precision

    cases = [(lambda: resolve_precision("half", torch.device("cpu")), "unknown precision 'half'; use one of auto"),
             (lambda: resolve_device("tpu"), "unknown device 'tpu'"),
             (lambda: Detector.from_checkpoint(checkpoints[0], device="cpu", max_proposals=0), "max proposals must be >= 1"),
             (lambda: Detector.from_checkpoint(checkpoints[0], device="cpu", batch_size=0), "batch size must be >= 1"),
             (lambda: Detector.from_checkpoint(checkpoints[0], device="cpu", workers=-1), "workers must be >= 0")]
    if not torch.cuda.is_available():
        cases.append((lambda: resolve_device("cuda"), "CUDA is not available here"))
    for make, message in cases:
        with pytest.raises(UserError) as err:
            make()
        assert message in str(err.value) and "\n" not in str(err.value)
