"""Where the network runs and in what precision: one name and one rule for each, for detection and training.

``device``: ``"auto"`` (CUDA if available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
``precision``: ``"auto"`` (bf16 where the hardware has it natively: CUDA with bf16, or a CPU with
AVX512-BF16 or AMX; fp32 elsewhere), ``"fp32"``, ``"bf16"`` or ``"fp16"`` (a GPU only), the words of every
tool's ``--precision``. A wrong name, or fp16 on the CPU, is one :class:`UserError` line.
"""

from __future__ import annotations

import torch

from detector.base.defaults import PRECISIONS
from detector.base.errors import UserError


def resolve_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The device for ``device``: ``"auto"``/``None``: CUDA if available, else the CPU; otherwise the named
    device, checked. A plain ``"cuda"`` (or ``"auto"`` on a GPU machine) is this process's GPU:
    ``cuda:<local_rank mod the GPU count>`` (torchrun's ``LOCAL_RANK``; 0 for a single process)."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device '{device}'; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{device}' asked for, but CUDA is not available here; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is None:
            dev = torch.device("cuda", local_rank % count)
        elif dev.index >= count:
            raise UserError(f"device '{device}': this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return dev


def cpu_has_native_bf16() -> bool:
    """True if the CPU advertises AVX512-BF16 or AMX-BF16 (Linux ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``torch.bfloat16``, ``torch.float16`` or ``torch.float32`` for ``"auto"``, ``"bf16"``, ``"fp16"`` or
    ``"fp32"`` on ``device``."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        if device.type != "cuda":
            raise UserError("precision 'fp16' needs a GPU; use --precision bf16 or fp32 on the CPU")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
