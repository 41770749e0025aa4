"""Precomputed proposals on disk: a folder of checked part files read as one mapping.

A *store* is a folder of *part* files (``*.pstore``, format and checks in :mod:`proposals.part`);
:class:`ProposalStore` opens all of them as one mapping ``image name -> (boxes, scores or None)``. A
single part file can be opened too.

:func:`compact` merges a folder's parts into one (named by its content digest) and only then deletes
the parts it read, so concurrent writers and compactions may leave overlapping parts for a while but
never lose or corrupt an image; every image copied is checked first, so damage is never sealed into a
new part. :func:`verify` checks every image of a store; :func:`set_aside_damaged` renames the damaged
parts out of it (a precompute rerun then redoes their images).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detector.base.defaults import PROPOSAL_METHODS
from detector.base.errors import UserError
from proposals.part import (  # the part-level names are re-exported: this is the module users import
    MAGIC,
    QUANT,
    REPAIR,
    SUFFIX,
    DamagedPart,
    ImageProposals,
    Part,
    clean_temporary,
    decode_boxes,
    encode_boxes,
    write_part,
    write_part_file,
)

__all__ = ["MAGIC", "QUANT", "REPAIR", "SUFFIX", "DamagedPart", "ImageProposals", "Part", "ProposalStore",
           "VerifyReport", "clean_temporary", "compact", "decode_boxes", "encode_boxes", "merge",
           "open_proposal_source", "part_files", "set_aside_damaged", "verify", "write_part"]


def open_proposal_source(value: str | os.PathLike | None) -> str | ProposalStore | None:
    """A tool's ``--proposals``: ``None`` (the checkpoint's method) and a method name
    (:data:`detector.base.defaults.PROPOSAL_METHODS`) as they are, anything else the
    :class:`ProposalStore` at that path (:class:`UserError` if there is none)."""
    if value is None or value in PROPOSAL_METHODS:
        return value
    return ProposalStore(value)


def lookup_keys(name: str | os.PathLike | None, image_id: object = None) -> list[str]:
    """The keys an image may have in a store, in the order :meth:`ProposalStore.find` tries them:
    ``name`` as given, its basename, its stem, then ``str(image_id)`` (duplicates once)."""
    keys = []
    if name is not None:
        keys += [str(name), Path(name).name, Path(name).stem]
    if image_id is not None:
        keys.append(str(image_id))
    return list(dict.fromkeys(keys))


def part_files(path: str | os.PathLike) -> list[Path]:
    """The part files of a store: the file itself, or a folder's ``*.pstore`` files sorted by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.glob("*" + SUFFIX) if p.is_file())
    return []


class ProposalStore:
    """Read precomputed proposals: ``store[image_name] -> (boxes, scores or None)``.

    path: a store folder (all its parts are opened) or one part file. boxes: float32 ``(N, 4)``
    xyxy pixels of the original image, best first; scores: float32 ``(N,)`` or None.

    Names are the keys the writer used (a path relative to the image folder, or a list's image
    name); a lookup that misses retries without the file extension on both sides, so
    ``"ILSVRC2013_val_00000001.JPEG"`` finds ``"ILSVRC2013_val_00000001"`` and vice versa.
    An image recorded as failed raises ``KeyError`` with its reason; ``failures`` lists them all.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        files = part_files(self.path)
        if not files and not self.path.is_dir():
            raise UserError(f"{self.path}: no proposal store here; check the path (a folder or a .pstore file)")
        self.parts: list[Part] = []
        for f in files:
            try:
                self.parts.append(Part(f))
            except FileNotFoundError:  # removed by a concurrent compaction: its content is in a newer part
                continue
        if len(files) != len(self.parts):  # pick up the part that replaced the vanished ones
            known = {p.path for p in self.parts}
            self.parts += [Part(f) for f in part_files(self.path) if f not in known]
        self._index: dict[str, tuple[int, int]] = {}
        self.failures: dict[str, str] = {}
        for i, part in enumerate(self.parts):
            for row, name in enumerate(part.names):
                self._index.setdefault(name, (i, row))
            self.failures.update({n: r for n, r in part.failures.items() if n not in self._index})
        for name in list(self.failures):  # a success in any part beats a recorded failure
            if name in self._index:
                del self.failures[name]
        self._stems: dict[str, str] | None = None
        metas = {json.dumps(p.meta, sort_keys=True) for p in self.parts}
        if len(metas) > 1:
            raise UserError(f"{self.path}: parts were made with different methods or options ({len(metas)} kinds); "
                            "keep one kind per store")
        self.meta = self.parts[0].meta if self.parts else {}

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._index))

    def names(self) -> list[str]:
        """Names of the images with proposals, sorted."""
        return sorted(self._index)

    def find(self, name: str, image_id: object = None) -> str | None:
        """The key under which this store holds an image (its proposals or its recorded failure), or
        ``None``: the one lookup of an image in a store, for the detector and for training.

        Tries, in order, ``name`` as given (a path relative to the image folder), its basename, its stem,
        then ``str(image_id)``; each with the extension-free retry of ``store[...]``. The name comes
        first: an id such as ``3`` could match the stem of another image's file ``3.jpg``.
        """
        for key in lookup_keys(name, image_id):
            found = self._resolve(key)
            if found is not None:
                return found
        return None

    def _resolve(self, name: str) -> str | None:
        if name in self._index or name in self.failures:
            return name
        if self._stems is None:
            self._stems = {}
            for n in list(self._index) + list(self.failures):
                self._stems.setdefault(os.path.splitext(n)[0], n)
        return self._stems.get(os.path.splitext(name)[0])

    def __contains__(self, name: str) -> bool:
        key = self._resolve(name)
        return key is not None and key in self._index

    def __getitem__(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        key = self._resolve(name)
        if key is None:
            raise KeyError(f"{name}: no proposals in {self.path}")
        if key not in self._index:
            raise KeyError(f"{name}: proposals failed in {self.path}: {self.failures[key]}")
        i, row = self._index[key]
        part = self.parts[i]
        boxes, scores = part.rows(row)  # checked against the image's CRC
        return decode_boxes(boxes, tuple(part.sizes[row])), None if scores is None else scores.astype(np.float32)

    def image_size(self, name: str) -> tuple[int, int]:
        """``(h, w)`` of the image the proposals were computed on."""
        key = self._resolve(name)
        if key is None or key not in self._index:
            raise KeyError(name)
        i, row = self._index[key]
        return tuple(int(v) for v in self.parts[i].sizes[row])

    def num_boxes(self) -> int:
        """Total boxes over all images (overlapping parts counted once)."""
        return sum(int(self.parts[i].offsets[row + 1] - self.parts[i].offsets[row]) for i, row in self._index.values())

    def entries(self) -> Iterator[ImageProposals]:
        """Every image (successes and failures) once, sorted by name."""
        for name in sorted(set(self._index) | set(self.failures)):
            if name in self._index:
                i, row = self._index[name]
                yield self.parts[i].entry(row)
            else:
                yield ImageProposals(name, error=self.failures[name])


def merge(sources: Iterable[str | os.PathLike], out_dir: str | os.PathLike, remove_sources: bool = False) -> Path | None:
    """Merge the parts of several stores into one part in ``out_dir`` named ``part-<digest>``.

    Images are sorted by name, so the result depends only on the content, not on how the work was
    split or in which order it finished; a success in any part beats a recorded failure. Boxes are
    streamed from the memory-mapped sources, so memory stays small for any store size. With
    ``remove_sources`` the part files that were read are deleted, only after the merged part is in
    place. Returns the part written, or None if there was nothing to merge.
    """
    out_dir = Path(out_dir)
    parts = []
    for f in (f for s in sources for f in part_files(s)):
        try:
            parts.append(Part(f))
        except FileNotFoundError:  # removed by a concurrent compaction; its content is elsewhere
            continue
    if not parts:
        return None
    metas = {json.dumps(p.meta, sort_keys=True) for p in parts}
    if len(metas) > 1:
        raise UserError(f"cannot merge stores made with different methods or options: {sorted(metas)}")
    where: dict[str, tuple[int, int]] = {}
    failures: dict[str, str] = {}
    for i, part in enumerate(parts):
        for row, name in enumerate(part.names):
            where.setdefault(name, (i, row))
        for name, reason in part.failures.items():
            failures.setdefault(name, reason)
    failures = {n: failures[n] for n in sorted(failures) if n not in where}
    names = sorted(where)
    rows = [where[n] for n in names]
    sizes = np.array([parts[i].sizes[r] for i, r in rows], np.int32).reshape(-1, 2)

    def boxes():  # each image checked against its CRC: a damaged source is refused, never copied
        for i, r in rows:
            yield parts[i].rows(r)[0]

    def scores():
        for i, r in rows:
            lo, hi = parts[i].offsets[r], parts[i].offsets[r + 1]
            yield parts[i].rows(r)[1] if parts[i].scores is not None else np.full(hi - lo, np.nan, np.float16)

    counts = [int(parts[i].offsets[r + 1] - parts[i].offsets[r]) for i, r in rows]
    with_scores = any(p.scores is not None for p in parts)
    target = write_part_file(lambda digest: out_dir / f"part-{digest}{SUFFIX}", names, sizes, counts, boxes(),
                              scores() if with_scores else None, parts[0].meta, failures)
    if remove_sources:
        for p in parts:
            if p.path != target:
                try:
                    p.path.unlink()
                except FileNotFoundError:
                    pass
    return target


def compact(store_dir: str | os.PathLike) -> Path | None:
    """Merge a store folder's parts into one, in place (see :func:`merge`)."""
    files = part_files(store_dir)
    if len(files) == 1 and files[0].name.startswith("part-"):
        return files[0]
    return merge([store_dir], store_dir, remove_sources=True)


@dataclass
class VerifyReport:
    """What :func:`verify` found: parts and images checked, damaged parts (path -> reason), and parts of
    the first format, whose content has no checksum (only their layout could be checked)."""

    parts: int = 0
    images: int = 0
    damaged: dict[Path, str] = field(default_factory=dict)
    unchecked: list[Path] = field(default_factory=list)


def verify(path: str | os.PathLike) -> VerifyReport:
    """Check every part of a store (a folder or one ``.pstore`` file) in full: layout, header and
    index digests, every image's CRC, and a ``part-<digest>`` name. Damaged parts are listed, not raised."""
    path = Path(path)
    if not part_files(path) and not path.is_dir():
        raise UserError(f"{path}: no proposal store here; check the path (a folder or a .pstore file)")
    report = VerifyReport()
    for f in part_files(path):
        try:
            part = Part(f)
            checked = part.verify()
        except FileNotFoundError:  # removed by a concurrent compaction; its content is in a newer part
            continue
        except DamagedPart as err:
            report.damaged[f] = err.reason
            continue
        report.parts += 1
        report.images += len(part.names) + len(part.failures)
        if not checked:
            report.unchecked.append(f)
    return report


def set_aside_damaged(store_dir: str | os.PathLike) -> dict[Path, str]:
    """Verify a store folder and rename each damaged part to ``<name>.damaged`` (no longer part of the
    store, kept for inspection; delete it at will). Returns ``{renamed file: reason}``."""
    moved = {}
    for f, reason in verify(store_dir).damaged.items():
        aside = f.with_name(f.name + ".damaged")
        try:
            os.replace(f, aside)
        except FileNotFoundError:  # a concurrent run set it aside first
            continue
        except OSError as err:
            raise UserError(f"{f}: damaged proposal store part ({reason}) that cannot be set aside "
                            f"({err.strerror or err}); delete it and rerun") from None
        moved[aside] = reason
    return moved
