"""The one batch-job framework: a list of items in chunks, split in shards, run by a pool, resumable.

Proposal precomputation (:mod:`proposals.precompute`), dataset detection (:mod:`detector.dataset_runner`)
and training's proposals all run through :func:`run_job`:

- **Chunks.** Item ``i`` belongs to chunk ``i // chunk_size`` (:class:`Chunks`). A chunk's results are
  written by the job's :class:`ChunkSink` as one file, atomically, once all its items are done, so a
  killed run loses at most the chunks in flight and a rerun skips what is on disk.
- **Shards.** Shard ``K`` of ``N`` takes the chunks ``c`` with ``c % N == K`` (:class:`Shard`, parsed
  once from ``--shard K/N`` or torchrun's ``RANK``/``WORLD_SIZE``): the split is deterministic and
  shards never overlap. :meth:`Shard.after_run` says who merges when every chunk is there.
- **Manifest.** :func:`claim_manifest` records the settings that decide the results (and their
  digest) beside the chunks, exclusively; a resume with other settings is refused in one line.
- **Failures.** An item whose ``work`` raises is recorded with its reason (never the end of a long
  run); :attr:`JobReport.failures` lists every failed item of the shard at the end, this run's and
  earlier runs', and ``retry_failed`` does them again.
- **One report** (:class:`JobReport`: items done / skipped / failed, seconds, items/s, ``to_dict``),
  **one progress bar** (tqdm), and **one failure report** (:func:`print_failures`): every failed item
  and the final count on stderr, so a user who sends the report table to a file still sees the errors.
- **One concurrency model** (:mod:`detector.base.pool`, whose names this module re-exports): ``workers``
  processes started with ``spawn``, or threads for work that releases the GIL (measured there), or the
  calling thread (``workers == 0``); results come back in item order.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from detector.base.errors import UserError
from detector.base.files import locked_temporary
from detector.base.pool import (
    POOLS,
    PROCESSES,
    THREADS,
    ItemFailed,
    Outcome,
    attempt,
    default_workers,
    imap_outcomes,
    opencv_single_thread,
)

__all__ = ["POOLS", "PROCESSES", "THREADS", "AllFailed", "ChunkSink", "Chunks", "ItemFailed", "JobConfig",
           "JobReport", "Outcome", "Shard", "attempt", "claim_manifest", "default_workers", "imap_outcomes",
           "missing_chunks", "opencv_single_thread", "print_failures", "refuse_all_failed", "run_job",
           "settings_digest",
           "wait_for_chunks"]


# -- shards and chunks -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the chunks ``c`` with ``c % count == index``.

    torchrun: taken from torchrun's ``RANK``/``WORLD_SIZE`` (with ``count > 1``): the ranks run together
    and rank 0 waits for the others before it merges (:meth:`after_run`).
    """

    index: int = 0
    count: int = 1
    torchrun: bool = False

    def __post_init__(self):
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise UserError(f"shard {self.index}/{self.count}: need 0 <= K < N")

    @classmethod
    def parse(cls, text: str | None, environ: Mapping[str, str] | None = None) -> Shard:
        """``"K/N"`` (``--shard``); None: torchrun's ``RANK``/``WORLD_SIZE`` if set, else the whole job."""
        environ = os.environ if environ is None else environ
        if text is None:
            if "RANK" not in environ or "WORLD_SIZE" not in environ:
                return cls()
            try:
                rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
            except ValueError:
                raise UserError(f"RANK={environ['RANK']!r} WORLD_SIZE={environ['WORLD_SIZE']!r}: not integers; "
                                "start the job with torchrun, or pass --shard K/N") from None
            return cls(rank, world, torchrun=world > 1)
        try:
            index, count = (int(v) for v in text.split("/"))
        except ValueError:
            raise UserError(f"shard {text!r}: expected K/N with integers, e.g. 0/4") from None
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, chunk: int) -> bool:
        return chunk % self.count == self.index

    def chunks(self, num_chunks: int) -> list[int]:
        """This shard's chunks of a job of ``num_chunks`` chunks."""
        return list(range(self.index, num_chunks, self.count))

    def after_run(self, missing_chunks: Sequence[int]) -> str:
        """What this shard does once its own chunks are done, ``missing_chunks`` being the chunks of the
        whole job still without results (other shards' work):

        - ``"merge"``: every chunk is there and this shard merges them (torchrun: rank 0 only; separate
          ``--shard`` runs: whichever finishes last, or any rerun);
        - ``"wait"``: torchrun's rank 0 waits for the other ranks (:func:`wait_for_chunks`), then merges;
        - ``"leave"``: nothing more to do here; another shard merges.
        """
        if missing_chunks:
            return "wait" if self.torchrun and self.index == 0 else "leave"
        return "leave" if self.torchrun and self.index != 0 else "merge"


@dataclass(frozen=True)
class Chunks:
    """``num_items`` items in chunks of ``size`` (>= 1): chunk ``c`` holds items ``c * size .. (c + 1) * size - 1``."""

    num_items: int
    size: int

    def __post_init__(self):
        if self.size < 1:
            raise UserError(f"chunk size must be >= 1, got {self.size}")

    def __len__(self) -> int:
        return -(-self.num_items // self.size)

    def positions(self, chunk: int) -> range:
        return range(chunk * self.size, min(self.num_items, (chunk + 1) * self.size))

    def of(self, position: int) -> int:
        return position // self.size


# -- the manifest -------------------------------------------------------------------------------------------

def settings_digest(settings: Mapping) -> str:
    """blake2b (16 hex digits) of the settings' canonical JSON (sorted keys)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


def _differences(held, wanted, prefix: str = "") -> list[str]:
    if isinstance(held, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted(set(held) | set(wanted), key=str):
            out += _differences(held.get(key), wanted.get(key), f"{prefix}{key}.")
        return out
    return [] if held == wanted else [f"{prefix.rstrip('.')} {json.dumps(held)} there, {json.dumps(wanted)} now"]


def _create_once(path: Path, text: str) -> None:
    """Write ``path`` complete and only if it does not exist: a temporary file, fsynced, then hard-linked
    to its name (which fails if another run's is there); where the file system has no hard links, an
    exclusive create. The temporary file stays locked until it is linked (see
    :func:`detector.base.files.clean_temporary`)."""
    fd, tmp = locked_temporary(path.parent, f".{path.name}.", ".tmp")
    lock = os.dup(fd)  # the lock lasts while either is open: until the link is made
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        try:  # a file system without hard links
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.unlink(tmp)
        os.close(lock)


def claim_manifest(path: str | os.PathLike, settings: Mapping, kind: str, what: str = "results") -> str:
    """Record ``settings`` (JSON-serializable) in the manifest file ``path``, or check them against it.

    The first run writes ``{"format": kind, "digest": ..., "settings": ...}``, exclusively (of two runs
    starting together one writes it and the other compares), and it is never overwritten. A run with
    other settings is a one-line :class:`UserError` naming what differs. Returns the settings' digest.
    ``what`` names the results in messages ("proposals", "detections").
    """
    path = Path(path)
    folder = path.parent
    wanted = json.loads(json.dumps(settings))  # as read back: tuples become lists
    digest = settings_digest(wanted)
    if not path.exists():
        text = json.dumps({"format": kind, "digest": digest, "settings": wanted}, indent=1, sort_keys=True)
        try:
            _create_once(path, text)
        except OSError as err:
            raise UserError(f"{path}: cannot write ({err.strerror or err}); check the folder and rerun") from None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        held = doc["settings"] if "settings" in doc else doc["meta"]  # "meta": proposal stores' first manifest
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: unreadable run settings; if the {what} beside it are right, delete this file and "
                        "rerun (it is written again from this run's settings)") from None
    if held != wanted:
        changed = _differences(held, wanted)
        shown = "; ".join(changed[:3]) + ("; ..." if len(changed) > 3 else "")
        raise UserError(f"{folder}: holds {what} made with other settings ({shown}); use another --out, or delete "
                        f"{folder} to start over")
    return digest


# -- a job -----------------------------------------------------------------------------------------------------

class ChunkSink(Protocol):
    """Where a job's results go, chunk by chunk (one per kind of job)."""

    def pending(self, chunk: int, positions: range, retry_failed: bool) -> list[int]:
        """The positions of chunk ``chunk`` still to do (``[]``: the chunk is done), as on disk now."""
        ...

    def write(self, chunk: int, results: list[tuple[int, Outcome]]) -> None:
        """Write a chunk's ``(position, outcome)`` pairs, in position order, atomically."""
        ...

    def failures(self, positions: Sequence[int]) -> dict[str, str]:
        """Every item at these positions recorded as failed, name -> reason, in position order."""
        ...


@dataclass(frozen=True)
class JobConfig:
    """How to run a job.

    chunk_size: items per chunk (the unit of atomic writes, resume and sharding), >= 1.
    shard: this run's share of the chunks.
    workers: processes (or threads) doing the work; 0 works in the calling thread.
    pool: :data:`PROCESSES` (spawned) or :data:`THREADS`; see the module docstring for which work suits which.
    read_ahead: items in flight at most (None: ``2 * workers``).
    retry_failed: do again the items recorded as failed.
    progress: show a progress bar, labelled ``desc``, counting ``unit``.
    """

    chunk_size: int = 64
    shard: Shard = Shard()
    workers: int = 0
    pool: str = PROCESSES
    read_ahead: int | None = None
    retry_failed: bool = False
    progress: bool = True
    desc: str = "job"
    unit: str = "img"

    def __post_init__(self):
        Chunks(0, self.chunk_size)  # validates the size
        if self.workers < 0:
            raise UserError(f"workers must be >= 0, got {self.workers}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")


@dataclass
class JobReport:
    """What one run of one shard did.

    total: items in the shard; skipped: done before this run; done: processed by this run (failed
    ones included); failures: every item of the shard recorded as failed, by this run or an earlier
    one (name -> reason, item order); failed_now: how many of them this run tried; seconds: wall time
    of the work; timings: seconds per stage (``work``: summed over workers; jobs add their own);
    missing_chunks: chunks of the whole job (any shard) still without results; notes: what the run
    repaired on the way, for the user.
    """

    shard: Shard = Shard()
    total: int = 0
    skipped: int = 0
    done: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    failed_now: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    missing_chunks: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def items_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        """Every chunk of this shard has its results (``missing_chunks`` tells about the others)."""
        return not any(self.shard.owns(c) for c in self.missing_chunks)

    @property
    def all_failed(self) -> bool:
        """The shard has items and every one of them is recorded as failed: such a run is not complete,
        whatever its chunks say (see :func:`refuse_all_failed`)."""
        return self.total > 0 and len(self.failures) >= self.total

    def summary(self, unit: str = "images", verb: str = "processed") -> str:
        """One line: ``shard K/N: T images, S already done, D processed in X s (R images/s), F failed``."""
        return (f"shard {self.shard}: {self.total} {unit}, {self.skipped} already done, {self.done} {verb} in "
                f"{self.seconds:.1f} s ({self.items_per_second:.2f} {unit}/s), {len(self.failures)} failed")

    def print_failures(self, what_to_do: str | None, unit: str = "images", file=None) -> None:
        """Every failed item of the shard and the count, on stderr (see :func:`print_failures`)."""
        print_failures(self.failures, what_to_do, self.total, unit, file)

    def to_dict(self) -> dict:
        return {"shard": [self.shard.index, self.shard.count], "total": self.total, "skipped": self.skipped,
                "done": self.done, "failed": len(self.failures), "seconds": round(self.seconds, 3),
                "items_per_second": round(self.items_per_second, 4),
                "stage_seconds": {k: round(v, 3) for k, v in self.timings.items()},
                "complete": self.complete, "missing_chunks": len(self.missing_chunks),
                "failures": dict(self.failures), "notes": list(self.notes)}


def run_job(items: Sequence, names: Sequence[str], work: Callable[[Any], Any], sink: ChunkSink,
            config: JobConfig, initializer: Callable[[], None] | None = None) -> JobReport:
    """Do this shard's items that ``sink`` does not hold yet: ``work(items[i])`` in the pool, each chunk
    handed to ``sink.write`` in the calling thread when its last item is back. ``names[i]`` names item
    ``i`` in the report. See the module docstring."""
    if len(names) != len(items):
        raise ValueError(f"run_job: {len(items)} items but {len(names)} names")
    chunks = Chunks(len(items), config.chunk_size)
    mine = config.shard.chunks(len(chunks))
    todo = {c: left for c in mine if (left := sink.pending(c, chunks.positions(c), config.retry_failed))}
    report = JobReport(config.shard, total=sum(len(chunks.positions(c)) for c in mine))
    positions = [p for c in todo for p in todo[c]]
    report.skipped = report.total - len(positions)
    # tqdm where a bar is shown: its import costs more than the base's light modules (about 70 ms)
    from tqdm import tqdm

    bar = tqdm(total=len(positions), unit=config.unit, desc=config.desc, disable=not config.progress, smoothing=0.05)
    start = time.perf_counter()
    work_seconds, current = 0.0, []
    with bar:
        # a pool only for several items, and never larger than the work: a pool's start costs seconds
        workers = min(config.workers, len(positions)) if len(positions) > 1 else 0
        outcomes = imap_outcomes(work, (items[p] for p in positions), workers, config.pool, config.read_ahead,
                                 initializer)
        for position, outcome in zip(positions, outcomes):
            current.append((position, outcome))
            work_seconds += outcome.seconds
            if not outcome.ok:
                report.failed_now += 1
                bar.set_postfix(failed=report.failed_now)
            chunk = chunks.of(position)
            if position == todo[chunk][-1]:
                sink.write(chunk, current)
                report.done += len(current)
                current = []
            bar.update(1)
    report.seconds = time.perf_counter() - start
    report.timings["work"] = work_seconds
    report.failures = sink.failures([p for c in mine for p in chunks.positions(c)])
    report.missing_chunks = missing_chunks(sink, chunks)
    return report


class AllFailed(UserError):
    """Every item of a job failed: nothing usable was made (exit code 1, as for failures under --strict)."""

    exit_code = 1


def refuse_all_failed(failures: Mapping[str, str], total: int, unit: str = "images") -> None:
    """The rule of every batch job: a run in which all ``total`` items failed is not complete. Raises
    :class:`AllFailed`, one line with the count and the first reason; does nothing if any item succeeded
    (or there were none)."""
    if total > 0 and len(failures) >= total:
        name, reason = next(iter(failures.items()))
        raise AllFailed(f"all {total} {unit} failed (first: {name}: {reason}); fix the cause and rerun with "
                        "--retry-failed")


def print_failures(failures: Mapping[str, str], what_to_do: str | None, total: int = 0, unit: str = "images",
                   file=None) -> None:
    """The failure report of every batch job: one ``failed: NAME: REASON`` line per failed item, then
    ``N images failed; WHAT_TO_DO``, on ``file`` (default: stderr, so that a report table sent to a file
    leaves the errors on the terminal). Nothing when nothing failed. When all ``total`` items failed the
    count line is left out: :func:`refuse_all_failed` says it, as the run's error line. ``what_to_do``
    None: the count line without advice."""
    if not failures:
        return
    file = sys.stderr if file is None else file
    for name, reason in failures.items():
        print(f"failed: {name}: {reason}", file=file)
    if total > 0 and len(failures) >= total:
        return
    if len(failures) == 1 and unit.endswith("s"):
        unit = unit[:-1]  # "1 image failed"
    print(f"{len(failures)} {unit} failed" + (f"; {what_to_do}" if what_to_do else ""), file=file)


def missing_chunks(sink: ChunkSink, chunks: Chunks) -> list[int]:
    """Chunks of the whole job without results in ``sink`` (failed items count as results)."""
    return [c for c in range(len(chunks)) if sink.pending(c, chunks.positions(c), False)]


def wait_for_chunks(sink: ChunkSink, chunks: Chunks, poll_seconds: float = 5.0, timeout: float | None = None,
                    progress: bool = True, where: str | os.PathLike = "") -> None:
    """Block until every chunk of the job has its results (written by other shards), polling ``sink``."""
    from tqdm import tqdm  # where a bar is shown (see run_job)

    missing = missing_chunks(sink, chunks)
    deadline = None if timeout is None else time.monotonic() + timeout
    with tqdm(total=len(chunks), initial=len(chunks) - len(missing), unit="chunk", desc="waiting for other shards",
              disable=not progress or not missing) as bar:
        while missing:
            if deadline is not None and time.monotonic() > deadline:
                raise UserError(f"{where or 'job'}: {len(missing)} chunks still missing after {timeout:g} s "
                                f"(first: {missing[0]}); rerun the shard that holds them")
            time.sleep(poll_seconds)
            now = missing_chunks(sink, chunks)
            bar.update(len(missing) - len(now))
            missing = now
