"""One concurrency model for batch work: spawned processes, threads, or the calling thread.

:func:`imap_outcomes` runs ``work(item)`` for a stream of items in ``workers`` processes started with
``spawn``, or in threads for work that releases the GIL, or in the calling thread (``workers == 0``);
results come back in item order as :class:`Outcome` (a value, or the reason the item failed), with at
most ``read_ahead`` items in flight. Never ``fork``: a child forked while OpenCV's or OpenMP's thread
pool is running can deadlock, and numba's threading layers are not fork-safe. Spawned workers
re-import the work's module (numba's compiled functions come from its disk cache), so processes pay off
for work of a fraction of a second per item or more.

Which pool suits which work was measured on this project's 2-core machine while a training job ran
beside it (load average 12; ``benchmarks/bench_job_pool.py``, 12 chess photos of 2048 x 1371, speed-up
against the calling thread alone, a process pool's start taken out):

===================================  ===========  ==============
work                                 2 threads    2 processes
===================================  ===========  ==============
Selective Search (``ss-fast``)       1.02x        1.38x
image reading (JPEG decode)          1.40x        0.66x
===================================  ===========  ==============

Selective Search holds the GIL (numba and numpy on small arrays), so threads do not scale and
processes do (the 16-core GPU machine of issue 12: 3.1 / 18.7 / 34.9 images/s with 1 / 4 / 12
processes); decoding a JPEG releases the GIL, and a decoded image is costly to pickle back, so reading
alone uses threads. A process pool's start (spawn, imports, numba's cache) took 13 s for 2 workers on
that loaded machine: small jobs are better done in the calling thread.
:data:`PROCESSES` and :data:`THREADS` name the two choices.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from detector.base.errors import UserError
from detector.base.threads import configure_threads, usable_cores

PROCESSES = "processes"  # spawned worker processes: work that holds the GIL (Selective Search, MultiBox)
THREADS = "threads"  # threads of this process: work that releases the GIL (image decoding, file reads)
POOLS = (PROCESSES, THREADS)


class ItemFailed(Exception):
    """Raised by a job's ``work`` for an item it cannot do: the message is the recorded reason."""


@dataclass(frozen=True)
class Outcome:
    """One item's result: ``value`` (None when it failed), ``error`` (``""`` or the reason), ``seconds``
    of work (in the worker)."""

    value: Any = None
    error: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error


def attempt(work: Callable[[Any], Any], item) -> Outcome:
    """``work(item)`` as an :class:`Outcome`: what an item can cause becomes its recorded reason."""
    start = time.perf_counter()
    try:
        value = work(item)
    except (ItemFailed, UserError) as err:
        return Outcome(None, str(err).replace("\n", " ") or type(err).__name__, time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - one odd item must not end a 20,000-item run; it is listed
        return Outcome(None, f"{type(err).__name__}: {err}".replace("\n", " "), time.perf_counter() - start)
    return Outcome(value, "", time.perf_counter() - start)


def _pool(workers: int, pool: str, initializer: Callable[[], None] | None) -> Executor:
    if pool == THREADS:
        return ThreadPoolExecutor(workers, thread_name_prefix="job", initializer=initializer)
    if pool == PROCESSES:
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer)
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


class WorkerPool:
    """A pool of ``workers`` workers (``pool``: :data:`PROCESSES` or :data:`THREADS`) kept across jobs.

    Starting spawned processes costs seconds (imports, numba's cache: ~5 s for 2 workers on a busy
    2-core machine), so a caller that runs many short jobs (``Detector.detect_stream`` called once per
    folder, a server) starts them once: the pool is made on first use of :attr:`executor` and lives until
    :meth:`close` (or the end of the process). A worker that dies breaks the pool; the next job starts a new one.
    """

    def __init__(self, workers: int, pool: str = PROCESSES, initializer: Callable[[], None] | None = None):
        if workers < 1:
            raise ValueError(f"a worker pool needs workers >= 1, got {workers}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.workers, self.pool, self.initializer = workers, pool, initializer
        self._executor: Executor | None = None
        self._finalizer = None

    @property
    def executor(self) -> Executor:
        """The running executor, started (or restarted after a broken one) on demand."""
        if self._executor is not None and getattr(self._executor, "_broken", False):
            self.close()
        if self._executor is None:
            self._executor = _pool(self.workers, self.pool, self.initializer)
            self._finalizer = weakref.finalize(self, self._executor.shutdown, wait=True, cancel_futures=True)
        return self._executor

    @property
    def started(self) -> bool:
        return self._executor is not None

    def close(self) -> None:
        """Stop the workers (idempotent); a later job starts new ones."""
        if self._finalizer is not None:
            self._finalizer()  # shuts the executor down, once
        self._executor, self._finalizer = None, None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def imap_outcomes(work: Callable[[Any], Any], items: Iterable, workers: int = 0, pool: str = PROCESSES,
                  read_ahead: int | None = None, initializer: Callable[[], None] | None = None,
                  keep: WorkerPool | None = None) -> Iterator[Outcome]:
    """``attempt(work, item)`` for each item, yielded in item order.

    workers: 0 works in the calling thread; else a pool of that many (``pool``: :data:`PROCESSES`,
        started with ``spawn``, or :data:`THREADS`). For processes, ``work`` and the items are pickled:
        a module-level function (or a ``functools.partial`` of one) and plain data.
    read_ahead: items in flight at most (default ``2 * workers``): what waits in memory while the
        caller is busy with earlier results.
    initializer: run once in each worker process or thread (e.g. :func:`opencv_single_thread`).
    keep: a :class:`WorkerPool` to run in (its workers, pool kind and initializer replace ``workers``,
        ``pool`` and ``initializer``); it stays open afterwards, for the caller's next job.
    """
    if keep is not None:
        workers = keep.workers
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0:
        yield from (attempt(work, item) for item in items)
        return
    window = max(1, read_ahead if read_ahead is not None else 2 * workers)
    executor = keep.executor if keep is not None else _pool(workers, pool, initializer)
    pending: deque = deque()
    try:
        for item in items:
            pending.append(executor.submit(attempt, work, item))
            if len(pending) >= window:
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())
    finally:
        if keep is None:
            executor.shutdown(wait=True, cancel_futures=True)
        else:  # a kept pool outlives this job: only this job's unfinished work is dropped
            for future in pending:
                future.cancel()
            if any(not f.cancelled() for f in pending):  # running ones finish before the next job's
                wait(pending)


def _result(future) -> Outcome:
    try:
        return future.result()
    except BrokenProcessPool:
        raise UserError("a worker process died (killed, out of memory, or a crash in native code); rerun with "
                        "fewer --workers (finished chunks are kept)") from None


def opencv_single_thread() -> None:
    """A worker's initializer for work that runs OpenCV (Selective Search) and perhaps torch (MultiBox):
    OpenCV in one thread and, in a worker process, torch in one thread with passive OpenMP waits; the pool
    is the parallelism, and spinning threads would starve the process that consumes the results."""
    import cv2  # an optional heavy dependency, only in the workers that run OpenCV

    cv2.setNumThreads(1)
    if multiprocessing.parent_process() is not None:  # never the caller's own threads (a thread pool)
        configure_threads(1)


def local_world_size() -> int:
    """Processes of this job on this machine: torchrun's ``LOCAL_WORLD_SIZE`` (1 when not set or not a
    whole number >= 1). They share the machine's cores, so each sizes its worker pools to its share."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def default_workers(cap: int = 16) -> int:
    """Worker processes when the user names none: this process's share of the usable cores (divided
    among the ``LOCAL_WORLD_SIZE`` processes torchrun started on this machine) but one (left to the
    process that consumes the results: the training or detection loop), at least 1, at most ``cap``.

    16 cores: 15 workers for one process; 8 ranks: 1 each (8 ranks + 8 workers on 16 cores, where
    dividing nothing started 120). At least 1 even with one core per process: a worker overlaps the
    data's reading with a GPU's work, which the process that waits on the GPU cannot."""
    return max(1, min(cap, usable_cores() // local_world_size() - 1))


class RaisedInWorker:
    """An error a user can cause (:class:`UserError`, :class:`OSError`), raised in a worker and carried
    back as a value, to be raised again in the caller as the same class with the same message.

    For a pool that turns a worker's exception into another (torch's ``DataLoader`` re-raises it as a
    ``RuntimeError`` holding the worker's traceback: 65 lines for one damaged store part): the work
    catches with :meth:`capture` and returns this; the caller calls :meth:`reraise` on what it gets.
    The error is rebuilt from its class, ``args`` and attributes (its ``__init__`` is not called again:
    ``DamagedPart(path, reason)`` has another signature than its message); one that cannot travel
    becomes a :class:`UserError` with the same message.
    """

    def __init__(self, error: BaseException):
        self.message = str(error)
        self.exit_code = getattr(error, "exit_code", 2)
        self.payload: tuple | None = (type(error), error.args, dict(getattr(error, "__dict__", {})))
        try:
            pickle.loads(pickle.dumps(self.payload))
        except Exception:  # noqa: BLE001 - whatever it holds, the message travels
            self.payload = None

    @classmethod
    def capture(cls, work: Callable[..., Any], *args) -> Any:
        """``work(*args)``, or a :class:`RaisedInWorker` of the user error it raised."""
        try:
            return work(*args)
        except (UserError, OSError) as err:
            return cls(err)

    def error(self) -> BaseException:
        """The error as it was raised in the worker (or a :class:`UserError` with its message)."""
        if self.payload is not None:
            kind, args, attributes = self.payload
            try:
                error = kind.__new__(kind, *args)
                error.args = args
                error.__dict__.update(attributes)
                return error
            except Exception:  # noqa: BLE001 - an exception class that cannot be rebuilt: its message
                pass
        error = UserError(self.message)
        error.exit_code = self.exit_code
        return error

    def reraise(self):
        raise self.error() from None
