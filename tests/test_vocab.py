"""The shipped ILSVRC DET vocabulary equals the devkit's meta_det.mat."""

import pytest

from detector.base.vocab import Vocabulary, ilsvrc_det_vocabulary, read_meta_det


def test_shipped_vocabulary_matches_meta_det(devkit):
    shipped = ilsvrc_det_vocabulary()
    from_mat = read_meta_det(devkit / "data" / "meta_det.mat")
    assert shipped.ids == tuple(range(1, 201))
    assert shipped == from_mat
    # Spot checks against the devkit's readme/meta: DET id 1 is 'accordion' (n02672831).
    assert shipped.names[0] == "accordion"
    assert shipped.wnids[0] == "n02672831"


def test_labels_ids_and_names():
    v = Vocabulary(ids=(5, 9, 2), names=("a", "b", "c"))
    assert v.num_classes == 3
    assert v.label_of_id(9) == 2 and v.id_of_label(2) == 9
    assert v.name_of_label(0) == "background" and v.name_of_label(3) == "c"
    assert v.label_of_name("a") == 1
    with pytest.raises(KeyError):
        v.label_of_id(7)
    assert Vocabulary.from_dict(v.to_dict()) == v


def test_vocabulary_rejects_duplicates():
    with pytest.raises(ValueError):
        Vocabulary(ids=(1, 1), names=("a", "b"))
