"""Where an image's proposals come from when the caller passes none: a method computed on the fly, or a
store of precomputed proposals; and, for many images, a pool of processes that computes them ahead of
the network.

``ProposalSettings`` names the source. :func:`source_proposals` is the one way from an image to its
proposals (a store is looked up with :meth:`proposals.store.ProposalStore.find`, whatever kind of
mapping it is). :func:`proposal_stream` yields the proposals of a stream of images in order, computed
by ``workers`` processes started with ``spawn`` (:func:`detector.base.jobs.imap_outcomes`) up to
``2 * workers`` images ahead of the caller, so that Selective Search, which holds the GIL, runs on other
cores while the caller's network classifies the images before (issue 12: Selective Search over threads
does not scale, over processes it does).

No torch here: spawned workers import this module and :mod:`proposals`, nothing heavier.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from detector.base.defaults import MAX_PROPOSALS, PROPOSAL_METHOD
from detector.base.errors import UserError
from detector.base.jobs import (
    PROCESSES,
    Outcome,
    attempt,
    default_workers,
    imap_outcomes,
    opencv_single_thread,
)
from detector.base.pool import WorkerPool
from proposals.propose import propose
from proposals.store import lookup_keys


@dataclass(frozen=True)
class ProposalSettings:
    """Where proposals come from when the caller passes none.

    source: a method name for :func:`proposals.propose` (``"ss-fast"``, ...), or a store: a
        :class:`proposals.ProposalStore`, or any mapping ``image name -> boxes`` or ``(boxes, scores)``.
    options: keyword options for the method.
    max_proposals: use at most this many (the first, i.e. best, ones), >= 1.
    """

    source: object = PROPOSAL_METHOD
    options: dict = field(default_factory=dict)
    max_proposals: int = MAX_PROPOSALS

    def __post_init__(self):
        if isinstance(self.max_proposals, bool) or not isinstance(self.max_proposals, (int, np.integer)):
            raise UserError(f"max proposals must be a whole number >= 1, got {self.max_proposals!r}")
        if self.max_proposals < 1:  # 0 or less is an error, never "use the default"
            raise UserError(f"max proposals must be >= 1, got {self.max_proposals}")

    @property
    def computed(self) -> bool:
        """True if the source is a method (proposals are computed), False for a store."""
        return isinstance(self.source, str)


def source_proposals(image: np.ndarray, settings: ProposalSettings, image_name: str | None = None,
                     image_id: object = None) -> np.ndarray:
    """The proposals of ``image`` (RGB ``uint8 (H, W, 3)``) from ``settings.source``: float32 ``(N, 4)``
    xyxy, pixels of ``image``, best first, not yet clipped or limited (the detector does that).

    image_name, image_id: the image's keys in a store (see :meth:`proposals.ProposalStore.find`).
    Raises :class:`UserError` for an unknown method or option, an image the store lacks, or stored
    proposals computed on an image of another size.
    """
    source = settings.source
    if settings.computed:
        try:
            return np.asarray(propose(image, method=source, **settings.options), np.float32).reshape(-1, 4)
        except (ValueError, TypeError) as err:
            raise UserError(f"proposals: {err}") from None
    if image_name is None and image_id is None:
        raise UserError("proposals come from a store, which needs the image's name (image_name=...)")
    if hasattr(source, "find"):
        key = source.find(image_name, image_id)
    else:  # a plain mapping (tests, benchmarks): the same keys in the same order
        key = next((k for k in lookup_keys(image_name, image_id) if k in source), None)
    label = image_name if image_name is not None else image_id
    if key is None:
        raise UserError(f"proposal store has no proposals for '{label}' (not in the store); precompute them "
                        "for this image")
    try:
        found = source[key]
    except KeyError as err:  # a store records the images whose proposals failed, with the reason
        reason = str(err.args[0]) if err.args else "not in the store"
        raise UserError(f"proposal store has no proposals for '{label}' ({reason}); precompute them for this "
                        "image") from None
    stored_size = source.image_size(key) if hasattr(source, "image_size") else image.shape[:2]
    if tuple(stored_size) != tuple(image.shape[:2]):
        raise UserError(f"proposal store: '{label}' was {stored_size[1]}x{stored_size[0]} when its proposals "
                        f"were computed, now {image.shape[1]}x{image.shape[0]}; recompute them")
    boxes = found[0] if isinstance(found, tuple) else found
    return np.asarray(boxes, np.float32).reshape(-1, 4)


def _computed(image: np.ndarray | None, settings: ProposalSettings) -> np.ndarray | None:
    """In a worker: the proposals of ``image`` (``None``: the caller has them already)."""
    return None if image is None else source_proposals(image, settings)


def proposal_pool(workers: int | None = None) -> WorkerPool:
    """A pool of ``workers`` processes (``None``: :func:`detector.base.jobs.default_workers`) set up to
    compute proposals, for :func:`proposal_stream` calls that should share it (not started until used)."""
    return WorkerPool(default_workers() if workers is None else workers, PROCESSES,
                      initializer=opencv_single_thread)


def proposal_stream(images: Iterable[np.ndarray | None], settings: ProposalSettings,
                    workers: int | None = None, pool: WorkerPool | None = None) -> Iterator[Outcome]:
    """The proposals of each image, in order, as :class:`detector.base.jobs.Outcome` (``value``: float32
    ``(N, 4)`` or ``None`` where the image was ``None``; ``error``: why it failed; ``seconds``).

    A method source is computed by ``workers`` spawned processes (``None``: one per usable core but one,
    see :func:`detector.base.jobs.default_workers`; 0: in this thread) at most ``2 * workers`` images ahead
    of the consumer. pool: a kept pool (:func:`proposal_pool`) to compute in instead of starting one for
    this call (its size replaces ``workers``). Stores need image names: use :func:`source_proposals`.
    """
    if not settings.computed:
        raise ValueError("proposal_stream computes proposals; a store is read with source_proposals")
    work = partial(_computed, settings=settings)
    if pool is not None:
        return imap_outcomes(work, images, keep=pool)
    workers = default_workers() if workers is None else workers
    if workers == 0:
        return (attempt(work, image) for image in images)
    return imap_outcomes(work, images, workers, PROCESSES, initializer=opencv_single_thread)

