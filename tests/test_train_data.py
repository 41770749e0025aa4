"""Training's proposals (detector/training/rcnn.py: a ProposalStore, precomputed or computed into the run
folder through the batch-job framework) and its batches (detector/training/data.py), in this process and
from spawned data-loading workers (detector/training/engine.py). Three real chess photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.base.errors import UserError
from detector.data import read_coco
from detector.data.records import Dataset
from detector.training.data import RegionBatchSource, RegionDataConfig
from detector.training.engine import _batches
from detector.training.rcnn import ProposalConfig, computed_store, split_proposals
from detector.training.sampler import SamplerConfig
from proposals.precompute import ImageEntry, PrecomputeConfig, precompute

OPTIONS = {"max_side": 96}  # a small Selective Search working size: quick, same code path


@pytest.fixture(scope="module")
def dataset(chess):
    source = read_coco(chess / "valid" / "_annotations.coco.json")
    return Dataset(source.records[:3], source.vocab, source.image_root, "chess-3")


def batches_of(dataset, proposals, iterations=3, workers=0):
    source = RegionBatchSource(dataset, proposals, SamplerConfig(regions_per_batch=16, images_per_batch=2),
                               RegionDataConfig(input_size=32, seed=5))
    return list(_batches(source, 0, iterations, workers))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_a_store_and_proposals_computed_here_give_the_same_batches(dataset, tmp_path):
    # the user's precomputed store (the library of tools/precompute_proposals.py), keyed by file name
    entries = [ImageEntry(r.file_name, str(dataset.image_path(r))) for r in dataset.records]
    precompute(entries, tmp_path / "user.store", PrecomputeConfig(options=tuple(OPTIONS.items())), progress=False)
    from_store = split_proposals(ProposalConfig(options=OPTIONS, store=str(tmp_path / "user.store")), dataset, "x")
    # no store: computed through the same framework into a store of the run folder, then read from it
    lines = []
    config = ProposalConfig(options=OPTIONS, cache_dir=str(tmp_path / "run" / "proposals"), workers=0)
    computed = split_proposals(config, dataset, "valid", progress=False, report=lines.append)
    assert computed.path == str(computed_store(config, "valid")) and "3 computed" in lines[0]
    assert_same_batches(batches_of(dataset, from_store), batches_of(dataset, computed))
    # a rerun (or a resume) reads the store and computes nothing; another setting gets its own store
    lines.clear()
    split_proposals(config, dataset, "valid", progress=False, report=lines.append)
    assert lines == []
    other = ProposalConfig(options={"max_side": 64}, cache_dir=config.cache_dir)
    assert computed_store(other, "valid") != computed_store(config, "valid")


def test_spawned_loading_workers_give_the_same_batches(dataset, tmp_path):
    config = ProposalConfig(options=OPTIONS, cache_dir=str(tmp_path), workers=0)
    proposals = split_proposals(config, dataset, "valid", progress=False, report=lambda s: None)
    # one spawned worker (it imports torch: seconds), against this process; the source travels pickled,
    # the store by its path
    assert_same_batches(batches_of(dataset, proposals, workers=1), batches_of(dataset, proposals))


def test_a_store_without_some_images_is_one_line(dataset, tmp_path):
    entries = [ImageEntry(r.file_name, str(dataset.image_path(r))) for r in dataset.records[:2]]
    precompute(entries, tmp_path / "partial", PrecomputeConfig(options=tuple(OPTIONS.items())), progress=False)
    with pytest.raises(UserError) as err:
        split_proposals(ProposalConfig(store=str(tmp_path / "partial")), dataset, "train")
    message = str(err.value)
    assert "\n" not in message and "lacks 1 of the 3 images of train" in message
    assert dataset.records[2].file_name in message


def test_stored_boxes_are_the_computed_ones_within_the_storage_step(dataset, tmp_path):
    from detector.base.io import load_image
    from proposals import propose

    config = ProposalConfig(options=OPTIONS, cache_dir=str(tmp_path), workers=0)
    proposals = split_proposals(config, dataset, "valid", progress=False, report=lambda s: None)
    rec = dataset.records[0]
    image = load_image(dataset.image_path(rec))
    expected = propose(image, "ss-fast", **OPTIONS)
    got = proposals(rec, image)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= max(image.shape) / 65535
