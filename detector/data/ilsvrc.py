"""ILSVRC DET reader: image lists, XML annotations (wnids), the blacklist, val1/val2 and training lists.

File formats (ILSVRC2014 devkit ``readme.txt``, section 2.2):

- image list (``val.txt``, ``test.txt``): ``<image name> <image id>`` per line; the image id is what
  prediction files and the blacklist use.
- annotations: one PASCAL-VOC-style XML per image, ``<annotations_dir>/<image name>.xml``; object names
  are wnids, coordinates 1-based and inclusive; an image may have no ``<object>``.
- blacklist: ``<image id> <wnid>`` pairs that evaluation ignores.
- R-CNN's val1/val2 halves (``val1.txt``/``val2.txt``, or ``ilsvrc13_val2.txt`` here): ``<image name>
  <index within the half>``; :func:`read_split_in_val` maps them to val ids.
- training lists ``train_pos_<c>.txt``: one image name per line.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from detector.base.boxes import voc_to_xyxy
from detector.base.errors import UserError
from detector.base.files import text_lines
from detector.base.vocab import Vocabulary, ilsvrc_det_vocabulary
from detector.data.records import Dataset, ImageRecord
from detector.data.voc import parse_annotation_bytes, read_annotation_bytes


@dataclass
class IlsvrcDataset(Dataset):
    """A :class:`Dataset` plus the blacklisted ``(image_id, label)`` pairs of its images."""

    blacklist: frozenset[tuple[int, int]] = field(default_factory=frozenset)


def _lines(path: Path, what: str) -> Iterable[tuple[int, list[str]]]:
    if not path.is_file():
        raise UserError(f"{path}: {what} not found; check the path")
    for lineno, line in text_lines(path, what):  # not UTF-8, or binary: one line naming the line
        fields = line.split()
        if fields:
            yield lineno, fields


def read_image_list(path: str | Path) -> list[tuple[str, int]]:
    """``(image name, image id)`` pairs of a ``val.txt``-style list, in file order.

    A line with only a name gets its line number as id (the devkit's lists number their lines).
    Wrong column counts, non-integer ids and duplicate names or ids are a :class:`UserError`.
    """
    path = Path(path)
    out: list[tuple[str, int]] = []
    id_line: dict[int, int] = {}
    name_line: dict[str, int] = {}
    for lineno, fields in _lines(path, "image list"):
        if len(fields) > 2:
            raise UserError(f"{path}:{lineno}: expected '<image name> <image id>', got {len(fields)} columns")
        name = fields[0]
        try:
            image_id = int(fields[1]) if len(fields) == 2 else lineno
        except ValueError:
            raise UserError(f"{path}:{lineno}: image id {fields[1]!r} is not an integer") from None
        if image_id in id_line:
            raise UserError(f"{path}:{lineno}: duplicate image id {image_id} (first on line {id_line[image_id]})")
        if name in name_line:
            raise UserError(f"{path}:{lineno}: duplicate image {name} (first on line {name_line[name]})")
        id_line[image_id] = lineno
        name_line[name] = lineno
        out.append((name, image_id))
    return out


def read_image_names(path: str | Path) -> list[str]:
    """Image names of a one-name-per-line list such as ``train_pos_<c>.txt`` (first column)."""
    return [fields[0] for _, fields in _lines(Path(path), "image list")]


def train_pos_list(det_lists_dir: str | Path, class_id: int) -> list[str]:
    """Training images holding DET class ``class_id`` (``det_lists/train_pos_<class_id>.txt``)."""
    return read_image_names(Path(det_lists_dir) / f"train_pos_{int(class_id)}.txt")


def read_split_in_val(split_list: str | Path, val_list: str | Path) -> list[tuple[str, int]]:
    """R-CNN's val1/val2 half as ``(image name, val id)`` pairs: names from ``split_list``, ids from
    ``val_list`` (``val.txt``). A name missing from ``val_list`` is a :class:`UserError`."""
    val_ids = dict(read_image_list(val_list))
    out = []
    for lineno, fields in _lines(Path(split_list), "split list"):
        if fields[0] not in val_ids:
            raise UserError(f"{split_list}:{lineno}: image {fields[0]} is not in {val_list}")
        out.append((fields[0], val_ids[fields[0]]))
    return out


def read_blacklist(path: str | Path, vocab: Vocabulary | None = None) -> frozenset[tuple[int, int]]:
    """The blacklist as ``(image id, label)`` pairs; an unknown wnid is a :class:`UserError`."""
    path = Path(path)
    vocab = vocab or ilsvrc_det_vocabulary()
    pairs = set()
    for lineno, fields in _lines(path, "blacklist"):
        if len(fields) != 2:
            raise UserError(f"{path}:{lineno}: expected '<image id> <wnid>', got {len(fields)} columns")
        try:
            image_id = int(fields[0])
        except ValueError:
            raise UserError(f"{path}:{lineno}: image id {fields[0]!r} is not an integer") from None
        try:
            label = vocab.label_of_wnid(fields[1])
        except KeyError:
            raise UserError(f"{path}:{lineno}: wnid {fields[1]} is not one of the {vocab.num_classes} classes; "
                            "check the blacklist and the meta file") from None
        pairs.add((image_id, label))
    return frozenset(pairs)


def read_ilsvrc_det(image_list: str | Path | Sequence[tuple[str, int]], annotations_dir: str | Path,
                    vocab: Vocabulary | None = None,
                    blacklist: str | Path | Iterable[tuple[int, int]] | None = None,
                    image_root: str | Path | None = None, progress: bool = False) -> IlsvrcDataset:
    """Read ILSVRC DET ground truth for the images of a list.

    image_list: a ``val.txt``-style file or ``(image name, image id)`` pairs.
    annotations_dir: folder of ``<image name>.xml`` (names may hold subfolders).
    vocab: the classes (wnids required); default: :func:`detector.base.vocab.ilsvrc_det_vocabulary`.
    blacklist: a blacklist file or ``(image id, label)`` pairs; kept for the listed images only.
    image_root: where the ``<image name>.JPEG`` files are (optional; the images are not needed to evaluate).

    Records: ``image_id`` int, ``file_name`` ``<name>.JPEG``, ``image_size`` ``(h, w)`` from the XML,
    ``gt_boxes`` float32 ``(G, 4)`` project xyxy, ``gt_labels`` ``1..200`` (== DET id for the default vocab).
    A missing XML, an unknown wnid or a duplicate image id is a :class:`UserError` naming the file or line.
    """
    vocab = vocab or ilsvrc_det_vocabulary()
    if vocab.wnids is None:
        raise UserError("the ILSVRC reader needs a vocabulary with wnids (e.g. from meta_det.mat)")
    if isinstance(image_list, (str, Path)):
        entries = read_image_list(image_list)
        list_name = Path(image_list).name
    else:
        entries = [(str(name), int(image_id)) for name, image_id in image_list]
        seen: set[int] = set()
        for _, image_id in entries:
            if image_id in seen:
                raise UserError(f"image list: duplicate image id {image_id}")
            seen.add(image_id)
        list_name = "images"
    annotations_dir = Path(annotations_dir)
    if not annotations_dir.is_dir():
        raise UserError(f"{annotations_dir}: annotations folder not found")
    label_of = {w: i + 1 for i, w in enumerate(vocab.wnids)}
    folder = str(annotations_dir)
    sizes, counts, all_boxes, all_labels = [], [], [], []
    for name, _ in tqdm(entries, desc="reading annotations", unit="xml", disable=not progress, mininterval=0.5):
        xml_path = os.path.join(folder, name + ".xml")
        _, image_size, names, boxes, _ = parse_annotation_bytes(read_annotation_bytes(xml_path), xml_path)
        for wnid in names:
            label = label_of.get(wnid)
            if label is None:
                raise UserError(f"{xml_path}: object name {wnid} is not a wnid of the {vocab.num_classes} "
                                "classes; check the meta file")
            all_labels.append(label)
        sizes.append(image_size)
        counts.append(len(names))
        all_boxes.extend(boxes)
    # One conversion for all objects: 1-based inclusive XML coordinates -> project xyxy.
    gt_boxes = voc_to_xyxy(np.asarray(all_boxes, dtype=np.float64).reshape(-1, 4)).astype(np.float32)
    gt_labels = np.asarray(all_labels, dtype=np.int64)
    splits = np.cumsum(counts)[:-1]
    records = [ImageRecord(image_id=image_id, file_name=f"{name}.JPEG", image_size=size, gt_boxes=boxes,
                           gt_labels=labels)
               for (name, image_id), size, boxes, labels in zip(entries, sizes, np.split(gt_boxes, splits),
                                                                np.split(gt_labels, splits))]
    if blacklist is None:
        pairs: frozenset[tuple[int, int]] = frozenset()
    elif isinstance(blacklist, (str, Path)):
        pairs = read_blacklist(blacklist, vocab)
    else:
        pairs = frozenset((int(i), int(c)) for i, c in blacklist)
    listed = {r.image_id for r in records}
    pairs = frozenset(p for p in pairs if p[0] in listed)
    return IlsvrcDataset(records=records, vocab=vocab, image_root=Path(image_root) if image_root else None,
                         name=list_name, blacklist=pairs)
