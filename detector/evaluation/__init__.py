"""Evaluation: ILSVRC DET (devkit-exact), PASCAL VOC (07 11-point, 2010+ all-point) and COCO (pycocotools).

All evaluators take a :class:`~detector.data.records.Dataset` from any reader and detections as a mapping
image id -> ``(boxes float32 (N, 4) project xyxy, scores (N,), labels (N,) 1..C)`` and return an
:class:`EvalResult`.
"""

from detector.evaluation.coco import coco_results_to_detections, evaluate_coco, write_coco_results
from detector.evaluation.diagnose import DiagnoseConfig, Diagnosis, diagnose
from detector.evaluation.diagnose_report import plot_diagnosis
from detector.evaluation.ilsvrc import evaluate_ilsvrc
from detector.evaluation.report import format_table, plot_results, save_json
from detector.evaluation.result import EvalResult
from detector.evaluation.submission import read_ilsvrc_predictions, write_ilsvrc_submission
from detector.evaluation.voc import evaluate_voc, read_voc_predictions, write_voc_detections

__all__ = [
    "DiagnoseConfig",
    "Diagnosis",
    "EvalResult",
    "coco_results_to_detections",
    "diagnose",
    "evaluate_coco",
    "evaluate_ilsvrc",
    "evaluate_voc",
    "format_table",
    "plot_diagnosis",
    "plot_results",
    "read_ilsvrc_predictions",
    "read_voc_predictions",
    "save_json",
    "write_coco_results",
    "write_ilsvrc_submission",
    "write_voc_detections",
]
