"""Running one training process or several under ``torchrun``.

``torchrun`` (``python -m torch.distributed.run``) sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` for
each process; :func:`init_distributed` reads them, joins the process group (gloo on CPU, NCCL on GPU) and
returns a :class:`DistContext`. Without them it returns the single-process context and touches nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from detector.base.errors import UserError
from detector.device import resolve_device


@dataclass(frozen=True)
class DistContext:
    """rank: this process's index in ``0..world_size-1``; local_rank: its index on its machine;
    device: where this process trains; distributed: whether a process group was joined."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints, logs and plots (rank 0)."""
        return self.rank == 0


def init_distributed(device: str = "auto", backend: str | None = None) -> DistContext:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1), else a single process.

    backend: ``None`` picks NCCL for CUDA devices and gloo for the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistContext(0, 1, 0, dev, False)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if dev.type == "cuda" else "gloo"),
                                rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, dev, True)


@contextmanager
def distributed_run(device: str = "auto") -> Iterator[DistContext]:
    """:func:`init_distributed` for the length of a ``with`` block, and :func:`cleanup` at its end (what a
    training tool's run is wrapped in). A process group that cannot be joined is a :class:`UserError`."""
    try:
        ctx = init_distributed(device)
    except RuntimeError as err:
        raise UserError(f"cannot start the distributed run: {err}") from None
    try:
        yield ctx
    finally:
        cleanup(ctx)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    """``obj`` from rank ``src`` on every rank (a no-op for a single process)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """The mean over ranks of each scalar (for logging); NaNs stay NaN."""
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    t /= ctx.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def cleanup(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
