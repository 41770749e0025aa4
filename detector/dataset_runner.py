"""Dataset-scale detection as a batch job: every image of a dataset through a
:class:`~detector.pipeline.Detector` into a folder of parts, then one result file.

The job's plumbing is :mod:`detector.base.jobs`: records in chunks of ``chunk_size`` (chunk ``c`` holds
records ``c * chunk_size`` to ``(c + 1) * chunk_size - 1``), shard ``K`` of ``N`` taking the chunks with
``c % N == K`` (:class:`~detector.base.jobs.Shard`, from ``--shard`` or torchrun), a chunk's detections
written as one part file when all its images are done, atomically, so a killed run loses at most the
chunks in flight and a rerun skips every chunk already written. Unreadable images (and images without
proposals) are recorded in their part with the reason and listed at the end; ``retry_failed`` redoes
the chunks that hold one.

The network's batches are shared between the images of a chunk (one :meth:`Detector.detect_stream
<detector.pipeline.Detector.detect_stream>` per chunk) and emptied at its end, so a chunk's detections are
the same whichever shard or rerun computes it: sharded runs merged, and resumed runs, equal one
uninterrupted run.

Images are read with their proposals by the job's ``workers`` (:mod:`detector.dataset_reader`: spawned
processes when proposals are computed, threads when they come from a store) up to a chunk ahead of the
network, so reading and proposals overlap the detection of the chunk before.

A parts folder holds ``run.json`` (the job's manifest, :func:`detector.base.jobs.claim_manifest`: model
digests, proposal source, post-processing, precision, the dataset's image list, the chunk size; a rerun
with other settings is refused in one line) and ``chunk-<c>.npz`` files, read with ``allow_pickle=False``:

- ``positions`` int64 ``(I,)``: the images' indices in ``dataset.records``; ``names`` (unicode) their
  file names; ``errors`` (unicode) ``""`` or why the image could not be read;
- ``counts`` int64 ``(I,)`` detections per image, then ``boxes`` float32 ``(D, 4)`` project xyxy,
  ``scores`` float32 ``(D,)``, ``labels`` int64 ``(D,)`` in the *dataset's* labels ``1..C``.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from detector.base.checkpoint import checkpoint_paths
from detector.base.errors import UserError
from detector.base.files import atomic_open
from detector.base.jobs import (
    PROCESSES,
    Chunks,
    JobConfig,
    JobReport,
    Outcome,
    Shard,
    claim_manifest,
    missing_chunks,
    opencv_single_thread,
    run_job,
    wait_for_chunks,
)
from detector.data.records import Dataset
from detector.dataset_reader import ImageTask, load_with_proposals, reading_pool
from detector.evaluation.result_files import write_result_file
from detector.pipeline import STAGES, Detections, Detector, label_map

PARTS_FORMAT = "googlenet-detection-parts"
PARTS_VERSION = 2  # 2: run.json is a jobs manifest ({"format", "digest", "settings"})
MANIFEST = "run.json"


@dataclass(frozen=True)
class RunConfig:
    """chunk_size: images per part file (and per batching unit), >= 1.
    shard: this run's share of the chunks (:class:`~detector.base.jobs.Shard`).
    workers: processes (computed proposals) or threads (a store) reading images and their proposals ahead
        of the network; 0 reads them in the calling thread.
    retry_failed: redo the chunks that hold an image recorded as failed.
    """

    chunk_size: int = 32
    shard: Shard = Shard()
    workers: int = 1
    retry_failed: bool = False

    def __post_init__(self):
        JobConfig(chunk_size=self.chunk_size, workers=self.workers)  # validates them


@dataclass(frozen=True)
class DatasetDetections:
    """Merged parts: ``detections`` image id -> ``(boxes float32 (N, 4) project xyxy, scores float32 (N,),
    labels int64 (N,) dataset labels 1..C)`` for every image (none for failed ones, as the devkit scores an
    image without predictions); ``failures`` file name -> reason, in record order."""

    detections: dict
    failures: dict[str, str]

    @property
    def num_detections(self) -> int:
        return sum(len(v[1]) for v in self.detections.values())


# -- settings ----------------------------------------------------------------------------------------------

def file_digest(path: str | os.PathLike) -> str:
    """blake2b (16 hex digits) of a file's bytes."""
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_digest(dataset: Dataset) -> str:
    """blake2b of the records' image ids and file names, in order."""
    text = "\n".join(f"{r.image_id}\t{r.file_name}" for r in dataset.records)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def run_settings(model_paths: Sequence[str | os.PathLike], detector: Detector, dataset: Dataset,
                 chunk_size: int) -> dict:
    """What decides the parts' content: the settings of a parts folder's manifest."""
    source = detector.proposals.source
    if isinstance(source, str):
        proposals = {"method": source, "options": detector.proposals.options}
    else:  # a store: its recorded method and size, not its path (which differs between machines)
        proposals = {"store": getattr(source, "meta", type(source).__name__), "num_images": len(source)}
    models = []
    for path in model_paths:
        weights, config = checkpoint_paths(path)
        models.append({"name": weights.stem, "weights": file_digest(weights), "config": file_digest(config)})
    return {"version": PARTS_VERSION, "models": models,
            "proposals": proposals | {"max_proposals": detector.proposals.max_proposals},
            "postprocess": detector.postprocess_config.to_dict(), "precision": str(detector.dtype),
            "dataset": {"name": dataset.name, "num_images": len(dataset), "digest": dataset_digest(dataset)},
            "chunk_size": int(chunk_size)}


def claim_parts_folder(parts_dir: str | os.PathLike, settings: dict) -> Path:
    """Create ``parts_dir`` with its manifest, or check that its manifest holds ``settings``."""
    parts_dir = Path(parts_dir)
    if parts_dir.exists() and not parts_dir.is_dir():
        raise UserError(f"{parts_dir}: exists and is not a folder; pass another --out")
    parts_dir.mkdir(parents=True, exist_ok=True)
    claim_manifest(parts_dir / MANIFEST, settings, kind=PARTS_FORMAT, what="detections")
    return parts_dir


# -- parts on disk ---------------------------------------------------------------------------------------------

def chunk_path(parts_dir: Path, chunk: int) -> Path:
    return Path(parts_dir) / f"chunk-{chunk:07d}.npz"


def write_chunk(path: Path, results: list[tuple[int, str, Detections | None, str]]) -> None:
    """Write one part atomically: ``(position, file name, detections in dataset labels or None, error)``."""
    dets = [d for _, _, d, _ in results if d is not None]
    arrays = {
        "positions": np.array([p for p, _, _, _ in results], np.int64),
        "names": np.array([n for _, n, _, _ in results], dtype=str),
        "errors": np.array([e for _, _, _, e in results], dtype=str),
        "counts": np.array([0 if d is None else len(d) for _, _, d, _ in results], np.int64),
        "boxes": np.concatenate([d.boxes for d in dets]).astype(np.float32).reshape(-1, 4)
        if dets else np.zeros((0, 4), np.float32),
        "scores": np.concatenate([d.scores for d in dets]).astype(np.float32) if dets else np.zeros(0, np.float32),
        "labels": np.concatenate([d.labels for d in dets]).astype(np.int64) if dets else np.zeros(0, np.int64),
    }
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def read_chunk(path: Path, dataset: Dataset) -> list[tuple[int, tuple | None, str]]:
    """``(position, (boxes, scores, labels) or None, error)`` per image of a part, checked against the dataset."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("positions", "names", "errors", "counts", "boxes", "scores", "labels")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"{path}: corrupt part file ({err}); delete it and run again to redo its images") from None
    out = []
    bounds = np.concatenate([[0], np.cumsum(arrays["counts"])])
    for i, (pos, name, error) in enumerate(zip(arrays["positions"].tolist(), arrays["names"].tolist(),
                                               arrays["errors"].tolist())):
        if not (0 <= pos < len(dataset) and dataset.records[pos].file_name == name):
            raise UserError(f"{path}: image {name} is not record {pos} of the dataset; the parts were made for "
                            "another image list: use another --out")
        rows = slice(int(bounds[i]), int(bounds[i + 1]))
        dets = None if error else (arrays["boxes"][rows], arrays["scores"][rows], arrays["labels"][rows])
        out.append((pos, dets, error))
    return out


class PartsSink:
    """The job's chunks as part files (a :class:`detector.base.jobs.ChunkSink`); ``write`` detects the
    chunk's images. ``timings``: seconds per detection stage, summed over the images written."""

    def __init__(self, parts_dir: Path, dataset: Dataset, chunks: Chunks, detector: Detector | None = None):
        self.parts_dir, self.dataset, self.chunks, self.detector = Path(parts_dir), dataset, chunks, detector
        self.mapping = None if detector is None else label_map(detector.vocabulary, dataset.vocab)
        self.timings = dict.fromkeys(STAGES[1:], 0.0)

    def pending(self, chunk: int, positions: range, retry_failed: bool) -> list[int]:
        path = chunk_path(self.parts_dir, chunk)
        if not path.is_file():
            return list(positions)
        if retry_failed and any(error for _, _, error in read_chunk(path, self.dataset)):
            return list(positions)  # the whole chunk again: its batches, hence its detections, stay a unit
        return []

    def write(self, chunk: int, results: list[tuple[int, Outcome]]) -> None:
        names = {p: self.dataset.records[p].file_name for p, _ in results}
        rows = {p: (names[p], None, o.error) for p, o in results if not o.ok}
        readable = [(p, *o.value, names[p]) for p, o in results if o.ok]  # (position, image, proposals, name)
        # one stream per chunk: its batches are emptied at the chunk's end (see the module docstring)
        for pos, dets in self.detector.detect_stream(readable):
            for stage in self.timings:
                self.timings[stage] += dets.timings[stage]
            rows[pos] = (names[pos], dets.relabel(self.mapping, self.dataset.vocab), "")
        write_chunk(chunk_path(self.parts_dir, chunk), [(p, *rows[p]) for p, _ in results])

    def failures(self, positions: Sequence[int]) -> dict[str, str]:
        wanted, out = set(positions), {}
        for chunk in sorted({self.chunks.of(p) for p in positions}):
            path = chunk_path(self.parts_dir, chunk)
            if path.is_file():
                out |= {self.dataset.records[p].file_name: error for p, _, error in read_chunk(path, self.dataset)
                        if error and p in wanted}
        return out


# -- the run ------------------------------------------------------------------------------------------------

def run_detection(detector: Detector, dataset: Dataset, parts_dir: str | os.PathLike, config: RunConfig,
                  progress: bool = True) -> JobReport:
    """Detect this shard's images whose chunk has no part yet in ``parts_dir`` (see the module docstring).

    ``parts_dir`` must have been claimed with :func:`claim_parts_folder`. Labels are translated to the
    dataset's vocabulary (:func:`detector.pipeline.label_map`) before they are written. The report's
    timings: ``proposals`` (reading and proposals, summed over the workers), then the detection stages.
    """
    chunks = Chunks(len(dataset), config.chunk_size)
    sink = PartsSink(Path(parts_dir), dataset, chunks, detector)
    pool = reading_pool(detector.proposals)
    job = JobConfig(chunk_size=config.chunk_size, shard=config.shard, workers=config.workers, pool=pool,
                    read_ahead=config.chunk_size + 2 * config.workers, retry_failed=config.retry_failed,
                    progress=progress, desc=f"detect {config.shard}")
    tasks = [ImageTask(str(dataset.image_path(r)), r.file_name, r.image_id) for r in dataset.records]
    report = run_job(tasks, [r.file_name for r in dataset.records],
                     partial(load_with_proposals, settings=detector.proposals), sink, job,
                     initializer=opencv_single_thread if pool == PROCESSES else None)
    report.timings = {"proposals": report.timings.pop("work"), **sink.timings}
    return report


def collect_parts(parts_dir: str | os.PathLike, dataset: Dataset, chunk_size: int) -> DatasetDetections:
    """Merge every part of a complete parts folder, in record order."""
    chunks = Chunks(len(dataset), chunk_size)
    missing = missing_chunks(PartsSink(Path(parts_dir), dataset, chunks), chunks)
    if missing:
        raise UserError(f"{parts_dir}: {len(missing)} chunks are missing (first: {missing[0]}); run the remaining "
                        "shards (or rerun) before merging")
    detections, failures = {}, {}
    for c in range(len(chunks)):
        for pos, dets, error in read_chunk(chunk_path(Path(parts_dir), c), dataset):
            record = dataset.records[pos]
            if error:
                failures[record.file_name] = error
            else:
                detections[record.image_id] = dets
    return DatasetDetections(detections, failures)


def wait_for_parts(parts_dir: str | os.PathLike, dataset: Dataset, chunk_size: int, poll_seconds: float = 5.0,
                   timeout: float | None = None, progress: bool = True) -> None:
    """Block until every chunk of the dataset has a part (written by other shards), polling the folder."""
    chunks = Chunks(len(dataset), chunk_size)
    wait_for_chunks(PartsSink(Path(parts_dir), dataset, chunks), chunks, poll_seconds, timeout, progress,
                    where=parts_dir)


def write_results(parts_dir: str | os.PathLike, dataset: Dataset, chunk_size: int, out_dir: str | os.PathLike,
                  result_format: str) -> tuple[Path, int, DatasetDetections]:
    """Merge a complete parts folder and write the dataset's result file into ``out_dir``
    (:mod:`detector.evaluation.result_files`). Returns the file, its number of detections, and the merged
    detections."""
    merged = collect_parts(parts_dir, dataset, chunk_size)
    path, count = write_result_file(out_dir, result_format, merged.detections, dataset)
    return path, count, merged


def detect_dataset_shard(detector: Detector, dataset: Dataset, parts_dir: Path, config: RunConfig,
                         progress: bool = True) -> tuple[JobReport, DatasetDetections | None]:
    """One shard's whole duty: detect its chunks, then, by :meth:`Shard.after_run
    <detector.base.jobs.Shard.after_run>`, merge the parts (when every chunk is there and this shard is the
    one to merge; torchrun's rank 0 first waits for the other ranks) or leave them for another shard.
    Returns the run's report and the merged detections (None when another shard merges)."""
    report = run_detection(detector, dataset, parts_dir, config, progress=progress)
    duty = config.shard.after_run(report.missing_chunks)
    if duty == "leave":
        return report, None
    if duty == "wait":
        wait_for_parts(parts_dir, dataset, config.chunk_size, progress=progress)
    return report, collect_parts(parts_dir, dataset, config.chunk_size)

