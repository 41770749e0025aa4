"""ILSVRC DET submission files: ``<image id> <class id> <confidence> <xmin> <ymin> <xmax> <ymax>``.

Coordinates are 1-based and inclusive (devkit ``readme.txt`` section 2.4); they leave and enter the
project's xyxy convention only through :mod:`detector.base.boxes`.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from detector.base.boxes import voc_to_xyxy, xyxy_to_voc
from detector.base.errors import UserError
from detector.base.files import atomic_open
from detector.data.records import Dataset
from detector.evaluation.detections import unpack, warn_outside_dataset

NUM_COLUMNS = 7
CHUNK_BYTES = 32 << 20  # parsed in pieces of ~32 MB (~700k lines)


@dataclass(frozen=True)
class IlsvrcPredictions:
    """Parsed submission lines, in file order.

    image_ids, class_ids: int64 ``(P,)``; scores: float64 ``(P,)``;
    boxes: float64 ``(P, 4)``, ``[xmin, ymin, xmax, ymax]`` 1-based inclusive, as written.
    """

    image_ids: np.ndarray
    class_ids: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    num_inverted: int = 0

    def __len__(self) -> int:
        return len(self.scores)


def _line_problem(fields: list[str], class_ids: set[int], strict_boxes: bool = True) -> str | None:
    """Why one non-empty line is malformed, or ``None``."""
    if len(fields) != NUM_COLUMNS:
        return (f"expected {NUM_COLUMNS} columns '<image id> <class id> <confidence> <xmin> <ymin> <xmax> <ymax>', "
                f"got {len(fields)}")
    try:
        values = [float(f) for f in fields]
    except ValueError:
        bad = next(f for f in fields if not _is_float(f))
        return f"{bad!r} is not a number"
    if not all(math.isfinite(v) for v in values):
        return "NaN or infinite value"
    if not values[0].is_integer() or not values[1].is_integer():
        return "image id and class id must be integers"
    if int(values[1]) not in class_ids:
        return f"class id {int(values[1])} is outside {min(class_ids)}..{max(class_ids)}"
    if strict_boxes and (values[5] < values[3] or values[6] < values[4]):
        return "xmax < xmin or ymax < ymin (drop --strict to evaluate such boxes as the devkit does)"
    return None


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _raise_first_problem(path: Path, class_ids: set[int], strict_boxes: bool) -> None:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if fields:
                problem = _line_problem(fields, class_ids, strict_boxes)
                if problem:
                    raise UserError(f"{path}:{lineno}: {problem}; fix or remove the line")
    raise UserError(f"{path}: malformed prediction file; expected lines of {NUM_COLUMNS} numbers")


def _inverted(rows: np.ndarray) -> np.ndarray:
    return (rows[:, 5] < rows[:, 3]) | (rows[:, 6] < rows[:, 4])


def _line_of_row(path: Path, row: int) -> int:
    """Line number of the ``row``-th (0-based) non-empty line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if line.split():
                if row == 0:
                    return lineno
                row -= 1
    return -1


def _check(rows: np.ndarray, class_ids: np.ndarray, strict_boxes: bool) -> bool:
    """Vectorized version of :func:`_line_problem` over parsed rows ``(n, 7)``; True if all are fine."""
    if rows.shape[1] != NUM_COLUMNS or not np.isfinite(rows).all():
        return False
    ids = rows[:, :2]
    if not (ids == np.floor(ids)).all():
        return False
    if not np.isin(rows[:, 1].astype(np.int64), class_ids).all():
        return False
    return not (strict_boxes and _inverted(rows).any())


def read_ilsvrc_predictions(path: str | Path, class_ids: Sequence[int] = range(1, 201),
                            strict_boxes: bool = False, progress: bool = False) -> IlsvrcPredictions:
    """Parse a submission file; a malformed line is a :class:`UserError` naming its line number.

    Malformed: a column count other than 7, a value that is not a number, NaN or infinity, a
    non-integer image or class id, a class id not in ``class_ids``; with ``strict_boxes``, also
    ``xmax < xmin`` or ``ymax < ymin``. Empty lines are skipped.

    Without ``strict_boxes``, inverted boxes are kept and counted (with a warning naming the first
    line): the official devkit evaluates them with its usual arithmetic (in practice false positives),
    and its own demo file has 1,692 of them, which the official figures include.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prediction file not found")
    allowed = np.asarray(sorted(set(int(c) for c in class_ids)), dtype=np.int64)
    chunks = []
    with open(path, "rb") as f, \
            tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="reading predictions",
                 disable=not progress, mininterval=0.5) as bar:
        while True:
            data = f.read(CHUNK_BYTES)
            if not data:
                break
            data += f.readline()  # end the chunk at a line end
            bar.update(len(data))
            try:
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # an all-empty chunk
                    rows = np.loadtxt(io.BytesIO(data), dtype=np.float64, comments=None, ndmin=2, encoding="utf-8")
            except ValueError:
                rows = None
            if rows is None or (rows.size and not _check(rows, allowed, strict_boxes)):
                _raise_first_problem(path, set(allowed.tolist()), strict_boxes)
            if rows.size:
                chunks.append(rows)
    rows = np.concatenate(chunks) if chunks else np.zeros((0, NUM_COLUMNS))
    inverted = np.flatnonzero(_inverted(rows))
    if inverted.size:
        warnings.warn(f"{path}: {inverted.size} predictions have xmax < xmin or ymax < ymin (first on line "
                      f"{_line_of_row(path, int(inverted[0]))}); evaluated as the devkit does, "
                      "pass strict_boxes (--strict) to reject them", stacklevel=2)
    return IlsvrcPredictions(image_ids=rows[:, 0].astype(np.int64), class_ids=rows[:, 1].astype(np.int64),
                             scores=rows[:, 2], boxes=rows[:, 3:7],
                             num_inverted=int(inverted.size))


def write_ilsvrc_submission(path: str | Path, detections: Mapping, dataset: Dataset) -> int:
    """Write detections (image id -> ``(boxes float (N, 4) project xyxy, scores (N,), labels (N,) 1..C)``) as
    a submission file, in the dataset's record order and each image's given order; returns the line count.

    Image ids must be integers; class ids are the vocabulary's (DET ids for ILSVRC). Numbers are written
    with Python's shortest round-trip repr, so reading the file back evaluates exactly as in memory.
    """
    index = {r.image_id: i for i, r in enumerate(dataset.records)}
    warn_outside_dataset(path, detections, index)
    items = sorted((index[k], k, v) for k, v in detections.items() if k in index)
    ids = dataset.vocab.ids

    def write(f):
        count = 0
        for _, image_id, value in items:
            boxes, scores, labels = unpack(value)
            if len(labels) and (labels.min() < 1 or labels.max() > len(ids)):
                raise ValueError(f"detections of image {image_id}: labels must be in 1..{len(ids)}")
            voc = xyxy_to_voc(boxes)  # project xyxy -> 1-based inclusive
            for box, score, label in zip(voc.tolist(), scores.tolist(), labels.tolist()):
                f.write(f"{int(image_id)} {ids[label - 1]} {score!r} {box[0]!r} {box[1]!r} {box[2]!r} {box[3]!r}\n")
            count += len(scores)
        return count

    with atomic_open(path) as f:
        return write(f)


def predictions_to_detections(preds: IlsvrcPredictions, dataset: Dataset) -> dict:
    """Image id -> ``(boxes float64 (N, 4) project xyxy, scores (N,), labels (N,) 1..C)`` of parsed submission
    lines (file order kept per image); class ids are mapped through ``dataset.vocab``."""
    vocab = dataset.vocab
    label_of_id = np.zeros(max(max(vocab.ids), int(preds.class_ids.max(initial=0))) + 1, dtype=np.int64)
    label_of_id[list(vocab.ids)] = np.arange(1, vocab.num_classes + 1)
    labels = label_of_id[preds.class_ids]
    boxes = voc_to_xyxy(preds.boxes)  # 1-based inclusive -> project xyxy
    order = np.argsort(preds.image_ids, kind="stable")
    ids_sorted = preds.image_ids[order]
    starts = np.flatnonzero(np.r_[True, ids_sorted[1:] != ids_sorted[:-1]]) if len(order) else np.zeros(0, int)
    out = {}
    for start, stop in zip(starts, np.r_[starts[1:], len(order)].astype(int)):
        idx = order[start:stop]
        out[int(ids_sorted[start])] = (boxes[idx], preds.scores[idx], labels[idx])
    return out
