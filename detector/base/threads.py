"""CPU threads that behave on a shared machine (no torch at import).

OpenMP threads that reach a barrier spin-wait for the others by default. When another process holds
one of the cores, the waiting threads burn their share of the CPU while the thread they wait for is
not running, and a network forward pass runs many times slower than in one thread (measured in
``benchmarks/bench_threads.py``). Two settings avoid that:

- ``OMP_WAIT_POLICY=PASSIVE``: waiting threads sleep. OpenMP reads it once, when torch is imported, so
  :func:`configure_threads` must run before ``import torch``.
- The number of intra-op threads: ``--threads`` if given, else ``OMP_NUM_THREADS`` if the user set it,
  else :func:`default_threads`.

Tools call :func:`configure_threads` right after parsing their arguments (see
:func:`add_threads_argument`), before anything imports torch.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

MAX_DEFAULT_THREADS = 8  # the default never exceeds this many threads (see default_threads)


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, limited by a cgroup v2 CPU quota if any."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def default_threads() -> int:
    """Intra-op threads when the user names none: the usable cores, capped at ``MAX_DEFAULT_THREADS``.

    Measured with ``benchmarks/bench_threads.py`` (2 cores, other jobs at load 5-14): with passive
    waiting, 2 threads were 0.46x the one-thread time per photo beside 2 CPU-bound processes and 0.99x
    without them, where 2 spin-waiting threads took over 4x. So the default does not shrink with the
    machine's load (a load-based count would have chosen 1 thread both times). The cap is a guess, not
    a measurement: a detection batch of 64 small crops has little to share among more threads.
    """
    return min(usable_cores(), MAX_DEFAULT_THREADS)


def configure_threads(threads: int | None = None, processes: int = 1) -> int:
    """Set this process's CPU threads; call it before importing torch. Returns the thread count.

    threads: ``--threads``; ``None`` or 0 means ``OMP_NUM_THREADS`` if set, else :func:`default_threads`
        shared among ``processes`` (a tool's worker processes, which inherit the setting): at least 1 each.
    Sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy, and ``OMP_NUM_THREADS`` so that torch
    starts with that many threads. If torch is already imported (a tool's ``main`` called from Python),
    its thread count is set directly; the wait policy then stays what it was.
    """
    if threads is not None and threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    if not threads:
        threads = _env_threads() or max(1, default_threads() // max(1, processes))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        set_torch_threads(threads)
    return threads


def set_torch_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` if it differs (for code that imported torch first)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def add_threads_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The ``--threads N`` option every tool that runs a network shares."""
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="CPU threads for the network (default: OMP_NUM_THREADS if set, else the "
                             f"cores this process may use, at most {MAX_DEFAULT_THREADS}); OpenMP threads "
                             "wait passively unless OMP_WAIT_POLICY says otherwise")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _env_threads() -> int | None:
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:
        return None
    return value if value >= 1 else None
