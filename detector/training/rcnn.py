"""R-CNN fine-tuning of the region classifier: datasets and proposals in, a detector checkpoint out.

This module joins the generic pieces (:mod:`.engine`, :mod:`.sampler`, :mod:`.data`, :mod:`.losses`,
:mod:`.validation`) for ``tools/train_detector.py``; the tool only parses arguments.

The checkpoint's JSON config (:func:`detector.base.checkpoint.make_checkpoint_config`) records everything
detection needs besides the weights: the classifier config (input size, context, normalization, warp),
the classes, the box coder, the proposal method with its options and count, and the post-processing
(score threshold, NMS, detections per image); ``training`` holds the provenance (data, sampler, loss,
schedule).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from detector.base.checkpoint import load_checkpoint, make_checkpoint_config, save_checkpoint
from detector.base.defaults import MAX_PROPOSALS, PROPOSAL_METHOD
from detector.base.errors import UserError
from detector.base.files import atomic_write
from detector.base.jobs import Shard, default_workers, print_failures, settings_digest
from detector.box_coder import BoxCoder
from detector.classifier import ClassifierConfig, RegionClassifier, load_backbone_weights
from detector.data import open_dataset
from detector.data.records import Dataset, ImageRecord
from detector.postprocess import PostprocessConfig
from detector.proposal_source import ProposalSettings, source_proposals
from detector.training.bounded import IMAGE_CACHE_MB
from detector.training.data import RegionBatchSource, RegionDataConfig, check_images
from detector.training.distributed import DistContext, barrier
from detector.training.engine import EngineConfig, TrainResult, train
from detector.training.losses import LossConfig, detection_loss
from detector.training.sampler import SamplerConfig
from detector.training.validation import Validator
from proposals.precompute import ImageEntry, PrecomputeConfig, precompute
from proposals.store import ProposalStore


@dataclass(frozen=True)
class ProposalConfig:
    """method: a :func:`proposals.propose` method, used when no store is given. options: its settings
    (e.g. ``{"max_side": 500}``). store: a precomputed :class:`proposals.ProposalStore` path.
    cache_dir: where proposals computed here are stored: one store per split and setting,
    ``cache_dir/<split>-<digest of method and options>`` (reruns and resumes reuse it).
    workers: processes computing them (None: the usable cores but one; 0 or 1: this process).
    max_proposals: proposals per image used in training. eval_max_proposals: per image at detection."""

    method: str = PROPOSAL_METHOD
    options: dict = field(default_factory=lambda: {"max_side": 500})
    store: str | None = None
    cache_dir: str | None = None
    workers: int | None = None
    max_proposals: int = MAX_PROPOSALS
    eval_max_proposals: int = 1000


@dataclass(frozen=True)
class DetectorTrainConfig:
    """Everything one R-CNN fine-tuning run needs (built by ``tools/train_detector.py``)."""

    train: str
    val: str | None
    out_dir: str
    classifier: ClassifierConfig
    engine: EngineConfig
    sampler: SamplerConfig = SamplerConfig()
    loss: LossConfig = LossConfig()
    proposals: ProposalConfig = ProposalConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    train_split: str = "trainval"
    val_split: str = "test"
    ilsvrc_annotations: str | None = None
    image_root: str | None = None
    val_images: int = 0
    backbone_weights: str | None = None
    init_checkpoint: str | None = None
    verify_images: bool = False
    resume: str | None = None
    image_cache_mb: float = IMAGE_CACHE_MB  # decoded images each process keeps (training.data, validation)


# ----------------------------------------------------------------------------------------------------
# datasets


def align_vocabulary(val: Dataset, train: Dataset, val_path: str) -> Dataset:
    """The validation set with labels of the training vocabulary; a class the training set lacks is an error."""
    if val.vocab.names == train.vocab.names:
        return val
    missing = [n for n in val.vocab.names if n not in train.vocab.names]
    present = {int(lab) for rec in val.records for lab in rec.gt_labels}
    missing = [n for n in missing if val.vocab.label_of_name(n) in present]
    if missing:
        raise UserError(f"validation set '{val_path}': classes {missing} are not in the training vocabulary "
                        f"({len(train.vocab)} classes); train on data that has them or drop them")
    relabel = np.zeros(len(val.vocab) + 1, np.int64)
    for i, name in enumerate(val.vocab.names, start=1):
        relabel[i] = train.vocab.label_of_name(name) if name in train.vocab.names else 0
    records = [replace(rec, gt_labels=relabel[rec.gt_labels]) for rec in val.records]
    return Dataset(records=records, vocab=train.vocab, image_root=val.image_root, name=val.name)


# ----------------------------------------------------------------------------------------------------
# proposals


def split_name(path: str | Path, split: str) -> str:
    """A name for a dataset's proposal store: the JSON's folder (COCO), ``<folder>-<split>`` (VOC) or the
    list's stem (ILSVRC)."""
    path = Path(path)
    if path.suffix == ".json":
        return path.parent.name
    return f"{path.name}-{split}" if path.is_dir() else path.stem


class StoreProposals:
    """A training :data:`~detector.training.data.ProposalFn` reading a :class:`proposals.ProposalStore`:
    ``(record, image) -> float32 (N, 4)`` xyxy pixels, looked up with the store's public lookup
    (:meth:`proposals.ProposalStore.find`, by file name then image id, through
    :func:`detector.proposal_source.source_proposals`, which also checks the image size). Pickled by path,
    so that spawned data-loading workers open the store themselves (memory-mapped, not copied)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._settings: ProposalSettings | None = None

    def _source(self) -> ProposalSettings:
        if self._settings is None:  # opened on first use, in each process
            self._settings = ProposalSettings(source=ProposalStore(self.path))
        return self._settings

    @property
    def store(self) -> ProposalStore:
        return self._source().source

    def __call__(self, record: ImageRecord, image: np.ndarray) -> np.ndarray:
        return source_proposals(image, self._source(), record.file_name, record.image_id)

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path, self._settings = state["path"], None

    def check(self, dataset: Dataset, what: str) -> None:
        """Every record of ``dataset`` has proposals in the store, or one line saying which do not."""
        store, missing = self.store, []
        for rec in dataset.records:
            key = store.find(rec.file_name, rec.image_id)
            if key is None or key in store.failures:
                missing.append(f"{rec.file_name}: {store.failures[key] if key else 'not in the store'}")
        if missing:
            raise UserError(f"proposal store '{self.path}' lacks {len(missing)} of the {len(dataset)} images of "
                            f"{what} (first: {missing[0]}); precompute proposals for them "
                            "(tools/precompute_proposals.py), or leave --proposal-store out to compute them here")


def computed_store(config: ProposalConfig, split: str) -> Path:
    """The store of proposals computed for ``split`` with ``config``'s method and options: a setting
    has its own folder, so another setting never reuses (or is refused by) a store made before."""
    digest = settings_digest({"method": config.method, "options": dict(config.options)})
    return Path(config.cache_dir) / f"{split}-{digest[:8]}"


def split_proposals(config: ProposalConfig, dataset: Dataset, split: str, ctx: DistContext = DistContext(),
                    progress: bool = True, report=print) -> StoreProposals:
    """The proposals of ``dataset``'s images: from ``config.store``, or computed through the batch-job
    framework (:func:`proposals.precompute.precompute`: ``workers`` spawned processes, resumable, each
    process of a distributed run doing its shard) into :func:`computed_store` and read from there.
    Every image must have proposals (else one line naming the first that has none)."""
    if config.store is not None:
        proposals = StoreProposals(config.store)
    else:
        if config.cache_dir is None:
            raise UserError("computing proposals needs a folder to keep them (--proposal-cache); or pass "
                            "--proposal-store")
        folder = computed_store(config, split)
        entries = [ImageEntry(rec.file_name, str(dataset.image_path(rec))) for rec in dataset.records]
        workers = default_workers() if config.workers is None else config.workers
        job = PrecomputeConfig(method=config.method, options=tuple(sorted(config.options.items())),
                               workers=workers, shard=Shard(ctx.rank, ctx.world_size))
        done = precompute(entries, folder, job, progress=progress and ctx.is_main)
        if done.done:
            report(f"proposals of {split}: {done.summary(verb='computed')}; kept in {folder}")
        barrier(ctx)  # every shard's proposals are in the store before any process reads it
        proposals = StoreProposals(folder)
    proposals.check(dataset, split)
    return proposals


def proposal_settings(config: ProposalConfig) -> dict:
    """What a resumed run must share about proposals: the method and its options, the counts, and for a
    store the method and options it records (a copied or moved store resumes; another kind of store does
    not). The cache folder is not compared: it only keeps what the method computes."""
    store = None
    if config.store is not None:
        store = ProposalStore(config.store).meta
    return {"method": config.method, "options": dict(config.options), "store": store,
            "max_proposals": config.max_proposals, "eval_max_proposals": config.eval_max_proposals}


# ----------------------------------------------------------------------------------------------------
# the checkpoint's config


def checkpoint_proposals(prop: ProposalConfig) -> dict:
    """The checkpoint's proposal section: detection uses the method that made the training proposals,
    which a precomputed store records itself (its ``meta``), not the ``--proposal-method`` default."""
    method, options = prop.method, dict(prop.options)
    if prop.store is not None:
        meta = ProposalStore(prop.store).meta
        method, options = meta.get("method", method), dict(meta.get("options", options))
    return {"method": method, "options": options, "max_proposals": prop.eval_max_proposals}


def model_config(config: DetectorTrainConfig, vocab, box_coder: BoxCoder) -> dict:
    """The JSON saved beside the weights: what rebuilds the model and how it detects."""
    prop = config.proposals
    training = {
        "train": config.train, "val": config.val, "sampler": asdict(config.sampler), "loss": asdict(config.loss),
        "schedule": asdict(config.engine.schedule), "momentum": config.engine.momentum,
        "weight_decay": config.engine.weight_decay, "amp": config.engine.amp, "seed": config.engine.seed,
        "train_max_proposals": prop.max_proposals, "backbone_weights": config.backbone_weights,
        "init_checkpoint": config.init_checkpoint,
    }
    return make_checkpoint_config(
        config.classifier, vocab, proposals=checkpoint_proposals(prop),
        postprocess=config.postprocess, box_weights=box_coder.weights, training=training)


def load_init_checkpoint(model: RegionClassifier, path: str | Path, class_names: tuple[str, ...] | None = None
                         ) -> str:
    """Start ``model`` from a detector checkpoint; returns the one line that says what was loaded.

    The same classes (``class_names`` equal to the checkpoint's, or ``None``): every tensor is loaded (to
    continue with a new schedule, or at another crop size: the trunk ends in global average pooling, so
    weights learned at 64 px are a valid start at 96 px). Other classes (transfer across vocabularies):
    every tensor whose name and shape fit is loaded (the trunk), and the class-specific layers (the class
    and box heads, the auxiliary classifiers' last layers) keep their new initialization.
    """
    state, config = load_checkpoint(path)
    source_names = tuple(config.get("classes", {}).get("names", ()))
    wanted = model.state_dict()
    aux = ("trunk.aux1.", "trunk.aux2.")
    if class_names is None or source_names == tuple(class_names):
        differ = [k for k, v in wanted.items() if k in state and state[k].shape != v.shape]
        if differ:
            raise UserError(f"--init-checkpoint '{path}': {len(differ)} tensors have other shapes than this run's "
                            f"(e.g. {differ[0]}); use a checkpoint of the same architecture")
        missing = [k for k in wanted if k not in state and not k.startswith(aux)]
        if missing:
            raise UserError(f"--init-checkpoint '{path}': {len(missing)} tensors missing (e.g. {missing[0]}); use "
                            "a checkpoint written by this tool")
        model.load_state_dict({k: state.get(k, v).to(v.dtype) for k, v in wanted.items()})
        return f"initialized the model from {path} (same {len(source_names) or '?'} classes, every layer)"
    fits = {k: state[k].to(v.dtype) for k, v in wanted.items() if k in state and state[k].shape == v.shape
            and not k.startswith(("cls_score.", "bbox_pred."))}
    trunk = [k for k in wanted if k.startswith("trunk.") and not k.startswith(aux)]
    missing = [k for k in trunk if k not in fits]
    if missing:
        raise UserError(f"--init-checkpoint '{path}': its trunk does not fit this run's ({len(missing)} tensors "
                        f"missing or of another shape, e.g. {missing[0]}); use a checkpoint written by this tool")
    model.load_state_dict(fits, strict=False)
    new = sorted({k.rsplit(".", 1)[0] for k in wanted if k not in fits})
    heads = [n for n in new if not n.startswith(aux)]
    aux_note = " and the auxiliary classifiers" if any(n.startswith(aux) for n in new) else ""
    return (f"transfer: trunk initialized from {path} ({len(source_names)} other classes, {len(fits)} tensors); "
            f"new for the {len(class_names)} classes here: {', '.join(heads)}{aux_note}")


def region_loss(loss_config: LossConfig):
    def loss_fn(model, batch):
        out = model(batch["crops"])
        return detection_loss(out.class_logits, out.box_deltas, batch["labels"], batch["box_targets"],
                              batch["regress"], out.aux_logits, loss_config)
    return loss_fn


@dataclass
class RunData:
    """What a run trains and chooses on: the training images (without any held-out ones) and their
    proposals, and the validator (``--val``, or the held-out images) or None."""

    train_set: Dataset
    proposals: StoreProposals
    validator: Validator | None
    held_out: int = 0


def hold_out(dataset: Dataset, count: int, seed: int) -> tuple[Dataset, Dataset]:
    """``(training, held out)``: ``count`` images of ``dataset`` drawn with ``seed`` (in their order)."""
    if not 0 < count < len(dataset):
        raise UserError(f"cannot hold out {count} of the {len(dataset)} training images; hold out fewer (--hold-out)")
    chosen = set(np.random.default_rng([seed, 19]).choice(len(dataset), count, replace=False).tolist())
    keep = [r for i, r in enumerate(dataset.records) if i not in chosen]
    held = [r for i, r in enumerate(dataset.records) if i in chosen]
    return (Dataset(keep, dataset.vocab, dataset.image_root, dataset.name),
            Dataset(held, dataset.vocab, dataset.image_root, f"{dataset.name} (held out)"))


def load_run_data(config: DetectorTrainConfig, ctx: DistContext = DistContext(), report=print,
                  held_out: int | Callable[[int], int] = 0) -> RunData:
    """Open and check the datasets, compute or open their proposals (once, into the run's store), and
    hold out ``held_out`` training images for validation when there is no ``config.val`` (a function of
    the number of training images, or a count)."""
    progress = ctx.is_main and config.engine.progress
    train_set = open_dataset(config.train, config.train_split, annotations=config.ilsvrc_annotations,
                             image_root=config.image_root, progress=progress)
    check = check_images(train_set, decode=config.verify_images, progress=progress)
    if check.skipped and ctx.is_main:  # each image and the count on stderr, as every batch job's failures
        print_failures(dict(check.skipped), "left out of training (listed in skipped_images.txt)", len(train_set))
        atomic_write(Path(config.out_dir) / "skipped_images.txt", "".join(f"{p}\t{r}\n" for p, r in check.skipped))
    if not check.records:
        raise UserError(f"dataset '{config.train}': none of its {len(train_set)} images can be read; check "
                        "the image folder")
    train_set = Dataset(check.records, train_set.vocab, train_set.image_root, train_set.name)
    if config.classifier.num_classes != train_set.vocab.num_classes:
        raise UserError(f"the classifier has {config.classifier.num_classes} classes but '{config.train}' has "
                        f"{train_set.vocab.num_classes}")
    # the whole split's proposals, once: held-out images are read from the same store
    proposals = split_proposals(config.proposals, train_set, split_name(config.train, config.train_split), ctx,
                                config.engine.progress, report)
    val_set, val_proposals = None, None
    if config.val:
        val_set = open_dataset(config.val, config.val_split, annotations=config.ilsvrc_annotations,
                               image_root=config.image_root, progress=progress)
        val_set = align_vocabulary(val_set, train_set, config.val)
        val_check = check_images(val_set, decode=config.verify_images)
        if ctx.is_main:
            print_failures(dict(val_check.skipped), "left out of validation")
        records = val_check.records[: config.val_images] if config.val_images else val_check.records
        val_set = Dataset(records, val_set.vocab, val_set.image_root, val_set.name)
        val_proposals = split_proposals(config.proposals, val_set, split_name(config.val, config.val_split), ctx,
                                        config.engine.progress, report)
        held_out = 0
    elif callable(held_out):
        held_out = held_out(len(train_set))
    if held_out and not config.val:
        train_set, val_set = hold_out(train_set, held_out, config.engine.seed)
        val_proposals = proposals
    validator = None
    if val_set is not None:
        validator = Validator(val_set, val_proposals, config.proposals.eval_max_proposals, config.postprocess,
                              BoxCoder(), precision="auto", progress=ctx.is_main and config.engine.progress,
                              image_cache_mb=config.image_cache_mb)
    return RunData(train_set, proposals, validator, held_out)


def build_model(config: DetectorTrainConfig, class_names: tuple[str, ...], report=print) -> RegionClassifier:
    """The region classifier, seeded, its weights from ``--backbone-weights`` or ``--init-checkpoint``
    (which may have other classes: see :func:`load_init_checkpoint`), else from scratch."""
    torch.manual_seed(config.engine.seed)
    model = RegionClassifier(config.classifier)
    if config.backbone_weights:
        count = load_backbone_weights(model, config.backbone_weights)
        report(f"initialized the trunk from {config.backbone_weights} ({count} tensors)")
    if config.init_checkpoint:
        report(load_init_checkpoint(model, config.init_checkpoint, class_names))
    return model


def train_model(config: DetectorTrainConfig, data: RunData, model: RegionClassifier,
                ctx: DistContext = DistContext(), report=print) -> TrainResult:
    """Train ``model`` on ``data`` with the engine (see :mod:`detector.training.engine` for the files).
    ``model.config`` must be ``config.classifier``: the crops are made at its size and context, and the
    evaluations during training warp at the model's own."""
    if model.config != config.classifier:
        raise ValueError(f"the model's classifier settings {model.config} are not the run's {config.classifier}")
    box_coder = BoxCoder()
    train_set = data.train_set
    sample = RegionDataConfig.for_classifier(config.classifier, max_proposals=config.proposals.max_proposals,
                                             seed=config.engine.seed, image_cache_mb=config.image_cache_mb)
    source = RegionBatchSource(train_set, data.proposals, config.sampler, sample,
                               box_coder, rank=ctx.rank, world_size=ctx.world_size)
    saved = model_config(config, train_set.vocab, box_coder)
    saved["training"]["held_out_images"] = data.held_out
    resume_key = {k: saved[k] for k in ("classifier", "classes", "box_coder", "postprocess")}
    resume_key["training"] = {k: v for k, v in saved["training"].items() if k != "val"}
    resume_key["proposals"] = proposal_settings(config.proposals)
    resume_key["world_size"] = ctx.world_size
    resume_key = json.loads(json.dumps(resume_key))
    return train(model, source, region_loss(config.loss), config.engine, ctx, model_config=saved,
                 resume_key=resume_key, evaluate=data.validator, resume=config.resume,
                 items_per_batch=source.regions_per_batch, report=report)


def run_training(config: DetectorTrainConfig, ctx: DistContext = DistContext(), report=print,
                 held_out: int = 0) -> TrainResult:
    """Load the data, build the model and train it (see :mod:`detector.training.engine` for the files)."""
    data = load_run_data(config, ctx, report, held_out)
    if held_out:
        report(f"held out {held_out} of the training images for choosing the checkpoint (no --val)")
    model = build_model(config, data.train_set.vocab.names, report)
    return train_model(config, data, model, ctx, report)


# ----------------------------------------------------------------------------------------------------
# shipping a checkpoint


def export_detector(source: str | Path, target: str | Path, half: bool = True, notes: dict | None = None,
                    name: str | None = None, description: str | None = None) -> Path:
    """Write ``source``'s detector as ``target`` for inference: without the auxiliary classifiers (only
    training uses them), floating-point tensors as float16 when ``half`` (loading casts them back to the
    model's float32), and ``notes`` added to the config's ``training`` section. ``name`` ("chess pieces")
    and ``description`` say what it detects (tools print them); ``None`` keeps the source's. Returns the
    weights path."""
    state, config = load_checkpoint(source)
    state = {k: v for k, v in state.items() if not k.startswith(("trunk.aux1.", "trunk.aux2."))}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    config = json.loads(json.dumps(config))
    config.setdefault("classifier", {})["aux_logits"] = False
    for key, value in (("name", name), ("description", description)):
        if value is not None:
            config[key] = value
    config["training"] = {**config.get("training", {}), **(notes or {}),
                          "exported_from": str(source), "stored_dtype": "float16" if half else "float32"}
    return save_checkpoint(target, state, config)
