"""Exact resume on the CPU: a run interrupted after its checkpoint at iteration k and resumed with
``resume=`` logs the same losses and ends with the same weights as the uninterrupted run."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from detector.errors import UserError
from detector.training.engine import EngineConfig, load_train_state, train
from detector.training.schedule import ScheduleConfig


class TinyNet(nn.Module):
    """A small classifier with dropout, so the torch random stream matters."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.5), nn.Linear(16, 3))

    def forward(self, x):
        return self.body(x)


class SyntheticSource:
    """Batches as a pure function of the iteration; ``crash_at`` simulates a killed run."""

    def __init__(self, crash_at: int | None = None):
        self.crash_at = crash_at

    def batch(self, iteration: int):
        if iteration == self.crash_at:
            raise KeyboardInterrupt
        g = torch.Generator().manual_seed(1000 + iteration)
        return {"x": torch.randn(6, 3, 8, 8, generator=g), "y": torch.randint(0, 3, (6,), generator=g)}


def loss_fn(model, batch):
    # python's and numpy's global streams are used too, so their states must be restored as well
    scale = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
    loss = nn.functional.cross_entropy(model(batch["x"]) * scale, batch["y"])
    return loss, {}


def run(out_dir, iterations=12, crash_at=None, resume=None, resume_key=None):
    torch.manual_seed(0)
    model = TinyNet()
    config = EngineConfig(out_dir=str(out_dir), checkpoint_every=5, log_every=1, progress=False, seed=7,
                          schedule=ScheduleConfig(base_lr=0.1, iterations=iterations, warmup_iters=3, kind="cosine"))
    train(model, SyntheticSource(crash_at), loss_fn, config, model_config={"name": "tiny"},
          resume_key=resume_key or {"model": "tiny"}, resume=resume, report=lambda s: None)
    return model


def losses(out_dir):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["iteration"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", crash_at=7)  # checkpoints at 5; iterations 5 and 6 are done then lost
    state = load_train_state(tmp_path / "cut")
    assert state["iteration"] == 5
    resumed = run(tmp_path / "cut", resume=tmp_path / "cut")
    reference = losses(tmp_path / "full")
    assert [i for i, _ in reference] == list(range(1, 13))
    assert losses(tmp_path / "cut") == reference  # bit-for-bit the same losses, none logged twice
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "cut" / "curves.png").stat().st_size > 0
    assert (tmp_path / "cut" / "last.safetensors").exists() and (tmp_path / "cut" / "last.json").exists()


def test_resume_with_another_configuration_is_refused(tmp_path):
    run(tmp_path / "a", iterations=5)
    with pytest.raises(UserError, match="different configuration.*input_size"):
        run(tmp_path / "a", iterations=5, resume=tmp_path / "a", resume_key={"model": "tiny", "input_size": 112})


def test_resume_from_a_bad_file_is_a_user_error(tmp_path):
    bad = tmp_path / "last.state.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable training state"):
        load_train_state(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_train_state(tmp_path / "missing")
