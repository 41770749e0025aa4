"""Exact resume on the CPU: a run interrupted after its checkpoint at iteration k and resumed with
``resume=`` logs the same losses and ends with the same weights as the uninterrupted run."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from detector.base.errors import UserError
from detector.training.engine import EngineConfig, train
from detector.training.schedule import ScheduleConfig
from detector.training.state import load_train_state, state_digest

pytestmark = pytest.mark.numeric  # trains: a resumed run's losses and weights compared with the uninterrupted run's (select with -m numeric)


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


def run(out_dir, iterations=12, crash_at=None, resume=None, resume_key=None, report=lambda s: None,
        source=None, loss=loss_fn, warn=None):
    torch.manual_seed(0)
    model = TinyNet()
    # num_workers=0: the synthetic sources simulate a kill inside batch(), in this process
    config = EngineConfig(out_dir=str(out_dir), checkpoint_every=5, log_every=1, progress=False, seed=7,
                          num_workers=0,
                          schedule=ScheduleConfig(base_lr=0.1, iterations=iterations, warmup_iters=3, kind="cosine"))
    train(model, source or SyntheticSource(crash_at), loss, config, model_config={"name": "tiny"},
          resume_key=resume_key or {"model": "tiny"}, resume=resume, report=report, warn=warn)
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
    # issue 18: never torch's advice to load with weights_only=False (it runs the file's code); what the
    # README promises instead
    for content in (b"not a checkpoint", None):
        if content is None:  # a pickle of an object a state never holds
            torch.save({"format": "googlenet-detection/train-state", "x": TinyNet}, bad)
        else:
            bad.write_bytes(content)
        with pytest.raises(UserError, match="not a readable training state") as err:
            load_train_state(bad)
        message = str(err.value)
        assert "\n" not in message and "weights_only" not in message and "trusted" not in message, message
        assert message.endswith("nothing was written: restore the file, or start a new run from the run's "
                                "last.safetensors (--init-checkpoint)"), message
    with pytest.raises(UserError, match="does not exist"):
        load_train_state(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------------
# damaged state and logs: refused in one line, or a torn log line dropped with a warning


def files_of(folder):
    """Every file of a run folder with its bytes and modification time: to show nothing was written."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def test_garbled_state_that_still_loads_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", crash_at=7)
    path = tmp_path / "cut" / "last.state.pt"
    state = torch.load(path, weights_only=True)
    state["model"]["body.0.weight"][0, 0, 0, 0] = 8e21  # the case: a readable file, absurd weights
    torch.save(state, path)
    before = files_of(tmp_path / "cut")
    with pytest.raises(UserError, match="damaged .*does not match its sha256") as err:
        run(tmp_path / "cut", resume=tmp_path / "cut")
    assert "\n" not in str(err.value)
    assert files_of(tmp_path / "cut") == before


def test_every_flipped_byte_of_the_state_is_refused_or_changes_nothing(tmp_path):
    run(tmp_path / "a", iterations=5)
    path = tmp_path / "a" / "last.state.pt"
    good = path.read_bytes()
    expect = load_train_state(path)
    refused = 0
    for at in range(0, len(good), max(1, len(good) // 400)):  # about 400 places over the whole file
        data = bytearray(good)
        data[at] ^= 0xFF
        path.write_bytes(bytes(data))
        try:
            got = load_train_state(path)
        except UserError as err:
            assert "\n" not in str(err)
            refused += 1
            continue
        assert state_digest(got) == state_digest(expect), f"byte {at} flipped: trained on changed data"
    assert refused > 0
    for cut in (len(good) // 2, len(good) - 1, 10):
        path.write_bytes(good[:cut])
        with pytest.raises(UserError, match="not a readable training state"):
            load_train_state(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_even_with_a_matching_checksum(tmp_path, value):
    run(tmp_path / "a", iterations=5)
    path = tmp_path / "a" / "last.state.pt"
    state = torch.load(path, weights_only=True)
    del state["sha256"]
    state["model"]["body.6.weight"][1, 2] = value
    state["sha256"] = state_digest(state)
    torch.save(state, path)
    with pytest.raises(UserError, match="NaN or infinity, e.g. model.body.6.weight"):
        load_train_state(path)
    # A state of the first version (no checksum) is read with a warning, and checked for finite weights.
    del state["sha256"]
    torch.save(state, path)
    notes = []
    with pytest.raises(UserError, match="NaN or infinity"):
        load_train_state(path, report=notes.append)
    assert notes and "no checksum" in notes[0]


class PoisonedSource(SyntheticSource):
    def batch(self, iteration: int):
        return {**super().batch(iteration), "poison": iteration == 9}


def poisoning_loss(model, batch):
    loss, parts = loss_fn(model, batch)
    if batch["poison"]:  # iteration 9 (the last before the checkpoint at 10) leaves an infinite bias
        with torch.no_grad():
            model.body[6].bias.fill_(float("inf"))
    return loss, parts


def test_non_finite_weights_never_replace_the_last_good_state(tmp_path):
    with pytest.raises(UserError, match="NaN or infinity at iteration 10.*last good checkpoint .*is kept"):
        run(tmp_path / "a", iterations=12, source=PoisonedSource(), loss=poisoning_loss)
    state = load_train_state(tmp_path / "a")
    assert state["iteration"] == 5


def nan_loss_at(step: int):
    """A loss that is NaN at the ``step``-th step (1-based, as metrics.jsonl and the messages count)."""
    def loss(model, batch):
        value, parts = loss_fn(model, batch)
        return (value * float("nan") if batch["iteration"] == step - 1 else value), parts

    return loss


class CountingSource(SyntheticSource):
    def batch(self, iteration: int):
        return {**super().batch(iteration), "iteration": iteration}


def test_a_nan_loss_is_one_line_and_the_last_good_checkpoint_is_kept(tmp_path, capsys):
    # issue 18: a NaN loss mid-run (--lr 1e4) was a RuntimeError with a 22-line traceback, on resume too
    from detector.base.cli import run_tool

    out = tmp_path / "a"

    def tool(argv):
        run(out, iterations=12, source=CountingSource(), loss=nan_loss_at(8), resume=argv[0] if argv else None)

    assert run_tool(tool, []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: training diverged: the loss is nan at iteration 8; the last good checkpoint in "
                          f"'{out}' (iteration 5) is kept; lower the learning rate (--lr) or check the data"), err
    assert load_train_state(out)["iteration"] == 5  # kept, and nothing newer written
    kept = files_of(out)
    # the same on resume: iterations 6 and 7 again, then the same line
    assert run_tool(tool, [str(out)]) == 2
    assert capsys.readouterr().err == err
    assert load_train_state(out)["iteration"] == 5
    assert {k: v for k, v in files_of(out).items() if k != "metrics.jsonl"} == {
        k: v for k, v in kept.items() if k != "metrics.jsonl"}
    # before any checkpoint: says that none was written
    with pytest.raises(UserError, match="at iteration 3; no checkpoint was written to"):
        run(tmp_path / "b", iterations=12, source=CountingSource(), loss=nan_loss_at(3))


@pytest.mark.slow  # about 16 s on 2 busy cores: two real (tiny) runs of the tool
def test_train_detector_with_a_huge_learning_rate_is_one_line_on_a_run_and_on_resume(chess, tmp_path, capsys):
    # the case: train_detector.py --lr 1e4 diverges in a few iterations (whichever comes first: a
    # NaN loss, or NaN weights at a checkpoint): one line, exit 2, the last good checkpoint kept; the same
    # on --resume. Which iteration depends on the CPU's arithmetic: the test reads the kept one from the file.
    from test_train_tool import subset_json

    from detector.apps import train_detector
    from detector.base.cli import run_tool

    train = subset_json(chess, "valid", 1, tmp_path / "train")
    out = tmp_path / "run"
    argv = ["--train", str(train), "--out", str(out), "--workers", "0", "--lr", "1e4", "--warmup-iters", "0",
            "--input-size", "48", "--iterations", "8", "--regions-per-batch", "8", "--checkpoint-every", "2",
            "--log-every", "1", "--eval-max-proposals", "16", "--max-proposals", "200", "--threads", "1",
            "--no-progress", "--proposal-options", '{"max_side": 200}']
    lines = []
    for extra in ([], ["--resume", str(out)]):
        assert run_tool(train_detector.main, argv + extra) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert err.startswith("error: training diverged: the ") and " at iteration " in err, err
        assert err.endswith("; lower the learning rate (--lr) or check the data\n"), err
        lines.append(err)
        if not (out / "last.state.pt").exists():  # diverged before the first checkpoint: nothing to resume
            assert "no checkpoint was written" in err
            return
        assert f"the last good checkpoint in '{out}' (iteration {load_train_state(out)['iteration']}) is kept" in err
    assert lines[0] == lines[1]  # the resume diverges where the run did, and says the same


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", crash_at=7)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    torn_line = len(metrics.read_text().splitlines()) + 1
    with open(metrics, "a") as f:
        f.write('{"iteration": 7, "lr": 0.09, "lo')  # killed in the middle of an append
    run(tmp_path / "cut", resume=tmp_path / "cut", report=print)
    captured = capsys.readouterr()  # the warning on stderr (issue 18: it went to stdout), nothing on stdout
    assert f"metrics.jsonl:{torn_line}: dropped a torn last line" in captured.err, captured
    assert "torn" not in captured.out
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    # A damaged line that is not the last is not a torn append: one line naming it.
    lines = metrics.read_text().splitlines()
    lines[3] = lines[3][:10]
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="metrics.jsonl:4: not a JSON record"):
        run(tmp_path / "cut", resume=tmp_path / "cut")


def test_a_settings_group_an_older_state_lacks_is_reported_not_refused(tmp_path):
    run(tmp_path / "a", iterations=5, resume_key={"model": "tiny"})
    notes = []
    run(tmp_path / "a", iterations=6, resume=tmp_path / "a", warn=notes.append,
        resume_key={"model": "tiny", "proposals": {"method": "ss-fast"}})
    assert any("does not record the proposals settings" in n for n in notes)
    # ... but once recorded, another value is refused like any other setting.
    with pytest.raises(UserError, match="proposals.method: 'ss-fast' in the file, 'ss-quality' now"):
        run(tmp_path / "a", iterations=7, resume=tmp_path / "a",
            resume_key={"model": "tiny", "proposals": {"method": "ss-quality"}})


KILLED_RUN = """
import importlib.util, sys, time
import torch
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("resume_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)

class Slow(module.SyntheticSource):
    def batch(self, iteration):
        time.sleep(0.1)
        return super().batch(iteration)

module.run(sys.argv[2], source=Slow())
"""


def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    full = run(tmp_path / "full")
    out = tmp_path / "killed"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, __file__, str(out)], cwd=root,
                            env=dict(os.environ, PYTHONPATH=str(root)), stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (out / "last.state.pt").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # just after the checkpoint at iteration 5, while training goes on
    assert proc.wait() == -signal.SIGKILL
    assert load_train_state(out)["iteration"] in (5, 10)  # 10 only if this process stalled half a second
    resumed = run(out, resume=out)
    assert losses(out) == losses(tmp_path / "full")
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list(out.glob(".*tmp*"))


KILLED_WRITER = """
import sys, time
from detector.base.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"x" * 100000)  # the first part of a state
        f.flush()
        print("writing", flush=True)
        time.sleep(600)  # killed here
"""


def test_what_a_killed_state_writer_left_is_removed_by_a_rerun_or_resume(tmp_path, capsys):
    # issue 18: a kill while last.state.pt is written left .last.state.pt.*.tmp.pt (31 MB) for good
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from detector.training.state import clean_run_folder

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "a"
    run(out, iterations=5)

    def kill_a_writer():
        proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out / "last.state.pt")], cwd=root,
                                env=dict(os.environ, PYTHONPATH=str(root)), stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "writing\n"
        left = list(out.glob(".last.state.pt.*.tmp.pt"))
        assert len(left) == 1
        assert clean_run_folder(out) == [] and left[0].exists()  # a live writer's file is kept
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert left[0].exists()  # what the kill leaves
        return left[0]

    left = kill_a_writer()
    capsys.readouterr()
    run(out, iterations=6, resume=out)  # a resume removes it, and says so on stderr
    assert not left.exists() and not list(out.glob(".*tmp*"))
    assert f"removed 1 temporary files a killed run left in '{out}' ({left.name})" in capsys.readouterr().err
    assert load_train_state(out)["iteration"] == 6
    left = kill_a_writer()
    run(out, iterations=5)  # so does a new run in the same folder
    assert not left.exists() and not list(out.glob(".*tmp*"))


class SlowSource(SyntheticSource):
    """Each batch takes 50 ms: a 12-iteration run takes at least 0.6 s."""

    def batch(self, iteration: int):
        import time

        time.sleep(0.05)
        return super().batch(iteration)


def test_a_time_budget_stops_early_saves_and_resumes_to_the_planned_end(tmp_path):
    import time

    torch.manual_seed(0)
    model = TinyNet()
    config = EngineConfig(out_dir=str(tmp_path / "run"), checkpoint_every=0, log_every=50, progress=False, seed=7,
                          num_workers=0, stop_at=time.time() + 0.2,  # passed after about 4 of 12 iterations
                          schedule=ScheduleConfig(base_lr=0.1, iterations=12, warmup_iters=3, kind="cosine"))
    lines = []
    result = train(model, SlowSource(), loss_fn, config, model_config={"name": "tiny"},
                   resume_key={"model": "tiny"}, report=lines.append)
    # the stop is after the first iteration that passes stop_at: at least 1, fewer than 12 (each takes >= 50 ms)
    assert 1 <= result.iterations < 12
    assert any("time budget: stopped at iteration" in line for line in lines), lines
    assert load_train_state(tmp_path / "run")["iteration"] == result.iterations  # saved where it stopped
    # a resume without a deadline runs the rest of the schedule, to the planned 12
    run(tmp_path / "run", resume=tmp_path / "run", source=SlowSource())
    assert load_train_state(tmp_path / "run")["iteration"] == 12
