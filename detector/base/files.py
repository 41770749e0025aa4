"""The one atomic write: a file appears complete under its name, or not at all.

Every writer of the project goes through :func:`atomic_path` (or its two conveniences,
:func:`atomic_write` for bytes/text in memory and :func:`atomic_open` for a file object): a temporary
file in the target's folder (so the final rename never crosses file systems), written, flushed and
fsynced, then moved into place with ``os.replace``. A crash leaves the old file (or none), never half
of a new one. The file gets the permissions of any file the user creates (``0o666`` less the umask),
not the ``0o600`` that :func:`tempfile.mkstemp` gives.

The temporary name is ``.NAME.<random>.tmp.EXT`` beside ``NAME.EXT``: hidden, recognisably temporary,
and still ending in the target's extension for writers that pick the format from it (``np.save``,
matplotlib, Pillow). An ``OSError`` of the write (a full disk) names the target. The temporary file is
locked (``flock``) while it is written (:func:`locked_temporary`), so :func:`clean_temporary` can remove
what killed writers left (a run's state, a store's compaction: as large as what they write) and never a
live writer's file.

Two more rules every tool follows, here so that there is one of each:

- Output paths are checked before any work (:func:`check_output_file`, :func:`check_output_folder`): a
  folder where a file is expected, a file where a folder is expected, or a folder that cannot be written
  is one line naming the option; a missing folder is created (as the atomic write does), and nothing is
  left behind by the check.
- Text lists (image lists, blacklists, split files) are read by :func:`text_lines`: a line that is not
  UTF-8, or binary data, is one line naming the file and the line, never a ``UnicodeDecodeError``.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from detector.base.errors import UserError

try:
    import fcntl
except ImportError:  # not on Windows: temporary files are then never cleaned as stale
    fcntl = None


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


def locked_temporary(folder: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> tuple[int, str]:
    """:func:`create_temporary`, locked (``flock``) for as long as ``fd`` is open, so that
    :func:`clean_temporary` leaves it alone while it is written."""
    while True:
        fd, tmp = create_temporary(folder, prefix, suffix)
        if fcntl is None:
            return fd, tmp
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: written unlocked (cleaned only by name)
            return fd, tmp
        if os.fstat(fd).st_nlink > 0:
            return fd, tmp
        os.close(fd)  # a cleaner removed it between its creation and the lock: take another


_TEMPORARY = re.compile(r"\..+\.[^.]+\.tmp(\.[^.]+)?")  # .NAME.<random>.tmp[.EXT]


def clean_temporary(folder: str | os.PathLike, prefix: str = ".") -> list[Path]:
    """Remove the temporary files that killed writers left in ``folder``: those of :func:`atomic_path`
    and :func:`locked_temporary` whose name starts with ``prefix`` (``"."``: every one; ``".last.state.pt."``:
    one file's). Files that a live writer holds locked are kept. Returns the files removed (a resume or
    rerun says how many)."""
    removed: list[Path] = []
    if fcntl is None or not Path(folder).is_dir():
        return removed
    for path in sorted(Path(folder).iterdir()):
        if not (path.name.startswith(prefix) and _TEMPORARY.fullmatch(path.name)):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not os.path.isfile(path):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink()  # while locked: a writer that has just created it sees it gone and takes another
            removed.append(path)
        except OSError:  # locked by a live writer, or already gone
            pass
        finally:
            os.close(fd)
    return removed


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` for the caller to write; on a normal exit it is fsynced
    and renamed to ``target``, on an error removed (the target unchanged). The folder is created if
    missing.

    Example: ``with atomic_path(path) as tmp: save_file(tensors, str(tmp))``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock, name = locked_temporary(target.parent, f".{target.name}.", f".tmp{target.suffix}")
    if fcntl is None:  # no lock to hold (and an open file could not be renamed there)
        os.close(lock)
        lock = None
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # the writer may have replaced the file: sync what is there now
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # a writer that made its own file (safetensors: 0600) gets it too
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:  # a failed write(): name the file it was for
            err.filename = str(target)
        raise
    finally:
        if lock is not None:
            os.close(lock)  # the lock goes with it


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


# -- output paths, checked before any work ----------------------------------------------------------------

def _probe_folder(folder: Path, option: str, shown: str) -> None:
    """Create ``folder`` (and its parents) if missing, then create and remove a temporary file in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = locked_temporary(folder, ".gdet-probe.")  # locked: a cleaner in the folder leaves it
        os.unlink(probe)
        os.close(fd)
    except (FileExistsError, NotADirectoryError):  # mkdir found a file where a folder must be
        raise UserError(f"{option} {shown}: cannot write in '{folder}' (a file is in the way where a folder "
                        "must be); give another path") from None
    except OSError as err:
        raise UserError(f"{option} {shown}: cannot write in '{folder}' ({err.strerror or err}); give a "
                        "writable path") from None


def check_output_file(path: str | os.PathLike, option: str, suffixes: tuple[str, ...] = ()) -> Path:
    """Before any work: ``path`` can be written as a file (``option`` names it in the message, e.g.
    ``"--json"``), ending in one of ``suffixes`` if given (case ignored). A folder there, a parent that is
    a file, a folder that cannot be written or another suffix is a one-line :class:`UserError`; a missing
    parent folder is created. Returns the path."""
    path = Path(path)
    shown = f"'{path}'"
    if suffixes and path.suffix.lower() not in suffixes:
        raise UserError(f"{option} {shown}: give a file name ending in {', '.join(suffixes)}")
    if path.is_dir():
        raise UserError(f"{option} {shown} is a folder; give a file name in it (for example "
                        f"{path / 'out.json'})")
    _probe_folder(path.parent, option, shown)
    return path


def check_output_folder(path: str | os.PathLike, option: str, files: tuple[str, ...] = ()) -> Path:
    """Before any work: ``path`` is (or is created as) a folder that can be written, and none of the
    ``files`` the tool will write in it is a folder. One-line :class:`UserError` otherwise. Returns the
    path."""
    path = Path(path)
    shown = f"'{path}'"
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {shown} is a file; give a folder")
    _probe_folder(path, option, shown)
    for name in files:
        if (path / name).is_dir():
            raise UserError(f"{option} {shown}: '{path / name}' is a folder where the output file {name} goes; "
                            "move it away or give another folder")
    return path


# -- text lists -----------------------------------------------------------------------------------------

def text_lines(path: str | os.PathLike, what: str = "list") -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file (a leading byte-order mark is dropped), numbered from 1.

    A line with a NUL byte (a binary file) or bytes that are not UTF-8 is a :class:`UserError` naming the
    file, the line and the column; ``what`` says what the file is ("image list", "blacklist").
    """
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if b"\0" in raw:
                raise UserError(f"{path}:{lineno}: binary data (a NUL byte at column {raw.index(0) + 1}), not a "
                                f"text {what}; pass a text file, one entry per line")
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                f"{err.start + 1}); save the {what} as UTF-8") from None
            yield lineno, line
