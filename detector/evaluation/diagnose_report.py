"""Presenting a :class:`~detector.evaluation.diagnose.Diagnosis`: text tables for people, PNG plots
(``diagnose.png``: false-positive types per class; ``confusion.png``: the class confusion matrix)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from detector.base.plots import pyplot, save_figure
from detector.evaluation.diagnose import FP_TYPES, MISSED, ClassDiagnosis, Diagnosis

SHORT = {"localization": "loc", "duplicate": "dup", "confusion": "conf", "background": "bg"}
COLORS = {"correct": "#4c9f50", "localization": "#f2b134", "duplicate": "#f7dc6f", "confusion": "#5b8fd6",
          "background": "#c0504d"}


def _top_words(diagnosis: Diagnosis) -> str:
    top = diagnosis.config.top
    return "all detections" if top is None else f"the top {top:g} x N_j detections (N_j: the class's objects)"


def format_diagnosis(diagnosis: Diagnosis, max_confused: int = 2) -> str:
    """Three blocks: per class, the analysed detections' TP and false positives by type (count and % of
    the false positives); the AP gained by removing each type; the confusion matrix (up to 30 classes)."""
    cfg = diagnosis.config
    total = diagnosis.total
    rows = [*diagnosis.per_class, total]
    width = max(len(c.name) for c in rows)
    lines = [
        f"false positives (Hoiem et al. 2012) among {_top_words(diagnosis)} of each class; correct at IoU >= "
        f"{cfg.iou_threshold:g}",
        f"  loc: its class at IoU in [{cfg.min_overlap:g}, {cfg.iou_threshold:g}); dup: its class at IoU >= "
        f"{cfg.iou_threshold:g}, already detected; conf: another class at IoU >= {cfg.min_overlap:g}; "
        f"bg: IoU < {cfg.min_overlap:g} with every object",
        f"{'id':>5}  {'name':<{width}}  {'objects':>7}  {'top':>5}  {'TP':>5}  {'FP':>5}  "
        + "  ".join(f"{SHORT[t]:>9}" for t in FP_TYPES) + "  confused with",
    ]
    for c in rows:
        if c is total:
            lines.append("-" * len(lines[2]))
        cells = "  ".join(f"{c.fp[t]:>4} {100 * c.fp_fraction(t):3.0f}%" for t in FP_TYPES)
        confused = ", ".join(f"{n} {k}" for n, k in list(c.confused_with.items())[:max_confused])
        cid = "" if c is total else c.class_id
        lines.append(f"{cid:>5}  {c.name:<{width}}  {c.positives:>7}  {c.considered:>5}  {c.tp:>5}  {c.num_fp:>5}  "
                     f"{cells}  {confused}")
    lines += ["", f"AP at IoU >= {cfg.iou_threshold:g} (all-point, every detection) and its gain when every false "
              "positive of one type is removed",
              f"{'id':>5}  {'name':<{width}}  {'AP':>6}  " + "  ".join(f"{'+' + SHORT[t]:>6}" for t in FP_TYPES)]
    for c in rows:
        if c.ap is None:
            continue
        cid = "" if c is total else c.class_id
        name = "mean" if c is total else c.name
        lines.append(f"{cid:>5}  {name:<{width}}  {c.ap:6.3f}  "
                     + "  ".join(f"{c.ap_gain[t]:+6.3f}" for t in FP_TYPES))
    lines.append(f"{diagnosis.num_images} images, {diagnosis.num_detections} detections"
                 + (f", {diagnosis.num_ignored} ignored (difficult or crowd objects)" if diagnosis.num_ignored else ""))
    if len(diagnosis.confusion.class_names) <= 30:
        lines += ["", format_confusion(diagnosis)]
    return "\n".join(lines)


def _shown(diagnosis: Diagnosis) -> tuple[np.ndarray, np.ndarray]:
    """Rows: the classes with objects; columns: those classes, any class an object was taken for, and
    ``missed`` (the last). Both as indices into ``confusion.matrix``."""
    matrix = diagnosis.confusion.matrix
    rows = np.flatnonzero(matrix.sum(axis=1) > 0)
    used = np.zeros(matrix.shape[1], dtype=bool)
    used[rows] = True
    used[:-1] |= matrix[:, :-1].sum(axis=0) > 0
    used[-1] = True
    return rows, np.flatnonzero(used)


def format_confusion(diagnosis: Diagnosis) -> str:
    """The confusion matrix as text: rows named and numbered by vocabulary position, columns numbered the
    same way (classes without objects that no object was taken for are left out), then missed."""
    cm = diagnosis.confusion
    rows, columns = _shown(diagnosis)
    width = max([len("object class")] + [len(n) for n in cm.class_names])
    num_classes = len(cm.class_names)
    lines = [f"confusion matrix: each object (row) counted for the class of the highest-scoring detection at "
             f"IoU >= {diagnosis.config.iou_threshold:g} (column; 'miss': none)",
             f"{'':>3} {'object class':<{width}}  "
             + " ".join(f"{k + 1 if k < num_classes else 'miss':>4}" for k in columns) + f"  {'right':>6}"]
    for k in rows:
        row = cm.matrix[k]
        lines.append(f"{k + 1:>3} {cm.class_names[k]:<{width}}  " + " ".join(f"{row[j]:>4}" for j in columns)
                     + f"  {row[k] / row.sum():6.1%}")
    return "\n".join(lines)


def plot_diagnosis(diagnosis: Diagnosis, out_dir: str | Path) -> list[Path]:
    """Write ``diagnose.png`` (per class: analysed detections stacked as correct and each false-positive
    type, and the false positives' shares) and ``confusion.png`` (row-normalized heat map, counts in the
    cells) into ``out_dir``. Returns the written paths."""
    plt = pyplot()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_plot_fp_types(diagnosis, out_dir / "diagnose.png", plt),
            _plot_confusion(diagnosis, out_dir / "confusion.png", plt)]


def _plot_fp_types(diagnosis: Diagnosis, path: Path, plt) -> Path:
    rows: list[ClassDiagnosis] = [diagnosis.total, *diagnosis.per_class]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.45 * len(rows) + 2.5), 8.5), sharex=True)
    panels = [
        (axes[0], [("correct", lambda c: c.tp)] + [(t, lambda c, t=t: c.fp[t]) for t in FP_TYPES],
         lambda c: c.considered, "% of the detections analysed",
         f"{_top_words(diagnosis)}:\ncorrect and false positives (number analysed above each bar)"),
        (axes[1], [(t, lambda c, t=t: c.fp[t]) for t in FP_TYPES], lambda c: c.num_fp,
         "% of the false positives", "false-positive types (number of false positives above each bar)"),
    ]
    for ax, segments, total_of, ylabel, title in panels:
        totals = np.array([total_of(c) for c in rows], dtype=np.float64)
        bottom = np.zeros(len(rows))
        for name, count_of in segments:
            share = 100 * np.array([count_of(c) for c in rows]) / np.maximum(totals, 1)
            ax.bar(x, share, bottom=bottom, color=COLORS[name], label=name, width=0.8)
            bottom += share
        for k, n in enumerate(totals):
            ax.text(k, 101, f"{n:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set(ylabel=ylabel, ylim=(0, 108))
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8, ncol=5, loc="lower center", bbox_to_anchor=(0.5, -0.02), framealpha=0.9)
    axes[1].set_xticks(x, [c.name for c in rows], rotation=60, ha="right", fontsize=8)
    axes[1].set_xlim(-0.6, len(rows) - 0.4)
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_confusion(diagnosis: Diagnosis, path: Path, plt) -> Path:
    cm = diagnosis.confusion
    present, columns = _shown(diagnosis)
    counts = cm.matrix[np.ix_(present, columns)]
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n_rows, n_cols = counts.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * n_cols + 3), max(4.5, 0.45 * n_rows + 2.5)))
    if n_rows == 0:
        ax.text(0.5, 0.5, "no objects (difficult and crowd ones are left out)", ha="center", va="center")
        ax.set_axis_off()
        return save_figure(fig, path)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    if n_rows * n_cols <= 40 * 41:
        for i in range(n_rows):
            for j in range(n_cols):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(np.arange(n_cols), [cm.columns[j] for j in columns], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(np.arange(n_rows), [cm.class_names[k] for k in present], fontsize=8)
    ax.set(xlabel=f"class of the highest-scoring detection at IoU >= {diagnosis.config.iou_threshold:g} "
                  f"('{MISSED}': none)", ylabel="object class",
           title="confusion matrix (share of each row's objects)")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    return save_figure(fig, path)
