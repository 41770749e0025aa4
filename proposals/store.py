"""Precomputed proposals on disk: a folder of checked part files read as one mapping.

A *store* is a folder of *part* files (``*.pstore``, format and checks in :mod:`proposals.part`) and,
when precompute made it, ``store.json`` (the settings every part must have been made with);
:class:`ProposalStore` reads them as one mapping ``image name -> (boxes, scores or None)``. A single
part file can be opened too.

Any number of parts opens under any limit of open files: opening a store reads each part's header and
names once (one file at a time, closed at once) into a compact index (numpy arrays: a hash, a part and
a row per image, and the names as one byte string: about 50 bytes per image), and maps a part only
when one of its images is read, keeping at most ``max_open_parts`` maps open (least recently used
dropped first; by default an eighth of the soft ``RLIMIT_NOFILE``, at most 128).

:func:`compact` merges a folder's parts into one (named by its content digest) and only then deletes
the parts it read, so concurrent writers and compactions may leave overlapping parts for a while but
never lose or corrupt an image; every image copied is checked first, so damage is never sealed into a
new part. Only one process compacts a folder at a time (an exclusive lock on ``.compact.lock``; the
others skip), and compaction streams the images through the same bounded set of maps, so it needs
one temporary copy and a few open files whatever the number of parts or of processes. :func:`verify`
checks every image of a store; :func:`set_aside_damaged` renames the damaged parts out of it (a
precompute rerun then redoes their images).
"""

from __future__ import annotations

import bisect
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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
    ForeignPart,
    ImageProposals,
    Part,
    clean_temporary,
    decode_boxes,
    encode_boxes,
    read_image,
    write_part,
    write_part_file,
)

try:
    import fcntl
    import resource
except ImportError:  # not on Windows: no compaction lock, and the default number of maps
    fcntl = resource = None

__all__ = ["MAGIC", "MAX_OPEN_PARTS", "QUANT", "REPAIR", "SETTINGS_FILE", "SUFFIX", "DamagedPart", "ForeignPart",
           "ImageProposals", "Part", "ProposalStore", "VerifyReport", "clean_temporary", "compact", "decode_boxes",
           "default_max_open_parts", "encode_boxes", "merge", "open_proposal_source", "part_files",
           "set_aside_damaged", "store_settings", "verify", "write_part"]

SETTINGS_FILE = "store.json"  # the settings of the proposals in a store folder, written once by precompute
MAX_OPEN_PARTS = 128  # parts mapped at once at most, by default (one open file each)
LOCK_FILE = ".compact.lock"  # held (flock) by the one process compacting a store folder


def default_max_open_parts() -> int:
    """How many parts a store keeps mapped by default: an eighth of the soft ``RLIMIT_NOFILE`` (the
    rest is the program's: data loaders, sockets, libraries), between 2 and :data:`MAX_OPEN_PARTS`."""
    if resource is None:
        return MAX_OPEN_PARTS
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return MAX_OPEN_PARTS
    return max(2, min(MAX_OPEN_PARTS, soft // 8))


def store_settings(path: str | os.PathLike) -> dict | None:
    """The settings recorded in a store folder's ``store.json`` (what every part must have been made with),
    or None: no such file (a merged store, a single part file) or one that cannot be read (precompute says
    so; reading goes on without the check)."""
    path = Path(path)
    if not path.is_dir():
        return None
    try:
        doc = json.loads((path / SETTINGS_FILE).read_text(encoding="utf-8"))
        settings = doc["settings"] if "settings" in doc else doc["meta"]  # "meta": the first manifests
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return settings if isinstance(settings, dict) else None


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
    if not path.is_dir():
        return []
    with os.scandir(path) as found:
        names = sorted(e.name for e in found if e.name.endswith(SUFFIX) and not e.name.startswith(".") and e.is_file())
    return [path / name for name in names]


class _Index:
    """The images of a list of part files, in numpy arrays, and a bounded set of mapped parts.

    Image ``k`` (in the order of the files, then of their rows; a name met again later is dropped: the
    first part holding it wins) has its name in ``blob[starts[k]:starts[k + 1] - 1]`` and lives in part
    ``p`` (``first[p] <= k < first[p + 1]``) at row ``k - first[p]``; ``hashes`` (sorted, of the names that
    are kept) and ``order`` (their ``k``) find ``k`` from a name. About 50 bytes per image with ILSVRC's
    names. ``meta``: the settings every part must have (a store's ``store.json``), or None: the first
    part's, and a part with others is ``mixed(first file, other file)``.
    """

    def __init__(self, files: list[Path], meta: dict | None, mixed: Callable[[Path, Path], str],
                 max_open: int, rescan: Callable[[], list[Path]] | None = None):
        self.max_open, self.expect = max_open, meta
        self.files: list[Path] = []
        self.meta: dict = meta if meta is not None else {}
        self.failures: dict[str, str] = {}
        self.with_scores = False
        self._lock = threading.Lock()
        self._open: OrderedDict[int, Part] = OrderedDict()
        self._last: tuple[int, Part] | None = None  # the part used last, found without the lock
        blob, hashes, counts, self.index_ids = bytearray(), [], [], []
        first = None
        pending, vanished = list(files), False
        while pending:
            for f in pending:
                try:
                    part = Part(f, mapped=False, meta=meta)
                except FileNotFoundError:  # removed by a concurrent compaction: its content is in a newer part
                    vanished = True
                    continue
                if first is None:
                    first, self.meta = f, part.meta
                elif part.meta != self.meta:
                    raise UserError(mixed(first, f))
                self.files.append(f)
                names = part.names
                if names:
                    blob += part.names_blob
                    blob += b"\n"
                hashes.append(np.fromiter(map(hash, names), np.int64, len(names)))
                counts.append(len(names))
                self.index_ids.append(part.index_id)
                self.with_scores |= part.has_scores
                for name, reason in part.failures.items():
                    self.failures.setdefault(name, reason)
            known = set(self.files)  # pick up the part that replaced the vanished ones, once
            pending = [f for f in rescan() if f not in known] if vanished and rescan is not None else []
            vanished = False
        self.counts = np.array(counts, np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._first = self.first.tolist()  # one int per part: bisect is faster than numpy for one value
        self.blob = np.frombuffer(bytes(blob), np.uint8)
        del blob
        ends = np.flatnonzero(self.blob == 10) + 1
        self.starts = np.concatenate([[0], ends]).astype(np.uint32 if len(self.blob) < 2 ** 32 else np.int64)
        del ends
        every = np.concatenate(hashes) if hashes else np.zeros(0, np.int64)
        del hashes
        order = np.argsort(every, kind="stable").astype(np.int32 if len(every) < 2 ** 31 else np.int64)
        every = every[order]  # equal hashes keep the order of the parts: the first part wins
        self.alive = np.ones(len(every), bool)
        for at in np.flatnonzero(every[1:] == every[:-1]):  # a name in several parts (or a collision)
            k = int(order[at + 1])
            name = self._name_bytes(k)
            run = at
            while run >= 0 and every[run] == every[at + 1]:
                if self.alive[order[run]] and self._name_bytes(int(order[run])) == name:
                    self.alive[k] = False
                    break
                run -= 1
        if not self.alive.all():
            keep = self.alive[order]
            every, order = every[keep], order[keep]
        self.hashes, self.order = every, order
        self.size = len(order)
        self.failures = {n: r for n, r in self.failures.items() if self.locate(n) < 0}  # a success wins
        self._stems: tuple[np.ndarray, np.ndarray, dict[str, str]] | None = None

    def where(self, k: int) -> tuple[int, int]:
        """The part and the row of image ``k``."""
        p = bisect.bisect_right(self._first, k) - 1
        return p, k - self._first[p]

    def _name_bytes(self, k: int) -> bytes:
        return self.blob[int(self.starts[k]):int(self.starts[k + 1]) - 1].tobytes()

    def name(self, k: int) -> str:
        return self._name_bytes(k).decode("utf-8", "surrogateescape")

    def locate(self, name: str) -> int:
        """``k`` of the image named ``name``, or -1."""
        h = hash(name)
        at = int(np.searchsorted(self.hashes, h))
        if at == len(self.hashes) or self.hashes[at] != h:
            return -1
        try:
            wanted = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return -1
        while at < len(self.hashes) and self.hashes[at] == h:
            k = int(self.order[at])
            if self._name_bytes(k) == wanted:
                return k
            at += 1
        return -1

    def names(self) -> list[str]:
        """Every image's name, in the order of ``k``."""
        text = self.blob.tobytes().decode("utf-8", "surrogateescape")
        every = text.split("\n")[:-1] if text else []
        return every if self.size == len(every) else [n for n, a in zip(every, self.alive) if a]

    def by_stem(self, name: str) -> str | None:
        """The first name (images first, then failures) with the stem of ``name`` (no extension), or None."""
        if self._stems is None:
            every = self.names()
            positions = np.flatnonzero(self.alive)
            stems = np.fromiter((hash(os.path.splitext(n)[0]) for n in every), np.int64, len(every))
            order = np.argsort(stems, kind="stable")
            failed: dict[str, str] = {}
            for n in self.failures:
                failed.setdefault(os.path.splitext(n)[0], n)
            self._stems = stems[order], positions[order], failed
        hashes, positions, failed = self._stems
        stem = os.path.splitext(name)[0]
        h = hash(stem)
        at = int(np.searchsorted(hashes, h))
        while at < len(hashes) and hashes[at] == h:
            found = self.name(int(positions[at]))
            if os.path.splitext(found)[0] == stem:
                return found
            at += 1
        return failed.get(stem)

    def part(self, p: int) -> Part:
        """Part ``p``, mapped: from the open ones, or opened (and checked) now, the least recently used
        one dropped (its file is closed once no reader holds it). Raises FileNotFoundError if the file is
        gone and ``LookupError`` if it no longer holds the images it held when the index was made."""
        last = self._last
        if last is not None and last[0] == p:  # the most recently used already: nothing to move
            return last[1]
        with self._lock:
            part = self._open.get(p)
            if part is not None:
                self._open.move_to_end(p)
                self._last = (p, part)
                return part
        part = Part(self.files[p], mapped=True, meta=self.expect if self.expect is not None else self.meta)
        if part.index_id != self.index_ids[p] or part.num_images != self.counts[p]:
            raise LookupError(self.files[p])
        with self._lock:
            self._open[p] = part
            self._open.move_to_end(p)
            self._last = (p, part)
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)  # dropped, not closed: a reader in another thread may hold it
        return part

    def close(self) -> None:
        with self._lock:
            self._open.clear()
            self._last = None

    def box_counts(self) -> np.ndarray:
        """Per image ``k`` (every one, dropped ones too): its number of boxes, read from each part in turn
        (one file open at a time)."""
        out = []
        for p, f in enumerate(self.files):
            part = Part(f, mapped=False, meta=self.expect)
            if part.index_id != self.index_ids[p] or part.num_images != self.counts[p]:
                raise LookupError(f)
            out.append(np.diff(part.offsets))
        return np.concatenate(out) if out else np.zeros(0, np.int64)


class ProposalStore:
    """Read precomputed proposals: ``store[image_name] -> (boxes, scores or None)``.

    path: a store folder (every part in it) or one part file. boxes: float32 ``(N, 4)`` xyxy pixels of
    the original image, best first; scores: float32 ``(N,)`` or None. max_open_parts: parts kept mapped
    at once (one open file each; default :func:`default_max_open_parts`): a lookup in a mapped part
    costs about 0.03 ms, one in another part opens and checks it first (about 0.1 ms for a part of 64
    images). Safe to read from several threads.

    Names are the keys the writer used (a path relative to the image folder, or a list's image
    name); a lookup that misses retries without the file extension on both sides, so
    ``"ILSVRC2013_val_00000001.JPEG"`` finds ``"ILSVRC2013_val_00000001"`` and vice versa.
    An image recorded as failed raises ``KeyError`` with its reason; ``failures`` lists them all.

    Opening checks every part's header, names and digest, and, in a folder with ``store.json``, that
    every part was made with the settings recorded there: a damaged part is a :class:`DamagedPart`, one
    of another store a :class:`ForeignPart` (one line naming the file and what to do).
    """

    def __init__(self, path: str | os.PathLike, max_open_parts: int | None = None):
        self.path = Path(path)
        files = part_files(self.path)
        if not files and not self.path.is_dir():
            raise UserError(f"{self.path}: no proposal store here; check the path (a folder or a .pstore file)")
        self.max_open_parts = default_max_open_parts() if max_open_parts is None else max(1, int(max_open_parts))
        self._ix = self._build(files)

    def __getstate__(self) -> dict:  # pickled by path: the receiving process opens the store itself
        return {"path": self.path, "max_open_parts": self.max_open_parts}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["max_open_parts"])

    def _build(self, files: list[Path]) -> _Index:
        def mixed(first: Path, other: Path) -> str:
            return (f"{self.path}: parts were made with different methods or options ({other.name} differs from "
                    f"{first.name}); keep one kind per store")

        return _Index(files, store_settings(self.path), mixed, self.max_open_parts,
                      rescan=lambda: part_files(self.path))

    def _refresh(self, ix: _Index) -> _Index:
        """The index again, from the files now in the folder (a part was compacted away or replaced)."""
        if self._ix is ix:
            self._ix = self._build(part_files(self.path))
            ix.close()
        return self._ix

    @property
    def meta(self) -> dict:
        """How the proposals were made (the parts' ``meta``: the method and its options)."""
        return self._ix.meta

    @property
    def failures(self) -> dict[str, str]:
        """Images whose proposals failed: name -> reason."""
        return self._ix.failures

    @property
    def files(self) -> list[Path]:
        """The part files read."""
        return list(self._ix.files)

    @property
    def num_parts(self) -> int:
        return len(self._ix.files)

    @property
    def open_parts(self) -> int:
        """Parts mapped now (at most ``max_open_parts``)."""
        return len(self._ix._open)

    def close(self) -> None:
        """Drop every map (a later lookup opens its part again)."""
        self._ix.close()

    def __len__(self) -> int:
        return self._ix.size

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        """Names of the images with proposals, sorted."""
        return sorted(self._ix.names())

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
        ix = self._ix
        if ix.locate(name) >= 0 or name in ix.failures:
            return name
        return ix.by_stem(name)

    def __contains__(self, name: str) -> bool:
        key = self._resolve(name)
        return key is not None and key not in self.failures

    def _row(self, name: str, known: tuple[_Index, int] | None = None) -> tuple[Part, int]:
        """The mapped part and the row of image ``name`` (a key of this store; ``known``: the index and
        the position found already)."""
        for attempt in (0, 1):
            ix, k = known if known is not None and not attempt else (self._ix, self._ix.locate(name))
            if k < 0:
                raise KeyError(name)
            p, row = ix.where(k)
            try:
                part = ix.part(p)
            except (FileNotFoundError, LookupError):  # compacted away or rewritten since the index was made
                if attempt or not self.path.is_dir():
                    raise DamagedPart(ix.files[p], "changed while the store was read") from None
                self._refresh(ix)
                continue
            if part.index_id is None and part.name(row) != name:  # else the index digest vouched for the names
                raise DamagedPart(part.path, f"row {row} is not {name!r} any more")
            return part, row
        raise AssertionError("unreachable")

    def __getitem__(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        ix = self._ix
        k = ix.locate(name)  # the name as stored: the one search of the common case
        key = name if k >= 0 else self._resolve(name)
        if key is None:
            raise KeyError(f"{name}: no proposals in {self.path}")
        if key in ix.failures:
            raise KeyError(f"{name}: proposals failed in {self.path}: {ix.failures[key]}")
        part, row = self._row(key, (ix, k) if k >= 0 else None)
        boxes, scores = part.rows(row)  # checked against the image's CRC
        return decode_boxes(boxes, tuple(part.sizes[row])), None if scores is None else scores.astype(np.float32)

    def image_size(self, name: str) -> tuple[int, int]:
        """``(h, w)`` of the image the proposals were computed on."""
        key = self._resolve(name)
        if key is None or key in self.failures:
            raise KeyError(name)
        part, row = self._row(key)
        return tuple(int(v) for v in part.sizes[row])

    def num_boxes(self) -> int:
        """Total boxes over all images (overlapping parts counted once); reads every part's index."""
        ix = self._ix
        return int(ix.box_counts()[ix.alive].sum())

    def entries(self) -> Iterator[ImageProposals]:
        """Every image (successes and failures) once, sorted by name."""
        for name in sorted(self._ix.names() + list(self.failures)):
            if name in self.failures:
                yield ImageProposals(name, error=self.failures[name])
            else:
                part, row = self._row(name)
                yield part.entry(row)


def merge(sources: Iterable[str | os.PathLike], out_dir: str | os.PathLike, remove_sources: bool = False,
          max_open_parts: int | None = None) -> Path | None:
    """Merge the parts of several stores into one part in ``out_dir`` named ``part-<digest>``.

    Images are sorted by name, so the result depends only on the content, not on how the work was
    split or in which order it finished; a success in any part beats a recorded failure. One pass reads
    each part's index (one file at a time), then the boxes are streamed in name order with ``os.pread``
    from at most ``max_open_parts`` open files (least recently used closed first), each image checked
    against its CRC, so memory and open files stay small for any number of parts, in any order. With
    ``remove_sources`` the part files that were read are deleted, only after the merged part is in
    place. Returns the part written, or None if there was nothing to merge.
    """
    out_dir = Path(out_dir)
    files = [f for s in sources for f in part_files(s)]

    def mixed(first: Path, other: Path) -> str:
        return (f"cannot merge stores made with different methods or options ({other} differs from {first}); "
                "merge one kind at a time")

    max_open = default_max_open_parts() if max_open_parts is None else max(1, max_open_parts)
    ix = _Index(files, None, mixed, max_open)
    if not ix.files:
        return None
    try:
        where = _Places(ix)  # every image's place in its part, from one pass over the parts
        every = ix.names()
        by_name = np.argsort(np.array(every, dtype=object)) if every else np.zeros(0, np.int64)
        names = [every[i] for i in by_name]
        rows = np.flatnonzero(ix.alive)[by_name]  # k of each image, in the order of their names
        del every
        counts = where.counts[rows]
        with _OpenFiles(ix.files, where.identities, max_open) as fds:
            def read(k: int) -> tuple[np.ndarray, np.ndarray | None]:
                p = ix.where(k)[0]
                return read_image(fds[p], ix.files[p], ix.name(k), int(where.counts[k]), int(where.boxes_at[k]),
                                  int(where.scores_at[k]), int(where.crcs[k]) if where.checked[k] else None)

            def boxes():  # each image checked against its CRC: a damaged source is refused, never copied
                for k in rows:
                    yield read(int(k))[0]

            def scores():
                for k, n in zip(rows, counts):
                    found = read(int(k))[1]
                    yield found if found is not None else np.full(n, np.nan, np.float16)

            failures = {n: ix.failures[n] for n in sorted(ix.failures)}
            target = write_part_file(lambda digest: out_dir / f"part-{digest}{SUFFIX}", names, where.sizes[rows],
                                     counts, boxes(), scores() if ix.with_scores else None, ix.meta, failures)
    except (FileNotFoundError, LookupError) as err:
        raise UserError(f"{err.filename if isinstance(err, FileNotFoundError) else err.args[0]}: removed or "
                        "rewritten while it was merged (another merge or compaction at work?); rerun") from None
    if remove_sources:
        for f in ix.files:
            if f != target:
                try:
                    f.unlink()
                except FileNotFoundError:
                    pass
    return target


class _Places:
    """Where each image ``k`` of an index is in its part: ``counts`` (boxes), ``boxes_at`` and ``scores_at``
    (byte offsets; -1: no scores), ``crcs`` (where ``checked``), ``sizes`` ``(h, w)``, and each part's file
    ``identities``. Read from every part in turn, one open at a time; about 36 bytes per image."""

    def __init__(self, ix: _Index):
        counts, boxes_at, scores_at, crcs, checked, sizes, self.identities = [], [], [], [], [], [], []
        for p, f in enumerate(ix.files):
            part = Part(f, mapped=False, meta=ix.expect)
            if part.index_id != ix.index_ids[p] or part.num_images != ix.counts[p]:
                raise LookupError(f)
            start = part.offsets[:-1]
            counts.append(np.diff(part.offsets))
            boxes_at.append(part.boxes_at + 8 * start)
            scores_at.append(part.scores_at + 2 * start if part.has_scores else np.full(len(start), -1, np.int64))
            crcs.append(part.crcs if part.crcs is not None else np.zeros(len(start), np.uint32))
            checked.append(np.full(len(start), part.crcs is not None))
            sizes.append(part.sizes)
            self.identities.append(part.identity)

        def joined(arrays, dtype, shape=(0,)):
            return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(shape, dtype)

        self.counts, self.boxes_at = joined(counts, np.int64), joined(boxes_at, np.int64)
        self.scores_at, self.crcs = joined(scores_at, np.int64), joined(crcs, np.uint32)
        self.checked, self.sizes = joined(checked, bool), joined(sizes, np.int32, (0, 2)).reshape(-1, 2)


class _OpenFiles:
    """At most ``max_open`` of ``files`` open for reading (least recently used closed first): ``fds[p]``,
    refused (``LookupError``) if the file is no longer the one whose identity was read."""

    def __init__(self, files: list[Path], identities: list[tuple], max_open: int):
        self.files, self.identities, self.max_open = files, identities, max_open
        self.open: OrderedDict[int, int] = OrderedDict()

    def __getitem__(self, p: int) -> int:
        fd = self.open.get(p)
        if fd is not None:
            self.open.move_to_end(p)
            return fd
        fd = os.open(self.files[p], os.O_RDONLY)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self.identities[p]:
            os.close(fd)
            raise LookupError(self.files[p])
        self.open[p] = fd
        while len(self.open) > self.max_open:
            os.close(self.open.popitem(last=False)[1])
        return fd

    def __enter__(self) -> _OpenFiles:
        return self

    def __exit__(self, *exc) -> None:
        while self.open:
            os.close(self.open.popitem()[1])


@contextmanager
def compaction_lock(store_dir: str | os.PathLike) -> Iterator[bool]:
    """Hold ``store_dir``'s compaction lock if no other process holds it: yields True (this process may
    compact) or False (another one is compacting). Where files cannot be locked, True."""
    if fcntl is None:
        yield True
        return
    try:
        fd = os.open(Path(store_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a folder we cannot write to: we could not compact it either; the merge says why
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            held = False
        except OSError:  # a file system without locks
            held = True
        yield held
    finally:
        os.close(fd)  # releases the lock


def compact(store_dir: str | os.PathLike) -> Path | None:
    """Merge a store folder's parts into one, in place (see :func:`merge`). Only one process compacts a
    folder at a time: if another holds its :func:`compaction_lock`, returns None at once (that one
    compacts what is there); a store already in one ``part-<digest>`` is left as it is."""
    with compaction_lock(store_dir) as held:
        if not held:
            return None
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
    """Check every part of a store (a folder or one ``.pstore`` file) in full, one part open at a time:
    layout, header and index digests, every image's CRC, the content digest, the digest in the name, and
    the settings of ``store.json``. Damaged parts (and parts of another store) are listed, not raised."""
    path = Path(path)
    if not part_files(path) and not path.is_dir():
        raise UserError(f"{path}: no proposal store here; check the path (a folder or a .pstore file)")
    report = VerifyReport()
    settings = store_settings(path)
    for f in part_files(path):
        try:
            with Part(f, meta=settings) as part:
                checked = part.verify()
                report.images += part.num_images + len(part.failures)
        except FileNotFoundError:  # removed by a concurrent compaction; its content is in a newer part
            continue
        except DamagedPart as err:
            report.damaged[f] = err.reason
            continue
        report.parts += 1
        if not checked:
            report.unchecked.append(f)
    return report


def set_aside_damaged(store_dir: str | os.PathLike) -> dict[Path, str]:
    """Verify a store folder and rename each damaged part (or part of another store) to ``<name>.damaged``
    (no longer part of the store, kept for inspection; delete it at will). Returns ``{renamed file: reason}``."""
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
