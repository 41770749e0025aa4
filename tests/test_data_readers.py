"""Dataset readers on the real data in ../shared/data and on small hand-written files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detector.base.boxes import xyxy_to_coco, xyxy_to_voc
from detector.base.errors import UserError
from detector.data import (
    read_blacklist,
    read_coco,
    read_ilsvrc_det,
    read_image_list,
    read_split_in_val,
    read_voc,
    train_pos_list,
)

VAL2 = "ilsvrc13_val2"


def _xml(objects, size=(368, 500)) -> str:
    body = "".join(
        f"<object><name>{name}</name><difficult>{int(diff)}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b, diff in objects)
    return (f"<annotation><filename>x</filename><size><width>{size[1]}</width><height>{size[0]}</height></size>"
            f"{body}</annotation>")


# --- ILSVRC DET -------------------------------------------------------------------------------------

def test_val2_counts_match_the_readme(devkit):
    # ../shared/data/README.md: 9,917 images, 26,782 objects, 677 images without objects.
    ds = read_ilsvrc_det(devkit / VAL2 / "val2_in_val_ids.txt", devkit / VAL2 / "Annotations",
                         blacklist=devkit / "data" / "ILSVRC2014_det_validation_blacklist.txt")
    assert len(ds) == 9917
    assert sum(len(r.gt_boxes) for r in ds) == 26782
    assert sum(len(r.gt_boxes) == 0 for r in ds) == 677
    assert len({r.image_id for r in ds}) == 9917
    # The blacklist names no val2 image (checked by grep on the two lists), so none is kept.
    assert ds.blacklist == frozenset()


def test_first_val2_record_goes_through_voc_conversion(devkit):
    # ILSVRC2012_val_00000006.xml: one n01726692 (DET id 159) at xmin 105, ymin 204, xmax 358, ymax 279,
    # image 500 wide, 368 high; its val id is 2.
    ds = read_ilsvrc_det([("ILSVRC2012_val_00000006", 2)], devkit / VAL2 / "Annotations")
    rec = ds[0]
    assert rec.image_id == 2 and rec.image_size == (368, 500)
    assert rec.file_name == "ILSVRC2012_val_00000006.JPEG"
    np.testing.assert_array_equal(rec.gt_boxes, [[104, 203, 358, 279]])
    np.testing.assert_array_equal(xyxy_to_voc(rec.gt_boxes), [[105, 204, 358, 279]])
    assert rec.gt_labels.tolist() == [159] and ds.vocab.wnids[158] == "n01726692"


def test_val2_split_maps_to_val_ids(devkit):
    mapped = read_split_in_val(devkit / VAL2 / "ilsvrc13_val2.txt", devkit / "data" / "det_lists" / "val.txt")
    expected = read_image_list(devkit / VAL2 / "val2_in_val_ids.txt")
    assert sorted(mapped, key=lambda p: p[1]) == expected


def test_train_pos_and_blacklist(devkit):
    names = train_pos_list(devkit / "data" / "det_lists", 1)
    assert names[0] == "ILSVRC2014_train_0000/ILSVRC2014_train_00002439"
    pairs = read_blacklist(devkit / "data" / "ILSVRC2014_det_validation_blacklist.txt")
    # First line: "46 n00007846" (n00007846 = person, DET id 124).
    assert (46, 124) in pairs and len(pairs) <= 409


def test_ilsvrc_errors_name_file_and_line(tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "a.xml").write_text(_xml([("n02672831", (1, 1, 10, 10), False)]))
    (ann / "b.xml").write_text(_xml([("n99999999", (1, 1, 10, 10), False)]))
    lst = tmp_path / "list.txt"
    lst.write_text("a 1\nc 2\n")
    with pytest.raises(UserError, match="c.xml: annotation file not found"):
        read_ilsvrc_det(lst, ann)
    lst.write_text("a 1\nb 2\n")
    with pytest.raises(UserError, match="b.xml: object name n99999999"):
        read_ilsvrc_det(lst, ann)
    lst.write_text("a 1\nb 1\n")
    with pytest.raises(UserError, match=r"list.txt:2: duplicate image id 1"):
        read_ilsvrc_det(lst, ann)
    lst.write_text("a one\n")
    with pytest.raises(UserError, match=r"list.txt:1: image id 'one' is not an integer"):
        read_image_list(lst)
    bl = tmp_path / "bl.txt"
    bl.write_text("1 n02672831\n2 n12345678\n")
    with pytest.raises(UserError, match=r"bl.txt:2: wnid n12345678"):
        read_blacklist(bl)
    (ann / "bad.xml").write_text("<annotation><object><name>n02672831</name><bndbox><xmin>a</xmin></bndbox>")
    with pytest.raises(UserError, match="bad.xml: not valid XML"):
        read_ilsvrc_det([("bad", 1)], ann)


def test_image_without_objects_and_blacklist_kept_for_listed_images(tmp_path):
    (tmp_path / "e.xml").write_text("<annotation><size><width>4</width><height>3</height></size></annotation>")
    ds = read_ilsvrc_det([("e", 7)], tmp_path, blacklist=[(7, 3), (8, 3)])
    assert ds[0].gt_boxes.shape == (0, 4) and ds[0].gt_labels.shape == (0,) and ds[0].image_size == (3, 4)
    assert ds.blacklist == frozenset({(7, 3)})


# --- PASCAL VOC -------------------------------------------------------------------------------------

def test_bccd_voc(shared_data):
    ds = read_voc(shared_data / "bccd", "test")
    assert len(ds) == 72
    assert ds.vocab.names == ("Platelets", "RBC", "WBC")
    assert ds.image_path(ds[0]).is_file()
    first = read_voc(shared_data / "bccd", "trainval")
    rec = next(r for r in first if r.image_id == "BloodImage_00000")
    # BloodImage_00000.xml: first object WBC at 260 177 491 376 (1-based inclusive), 640x480.
    assert rec.image_size == (480, 640)
    np.testing.assert_array_equal(xyxy_to_voc(rec.gt_boxes[:1]), [[260, 177, 491, 376]])
    assert ds.vocab.name_of_label(int(rec.gt_labels[0])) == "WBC"


def test_voc_difficult_and_class_names(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "Annotations" / "i1.xml").write_text(_xml([("dog", (1, 2, 3, 4), True), ("cat", (5, 6, 7, 8), False)]))
    (tmp_path / "ImageSets" / "Main" / "val.txt").write_text("i1\n")
    ds = read_voc(tmp_path, "val")
    assert ds.vocab.names == ("cat", "dog")
    assert ds[0].difficult.tolist() == [True, False] and ds[0].gt_labels.tolist() == [2, 1]
    np.testing.assert_array_equal(ds[0].gt_boxes, [[0, 1, 3, 4], [4, 5, 7, 8]])
    ds = read_voc(tmp_path, "val", class_names=["dog", "cat", "bird"])
    assert ds[0].gt_labels.tolist() == [1, 2]
    with pytest.raises(UserError, match="'cat' is not in the vocabulary"):
        read_voc(tmp_path, "val", class_names=["dog"])
    with pytest.raises(UserError, match="test.txt: split list not found"):
        read_voc(tmp_path, "test")


# --- COCO -------------------------------------------------------------------------------------------

def test_chess_vocabulary_is_the_same_13_classes_in_every_split(chess):
    vocabs = [read_coco(chess / split / "_annotations.coco.json").vocab for split in ("train", "valid", "test")]
    assert vocabs[0] == vocabs[1] == vocabs[2]
    assert vocabs[0].num_classes == 13 and "pieces" not in vocabs[0].names
    assert vocabs[0].ids == tuple(range(1, 14))
    ds = read_coco(chess / "train" / "_annotations.coco.json")
    assert len(ds) == 202 and sum(len(r.gt_boxes) for r in ds) == 2108
    assert ds.image_path(ds[0]).is_file()


def test_coco128_round_trip_and_iscrowd(shared_data):
    path = shared_data / "coco128" / "annotations" / "instances.json"
    ds = read_coco(path, image_root=shared_data / "coco128" / "images")
    data = json.loads(path.read_text())
    assert len(ds) == 128 and ds.vocab.num_classes == 80
    assert sum(int(r.iscrowd.sum()) for r in ds) == sum(a["iscrowd"] for a in data["annotations"])
    ann = data["annotations"][0]
    rec = next(r for r in ds if r.image_id == ann["image_id"])
    anns = [a for a in data["annotations"] if a["image_id"] == ann["image_id"]]
    np.testing.assert_allclose(xyxy_to_coco(rec.gt_boxes), [a["bbox"] for a in anns], atol=1e-3)
    assert [ds.vocab.id_of_label(int(lab)) for lab in rec.gt_labels] == [a["category_id"] for a in anns]
    assert ds.image_path(rec).is_file()


def test_coco_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(UserError, match="bad.json: not valid JSON"):
        read_coco(bad)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "a"}],
                               "annotations": [{"id": 5, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(UserError, match="annotation 5 names image 2"):
        read_coco(bad)
