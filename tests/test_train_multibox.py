"""Training MultiBox end to end on real chess photos, its batches, and gdet-train-multibox / gdet-priors
(detector/apps/train_multibox.py, make_priors.py)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.apps import make_priors
from detector.data import read_coco
from detector.training.engine import EngineConfig
from detector.training.multibox import train_multibox
from detector.training.multibox_data import BatchConfig, MultiBoxBatches, ResizedImages
from detector.training.schedule import ScheduleConfig
from proposals.multibox import MultiBox, MultiBoxConfig, load_multibox, match
from proposals.priors import kmeans_priors, normalized_gt_boxes

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(input_size=64, trunk_end="inception3b", head_channels=8, head_grid=2, head_hidden=32, dropout=0.0)


def _few_chess_images(chess, n: int):
    dataset = read_coco(chess / "train" / "_annotations.coco.json")
    dataset.records = dataset.records[:n]
    return dataset


def _subset_json(chess, tmp_path: Path, n: int) -> Path:
    """A COCO file of the first n chess train images (the photos stay where they are)."""
    data = json.loads((chess / "train" / "_annotations.coco.json").read_text())
    data["images"] = data["images"][:n]
    ids = {img["id"] for img in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    path = tmp_path / "few.json"
    path.write_text(json.dumps(data))
    return path


def test_batches_are_a_function_of_the_iteration_and_ranks_read_different_images(chess):
    images = ResizedImages(_few_chess_images(chess, 5), 32, progress=False)
    config = BatchConfig(batch_size=3, flip=True, seed=7)
    a = MultiBoxBatches(images, config).batch(4)
    b = MultiBoxBatches(images, config).batch(4)  # a fresh source: nothing carried over
    torch.testing.assert_close(a["images"], b["images"])
    for x, y in zip(a["boxes"], b["boxes"]):
        torch.testing.assert_close(x, y)
    assert a["images"].shape == (3, 32, 32, 3) and a["images"].dtype == torch.uint8
    # two processes: iteration 0 of rank 0 and rank 1 take slots 0-2 and 3-5 of one permutation of 5
    # images, so they share at most the one image of slot 5 (the next epoch's first)
    r0 = MultiBoxBatches(images, config, rank=0, world_size=2).batch(0)
    r1 = MultiBoxBatches(images, config, rank=1, world_size=2).batch(0)
    order = np.random.default_rng([7, 0]).permutation(5)
    expected_r0 = [images.get(int(order[i]))[0] for i in range(3)]
    for got, image in zip(r0["images"].numpy(), expected_r0):
        assert np.array_equal(got, image) or np.array_equal(got, image[:, ::-1])
    assert not torch.equal(r0["images"], r1["images"])


def test_flipped_boxes_follow_the_flipped_image(chess):
    # With flips on, every box of a flipped image must be the mirror (x -> 1 - x) of the original box.
    images = ResizedImages(_few_chess_images(chess, 3), 32, progress=False)
    source = MultiBoxBatches(images, BatchConfig(batch_size=3, flip=True, seed=0))
    flipped_seen = 0
    for it in range(4):
        batch = source.batch(it)
        for image, boxes in zip(batch["images"].numpy(), batch["boxes"]):
            for i in range(len(images)):
                original, gt = images.get(i)
                if np.array_equal(image, original[:, ::-1]) and not np.array_equal(image, original):
                    mirrored = np.stack([1 - gt[:, 2], gt[:, 1], 1 - gt[:, 0], gt[:, 3]], axis=1)
                    np.testing.assert_allclose(boxes.numpy(), mirrored, atol=1e-6)
                    flipped_seen += 1
    assert flipped_seen > 0


@pytest.fixture
def deterministic():
    """fp32 training with fixed seeds, one thread and torch's deterministic algorithms: the same run on one
    machine every time. It cannot make two CPUs agree (AVX-512, AVX2 and SSE kernels sum in different
    orders), which is why the assertions below hold by margins, not by figures measured on one machine."""
    threads, was_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # a small model on a shared 2-core machine: one thread is the fastest
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    yield
    torch.use_deterministic_algorithms(was_deterministic)
    torch.set_num_threads(threads)


def _constant_confidence_floor(gt_per_image: list[int], num_priors: int) -> float:
    """The lowest confidence loss (nats per image) of a network that gives every prior of every image the
    same confidence: with p the fraction of (image, prior) pairs matched to ground truth, that constant is
    p and the loss is num_priors * H(p). Each box gets its own prior while there are enough priors."""
    matched = sum(min(g, num_priors) for g in gt_per_image)
    p = matched / (num_priors * len(gt_per_image))
    return -num_priors * (p * np.log(p) + (1 - p) * np.log(1 - p))


@pytest.mark.numeric
def test_training_on_a_few_chess_photos_lowers_the_loss(chess, tmp_path, deterministic):
    # Six real photos at 64 px, a small trunk, 100 iterations of the 6 images in fp32: the network must fit
    # them. Ground truth is matched to the priors (the rule of the shipped chess model, see
    # docs/MULTIBOX.md), with the default alpha. Each assertion is a margin that any correct arithmetic
    # clears by far, never a figure measured on one CPU: training a network is chaotic, and the kernels of
    # two CPUs (AVX-512, AVX2, SSE; Intel, AMD) take it along different paths. After 25 iterations, where
    # this test stopped before, the confidence gap below was 0.017, 0.128 or 0.515 depending on the
    # kernels; after 100 the six photos are learned by heart, whichever path training took.
    dataset = _few_chess_images(chess, 6)
    images = ResizedImages(dataset, 64, progress=False)
    boxes = normalized_gt_boxes(dataset.records)
    priors = kmeans_priors(boxes, 40, seed=0)
    config = MultiBoxConfig(num_priors=40, match_to_priors=True, **TINY)
    model = MultiBox(config, priors, expected_per_image=len(boxes) / 6)
    model_before = copy.deepcopy(model)
    engine = EngineConfig(out_dir=str(tmp_path / "run"), schedule=ScheduleConfig(base_lr=0.02, iterations=100,
                          warmup_iters=3, kind="constant"), checkpoint_every=0, log_every=1, progress=False,
                          weight_decay=0.0, grad_clip=10.0, precision="fp32", num_workers=0)
    train_multibox(model, images, BatchConfig(batch_size=6, flip=False, seed=0), engine, report=lambda *_: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 100
    # The loss: a network that learned nothing about where the pieces are (one confidence for every prior,
    # the best such, and perfect boxes) cannot go below the floor (26.6 nats per image on these photos, 92
    # of 240 priors matched); the untrained network starts at it (its bias is that constant). The last 5
    # iterations must average below a fifth of it. Measured with AVX-512, AVX2 and SSE kernels: 0.15, 0.003
    # and 0.02 nats, i.e. 0.6% of the floor or less: a margin of 30 times; a wrong gradient, a loss that
    # only learns the bias, or a loop that does not step stays at the floor.
    floor = _constant_confidence_floor([len(r.gt_boxes) for r in dataset.records], 40)
    assert 26 < floor < 27 and 26 < np.mean(losses[:5]) < 27.5, (floor, losses[:5])
    assert np.mean(losses[-5:]) < 0.2 * floor, (floor, losses)
    # The written checkpoint is a MultiBox checkpoint, and its confidences learned which priors hold the
    # pieces: on these photos, the priors that prior matching assigns to a piece score higher than the
    # others. The untrained network scores them all alike (gap 0.00001); a network that learned the photos
    # scores matched priors near 1 and the others near 0 (gap 1 at most). Measured with AVX-512, AVX2 and
    # SSE kernels: 0.966, 0.9995, 0.9985; the bound of 0.5 leaves a margin of 0.46 to every one of them,
    # and no network that did not tell the priors apart reaches it.
    trained = load_multibox(tmp_path / "run" / "last.safetensors")
    gap_before, gap_after = _confidence_gap(model_before, images), _confidence_gap(trained, images)
    assert abs(gap_before) < 0.05 and gap_after > 0.5, (gap_before, gap_after)


def _confidence_gap(model: MultiBox, images: ResizedImages) -> float:
    """Mean sigmoid confidence of the priors matched to ground truth minus that of the others."""
    model.eval()
    gaps = []
    with torch.no_grad():
        for i in range(len(images)):
            image, gt = images.get(i)
            scores = torch.sigmoid(model(model.preprocess([image])).logits[0])
            rows, _ = match(model.prior_boxes(), None, torch.from_numpy(gt))
            positive = torch.zeros(len(scores), dtype=torch.bool)
            positive[torch.from_numpy(rows)] = True
            if positive.all() or not positive.any():
                continue
            gaps.append(float(scores[positive].mean() - scores[~positive].mean()))
    return float(np.mean(gaps))


@pytest.mark.numeric
def test_tool_trains_exports_and_refuses_bad_input(chess, tmp_path):
    annotations = _subset_json(chess, tmp_path, 3)
    cmd = [sys.executable, str(ROOT / "tools" / "train_multibox.py"), "--annotations", str(annotations),
           "--image-root", str(chess / "train"), "--val-annotations", str(annotations),
           "--val-image-root", str(chess / "train"), "--num-priors", "10", "--input-size", "64",
           "--trunk-end", "inception3b", "--head-channels", "8", "--head-grid", "2", "--head-hidden", "16",
           "--iterations", "4", "--batch-size", "2", "--warmup-iters", "0", "--eval-every", "2",
           "--checkpoint-every", "2", "--threads", "1", "--no-progress", "--out", str(tmp_path / "run"),
           "--export", str(tmp_path / "exported"), "--half"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["iterations"] == 4 and summary["best_iteration"] in (2, 4)
    for name in ("last.safetensors", "last.json", "best.safetensors", "metrics.jsonl", "last.state.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    exported = load_multibox(tmp_path / "exported.json")
    assert exported.config.num_priors == 10 and exported.config.input_size == 64
    assert json.loads((tmp_path / "exported.json").read_text())["training"]["iteration"] == summary["best_iteration"]
    # the exported weights are float16 on disk; the priors stay float32
    from safetensors import safe_open

    with safe_open(str(tmp_path / "exported.safetensors"), "pt") as f:
        assert f.get_tensor("priors").dtype == torch.float32
        assert f.get_tensor("out.weight").dtype == torch.float16

    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "train_multibox.py"), "--annotations",
                          str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("k", [5])
def test_make_priors_tool_is_deterministic(chess, tmp_path, k):
    annotations = _subset_json(chess, tmp_path, 4)
    outs = []
    for name in ("a.json", "b.json"):
        assert make_priors.main(["--annotations", str(annotations), "--k", str(k), "--out", str(tmp_path / name)]) == 0
        outs.append((tmp_path / name).read_text())
    assert outs[0] == outs[1]
    from proposals.priors import load_priors

    assert load_priors(tmp_path / "a.json").shape == (k, 4)
