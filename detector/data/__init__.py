"""Dataset readers: ILSVRC DET, PASCAL VOC and COCO JSON, all returning :class:`ImageRecord`."""

from detector.data.records import Dataset, ImageRecord

__all__ = ["Dataset", "ImageRecord"]
