"""Class vocabularies: the dataset's own class ids, names and (for ImageNet) wnids.

A model never sees dataset ids. It sees contiguous labels: ``0`` is background and ``1..C`` are the
vocabulary's classes in order. ``Vocabulary`` converts between the two.

The 200 ILSVRC DET classes ship with the package (``resources/ilsvrc_det200.tsv``, generated from
the devkit's ``meta_det.mat`` by ``tools/make_ilsvrc_vocab.py``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

BACKGROUND = 0


@dataclass(frozen=True)
class Vocabulary:
    """Classes in label order: ``ids[i]`` and ``names[i]`` belong to label ``i + 1``.

    ids: the dataset's own class ids (ILSVRC DET id, COCO category id, ...), unique.
    names: human-readable names, unique.
    wnids: WordNet ids for ImageNet vocabularies, else ``None``.
    """

    ids: tuple[int, ...]
    names: tuple[str, ...]
    wnids: tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "ids", tuple(int(i) for i in self.ids))
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        if self.wnids is not None:
            object.__setattr__(self, "wnids", tuple(str(w) for w in self.wnids))
        if len(self.ids) != len(self.names) or (self.wnids is not None and len(self.wnids) != len(self.ids)):
            raise ValueError("vocabulary: ids, names and wnids must have the same length")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("vocabulary: class ids must be unique")
        if len(set(self.names)) != len(self.names):
            raise ValueError("vocabulary: class names must be unique")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        """``C``, the number of object classes (background not counted)."""
        return len(self.ids)

    def label_of_id(self, class_id: int) -> int:
        """Dataset class id -> contiguous label in ``1..C``."""
        try:
            return self._label_by_id[int(class_id)]
        except KeyError:
            raise KeyError(f"class id {class_id} is not in this vocabulary") from None

    def id_of_label(self, label: int) -> int:
        """Contiguous label in ``1..C`` -> dataset class id."""
        if not 1 <= label <= len(self.ids):
            raise KeyError(f"label {label} is outside 1..{len(self.ids)}")
        return self.ids[label - 1]

    def name_of_label(self, label: int) -> str:
        if label == BACKGROUND:
            return "background"
        if not 1 <= label <= len(self.ids):
            raise KeyError(f"label {label} is outside 1..{len(self.ids)}")
        return self.names[label - 1]

    def label_of_name(self, name: str) -> int:
        try:
            return self.names.index(name) + 1
        except ValueError:
            raise KeyError(f"class name {name!r} is not in this vocabulary") from None

    def label_of_wnid(self, wnid: str) -> int:
        if self.wnids is None:
            raise KeyError("this vocabulary has no wnids")
        try:
            return self._label_by_wnid[wnid]
        except KeyError:
            raise KeyError(f"wnid {wnid!r} is not in this vocabulary") from None

    @property
    def _label_by_id(self) -> dict[int, int]:
        cache = self.__dict__.get("_ids_cache")
        if cache is None:
            cache = {cid: i + 1 for i, cid in enumerate(self.ids)}
            object.__setattr__(self, "_ids_cache", cache)
        return cache

    @property
    def _label_by_wnid(self) -> dict[str, int]:
        cache = self.__dict__.get("_wnid_cache")
        if cache is None:
            cache = {w: i + 1 for i, w in enumerate(self.wnids or ())}
            object.__setattr__(self, "_wnid_cache", cache)
        return cache

    def to_dict(self) -> dict:
        out = {"ids": list(self.ids), "names": list(self.names)}
        if self.wnids is not None:
            out["wnids"] = list(self.wnids)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        return cls(ids=tuple(data["ids"]), names=tuple(data["names"]),
                   wnids=tuple(data["wnids"]) if data.get("wnids") is not None else None)


def read_vocabulary_tsv(path: str | Path) -> Vocabulary:
    """Read a ``id<TAB>wnid<TAB>name`` file (header line first) as a vocabulary."""
    ids, wnids, names = [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header != ["id", "wnid", "name"]:
            raise ValueError(f"{path}: expected the header 'id<TAB>wnid<TAB>name', got {header!r}")
        for lineno, row in enumerate(reader, start=2):
            if len(row) != 3:
                raise ValueError(f"{path}:{lineno}: expected 3 tab-separated columns, got {len(row)}")
            ids.append(int(row[0]))
            wnids.append(row[1])
            names.append(row[2])
    return Vocabulary(ids=tuple(ids), names=tuple(names), wnids=tuple(wnids))


def ilsvrc_det_vocabulary() -> Vocabulary:
    """The 200 ILSVRC 2014 DET classes, DET ids 1..200 (label == DET id)."""
    ref = resources.files("detector") / "resources" / "ilsvrc_det200.tsv"
    with resources.as_file(ref) as path:
        return read_vocabulary_tsv(path)


def read_meta_det(path: str | Path) -> Vocabulary:
    """The 200 DET classes from the devkit's ``meta_det.mat`` (rows with DET id 1..200)."""
    from scipy.io import loadmat

    mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
    synsets = mat["synsets"]
    rows = []
    for s in synsets:
        det_id = int(getattr(s, "ILSVRC2013_DET_ID", getattr(s, "ILSVRC2014_DET_ID", 0)))
        if 1 <= det_id <= 200:
            rows.append((det_id, str(s.WNID), str(s.name)))
    rows.sort()
    if [r[0] for r in rows] != list(range(1, 201)):
        raise ValueError(f"{path}: expected DET ids 1..200, found {len(rows)} classes")
    return Vocabulary(ids=tuple(r[0] for r in rows), names=tuple(r[2] for r in rows),
                      wnids=tuple(r[1] for r in rows))
