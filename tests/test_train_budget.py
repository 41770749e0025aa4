"""gdet-train's transfer across vocabularies, time budget and --nproc (issue 19), on a few real BCCD photos
(blood cells, 3 classes) and the shipped chess model: the plan as arithmetic, the transfer in memory, a
tiny budget run and the launcher's one-line errors as processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detector.base.checkpoint import DEFAULT_MODEL, load_checkpoint
from detector.training.budget import (
    Measured,
    Plan,
    held_out_images,
    parse_duration,
    plan_stages,
    plan_table,
    replan_iterations,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TOOL = PROJECT_ROOT / "tools" / "train_detector.py"
BCCD_CLASSES = ("Platelets", "RBC", "WBC")


@pytest.fixture(scope="session")
def bccd(shared_data) -> Path:
    return shared_data / "bccd"


def voc_subset(bccd: Path, count: int, out: Path) -> Path:
    """A VOC folder with the first ``count`` trainval images of BCCD, linked."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    names = (bccd / "ImageSets" / "Main" / "trainval.txt").read_text().split()[:count]
    for name in names:
        (out / "Annotations" / f"{name}.xml").symlink_to(bccd / "Annotations" / f"{name}.xml")
        (out / "JPEGImages" / f"{name}.jpg").symlink_to(bccd / "JPEGImages" / f"{name}.jpg")
    (out / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(names) + "\n")
    return out


def run_tool(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=PROJECT_ROOT, env={**os.environ, **(env or {})})


# ----------------------------------------------------------------------------------------------------
# the plan (no torch)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("1.5h", 5400), ("45", 45), (" 2m ", 120)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0m", "-5m", "3q", "m", "nan", "1e3s"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_held_out_images():
    assert held_out_images(39) == 0  # too few to spare any
    assert held_out_images(40) == 5  # the floor
    assert held_out_images(292) == 12  # BCCD trainval: the cap (292 // 20 = 14)
    assert held_out_images(10_000) == 12


def test_a_30_minute_budget_plans_two_stages_that_fill_it():
    # 1.5 it/s at 64 px, 0.75 at 96 px, 60 s / 90 s per evaluation, 30 s of warm-up already spent:
    # left = 0.95 * (1800 - 30) - 30 = 1651.5 s; minus both evaluations, 1501.5 s of training;
    # 60 % at 64 px: 900.9 s * 1.5 = 1351 iterations; 40 % at 96 px: 600.6 s * 0.75 = 450 iterations
    measured = Measured({64: 1.5, 96: 0.75}, {64: 60.0, 96: 90.0}, warmup_s=30.0)
    stages, notes = plan_stages(1800, measured)
    assert [(s.input_size, s.iterations) for s in stages] == [(64, 1351), (96, 450)]
    assert notes == ()
    plan = Plan(1800, stages, 12, 280, "detector/resources/default_detector", 2, 64, measured, notes)
    assert plan.train_s + measured.warmup_s <= 1800  # the plan fits the budget
    table = plan_table(plan)
    for expected in ("time budget         30.0 min (proposals not counted)",
                     "weights start from  detector/resources/default_detector",
                     "crop size           64 px then 96 px (fine-tune from the first stage)",
                     "iterations          1,351 + 450 (2 processes x 64 regions each)",
                     "held-out images     12 (choose the checkpoint)",
                     "measured speed      1.50 it/s at 64 px, 0.75 it/s at 96 px (warm-up 30 s)"):
        assert expected in table, table
    assert table.startswith("training plan\n---")


def test_a_short_budget_plans_one_stage_and_explicit_options_win():
    measured = Measured({64: 1.5, 96: 0.75}, {64: 60.0, 96: 90.0}, warmup_s=30.0)
    stages, notes = plan_stages(300, measured)  # two stages would give 64 px 90 iterations: one stage
    assert [(s.input_size, s.iterations) for s in stages] == [(64, int((0.95 * 270 - 30 - 60) * 1.5))]
    assert "one stage" in notes[0]
    stages, _ = plan_stages(1800, Measured({96: 0.75}, {96: 90.0}, 30.0), (96,), fixed_size=96)
    assert [s.input_size for s in stages] == [96]  # --input-size: one stage at that size
    stages, notes = plan_stages(1800, measured, fixed_iterations=777)
    assert [(s.input_size, s.iterations) for s in stages] == [(64, 777)] and "--iterations" in notes[0]
    stages, _ = plan_stages(300, measured, fixed_stages=2)  # --stages 2 even when short
    assert [s.input_size for s in stages] == [64, 96]
    # a crowded machine: the warm-up had no time left to measure 96 px, so one stage at 64
    crowded, notes = plan_stages(1800, Measured({64: 1.5}, {64: 60.0}, 30.0))
    assert [s.input_size for s in crowded] == [64] and "no time to measure 96 px" in notes[0]
    with pytest.raises(ValueError, match="larger --time-budget"):
        plan_stages(40, measured)
    # a later stage is planned again from the time left and the speed reached
    assert replan_iterations(stages[1], 600, 0.5, 90).iterations == int((0.95 * 600 - 30 - 90) * 0.5)


# ----------------------------------------------------------------------------------------------------
# transfer across vocabularies


def test_transfer_from_the_default_model_into_three_classes():
    from detector.classifier import ClassifierConfig, RegionClassifier
    from detector.training.rcnn import load_init_checkpoint

    torch.manual_seed(0)
    model = RegionClassifier(ClassifierConfig(num_classes=3, input_size=64))
    heads_before = model.cls_score.weight.detach().clone()
    line = load_init_checkpoint(model, DEFAULT_MODEL, BCCD_CLASSES)
    assert line.count("\n") == 0 and line.startswith("transfer: trunk initialized from")
    assert "13 other classes" in line and "new for the 3 classes here: bbox_pred, cls_score" in line
    shipped, _ = load_checkpoint(DEFAULT_MODEL)
    state = model.state_dict()
    trunk = [k for k in shipped if k.startswith("trunk.")]
    assert len(trunk) > 300
    for k in trunk:  # the trunk is the shipped model's (stored as float16)
        assert torch.equal(state[k], shipped[k].to(state[k].dtype)), k
    # the class-specific heads are new: 3 + 1 outputs, 4 * 3 deltas, their fresh initialization
    assert model.cls_score.weight.shape == (4, 1024) and model.bbox_pred.weight.shape == (12, 1024)
    assert torch.equal(model.cls_score.weight, heads_before)
    # the model runs at 64 px although the trunk was trained at 96 (global average pooling)
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 64, 64))
    assert out.class_logits.shape == (2, 4)


def test_init_checkpoint_with_the_same_classes_loads_every_layer(tmp_path):
    from detector.classifier import ClassifierConfig, RegionClassifier
    from detector.training.rcnn import load_init_checkpoint

    shipped, config = load_checkpoint(DEFAULT_MODEL)
    model = RegionClassifier(ClassifierConfig(num_classes=13, input_size=64))
    line = load_init_checkpoint(model, DEFAULT_MODEL, tuple(config["classes"]["names"]))
    assert "same 13 classes, every layer" in line
    assert torch.equal(model.cls_score.weight, shipped["cls_score.weight"].float())


def test_training_refuses_a_model_made_for_another_crop_size(tmp_path):
    """A model whose settings say 224 px, trained on 64 px crops, would be evaluated at 224 px during
    training (12x the work per held-out image, at a scale it never saw; a budget run once chose its
    checkpoint that way): ``train_model`` refuses it before any work."""
    from detector.classifier import ClassifierConfig, RegionClassifier
    from detector.training.engine import EngineConfig
    from detector.training.rcnn import DetectorTrainConfig, train_model

    config = DetectorTrainConfig(train="unused", val=None, out_dir=str(tmp_path),
                                 classifier=ClassifierConfig(num_classes=3, input_size=64),
                                 engine=EngineConfig(out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="not the run's"):
        train_model(config, None, RegionClassifier(ClassifierConfig(num_classes=3, input_size=224)))

# ----------------------------------------------------------------------------------------------------
# the tool


TINY = ["--regions-per-batch", "8", "--max-proposals", "200", "--eval-max-proposals", "30",
        "--proposal-options", '{"max_side": 200}', "--threads", "1", "--workers", "0", "--no-progress"]


@pytest.mark.slow  # about 3 min on 2 busy cores: a real budget run (warm-up, plan, stages, best)
def test_a_budget_run_ends_within_its_budget_and_leaves_a_detector(bccd, tmp_path):
    data = voc_subset(bccd, 10, tmp_path / "bccd10")
    out = tmp_path / "run"
    budget = 120
    result = run_tool("--train", data, "--out", out, "--time-budget", f"{budget}s", "--hold-out", "2",
                      "--nproc", "1", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    # one plan table at the start, the transfer line, the proposals shown apart
    assert text.count("training plan") == 1 and "held-out images     2 (choose the checkpoint)" in text
    assert "crop size           64 px" in text  # then 96 px when the machine is fast enough
    assert "transfer: trunk initialized from" in text and "new for the 3 classes here" in text
    assert "not counted in the budget" in text
    plan = json.loads((out / "plan.json").read_text())
    assert plan["train_s"] <= budget + 15, plan  # within the budget, with a margin for a busy machine
    assert [s["input_size"] for s in plan["stages"]] in ([64], [64, 96])
    assert plan["init"].endswith("default_detector") and plan["held_out"] == 2
    for name in ("best.safetensors", "best.json", "last.safetensors", "stage1-64px/metrics.jsonl"):
        assert (out / name).is_file(), name
    config = json.loads((out / "best.json").read_text())
    assert tuple(config["classes"]["names"]) == BCCD_CLASSES and config["training"]["held_out_images"] == 2
    # options the budget leaves alone (measured on BCCD: no gain at 30 minutes, TRAINING.md)
    assert config["training"]["sampler"]["fg_balance"] == "none" and config["postprocess"]["box_voting"] == 0.0

    from detector.pipeline import Detector

    detector = Detector.from_checkpoint(out / "best", device="cpu")  # what gdet-detect --model RUN/best loads
    image = next((data / "JPEGImages").glob("*.jpg"))
    detections = detector(str(image))
    assert detections.boxes.shape[1] == 4


def test_nproc_with_a_bad_argument_is_one_line_once(tmp_path):
    # checked once, before any process is started
    result = run_tool("--train", tmp_path / "nope", "--out", tmp_path / "run", "--nproc", "2")
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    result = run_tool("--train", tmp_path / "nope", "--out", tmp_path / "run", "--nproc", "0")
    assert result.returncode == 2 and result.stderr.count("\n") == 1


def test_an_error_inside_the_launched_processes_is_one_line_once(bccd, tmp_path):
    # a proposal store that lacks the images is found by every process after the launch: rank 0 prints
    # it, every process returns 2, the launcher passes the code on without a traceback
    import numpy as np

    from proposals.store import ImageProposals, write_part

    data = voc_subset(bccd, 2, tmp_path / "bccd2")
    store = tmp_path / "store"
    write_part(store / "a.pstore", [ImageProposals("other.jpg", (10, 10), np.zeros((1, 4), np.uint16))],
               {"method": "ss-fast", "options": {"max_side": 200}})
    result = run_tool("--train", data, "--out", tmp_path / "run", "--proposal-store", store, "--nproc", "2",
                      "--iterations", "1", *TINY, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lacks 2 of the 2 images" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr


@pytest.mark.parametrize("rank, lines", [("0", 1), ("1", 0)])
def test_under_torchrun_only_rank_0_prints_a_user_error(tmp_path, rank, lines):
    env = {"RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": rank}
    result = run_tool("--train", tmp_path / "nope", "--out", tmp_path / "run", env=env)
    assert result.returncode == 2  # every rank exits with the code
    assert result.stderr.count("error:") == lines and "Traceback" not in result.stderr
