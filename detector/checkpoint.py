"""Checkpoints: ``NAME.safetensors`` (the tensors) + ``NAME.json`` (everything else), loaded safely.

Nothing is ever unpickled: the weights are read by ``safetensors`` and the config is plain JSON. Both
files are written atomically (a temporary file in the same folder, then ``os.replace``), so a crash
leaves either the old checkpoint or the new one, never half of one.

The config (see :func:`make_checkpoint_config`) is a JSON object::

    {"format": "googlenet-detection-checkpoint", "version": 1,
     "classifier": ClassifierConfig.to_dict(),           # input size, normalization, warp settings
     "classes": Vocabulary.to_dict(),                     # label c in 1..C is classes.names[c - 1]
     "proposals": {"method": "ss-fast", "options": {}, "max_proposals": 2000},
     "postprocess": PostprocessConfig.to_dict(),          # score threshold, NMS IoU, max detections
     "box_coder": {"weights": [10, 10, 5, 5]},
     "training": {...}}                                   # free-form provenance

Either file's path (or ``NAME`` alone) names the checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from detector.errors import UserError
from detector.vocab import Vocabulary

CHECKPOINT_FORMAT = "googlenet-detection-checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_PROPOSALS = {"method": "ss-fast", "options": {}, "max_proposals": 2000}


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.json)`` for ``NAME``, ``NAME.safetensors`` or ``NAME.json``."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def _atomic_write(target: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``target``, then move it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``state_dict`` to ``NAME.safetensors`` and ``config`` to ``NAME.json``; returns the former.

    config: JSON-serializable dict (see :func:`make_checkpoint_config`).
    """
    from safetensors.torch import save_file

    weights_path, config_path = checkpoint_paths(path)
    text = json.dumps(config, indent=2) + "\n"  # fails before anything is written if not serializable
    # safetensors refuses tensors that share memory; a contiguous CPU copy of each never does
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    _atomic_write(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": CHECKPOINT_FORMAT}))
    _atomic_write(config_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return weights_path


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, config)`` of a checkpoint; :class:`UserError` if a file is missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path, config_path = checkpoint_paths(path)
    for p in (weights_path, config_path):
        if not p.is_file():
            raise UserError(f"checkpoint '{path}': missing {p}; a checkpoint is NAME.safetensors + NAME.json "
                            "side by side")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint config '{config_path}' is corrupt: not valid JSON ({err}); restore it "
                        "from the original checkpoint") from None
    if not isinstance(config, dict):
        raise UserError(f"checkpoint config '{config_path}' is not a JSON object; restore it")
    try:
        state_dict = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"checkpoint weights '{weights_path}' are corrupt or truncated "
                        f"({str(err).splitlines()[0][:160]}); restore them from the original checkpoint") from None
    return state_dict, config


def make_checkpoint_config(classifier, vocabulary: Vocabulary, proposals: dict | None = None,
                           postprocess=None, box_weights=(10.0, 10.0, 5.0, 5.0),
                           training: dict | None = None) -> dict:
    """The JSON config of a checkpoint (see the module docstring).

    classifier: :class:`detector.classifier.ClassifierConfig`; vocabulary: the ``C`` classes.
    proposals: ``{"method": str, "options": dict, "max_proposals": int}`` used in training and by
        default at inference (defaults to fast selective search, 2000 boxes).
    postprocess: :class:`detector.postprocess.PostprocessConfig` (default: R-CNN's settings).
    training: provenance (data, epochs, losses, commit, ...), any JSON-serializable dict.
    """
    from detector.postprocess import PostprocessConfig

    if classifier.num_classes != vocabulary.num_classes:
        raise ValueError(f"classifier has {classifier.num_classes} classes, vocabulary "
                         f"{vocabulary.num_classes}")
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "classifier": classifier.to_dict(),
        "classes": vocabulary.to_dict(),
        "proposals": dict(DEFAULT_PROPOSALS) | dict(proposals or {}),
        "postprocess": (postprocess or PostprocessConfig()).to_dict(),
        "box_coder": {"weights": [float(w) for w in box_weights]},
        "training": dict(training or {}),
    }


def _section(config: dict, key: str, path) -> dict:
    value = config.get(key)
    if not isinstance(value, dict):
        raise UserError(f"checkpoint '{path}': its config has no '{key}' section; it was not written by "
                        "this project's save_checkpoint/make_checkpoint_config")
    return value


def build_classifier_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                                     drop_aux: bool = True):
    """``(RegionClassifier in eval mode, config dict)`` from a checkpoint.

    drop_aux: leave out the auxiliary classifiers (inference never uses them).
    Raises :class:`UserError` if the files are missing or corrupt, the config is incomplete, or the
    tensors do not fit the architecture the config describes.
    """
    from detector.classifier import ClassifierConfig, RegionClassifier

    state_dict, config = load_checkpoint(path)
    try:
        classifier_config = ClassifierConfig.from_dict(_section(config, "classifier", path))
        vocabulary = Vocabulary.from_dict(_section(config, "classes", path))
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(f"checkpoint '{path}': invalid config ({err}); restore the original .json") from None
    if vocabulary.num_classes != classifier_config.num_classes:
        raise UserError(f"checkpoint '{path}': config lists {vocabulary.num_classes} classes but the "
                        f"classifier has {classifier_config.num_classes}; restore the original .json")
    model = RegionClassifier(classifier_config)
    if drop_aux:
        model.drop_aux()
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("trunk.aux1.", "trunk.aux2."))}
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(wanted))
    mismatched = sorted(k for k in set(wanted) & set(state_dict) if wanted[k].shape != state_dict[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} of another shape (e.g. {k}: {tuple(state_dict[k].shape)} in the file, "
                         f"{tuple(wanted[k].shape)} expected)")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise UserError(f"checkpoint '{path}': its tensors do not fit its config ({'; '.join(parts)}); the "
                        ".safetensors and .json files must come from the same save")
    model.load_state_dict(state_dict)
    return model.to(device).eval(), config
