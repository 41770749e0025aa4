"""The one source of every default and constant shared by more than one module or tool.

Plain values only (no project imports, no torch), so every layer can read them. A module that owns a
setting names it in its config dataclass with the value from here; tools take their flag defaults
from here too, so a default is changed in one place.
"""

from __future__ import annotations

# Proposals scored per image: R-CNN scored ~2,000 Selective Search boxes, and fast mode keeps its
# 2,000 best-ranked by default.
MAX_PROPOSALS = 2000
PROPOSAL_METHOD = "ss-fast"  # what a checkpoint proposes with when it names nothing else
# every method of proposals.propose (Selective Search modes, MultiBox, the GoogLeNet merge)
PROPOSAL_METHODS = ("ss-fast", "ss-quality", "ss-single", "multibox", "googlenet")
# Selective Search implementations behind proposals.selective_search (proposals/backends.py)
SS_BACKENDS = ("native", "opencv", "selectivesearch")

# R-CNN's box parameterization: targets (dx, dy, dw, dh) are multiplied by these (wx, wy, ww, wh), the
# inverse of the deltas' standard deviations (0.1, 0.1, 0.2, 0.2) of Girshick et al. / torchvision.
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)

# ImageNet's per-channel mean and standard deviation of RGB in [0, 1] (torchvision's normalization).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Post-processing (R-CNN's settings): keep (region, class) pairs with probability in
# [SCORE_THRESHOLD, 1]; suppress same-class boxes with IoU in (NMS_IOU, 1] against a kept one; keep at
# most MAX_DETECTIONS per image.
SCORE_THRESHOLD = 0.05
NMS_IOU = 0.3
MAX_DETECTIONS = 100
BOX_VOTING = 0.0  # box voting after NMS (detector.postprocess): off, as in R-CNN

# The network's precision, in every tool (--precision): "auto" picks per task (detection: bf16 where the
# hardware has it natively, else fp32; training: bf16 autocast on a GPU with bf16, else fp32); "fp16"
# needs a GPU (training: with a gradient scaler).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Crops per forward pass of the detection engine (filled across images): small batches suit a CPU
# (no gain beyond 64, more memory), a GPU needs large ones to be busy (issue 12: batch 1024 on an H200).
BATCH_SIZE_CPU = 64
BATCH_SIZE_CUDA = 1024

DEFAULT_MAX_PIXELS = 50_000_000  # images above 50 megapixels are refused from the header


def default_proposals() -> dict:
    """The ``proposals`` section of a checkpoint config that names nothing else (a fresh dict)."""
    return {"method": PROPOSAL_METHOD, "options": {}, "max_proposals": MAX_PROPOSALS}


def default_postprocess() -> dict:
    """The ``postprocess`` section of a checkpoint config that names nothing else (a fresh dict)."""
    return {"score_threshold": SCORE_THRESHOLD, "nms_iou": NMS_IOU, "max_detections": MAX_DETECTIONS}
