"""The proposal store (proposals/store.py)."""

from __future__ import annotations

import numpy as np
import pytest

from detector.errors import UserError
from proposals import ProposalStore
from proposals.store import (
    QUANT,
    ImageProposals,
    Part,
    compact,
    decode_boxes,
    encode_boxes,
    merge,
    part_files,
    write_part,
)

META = {"method": "ss-fast", "options": {}}


def random_entries(n, seed=0, prefix="img", scores=False):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(50, 1200, 2))
        xy = rng.random((int(rng.integers(0, 40)), 2, 2)) * [w, h]
        boxes = np.concatenate([xy.min(1), xy.max(1)], axis=1)
        out.append(ImageProposals(f"{prefix}{i:03d}.jpg", (h, w), encode_boxes(boxes, (h, w)),
                                  rng.random(len(boxes)).astype(np.float16) if scores else None))
    return out


def test_encoding_error_is_below_half_a_step():
    # A step is w / 65535 pixels; rounding is off by at most half a step.
    h, w = 375, 500
    boxes = np.array([[0, 0, 500, 375], [10.3, 20.7, 499.99, 100.01], [123.456, 0.5, 124.0, 1.0]])
    back = decode_boxes(encode_boxes(boxes, (h, w)), (h, w))
    assert back.dtype == np.float32
    assert np.abs(back - boxes).max() <= 0.5 * w / QUANT + 1e-4
    assert np.array_equal(back[0], [0, 0, 500, 375])  # the image border is exact
    # Outside the image is clipped to it.
    assert np.array_equal(decode_boxes(encode_boxes([[-5, -5, 600, 400]], (h, w)), (h, w))[0], [0, 0, 500, 375])


def test_write_and_read_back(tmp_path):
    entries = random_entries(20, scores=True) + [ImageProposals("broken.jpg", error="cannot read image: truncated")]
    write_part(tmp_path / "a.pstore", entries, META)
    store = ProposalStore(tmp_path)
    assert len(store) == 20 and store.meta == META
    assert store.failures == {"broken.jpg": "cannot read image: truncated"}
    for e in entries[:20]:
        boxes, scores = store[e.name]
        np.testing.assert_array_equal(boxes, decode_boxes(e.boxes, e.image_size))
        np.testing.assert_array_equal(scores, e.scores.astype(np.float32))
        assert store.image_size(e.name) == e.image_size
    with pytest.raises(KeyError, match="truncated"):
        store["broken.jpg"]
    with pytest.raises(KeyError, match="no proposals"):
        store["absent.jpg"]
    assert store.num_boxes() == sum(len(e.boxes) for e in entries[:20])
    assert isinstance(Part(tmp_path / "a.pstore").boxes, np.memmap)  # read lazily from the file


def test_lookup_with_or_without_extension(tmp_path):
    rng_boxes = encode_boxes([[1, 2, 30, 40]], (50, 60))
    write_part(tmp_path / "p.pstore", [ImageProposals("ILSVRC2013_val_00000001", (50, 60), rng_boxes),
                                       ImageProposals("sub/x.jpg", (50, 60), rng_boxes)], META)
    store = ProposalStore(tmp_path / "p.pstore")  # one part file opens too
    assert "ILSVRC2013_val_00000001.JPEG" in store and "sub/x" in store and "x" not in store
    assert store["ILSVRC2013_val_00000001.JPEG"][1] is None  # no scores stored


def test_at_most_ten_bytes_per_box(tmp_path):
    rng = np.random.default_rng(1)
    entries = [ImageProposals(f"n{i:05d}", (375, 500), rng.integers(0, 65535, (2000, 4)).astype(np.uint16),
                              rng.random(2000).astype(np.float16)) for i in range(50)]
    path = write_part(tmp_path / "s.pstore", entries, META)
    assert path.stat().st_size / (50 * 2000) <= 10.05  # 8 bytes of box + 2 of score, plus the index
    plain = write_part(tmp_path / "b.pstore", [ImageProposals(e.name, e.image_size, e.boxes) for e in entries], META)
    assert plain.stat().st_size / (50 * 2000) <= 8.05


def test_damaged_parts_are_refused_with_one_line(tmp_path):
    path = write_part(tmp_path / "a.pstore", random_entries(5), META)
    data = path.read_bytes()
    (tmp_path / "t.pstore").write_bytes(data[: len(data) - 20])
    with pytest.raises(UserError, match="truncated"):
        Part(tmp_path / "t.pstore")
    (tmp_path / "m.pstore").write_bytes(b"NOTASTORE" + data)
    with pytest.raises(UserError, match="magic"):
        Part(tmp_path / "m.pstore")
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic writer left no temporary file


def test_merge_is_sorted_and_independent_of_split_and_order(tmp_path):
    entries = random_entries(30)
    write_part(tmp_path / "x" / "1.pstore", entries[:10] + entries[20:], META)
    write_part(tmp_path / "x" / "2.pstore", entries[10:20], META)
    write_part(tmp_path / "y" / "1.pstore", entries[::-1], META)  # all in one part, reversed
    one = merge([tmp_path / "x"], tmp_path / "m1")
    two = merge([tmp_path / "y"], tmp_path / "m2")
    assert one.name == two.name and one.read_bytes() == two.read_bytes()
    store = ProposalStore(one)
    assert store.names() == sorted(e.name for e in entries)


def test_success_beats_recorded_failure_and_compact_keeps_everything(tmp_path):
    entries = random_entries(6)
    write_part(tmp_path / "a.pstore", entries[:3] + [ImageProposals(entries[3].name, error="timeout")], META)
    write_part(tmp_path / "b.pstore", entries[3:], META)
    before = ProposalStore(tmp_path)
    assert len(before) == 6 and before.failures == {}
    target = compact(tmp_path)
    assert part_files(tmp_path) == [target]
    after = ProposalStore(tmp_path)
    assert after.names() == before.names() and after.failures == {}
    for name in before:
        np.testing.assert_array_equal(after[name][0], before[name][0])


def test_parts_of_different_methods_are_not_mixed(tmp_path):
    write_part(tmp_path / "a.pstore", random_entries(2), META)
    write_part(tmp_path / "b.pstore", random_entries(2, prefix="o"), {"method": "ss-quality", "options": {}})
    with pytest.raises(UserError, match="different"):
        ProposalStore(tmp_path)
    with pytest.raises(UserError, match="different"):
        merge([tmp_path], tmp_path / "out")
