"""Checkpoints: ``NAME.safetensors`` (the tensors) + ``NAME.json`` (everything else), loaded safely.

Nothing is ever unpickled: the weights are read by ``safetensors`` and the config is plain JSON. Both
files are written atomically (:mod:`detector.base.files`), so a crash leaves either the old checkpoint
or the new one, never half of one. This module is the JSON side, importable without torch (safetensors
and torch are imported only inside the functions that read or write weights); the model side is
:func:`detector.classifier.build_classifier_from_checkpoint` and :func:`proposals.multibox.load_multibox`.

The config (see :func:`make_checkpoint_config`) is a JSON object::

    {"format": "googlenet-detection-checkpoint", "version": 1,
     "name": "chess pieces",                              # optional: what the model detects, in words
     "description": "...",                                # optional: a sentence or two (data, how made)
     "classifier": ClassifierConfig.to_dict(),           # input size, normalization, warp settings
     "classes": Vocabulary.to_dict(),                     # label c in 1..C is classes.names[c - 1]
     "proposals": {"method": "ss-fast", "options": {}, "max_proposals": 2000},
     "postprocess": PostprocessConfig.to_dict(),          # score threshold, NMS IoU, max detections
     "box_coder": {"weights": [10, 10, 5, 5]},
     "training": {...}}                                   # free-form provenance

Either file's path (or ``NAME`` alone) names the checkpoint. :func:`model_info` reads what a checkpoint
detects (its name and classes) from the JSON alone, for tools' headers and ``--help``.

The options a config holds (:data:`CONFIG_OPTIONS`: the proposal count and method, the post-processing
thresholds, a MultiBox model's NMS and counts) are checked when it is read, by the rules of the command
line's options (:mod:`detector.base.options`): a hand-edited ``"nms_iou": 7`` is one line naming the file
and the key, as ``--nms-iou 7`` is one line naming the option.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from detector.base.defaults import BOX_CODER_WEIGHTS, default_postprocess, default_proposals
from detector.base.errors import UserError
from detector.base.files import atomic_path, atomic_write
from detector.base.options import (
    check_json_value,
    iou,
    non_negative_number,
    positive_int,
    probability,
    proposal_method_backend,
    unit_fraction,
)
from detector.base.vocab import Vocabulary

if TYPE_CHECKING:
    import torch

CHECKPOINT_FORMAT = "googlenet-detection-checkpoint"
CHECKPOINT_VERSION = 1

# The installed default model (NAME: NAME.safetensors + NAME.json), shipped as package data.
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "resources" / "default_detector"
NO_DEFAULT_MODEL = ("no model is installed: the default model (detector/resources/default_detector"
                    ".safetensors + .json) has not been trained yet; train one with tools/train_detector.py "
                    "and pass it with --model PATH")


# The options a checkpoint's JSON holds, by key (``section.key``; a MultiBox model's at the top level),
# each with the rule of the command-line option that sets it (its name shown in the message).
CONFIG_OPTIONS = {
    "proposals.method": (proposal_method_backend, "--proposals"),
    "proposals.max_proposals": (positive_int, "--max-proposals"),
    "postprocess.score_threshold": (probability, "--threshold"),
    "postprocess.nms_iou": (iou, "--nms-iou"),
    "postprocess.max_detections": (positive_int, "--max-detections"),
    "postprocess.box_voting": (probability, "--box-voting"),
}
MULTIBOX_OPTIONS = {  # a MultiBox checkpoint (kind "multibox"): train_multibox.py's options
    "nms_iou": (iou, "--nms-iou"),
    "top_k": (positive_int, "--top-k"),
    "num_priors": (positive_int, "--num-priors"),
    "input_size": (positive_int, "--input-size"),
    "head_channels": (positive_int, "--head-channels"),
    "head_grid": (positive_int, "--head-grid"),
    "head_hidden": (positive_int, "--head-hidden"),
    "dropout": (unit_fraction, "--dropout"),
    "alpha": (non_negative_number, "--alpha"),
}


def check_config_options(config: dict, where: str | os.PathLike) -> None:
    """Check the options of a checkpoint config (:data:`CONFIG_OPTIONS`, or :data:`MULTIBOX_OPTIONS` for
    a MultiBox model) by the command line's rules; a key that is absent keeps its default. A bad value
    is a one-line :class:`UserError` naming ``where`` (the JSON file) and the key."""
    rules = MULTIBOX_OPTIONS if config.get("kind") == "multibox" else CONFIG_OPTIONS
    for key, (parse, option) in rules.items():
        section, _, name = key.rpartition(".")
        holder = config.get(section) if section else config
        if not isinstance(holder, dict) or name not in holder:
            continue
        try:
            check_json_value(parse, holder[name])
        except argparse.ArgumentTypeError as err:
            raise UserError(f"checkpoint config '{where}': {key}: {err} (the rule of {option}); restore the "
                            "original .json, or fix the value") from None


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.json)`` for ``NAME``, ``NAME.safetensors`` or ``NAME.json``."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``state_dict`` to ``NAME.safetensors`` and ``config`` to ``NAME.json``; returns the former.

    config: JSON-serializable dict (see :func:`make_checkpoint_config`).
    """
    from safetensors.torch import save_file  # weights only: reading a config must not import torch

    weights_path, config_path = checkpoint_paths(path)
    text = json.dumps(config, indent=2) + "\n"  # fails before anything is written if not serializable
    # safetensors refuses tensors that share memory; a contiguous CPU copy of each never does
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(weights_path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT})
    atomic_write(config_path, text)
    return weights_path


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, config)`` of a checkpoint; :class:`UserError` if a file is missing or corrupt."""
    from safetensors import SafetensorError  # weights only: reading a config must not import torch
    from safetensors.torch import load_file

    weights_path, _ = checkpoint_paths(path)
    if not weights_path.is_file():
        raise UserError(f"checkpoint '{path}': missing {weights_path}; a checkpoint is NAME.safetensors + "
                        "NAME.json side by side")
    config = load_checkpoint_config(path)
    try:
        state_dict = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"checkpoint weights '{weights_path}' are corrupt or truncated "
                        f"({str(err).splitlines()[0][:160]}); restore them from the original checkpoint") from None
    return state_dict, config


def load_checkpoint_config(path: str | os.PathLike) -> dict:
    """The JSON config of a checkpoint, without its weights (no torch); :class:`UserError` if the file is
    missing, not JSON, not a JSON object, or holds an option the command line would refuse
    (:func:`check_config_options`)."""
    _, config_path = checkpoint_paths(path)
    if not config_path.is_file():
        raise UserError(f"checkpoint '{path}': missing {config_path}; a checkpoint is NAME.safetensors + "
                        "NAME.json side by side")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint config '{config_path}' is corrupt: not valid JSON ({err}); restore it "
                        "from the original checkpoint") from None
    if not isinstance(config, dict):
        raise UserError(f"checkpoint config '{config_path}' is not a JSON object; restore it")
    check_config_options(config, config_path)
    return config


def checkpoint_section(config: dict, key: str, path) -> dict:
    """``config[key]``, a dict; :class:`UserError` naming the checkpoint if it is missing."""
    value = config.get(key)
    if not isinstance(value, dict):
        raise UserError(f"checkpoint '{path}': its config has no '{key}' section; it was not written by "
                        "this project's save_checkpoint/make_checkpoint_config")
    return value


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint detects, from its JSON config alone (no weights, no torch).

    name: the config's ``name`` ("chess pieces"), or ``None`` if it has none.
    description: the config's ``description``, or ``""``.
    class_names: the ``C`` class names, label ``c`` in ``1..C`` is ``class_names[c - 1]``.
    """

    name: str | None
    description: str
    class_names: tuple[str, ...]

    def classes_text(self, max_chars: int = 200) -> str:
        """``"13 classes (bishop, black-bishop, ..., white-rook)"``: every name that fits in about
        ``max_chars``, then how many more."""
        names, shown = list(self.class_names), []
        for i, name in enumerate(names):
            if shown and len(", ".join(shown + [name])) > max_chars and i < len(names) - 1:
                shown.append(f"... {len(names) - i} more")
                break
            shown.append(name)
        return f"{len(names)} class{'es' * (len(names) != 1)} ({', '.join(shown)})"

    def summary(self) -> str:
        """One line: ``"chess pieces, 13 classes (bishop, ...)"`` (the classes alone without a name)."""
        return f"{self.name}, {self.classes_text()}" if self.name else self.classes_text()

    def short(self) -> str:
        """What it knows in a few words: its name, or its classes."""
        return self.name or self.classes_text(max_chars=60)


def installed(path: str | os.PathLike) -> Path | None:
    """The weights path of checkpoint ``path`` if both its files are there (an installed model), else None."""
    weights, config = checkpoint_paths(path)
    return weights if weights.is_file() and config.is_file() else None


def model_info(path: str | os.PathLike) -> ModelInfo:
    """The :class:`ModelInfo` of checkpoint ``path``; :class:`UserError` if its JSON is missing or bad."""
    config = load_checkpoint_config(path)
    names = checkpoint_section(config, "classes", path).get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"checkpoint '{path}': its config's classes have no list of names; restore it")
    name = config.get("name")
    return ModelInfo(name=str(name) if name else None, description=str(config.get("description") or ""),
                     class_names=tuple(names))


def make_checkpoint_config(classifier, vocabulary: Vocabulary, proposals: dict | None = None,
                           postprocess=None, box_weights=BOX_CODER_WEIGHTS,
                           training: dict | None = None) -> dict:
    """The JSON config of a checkpoint (see the module docstring).

    classifier: :class:`detector.classifier.ClassifierConfig`; vocabulary: the ``C`` classes.
    proposals: ``{"method": str, "options": dict, "max_proposals": int}`` used in training and by
        default at inference (defaults to fast selective search, 2000 boxes).
    postprocess: :class:`detector.postprocess.PostprocessConfig` (default: R-CNN's settings).
    training: provenance (data, epochs, losses, commit, ...), any JSON-serializable dict.
    """
    if classifier.num_classes != vocabulary.num_classes:
        raise ValueError(f"classifier has {classifier.num_classes} classes, vocabulary "
                         f"{vocabulary.num_classes}")
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "classifier": classifier.to_dict(),
        "classes": vocabulary.to_dict(),
        "proposals": default_proposals() | dict(proposals or {}),
        "postprocess": postprocess.to_dict() if postprocess is not None else default_postprocess(),
        "box_coder": {"weights": [float(w) for w in box_weights]},
        "training": dict(training or {}),
    }
