"""Presenting an :class:`EvalResult`: a table for people, JSON for machines, PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from detector.base.files import atomic_open
from detector.base.plots import pyplot, save_figure
from detector.evaluation.result import EvalResult


def format_table(result: EvalResult, max_rows: int | None = None) -> str:
    """Per-class rows ``id  name  positives  AP`` (class id order) and the mean; see :meth:`EvalResult.table`."""
    return result.table(max_rows=max_rows)


def save_json(result: EvalResult, path: str | Path) -> None:
    """Write ``result.to_dict()`` to ``path`` atomically."""
    with atomic_open(path) as f:
        json.dump(result.to_dict(), f, indent=2)


def pr_panels(ranked: list, num_curves: int) -> list[tuple[str, list]]:
    """The PR plot's panels as ``(title, classes)``: ``ranked`` (class ids by rising AP) in one panel when
    it has at most ``num_curves`` classes, else the ``num_curves`` worst and the best of the rest (at most
    ``num_curves``, best first), so no class is drawn twice (one class was once "worst" and "best")."""
    if len(ranked) <= num_curves:
        return [(f"all {len(ranked)} class{'es' * (len(ranked) != 1)}", list(ranked))]
    worst = list(ranked[:num_curves])
    best = list(ranked[max(num_curves, len(ranked) - num_curves):][::-1])
    return [(f"{len(worst)} worst classes", worst), (f"{len(best)} best classes", best)]


def plot_results(result: EvalResult, out_dir: str | Path, num_curves: int = 8) -> list[Path]:
    """PNG plots in ``out_dir``: ``pr_curves.png`` (precision/recall of every class when there are at most
    ``num_curves``, else of the ``num_curves`` worst and best, see :func:`pr_panels`) and ``ap_per_class.png`` (every class's AP, sorted, with the mean). Returns the written paths."""
    plt = pyplot()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    ranked = sorted(result.ap, key=lambda c: (result.ap[c], c))
    if ranked and result.curves:
        picks = pr_panels(ranked, num_curves)
        fig, axes = plt.subplots(1, len(picks), figsize=(6 * len(picks), 5.5), squeeze=False)
        for ax, (title, classes) in zip(axes[0], picks):
            for cid in classes:
                curve = result.curves.get(cid)
                if curve is None:
                    continue
                recall, precision = curve
                ax.plot(np.r_[0.0, recall], np.r_[precision[0] if len(precision) else 0.0, precision],
                        label=f"{result.class_names.get(cid, cid)} ({result.ap[cid]:.3f})")
            ax.set(title=title, xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower left")
        fig.suptitle(f"{result.protocol}: precision/recall, mAP {result.mAP:.4f}")
        fig.tight_layout()
        written.append(save_figure(fig, out_dir / "pr_curves.png"))
    if ranked:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.06 * len(ranked) + 3), 4.5))
        ax.bar(np.arange(len(ranked)), [result.ap[c] for c in ranked], width=0.9, color="tab:blue")
        ax.axhline(result.mAP, color="tab:red", lw=1, label=f"mean AP {result.mAP:.4f}")
        if len(ranked) <= 40:
            ax.set_xticks(np.arange(len(ranked)), [str(result.class_names.get(c, c)) for c in ranked],
                          rotation=90, fontsize=7)
        else:
            ax.set_xticks([])
            ax.set_xlabel(f"{len(ranked)} classes, sorted by AP")
        ax.set(ylabel="AP", ylim=(0, 1), xlim=(-0.6, len(ranked) - 0.4), title=f"{result.protocol}: AP per class")
        ax.legend()
        fig.tight_layout()
        written.append(save_figure(fig, out_dir / "ap_per_class.png"))
    return written
