"""Starting N training processes from inside a tool (``gdet-train --nproc N``), as detectron2's ``launch``
does, with torch's elastic launcher API (what ``torchrun --standalone`` runs): one machine, a free port
found by the c10d rendezvous, no restarts.

The tool checks every argument once, in the calling process, before :func:`launch`; each process then
runs ``entrypoint(*args)`` with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` set (so :func:`detector.training.distributed.init_distributed` joins the group) and
returns an exit code instead of raising for what a user can cause, so that the launcher never turns a
one-line error into a ``ChildFailedError`` traceback.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (or :func:`launch`)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_rank() -> int:
    """This process's rank under torchrun (0 without it)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def launch(entrypoint: Callable[..., int], nproc: int, args: tuple = ()) -> int:
    """Run ``entrypoint(*args)`` in ``nproc`` spawned processes on this machine; returns the largest exit
    code they returned. ``entrypoint`` must be a module-level function (it is pickled by name)."""
    # torch only here: the tool has parsed and checked its arguments already
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"gdet-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
                          start_method="spawn")
    codes = elastic_launch(config, entrypoint)(*args)
    return max(int(code or 0) for code in codes.values())
