"""Plots without a display: matplotlib's pyplot on the Agg backend, and a figure written atomically.

matplotlib is imported when a plot is drawn, never when this module is: most runs draw nothing, and
``import matplotlib.pyplot`` costs about half a second.
"""

from __future__ import annotations

from pathlib import Path

from detector.base.files import atomic_path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
    import matplotlib  # optional and slow to import: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (the format from its extension) atomically, close it, return ``path``."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    return Path(path)
