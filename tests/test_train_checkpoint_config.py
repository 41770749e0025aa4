"""What a training run writes into its checkpoint's config, and what it may start from."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.base.checkpoint import DEFAULT_MODEL, load_checkpoint, save_checkpoint
from detector.base.errors import UserError
from detector.classifier import ClassifierConfig, RegionClassifier
from detector.training.rcnn import ProposalConfig, checkpoint_proposals, load_init_checkpoint
from proposals.store import ImageProposals, encode_boxes, write_part


def test_checkpoint_records_the_method_that_made_the_store(tmp_path):
    # a store made by `precompute_proposals --method googlenet`: detection must use googlenet too, not the
    # --proposal-method default (ss-fast) that the run never used
    store = tmp_path / "props.store"
    store.mkdir()
    boxes = np.array([[0, 0, 10, 10]], np.float32)
    write_part(store / "part.pstore", [ImageProposals("a.jpg", (20, 20), encode_boxes(boxes, (20, 20)))],
               {"method": "googlenet", "options": {"superpixel_scale": 2}})
    got = checkpoint_proposals(ProposalConfig(store=str(store), eval_max_proposals=1500))
    assert got == {"method": "googlenet", "options": {"superpixel_scale": 2}, "max_proposals": 1500}
    # without a store the run's own method and options are recorded
    assert checkpoint_proposals(ProposalConfig(method="ss-quality", options={"max_side": 300}))["method"] == "ss-quality"


def test_init_from_another_crop_size_loads_every_tensor():
    # the shipped model's crop size differs from this run's: the trunk ends in global average pooling, so
    # every tensor has the same shape and all are copied
    state, saved = load_checkpoint(DEFAULT_MODEL)
    config = ClassifierConfig.from_dict({**saved["classifier"], "input_size": saved["classifier"]["input_size"] + 32})
    model = RegionClassifier(config)
    load_init_checkpoint(model, DEFAULT_MODEL)
    loaded = model.state_dict()
    for name, tensor in state.items():
        torch.testing.assert_close(loaded[name], tensor.to(loaded[name].dtype))


def test_init_with_other_classes_is_one_line(tmp_path):
    _, saved = load_checkpoint(DEFAULT_MODEL)
    other = RegionClassifier(ClassifierConfig.from_dict({**saved["classifier"], "num_classes": 3}))
    path = tmp_path / "three_classes"
    save_checkpoint(path, other.state_dict(), {**saved, "classifier": {**saved["classifier"], "num_classes": 3}})
    with pytest.raises(UserError, match="other shapes"):
        load_init_checkpoint(RegionClassifier(ClassifierConfig.from_dict(saved["classifier"])), path)
