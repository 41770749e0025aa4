"""PASCAL VOC reader: ``Annotations/<id>.xml`` listed by ``ImageSets/Main/<split>.txt``.

The XML parser here is shared with the ILSVRC DET reader, whose annotations use the same layout
(object names are wnids there). XML coordinates are 1-based and inclusive; they enter the project's
convention only through :func:`detector.base.boxes.voc_to_xyxy`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector.base.boxes import voc_to_xyxy
from detector.base.errors import UserError
from detector.base.files import text_lines
from detector.base.vocab import Vocabulary
from detector.data.records import Dataset, ImageRecord


@dataclass(frozen=True)
class VocAnnotation:
    """One parsed VOC-style XML file.

    filename: the ``<filename>`` text ('' when absent).
    image_size: ``(h, w)`` from ``<size>``, or ``None`` when absent.
    names: the ``<name>`` of each object, in file order.
    boxes: float64 ``(G, 4)``, ``[xmin, ymin, xmax, ymax]`` as written (1-based, inclusive).
    difficult: bool ``(G,)``, ``<difficult>1</difficult>`` (absent means 0).
    """

    filename: str
    image_size: tuple[int, int] | None
    names: tuple[str, ...]
    boxes: np.ndarray
    difficult: np.ndarray


def _bad_number(path, what: str, tag: str, text: str | None) -> UserError:
    if text is None:
        return UserError(f"{path}: {what} has no <{tag}>; fix or remove that annotation")
    return UserError(f"{path}: {what} <{tag}> is {text.strip()!r}, not a finite number; fix the annotation")


def _number(node: ET.Element, tag: str, path, what: str) -> float:
    text = node.findtext(tag)
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise _bad_number(path, what, tag, text) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise _bad_number(path, what, tag, text)
    return value


_BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")


def parse_annotation_bytes(data: bytes, path
                           ) -> tuple[str, tuple[int, int] | None, list[str], list[list[float]], list[bool]]:
    """One VOC/ILSVRC XML document -> ``(filename, (h, w) or None, names, boxes [xmin, ymin, xmax, ymax]
    1-based inclusive as in the file, difficult flags)``; ``path`` only names the file in errors."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        raise UserError(f"{path}: not valid XML ({err}); re-extract the annotations") from None
    size = root.find("size")
    image_size = None
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        image_size = (int(_number(size, "height", path, "<size>")), int(_number(size, "width", path, "<size>")))
    names, boxes, difficult = [], [], []
    for index, obj in enumerate(root.iter("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise UserError(f"{path}: object {index} has no <name>; fix the annotation")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise UserError(f"{path}: object {index} ({name}) has no <bndbox>; fix the annotation")
        boxes.append([_number(bndbox, tag, path, f"object {index}") for tag in _BOX_TAGS])
        names.append(name)
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    return (root.findtext("filename") or "").strip(), image_size, names, boxes, difficult


def read_annotation_bytes(path) -> bytes:
    """The bytes of an annotation file; a missing or unreadable file is a :class:`UserError`."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: annotation file not found; check the annotations folder") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read annotation ({err.strerror})") from None


def parse_voc_xml(path: str | Path) -> VocAnnotation:
    """Parse one VOC/ILSVRC XML file; a missing or malformed file is a :class:`UserError`."""
    filename, image_size, names, boxes, difficult = parse_annotation_bytes(read_annotation_bytes(path), path)
    return VocAnnotation(
        filename=filename,
        image_size=image_size,
        names=tuple(names),
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        difficult=np.asarray(difficult, dtype=bool),
    )


def read_split_file(path: str | Path) -> list[str]:
    """Image ids of a VOC ``ImageSets/Main/<split>.txt`` (first column of each non-empty line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: split list not found; pass an existing split (e.g. train, val, test)")
    ids = []
    seen: dict[str, int] = {}
    for lineno, line in text_lines(path, "split list"):  # not UTF-8, or binary: one line naming the line
        fields = line.split()
        if not fields:
            continue
        if fields[0] in seen:
            raise UserError(f"{path}:{lineno}: image {fields[0]} is listed twice (first on line {seen[fields[0]]})")
        seen[fields[0]] = lineno
        ids.append(fields[0])
    return ids


def read_voc(root: str | Path, split: str = "test", class_names: tuple[str, ...] | list[str] | None = None,
             ) -> Dataset:
    """Read a PASCAL VOC-format dataset.

    root: folder holding ``Annotations/``, ``ImageSets/Main/`` and ``JPEGImages/``.
    split: name of the list in ``ImageSets/Main/`` (``<split>.txt``).
    class_names: the vocabulary in label order; default: the sorted class names found in the split.
        Objects named outside ``class_names`` are a :class:`UserError`.

    Records: ``image_id`` is the file stem (str), boxes in project ``xyxy``, ``difficult`` kept.
    Vocabulary ids are ``1..C`` in label order.
    """
    root = Path(root)
    image_ids = read_split_file(root / "ImageSets" / "Main" / f"{split}.txt")
    parsed = [(image_id, parse_voc_xml(root / "Annotations" / f"{image_id}.xml")) for image_id in image_ids]
    if class_names is None:
        class_names = sorted({name for _, ann in parsed for name in ann.names})
    vocab = Vocabulary(ids=tuple(range(1, len(class_names) + 1)), names=tuple(class_names))
    label_of = {name: i + 1 for i, name in enumerate(vocab.names)}
    records = []
    for image_id, ann in parsed:
        unknown = [n for n in ann.names if n not in label_of]
        if unknown:
            raise UserError(f"{root / 'Annotations' / (image_id + '.xml')}: class {unknown[0]!r} is not in the "
                            f"vocabulary {list(vocab.names)}; pass class_names= with every class")
        records.append(ImageRecord(
            image_id=image_id,
            file_name=ann.filename or f"{image_id}.jpg",
            image_size=ann.image_size,
            gt_boxes=voc_to_xyxy(ann.boxes).astype(np.float32),
            gt_labels=np.asarray([label_of[n] for n in ann.names], dtype=np.int64),
            difficult=ann.difficult,
        ))
    return Dataset(records=records, vocab=vocab, image_root=root / "JPEGImages", name=f"{root.name}/{split}")
