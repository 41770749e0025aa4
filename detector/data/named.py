"""A dataset named by its path, whatever the format (COCO JSON, VOC root, ILSVRC list and XML folder).

The one rule every tool uses to turn a path into a dataset.
"""

from __future__ import annotations

from pathlib import Path

from detector.base.errors import UserError
from detector.data.coco import read_coco
from detector.data.ilsvrc import read_ilsvrc_det
from detector.data.records import Dataset
from detector.data.voc import read_voc

FORMATS = ("coco", "voc", "ilsvrc")


def dataset_format(path: str | Path) -> str | None:
    """``"coco"`` for a ``.json`` file, ``"voc"`` for a folder with ``ImageSets/Main`` or ``Annotations``,
    ``"ilsvrc"`` for a folder of XMLs or a ``.txt`` image list; ``None`` for anything else."""
    path = Path(path)
    if path.is_file():
        return {".json": "coco", ".txt": "ilsvrc"}.get(path.suffix.lower())
    if path.is_dir():
        voc = (path / "ImageSets" / "Main").is_dir() or (path / "Annotations").is_dir()
        return "voc" if voc else "ilsvrc"
    return None


def open_dataset(path: str | Path, split: str = "train", image_list: str | Path | None = None,
                 image_root: str | Path | None = None, *, annotations: str | Path | None = None,
                 format: str | None = None, progress: bool = True) -> Dataset:
    """The dataset at ``path``; :class:`UserError` if it is missing, of no known layout, or has no images.

    path: a COCO instances ``.json``; a PASCAL VOC root (``Annotations/``, ``ImageSets/Main/<split>.txt``);
        or ILSVRC DET given either way round: its folder of XML annotations with ``image_list`` (a
        ``val.txt``-style list), or the list (``.txt``) with ``annotations`` (the XML folder).
    image_root: where the images are (COCO default: the JSON's folder; ILSVRC: the ``.JPEG`` folder).
    format: ``"coco"``, ``"voc"`` or ``"ilsvrc"`` to read ``path`` as that format; ``None``: told by the
        path (:func:`dataset_format`).
    progress: a progress bar while ILSVRC's XML files are read.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"dataset '{path}' does not exist; pass a COCO .json file, a VOC folder or ILSVRC "
                        "annotations (an image list and its XML folder)")
    if format not in (None, *FORMATS):
        raise ValueError(f"format must be one of {', '.join(FORMATS)} or None, got {format!r}")
    fmt = format or dataset_format(path)
    if fmt == "coco":
        dataset = read_coco(path, image_root)
    elif fmt == "voc":
        dataset = read_voc(path, split)
    elif fmt == "ilsvrc":
        xml_folder, listed = (path, image_list) if path.is_dir() else (annotations, path)
        if xml_folder is None or listed is None:
            what = "an ILSVRC image list: give the folder of its XML annotations too" if path.is_file() else (
                "not a COCO .json nor a VOC folder (no ImageSets/Main); for ILSVRC annotations give their "
                "image list too")
            raise UserError(f"dataset '{path}': {what}")
        dataset = read_ilsvrc_det(listed, xml_folder, image_root=image_root, progress=progress)
    else:
        raise UserError(f"dataset '{path}': not a COCO .json file, a VOC folder or ILSVRC annotations (an image "
                        "list .txt and its XML folder)")
    if len(dataset) == 0:
        raise UserError(f"dataset '{path}'{f' split {split}' if fmt == 'voc' else ''} has no images; check the "
                        "path and the split")
    return dataset
