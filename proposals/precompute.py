"""Batch proposal precomputation into a :mod:`proposals.store`: workers, shards, resume.

Work is cut into *chunks* of consecutive images of the input list (chunk ``c`` holds images
``c * chunk_size`` to ``(c + 1) * chunk_size - 1``). A chunk is written as one part file when all its
images are done, atomically, so a killed run loses at most the chunks in flight; a rerun skips every
image already in the store. Shard ``K`` of ``N`` takes the chunks with ``c % N == K``: the split is
deterministic, shards never overlap, and since a store's final part is sorted by name, sharded runs
merged give the same store (byte for byte) as one run.

An image that cannot be read or processed is recorded in the store with its reason and the run
goes on; :class:`PrecomputeReport` lists them.

A run first cleans up after killed runs and damage: temporary files no live writer holds are removed,
every part is verified (:func:`proposals.store.verify`) and a damaged one is set aside as
``<name>.damaged`` so that its images are done again. The store's settings are written once, in
``store.json``, created exclusively by the first run: a run with other settings is refused, even
when it starts at the same moment; chunk names carry a digest of the settings and the names too.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detector.base.errors import UserError
from detector.base.files import create_temporary
from detector.base.io import load_image
from proposals.propose import propose
from proposals.store import (
    ImageProposals,
    ProposalStore,
    clean_temporary,
    compact,
    encode_boxes,
    set_aside_damaged,
    write_part,
)

SETTINGS_FILE = "store.json"  # the settings of the proposals in a store folder, written once
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
    """How to precompute. ``options`` are passed to :func:`proposals.propose` (sorted pairs)."""

    method: str = "ss-fast"
    options: tuple[tuple[str, object], ...] = ()
    workers: int = 1
    shard: tuple[int, int] = (0, 1)  # (K, N): this run does chunks c with c % N == K
    chunk_size: int = 64
    retry_failed: bool = False

    def meta(self) -> dict:
        """What the store records about how its proposals were made."""
        return {"method": self.method, "options": {k: v for k, v in self.options}}


@dataclass
class PrecomputeReport:
    """What a run did: counts, seconds, and the failures (name -> reason) of this shard's images."""

    total: int = 0
    skipped: int = 0
    done: int = 0
    seconds: float = 0.0
    complete: bool = False
    failures: dict[str, str] = field(default_factory=dict)
    set_aside: dict[str, str] = field(default_factory=dict)  # damaged part, renamed -> what was wrong
    cleaned: int = 0  # temporary files of killed runs removed

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


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
    with open(list_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
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


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core; no nested threading


def process_image(task: tuple[int, ImageEntry, str, dict]) -> tuple[int, ImageProposals]:
    """Worker: load one image and propose; any failure becomes a recorded reason."""
    index, entry, method, options = task
    try:
        image = load_image(_resolve(entry.path))
    except UserError as err:
        return index, ImageProposals(entry.name, error=str(err))
    except Exception as err:  # noqa: BLE001 - anything else a file can cause is recorded too
        return index, ImageProposals(entry.name, error=f"cannot read image: {type(err).__name__}: {err}")
    try:
        result = propose(image, method, **options)
    except Exception as err:  # noqa: BLE001 - recorded, listed, and the run goes on
        return index, ImageProposals(entry.name, error=f"proposals failed: {type(err).__name__}: {err}")
    boxes, scores = result if isinstance(result, tuple) else (result, None)
    size = image.shape[:2]
    return index, ImageProposals(entry.name, size, encode_boxes(boxes, size),
                                 None if scores is None else np.asarray(scores, np.float16))


def parse_shard(text: str | None, environ=os.environ) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)``; None -> ``(RANK, WORLD_SIZE)`` from the environment (torchrun) or (0, 1)."""
    if text is None:
        if "RANK" in environ and "WORLD_SIZE" in environ:
            text = f"{environ['RANK']}/{environ['WORLD_SIZE']}"
        else:
            return (0, 1)
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"shard {text!r}: expected K/N with integers, e.g. 0/4") from None
    if not (n >= 1 and 0 <= k < n):
        raise UserError(f"shard {text!r}: need 0 <= K < N")
    return (k, n)


def _chunk_name(chunk: int, names: Sequence[str], meta: dict) -> str:
    """``chunk-<c>-<tag>.pstore``, the tag a digest of the settings and the names: runs with other
    settings or another list never write the same name."""
    text = json.dumps(meta, sort_keys=True) + "\n" + "\n".join(names)
    tag = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
    return f"chunk-{chunk:07d}-{tag}.pstore"


def claim_store(out: Path, meta: dict) -> None:
    """Record ``meta`` in ``out/store.json`` if no run has yet (atomically and exclusively: of two runs
    starting together, one writes it and the other compares), else refuse other settings."""
    wanted = json.loads(json.dumps(meta))
    settings = out / SETTINGS_FILE
    if not settings.exists():
        fd, tmp = create_temporary(out, ".store.", ".tmp.json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"format": "proposal-store", "meta": wanted}, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, settings)  # fails if another run's is there: never overwritten
        except FileExistsError:
            pass
        except OSError as err:
            raise UserError(f"{settings}: cannot write ({err.strerror or err}); check the folder and rerun") from None
        finally:
            os.unlink(tmp)
    try:
        with open(settings, encoding="utf-8") as f:
            held = json.load(f)["meta"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise UserError(f"{settings}: unreadable store settings; if the store's parts are right, delete this file "
                        "and rerun (it is written again from this run's settings)") from None
    if held != wanted:
        raise UserError(f"{out}: holds proposals made with {held}, not {wanted}; use another --out")


def precompute(entries: Sequence[ImageEntry], out: str | os.PathLike, config: PrecomputeConfig,
               progress: bool = True) -> PrecomputeReport:
    """Compute proposals for this shard's images not yet in the store ``out`` (a folder).

    When the shard is complete, the store's parts are compacted into one.
    """
    from tqdm import tqdm

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; --out names a store folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{out}: cannot create the store folder ({err.strerror or err}); check the path") from None
    meta = config.meta()
    cleaned = len(clean_temporary(out))  # left by killed runs (a compaction's is as large as the store)
    set_aside = {str(path): reason for path, reason in set_aside_damaged(out).items()}
    existing = ProposalStore(out)
    if existing.parts and existing.meta != json.loads(json.dumps(meta)):
        raise UserError(f"{out}: holds proposals made with {existing.meta}, not {meta}; use another --out")
    claim_store(out, meta)
    finished = set(existing.names())
    if not config.retry_failed:
        finished |= set(existing.failures)
    k, n = config.shard
    size = max(1, int(config.chunk_size))
    mine = [c for c in range(-(-len(entries) // size)) if c % n == k]
    report = PrecomputeReport(total=sum(len(entries[c * size:(c + 1) * size]) for c in mine),
                              set_aside=set_aside, cleaned=cleaned)
    todo: dict[int, list[int]] = {}
    for c in mine:
        left = [i for i in range(c * size, min(len(entries), (c + 1) * size)) if entries[i].name not in finished]
        if left:
            todo[c] = left
    report.skipped = report.total - sum(len(v) for v in todo.values())
    options = dict(config.options)
    num_tasks = sum(len(v) for v in todo.values())
    tasks = ((i, entries[i], config.method, options) for c in sorted(todo) for i in todo[c])  # lazily
    pending = {c: {} for c in todo}
    start = time.perf_counter()
    bar = tqdm(total=num_tasks, unit="img", desc="proposals", disable=not progress, smoothing=0.05)

    def collect(index: int, result: ImageProposals) -> None:
        c = index // size
        pending[c][index] = result
        if len(pending[c]) == len(todo[c]):
            results = pending.pop(c)
            done = [results[i] for i in todo[c]]
            write_part(out / _chunk_name(c, [e.name for e in done], meta), done, meta)
        report.done += 1
        if result.error is not None:
            report.failures[result.name] = result.error
            bar.set_postfix(failed=len(report.failures))
        bar.update(1)

    if config.workers <= 1 or num_tasks <= 1:
        _init_worker()
        for task in tasks:
            collect(*process_image(task))
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(config.workers, initializer=_init_worker) as pool:
            for index, result in pool.imap_unordered(process_image, tasks, chunksize=1):
                collect(index, result)
    bar.close()
    report.seconds = time.perf_counter() - start
    store = ProposalStore(out)
    shard_names = {entries[i].name for c in mine for i in range(c * size, min(len(entries), (c + 1) * size))}
    report.failures = {nm: r for nm, r in sorted(store.failures.items()) if nm in shard_names}
    have = set(store.names()) | set(store.failures)
    report.complete = shard_names <= have
    if report.complete:
        compact(out)
    return report
