"""Dataset-scale detection: every image of a dataset through a :class:`~detector.pipeline.Detector`, in
deterministic shards and atomic chunks, resumable, with unreadable images recorded and skipped.

Work is cut into chunks of consecutive records (chunk ``c`` holds records ``c * chunk_size`` to
``(c + 1) * chunk_size - 1``); shard ``K`` of ``N`` takes the chunks with ``c % N == K`` (the rule of
:mod:`proposals.precompute`; :func:`proposals.precompute.parse_shard` reads ``K/N`` or torchrun's
``RANK``/``WORLD_SIZE``). A chunk's detections are written as one part file when all its images are
done, atomically (a temporary file, then ``os.replace``), so a killed run loses at most the chunks in
flight and a rerun skips every chunk already written.

The network's batches are shared between the images of a chunk (:class:`detector.batch.BatchedDetector`)
and emptied at its end, so a chunk's detections are the same whichever shard or rerun computes it:
sharded runs merged, and resumed runs, equal one uninterrupted run.

A parts folder holds ``run.json`` (what the parts were made with: model digests, proposal source,
post-processing, precision, the dataset's image list, the chunk size; a rerun with other settings is
refused) and ``chunk-<c>.npz`` files, read with ``allow_pickle=False``:

- ``positions`` int64 ``(I,)``: the images' indices in ``dataset.records``; ``names`` (unicode) their
  file names; ``errors`` (unicode) ``""`` or why the image could not be read;
- ``counts`` int64 ``(I,)`` detections per image, then ``boxes`` float32 ``(D, 4)`` project xyxy,
  ``scores`` float32 ``(D,)``, ``labels`` int64 ``(D,)`` in the *dataset's* labels ``1..C``.

Images are read, and their proposals computed, by ``workers`` background threads while the main thread
warps and classifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from detector.base.checkpoint import checkpoint_paths
from detector.base.errors import UserError
from detector.base.files import atomic_open, atomic_write
from detector.base.io import load_image
from detector.base.vocab import Vocabulary
from detector.batch import BatchedDetector
from detector.data.records import Dataset
from detector.evaluation.coco import write_coco_results
from detector.evaluation.submission import write_ilsvrc_submission
from detector.evaluation.voc import write_voc_detections
from detector.pipeline import Detections, Detector

PARTS_FORMAT = "googlenet-detection-parts"
PARTS_VERSION = 1


@dataclass(frozen=True)
class RunConfig:
    """chunk_size: images per part file (and per batching unit), >= 1.
    shard: ``(K, N)``: this run does the chunks ``c`` with ``c % N == K``.
    workers: background threads reading images and computing proposals; 0 does it in the calling thread.
    """

    chunk_size: int = 32
    shard: tuple[int, int] = (0, 1)
    workers: int = 1

    def __post_init__(self):
        if self.chunk_size < 1:
            raise UserError(f"chunk size must be >= 1, got {self.chunk_size}")
        if self.workers < 0:
            raise UserError(f"workers must be >= 0, got {self.workers}")
        k, n = self.shard
        if not (n >= 1 and 0 <= k < n):
            raise UserError(f"shard {k}/{n}: need 0 <= K < N")


@dataclass
class RunReport:
    """What one run of a shard did: images in the shard, already done before, processed now, failed
    now (file name -> reason), seconds, stage timings (``proposals`` summed over workers), and the chunks
    of the whole dataset still missing afterwards (from any shard)."""

    total: int = 0
    skipped: int = 0
    done: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    missing_chunks: list[int] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"images": self.total, "skipped": self.skipped, "detected": self.done,
                "seconds": round(self.seconds, 3), "images_per_second": round(self.images_per_second, 4),
                "stage_seconds": {k: round(v, 3) for k, v in self.timings.items()},
                "torch_threads": torch.get_num_threads()}


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


# -- settings and parts on disk ----------------------------------------------------------------------------

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
    """What decides the parts' content: ``run.json`` of a parts folder."""
    source = detector.proposals.source
    if isinstance(source, str):
        proposals = {"method": source, "options": detector.proposals.options}
    else:  # a store: its recorded method and size, not its path (which differs between machines)
        proposals = {"store": getattr(source, "meta", type(source).__name__), "num_images": len(source)}
    models = []
    for path in model_paths:
        weights, config = checkpoint_paths(path)
        models.append({"name": weights.stem, "weights": file_digest(weights), "config": file_digest(config)})
    return {"format": PARTS_FORMAT, "version": PARTS_VERSION, "models": models,
            "proposals": proposals | {"max_proposals": detector.proposals.max_proposals},
            "postprocess": detector.postprocess_config.to_dict(), "precision": str(detector.dtype),
            "dataset": {"name": dataset.name, "num_images": len(dataset), "digest": dataset_digest(dataset)},
            "chunk_size": int(chunk_size)}


def claim_parts_folder(parts_dir: str | os.PathLike, settings: dict) -> Path:
    """Create ``parts_dir`` with ``run.json``, or check that its ``run.json`` matches ``settings``."""
    parts_dir = Path(parts_dir)
    if parts_dir.exists() and not parts_dir.is_dir():
        raise UserError(f"{parts_dir}: exists and is not a folder; pass another --out")
    parts_dir.mkdir(parents=True, exist_ok=True)
    manifest = parts_dir / "run.json"
    text = json.dumps(settings, indent=1, sort_keys=True)
    if manifest.is_file():
        try:
            existing = json.loads(manifest.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise UserError(f"{manifest}: corrupt; delete {parts_dir} and run again") from None
        if existing != json.loads(text):
            changed = sorted(k for k in set(existing) | set(settings) if existing.get(k) != settings.get(k))
            raise UserError(f"{parts_dir}: holds detections made with other settings ({', '.join(changed)}); "
                            "use another --out, or delete that folder to start over")
    else:
        atomic_write(manifest, text)
    return parts_dir


def chunk_path(parts_dir: Path, chunk: int) -> Path:
    return parts_dir / f"chunk-{chunk:07d}.npz"


def num_chunks(dataset: Dataset, chunk_size: int) -> int:
    return -(-len(dataset) // chunk_size)


def missing_chunks(parts_dir: str | os.PathLike, dataset: Dataset, chunk_size: int) -> list[int]:
    """Chunks of the whole dataset without a part file yet."""
    parts_dir = Path(parts_dir)
    return [c for c in range(num_chunks(dataset, chunk_size)) if not chunk_path(parts_dir, c).is_file()]


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


def collect_parts(parts_dir: str | os.PathLike, dataset: Dataset, chunk_size: int) -> DatasetDetections:
    """Merge every part of a complete parts folder, in record order."""
    parts_dir = Path(parts_dir)
    missing = missing_chunks(parts_dir, dataset, chunk_size)
    if missing:
        raise UserError(f"{parts_dir}: {len(missing)} chunks are missing (first: {missing[0]}); run the remaining "
                        "shards (or rerun) before merging")
    detections, failures = {}, {}
    for c in range(num_chunks(dataset, chunk_size)):
        for pos, dets, error in read_chunk(chunk_path(parts_dir, c), dataset):
            record = dataset.records[pos]
            if error:
                failures[record.file_name] = error
            else:
                detections[record.image_id] = dets
    return DatasetDetections(detections, failures)


# -- the run ------------------------------------------------------------------------------------------------

def label_map(model_vocab: Vocabulary, dataset_vocab: Vocabulary) -> np.ndarray:
    """int64 ``(C_model + 1,)``: the dataset label of each model label (0 -> 0), matched by class id.

    A model class whose id is not in the dataset, or whose name (wnid when both have wnids) differs from
    the dataset's class of that id, is a :class:`UserError`: the model was trained on other classes.
    """
    out = np.zeros(model_vocab.num_classes + 1, np.int64)
    for label, (cid, name) in enumerate(zip(model_vocab.ids, model_vocab.names), start=1):
        try:
            target = dataset_vocab.label_of_id(cid)
        except KeyError:
            raise UserError(f"the model's class {cid} ({name}) is not a class of the dataset; evaluate a model "
                            "trained on this dataset's classes") from None
        both_wnids = model_vocab.wnids is not None and dataset_vocab.wnids is not None
        mine = model_vocab.wnids[label - 1] if both_wnids else name
        theirs = dataset_vocab.wnids[target - 1] if both_wnids else dataset_vocab.names[target - 1]
        if mine != theirs:
            raise UserError(f"class id {cid} is '{mine}' for the model but '{theirs}' in the dataset; evaluate a "
                            "model trained on this dataset's classes")
        out[label] = target
    return out


@dataclass(frozen=True)
class _Loaded:
    position: int
    image: np.ndarray | None
    proposals: object
    error: str
    seconds: float


def _read(dataset: Dataset, position: int, detector: Detector) -> _Loaded:
    """Record ``position`` read and its proposals computed (in a reader thread); failures become reasons."""
    record = dataset.records[position]
    try:
        image = load_image(dataset.image_path(record))
    except UserError as err:
        return _Loaded(position, None, None, str(err), 0.0)
    except Exception as err:  # noqa: BLE001 - anything else a file can cause is recorded too
        return _Loaded(position, None, None, f"cannot read image: {type(err).__name__}: {err}", 0.0)
    start = time.perf_counter()
    try:
        # the proposal source only; clipping and the move to the device are Detector.propose's, later
        proposals = detector._from_source(image, record.file_name)
    except UserError as err:
        return _Loaded(position, None, None, f"proposals: {err}", 0.0)
    except Exception as err:  # noqa: BLE001 - one odd image must not end a 20,000-image run; it is listed
        return _Loaded(position, None, None, f"proposals failed: {type(err).__name__}: {err}", 0.0)
    return _Loaded(position, image, proposals, "", time.perf_counter() - start)


def read_ahead(dataset: Dataset, positions: Sequence[int], detector: Detector, workers: int) -> Iterator[_Loaded]:
    """The records at ``positions``, read (with their proposals) by ``workers`` threads, in order.

    Threads, not processes: JPEG decoding and most proposal work release the GIL, nothing is pickled, and
    forking a process whose OpenCV thread pool is running can deadlock the child. At most ``2 * workers``
    images wait in memory. ``workers == 0`` reads in the calling thread.
    """
    if workers == 0:
        yield from (_read(dataset, p, detector) for p in positions)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="reader")
    window: deque = deque()
    try:
        for p in positions:
            window.append(pool.submit(_read, dataset, p, detector))
            if len(window) > 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        for future in window:
            future.cancel()
        pool.shutdown(wait=True)


def run_detection(detector: Detector, dataset: Dataset, parts_dir: str | os.PathLike, config: RunConfig,
                  progress: bool = True) -> RunReport:
    """Detect this shard's images whose chunk has no part yet in ``parts_dir`` (see the module docstring).

    ``parts_dir`` must have been claimed with :func:`claim_parts_folder`. Labels are translated to the
    dataset's vocabulary (:func:`label_map`) before they are written.
    """
    from tqdm import tqdm

    parts_dir = Path(parts_dir)
    mapping = label_map(detector.vocabulary, dataset.vocab)
    size = config.chunk_size
    k, n = config.shard
    mine = [c for c in range(num_chunks(dataset, size)) if c % n == k]
    todo = [c for c in mine if not chunk_path(parts_dir, c).is_file()]
    report = RunReport(total=sum(len(dataset.records[c * size:(c + 1) * size]) for c in mine))
    positions = [p for c in todo for p in range(c * size, min(len(dataset), (c + 1) * size))]
    report.skipped = report.total - len(positions)
    batched = BatchedDetector(detector)
    results: dict[int, tuple[str, Detections | None, str]] = {}
    proposal_seconds = 0.0
    start = time.perf_counter()
    bar = tqdm(total=len(positions), unit="img", desc=f"detect {k}/{n}", disable=not progress, smoothing=0.05)

    def keep(finished) -> None:
        for pos, dets in finished:
            results[pos] = (dataset.records[pos].file_name, replace(dets, labels=mapping[dets.labels]), "")
            bar.update(1)

    with bar:
        for item in read_ahead(dataset, positions, detector, config.workers):
            if item.error:
                results[item.position] = (dataset.records[item.position].file_name, None, item.error)
                report.failures[dataset.records[item.position].file_name] = item.error
                bar.update(1)
                bar.set_postfix(unreadable=len(report.failures))
            else:
                proposal_seconds += item.seconds
                keep(batched.submit(item.position, item.image, item.proposals, proposal_seconds=item.seconds))
            chunk = item.position // size
            if item.position == min(len(dataset), (chunk + 1) * size) - 1:  # the chunk's last image
                keep(batched.flush())
                rows = range(chunk * size, item.position + 1)
                write_chunk(chunk_path(parts_dir, chunk), [(p, *results.pop(p)) for p in rows])
                report.done += len(rows)
    report.seconds = time.perf_counter() - start
    report.timings = {"proposals": proposal_seconds, **batched.timings}
    report.missing_chunks = missing_chunks(parts_dir, dataset, size)
    return report


def wait_for_parts(parts_dir: str | os.PathLike, dataset: Dataset, chunk_size: int, poll_seconds: float = 5.0,
                   timeout: float | None = None, progress: bool = True) -> None:
    """Block until every chunk of the dataset has a part (written by other shards), polling the folder."""
    from tqdm import tqdm

    total = num_chunks(dataset, chunk_size)
    missing = missing_chunks(parts_dir, dataset, chunk_size)
    deadline = None if timeout is None else time.monotonic() + timeout
    with tqdm(total=total, initial=total - len(missing), unit="chunk", desc="waiting for other shards",
              disable=not progress or not missing) as bar:
        while missing:
            if deadline is not None and time.monotonic() > deadline:
                raise UserError(f"{parts_dir}: {len(missing)} chunks still missing after {timeout:g} s "
                                f"(first: {missing[0]}); rerun the shard that holds them")
            time.sleep(poll_seconds)
            now = missing_chunks(parts_dir, dataset, chunk_size)
            bar.update(len(missing) - len(now))
            missing = now


RESULT_FILES = {"ilsvrc": "ilsvrc_submission.txt", "coco": "coco_results.json", "voc": "voc_detections.txt"}


def write_results(parts_dir: str | os.PathLike, dataset: Dataset, chunk_size: int, out_dir: str | os.PathLike,
                  result_format: str) -> tuple[Path, int, DatasetDetections]:
    """Merge a complete parts folder and write the dataset's result file into ``out_dir``:
    ``ilsvrc_submission.txt`` (``"ilsvrc"``), ``coco_results.json`` (``"coco"``) or ``voc_detections.txt``
    (``"voc"``). Returns the file, its number of detections, and the merged detections."""
    writers = {"ilsvrc": write_ilsvrc_submission, "coco": write_coco_results, "voc": write_voc_detections}
    merged = collect_parts(parts_dir, dataset, chunk_size)
    path = Path(out_dir) / RESULT_FILES[result_format]
    count = writers[result_format](path, merged.detections, dataset)
    return path, count, merged
