"""Checkpoints: safetensors + JSON round trip, atomic files, refusal of missing/corrupt/mismatched ones."""

import json

import pytest
import torch

from detector.base.checkpoint import (
    DEFAULT_MODEL,
    ModelInfo,
    checkpoint_paths,
    load_checkpoint,
    make_checkpoint_config,
    model_info,
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


@pytest.mark.numeric
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


def test_model_info_reads_the_json_alone(saved, tmp_path):
    path, _, meta = saved
    assert model_info(path) == ModelInfo(name=None, description="", class_names=("cat", "dog", "fox"))
    assert model_info(path).summary() == "3 classes (cat, dog, fox)"
    named = tmp_path / "named"
    checkpoint_paths(named)[1].write_text(json.dumps(meta | {"name": "pets", "description": "Cats, dogs."}))
    info = model_info(named)  # no weights needed: only the JSON is read
    assert (info.name, info.description, info.summary(), info.short()) == (
        "pets", "Cats, dogs.", "pets, 3 classes (cat, dog, fox)", "pets")
    checkpoint_paths(named)[1].write_text(json.dumps(meta | {"classes": {"ids": [1]}}))
    with pytest.raises(UserError, match="no list of names"):
        model_info(named)


def test_the_default_model_says_what_it_detects():
    info = model_info(DEFAULT_MODEL)
    assert info.name == "chess pieces" and "chess" in info.description and len(info.class_names) == 13


def test_classes_text_lists_what_fits_then_how_many_more():
    names = tuple(f"class{i:03d}" for i in range(200))  # 8 characters each, 10 with the separator
    text = ModelInfo(None, "", names).classes_text(max_chars=50)
    # five names take 5 * 8 + 4 * 2 = 48 characters; a sixth would make 58 > 50
    assert text == "200 classes (class000, class001, class002, class003, class004, ... 195 more)"
    assert ModelInfo(None, "", ("one",)).classes_text() == "1 class (one)"
