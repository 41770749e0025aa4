"""Checkpoints: safetensors + JSON round trip, atomic files, refusal of missing/corrupt/mismatched ones."""

import json

import pytest
import torch

from detector.base.checkpoint import (
    checkpoint_paths,
    load_checkpoint,
    make_checkpoint_config,
    save_checkpoint,
)
from detector.base.errors import UserError
from detector.base.vocab import Vocabulary
from detector.classifier import ClassifierConfig, RegionClassifier, build_classifier_from_checkpoint
from detector.postprocess import PostprocessConfig

VOCAB = Vocabulary(ids=(1, 2, 3), names=("cat", "dog", "fox"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    config = ClassifierConfig(num_classes=3, input_size=96)
    model = RegionClassifier(config).eval()
    meta = make_checkpoint_config(config, VOCAB, proposals={"method": "ss-fast", "max_proposals": 500},
                                  postprocess=PostprocessConfig(nms_iou=0.4), training={"epochs": 1})
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, model.state_dict(), meta)
    return path, model, meta


def test_paths():
    assert checkpoint_paths("a/b.safetensors") == checkpoint_paths("a/b.json") == checkpoint_paths("a/b")
    assert checkpoint_paths("a/b")[0].name == "b.safetensors"


def test_round_trip(saved):
    path, model, meta = saved
    for name in (path, path.with_suffix(".safetensors"), str(path) + ".json"):
        state, config = load_checkpoint(name)
        assert config == meta
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.json", "tiny.safetensors"]  # no temp files
    assert meta["classes"]["names"] == ["cat", "dog", "fox"] and meta["postprocess"]["nms_iou"] == 0.4
    assert meta["proposals"] == {"method": "ss-fast", "options": {}, "max_proposals": 500}


def test_built_classifier_gives_the_same_outputs(saved):
    path, model, _ = saved
    rebuilt, config = build_classifier_from_checkpoint(path)
    assert not rebuilt.training and rebuilt.trunk.aux1 is None  # aux heads left out for inference
    crops = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        a, b = model(crops), rebuilt(crops)
    torch.testing.assert_close(a.class_logits, b.class_logits)
    torch.testing.assert_close(a.box_deltas, b.box_deltas)


def copy_checkpoint(saved, tmp_path):
    path = saved[0]
    for src in checkpoint_paths(path):
        (tmp_path / src.name).write_bytes(src.read_bytes())
    return tmp_path / path.name


def test_missing_files(saved, tmp_path):
    copy = copy_checkpoint(saved, tmp_path)
    copy.with_suffix(".json").unlink()
    with pytest.raises(UserError, match=r"missing .*tiny\.json"):
        load_checkpoint(copy)
    with pytest.raises(UserError, match="missing"):
        load_checkpoint(tmp_path / "nothing.safetensors")


def test_corrupt_files(saved, tmp_path):
    copy = copy_checkpoint(saved, tmp_path)
    weights, config = checkpoint_paths(copy)
    config.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_checkpoint(copy)
    config.write_text(json.dumps(saved[2]))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(copy)
    weights.write_bytes(b"\x80\x04K\x01.")  # a pickle, not safetensors: refused, never unpickled
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(copy)


def test_tensors_that_do_not_fit_the_config(saved, tmp_path):
    copy = copy_checkpoint(saved, tmp_path)
    meta = json.loads(json.dumps(saved[2]))
    meta["classifier"]["num_classes"] = 4
    meta["classes"] = {"ids": [1, 2, 3, 4], "names": ["cat", "dog", "fox", "owl"]}
    checkpoint_paths(copy)[1].write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not fit its config.*(bbox_pred|cls_score)"):
        build_classifier_from_checkpoint(copy)
    meta["classes"] = VOCAB.to_dict()  # 3 names for 4 classes
    checkpoint_paths(copy)[1].write_text(json.dumps(meta))
    with pytest.raises(UserError, match="3 classes"):
        build_classifier_from_checkpoint(copy)
    del meta["classifier"]
    checkpoint_paths(copy)[1].write_text(json.dumps(meta))
    with pytest.raises(UserError, match="no 'classifier' section"):
        build_classifier_from_checkpoint(copy)


def test_unserializable_config_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "x", {"w": torch.zeros(2)}, {"bad": object()})
    assert list(tmp_path.iterdir()) == []
