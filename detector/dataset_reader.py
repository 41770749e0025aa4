"""A dataset's images read with their proposals, ahead of the network: the work of a dataset job's pool.

:func:`load_with_proposals` is what each worker of :func:`detector.dataset_runner.run_detection` does for
one record; :func:`reading_pool` picks the pool (:mod:`detector.base.jobs`): spawned processes when the
proposals are computed (Selective Search holds the GIL), threads when they come from a store (reading a
JPEG releases the GIL, and a decoded image is costly to pickle back from a process). No torch here:
spawned workers import this module, :mod:`detector.proposal_source` and :mod:`proposals`, nothing heavier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detector.base.errors import UserError
from detector.base.io import load_image_item
from detector.base.jobs import PROCESSES, THREADS, ItemFailed
from detector.proposal_source import ProposalSettings, source_proposals


@dataclass(frozen=True)
class ImageTask:
    """One record to read: its image file, and its keys in a proposal store (file name, image id)."""

    path: str
    name: str
    image_id: object = None


def load_with_proposals(task: ImageTask, settings: ProposalSettings) -> tuple[np.ndarray, np.ndarray]:
    """The image (RGB ``uint8 (H, W, 3)``) and its proposals (float32 ``(N, 4)`` xyxy pixels, best first,
    not yet clipped or limited). What an image can cause raises :class:`~detector.base.jobs.ItemFailed`
    with the reason the job records."""
    image = load_image_item(task.path)
    try:
        boxes = source_proposals(image, settings, task.name, task.image_id)
    except UserError as err:
        raise ItemFailed(f"proposals: {err}") from None
    except Exception as err:  # noqa: BLE001 - one odd image must not end a 20,000-image run; it is listed
        raise ItemFailed(f"proposals failed: {type(err).__name__}: {err}") from None
    return image, boxes


def reading_pool(settings: ProposalSettings) -> str:
    """:data:`~detector.base.jobs.PROCESSES` for computed proposals, :data:`~detector.base.jobs.THREADS` for a store."""
    return PROCESSES if settings.computed else THREADS
