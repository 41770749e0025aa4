"""Dataset readers: ILSVRC DET, PASCAL VOC and COCO JSON, all returning :class:`ImageRecord`."""

from detector.data.coco import read_coco
from detector.data.ilsvrc import (
    IlsvrcDataset,
    read_blacklist,
    read_ilsvrc_det,
    read_image_list,
    read_image_names,
    read_split_in_val,
    train_pos_list,
)
from detector.data.named import open_dataset
from detector.data.records import Dataset, ImageRecord
from detector.data.voc import parse_voc_xml, read_voc

__all__ = [
    "Dataset",
    "IlsvrcDataset",
    "ImageRecord",
    "open_dataset",
    "parse_voc_xml",
    "read_blacklist",
    "read_coco",
    "read_ilsvrc_det",
    "read_image_list",
    "read_image_names",
    "read_split_in_val",
    "read_voc",
    "train_pos_list",
]
