"""A dataset named by its annotations path, whatever the format (COCO JSON, VOC root, ILSVRC XML folder)."""

from __future__ import annotations

from pathlib import Path

from detector.base.errors import UserError
from detector.data.coco import read_coco
from detector.data.ilsvrc import read_ilsvrc_det
from detector.data.records import Dataset
from detector.data.voc import read_voc


def open_dataset(annotations: str | Path, split: str = "train", image_list: str | Path | None = None,
                 image_root: str | Path | None = None) -> Dataset:
    """A dataset named by its annotations.

    annotations: a COCO instances ``.json``; a PASCAL VOC root (holding ``ImageSets/Main/<split>.txt``);
    or an ILSVRC DET annotations folder of XMLs, with ``image_list`` (a ``val.txt``-style list) and
    ``image_root`` (where the ``.JPEG`` files are).
    """
    path = Path(annotations)
    if path.is_file() and path.suffix.lower() == ".json":
        return read_coco(path, image_root)
    if path.is_dir() and (path / "ImageSets" / "Main").is_dir():
        return read_voc(path, split)
    if path.is_dir() and image_list is not None:
        return read_ilsvrc_det(image_list, path, image_root=image_root, progress=True)
    if not path.exists():
        raise UserError(f"annotations '{path}' not found; pass a COCO .json, a VOC root or an ILSVRC "
                        "Annotations folder with --image-list")
    raise UserError(f"annotations '{path}': not a COCO .json nor a VOC root (no ImageSets/Main); for ILSVRC "
                    "pass its Annotations folder with --image-list")
