"""A generic training loop: SGD with warm-up and decay, DDP under torchrun, AMP, exact resume.

The loop knows nothing about detection. It takes

- ``model``: an ``nn.Module``;
- ``source``: a :class:`BatchSource`, whose ``batch(iteration)`` returns the batch of this process for
  that iteration as a pure function of the iteration (its randomness seeded from it). The iteration is
  therefore the whole "sampler position", and a resumed run reads the same batches as an uninterrupted
  one, with any number of data-loading workers;
- ``loss_fn(model, batch) -> (loss, parts)``: the scalar loss to minimize and a dict of python floats
  to log.

It writes into ``out_dir`` (rank 0 only):

- ``last.safetensors`` + ``last.json``: the model (:func:`detector.base.checkpoint.save_checkpoint`), every
  ``checkpoint_every`` iterations and at the end; ``iter_NNNNNN.*`` snapshots too when ``keep_snapshots``;
- ``best.safetensors`` + ``best.json``: the model with the best evaluation metric so far;
- ``last.state.pt``: everything a resume needs (model, optimizer, iteration, random states, the
  configuration it must match), written with ``torch.save`` and read with ``weights_only=True``. It
  carries a sha256 of its content (:func:`state_digest`), checked before a resume uses anything: a
  damaged state, or one whose weights are not finite, is refused in one line and nothing is written.
  A state whose weights have become non-finite is never saved (the last good one is kept);
- ``metrics.jsonl``: one JSON object per logged iteration or evaluation, appended; a resume drops a
  torn last line (a kill while appending) with a warning. ``curves.png``: the loss and the evaluation
  metric against the iteration.

Every file is written to a temporary name and moved into place, so a crash never leaves half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from detector.base.checkpoint import save_checkpoint
from detector.base.errors import UserError
from detector.base.files import atomic_path, atomic_write
from detector.base.jobs import default_workers
from detector.training.distributed import DistContext, all_reduce_mean, barrier, broadcast_object
from detector.training.schedule import ScheduleConfig, learning_rate

STATE_FORMAT = "googlenet-detection/train-state"
STATE_VERSION = 2  # 2: with "sha256", the digest of the rest (1: none, still read)
_STATE_KEYS = ("iteration", "model", "optimizer", "rng")


class BatchSource(Protocol):
    """Batches as a pure function of the iteration (for this process's rank)."""

    def batch(self, iteration: int) -> Any: ...


@dataclass(frozen=True)
class EngineConfig:
    """How to train (the model, data and loss come separately).

    out_dir: where checkpoints, metrics and plots go.
    schedule: the learning-rate schedule, whose ``iterations`` is the length of the run.
    momentum, weight_decay: SGD's (GoogLeNet and R-CNN: 0.9 and 5e-4).
    checkpoint_every: iterations between checkpoints (0: only at the end).
    keep_snapshots: also keep each periodic checkpoint's model as ``iter_NNNNNN``.
    eval_every: iterations between evaluations (0: only at the end, when an evaluator is given).
    metric: the evaluation result that picks the best checkpoint (higher is better).
    log_every: iterations between lines of ``metrics.jsonl``.
    amp: ``"auto"`` (bf16 on a GPU that supports it, none on the CPU), ``"none"``, ``"bf16"`` or ``"fp16"``.
    grad_clip: clip the gradient norm to this value (0: no clipping).
    num_workers: data-loading processes, started with ``spawn`` (None: the usable cores but one, see
        :func:`detector.base.jobs.default_workers`; 0: load in the training process).
    seed: seeds python, numpy and torch before the first iteration.
    progress: show a progress bar (rank 0).
    """

    out_dir: str
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    checkpoint_every: int = 500
    keep_snapshots: bool = False
    eval_every: int = 0
    metric: str = "mAP"
    log_every: int = 20
    amp: str = "auto"
    grad_clip: float = 0.0
    num_workers: int | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.amp not in ("auto", "none", "bf16", "fp16"):
            raise ValueError(f"amp must be auto, none, bf16 or fp16, got {self.amp!r}")
        if self.checkpoint_every < 0 or self.eval_every < 0 or self.log_every < 1:
            raise ValueError("checkpoint_every and eval_every must be >= 0, log_every >= 1")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (or None: sized to the machine), got {self.num_workers}")


@dataclass
class TrainResult:
    iterations: int
    best_metric: float | None
    best_iteration: int | None
    seconds: float
    out_dir: Path


# ----------------------------------------------------------------------------------------------------
# random states and atomic files


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """python, numpy and torch (CPU and CUDA) random states, as types ``torch.load(weights_only=True)`` reads."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def state_digest(obj) -> str:
    """sha256 of a training state's content: every tensor's dtype, shape and bytes, every other value's
    type and repr, dict keys in sorted order; independent of how ``torch.save`` lays out the file."""
    h = hashlib.sha256()

    def feed(x) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=repr):
                feed(k)
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    feed(obj)
    return h.hexdigest()


def _non_finite(tensors) -> list[str]:
    """Names of the floating-point tensors of a ``{name: tensor}`` tree that hold NaN or infinity."""
    out = []

    def walk(x, name: str) -> None:
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                out.append(name)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{name}.{i}")

    walk(tensors, "")
    return out


def load_train_state(path: str | Path, report: Callable[[str], None] | None = None) -> dict:
    """Read a ``*.state.pt`` resume file (or the ``last.state.pt`` of a run directory) without unpickling
    code, and check it before anything uses it: its sha256 (a damaged file is refused, never trained
    on), the entries a resume needs, and finite weights and optimizer state. A state of the first
    version (no digest) is read with a note to ``report`` (default: a warning)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.state.pt"
    if not path.is_file():
        raise UserError(f"cannot resume: '{path}' does not exist; pass a run directory or its last.state.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to replace
        raise UserError(f"cannot resume from '{path}': not a readable training state ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); pass a last.state.pt written by "
                        "this tool") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"cannot resume from '{path}': not a training state of this project; pass a "
                        "last.state.pt written by tools/train_*.py")
    damaged = (f"cannot resume from '{path}': the training state is damaged ({{}}); nothing was written: restore "
               "the file, or start a new run from the run's last.safetensors")
    if "sha256" in state:
        saved = state.pop("sha256")
        if saved != state_digest(state):
            raise UserError(damaged.format("its content does not match its sha256"))
    else:
        note = (f"'{path}' has no checksum (written by an older version): it is checked for finite weights "
                "only")
        if report is not None:
            report(f"warning: {note}")
        else:
            warnings.warn(note, stacklevel=2)
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise UserError(damaged.format(f"no {', '.join(missing)}"))
    bad = _non_finite({"model": state["model"], "optimizer": state["optimizer"]})
    if bad:
        raise UserError(damaged.format(f"{len(bad)} tensors hold NaN or infinity, e.g. {bad[0]}"))
    return state


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Settings that differ between a saved run and now, as ``key: old in the file, new now``.

    Nested dicts are compared key by key, and a key absent on one side equals ``None`` on the other
    (so a setting added to the tool later, left at its ``None`` default, does not block a resume).
    """
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} in the file, {b!r} now")
    return out


# ----------------------------------------------------------------------------------------------------
# the loop


def _autocast(amp: str, device: torch.device):
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if amp == "none":
        return contextlib.nullcontext(), False
    if amp == "fp16" and device.type != "cuda":
        raise UserError("amp 'fp16' needs a GPU; use --amp bf16 or none on the CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype), amp == "fp16"


def to_device(batch, device: torch.device):
    """Move every tensor inside dicts, lists and tuples to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class _IterationDataset(torch.utils.data.Dataset):
    def __init__(self, source: BatchSource, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int):
        return self.source.batch(self.start + index)


def _batches(source: BatchSource, start: int, stop: int, num_workers: int | None):
    """The batches of iterations ``start .. stop - 1``, from ``num_workers`` spawned processes (None: sized
    to the machine) or this one (0). Spawned, never forked: a child forked while OpenMP's, OpenCV's or
    numba's threads run can deadlock; ``source`` is pickled to each worker once."""
    workers = default_workers() if num_workers is None else num_workers
    workers = min(workers, stop - start)
    if workers <= 0:
        for it in range(start, stop):
            yield source.batch(it)
        return
    loader = torch.utils.data.DataLoader(_IterationDataset(source, start, stop), batch_size=None, shuffle=False,
                                         num_workers=workers, prefetch_factor=2, persistent_workers=False,
                                         multiprocessing_context="spawn",
                                         # a private generator: the global torch stream stays untouched
                                         generator=torch.Generator().manual_seed(start))
    yield from loader


class MetricsLog:
    """``metrics.jsonl``: one JSON object a line, appended and flushed as training goes.

    A resume keeps the lines up to the iteration it resumes from. The last line may be torn (a kill
    while appending): it is dropped, with a warning to ``report``; a bad line elsewhere is a
    :class:`UserError` naming it.
    """

    def __init__(self, path: Path, resume_from: int | None, report: Callable[[str], None] = print):
        self.path = path
        if resume_from is not None and path.exists():
            # drop what the interrupted run logged after the checkpoint it resumes from
            kept = [line for line, record in self._records(report) if record.get("iteration", 0) <= resume_from]
            atomic_write(path, "".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()

    def _records(self, report: Callable[[str], None] | None) -> list[tuple[str, dict]]:
        lines = [(n, line) for n, line in enumerate(
            self.path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1) if line.strip()]
        out = []
        for i, (lineno, line) in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                out.append((line, record))
            elif i == len(lines) - 1:
                if report is not None:
                    report(f"warning: {self.path}:{lineno}: dropped a torn last line (the run was stopped while "
                           "writing it)")
            else:
                raise UserError(f"{self.path}:{lineno}: not a JSON record; delete the line (or the file) and "
                                "resume again")
        return out

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [record for _, record in self._records(None)]


def plot_curves(records: list[dict], path: Path, metric: str) -> None:
    """PNG of the training loss and the evaluation metric against the iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if metric in r.get("eval", {})]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot([r["iteration"] for r in train], [r["loss"] for r in train], color="tab:blue", lw=1, label="loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.set_yscale("log")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["iteration"] for r in evals], [r["eval"][metric] for r in evals], "o-", color="tab:red",
                 label=f"validation {metric}")
        ax2.set_ylabel(f"validation {metric}", color="tab:red")
        ax2.set_ylim(0, 1)
    ax.set_title("training curves")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


class _Run:
    """One training run's state and its named steps (see :func:`train`): the model (and its DDP wrapper),
    the optimizer and gradient scaler, the best metric so far, the metrics log and the speed window."""

    def __init__(self, model: nn.Module, loss_fn, config: EngineConfig, ctx: DistContext, model_config: dict,
                 resume_key: dict, evaluate, items_per_batch: int | None, report: Callable[[str], None]):
        self.model, self.loss_fn, self.config, self.ctx = model, loss_fn, config, ctx
        self.model_config, self.resume_key, self.evaluator = model_config, resume_key, evaluate
        self.items_per_batch, self.report = items_per_batch, report
        self.out_dir, self.total = Path(config.out_dir), config.schedule.iterations
        if ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        barrier(ctx)
        seed_everything(config.seed)
        model.to(ctx.device)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate(config.schedule, 0),
                                         momentum=config.momentum, weight_decay=config.weight_decay)
        self.autocast, use_scaler = _autocast(config.amp, ctx.device)
        self.scaler = torch.amp.GradScaler(ctx.device.type) if use_scaler else None
        self.best_metric, self.best_iteration = None, None
        self.train_model, self.log = model, None
        self.window: list[dict] = []
        self.t0 = self.window_t = time.perf_counter()

    def restore(self, resume: str | Path) -> int:
        """Continue from a saved state (its settings must be this run's); returns its iteration."""
        state = load_train_state(resume, report=self.report)
        saved_key = state.get("resume_key", {})
        # a whole group of settings that an older version did not record cannot be compared: said, not refused
        unrecorded = [k for k, v in self.resume_key.items() if isinstance(v, dict) and k not in saved_key]
        for k in unrecorded:
            self.report(f"warning: '{resume}' does not record the {k} settings (written by an older version); "
                        "make sure they are those of its run")
        diffs = _differences(saved_key, {k: v for k, v in self.resume_key.items() if k not in unrecorded})
        if diffs:
            raise UserError(f"cannot resume from '{resume}': it was written with a different configuration ("
                            + "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
                            + "); resume with the same settings or start a new run")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        start = int(state["iteration"])
        self.best_metric, self.best_iteration = state.get("best_metric"), state.get("best_iteration")
        restore_rng_state(state["rng"])
        if start > self.total:
            raise UserError(f"cannot resume from '{resume}': it is at iteration {start}, past the {self.total} "
                            "iterations asked for; raise --iterations")
        self.report(f"resumed from iteration {start} of {self.total}")
        return start

    def begin(self, start: int, resumed: bool) -> None:
        """Wrap the model for DDP, open the metrics log (rank 0), and set training mode."""
        if self.ctx.distributed:
            device = self.ctx.device
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if self.ctx.is_main:
            self.log = MetricsLog(self.out_dir / "metrics.jsonl", start if resumed else None, report=self.report)
        self.t0 = self.window_t = time.perf_counter()
        self.model.train()

    def step(self, iteration: int, batch) -> float:
        """One SGD step on ``batch`` at ``iteration``'s learning rate; returns that rate."""
        lr = learning_rate(self.config.schedule, iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = to_device(batch, self.ctx.device)
        with self.autocast:
            loss, parts = self.loss_fn(self.train_model, batch)
        if not torch.isfinite(loss):
            raise RuntimeError(f"the loss is {float(loss.detach())} at iteration {iteration}; lower the learning rate "
                               "or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.window.append({"loss": float(loss.detach()), **parts})
        return lr

    def log_window(self, done: int, lr: float, bar) -> None:
        """A line of ``metrics.jsonl``: the means of the losses since the last line (over all processes)."""
        now = time.perf_counter()
        window = self.window
        means = {k: float(np.nanmean([w[k] for w in window])) if any(not math.isnan(w[k]) for w in window)
                 else float("nan") for k in window[0]}
        means = all_reduce_mean(means, self.ctx)
        speed = len(window) / max(now - self.window_t, 1e-9)
        record = {"iteration": done, "lr": lr, **means, "it_per_s": speed}
        if self.items_per_batch:
            record["items_per_s"] = speed * self.items_per_batch * self.ctx.world_size
        record["elapsed_s"] = now - self.t0
        if self.log is not None:
            self.log.write(record)
        postfix = {"loss": f"{means['loss']:.4f}", "lr": f"{lr:.2g}"}
        if self.items_per_batch:
            postfix["items/s"] = f"{record['items_per_s']:.0f}"
        bar.set_postfix(postfix)
        self.window, self.window_t = [], now

    def _checkpoint_config(self, iteration: int, **extra) -> dict:
        return {**self.model_config, "training": {**self.model_config.get("training", {}), "iteration": iteration,
                                                  "iterations": self.total, **extra}}

    def save(self, iteration: int) -> None:
        """``last`` (and an ``iter_NNNNNN`` snapshot when asked) and ``last.state.pt`` (rank 0)."""
        if not self.ctx.is_main:
            return
        cfg = self._checkpoint_config(iteration)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        bad = _non_finite(weights)
        if bad:  # never replace the last good state with a broken one
            raise UserError(f"the weights hold NaN or infinity at iteration {iteration} ({len(bad)} tensors, e.g. "
                            f"{bad[0]}); the last good checkpoint in '{self.out_dir}' is kept; lower the learning "
                            "rate or check the data")
        save_checkpoint(self.out_dir / "last.safetensors", weights, cfg)
        if self.config.keep_snapshots:
            save_checkpoint(self.out_dir / f"iter_{iteration:06d}.safetensors", weights, cfg)
        state = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "iteration": iteration,
            "model": weights, "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "schedule": asdict(self.config.schedule), "resume_key": self.resume_key, "rng": capture_rng_state(),
            "best_metric": self.best_metric, "best_iteration": self.best_iteration,
        }
        state["sha256"] = state_digest(state)
        atomic_torch_save(state, self.out_dir / "last.state.pt")

    def evaluate(self, iteration: int) -> None:
        """Evaluate on rank 0 (the random streams untouched), keep ``best`` if the metric improved, log it."""
        config = self.config
        if self.ctx.is_main:
            rng = capture_rng_state()  # evaluation must not shift the training's random streams
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad():
                results = dict(self.evaluator(self.model))
            self.model.train(was_training)
            restore_rng_state(rng)
            value = results.get(config.metric)
            improved = value is not None and not math.isnan(value) and (
                self.best_metric is None or value > self.best_metric)
            if improved:
                self.best_metric, self.best_iteration = float(value), iteration
                save_checkpoint(self.out_dir / "best.safetensors",
                                {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                                self._checkpoint_config(iteration, **{f"val_{config.metric}": self.best_metric}))
            self.log.write({"iteration": iteration, "eval": results, "best": improved})
            self.report(f"iteration {iteration}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()
                                                             if isinstance(v, (int, float)))
                        + (" (best)" if improved else ""))
            plot_curves(self.log.read(), self.out_dir / "curves.png", config.metric)
        self.best_metric, self.best_iteration = broadcast_object((self.best_metric, self.best_iteration), self.ctx)
        barrier(self.ctx)

    def finish(self) -> TrainResult:
        if self.ctx.is_main:
            plot_curves(self.log.read(), self.out_dir / "curves.png", self.config.metric)
        barrier(self.ctx)
        return TrainResult(self.total, self.best_metric, self.best_iteration, time.perf_counter() - self.t0,
                           self.out_dir)


def train(model: nn.Module, source: BatchSource, loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict]],
          config: EngineConfig, ctx: DistContext = DistContext(), *, model_config: dict | None = None,
          resume_key: dict | None = None, evaluate: Callable[[nn.Module], dict] | None = None,
          resume: str | Path | None = None, items_per_batch: int | None = None,
          report: Callable[[str], None] = print) -> TrainResult:
    """Train ``model`` for ``config.schedule.iterations`` iterations; see the module docstring.

    model_config: the JSON config saved beside the weights (what rebuilds the model).
    resume_key: settings a resumed run must share with the run it resumes (model config, data, sampler,
        schedule...); a mismatch is a :class:`UserError` naming the differences.
    evaluate: ``evaluate(model) -> dict of floats`` on held-out data, run on rank 0 in eval mode.
    resume: a run directory or a ``last.state.pt`` to continue from.
    items_per_batch: items (regions, images) per batch and process, for the speed shown.
    """
    run = _Run(model, loss_fn, config, ctx, dict(model_config or {}),
               json.loads(json.dumps(resume_key or {})),  # normalized as stored: tuples -> lists
               evaluate, items_per_batch, report)
    start = run.restore(resume) if resume is not None else 0
    total = run.total
    run.begin(start, resumed=resume is not None)
    from tqdm import tqdm

    with tqdm(total=total, initial=start, disable=not (ctx.is_main and config.progress), dynamic_ncols=True,
              desc="train", unit="it") as bar:
        for iteration, batch in enumerate(_batches(source, start, total, config.num_workers), start=start):
            lr = run.step(iteration, batch)
            done = iteration + 1
            bar.update(1)
            if done % config.log_every == 0 or done == total:
                run.log_window(done, lr, bar)
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < total:
                run.save(done)
            if evaluate is not None and config.eval_every and done % config.eval_every == 0 and done < total:
                run.evaluate(done)
    if start < total or resume is None:
        run.save(total)
    if evaluate is not None:
        run.evaluate(total)
    return run.finish()
