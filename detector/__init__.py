"""R-CNN-style detection as in GoogLeNet's ILSVRC 2014 entry.

Data flows one way: image -> proposals -> warp -> classify -> regress -> per-class NMS -> detections
-> evaluation. Each stage is one module of this package (or of :mod:`proposals`); the layers, bottom
up, are :mod:`detector.base`, :mod:`detector.data`, :mod:`detector.evaluation`, :mod:`proposals`, the
stage modules here, and :mod:`detector.training`.

The public names below are loaded on first use (PEP 562), so that ``import detector.base.boxes`` or
``import detector.evaluation`` never pays for torch.
"""

from __future__ import annotations

from detector.base.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "UserError": "detector.base.errors",
    "ImageError": "detector.base.io",
    "load_image": "detector.base.io",
    "Vocabulary": "detector.base.vocab",
    "ilsvrc_det_vocabulary": "detector.base.vocab",
    "Detections": "detector.detections",
    "Detector": "detector.pipeline",
    "load_detector": "detector.pipeline",
}
__all__ = sorted(_PUBLIC)

__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
