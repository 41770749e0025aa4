"""A generic training loop: SGD with warm-up and decay, DDP under torchrun, mixed precision, exact resume.

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
  configuration it must match), checksummed and checked before a resume uses anything
  (:mod:`detector.training.state`). A state whose weights have become non-finite is never saved (the
  last good one is kept);
- ``metrics.jsonl``: one JSON object per logged iteration or evaluation, appended; a resume drops a
  torn last line (a kill while appending) with a warning (on stderr). ``curves.png``: the loss and the evaluation
  metric against the iteration (both :mod:`detector.training.state`).

Every file is written to a temporary name and moved into place, so a crash never leaves half a file;
the temporary files a killed run left are removed when a run starts or resumes in the folder.

A loss or weights that are no longer finite end the run in one line (:class:`UserError`): the iteration,
the last good checkpoint (kept), what to do.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from detector.base.checkpoint import save_checkpoint
from detector.base.defaults import PRECISIONS
from detector.base.errors import UserError
from detector.base.jobs import default_workers
from detector.base.pool import RaisedInWorker
from detector.training.distributed import DistContext, all_reduce_mean, barrier, broadcast_object
from detector.training.schedule import ScheduleConfig, learning_rate
from detector.training.state import (
    STATE_FILE,
    MetricsLog,
    capture_rng_state,
    check_same_settings,
    clean_run_folder,
    load_train_state,
    non_finite,
    plot_curves,
    restore_rng_state,
    save_train_state,
    seed_everything,
    warn_on_stderr,
)


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
    precision: the words of every tool's ``--precision``: ``"auto"`` (bf16 autocast on a GPU that supports
        it, fp32 on the CPU, whatever the CPU: a run's numbers do not depend on its kernels), ``"fp32"``,
        ``"bf16"`` (autocast; on CPUs too) or ``"fp16"`` (autocast with a gradient scaler; a GPU only).
    grad_clip: clip the gradient norm to this value (0: no clipping).
    num_workers: data-loading processes, started with ``spawn`` (None: this process's share of the usable
        cores but one, see :func:`detector.base.jobs.default_workers`; 0: load in the training process).
    seed: seeds python, numpy and torch before the first iteration.
    progress: show a progress bar (rank 0).
    stop_at: a ``time.time()`` at which to stop before ``schedule.iterations`` (a time budget's end; None:
        never): the run ends after the iteration that passes it, saves and evaluates as at its planned end
        and can be resumed to finish. Rank 0's clock decides for every process.
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
    precision: str = "auto"
    grad_clip: float = 0.0
    num_workers: int | None = None
    seed: int = 0
    progress: bool = True
    stop_at: float | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.checkpoint_every < 0 or self.eval_every < 0 or self.log_every < 1:
            raise ValueError("checkpoint_every and eval_every must be >= 0, log_every >= 1")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (or None: sized to the machine), got {self.num_workers}")

    @property
    def amp(self) -> str:
        """:attr:`precision` in the words of its earlier name (``--amp``: ``"none"`` for fp32), as the
        resume settings of runs record it: a run started before the rename still resumes."""
        return "none" if self.precision == "fp32" else self.precision


@dataclass
class TrainResult:
    iterations: int
    best_metric: float | None
    best_iteration: int | None
    seconds: float
    out_dir: Path


# ----------------------------------------------------------------------------------------------------
# the loop


def _autocast(precision: str, device: torch.device):
    """``(autocast context, use a gradient scaler)`` for ``precision`` (see :class:`EngineConfig`)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), False
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision 'fp16' needs a GPU; use --precision bf16 or fp32 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype), precision == "fp16"


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
        # in a worker: a user error comes back as a value, raised again below as itself (one line), where
        # the DataLoader would turn it into a RuntimeError holding the worker's traceback
        return RaisedInWorker.capture(self.source.batch, self.start + index)


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
    for batch in loader:
        if isinstance(batch, RaisedInWorker):
            batch.reraise()
        yield batch


class _Run:
    """One training run's state and its named steps (see :func:`train`): the model (and its DDP wrapper),
    the optimizer and gradient scaler, the best metric so far, the metrics log and the speed window."""

    def __init__(self, model: nn.Module, loss_fn, config: EngineConfig, ctx: DistContext, model_config: dict,
                 resume_key: dict, evaluate, items_per_batch: int | None, report: Callable[[str], None],
                 warn: Callable[[str], None]):
        self.model, self.loss_fn, self.config, self.ctx = model, loss_fn, config, ctx
        self.model_config, self.resume_key, self.evaluator = model_config, resume_key, evaluate
        self.items_per_batch, self.report, self.warn = items_per_batch, report, warn
        self.out_dir, self.total = Path(config.out_dir), config.schedule.iterations
        if ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            removed = clean_run_folder(self.out_dir)  # a kill while last.state.pt was written: as large as it
            if removed:
                warn(f"warning: removed {len(removed)} temporary files a killed run left in '{self.out_dir}' "
                     f"({', '.join(p.name for p in removed[:2])}{', ...' if len(removed) > 2 else ''})")
        barrier(ctx)
        seed_everything(config.seed)
        model.to(ctx.device)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate(config.schedule, 0),
                                         momentum=config.momentum, weight_decay=config.weight_decay)
        self.autocast, use_scaler = _autocast(config.precision, ctx.device)
        self.scaler = torch.amp.GradScaler(ctx.device.type) if use_scaler else None
        self.best_metric, self.best_iteration = None, None
        self.saved_iteration: int | None = None  # of the last good state in out_dir (None: none yet)
        self.train_model, self.log = model, None
        self.window: list[dict] = []
        self.t0 = self.window_t = time.perf_counter()

    def restore(self, resume: str | Path) -> int:
        """Continue from a saved state (its settings must be this run's); returns its iteration."""
        state = load_train_state(resume, report=self.warn)
        check_same_settings(state.get("resume_key", {}), self.resume_key, resume, self.warn)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        start = self.saved_iteration = int(state["iteration"])
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
            self.log = MetricsLog(self.out_dir / "metrics.jsonl", start if resumed else None, report=self.warn)
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
            raise self.diverged(f"the loss is {float(loss.detach())} at iteration {iteration + 1}")
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
        bad = non_finite(weights)
        if bad:  # never replace the last good state with a broken one
            raise self.diverged(f"the weights hold NaN or infinity at iteration {iteration} ({len(bad)} tensors, "
                                f"e.g. {bad[0]})")
        save_checkpoint(self.out_dir / "last.safetensors", weights, cfg)
        if self.config.keep_snapshots:
            save_checkpoint(self.out_dir / f"iter_{iteration:06d}.safetensors", weights, cfg)
        save_train_state(self.out_dir / STATE_FILE, {
            "iteration": iteration, "model": weights, "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "schedule": asdict(self.config.schedule), "resume_key": self.resume_key, "rng": capture_rng_state(),
            "best_metric": self.best_metric, "best_iteration": self.best_iteration,
        })
        self.saved_iteration = iteration

    def diverged(self, what: str) -> UserError:
        """The one line for a run whose numbers are no longer finite: ``what`` happened, the last good
        checkpoint is kept (nothing non-finite is ever saved), and what to do. A user's to fix (exit 2),
        not a bug: the learning rate or the data."""
        kept = (f"the last good checkpoint in '{self.out_dir}' (iteration {self.saved_iteration}) is kept"
                if self.saved_iteration is not None else f"no checkpoint was written to '{self.out_dir}'")
        return UserError(f"training diverged: {what}; {kept}; lower the learning rate (--lr) or check the data")

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

    def finish(self, iterations: int) -> TrainResult:
        if self.ctx.is_main:
            plot_curves(self.log.read(), self.out_dir / "curves.png", self.config.metric)
        barrier(self.ctx)
        return TrainResult(iterations, self.best_metric, self.best_iteration, time.perf_counter() - self.t0,
                           self.out_dir)


def train(model: nn.Module, source: BatchSource, loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict]],
          config: EngineConfig, ctx: DistContext = DistContext(), *, model_config: dict | None = None,
          resume_key: dict | None = None, evaluate: Callable[[nn.Module], dict] | None = None,
          resume: str | Path | None = None, items_per_batch: int | None = None,
          report: Callable[[str], None] = print, warn: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``model`` for ``config.schedule.iterations`` iterations; see the module docstring.

    model_config: the JSON config saved beside the weights (what rebuilds the model).
    resume_key: settings a resumed run must share with the run it resumes (model config, data, sampler,
        schedule...); a mismatch is a :class:`UserError` naming the differences.
    evaluate: ``evaluate(model) -> dict of floats`` on held-out data, run on rank 0 in eval mode.
    resume: a run directory or a ``last.state.pt`` to continue from.
    items_per_batch: items (regions, images) per batch and process, for the speed shown.
    report: where progress lines go (the tools: stdout on rank 0).
    warn: where warnings go (a torn metrics line, an older state, leftovers removed); default: stderr on
        rank 0, so that a log sent to a file still shows them.
    """
    if warn is None:
        warn = warn_on_stderr if ctx.is_main else (lambda line: None)
    run = _Run(model, loss_fn, config, ctx, dict(model_config or {}),
               json.loads(json.dumps(resume_key or {})),  # normalized as stored: tuples -> lists
               evaluate, items_per_batch, report, warn)
    start = run.restore(resume) if resume is not None else 0
    total = run.total
    run.begin(start, resumed=resume is not None)
    with tqdm(total=total, initial=start, disable=not (ctx.is_main and config.progress), dynamic_ncols=True,
              desc="train", unit="it") as bar:
        end = total
        for iteration, batch in enumerate(_batches(source, start, total, config.num_workers), start=start):
            lr = run.step(iteration, batch)
            done = iteration + 1
            bar.update(1)
            if done < total and _time_is_up(config.stop_at, ctx):
                end = done
                run.log_window(done, lr, bar)
                run.report(f"time budget: stopped at iteration {done:,} of {total:,} (resume to finish)")
                break
            if done % config.log_every == 0 or done == total:
                run.log_window(done, lr, bar)
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < total:
                run.save(done)
            if evaluate is not None and config.eval_every and done % config.eval_every == 0 and done < total:
                run.evaluate(done)
    if start < end or resume is None:
        run.save(end)
    if evaluate is not None:
        run.evaluate(end)
    return run.finish(end)


def _time_is_up(stop_at: float | None, ctx: DistContext) -> bool:
    """Whether ``stop_at`` has passed, by rank 0's clock (every rank gets the same answer)."""
    if stop_at is None:
        return False
    return bool(broadcast_object(time.time() >= stop_at, ctx))
