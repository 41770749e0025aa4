"""R-CNN-style detection as in GoogLeNet's ILSVRC 2014 entry.

Data flows one way: image -> proposals -> warp -> classify -> regress -> per-class NMS -> detections
-> evaluation. Each stage is one module of this package (or of :mod:`proposals`); the layers, bottom
up, are :mod:`detector.base`, :mod:`detector.data`, :mod:`detector.evaluation`, :mod:`proposals`, the
stage modules here, and :mod:`detector.training`.

The public names below are loaded on first use (PEP 562), so that ``import detector.base.boxes`` or
``import detector.evaluation`` never pays for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "UserError": "detector.base.errors",
    "ImageError": "detector.base.io",
    "load_image": "detector.base.io",
    "Vocabulary": "detector.base.vocab",
    "ilsvrc_det_vocabulary": "detector.base.vocab",
    "Detections": "detector.pipeline",
    "Detector": "detector.pipeline",
    "load_detector": "detector.pipeline",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'detector' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
