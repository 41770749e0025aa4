"""The proposal store (proposals/store.py)."""

from __future__ import annotations

import numpy as np
import pytest

from detector.base.errors import UserError
from proposals import ProposalStore
from proposals.store import (
    QUANT,
    ImageProposals,
    Part,
    clean_temporary,
    compact,
    decode_boxes,
    encode_boxes,
    merge,
    part_files,
    verify,
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
    part = Part(tmp_path / "a.pstore")
    assert not part.boxes.flags.owndata and not part.boxes.flags.writeable  # read lazily from the file (its map)


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


# ----------------------------------------------------------------------------------------------------
# damage: nothing read from a part is trusted


def read_all(path):
    """Everything a reader can get from a store: names, failures, meta, and every image's arrays."""
    store = ProposalStore(path)
    images = {}
    for name in store:
        boxes, scores = store[name]
        images[name] = (boxes.tobytes(), None if scores is None else scores.tobytes(), store.image_size(name))
    return images, store.failures, store.meta


def covered_bytes(data: bytes) -> np.ndarray:
    """A mask of the bytes of a part that carry content (prefix, header, arrays), not alignment padding."""
    import json
    import struct

    (length,) = struct.unpack("<Q", data[8:16])
    header = json.loads(data[32:32 + length])
    start = -(-(32 + length) // 64) * 64
    mask = np.zeros(len(data), bool)
    mask[: 32 + length] = True
    for spec in header["arrays"].values():
        lo = start + spec["offset"]
        mask[lo: lo + int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize] = True
    return mask


def test_every_flipped_byte_is_refused_in_one_line_or_changes_nothing(tmp_path):
    # Four images with scores and one failure: every byte of the file, flipped in turn (boxes, scores,
    # offsets, sizes, names, CRCs, the header and its length and digest), must give a one-line error
    # naming the file (on opening or on the lookup), or read back exactly as before (alignment padding).
    entries = random_entries(4, seed=3, scores=True) + [ImageProposals("gone.jpg", error="unreadable")]
    data = write_part(tmp_path / "good.pstore", entries, META).read_bytes()
    expect = read_all(tmp_path / "good.pstore")
    content = covered_bytes(data)
    bad = tmp_path / "bad.pstore"
    harmless = []
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0xFF
        bad.write_bytes(bytes(flipped))
        try:
            got = read_all(bad)
        except UserError as err:
            assert str(bad) in str(err) and "\n" not in str(err) and "damaged" in str(err)
            continue
        assert got == expect, f"byte {i} flipped: read as good data"
        harmless.append(i)
    assert not content[harmless].any()  # only padding flips go unseen, and they change nothing
    assert content.sum() > 0.8 * len(data)


def test_every_truncation_is_refused(tmp_path):
    data = write_part(tmp_path / "good.pstore", random_entries(3, seed=4, scores=True), META).read_bytes()
    bad = tmp_path / "cut.pstore"
    for length in [*range(0, len(data), 3), len(data) - 1]:  # every third length, and one byte short
        bad.write_bytes(data[:length])
        with pytest.raises(UserError, match="damaged proposal store part"):
            read_all(bad)


def test_flipped_padding_is_found_by_verify_in_a_digest_named_part(tmp_path):
    write_part(tmp_path / "s" / "a.pstore", random_entries(3, seed=5), META)
    part = compact(tmp_path / "s")  # part-<digest of the file>.pstore
    data = bytearray(part.read_bytes())
    pad = np.flatnonzero(~covered_bytes(bytes(data)))[0]
    data[pad] ^= 1
    part.write_bytes(bytes(data))
    read_all(part)  # the content is intact ...
    report = verify(tmp_path / "s")  # ... but the file is not the one its name promises
    assert list(report.damaged) == [part] and "digest" in report.damaged[part]


def first_format_part(path, header_edit=None):
    """A part of the first format (``PSTORE01``: no checksums), written by hand, its header edited."""
    import json
    import struct

    names = b"a.jpg\nb.jpg"
    arrays = {"names": np.frombuffer(names, np.uint8), "sizes": np.array([[10, 20], [30, 40]], np.int32),
              "offsets": np.array([0, 1, 3], np.int64), "boxes": np.arange(12, dtype=np.uint16).reshape(3, 4)}
    layout, offset = {}, 0
    for key, arr in arrays.items():
        offset = -(-offset // 64) * 64
        layout[key] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset}
        offset += arr.nbytes
    where = {key: spec["offset"] for key, spec in layout.items()}  # where the arrays go, whatever the header says
    header = {"version": 1, "arrays": layout, "meta": META, "failures": {}}
    if header_edit:
        header_edit(header)
    raw = json.dumps(header).encode()
    start = -(-(16 + len(raw)) // 64) * 64
    out = bytearray(b"PSTORE01" + struct.pack("<Q", len(raw)) + raw)
    for key, arr in arrays.items():
        out += b"\0" * (start + where[key] - len(out)) + arr.tobytes()
    path.write_bytes(bytes(out))
    return path


@pytest.mark.parametrize("edit, reason", [
    (lambda h: h["arrays"]["boxes"].update(shape=[10 ** 12, 4]), "truncated"),  # was a MemoryError
    (lambda h: h["arrays"]["sizes"].update(shape=[3, 2]), "do not agree"),
    (lambda h: h["arrays"].update(boxes={**h["arrays"]["boxes"], "shape": [10 ** 12, 4]},
                                  offsets={**h["arrays"]["offsets"], "shape": [10 ** 12 + 1]},
                                  sizes={**h["arrays"]["sizes"], "shape": [10 ** 12, 2]}), "overlap"),
    (lambda h: h["arrays"]["offsets"].update(offset=h["arrays"]["sizes"]["offset"]), "overlap"),
    (lambda h: h["arrays"]["sizes"].update(dtype="<f8"), "malformed entry"),
    (lambda h: h["arrays"].pop("offsets"), "array table"),
    (lambda h: h.update(failures={"a.jpg": "x"}), "names"),
    (lambda h: h.update(failures=["x"]), "failures"),
])
def test_first_format_layout_is_checked_before_use(tmp_path, edit, reason):
    store = ProposalStore(first_format_part(tmp_path / "ok.pstore"))  # no checksums, but read
    assert store["b.jpg"][0].shape == (2, 4) and verify(tmp_path / "ok.pstore").unchecked
    with pytest.raises(UserError, match=reason):
        ProposalStore(first_format_part(tmp_path / "bad.pstore", edit))


@pytest.mark.parametrize("offsets, reason", [([0, 3, 1], "offsets"), ([0, 1, 4], "offsets"),
                                             ([1, 1, 3], "offsets")])
def test_first_format_offsets_are_checked(tmp_path, offsets, reason):
    path = first_format_part(tmp_path / "p.pstore")
    data = bytearray(path.read_bytes())
    at = data.index(np.array([0, 1, 3], np.int64).tobytes())
    data[at: at + 24] = np.array(offsets, np.int64).tobytes()  # was another image's boxes, or an IndexError
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=reason):
        ProposalStore(path)


def test_temporary_files_of_killed_writers_are_cleaned_live_ones_kept(tmp_path):
    import fcntl
    import os

    stale = tmp_path / ".part.killed.tmp"
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / ".part.live.tmp"
    fd = os.open(live, os.O_CREAT | os.O_WRONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer at work holds its file locked
    try:
        assert clean_temporary(tmp_path) == [stale]
        assert live.exists() and not stale.exists()
    finally:
        os.close(fd)
    assert clean_temporary(tmp_path) == [live]


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import os

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("proposals.part.os.fsync", full)
    with pytest.raises(UserError, match="a.pstore: cannot write .*No space left on device.*free some space"):
        write_part(tmp_path / "a.pstore", random_entries(3), META)
    assert list(tmp_path.iterdir()) == []


def test_merge_refuses_to_copy_a_damaged_part(tmp_path):
    path = write_part(tmp_path / "s" / "a.pstore", random_entries(3, seed=6), META)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # in the CRCs, the last array (3 images: its last 12 bytes)
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch"):
        merge([tmp_path / "s"], tmp_path / "out")
    assert not list((tmp_path / "out").glob("*"))  # nothing written, the damage not laundered into a new part


# ----------------------------------------------------------------------------------------------------
# many parts under a low limit of open files (issue 17), and parts of another store (issue 18)


def write_store(folder, num_parts, per_part=1, seed=0, meta=META, settings=True):
    """A store folder as precompute leaves it: ``store.json`` and parts named ``chunk-<c>-<tag>-<digest>``
    (the digest every reader checks), ``per_part`` images each. Returns the parts."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    if settings:
        (folder / "store.json").write_text(json.dumps({"format": "proposal-store", "settings": meta}))
    entries = random_entries(num_parts * per_part, seed=seed)
    return [write_part(lambda digest, c=c: folder / f"chunk-{c:07d}-00000000-{digest}.pstore",
                       entries[c * per_part:(c + 1) * per_part], meta) for c in range(num_parts)]


LOW_LIMIT = """
import os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))  # the soft and the hard limit: 64 open files
from proposals.store import ProposalStore, compact, verify
folder = sys.argv[1]
store = ProposalStore(folder)
names = store.names()
boxes = [store[name][0].sum() for name in names] + [store[name][0].sum() for name in names[::-7]]
most = len(os.listdir("/proc/self/fd"))
report = verify(folder)
assert not report.damaged and report.parts == store.num_parts, report
compact(folder)
after = ProposalStore(folder)
assert after.names() == names and [after[name][0].sum() for name in names] == boxes[:len(names)]
print(len(names), store.num_parts, store.max_open_parts, store.open_parts, most, after.num_parts)
"""


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_many_parts_open_read_verify_and_compact_under_a_low_file_limit(tmp_path, monkeypatch):
    # 600 parts under RLIMIT_NOFILE = 64: every part was opened at once before (Errno 24 from 60 parts
    # on). Now at most max_open_parts = 64 // 8 = 8 parts are mapped at a time, and verify and compaction
    # open one part (plus the one written) at a time.
    import subprocess
    import sys
    from pathlib import Path

    monkeypatch.setattr("proposals.part.os.fsync", lambda fd: None)  # synthetic parts, written fast
    write_store(tmp_path / "s", 600)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", LOW_LIMIT, str(tmp_path / "s")], capture_output=True, text=True,
                            cwd=root, timeout=120)
    assert result.returncode == 0, result.stderr
    images, parts, max_open, still_open, most_files, parts_after = map(int, result.stdout.split())
    assert (images, parts, max_open, parts_after) == (600, 600, 8, 1)
    assert still_open == max_open and most_files <= max_open + 16  # 16: the interpreter's own files


def test_open_parts_are_bounded_and_reads_are_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr("proposals.part.os.fsync", lambda fd: None)
    write_store(tmp_path / "s", 40, per_part=3)
    small, whole = ProposalStore(tmp_path / "s", max_open_parts=2), ProposalStore(tmp_path / "s", max_open_parts=64)
    rng = np.random.default_rng(0)
    names = small.names()
    for i in rng.integers(0, len(names), 300):  # random order: most lookups open their part again
        got, want = small[names[i]], whole[names[i]]
        np.testing.assert_array_equal(got[0], want[0])
        assert small.image_size(names[i]) == whole.image_size(names[i])
        assert small.open_parts <= 2
    assert small.num_boxes() == whole.num_boxes() and len(small) == 120


def test_a_part_of_another_store_in_its_place_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    # issue 18: two stores of the same images with the same settings (say, two datasets that name their
    # images alike); a part of one copied over a part of the other, under its name, is a valid part: it
    # was read, and gave the other store's boxes. Its digest differs from the digest its name promises.
    import shutil

    from detector.base.cli import run_tool
    from proposals.store import ForeignPart

    ours, theirs = write_store(tmp_path / "a", 3, per_part=2, seed=1), write_store(tmp_path / "b", 3, per_part=2, seed=2)
    store = ProposalStore(tmp_path / "a", max_open_parts=1)
    before = store[store.names()[0]][0]
    store[store.names()[-1]]  # the first part is closed now (one map at a time)
    shutil.copyfile(theirs[0], ours[0])  # same names, other boxes
    with pytest.raises(ForeignPart) as err:  # read again after the swap: checked when its part is opened again
        store[store.names()[0]]
    for opened in (lambda: ProposalStore(tmp_path / "a"), lambda: ProposalStore(tmp_path / "a")[store.names()[0]]):
        with pytest.raises(ForeignPart) as err:
            opened()
        message = str(err.value)
        assert message.startswith(f"{ours[0]}: not a part of this proposal store (its digest is ")
        assert "\n" not in message and "delete it, or rerun tools/precompute_proposals.py" in message
    assert list(verify(tmp_path / "a").damaged) == [ours[0]]
    assert not np.array_equal(before, ProposalStore(tmp_path / "b")[store.names()[0]][0])  # a real difference

    # a part made with other settings, under its own (right) name: store.json says what the store holds
    ours[0].unlink()
    other = write_store(tmp_path / "c", 1, seed=3, meta={"method": "ss-quality", "options": {}})[0]
    shutil.copyfile(other, tmp_path / "a" / other.name)
    with pytest.raises(ForeignPart, match=f"{tmp_path / 'a' / other.name}: not a part of this proposal store "
                                          r"\(made with .*ss-quality.*, the store with .*ss-fast"):
        ProposalStore(tmp_path / "a")

    # detect.py --proposals and training: the same one line, exit 2, before any work
    from PIL import Image

    from detector import pipeline
    from detector.apps import detect as detect_tool
    from detector.training.rcnn import ProposalConfig, proposal_settings

    monkeypatch.setattr(pipeline, "load_detector", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    Image.new("RGB", (24, 16)).save(tmp_path / "x.jpg")
    assert run_tool(detect_tool.main, [str(tmp_path / "x.jpg"), "--proposals", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'a' / other.name}: not a part of this proposal store" in err
    with pytest.raises(ForeignPart):
        proposal_settings(ProposalConfig(store=str(tmp_path / "a")))


def test_one_compaction_at_a_time(tmp_path, monkeypatch):
    from proposals.store import compaction_lock

    monkeypatch.setattr("proposals.part.os.fsync", lambda fd: None)
    parts = write_store(tmp_path / "s", 5)
    with compaction_lock(tmp_path / "s") as held:  # another process compacting, as far as compact can tell
        assert held
        assert compact(tmp_path / "s") is None and part_files(tmp_path / "s") == parts
    target = compact(tmp_path / "s")
    assert part_files(tmp_path / "s") == [target] and len(ProposalStore(tmp_path / "s")) == 5
