"""One part file of a proposal store: its format, the atomic checked write, the checked read.

A part file holds, for a set of images, every array in one file:

- ``PSTORE02`` (8 bytes), the header length (uint64 little-endian), the header's blake2b-128 digest
  (16 bytes), a JSON header (``meta``: the method and options; ``arrays``: dtype, shape and byte
  offset of each array; ``failures``: image name -> reason; ``index``: blake2b-128 of the names,
  sizes and offsets arrays; ``content``: blake2b-128 of every byte after the header), then the
  arrays, each 64-byte aligned;
- ``names``: the image names, UTF-8, joined by newlines; ``sizes``: int32 ``(I, 2)`` image
  ``(h, w)``; ``offsets``: int64 ``(I + 1,)`` where image ``i``'s boxes are rows
  ``offsets[i]:offsets[i+1]``; ``boxes``: uint16 ``(M, 4)``; optionally ``scores``: float16 ``(M,)``;
  ``crcs``: uint32 ``(I,)``, the CRC-32 of image ``i``'s box bytes followed by its score bytes.

Boxes are stored as fractions of the image size in steps of 1/65535 (``x1 = q * w / 65535``): 8
bytes per box (10 with scores), at most ``w / 131070`` pixels off (0.004 px on a 500-pixel side).
Reading maps the file (one ``mmap``, so one open file descriptor per open part), so opening costs
only the names index and a lookup touches only that image's rows.

A part's *digest* is the first 8 bytes (16 hex digits) of its header digest; since the header holds
the digest of everything after it, the digest names the whole file. Writers that name a part by its
digest (``part-<digest>.pstore``, ``chunk-<c>-<tag>-<digest>.pstore``) let every reader check, from the
header alone, that the file is the one its name promises: a valid part of another store put in its
place is a :class:`ForeignPart`, as is a part made with other settings than its store's ``store.json``.

Nothing read is trusted: opening a part (:class:`Part`) checks the layout against the file size, the
header digest, the index digest (cheap: a few bytes per image) and a digest in the file name, and
every lookup checks that image's CRC, so a damaged part is a :class:`DamagedPart` (a ``UserError``)
naming the file, never changed boxes or another image's boxes. :meth:`Part.verify` checks every image
and the content digest (for a ``part-<digest>`` of the first layout, the digest of the whole file).
Parts of the first format (``PSTORE01``, no checksums) are still read, with the layout checks only.

Writes are atomic: a part is written to a temporary file in the same folder (``.part.*.tmp``, locked
while it is written), flushed, fsynced, then renamed to its final name; readers never see a partial
part, and :func:`clean_temporary` removes what a killed writer left.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import mmap
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable
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
_NP_DTYPES = {key: np.dtype(dtype) for key, dtype in _DTYPES.items()}
_NDIM = {"names": 1, "sizes": 2, "offsets": 1, "boxes": 2, "scores": 1, "crcs": 1}
_DIGEST_IN_NAME = re.compile(r"-([0-9a-f]{16})" + re.escape(SUFFIX) + "$")  # part-<digest>, chunk-...-<digest>
_NO_CONTENT = "0" * 32  # the content digest's place while the content is written (same length)
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


def write_part(path: str | os.PathLike | Callable[[str], str | os.PathLike], entries: Iterable[ImageProposals],
               meta: dict) -> Path:
    """Write one part file atomically. Entries keep their order; a name may appear only once.

    path: the file, or a function of the part's digest (16 hex digits) that names it (a name ending in
    ``-<digest>.pstore`` is checked against the file by every reader). Returns the path written.
    ``meta`` (JSON-serializable) records how the proposals were made.
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
    target = path if callable(path) else (lambda digest: Path(path))
    return write_part_file(target, names, sizes, counts, boxes, scores, meta, failures)


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

    def header_bytes(content: str) -> bytes:
        header = json.dumps({"version": 2, "arrays": layout, "meta": meta, "failures": failures, "index": index,
                             "content": content}, sort_keys=True).encode("utf-8")
        return MAGIC + struct.pack("<Q", len(header)) + _digest16(header) + header

    head = header_bytes(_NO_CONTENT)  # rewritten once the content is known: the same length
    start = -(-len(head) // _ALIGN) * _ALIGN
    folder = Path(target("<digest>")).parent
    content = hashlib.blake2b(digest_size=16)
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = _locked_temporary(folder)
        with os.fdopen(fd, "wb") as f:
            def put(data: bytes) -> None:
                f.write(data)
                content.update(data)

            f.write(head)
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
            head = header_bytes(content.hexdigest())
            f.seek(0)
            f.write(head)
            f.flush()
            os.fsync(f.fileno())
        final = Path(target(part_digest(head)))
        os.replace(tmp, final)
    except OSError as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        reason = err.strerror or str(err)
        hint = "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder"
        raise UserError(f"{_shown(target, tmp, folder)} ({reason}); {hint} and rerun (finished parts are kept)") from None
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return final


def part_digest(head: bytes) -> str:
    """A part's digest (16 hex digits) from its first bytes: the start of its header digest."""
    return head[len(MAGIC) + 8:len(MAGIC) + 16].hex()


def _shown(target, tmp: str | None, folder: Path) -> str:
    """What a writer could not write, for its error message. A part named by its digest (unknown until it is
    written) is named by the file being written, then by its name without the digest."""
    path = Path(target("<digest>"))
    if "<digest>" not in path.name:
        return f"{path}: cannot write this proposal store part"
    where = Path(tmp) if tmp is not None else folder
    if path.name == f"part-<digest>{SUFFIX}":
        return f"{where}: cannot write the compacted proposal store part"
    return f"{where}: cannot write proposal store part {path.name.replace('-<digest>', '')}"


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


def read_image(fd: int, path: Path, name: str, count: int, boxes_at: int, scores_at: int = -1,
               crc: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """One image's ``count`` uint16 boxes ``(count, 4)`` at byte ``boxes_at`` and float16 scores at
    ``scores_at`` (-1: none) of the part file open as ``fd`` (``path``), read with ``os.pread`` (no map) and
    checked against ``crc`` (None: a part of the first format): for a reader of many parts in turn, such
    as a merge, that took the places from each part's :class:`Part` (``boxes_at``, ``scores_at``,
    ``offsets``, ``crcs``) and checks that ``fd`` is the same file (``Part.identity``)."""
    data = os.pread(fd, count * 8, boxes_at)
    scores = None if scores_at < 0 else os.pread(fd, count * 2, scores_at)
    if len(data) != count * 8 or (scores is not None and len(scores) != count * 2):
        raise DamagedPart(path, "truncated while it was read")
    if crc is not None and zlib.crc32(scores or b"", zlib.crc32(data)) != crc:
        raise DamagedPart(path, f"checksum mismatch in the proposals of {name!r}")
    return (np.frombuffer(data, "<u2").reshape(-1, 4).copy(),
            None if scores is None else np.frombuffer(scores, "<f2").copy())


class DamagedPart(UserError):
    """A part file whose content fails a check: ``path`` and ``reason``; the message says what to do."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: damaged proposal store part ({reason}); {REPAIR}")
        self.path, self.reason = path, reason


class ForeignPart(DamagedPart):
    """A valid part that is not this store's: its digest differs from the one its name promises, or it was
    made with other settings than the store's ``store.json`` (a part of another store put in its place)."""

    def __init__(self, path: Path, reason: str):
        UserError.__init__(self, f"{path}: not a part of this proposal store ({reason}); delete it, or rerun "
                                 "tools/precompute_proposals.py with the same --out (it sets the part aside and "
                                 "redoes its images)")
        self.path, self.reason = path, reason


class Part:
    """One part file, checked before use (see the module docstring): ``sizes``, ``offsets``, ``crcs`` (or
    None for the first format), ``failures`` (dict name -> reason), ``meta``, ``names`` (a list, decoded
    on use; :meth:`name` for one), and, when ``mapped``, ``boxes`` and ``scores`` (or None): read-only
    arrays over one memory map of the file (one open file descriptor until :meth:`close` or the part is
    dropped). A damaged file is a :class:`DamagedPart`.

    meta: the settings of the store the part belongs to (its ``store.json``), or None; a part made with
    other settings, or whose digest differs from the digest in its name, is a :class:`ForeignPart`.
    """

    def __init__(self, path: str | os.PathLike, mapped: bool = True, meta: dict | None = None):
        self.path = path if isinstance(path, Path) else Path(path)
        self.boxes = self.scores = None
        self._map = None
        fd = os.open(self.path, os.O_RDONLY)  # every read and the map of the same file, even if it is renamed
        try:
            st = os.fstat(fd)
            size, self.identity = st.st_size, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            first = os.pread(fd, min(size, 1 << 16), 0)  # the header and, in a small part, the names index
            head = first[:len(MAGIC) + 8 + 16]
            if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] not in (MAGIC, MAGIC_V1):
                raise self._damaged("not a proposal store part, or its first bytes are damaged: bad magic")
            self.version = 2 if head[: len(MAGIC)] == MAGIC else 1
            (length,) = struct.unpack("<Q", head[len(MAGIC):len(MAGIC) + 8])
            prefix = len(MAGIC) + 8 + (16 if self.version == 2 else 0)
            if length > size - prefix:
                raise self._damaged("the header runs past the end of the file: truncated or damaged")
            raw = first[prefix:prefix + length] if prefix + length <= len(first) else os.pread(fd, length, prefix)
            if self.version == 2 and _digest16(raw) != head[len(MAGIC) + 8:prefix]:
                raise self._damaged("header checksum mismatch")
            try:
                header = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise self._damaged("unreadable header") from None
            self._content_at = prefix + length  # the content digest covers every byte from here
            start = -(-(prefix + length) // _ALIGN) * _ALIGN
            specs = self._check_layout(header, start, size)
            self.content = header.get("content")
            if self.content is not None and not (isinstance(self.content, str) and len(self.content) == 32):
                raise self._damaged("malformed content digest in the header")
            named = _DIGEST_IN_NAME.search(self.path.name)
            if named and self.content is not None and named.group(1) != part_digest(head):
                raise ForeignPart(self.path, f"its digest is {part_digest(head)}, its name says {named.group(1)}")

            def read(key: str) -> np.ndarray:
                dtype, shape, offset = specs[key]
                lo, n = start + offset, math.prod(shape) * dtype.itemsize
                data = first[lo:lo + n] if lo + n <= len(first) else os.pread(fd, n, lo)
                if len(data) != n:  # the layout check saw the file longer: it was cut since
                    raise self._damaged("truncated while it was read")
                return np.frombuffer(data, dtype).reshape(shape)

            blob = read("names").tobytes()
            self.sizes, self.offsets = read("sizes"), read("offsets")
            self.crcs = read("crcs") if "crcs" in specs else None
            self.has_scores = "scores" in specs
            # where the boxes and scores start in the file (for readers that do not map it: see read_image)
            self.boxes_at = start + specs["boxes"][2]
            self.scores_at = start + specs["scores"][2] if self.has_scores else -1
            if mapped:
                self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                for key in ("boxes", "scores"):
                    if key in specs:
                        dtype, shape, offset = specs[key]
                        setattr(self, key, np.frombuffer(self._map, dtype, math.prod(shape), start + offset)
                                .reshape(shape) if math.prod(shape) else np.zeros(shape, dtype))
        finally:
            os.close(fd)
        self.meta, self.failures = header.get("meta", {}), header.get("failures", {})
        if not (isinstance(self.meta, dict) and isinstance(self.failures, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in self.failures.items())):
            raise self._damaged("malformed meta or failures in the header")
        if self.version == 2 and _digest16(blob, self.sizes.tobytes(), self.offsets.tobytes()).hex() != \
                header.get("index"):
            raise self._damaged("index checksum mismatch (names, sizes or offsets)")
        # names as written: UTF-8, and file names of other bytes as os.fsdecode gives them (the index checksum
        # above vouches for the bytes)
        names = blob.decode("utf-8", "surrogateescape").split("\n") if blob else []
        self.num_images, num_boxes = len(self.sizes), specs["boxes"][1][0]
        if (len(names) != self.num_images or len(set(names)) != self.num_images or "" in names
                or not self.failures.keys().isdisjoint(names)):
            raise self._damaged(f"{len(names)} names (some empty, repeated or failed) for {self.num_images} images")
        if self.offsets[0] != 0 or self.offsets[-1] != num_boxes or (self.offsets[1:] < self.offsets[:-1]).any():
            raise self._damaged("box offsets out of order or out of range")
        if self.num_images and self.sizes.min() < 1:
            raise self._damaged("an image size is not positive")
        if meta is not None and self.meta != meta:
            raise ForeignPart(self.path, f"made with {json.dumps(self.meta, sort_keys=True)}, the store with "
                                         f"{json.dumps(meta, sort_keys=True)}")
        self.index_id = header.get("index") if self.version == 2 else None  # names, sizes, offsets: this part's
        self._blob = blob
        self._starts = np.concatenate([[0], np.flatnonzero(np.frombuffer(blob, np.uint8) == 10) + 1, [len(blob) + 1]])
        self._names = None if mapped else names  # kept for the one who indexes it; a mapped part decodes on use

    @property
    def names(self) -> list[str]:
        """The image names, in row order."""
        if self._names is not None:
            return self._names
        return self._blob.decode("utf-8", "surrogateescape").split("\n") if self._blob else []

    @property
    def names_blob(self) -> bytes:
        """The names as stored: UTF-8 (or the file names' bytes), joined by newlines."""
        return self._blob

    def name(self, row: int) -> str:
        """Image ``row``'s name."""
        return self._blob[self._starts[row]:self._starts[row + 1] - 1].decode("utf-8", "surrogateescape")

    def close(self) -> None:
        """Drop the map of the file (its descriptor is closed once no array read from it is in use)."""
        self.boxes = self.scores = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # an array over the map is still held: closed when it is dropped
                pass
            self._map = None

    def __enter__(self) -> Part:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
            specs[key] = (_NP_DTYPES[key], tuple(shape), offset)
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
        after checking their CRC. Needs a part opened ``mapped``."""
        if self.boxes is None:
            raise ValueError(f"{self.path}: opened without its arrays (mapped=False), or closed")
        lo, hi = int(self.offsets[row]), int(self.offsets[row + 1])
        boxes = np.array(self.boxes[lo:hi])
        scores = None if self.scores is None else np.array(self.scores[lo:hi])
        self.check_rows(row, boxes, scores)
        return boxes, scores

    def check_rows(self, row: int, boxes: np.ndarray, scores: np.ndarray | None) -> None:
        """Refuse image ``row``'s boxes and scores (as read) unless they match its CRC."""
        if self.crcs is not None:
            crc = zlib.crc32(boxes.tobytes())
            if scores is not None:
                crc = zlib.crc32(scores.tobytes(), crc)
            if crc != int(self.crcs[row]):
                raise self._damaged(f"checksum mismatch in the proposals of {self.name(row)!r}")

    def entry(self, row: int) -> ImageProposals:
        """Row ``row`` as an :class:`ImageProposals` (uint16 boxes, in memory, checked)."""
        boxes, scores = self.rows(row)
        return ImageProposals(self.name(row), tuple(int(v) for v in self.sizes[row]), boxes, scores)

    def verify(self) -> bool:
        """Check every image's CRC and the digest of the content after the header (for a ``part-<digest>``
        without one, the first layout of version 2: the digest of the whole file against its name).
        Returns False for a part of the first format (no checksums: only its layout was checked);
        a damaged part raises :class:`UserError`. Needs a part opened ``mapped``."""
        for row in range(self.num_images):
            self.rows(row)
        stem = self.path.name[: -len(SUFFIX)] if self.path.name.endswith(SUFFIX) else ""
        if self.content is not None:
            if self._digest(self._content_at, 16) != self.content:
                raise self._damaged("the file's content does not match the digest in its header")
        elif self.version == 2 and stem.startswith("part-") and len(stem) == 21:
            if self._digest(0, 8) != stem[5:]:
                raise self._damaged("the file's digest does not match its name")
        return self.version == 2

    def _digest(self, start: int, size: int) -> str:
        """blake2b (``size`` bytes) of the mapped file from byte ``start`` to its end, as hex."""
        digest = hashlib.blake2b(digest_size=size)
        view = memoryview(self._map)
        try:
            for at in range(start, len(view), 1 << 22):
                digest.update(view[at:at + (1 << 22)])
        finally:
            view.release()
        return digest.hexdigest()
