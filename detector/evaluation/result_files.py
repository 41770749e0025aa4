"""The result file of each benchmark: its name and its writer, chosen by the dataset's format.

``ilsvrc_submission.txt`` (:func:`~detector.evaluation.submission.write_ilsvrc_submission`, the devkit's
format), ``coco_results.json`` (:func:`~detector.evaluation.coco.write_coco_results`) and
``voc_detections.txt`` (:func:`~detector.evaluation.voc.write_voc_detections`); each reads detections as
image id -> ``(boxes float32 (N, 4) project xyxy, scores (N,), labels (N,) 1..C of the dataset)``.
The COCO file is written as a stream (one image at a time, one result a line: no list of every result in
memory) and detections of images outside the dataset are counted in a warning, never dropped silently.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from detector.data.records import Dataset
from detector.evaluation.coco import write_coco_results
from detector.evaluation.submission import write_ilsvrc_submission
from detector.evaluation.voc import write_voc_detections

RESULT_FILES = {"ilsvrc": "ilsvrc_submission.txt", "coco": "coco_results.json", "voc": "voc_detections.txt"}
_WRITERS = {"ilsvrc": write_ilsvrc_submission, "coco": write_coco_results, "voc": write_voc_detections}


def write_result_file(out_dir: str | os.PathLike, result_format: str, detections: Mapping,
                      dataset: Dataset) -> tuple[Path, int]:
    """Write ``detections`` as the ``result_format`` (``"ilsvrc"``, ``"coco"`` or ``"voc"``) result file in
    ``out_dir``, atomically; returns the file and its number of detections."""
    if result_format not in RESULT_FILES:
        raise ValueError(f"result format must be one of {sorted(RESULT_FILES)}, got {result_format!r}")
    path = Path(out_dir) / RESULT_FILES[result_format]
    return path, _WRITERS[result_format](path, detections, dataset)
