"""Batch proposal precomputation into a :mod:`proposals.store`, run by the batch-job framework.

The job (:func:`detector.base.jobs.run_job`): the images of the input list, in chunks of ``chunk_size``
consecutive images; shard ``K`` of ``N`` takes the chunks with ``c % N == K``. A chunk is written as
one part file when all its images are done, atomically, so a killed run loses at most the chunks in
flight; a rerun skips every image already in the store. Since a store's final part is sorted by
name, sharded runs merged give the same store (byte for byte) as one run. Several worker processes
(started with ``spawn``: Selective Search holds the GIL, see :mod:`detector.base.jobs`) compute the
proposals; one worker computes them in the calling process.

An image that cannot be read or processed is recorded in the store with its reason and the run
goes on; the report lists every failed image of the shard, and ``retry_failed`` tries them again.

A run first cleans up after killed runs and damage: temporary files no live writer holds are removed,
every part is verified (:func:`proposals.store.verify`) and a damaged one is set aside as
``<name>.damaged`` so that its images are done again (both are the report's ``notes``). The store's
settings are written once, in ``store.json`` (:func:`detector.base.jobs.claim_manifest`), by the first
run: a run with other settings is refused, even when it starts at the same moment; chunk names carry
a digest of the settings and the names too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from detector.base.errors import UserError
from detector.base.files import text_lines
from detector.base.io import load_image_item
from detector.base.jobs import (
    PROCESSES,
    ItemFailed,
    JobConfig,
    JobReport,
    Outcome,
    Shard,
    claim_manifest,
    opencv_single_thread,
    run_job,
)
from proposals.propose import propose
from proposals.store import (
    SETTINGS_FILE,
    DamagedPart,
    ImageProposals,
    ProposalStore,
    clean_temporary,
    compact,
    encode_boxes,
    set_aside_damaged,
    write_part,
)

__all__ = ["SETTINGS_FILE", "ImageEntry", "PrecomputeConfig", "StoreSink", "list_file", "list_folder", "list_images",
           "precompute", "propose_entry"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
LIST_EXTENSIONS = (".JPEG", ".jpg", ".jpeg", ".png", ".JPG", ".PNG")


@dataclass(frozen=True)
class ImageEntry:
    """One image to process: ``name`` is its key in the store, ``path`` the file (or, for list
    entries without an extension, the path stem to which an image extension is added)."""

    name: str
    path: str


@dataclass(frozen=True)
class PrecomputeConfig:
    """How to precompute. ``options`` are passed to :func:`proposals.propose` (sorted pairs). ``shard``:
    a :class:`detector.base.jobs.Shard` or ``(K, N)``."""

    method: str = "ss-fast"
    options: tuple[tuple[str, object], ...] = ()
    workers: int = 1  # processes computing proposals; 1: the calling process
    shard: Shard | tuple[int, int] = Shard()  # this run does the chunks c with c % N == K
    chunk_size: int = 64
    retry_failed: bool = False

    def meta(self) -> dict:
        """What the store records about how its proposals were made."""
        return {"method": self.method, "options": {k: v for k, v in self.options}}


def list_folder(folder: str | os.PathLike) -> list[ImageEntry]:
    """Every image file under ``folder`` (recursively), named by its relative POSIX path, sorted."""
    folder = Path(folder)
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                rel = Path(root, f).relative_to(folder).as_posix()
                found.append(ImageEntry(rel, str(Path(root, f))))
    found.sort(key=lambda e: e.name)
    return found


def list_file(list_path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[ImageEntry]:
    """Images named in a list file: the first field of each non-empty line (``#`` starts a comment),
    a path relative to ``image_root`` (default: the list's folder). ILSVRC lists (``<name> <id>``)
    work as they are; a name without an extension gets the first existing one of ``.JPEG``, ``.jpg``,
    ... at processing time. The store key is the name as listed."""
    list_path = Path(list_path)
    root = Path(image_root) if image_root is not None else list_path.parent
    entries, seen = [], set()
    for lineno, line in text_lines(list_path, "image list"):  # not UTF-8, or binary: one line naming the line
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        name = fields[0]
        if name in seen:
            raise UserError(f"{list_path}:{lineno}: image {name} is listed twice; remove the duplicate")
        seen.add(name)
        entries.append(ImageEntry(name, str(root / name)))
    return entries


def list_images(source: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[ImageEntry]:
    """A folder of images or a list file -> entries (see :func:`list_folder` and :func:`list_file`)."""
    source = Path(source)
    if source.is_dir():
        return list_folder(source)
    if source.is_file():
        return list_file(source, image_root)
    raise UserError(f"{source}: no such folder or list file; pass a folder of images or a list of image names")


def _resolve(path: str) -> str:
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS or os.path.exists(path):
        return path
    for ext in LIST_EXTENSIONS:
        if os.path.exists(path + ext):
            return path + ext
    return path


def propose_entry(entry: ImageEntry, method: str, options: dict) -> ImageProposals:
    """The job's work (in a worker): load one image and propose; what an image can cause is an
    :class:`~detector.base.jobs.ItemFailed` whose message is the recorded reason."""
    image = load_image_item(_resolve(entry.path))
    try:
        result = propose(image, method, **options)
    except Exception as err:  # noqa: BLE001 - recorded, listed, and the run goes on
        raise ItemFailed(f"proposals failed: {type(err).__name__}: {err}") from None
    boxes, scores = result if isinstance(result, tuple) else (result, None)
    size = image.shape[:2]
    return ImageProposals(entry.name, size, encode_boxes(boxes, size),
                          None if scores is None else np.asarray(scores, np.float16))


def _chunk_name(chunk: int, names: Sequence[str], meta: dict, digest: str | None = None) -> str:
    """``chunk-<c>-<tag>-<digest>.pstore``, the tag a digest of the settings and the names (runs with other
    settings or another list never write the same name), the digest the part's own (see
    :mod:`proposals.part`: every reader checks it; without ``digest``, the name without it)."""
    text = json.dumps(meta, sort_keys=True) + "\n" + "\n".join(names)
    tag = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
    return f"chunk-{chunk:07d}-{tag}" + (f"-{digest}" if digest else "") + ".pstore"


class StoreSink:
    """The job's results in a store folder (a :class:`detector.base.jobs.ChunkSink`): an image is done
    when the store holds its proposals or its recorded failure; a chunk is one part file."""

    def __init__(self, out: Path, entries: Sequence[ImageEntry], meta: dict):
        self.out, self.entries, self.meta = out, entries, meta
        self._held: tuple[set[str], dict[str, str]] | None = None  # names, failures; read again after a write

    def _store(self) -> tuple[set[str], dict[str, str]]:
        if self._held is None:
            store = ProposalStore(self.out)
            self._held = set(store.names()), dict(store.failures)
        return self._held

    def pending(self, chunk: int, positions: range, retry_failed: bool) -> list[int]:
        names, failures = self._store()
        return [p for p in positions if self.entries[p].name not in names
                and (retry_failed or self.entries[p].name not in failures)]

    def write(self, chunk: int, results: list[tuple[int, Outcome]]) -> None:
        done = [o.value if o.ok else ImageProposals(self.entries[p].name, error=o.error) for p, o in results]
        names = [e.name for e in done]
        write_part(lambda digest: self.out / _chunk_name(chunk, names, self.meta, digest), done, self.meta)
        self._held = None

    def all_done(self) -> bool:
        """Every image of the list (of every shard) is in the store, with proposals or a recorded failure."""
        names, failures = self._store()
        return all(e.name in names or e.name in failures for e in self.entries)

    def failures(self, positions: Sequence[int]) -> dict[str, str]:
        self._held = None  # other runs may have written meanwhile
        failures = self._store()[1]
        return {self.entries[p].name: failures[self.entries[p].name] for p in positions
                if self.entries[p].name in failures}


def precompute(entries: Sequence[ImageEntry], out: str | os.PathLike, config: PrecomputeConfig,
               progress: bool = True) -> JobReport:
    """Compute proposals for this shard's images not yet in the store ``out`` (a folder); returns the
    job's report (:class:`detector.base.jobs.JobReport`).

    When every image of ``entries`` is in the store (this shard's and, for shards sharing the folder,
    every other's), the store's parts are compacted into one, by one process: the last shard to finish
    (of two finishing together, the one holding the compaction lock; :func:`proposals.store.compact`).
    A shard in a folder of its own is left in parts, for ``--merge``. A compaction the system refuses
    (a full disk) leaves the complete store in parts, read as it is, and is a note of the report: the work
    is done, and a rerun compacts.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; --out names a store folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{out}: cannot create the store folder ({err.strerror or err}); check the path") from None
    meta = config.meta()
    notes = []
    cleaned = clean_temporary(out)  # left by killed runs (a compaction's is as large as the store)
    if cleaned:
        notes.append(f"removed {len(cleaned)} temporary files left by a killed run")
    for path, reason in set_aside_damaged(out).items():
        notes.append(f"set aside damaged part {path} ({reason}); its images were done again; delete it at will")
    existing = ProposalStore(out)
    if existing.num_parts and existing.meta != json.loads(json.dumps(meta)):
        raise UserError(f"{out}: holds proposals made with {existing.meta}, not {meta}; use another --out")
    del existing
    claim_manifest(out / SETTINGS_FILE, meta, kind="proposal-store", what="proposals")
    shard = config.shard if isinstance(config.shard, Shard) else Shard(*config.shard)
    job = JobConfig(chunk_size=config.chunk_size, shard=shard, workers=config.workers if config.workers > 1 else 0,
                    pool=PROCESSES, retry_failed=config.retry_failed, progress=progress, desc="proposals")
    work = partial(propose_entry, method=config.method, options=dict(config.options))
    sink = StoreSink(out, entries, meta)
    report = run_job(entries, [e.name for e in entries], work, sink, job, initializer=opencv_single_thread)
    report.notes[:0] = notes
    if report.complete and (shard.count == 1 or sink.all_done()):
        try:
            compact(out)
        except DamagedPart:
            raise
        except UserError as err:  # the system refused the copy: the store is complete in parts
            report.notes.append(f"the store is complete but was not compacted: {err}")
    return report
