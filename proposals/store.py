"""Precomputed proposals on disk: compact, memory-mapped, safe to write from many processes.

A *store* is a folder of *part* files (``*.pstore``); :class:`ProposalStore` opens all of them as
one mapping ``image name -> (boxes, scores or None)``. A single part file can be opened too.

A part file holds, for a set of images, every array in one file:

- ``PSTORE01`` (8 bytes), the header length (uint64 little-endian), a JSON header (``meta``: the
  method and options; ``arrays``: dtype, shape and byte offset of each array; ``failures``: image
  name -> reason), then the arrays, each 64-byte aligned;
- ``names``: the image names, UTF-8, joined by newlines; ``sizes``: int32 ``(I, 2)`` image
  ``(h, w)``; ``offsets``: int64 ``(I + 1,)`` where image ``i``'s boxes are rows
  ``offsets[i]:offsets[i+1]``; ``boxes``: uint16 ``(M, 4)``; optionally ``scores``: float16 ``(M,)``.

Boxes are stored as fractions of the image size in steps of 1/65535 (``x1 = q * w / 65535``): 8
bytes per box (10 with scores), at most ``w / 131070`` pixels off (0.004 px on a 500-pixel side).
Reading maps the file (``numpy.memmap``), so opening costs only the names index and a lookup
touches only that image's rows.

Writes are atomic: a part is written to a temporary file in the same folder, flushed, then renamed
over its final name; readers never see a partial part. :func:`compact` merges a folder's parts into
one (named by its content digest) and only then deletes the parts it read, so concurrent writers
and compactions may leave overlapping parts for a while but never lose or corrupt an image.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector.errors import UserError

MAGIC = b"PSTORE01"
SUFFIX = ".pstore"
QUANT = 65535.0  # box coordinates are multiples of 1/QUANT of the image size
_ALIGN = 64


def encode_boxes(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """float ``(N, 4)`` xyxy pixels of an image of ``image_size = (h, w)`` -> uint16 ``(N, 4)``
    fractions of the image size (clipped to the image)."""
    h, w = image_size
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / np.array([w, h, w, h], np.float64)
    return np.rint(np.clip(b, 0.0, 1.0) * QUANT).astype(np.uint16)


def decode_boxes(q: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """uint16 ``(N, 4)`` from :func:`encode_boxes` -> float32 ``(N, 4)`` xyxy pixels."""
    h, w = image_size
    scale = np.array([w, h, w, h], np.float32) / np.float32(QUANT)
    return np.asarray(q, dtype=np.float32).reshape(-1, 4) * scale


@dataclass
class ImageProposals:
    """One image's entry for :func:`write_part`: a success (``boxes`` uint16 from
    :func:`encode_boxes`, ``scores`` or None) or a failure (``error`` set, no boxes)."""

    name: str
    image_size: tuple[int, int] = (0, 0)
    boxes: np.ndarray | None = None
    scores: np.ndarray | None = None
    error: str | None = None


def _check_name(name: str) -> str:
    if not name or "\n" in name or "\r" in name:
        raise UserError(f"image name {name!r} cannot be stored: names must be non-empty, without line breaks")
    return name


def write_part(path: str | os.PathLike, entries: Iterable[ImageProposals], meta: dict) -> Path:
    """Write one part file atomically. Entries keep their order; a name may appear only once.

    Returns the path written. ``meta`` (JSON-serializable) records how the proposals were made.
    """
    entries = list(entries)
    ok = [e for e in entries if e.error is None]
    failures = {_check_name(e.name): str(e.error).replace("\n", " ") for e in entries if e.error is not None}
    names = [_check_name(e.name) for e in ok]
    if len(set(names)) + len(failures) != len(entries):
        raise ValueError("write_part: an image name appears twice")
    boxes = [np.asarray(e.boxes, np.uint16).reshape(-1, 4) for e in ok]
    scores = None
    if any(e.scores is not None for e in ok):
        scores = [np.asarray(e.scores if e.scores is not None else np.full(len(b), np.nan), np.float16).reshape(-1)
                  for e, b in zip(ok, boxes)]
    sizes = np.array([e.image_size for e in ok], np.int32).reshape(-1, 2)
    counts = [len(b) for b in boxes]
    return _write_part_file(lambda digest: Path(path), names, sizes, counts, boxes, scores, meta, failures)


def _write_part_file(target, names: list[str], sizes: np.ndarray, counts, boxes, scores, meta: dict,
                     failures: dict) -> Path:
    """Stream a part file: ``counts[i]`` boxes for image ``i``; ``boxes`` (and ``scores`` or None)
    are iterables of per-image arrays (memory-mapped slices are fine, they are read one at a time).
    Written to a temporary file in the target's folder, then renamed to ``target(digest)`` (digest:
    blake2b of the file's bytes)."""
    counts = np.asarray(counts, np.int64).reshape(-1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    arrays = {
        "names": (np.dtype(np.uint8), ("\n".join(names)).encode("utf-8")),
        "sizes": (np.dtype(np.int32), np.ascontiguousarray(sizes, np.int32)),
        "offsets": (np.dtype(np.int64), offsets),
        "boxes": (np.dtype(np.uint16), boxes),
    }
    if scores is not None:
        arrays["scores"] = (np.dtype(np.float16), scores)
    shapes = {"names": (len(arrays["names"][1]),), "sizes": (len(names), 2), "offsets": (len(offsets),),
              "boxes": (total, 4), "scores": (total,)}
    layout, offset = {}, 0
    for key, (dtype, _) in arrays.items():
        offset = -(-offset // _ALIGN) * _ALIGN
        layout[key] = {"dtype": dtype.str, "shape": list(shapes[key]), "offset": offset}
        offset += int(np.prod(shapes[key])) * dtype.itemsize
    header = json.dumps({"version": 1, "arrays": layout, "meta": meta, "failures": failures},
                        sort_keys=True).encode("utf-8")
    start = -(-(len(MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN
    folder = Path(target("0" * 16)).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".part.", suffix=".tmp", dir=folder)
    digest = hashlib.blake2b(digest_size=8)
    try:
        with os.fdopen(fd, "wb") as f:
            def put(data: bytes) -> None:
                f.write(data)
                digest.update(data)

            put(MAGIC + struct.pack("<Q", len(header)) + header)
            for key, (dtype, data) in arrays.items():
                put(b"\0" * (start + layout[key]["offset"] - f.tell()))
                if isinstance(data, (bytes, np.ndarray)):
                    put(bytes(data) if isinstance(data, bytes) else data.tobytes())
                else:  # per-image arrays, gathered into batches of about 4 MB
                    batch, held = [], 0
                    for arr in data:
                        batch.append(np.asarray(arr, dtype))
                        held += batch[-1].nbytes
                        if held >= 1 << 22:
                            put(np.concatenate(batch).tobytes())
                            batch, held = [], 0
                    if batch:
                        put(np.concatenate(batch).tobytes())
            f.flush()
            os.fsync(f.fileno())
        final = Path(target(digest.hexdigest()))
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return final


class Part:
    """One part file, memory-mapped. ``names`` (list), ``sizes``, ``offsets``, ``boxes``, ``scores``
    (or None), ``failures`` (dict name -> reason), ``meta``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
                raise UserError(f"{self.path}: not a proposal store part (bad magic); remove it or pass a store")
            (length,) = struct.unpack("<Q", head[len(MAGIC):])
            try:
                header = json.loads(f.read(length).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise UserError(f"{self.path}: corrupt proposal store header; remove the file") from None
        start = -(-(len(MAGIC) + 8 + length) // _ALIGN) * _ALIGN
        self.meta = header.get("meta", {})
        self.failures = dict(header.get("failures", {}))
        size = self.path.stat().st_size
        arrays = {}
        for key, spec in header["arrays"].items():
            dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
            nbytes = int(np.prod(shape)) * dtype.itemsize
            if start + spec["offset"] + nbytes > size:
                raise UserError(f"{self.path}: truncated proposal store part; remove the file")
            arrays[key] = (np.memmap(self.path, dtype=dtype, mode="r", offset=start + spec["offset"], shape=shape)
                           if nbytes else np.zeros(shape, dtype))
        blob = bytes(arrays["names"])
        self.names = blob.decode("utf-8").split("\n") if blob else []
        self.sizes = arrays["sizes"]
        self.offsets = np.asarray(arrays["offsets"])
        self.boxes = arrays["boxes"]
        self.scores = arrays.get("scores")

    def entry(self, row: int) -> ImageProposals:
        """Row ``row`` as an :class:`ImageProposals` (uint16 boxes, in memory)."""
        lo, hi = int(self.offsets[row]), int(self.offsets[row + 1])
        scores = None if self.scores is None else np.array(self.scores[lo:hi])
        return ImageProposals(self.names[row], tuple(int(v) for v in self.sizes[row]),
                              np.array(self.boxes[lo:hi]), scores)


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
        lo, hi = int(part.offsets[row]), int(part.offsets[row + 1])
        boxes = decode_boxes(part.boxes[lo:hi], tuple(part.sizes[row]))
        scores = None if part.scores is None else np.asarray(part.scores[lo:hi], np.float32)
        return boxes, scores

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

    def boxes():
        for i, r in rows:
            yield parts[i].boxes[parts[i].offsets[r]:parts[i].offsets[r + 1]]

    def scores():
        for i, r in rows:
            lo, hi = parts[i].offsets[r], parts[i].offsets[r + 1]
            yield parts[i].scores[lo:hi] if parts[i].scores is not None else np.full(hi - lo, np.nan, np.float16)

    counts = [int(parts[i].offsets[r + 1] - parts[i].offsets[r]) for i, r in rows]
    with_scores = any(p.scores is not None for p in parts)
    target = _write_part_file(lambda digest: out_dir / f"part-{digest}{SUFFIX}", names, sizes, counts, boxes(),
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
