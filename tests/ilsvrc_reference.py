"""A literal, loop-by-loop transcription of the ILSVRC DET rules (the devkit's ``eval_detection.m``).

Slow on purpose: it is the reference the vectorized :mod:`detector.evaluation.ilsvrc` is checked
against (tests) and timed against (``benchmarks/bench_evaluation.py``, which loads this file). It lives
with the tests, not in the library. Everything is in file coordinates (1-based, inclusive).
"""

from __future__ import annotations

import numpy as np

from detector.evaluation.ap import average_precision, precision_recall


def reference_ilsvrc(images: dict, rows: list, blacklist: set, num_classes: int) -> dict:
    """Per-class APs ``{class id: AP}`` for classes with positives.

    images: image id -> list of ``(class id, [xmin, ymin, xmax, ymax])`` objects.
    rows: prediction lines ``(image id, class id, score, [xmin, ymin, xmax, ymax])`` in file order.
    blacklist: set of ``(image id, class id)`` pairs that evaluation ignores.
    """
    rows_by_image: dict = {}
    for row in rows:
        rows_by_image.setdefault(row[0], []).append(row)
    per_image_tp = {}
    positives = np.zeros(num_classes + 1, int)
    for image_id in sorted(images):
        objs = images[image_id]
        for lab, _ in objs:
            if (image_id, lab) not in blacklist:
                positives[lab] += 1
        mine = sorted(rows_by_image.get(image_id, []), key=lambda r: -r[2])  # stable: ties keep file order
        detected = [False] * len(objs)
        out = []
        for _, lab, score, box in mine:
            if (image_id, lab) in blacklist:
                continue
            best, best_k = -np.inf, -1
            for k, (glab, g) in enumerate(objs):
                if glab != lab or detected[k]:
                    continue
                iw = min(box[2], g[2]) - max(box[0], g[0]) + 1
                ih = min(box[3], g[3]) - max(box[1], g[1]) + 1
                if iw > 0 and ih > 0:
                    ua = (box[2] - box[0] + 1) * (box[3] - box[1] + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - iw * ih
                    ov = iw * ih / ua
                    w, h = g[2] - g[0] + 1, g[3] - g[1] + 1
                    thr = min(0.5, w * h / ((w + 10) * (h + 10)))
                    if ov >= thr and ov > best:
                        best, best_k = ov, k
            if best_k >= 0:
                detected[best_k] = True
            out.append((score, lab, best_k >= 0))
        per_image_tp[image_id] = out
    ranked = [d for image_id in sorted(images) for d in per_image_tp[image_id]]
    ranked.sort(key=lambda d: -d[0])
    aps = {}
    for c in range(1, num_classes + 1):
        if positives[c] > 0:
            tp = np.array([t for _, lab, t in ranked if lab == c], dtype=bool)
            aps[c] = average_precision(*precision_recall(tp, positives[c]))
    return aps
