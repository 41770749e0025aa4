"""The files a training run leaves for the next one: the resume state, the metrics log and its plot.

- ``last.state.pt``: everything a resume needs (model, optimizer, iteration, random states, the
  settings it must match), written with ``torch.save`` (:func:`save_train_state`) and read with
  ``weights_only=True`` (:func:`load_train_state`). It carries a sha256 of its content
  (:func:`state_digest`), checked before a resume uses anything: a damaged state, or one whose weights
  are not finite, is refused in one line and nothing is written.
- The settings a resume must share with its run are compared by :func:`check_same_settings`
  (:func:`differences` lists them).
- ``metrics.jsonl`` (:class:`MetricsLog`): one JSON object per logged iteration or evaluation,
  appended; a resume drops a torn last line (a kill while appending) with a warning. ``curves.png``
  (:func:`plot_curves`): the loss and the evaluation metric against the iteration.
- What a killed writer left (``.last.state.pt.*.tmp.pt``, as large as the model and its optimizer state)
  is removed when a run starts or resumes in the folder (:func:`clean_run_folder`, the rule every writer
  follows: :func:`detector.base.files.clean_temporary`).

Warnings (a torn line, an older state) go to stderr unless a ``warn`` callable is given.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from detector.base.errors import UserError
from detector.base.files import atomic_path, atomic_write, clean_temporary
from detector.base.plots import pyplot, save_figure

STATE_FORMAT = "googlenet-detection/train-state"
STATE_VERSION = 2  # 2: with "sha256", the digest of the rest (1: none, still read)
STATE_FILE = "last.state.pt"  # in a run folder
_STATE_KEYS = ("iteration", "model", "optimizer", "rng")
RESTORE = "restore the file, or start a new run from the run's last.safetensors (--init-checkpoint)"


def warn_on_stderr(line: str) -> None:
    """The default for warnings: a line on stderr (a log sent to a file still shows them)."""
    print(line, file=sys.stderr)


# ----------------------------------------------------------------------------------------------------
# random states


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """python, numpy and torch (CPU and CUDA) random states, as types ``torch.load(weights_only=True)`` reads."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# the resume state


def state_digest(obj) -> str:
    """sha256 of a training state's content: every tensor's dtype, shape and bytes, every other value's
    type and repr, dict keys in sorted order; independent of how ``torch.save`` lays out the file."""
    h = hashlib.sha256()

    def feed(x) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=repr):
                feed(k)
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    feed(obj)
    return h.hexdigest()


def non_finite(tensors) -> list[str]:
    """Names of the floating-point tensors of a ``{name: tensor}`` tree that hold NaN or infinity."""
    out = []

    def walk(x, name: str) -> None:
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                out.append(name)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{name}.{i}")

    walk(tensors, "")
    return out


def save_train_state(path: str | Path, state: dict) -> None:
    """Write ``state`` (``iteration``, ``model``, ``optimizer``, ``rng`` and whatever else the run keeps)
    atomically to ``path`` with its format, version and sha256."""
    state = {"format": STATE_FORMAT, "version": STATE_VERSION, **state}
    state["sha256"] = state_digest(state)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def clean_run_folder(folder: str | Path) -> list[Path]:
    """Remove what killed writers left in a run folder (a ``.last.state.pt.*.tmp.pt`` of a kill while the
    state was written); files a live writer holds are kept. Returns the files removed."""
    return clean_temporary(folder)


def load_train_state(path: str | Path, report: Callable[[str], None] | None = None) -> dict:
    """Read a ``*.state.pt`` resume file (or the ``last.state.pt`` of a run directory) without unpickling
    code, and check it before anything uses it: its sha256 (a damaged file is refused, never trained
    on), the entries a resume needs, and finite weights and optimizer state. A state of the first
    version (no digest) is read with a note to ``report`` (default: a warning on stderr).

    An unreadable file is one line saying what the README promises (restore it, or start a new run
    from ``last.safetensors``); torch's own advice (load with ``weights_only=False``, i.e. run the
    file's code) is never quoted: it is unsafe, and wrong for a file this project wrote."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise UserError(f"cannot resume: '{path}' does not exist; pass a run directory or its {STATE_FILE}")
    try:
        with warnings.catch_warnings():  # torch's notes on a strange file's pickle protocol: the error says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to replace
        raise UserError(f"cannot resume from '{path}': not a readable training state ({_load_error(err)}); "
                        f"nothing was written: {RESTORE}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"cannot resume from '{path}': not a training state of this project; nothing was "
                        f"written: {RESTORE}")
    damaged = f"cannot resume from '{path}': the training state is damaged ({{}}); nothing was written: {RESTORE}"
    if "sha256" in state:
        saved = state.pop("sha256")
        if saved != state_digest(state):
            raise UserError(damaged.format("its content does not match its sha256"))
    else:
        note = (f"'{path}' has no checksum (written by an older version): it is checked for finite weights "
                "only")
        (report or warn_on_stderr)(f"warning: {note}")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise UserError(damaged.format(f"no {', '.join(missing)}"))
    bad = non_finite({"model": state["model"], "optimizer": state["optimizer"]})
    if bad:
        raise UserError(damaged.format(f"{len(bad)} tensors hold NaN or infinity, e.g. {bad[0]}"))
    return state


def _load_error(err: Exception) -> str:
    """What ``torch.load`` found wrong, in a few words, without its advice to rerun with
    ``weights_only=False`` (unsafe: that runs the file's code; and no state of this project needs it)."""
    text = str(err)
    if "weights_only" in text or "Weights only load failed" in text:
        at = text.find("WeightsUnpickler error:")  # the reason, after the advice
        rest = [line.strip() for line in text[at:].split(":", 1)[-1].splitlines() if line.strip()] if at >= 0 else []
        reason = rest[0].split(" was not an allowed global")[0].split(". Please")[0] if rest else "unknown content"
        return f"{reason[:160]}; not a file this project writes"
    first = text.splitlines()[0].strip().split(". ")[0] if text.strip() else ""  # its first sentence
    return f"{type(err).__name__}: {first[:160]}" if first else type(err).__name__


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Settings that differ between a saved run and now, as ``key: old in the file, new now``.

    Nested dicts are compared key by key, and a key absent on one side equals ``None`` on the other
    (so a setting added to the tool later, left at its ``None`` default, does not block a resume).
    """
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} in the file, {b!r} now")
    return out


def check_same_settings(saved: dict, current: dict, resume: str | Path, report: Callable[[str], None]) -> None:
    """Refuse (:class:`UserError`, naming up to four differences) a resume whose saved settings are not
    ``current``. A whole group of settings (a dict of ``current``) that an older version did not record
    cannot be compared: that is said to ``report``, not refused."""
    unrecorded = [k for k, v in current.items() if isinstance(v, dict) and k not in saved]
    for k in unrecorded:
        report(f"warning: '{resume}' does not record the {k} settings (written by an older version); "
               "make sure they are those of its run")
    diffs = differences(saved, {k: v for k, v in current.items() if k not in unrecorded})
    if diffs:
        raise UserError(f"cannot resume from '{resume}': it was written with a different configuration ("
                        + "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
                        + "); resume with the same settings or start a new run")


# ----------------------------------------------------------------------------------------------------
# the metrics log and its plot


class MetricsLog:
    """``metrics.jsonl``: one JSON object a line, appended and flushed as training goes.

    A resume keeps the lines up to the iteration it resumes from. The last line may be torn (a kill
    while appending): it is dropped, with a warning to ``report``; a bad line elsewhere is a
    :class:`UserError` naming it.
    """

    def __init__(self, path: Path, resume_from: int | None, report: Callable[[str], None] = warn_on_stderr):
        self.path = path
        if resume_from is not None and path.exists():
            # drop what the interrupted run logged after the checkpoint it resumes from
            kept = [line for line, record in self._records(report) if record.get("iteration", 0) <= resume_from]
            atomic_write(path, "".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()

    def _records(self, report: Callable[[str], None] | None) -> list[tuple[str, dict]]:
        lines = [(n, line) for n, line in enumerate(
            self.path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1) if line.strip()]
        out = []
        for i, (lineno, line) in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                out.append((line, record))
            elif i == len(lines) - 1:
                if report is not None:
                    report(f"warning: {self.path}:{lineno}: dropped a torn last line (the run was stopped while "
                           "writing it)")
            else:
                raise UserError(f"{self.path}:{lineno}: not a JSON record; delete the line (or the file) and "
                                "resume again")
        return out

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [record for _, record in self._records(None)]


def plot_curves(records: list[dict], path: Path, metric: str) -> None:
    """PNG of the training loss and the evaluation metric against the iteration."""
    plt = pyplot()
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if metric in r.get("eval", {})]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot([r["iteration"] for r in train], [r["loss"] for r in train], color="tab:blue", lw=1, label="loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.set_yscale("log")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["iteration"] for r in evals], [r["eval"][metric] for r in evals], "o-", color="tab:red",
                 label=f"validation {metric}")
        ax2.set_ylabel(f"validation {metric}", color="tab:red")
        ax2.set_ylim(0, 1)
    ax.set_title("training curves")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
