"""One part file of a proposal store: its format, the atomic checked write, the checked read.

A part file holds, for a set of images, every array in one file:

- ``PSTORE02`` (8 bytes), the header length (uint64 little-endian), the header's blake2b-128 digest
  (16 bytes), a JSON header (``meta``: the method and options; ``arrays``: dtype, shape and byte
  offset of each array; ``failures``: image name -> reason; ``index``: blake2b-128 of the names,
  sizes and offsets arrays), then the arrays, each 64-byte aligned;
- ``names``: the image names, UTF-8, joined by newlines; ``sizes``: int32 ``(I, 2)`` image
  ``(h, w)``; ``offsets``: int64 ``(I + 1,)`` where image ``i``'s boxes are rows
  ``offsets[i]:offsets[i+1]``; ``boxes``: uint16 ``(M, 4)``; optionally ``scores``: float16 ``(M,)``;
  ``crcs``: uint32 ``(I,)``, the CRC-32 of image ``i``'s box bytes followed by its score bytes.

Boxes are stored as fractions of the image size in steps of 1/65535 (``x1 = q * w / 65535``): 8
bytes per box (10 with scores), at most ``w / 131070`` pixels off (0.004 px on a 500-pixel side).
Reading maps the file (``numpy.memmap``), so opening costs only the names index and a lookup
touches only that image's rows.

Nothing read is trusted: opening a part (:class:`Part`) checks the layout against the file size, the
header digest and the index digest (cheap: a few bytes per image), and every lookup checks that
image's CRC, so a damaged part is a :class:`DamagedPart` (a ``UserError``) naming the file, never
changed boxes or another image's boxes. :meth:`Part.verify` checks every image (and a
``part-<digest>`` name against the file's digest). Parts of the first format (``PSTORE01``, no
checksums) are still read, with the layout checks only.

Writes are atomic: a part is written to a temporary file in the same folder (``.part.*.tmp``, locked
while it is written), flushed, fsynced, then renamed to its final name; readers never see a partial
part, and :func:`clean_temporary` removes what a killed writer left.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector.base import files
from detector.base.errors import UserError

MAGIC = b"PSTORE02"
MAGIC_V1 = b"PSTORE01"  # the first format: no checksums; read with the layout checks only
SUFFIX = ".pstore"
QUANT = 65535.0  # box coordinates are multiples of 1/QUANT of the image size
_ALIGN = 64
_TMP_PREFIX = ".part."
_DTYPES = {"names": "|u1", "sizes": "<i4", "offsets": "<i8", "boxes": "<u2", "scores": "<f2", "crcs": "<u4"}
_NDIM = {"names": 1, "sizes": 2, "offsets": 1, "boxes": 2, "scores": 1, "crcs": 1}
REPAIR = ("rerun tools/precompute_proposals.py with the same --out (it sets damaged parts aside and redoes "
          "their images), or delete the file and recompute")


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
    return write_part_file(lambda digest: Path(path), names, sizes, counts, boxes, scores, meta, failures)


def write_part_file(target, names: list[str], sizes: np.ndarray, counts, boxes, scores, meta: dict,
                     failures: dict) -> Path:
    """Stream a part file: ``counts[i]`` boxes for image ``i``; ``boxes`` (and ``scores`` or None)
    are iterables of per-image arrays (memory-mapped slices are fine, they are read one at a time).
    Written to a temporary file in the target's folder, then renamed to ``target(digest)`` (digest:
    blake2b of the file's bytes). A write the system refuses (disk full, permissions) is a
    :class:`UserError` naming the part; nothing is left behind."""
    counts = np.asarray(counts, np.int64).reshape(-1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    names_blob = ("\n".join(names)).encode("utf-8", "surrogateescape")  # a file named with non-UTF-8 bytes too
    sizes = np.ascontiguousarray(sizes, np.int32).reshape(-1, 2)
    crcs = np.zeros(len(names), np.uint32)  # filled while the boxes and scores stream by
    arrays = {
        "names": (np.dtype(np.uint8), names_blob),
        "sizes": (np.dtype(np.int32), sizes),
        "offsets": (np.dtype(np.int64), offsets),
        "boxes": (np.dtype(np.uint16), boxes),
    }
    if scores is not None:
        arrays["scores"] = (np.dtype(np.float16), scores)
    arrays["crcs"] = (np.dtype(np.uint32), crcs)
    shapes = {"names": (len(names_blob),), "sizes": (len(names), 2), "offsets": (len(offsets),),
              "boxes": (total, 4), "scores": (total,), "crcs": (len(names),)}
    layout, offset = {}, 0
    for key, (dtype, _) in arrays.items():
        offset = -(-offset // _ALIGN) * _ALIGN
        layout[key] = {"dtype": dtype.str, "shape": list(shapes[key]), "offset": offset}
        offset += int(np.prod(shapes[key])) * dtype.itemsize
    index = _digest16(names_blob, sizes.tobytes(), offsets.tobytes()).hex()
    header = json.dumps({"version": 2, "arrays": layout, "meta": meta, "failures": failures, "index": index},
                        sort_keys=True).encode("utf-8")
    prefix = MAGIC + struct.pack("<Q", len(header)) + _digest16(header)
    start = -(-(len(prefix) + len(header)) // _ALIGN) * _ALIGN
    shown = Path(target("0"))
    folder = shown.parent
    if shown != Path(target("1")):  # named by its digest, not known yet: the file being written is the real one
        shown = None
    digest = hashlib.blake2b(digest_size=8)
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = _locked_temporary(folder)
        with os.fdopen(fd, "wb") as f:
            def put(data: bytes) -> None:
                f.write(data)
                digest.update(data)

            put(prefix + header)
            for key, (dtype, data) in arrays.items():
                put(b"\0" * (start + layout[key]["offset"] - f.tell()))
                if isinstance(data, (bytes, np.ndarray)):
                    put(bytes(data) if isinstance(data, bytes) else data.tobytes())
                else:  # per-image arrays, gathered into batches of about 4 MB; each image's CRC on the way
                    batch, held = [], 0
                    for i, arr in enumerate(data):
                        batch.append(np.ascontiguousarray(arr, dtype))
                        crcs[i] = zlib.crc32(batch[-1].tobytes(), int(crcs[i]))
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
    except OSError as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        reason = err.strerror or str(err)
        hint = "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder"
        where = shown or (Path(tmp) if tmp is not None else folder)
        raise UserError(f"{where}: cannot write this proposal store part ({reason}); {hint} and rerun "
                        "(finished parts are kept)") from None
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return final


def _digest16(*chunks: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for c in chunks:
        h.update(c)
    return h.digest()


def _locked_temporary(folder: Path) -> tuple[int, str]:
    """A new ``.part.*.tmp`` in ``folder``, open for writing and locked for as long as it is open, so
    :func:`clean_temporary` leaves it alone while it is written (:func:`detector.base.files.locked_temporary`)."""
    return files.locked_temporary(folder, _TMP_PREFIX, ".tmp")  # mode from the umask, like any file


def clean_temporary(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed writers left in ``folder`` (a compaction's can be as large as
    the store; :func:`detector.base.files.clean_temporary`, the one rule for every writer); files that a
    live writer holds locked are kept. Returns the files removed."""
    return files.clean_temporary(folder)


class DamagedPart(UserError):
    """A part file whose content fails a check: ``path`` and ``reason``; the message says what to do."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: damaged proposal store part ({reason}); {REPAIR}")
        self.path, self.reason = path, reason


class Part:
    """One part file, memory-mapped and checked before use (see the module docstring). ``names``
    (list), ``sizes``, ``offsets``, ``boxes``, ``scores`` (or None), ``crcs`` (or None for the first
    format), ``failures`` (dict name -> reason), ``meta``. A damaged file is a :class:`UserError`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:  # one open file: every map is of the same file, even if renamed
            size = os.fstat(f.fileno()).st_size
            head = f.read(len(MAGIC) + 8 + 16)
            if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] not in (MAGIC, MAGIC_V1):
                raise self._damaged("not a proposal store part, or its first bytes are damaged: bad magic")
            self.version = 2 if head[: len(MAGIC)] == MAGIC else 1
            (length,) = struct.unpack("<Q", head[len(MAGIC):len(MAGIC) + 8])
            prefix = len(MAGIC) + 8 + (16 if self.version == 2 else 0)
            if length > size - prefix:
                raise self._damaged("the header runs past the end of the file: truncated or damaged")
            f.seek(prefix)
            raw = f.read(length)
            if self.version == 2 and _digest16(raw) != head[len(MAGIC) + 8:prefix]:
                raise self._damaged("header checksum mismatch")
            try:
                header = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise self._damaged("unreadable header") from None
            start = -(-(prefix + length) // _ALIGN) * _ALIGN
            specs = self._check_layout(header, start, size)
            arrays = {key: (np.memmap(f, dtype=dtype, mode="r", offset=start + offset, shape=shape)
                            if int(np.prod(shape)) else np.zeros(shape, dtype))
                      for key, (dtype, shape, offset) in specs.items()}
        self.meta, self.failures = header.get("meta", {}), header.get("failures", {})
        if not (isinstance(self.meta, dict) and isinstance(self.failures, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in self.failures.items())):
            raise self._damaged("malformed meta or failures in the header")
        blob = bytes(arrays["names"])
        self.sizes = np.array(arrays["sizes"])  # small, and copied: checked once, then immutable
        self.offsets = np.array(arrays["offsets"])
        if self.version == 2 and _digest16(blob, self.sizes.tobytes(), self.offsets.tobytes()).hex() != \
                header.get("index"):
            raise self._damaged("index checksum mismatch (names, sizes or offsets)")
        # names as written: UTF-8, and file names of other bytes as os.fsdecode gives them (the index checksum
        # above vouches for the bytes)
        self.names = blob.decode("utf-8", "surrogateescape").split("\n") if blob else []
        num_images, num_boxes = len(self.sizes), len(arrays["boxes"])
        if (len(self.names) != num_images or len(set(self.names)) != num_images or "" in self.names
                or set(self.names) & set(self.failures)):
            raise self._damaged(f"{len(self.names)} names (some empty, repeated or failed) for {num_images} images")
        if self.offsets[0] != 0 or self.offsets[-1] != num_boxes or (np.diff(self.offsets) < 0).any():
            raise self._damaged("box offsets out of order or out of range")
        if num_images and self.sizes.min() < 1:
            raise self._damaged("an image size is not positive")
        self.boxes = arrays["boxes"]
        self.scores = arrays.get("scores")
        self.crcs = np.array(arrays["crcs"]) if "crcs" in arrays else None

    def _damaged(self, what: str) -> DamagedPart:
        return DamagedPart(self.path, what)

    def _check_layout(self, header, start: int, size: int) -> dict:
        """The header's array table -> ``key -> (dtype, shape, offset)``, each checked: expected dtype
        and rank, consistent shapes, inside the file and not overlapping."""
        arrays = header.get("arrays") if isinstance(header, dict) else None
        required = {"names", "sizes", "offsets", "boxes"} | ({"crcs"} if self.version == 2 else set())
        if not isinstance(arrays, dict) or not required <= arrays.keys() <= set(_DTYPES):
            raise self._damaged("malformed array table in the header")
        specs = {}
        for key, spec in arrays.items():
            ok = isinstance(spec, dict) and spec.get("dtype") == _DTYPES[key]
            shape, offset = (spec.get("shape"), spec.get("offset")) if ok else (None, None)
            ok = ok and isinstance(shape, list) and len(shape) == _NDIM[key] and isinstance(offset, int)
            ok = ok and offset >= 0 and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
            if not ok:
                raise self._damaged(f"malformed entry for {key!r} in the header")
            specs[key] = (np.dtype(_DTYPES[key]), tuple(shape), offset)
        num_images, num_boxes = specs["sizes"][1][0], specs["boxes"][1][0]
        expected = {"sizes": (num_images, 2), "offsets": (num_images + 1,), "boxes": (num_boxes, 4),
                    "scores": (num_boxes,), "crcs": (num_images,)}
        if any(key in expected and shape != expected[key] for key, (_, shape, _) in specs.items()):
            raise self._damaged("array shapes do not agree with each other")
        end = start
        extents = sorted((offset, math.prod(shape) * dtype.itemsize) for dtype, shape, offset in specs.values())
        for offset, nbytes in extents:
            if nbytes and start + offset < end:
                raise self._damaged("arrays overlap")
            end = max(end, start + offset + nbytes)
        if end > size:
            raise self._damaged(f"truncated: the arrays need {end} bytes, the file has {size}")
        return specs

    def rows(self, row: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Image ``row``'s uint16 boxes ``(N, 4)`` and float16 scores ``(N,)`` (or None), in memory,
        after checking their CRC."""
        lo, hi = int(self.offsets[row]), int(self.offsets[row + 1])
        boxes = np.array(self.boxes[lo:hi])
        scores = None if self.scores is None else np.array(self.scores[lo:hi])
        if self.crcs is not None:
            crc = zlib.crc32(boxes.tobytes())
            if scores is not None:
                crc = zlib.crc32(scores.tobytes(), crc)
            if crc != int(self.crcs[row]):
                raise self._damaged(f"checksum mismatch in the proposals of {self.names[row]!r}")
        return boxes, scores

    def entry(self, row: int) -> ImageProposals:
        """Row ``row`` as an :class:`ImageProposals` (uint16 boxes, in memory, checked)."""
        boxes, scores = self.rows(row)
        return ImageProposals(self.names[row], tuple(int(v) for v in self.sizes[row]), boxes, scores)

    def verify(self) -> bool:
        """Check every image's CRC, and a ``part-<digest>`` name against the digest of the whole file.
        Returns False for a part of the first format (no checksums: only its layout was checked);
        a damaged part raises :class:`UserError`."""
        for row in range(len(self.names)):
            self.rows(row)
        stem = self.path.name[: -len(SUFFIX)] if self.path.name.endswith(SUFFIX) else ""
        if self.version == 2 and stem.startswith("part-") and len(stem) == 21:
            digest = hashlib.blake2b(digest_size=8)
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            if digest.hexdigest() != stem[5:]:
                raise self._damaged("the file's digest does not match its name")
        return self.version == 2
