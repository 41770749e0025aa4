"""The region classifier: an Inception (GoogLeNet) trunk with a class head and a box-regression head.

GoogLeNet (Szegedy et al. 2014) classifies each warped proposal; its ILSVRC 2014 detection entry used
it in place of R-CNN's AlexNet. The trunk is torchvision's ``googlenet`` (no download: built with
``weights=None``; trained from scratch or initialized from a local file of torchvision's ImageNet
weights by :func:`load_backbone_weights`). On its 1024-d average-pooled feature sit

- ``dropout`` (0.4 as in the paper) and ``cls_score``: ``C + 1`` class logits, label 0 = background;
- ``bbox_pred``: ``4 C`` class-specific box deltas in R-CNN's parameterization (see
  :mod:`detector.box_coder`), columns ``4(c-1) .. 4(c-1)+3`` for label ``c``.

The two auxiliary classifiers of the paper (after inception 4a and 4d) predict the same ``C + 1``
classes; they run only in training mode, where their logits are returned in
``RegionOutputs.aux_logits`` for a down-weighted loss (0.3 each in the paper). Their 4x4 adaptive
pooling and the trunk's global average pooling let any input size from about 64 px work (the default
CPU model uses ~112 px).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import GoogLeNet_Weights, googlenet

from detector.base.checkpoint import checkpoint_section, load_checkpoint
from detector.base.defaults import IMAGENET_MEAN, IMAGENET_STD
from detector.base.errors import UserError
from detector.base.vocab import Vocabulary
from detector.warp import context_scale, default_context

FEATURE_DIM = 1024  # GoogLeNet's pooled feature after inception 5b
MIN_INPUT_SIZE = 32  # below this the trunk's feature map vanishes (five stride-2 stages)
TORCHVISION_WEIGHT_NAMES = ("imagenet", "IMAGENET1K_V1", "DEFAULT", "GoogLeNet_Weights.IMAGENET1K_V1")


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that shapes the classifier and its input; saved in every checkpoint.

    num_classes: ``C``, object classes (background not counted); the class head has ``C + 1`` outputs.
    input_size: ``S``, side of the square warped crops, pixels (224 in the paper).
    context: ``p``, pixels of context around each box in the warped crop, ``0 <= 2p < S``; ``None``
        means R-CNN's 16 at 224 px scaled to ``S`` (8 at 112 px). Resolved to a number on creation.
    dropout: on the pooled feature before both heads, probability in [0, 1).
    mean, std: per-channel RGB normalization of ``[0, 1]`` pixels (ImageNet's by default).
    aux_logits: build the two auxiliary classifiers (used only in training mode).
    aux_dropout: dropout inside the auxiliary classifiers, [0, 1) (0.7 in the paper).
    transform_input: torchvision's switch that maps ImageNet-normalized input to the ``[-1, 1]`` input
        its ImageNet GoogLeNet weights were trained on; set it when starting from those weights.
    sampling_ratio, antialias: how crops are warped (see :func:`detector.warp.warp_regions`).
    """

    num_classes: int
    input_size: int = 224
    context: int | None = None
    dropout: float = 0.4
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    aux_logits: bool = True
    aux_dropout: float = 0.7
    transform_input: bool = False
    sampling_ratio: int = 1
    antialias: bool = True

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.context is None:
            object.__setattr__(self, "context", default_context(self.input_size))
        if int(self.num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if int(self.input_size) < MIN_INPUT_SIZE:
            raise ValueError(f"input_size must be >= {MIN_INPUT_SIZE} px, got {self.input_size}")
        context_scale(int(self.input_size), int(self.context))
        if not (0 <= self.dropout < 1 and 0 <= self.aux_dropout < 1):
            raise ValueError("dropout and aux_dropout must be in [0, 1)")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std > 0")
        if self.sampling_ratio < 1:
            raise ValueError(f"sampling_ratio must be >= 1, got {self.sampling_ratio}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> ClassifierConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown classifier settings {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class RegionOutputs:
    """What the classifier says about a batch of ``B`` warped regions.

    class_logits: float ``(B, C + 1)``, column 0 = background.
    box_deltas: float ``(B, 4 C)``, weighted R-CNN deltas per class (see :mod:`detector.box_coder`).
    aux_logits: in training mode (with auxiliary classifiers) two float ``(B, C + 1)`` tensors, after
        inception 4a and 4d; empty otherwise.
    """

    class_logits: torch.Tensor
    box_deltas: torch.Tensor
    aux_logits: tuple[torch.Tensor, ...] = ()


class RegionClassifier(nn.Module):
    """GoogLeNet trunk + class head (``C + 1``) + class-specific box head (``4 C``).

    forward(crops): crops float ``(B, 3, S, S)``, normalized as ``config`` says -> :class:`RegionOutputs`.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        num_outputs = config.num_classes + 1
        # init_weights=True: torchvision's truncated-normal initialization (its default warns otherwise)
        self.trunk = googlenet(weights=None, num_classes=num_outputs, aux_logits=config.aux_logits,
                               transform_input=config.transform_input, init_weights=True,
                               dropout=0.0, dropout_aux=config.aux_dropout)
        self.trunk.fc = nn.Identity()  # the trunk ends at the pooled 1024-d feature
        self.trunk.dropout = nn.Identity()
        self.dropout = nn.Dropout(config.dropout)
        self.cls_score = nn.Linear(FEATURE_DIM, num_outputs)
        self.bbox_pred = nn.Linear(FEATURE_DIM, 4 * config.num_classes)
        # Fast R-CNN's head initialization: small Gaussians so early deltas stay near zero
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def features(self, crops: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Pooled feature ``(B, 1024)`` and the auxiliary logits (training mode only, else ``()``)."""
        out = self.trunk(crops)
        if isinstance(out, torch.Tensor):
            return out, ()
        pooled, aux2, aux1 = out  # torchvision's GoogLeNetOutputs(logits, aux_logits2, aux_logits1)
        return pooled, tuple(a for a in (aux1, aux2) if a is not None)

    def forward(self, crops: torch.Tensor) -> RegionOutputs:
        weight_dtype = self.cls_score.weight.dtype
        if crops.dtype != weight_dtype:  # fp32 crops into bf16 weights (see prepare_for_inference)
            crops = crops.to(weight_dtype)
        pooled, aux = self.features(crops)
        pooled = self.dropout(pooled)
        return RegionOutputs(self.cls_score(pooled), self.bbox_pred(pooled), aux)

    def drop_aux(self) -> RegionClassifier:
        """Remove the auxiliary classifiers (inference never uses them); returns ``self``."""
        self.trunk.aux1 = None
        self.trunk.aux2 = None
        self.trunk.aux_logits = False
        return self


def prepare_for_inference(model: RegionClassifier, device: str | torch.device = "cpu", *,
                          dtype: torch.dtype = torch.float32, channels_last: bool = True,
                          compile: bool = False, compile_mode: str | None = None,
                          compile_backend: str = "inductor") -> nn.Module:
    """Make ``model`` ready for fast inference, in place; returns what to call (``model`` or its compiled form).

    - eval mode, without the auxiliary classifiers, on ``device``;
    - dtype: the weights' dtype. ``torch.bfloat16`` casts the weights themselves (not only autocast's
      per-op casts): half the memory traffic, no cast per call. Crops of another dtype are cast to it
      on entry; outputs come in this dtype (take ``.float()`` before a softmax).
    - channels_last: the convolutions' weights in NHWC (feed NHWC crops:
      ``crops.contiguous(memory_format=torch.channels_last)``), what oneDNN and cuDNN run fastest.
    - compile: wrap in ``torch.compile`` (``compile_mode``: its ``mode``, e.g. ``"max-autotune"``;
      ``compile_backend``: its ``backend``). The first call compiles (a minute or more on a CPU), and a
      new batch shape may compile again: feed batches of one size. The wrapper forwards attribute
      reads (``.config``) to ``model``; keep the state dict of ``model``, not of the wrapper.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    model.drop_aux().eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, dtype=dtype, memory_format=memory_format)
    if not compile:
        return model
    return torch.compile(model, mode=compile_mode, backend=compile_backend)


def _torchvision_cache_file() -> Path:
    from torch.hub import get_dir

    return Path(get_dir()) / "checkpoints" / os.path.basename(GoogLeNet_Weights.IMAGENET1K_V1.url)


def resolve_backbone_weights(spec: str | os.PathLike) -> Path:
    """A local weights file for ``spec``: a path, or a name of torchvision's ImageNet weights, which is
    accepted only if torchvision's cache already holds the file (this project never downloads)."""
    if str(spec) in TORCHVISION_WEIGHT_NAMES:
        cached = _torchvision_cache_file()
        if cached.is_file():
            return cached
        raise UserError(
            f"backbone weights '{spec}' would need a download from {GoogLeNet_Weights.IMAGENET1K_V1.url} "
            "and this project never downloads at run time; fetch that file on a machine with network and "
            "pass its path (--backbone-weights PATH), or train from scratch")
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"backbone weights '{path}': no such file; pass a torchvision googlenet .pth or "
                        ".safetensors file")
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as err:  # noqa: BLE001 - any failure to parse is the file's fault
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"backbone weights '{path}': cannot read it as a weights file ({reason[:200]}); "
                        "pass a torchvision googlenet state dict (.pth) or .safetensors file") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"backbone weights '{path}': not a state dict of tensors; pass a torchvision "
                        "googlenet state dict")
    return state


def load_backbone_weights(model: RegionClassifier, spec: str | os.PathLike) -> int:
    """Initialize ``model.trunk`` from torchvision ImageNet GoogLeNet weights in a local file.

    spec: a ``.pth`` (read with ``torch.load(weights_only=True)``) or ``.safetensors`` file holding
        torchvision's ``googlenet`` state dict, or ``"imagenet"`` for torchvision's cached file.
    The 1000-way layers (``fc``, ``aux*.fc2``) are skipped; the new heads keep their initialization.
    Returns the number of tensors loaded. Raises :class:`UserError` for a missing or foreign file.
    """
    path = resolve_backbone_weights(spec)
    state = _read_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    skip = ("fc.", "aux1.fc2.", "aux2.fc2.")
    wanted = model.trunk.state_dict()
    usable = {k: v for k, v in state.items() if not k.startswith(skip) and (k in wanted or "aux" not in k)}
    unexpected = sorted(k for k in usable if k not in wanted)
    mismatched = sorted(k for k in usable if k in wanted and usable[k].shape != wanted[k].shape)
    missing = sorted(k for k in wanted if k not in usable and not k.startswith(("aux1.", "aux2.")))
    if unexpected or mismatched or missing:
        detail = (f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                  f"(e.g. {unexpected[:2]}), {len(mismatched)} of another shape (e.g. {mismatched[:2]})")
        raise UserError(f"backbone weights '{path}' do not fit torchvision's googlenet: {detail}; pass "
                        "torchvision's ImageNet googlenet weights")
    model.trunk.load_state_dict(usable, strict=False)
    if not model.config.transform_input and model.config.std != (0.5, 0.5, 0.5):
        warnings.warn("torchvision's ImageNet googlenet weights expect inputs in [-1, 1]; set "
                      "ClassifierConfig(transform_input=True) to feed them what they were trained on",
                      stacklevel=2)
    return len(usable)


def build_classifier_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                                     drop_aux: bool = True) -> tuple[RegionClassifier, dict]:
    """``(RegionClassifier in eval mode, config dict)`` from a checkpoint (:mod:`detector.base.checkpoint`).

    drop_aux: leave out the auxiliary classifiers (inference never uses them).
    Raises :class:`UserError` if the files are missing or corrupt, the config is incomplete, or the
    tensors do not fit the architecture the config describes.
    """
    state_dict, config = load_checkpoint(path)
    try:
        classifier_config = ClassifierConfig.from_dict(checkpoint_section(config, "classifier", path))
        vocabulary = Vocabulary.from_dict(checkpoint_section(config, "classes", path))
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
