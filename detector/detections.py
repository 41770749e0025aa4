"""What detection returns: :class:`Detections` of one image, and their translation into another
vocabulary (a model's labels into a dataset's) that keeps labels, names and ids together."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from detector.base.errors import UserError
from detector.base.vocab import Vocabulary


@dataclass(frozen=True)
class Detections:
    """Detections of one image, highest score first.

    boxes: float32 ``(K, 4)`` xyxy, pixels of the original image, clipped to it.
    scores: float32 ``(K,)`` class probabilities in [0, 1].
    labels: int64 ``(K,)`` contiguous labels in ``1..C`` of a vocabulary.
    class_names: ``K`` names, ``class_names[i]`` of ``labels[i]`` in that vocabulary.
    class_ids: int64 ``(K,)`` the dataset's own class ids (ILSVRC DET id, COCO category id, ...).
    image_size: ``(h, w)``.
    timings: seconds of work per stage for this image: ``proposals``, ``warp``, ``classify`` (the network;
        a forward pass shared by several images is split by their numbers of crops), ``postprocess``
        (box decoding, NMS), and ``total``, their sum. On CUDA the stages are timed without waiting for
        the GPU unless the detector's ``sync_timings`` is set, so the GPU's time lands where results are read.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    class_ids: np.ndarray
    image_size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)

    def relabel(self, mapping: np.ndarray, vocabulary: Vocabulary) -> Detections:
        """The same detections in ``vocabulary``: label ``l`` becomes ``mapping[l]`` (from :func:`label_map`),
        names and ids are ``vocabulary``'s, so labels, names and ids still belong together."""
        labels = np.asarray(mapping, np.int64)[self.labels]
        names = np.array(("background",) + vocabulary.names, dtype=object)
        ids = np.array((0,) + vocabulary.ids, dtype=np.int64)
        return replace(self, labels=labels, class_names=tuple(names[labels].tolist()), class_ids=ids[labels])

    def to_records(self) -> list[dict]:
        """One JSON-ready dict per detection: ``label`` (name), ``class_id``, ``score``, ``box`` (xyxy)."""
        return [{"label": name, "class_id": int(cid), "score": float(score),
                 "box": [round(float(v), 2) for v in box]}
                for name, cid, score, box in zip(self.class_names, self.class_ids, self.scores, self.boxes)]


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
