"""R-CNN-style detection as in GoogLeNet's ILSVRC 2014 entry.

Data flows one way: image -> proposals -> warp -> classify -> regress -> per-class NMS -> detections
-> evaluation. Each stage is one module of this package (or of :mod:`proposals`).
"""

from detector.errors import UserError
from detector.io import ImageError, load_image
from detector.vocab import Vocabulary, ilsvrc_det_vocabulary

__all__ = ["ImageError", "UserError", "Vocabulary", "ilsvrc_det_vocabulary", "load_image"]
__version__ = "0.1.0"
