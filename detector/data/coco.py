"""COCO JSON reader (instances format): images, categories, annotations with ``iscrowd``.

Boxes enter the project's convention only through :func:`detector.base.boxes.coco_to_xyxy`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from detector.base.boxes import coco_to_xyxy
from detector.base.errors import UserError
from detector.base.vocab import Vocabulary
from detector.data.records import Dataset, ImageRecord


def read_json_file(path: str | Path, what: str):
    """The parsed JSON of ``path``; a missing or malformed file is a :class:`UserError` naming ``what``."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    except UnicodeDecodeError as err:  # binary data, or text in another encoding
        raise UserError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                        f"the {what} must be UTF-8 JSON") from None


def load_coco_json(json_path: str | Path) -> dict:
    """The parsed JSON; a missing or malformed file, or missing top-level keys, is a :class:`UserError`."""
    json_path = Path(json_path)
    data = read_json_file(json_path, "COCO annotation file")
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise UserError(f"{json_path}: expected a COCO instances file with 'images', 'annotations' and "
                        "'categories'")
    return data


def coco_vocabulary(categories: list[dict]) -> Vocabulary:
    """Vocabulary from COCO categories, sorted by id (ids = COCO category ids).

    A category that is the ``supercategory`` of other categories is dropped: Roboflow exports add
    such a parent (e.g. id 0 'pieces' over the chess pieces) that has no boxes of its own.
    """
    parents = {c.get("supercategory") for c in categories}
    kept = sorted((c for c in categories if not (c["name"] in parents and
                   any(o.get("supercategory") == c["name"] and o is not c for o in categories))),
                  key=lambda c: int(c["id"]))
    return Vocabulary(ids=tuple(int(c["id"]) for c in kept), names=tuple(str(c["name"]) for c in kept))


def read_coco(json_path: str | Path, image_root: str | Path | None = None) -> Dataset:
    """Read a COCO instances JSON.

    image_root: folder the images' ``file_name`` are relative to (default: the JSON's folder).

    Records (in the JSON's image order): ``image_id`` int, ``image_size`` ``(h, w)``, ``gt_boxes``
    float32 ``(G, 4)`` project xyxy, ``gt_labels`` ``1..C``, ``iscrowd`` kept. Vocabulary ids are the COCO
    category ids. Annotations of a dropped parent category are skipped with a warning.
    """
    json_path = Path(json_path)
    data = load_coco_json(json_path)
    vocab = coco_vocabulary(data["categories"])
    known = {int(c["id"]) for c in data["categories"]}
    label_of = {cid: i + 1 for i, cid in enumerate(vocab.ids)}
    per_image: dict[int, list[dict]] = {}
    images = {}
    for img in data["images"]:
        image_id = int(img["id"])
        if image_id in images:
            raise UserError(f"{json_path}: image id {image_id} appears twice in 'images'")
        images[image_id] = img
        per_image[image_id] = []
    skipped = 0
    for ann in data["annotations"]:
        image_id, category_id = int(ann["image_id"]), int(ann["category_id"])
        if image_id not in images:
            raise UserError(f"{json_path}: annotation {ann.get('id')} names image {image_id}, which is not in "
                            "'images'")
        if category_id not in label_of:
            if category_id in known:
                skipped += 1
                continue
            raise UserError(f"{json_path}: annotation {ann.get('id')} has category {category_id}, which is not in "
                            "'categories'")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise UserError(f"{json_path}: annotation {ann.get('id')} has bbox {bbox!r}; expected [x, y, w, h]")
        per_image[image_id].append(ann)
    if skipped:
        warnings.warn(f"{json_path}: skipped {skipped} annotations of parent categories", stacklevel=2)
    records = []
    for image_id, img in images.items():
        anns = per_image[image_id]
        size = (int(img["height"]), int(img["width"])) if "height" in img and "width" in img else None
        boxes = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        records.append(ImageRecord(
            image_id=image_id,
            file_name=str(img["file_name"]),
            image_size=size,
            gt_boxes=coco_to_xyxy(boxes).astype(np.float32),
            gt_labels=np.asarray([label_of[int(a["category_id"])] for a in anns], dtype=np.int64),
            iscrowd=np.asarray([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
        ))
    root = Path(image_root) if image_root is not None else json_path.parent
    return Dataset(records=records, vocab=vocab, image_root=root, name=json_path.stem)
