"""The one atomic write: a file appears complete under its name, or not at all.

Every writer of the project goes through :func:`atomic_path` (or its two conveniences,
:func:`atomic_write` for bytes/text in memory and :func:`atomic_open` for a file object): a temporary
file in the target's folder (so the final rename never crosses file systems), written, flushed and
fsynced, then moved into place with ``os.replace``. A crash leaves the old file (or none), never half
of a new one. The file gets the permissions of any file the user creates (``0o666`` less the umask),
not the ``0o600`` that :func:`tempfile.mkstemp` gives.

The temporary name is ``.NAME.<random>.tmp.EXT`` beside ``NAME.EXT``: hidden, recognisably temporary,
and still ending in the target's extension for writers that pick the format from it (``np.save``,
matplotlib, Pillow).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (threads may be creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the umask can only be read by setting it; set it back at once
    os.umask(mask)
    return mask


def create_temporary(folder: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> tuple[int, str]:
    """``(fd, path)`` of a new, empty file in ``folder`` (``mkstemp``), open for writing, whose mode is
    already what the final file must have: ``0o666`` less the umask."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` for the caller to write; on a normal exit it is fsynced
    and renamed to ``target``, on an error removed (the target unchanged). The folder is created if
    missing.

    Example: ``with atomic_path(path) as tmp: save_file(tensors, str(tmp))``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = create_temporary(target.parent, f".{target.name}.", f".tmp{target.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # the writer may have replaced the file: sync what is there now
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """``open(tmp, mode)`` for writing (``"w"`` or ``"wb"``) inside :func:`atomic_path`.

    Example: ``with atomic_open(path) as f: json.dump(doc, f)``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(target) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
        yield f
        f.flush()


def atomic_write(target: str | os.PathLike, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text in ``encoding``, or bytes) to ``target`` atomically; returns ``target``."""
    with atomic_open(target, "wb") as f:
        f.write(data.encode(encoding) if isinstance(data, str) else bytes(data))
    return Path(target)
