"""A training plan for a time budget (``gdet-train --time-budget 30m``), as plain arithmetic (no torch).

The plan is made from measurements (:mod:`.budget_run` takes them after a short warm-up): training
iterations per second at each candidate crop size, and the seconds one evaluation of the held-out
images takes. It chooses

- the crop sizes: one stage at the small size, or the small size then a fine-tune at the larger one
  (the recipe of the default chess model: 64 px, then 96 px from those weights, see its model card) when
  the budget buys enough iterations of both (:data:`MIN_STAGE_ITERATIONS`);
- the iterations of each stage: the time left after the warm-up and the evaluations, split
  :data:`FIRST_STAGE_SHARE` / the rest, times the measured speed;
- how many training images are held out to choose the checkpoint when there is no ``--val``
  (:func:`held_out_images`).

Every choice can be overridden by an explicit option of the tool; the plan only fills in the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

CPU_SIZES = (64, 96)  # crop sizes tried on a CPU: the default chess model's two stages
GPU_SIZES = (96, 160)  # on a GPU the budget buys larger crops
FIRST_STAGE_SHARE = 0.6  # of the training time, when there are two stages
MIN_STAGE_ITERATIONS = 300  # a stage shorter than this is not worth its restart: one stage instead
SAFETY = 0.95  # plan for this share of the time left (speed drifts on a shared machine)
MARGIN_S = 30.0  # seconds kept for starting a stage (data workers, checkpoints) and copying the best one

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*$")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}


def parse_duration(text: str) -> float:
    """Seconds of ``"90s"``, ``"30m"``, ``"1.5h"`` (a bare number is seconds); ``ValueError`` otherwise."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"expected a duration such as 90s, 30m or 1.5h, got '{text}'")
    seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"expected a duration > 0, got '{text}'")
    return seconds


def format_duration(seconds: float) -> str:
    """``"30.0 min"``, ``"45 s"``, ``"1.50 h"``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def held_out_images(num_images: int) -> int:
    """Training images held out to choose the checkpoint when no ``--val`` is given: a twentieth, at least
    5 and at most 12 (an evaluation is expensive on a CPU: about 1,000 crops per image, the cost of ~5
    training iterations each); none below 40 images, where every image is needed for training."""
    if num_images < 40:
        return 0
    return max(5, min(12, num_images // 20))


@dataclass(frozen=True)
class Stage:
    """One training stage: crop size, iterations, base learning rate and warm-up iterations; starts
    from the previous stage's weights (a warm restart, new cosine schedule)."""

    input_size: int
    iterations: int
    lr: float
    warmup_iters: int


@dataclass(frozen=True)
class Measured:
    """What the warm-up measured: training iterations per second (all processes together) per crop size,
    the seconds one evaluation of the held-out images takes per crop size, and the warm-up's own seconds."""

    it_per_s: dict[int, float]
    eval_s: dict[int, float] = field(default_factory=dict)
    warmup_s: float = 0.0


@dataclass(frozen=True)
class Plan:
    """A budget run's plan (what :func:`plan_table` prints)."""

    budget_s: float
    stages: tuple[Stage, ...]
    held_out: int
    num_train: int
    init: str
    processes: int
    regions_per_batch: int
    measured: Measured
    notes: tuple[str, ...] = ()

    @property
    def train_s(self) -> float:
        """Planned seconds of training and evaluation (the warm-up excluded)."""
        return sum(s.iterations / self.measured.it_per_s[s.input_size] + self.measured.eval_s.get(s.input_size, 0.0)
                   for s in self.stages)


def plan_stages(budget_s: float, measured: Measured, sizes: tuple[int, ...] = CPU_SIZES, lr: float = 0.02,
                fixed_size: int | None = None, fixed_iterations: int | None = None,
                fixed_stages: int | None = None) -> tuple[tuple[Stage, ...], tuple[str, ...]]:
    """The stages for ``budget_s`` seconds (the warm-up, already spent, is subtracted here).

    fixed_size (``--input-size``), fixed_iterations (``--iterations``) and fixed_stages (``--stages``)
    are the user's explicit choices: a fixed size or iteration count means one stage unless
    ``fixed_stages`` says otherwise. Returns the stages and notes on why.
    """
    left = SAFETY * (budget_s - measured.warmup_s) - MARGIN_S
    notes = []
    small, large = sizes[0], sizes[-1]
    if fixed_size is not None or fixed_iterations is not None:
        fixed_stages = fixed_stages or 1
    two = fixed_stages == 2 if fixed_stages else None
    if fixed_size is not None:
        small = large = fixed_size
        two = False if two is None else two
    if fixed_stages == 2 and small == large:
        notes.append("two stages at one crop size: a warm restart")
    if large not in measured.it_per_s:  # not measured: the warm-up used its share of the budget on the small one
        large = small
        if two is None:
            two = False
            notes.append(f"one stage: the warm-up had no time to measure {sizes[-1]} px")
    single_size = small if fixed_size is None else fixed_size
    speed_small, speed_large = measured.it_per_s[small], measured.it_per_s[large]
    eval_small, eval_large = measured.eval_s.get(small, 0.0), measured.eval_s.get(large, 0.0)
    if fixed_iterations is not None:
        return (Stage(single_size, fixed_iterations, lr, min(20, fixed_iterations // 10)),), (
            "--iterations given: one stage of that length, the budget only reported",)
    if two is None or two:
        train_left = left - eval_small - eval_large
        it1 = int(FIRST_STAGE_SHARE * train_left * speed_small)
        it2 = int((1 - FIRST_STAGE_SHARE) * train_left * speed_large)
        if two or (it1 >= MIN_STAGE_ITERATIONS and it2 >= MIN_STAGE_ITERATIONS and small != large):
            if it1 < 1 or it2 < 1:
                raise ValueError(f"a budget of {format_duration(budget_s)} leaves no time for two stages")
            return (Stage(small, it1, lr, min(20, it1 // 10)), Stage(large, it2, lr, min(10, it2 // 10))), tuple(notes)
        notes.append(f"one stage: two would give fewer than {MIN_STAGE_ITERATIONS} iterations each")
    speed, eval_s = (speed_small, eval_small) if single_size == small else (speed_large, eval_large)
    iterations = int((left - eval_s) * speed)
    if iterations < 1:
        raise ValueError(f"a budget of {format_duration(budget_s)} leaves no time to train after the warm-up "
                         f"({format_duration(measured.warmup_s)}); give a larger --time-budget")
    return (Stage(single_size, iterations, lr, min(20, iterations // 10)),), tuple(notes)


def replan_iterations(stage: Stage, seconds_left: float, it_per_s: float, eval_s: float) -> Stage:
    """``stage`` with the iterations that fit in ``seconds_left`` at the speed seen so far (a later stage
    is planned again when it starts: the machine's load changes)."""
    iterations = max(1, int((SAFETY * seconds_left - MARGIN_S - eval_s) * it_per_s))
    return Stage(stage.input_size, iterations, stage.lr, min(stage.warmup_iters, max(0, iterations // 10)))


def plan_table(plan: Plan) -> str:
    """The plan as one table for the console."""
    m = plan.measured
    stages = " then ".join(f"{s.input_size} px" for s in plan.stages)
    iters = " + ".join(f"{s.iterations:,}" for s in plan.stages)
    speeds = ", ".join(f"{m.it_per_s[s]:.2f} it/s at {s} px" for s in sorted(m.it_per_s))
    evals = ", ".join(f"{m.eval_s[s]:.0f} s at {s} px" for s in sorted(m.eval_s))
    rows = [
        ("time budget", f"{format_duration(plan.budget_s)} (proposals not counted)"),
        ("weights start from", plan.init),
        ("crop size", stages + (" (fine-tune from the first stage)" if len(plan.stages) > 1 else "")),
        ("stages", f"{len(plan.stages)}, each a warm-up then cosine decay from lr {plan.stages[0].lr:g}"),
        ("iterations", f"{iters} ({plan.processes} process{'es' if plan.processes > 1 else ''} x "
                       f"{plan.regions_per_batch} regions each)"),
        ("training images", f"{plan.num_train}"),
        ("held-out images", f"{plan.held_out}" + (" (choose the checkpoint)" if plan.held_out else
                                                   " (--val, or none: the last weights are kept)")),
        ("measured speed", f"{speeds} (warm-up {format_duration(m.warmup_s)})"),
    ]
    if evals:
        rows.append(("one evaluation", evals))
    rows.append(("planned", f"{format_duration(plan.train_s + m.warmup_s)} of training and evaluation"))
    rows += [("note", note) for note in plan.notes]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join(["training plan", line, *(f"{k.ljust(width)}  {v}" for k, v in rows), line])
