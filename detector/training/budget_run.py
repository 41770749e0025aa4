"""A training run that fits a time budget: measure, plan, train in stages, keep the best as ``OUT/best``.

``gdet-train --train DATA --out RUN --time-budget 30m``:

1. the data and the proposals of the whole training split, computed once into the run's store
   (:func:`detector.training.rcnn.load_run_data`); this time is shown apart and not counted;
2. a warm-up (counted): a few training steps at each candidate crop size on a throwaway copy of the
   model, and one evaluation of two held-out images, timed (:func:`measure`);
3. the plan (:func:`detector.training.budget.plan_stages`), printed as one table;
4. the stages, each a normal engine run in ``RUN/stage<k>-<size>px`` (checkpoints, ``metrics.jsonl``,
   curves), each started from the previous one's weights; a later stage's iterations are planned again
   when it starts, from the speed the earlier one reached, so a change of load moves the plan;
5. ``RUN/best`` (the stage checkpoint with the best held-out mAP, or the last weights when nothing is
   held out) and ``RUN/last``, both ready for ``gdet-detect --model RUN/best``; ``RUN/plan.json``.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from detector.base.checkpoint import checkpoint_paths
from detector.base.errors import UserError
from detector.base.files import atomic_write
from detector.base.threads import usable_cores
from detector.box_coder import BoxCoder
from detector.classifier import RegionClassifier
from detector.data.records import Dataset
from detector.training.budget import (
    CPU_SIZES,
    GPU_SIZES,
    Measured,
    Plan,
    format_duration,
    held_out_images,
    plan_stages,
    plan_table,
    replan_iterations,
)
from detector.training.data import RegionBatchSource, RegionDataConfig
from detector.training.distributed import DistContext, barrier, broadcast_object
from detector.training.losses import detection_loss
from detector.training.rcnn import DetectorTrainConfig, RunData, build_model, load_run_data, train_model
from detector.training.schedule import ScheduleConfig
from detector.training.validation import Validator

WARMUP_STEPS = 2  # timed training steps per crop size, after one untimed step
WARMUP_SHARE = 0.08  # a larger crop size is measured only while the warm-up has used less of the budget
HELD_OUT_PROPOSALS = 500  # held-out images are scored on their first 500 proposals: a cheaper proxy for choosing
EVAL_IMAGES = 1  # held-out images detected to time an evaluation


@dataclass(frozen=True)
class BudgetConfig:
    """budget_s: seconds of warm-up, training and evaluation (proposals not counted). held_out: training
    images held out without ``--val`` (None: :func:`detector.training.budget.held_out_images`).
    input_size, iterations, stages: the user's explicit choices (None: planned). lr: base learning rate
    of each stage."""

    budget_s: float
    held_out: int | None = None
    input_size: int | None = None
    iterations: int | None = None
    stages: int | None = None
    lr: float = 0.02


@dataclass
class BudgetResult:
    plan: Plan
    best_metric: float | None
    best_stage: int | None
    train_s: float
    prepare_s: float
    out_dir: Path


def _autocast(amp: str, device: torch.device):
    if amp == "bf16" or (amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if amp == "fp16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return torch.autocast(device_type=device.type, enabled=False)


def _step_seconds(config: DetectorTrainConfig, data: RunData, state: dict, size: int, ctx: DistContext
                  ) -> tuple[float, float]:
    """(seconds preparing one batch, seconds of one SGD step) at crop ``size``: the median of
    :data:`WARMUP_STEPS` timed steps after an untimed one, on a throwaway model."""
    classifier = replace(config.classifier, input_size=size, context=None)
    model = RegionClassifier(classifier).to(ctx.device)
    model.load_state_dict(state)
    model.train()
    sample = RegionDataConfig.for_classifier(classifier, max_proposals=config.proposals.max_proposals,
                                             seed=config.engine.seed)
    source = RegionBatchSource(data.train_set, data.proposals, config.sampler, sample, BoxCoder(),
                               rank=ctx.rank, world_size=ctx.world_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=config.engine.momentum)
    prep, step = [], []
    for i in range(WARMUP_STEPS + 1):
        t0 = time.perf_counter()
        batch = source.batch(10_000 + i)
        t1 = time.perf_counter()
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        with _autocast(config.engine.amp, ctx.device):
            out = model(batch["crops"])
            loss, _ = detection_loss(out.class_logits, out.box_deltas, batch["labels"], batch["box_targets"],
                                     batch["regress"], out.aux_logits, config.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        if i:
            prep.append(t1 - t0)
            step.append(time.perf_counter() - t1)
    return sorted(prep)[len(prep) // 2], sorted(step)[len(step) // 2]


def _eval_seconds(config: DetectorTrainConfig, data: RunData, state: dict, size: int, ctx: DistContext) -> float:
    """Seconds of one evaluation of every held-out image at crop ``size`` (rank 0), from
    :data:`EVAL_IMAGES` of them."""
    validator = data.validator
    if validator is None:
        return 0.0
    records = validator.dataset.records[:EVAL_IMAGES]
    model = RegionClassifier(replace(config.classifier, input_size=size, context=None)).to(ctx.device)
    model.load_state_dict(state)
    model.eval()
    probe = Validator(Dataset(records, validator.dataset.vocab, validator.dataset.image_root), validator.proposals,
                      validator.max_proposals, validator.post, validator.box_coder, precision=validator.precision)
    t0 = time.perf_counter()
    with torch.no_grad():
        probe(model)
    per_image = (time.perf_counter() - t0) / max(1, len(records))
    return 1.15 * per_image * len(validator.dataset) + 5.0  # + building the detector, writing best


def measure(config: DetectorTrainConfig, data: RunData, model: RegionClassifier, sizes: tuple[int, ...],
            ctx: DistContext, budget_s: float) -> Measured:
    """Iterations per second (all processes together) at each crop size, smallest first, and the seconds
    of one evaluation. A larger size is measured only while the warm-up has used less than
    :data:`WARMUP_SHARE` of the budget (on a crowded machine the plan is then one stage at the small
    size); evaluation is timed on one image at the small size, and scaled to a larger size by the ratio of
    the training speeds."""
    t0 = time.perf_counter()
    state = copy.deepcopy(model.state_dict())
    workers = config.engine.num_workers
    cores_each = usable_cores() / max(1, ctx.world_size)
    it_per_s = {}
    for size in sizes:
        prep, step = _step_seconds(config, data, state, size, ctx)
        # batches are made by data-loading workers beside the step: in parallel only with a core to spare
        seconds = max(prep, step) if (workers is None or workers > 0) and cores_each >= 2 else prep + step
        if ctx.distributed:
            seconds *= 1.1  # the gradients' all-reduce
        it_per_s[size] = 1.0 / (_max_over_ranks(seconds, ctx) if ctx.distributed else seconds)
        if broadcast_object(time.perf_counter() - t0, ctx) > WARMUP_SHARE * budget_s:
            break
    small = sizes[0]
    eval_small = _eval_seconds(config, data, state, small, ctx) if ctx.is_main else 0.0
    eval_small = broadcast_object(eval_small, ctx)
    eval_s = {size: eval_small * it_per_s[small] / speed for size, speed in it_per_s.items()}
    barrier(ctx)
    warmup = broadcast_object(time.perf_counter() - t0, ctx)
    return Measured(it_per_s, eval_s, warmup)


def _max_over_ranks(value: float, ctx: DistContext) -> float:
    import torch.distributed as dist  # only for a distributed run

    t = torch.tensor([value], dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _copy_checkpoint(source: Path, target: Path) -> None:
    for src, dst in zip(checkpoint_paths(source), checkpoint_paths(target)):
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)


def run_budget(config: DetectorTrainConfig, budget: BudgetConfig, ctx: DistContext = DistContext(),
               report=print) -> BudgetResult:
    """Train within ``budget.budget_s`` seconds (see the module docstring)."""
    t_prepare = time.perf_counter()
    out = Path(config.out_dir)
    held = budget.held_out if budget.held_out is not None else held_out_images
    data = load_run_data(config, ctx, report, held_out=held)
    if data.validator is not None and data.held_out:
        data.validator.max_proposals = min(data.validator.max_proposals, HELD_OUT_PROPOSALS)
    prepare_s = time.perf_counter() - t_prepare
    report(f"data and proposals ready in {format_duration(prepare_s)} (not counted in the budget)")
    start = time.perf_counter()
    deadline = start + budget.budget_s

    model = build_model(config, data.train_set.vocab.names, report)
    sizes = GPU_SIZES if ctx.device.type == "cuda" else CPU_SIZES
    if budget.input_size is not None:
        sizes = (budget.input_size,)
    elif budget.stages == 1:
        sizes = sizes[:1]
    measured = measure(config, data, model, sizes, ctx, budget.budget_s)
    def make_stages(measured: Measured):
        try:
            return plan_stages(budget.budget_s, measured, sizes, budget.lr, fixed_size=budget.input_size,
                               fixed_iterations=budget.iterations, fixed_stages=budget.stages)
        except ValueError as err:
            raise UserError(str(err)) from None

    stages, notes = make_stages(measured)
    if len(stages) == 1 and data.held_out and budget.held_out is None:
        # one stage leaves nothing to choose: the held-out images train too, and no time goes to evaluating
        held = data.validator.dataset
        train_set = Dataset(data.train_set.records + held.records, data.train_set.vocab,
                            data.train_set.image_root, data.train_set.name)
        data = RunData(train_set, data.proposals, None, 0)
        measured = replace(measured, eval_s={})
        stages, notes = make_stages(measured)
        notes = (*notes, "one stage, nothing to choose: every training image trains, none is held out")
    init = config.init_checkpoint or config.backbone_weights or "scratch (random initialization)"
    plan = Plan(budget.budget_s, stages, data.held_out, len(data.train_set), init, ctx.world_size,
                config.sampler.regions_per_batch, measured, notes)
    report(plan_table(plan))

    best_metric, best_stage, previous, speed_ratio = None, None, None, 1.0
    results = []
    for k, stage in enumerate(stages, start=1):
        if k > 1 and budget.iterations is None:  # planned again at the speed the earlier stages reached
            left = deadline - time.perf_counter()
            speed = measured.it_per_s[stage.input_size] * speed_ratio
            stage = broadcast_object(replan_iterations(stage, left, speed, measured.eval_s.get(stage.input_size, 0.0)),
                                     ctx)
        folder = out / f"stage{k}-{stage.input_size}px"
        schedule = ScheduleConfig(base_lr=stage.lr, iterations=stage.iterations, warmup_iters=stage.warmup_iters,
                                  kind="cosine")
        # a slower machine than measured stops the stage at the budget's end, less its final evaluation
        stop_at = time.time() + (deadline - time.perf_counter()) - measured.eval_s.get(stage.input_size, 0.0)
        engine = replace(config.engine, out_dir=str(folder), schedule=schedule, eval_every=0,
                         checkpoint_every=max(50, stage.iterations // 4),
                         stop_at=stop_at if budget.iterations is None else None)
        stage_config = replace(config, out_dir=str(folder), engine=engine,
                               classifier=replace(config.classifier, input_size=stage.input_size, context=None))
        if previous is not None:
            stage_config = replace(stage_config, init_checkpoint=str(previous / "last"), backbone_weights=None)
            model = build_model(stage_config, data.train_set.vocab.names, report)
        elif model.config != stage_config.classifier:  # the same weights at the stage's crop size and context
            state = model.state_dict()
            model = RegionClassifier(stage_config.classifier)
            model.load_state_dict(state)
        eta = time.strftime("%H:%M", time.localtime(time.time() + stage.iterations / (
            measured.it_per_s[stage.input_size] * speed_ratio)))
        report(f"stage {k}/{len(stages)}: {stage.input_size} px, {stage.iterations:,} iterations, about "
               f"{format_duration(stage.iterations / (measured.it_per_s[stage.input_size] * speed_ratio))} "
               f"(until about {eta}; the budget ends in {format_duration(deadline - time.perf_counter())})")
        t_stage = time.perf_counter()
        result = train_model(stage_config, data, model, ctx, report)
        stage_s = time.perf_counter() - t_stage - measured.eval_s.get(stage.input_size, 0.0)
        speed_ratio = (result.iterations / max(stage_s, 1e-6)) / measured.it_per_s[stage.input_size]
        speed_ratio = broadcast_object(speed_ratio, ctx)
        results.append({"stage": k, **asdict(stage), "iterations_done": result.iterations,
                        "seconds": time.perf_counter() - t_stage,
                        "it_per_s": result.iterations / max(stage_s, 1e-6), "val_mAP": result.best_metric})
        if result.best_metric is not None and (best_metric is None or result.best_metric > best_metric):
            best_metric, best_stage = result.best_metric, k
        previous = folder
    train_s = time.perf_counter() - start
    if ctx.is_main:
        best_source = out / f"stage{best_stage}-{stages[best_stage - 1].input_size}px" / "best" \
            if best_stage is not None else previous / "last"
        _copy_checkpoint(best_source, out / "best")
        _copy_checkpoint(previous / "last", out / "last")
        summary = {"budget_s": budget.budget_s, "prepare_s": prepare_s, "train_s": train_s,
                   "held_out": data.held_out, "num_train": len(data.train_set), "init": init,
                   "processes": ctx.world_size, "measured": asdict(measured), "stages": results,
                   "best_stage": best_stage, "best_val_mAP": best_metric, "notes": list(plan.notes)}
        atomic_write(out / "plan.json", json.dumps(summary, indent=2) + "\n")
    barrier(ctx)
    return BudgetResult(plan, best_metric, best_stage, train_s, prepare_s, out)
