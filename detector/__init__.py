"""R-CNN-style detection as in GoogLeNet's ILSVRC 2014 entry.

Data flows one way: image -> proposals -> warp -> classify -> regress -> per-class NMS -> detections
-> evaluation. Each stage is one module of this package (or of :mod:`proposals`).
"""

from detector.errors import UserError
from detector.io import ImageError, load_image
from detector.vocab import Vocabulary, ilsvrc_det_vocabulary

__all__ = ["ImageError", "UserError", "Vocabulary", "ilsvrc_det_vocabulary", "load_image",
           "Detections", "Detector", "load_detector"]
__version__ = "0.1.0"

_PIPELINE_NAMES = ("Detections", "Detector", "load_detector")


def __getattr__(name: str):
    # the detector pulls in torchvision; import it on first use so `import detector` stays light
    if name in _PIPELINE_NAMES:
        from detector import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'detector' has no attribute {name!r}")
