"""Batch precomputation (proposals/precompute.py, tools/precompute_proposals.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.apps.precompute_proposals import main as tool_main
from detector.base.cli import run_tool
from detector.base.errors import UserError
from detector.base.jobs import Shard
from proposals import ProposalStore
from proposals.precompute import PrecomputeConfig, list_file, list_images, precompute
from proposals.store import part_files

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = (("max_side", 96),)  # small working size: quick, same code path


@pytest.fixture(scope="module")
def images(tmp_path_factory, shared_data):
    """Ten real photos (copied from coco128 at 160 px) and two broken files."""
    folder = tmp_path_factory.mktemp("images")
    sources = sorted((shared_data / "coco128" / "images").glob("*.jpg"))[:10]
    for i, src in enumerate(sources):
        img = Image.open(src).convert("RGB")
        img.thumbnail((160, 160))
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        img.save(sub / src.name, quality=90)
    data = sources[0].read_bytes()
    (folder / "b" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "b" / "notes.png").write_text("not an image")
    return folder


def run(images, out, **kw):
    config = PrecomputeConfig(options=OPTIONS, chunk_size=kw.pop("chunk_size", 3), **kw)
    return precompute(list_images(images), out, config, progress=False)


def only_part(store_dir):
    files = part_files(store_dir)
    assert len(files) == 1 and files[0].name.startswith("part-")
    return files[0]


def test_listing_folder_and_list_file(images, tmp_path):
    entries = list_images(images)
    assert len(entries) == 12 and entries[0].name.startswith("a/")
    assert [e.name for e in entries] == sorted(e.name for e in entries)
    # An ILSVRC-style list: "<name without extension> <id>", resolved against an image root.
    stem = entries[0].name[:-4]
    (tmp_path / "list.txt").write_text(f"{stem} 1\n\n# comment\n{entries[1].name} 2\n")
    listed = list_file(tmp_path / "list.txt", image_root=images)
    assert [e.name for e in listed] == [stem, entries[1].name]
    report = precompute(listed, tmp_path / "store", PrecomputeConfig(options=OPTIONS), progress=False)
    assert report.done == 2 and not report.failures
    assert stem + ".jpg" in ProposalStore(tmp_path / "store")


def test_one_run_records_failures_and_goes_on(images, tmp_path):
    report = run(images, tmp_path / "s")
    assert report.complete and report.done == 12
    assert set(report.failures) == {"b/truncated.jpg", "b/notes.png"}
    assert "not an image" in report.failures["b/notes.png"] or "Pillow" in report.failures["b/notes.png"]
    store = ProposalStore(tmp_path / "s")
    assert len(store) == 10 and set(store.failures) == set(report.failures)
    only_part(tmp_path / "s")
    # The stored boxes are the proposals of the image, to within the storage step.
    from detector.base.io import load_image
    from proposals import propose

    name = store.names()[3]
    expect = propose(load_image(images / name), "ss-fast", max_side=96)
    got, scores = store[name]
    assert scores is None and got.shape == expect.shape
    assert np.abs(got - expect).max() <= 160 / 65535


def test_tool_exit_codes_and_strict(images, tmp_path, capsys):
    out = str(tmp_path / "t")
    assert tool_main([str(images), "--out", out, "--max-side", "96", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "2 failed" in printed.out and "failed: b/truncated.jpg" in printed.err  # failures on stderr
    # Rerun: nothing to do, the failures are listed again; --strict turns them into exit 1.
    assert tool_main([str(images), "--out", out, "--max-side", "96", "--no-progress", "--strict"]) == 1
    assert "12 already done" in capsys.readouterr().out


def test_failures_are_retried_with_retry_failed(images, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = sorted((images / "a").glob("*.jpg"))[:2]
    for src in good:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "late.jpg").write_bytes(good[0].read_bytes()[:100])  # still being copied: truncated
    argv = [str(folder), "--out", str(tmp_path / "s"), "--max-side", "96", "--no-progress"]
    assert tool_main(argv) == 0
    err = capsys.readouterr().err
    assert "failed: late.jpg" in err and "rerun with --retry-failed" in err
    (folder / "late.jpg").write_bytes(good[0].read_bytes())  # the copy has finished
    assert tool_main(argv) == 0 and "failed: late.jpg" in capsys.readouterr().err  # recorded: not tried again
    assert tool_main([*argv, "--retry-failed", "--json", str(tmp_path / "r.json")]) == 0
    assert "1 processed" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["skipped"], report["done"], report["failed"], report["complete"]) == (2, 1, 0, True)
    store = ProposalStore(tmp_path / "s")
    assert "late.jpg" in store and not store.failures
    np.testing.assert_array_equal(store["late.jpg"][0], store[good[0].name][0])  # the same photo


def test_shards_merged_equal_one_run(images, tmp_path):
    run(images, tmp_path / "whole")
    for k in range(3):
        report = run(images, tmp_path / f"shard{k}", shard=(k, 3))
        assert report.complete
    assert tool_main(["--merge", *(str(tmp_path / f"shard{k}") for k in range(3)), "--out", str(tmp_path / "m")]) == 0
    whole, merged = only_part(tmp_path / "whole"), only_part(tmp_path / "m")
    assert whole.name == merged.name and whole.read_bytes() == merged.read_bytes()


def test_two_workers_equal_one(images, tmp_path):
    run(images, tmp_path / "one")
    run(images, tmp_path / "two", workers=2)
    assert only_part(tmp_path / "one").read_bytes() == only_part(tmp_path / "two").read_bytes()


def command(images, out, *extra):
    return [sys.executable, str(ROOT / "tools" / "precompute_proposals.py"), str(images), "--out", str(out),
            "--max-side", "96", "--chunk-size", "1", "--no-progress", *extra]


def test_resume_after_kill_equals_uninterrupted(images, tmp_path):
    run(images, tmp_path / "ref", chunk_size=1)
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # kill -9 as soon as the first one-image chunk is on disk, while the other images are in flight.
    proc = subprocess.Popen(command(images, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.is_dir() and any(out.glob("chunk-*.pstore"))):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = ProposalStore(out)
    assert 1 <= len(partial) + len(partial.failures) < 12, "the run finished before it was killed"
    subprocess.run(command(images, out), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert only_part(out).read_bytes() == only_part(tmp_path / "ref").read_bytes()
    assert not list(out.glob(".*.tmp"))


def test_two_runs_on_one_store_do_not_corrupt_it(images, tmp_path):
    run(images, tmp_path / "ref", chunk_size=1)
    out = tmp_path / "shared"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen(command(images, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    store, ref = ProposalStore(out), ProposalStore(tmp_path / "ref")
    assert store.names() == ref.names() and store.failures == ref.failures
    for name in ref:
        np.testing.assert_array_equal(store[name][0], ref[name][0])


def test_shard_from_flag_or_torchrun_environment():
    assert Shard.parse("2/5") == Shard(2, 5)
    assert Shard.parse(None, {"RANK": "3", "WORLD_SIZE": "4"}) == Shard(3, 4, torchrun=True)
    assert Shard.parse(None, {}) == Shard(0, 1)
    for bad in ("5/5", "a/b", "1"):
        with pytest.raises(UserError):
            Shard.parse(bad)


# ----------------------------------------------------------------------------------------------------
# damage, kills and full disks: one line, and a rerun that ends byte-exact


def array_start(data: bytes, key: str) -> int:
    """Byte offset of array ``key`` in a part file's bytes (read from its header)."""
    import json
    import struct

    (length,) = struct.unpack("<Q", data[8:16])
    header = json.loads(data[32:32 + length])
    return -(-(32 + length) // 64) * 64 + header["arrays"][key]["offset"]


def read_everything(store_dir):
    store = ProposalStore(store_dir)
    return [store[name] for name in store]


@pytest.mark.parametrize("damage", ["boxes", "offsets", "sizes", "names", "crcs", "header", "truncated"])
def test_rerun_sets_a_damaged_part_aside_and_redoes_its_images(images, tmp_path, capsys, damage):
    out = tmp_path / "s"
    run(images, out)
    part = only_part(out)
    good = part.read_bytes()
    data = bytearray(good)
    if damage == "truncated":
        data = data[: len(data) - 7]
    elif damage == "header":
        data[40] ^= 0x01  # a character of the JSON header (it may even still parse)
    else:
        data[array_start(good, damage) + 9] ^= 0x10
    part.write_bytes(bytes(data))
    # Read as it is: one line naming the part and what to do, never wrong boxes.
    with pytest.raises(UserError, match=f"{part.name}: damaged proposal store part .*rerun") as err:
        read_everything(out)
    assert "\n" not in str(err.value)
    # --verify says so too, with exit code 2.
    assert run_tool(tool_main, ["--verify", str(out)]) == 2
    captured = capsys.readouterr()
    assert f"damaged: {part}" in captured.out and captured.err.count("\n") == 1
    # A rerun sets the part aside, does its images again, and ends with the same store as before the damage.
    assert tool_main([str(images), "--out", str(out), "--max-side", "96", "--chunk-size", "3", "--no-progress"]) == 0
    assert f"set aside damaged part {part}.damaged" in capsys.readouterr().err
    assert only_part(out).read_bytes() == good and (out / (part.name + ".damaged")).exists()
    assert run_tool(tool_main, ["--verify", str(out)]) == 0


KILL_AT_COMPACTION = """
import os, signal, sys
real = os.replace
def replace(src, dst):  # kill -9 just before the compacted part takes its name: its copy is left behind
    if os.path.basename(str(dst)).startswith("part-"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
from detector.apps.precompute_proposals import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_compaction_then_rerun_cleans_up_and_is_byte_exact(images, tmp_path):
    run(images, tmp_path / "ref")
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", KILL_AT_COMPACTION, *command(images, out)[2:]], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.returncode == -signal.SIGKILL
    left = list(out.glob(".part.*.tmp"))
    assert len(left) == 1 and left[0].stat().st_size > 0.9 * only_part(tmp_path / "ref").stat().st_size
    rerun = subprocess.run(command(images, out), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0 and "removed 1 temporary file" in rerun.stderr
    assert only_part(out).read_bytes() == only_part(tmp_path / "ref").read_bytes()
    assert not list(out.glob(".*tmp*"))


def test_disk_full_mid_run_is_one_line_and_the_rerun_completes(images, tmp_path, monkeypatch, capsys):
    import errno

    run(images, tmp_path / "ref")
    out = tmp_path / "full"
    real, calls = os.fsync, []

    def fsync(fd):  # the disk fills up after the settings file and two one-image chunks
        calls.append(fd)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    argv = [str(images), "--out", str(out), "--max-side", "96", "--chunk-size", "1", "--no-progress"]
    assert run_tool(tool_main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "chunk-" in err and "rerun" in err
    assert len(part_files(out)) == 2 and not list(out.glob(".*tmp*"))  # finished chunks kept, nothing half
    monkeypatch.setattr(os, "fsync", real)
    assert run_tool(tool_main, argv) == 0
    assert "2 already done" in capsys.readouterr().out
    assert only_part(out).read_bytes() == only_part(tmp_path / "ref").read_bytes()


def test_runs_with_other_settings_never_share_a_store(images, tmp_path):
    from proposals.precompute import _chunk_name

    names = ["a.jpg", "b.jpg"]
    assert _chunk_name(0, names, {"method": "ss-fast", "options": {"max_side": 96}}) != \
        _chunk_name(0, names, {"method": "ss-fast", "options": {"max_side": 64}})
    # Two runs started together on one --out with other settings: one wins, the other is refused in
    # one line before it writes anything; the store is the winner's, exactly.
    out = tmp_path / "shared"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = {side: subprocess.Popen(command(images, out, "--max-side", side), env=env,  # the last --max-side counts
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for side in ("96", "64")}
    results = {side: (p.wait(), p.stderr.read()) for side, p in procs.items()}
    assert sorted(rc for rc, _ in results.values()) == [0, 2], results
    winner = next(side for side, (rc, _) in results.items() if rc == 0)
    loser_err = next(err for rc, err in results.values() if rc == 2)
    assert loser_err.count("\n") == 1 and "use another --out" in loser_err
    precompute(list_images(images), tmp_path / "ref",
               PrecomputeConfig(options=(("max_side", int(winner)),), chunk_size=1), progress=False)
    assert only_part(out).read_bytes() == only_part(tmp_path / "ref").read_bytes()


# ----------------------------------------------------------------------------------------------------
# ILSVRC size: any number of parts under a low limit of open files, one compaction whatever the ranks

LOW_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))  # the soft and the hard limit: 64 open files
from proposals.precompute import PrecomputeConfig, list_images, precompute
report = precompute(list_images(sys.argv[1]), sys.argv[2],
                    PrecomputeConfig(options=(("max_side", 96),), chunk_size=1), progress=False)
print(report.done, report.total, len(report.failures), report.complete)
"""


def run_low_limit(images, out):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", LOW_LIMIT, str(images), str(out)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_precompute_under_a_low_file_limit_completes(tmp_path):
    # 100 one-image chunks under RLIMIT_NOFILE = 64: the run did all its work, then failed reading its
    # 100 parts at once (Errno 24), before compaction; and so did every rerun.
    folder = tmp_path / "tiny"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(100):
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    assert run_low_limit(folder, tmp_path / "s") == ["100", "100", "0", "True"]
    store = ProposalStore(only_part(tmp_path / "s"))
    assert len(store) == 100 and not list((tmp_path / "s").glob(".*tmp*"))


def test_rerun_on_a_store_of_many_parts_under_a_low_file_limit_completes(images, tmp_path, monkeypatch):
    # The rerun after such a failure: 600 finished one-image parts (synthetic, as precompute names them)
    # and 12 images still to do, under RLIMIT_NOFILE = 64: verified, done, compacted into one part.
    from proposals.precompute import SETTINGS_FILE, _chunk_name
    from proposals.store import ImageProposals, encode_boxes, write_part

    monkeypatch.setattr("proposals.part.os.fsync", lambda fd: None)  # synthetic parts, written fast
    out = tmp_path / "s"
    meta = PrecomputeConfig(options=OPTIONS).meta()
    done = [ImageProposals(f"z/done{i:04d}.jpg", (40, 60), encode_boxes([[1, 2, 30, 20], [0, 0, 60, 40]], (40, 60)))
            for i in range(600)]
    for c, entry in enumerate(done):
        write_part(lambda digest, c=c, e=entry: out / _chunk_name(1000 + c, [e.name], meta, digest), [entry], meta)
    listed = tmp_path / "list.txt"  # the 12 images of the fixture, then the 600 done ones
    listed.write_text("".join(f"{e.name}\n" for e in list_images(images)) + "".join(f"{e.name}\n" for e in done))
    LIST = LOW_LIMIT.replace("list_images(sys.argv[1])", f"list_images(sys.argv[1], {str(images)!r})")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", LIST, str(listed), str(out)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["12", "612", "2", "True"]  # two of the fixture's files are broken
    store = ProposalStore(only_part(out))
    assert len(store) == 610 and len(store.failures) == 2 and (out / SETTINGS_FILE).is_file()


RANK = """
import sys
import proposals.store as store
real = store.merge
def merge(*args, **kwargs):  # each compaction leaves a line in the log
    with open(sys.argv[3], "a") as log:
        log.write("merge\\n")
    return real(*args, **kwargs)
store.merge = merge
from proposals.precompute import PrecomputeConfig, list_images, precompute
report = precompute(list_images(sys.argv[1]), sys.argv[2], PrecomputeConfig(options=(("max_side", 96),),
                    chunk_size=1, shard=(int(sys.argv[4]), 2)), progress=False)
assert report.complete
"""


def test_two_ranks_sharing_a_store_compact_it_once(images, tmp_path):
    # Two shards of one store folder (torchrun ranks, or training ranks sharing the proposal cache), run
    # at the same moment: every rank compacted when its shard was done, each making a temporary copy of
    # the whole store at once. Now the last to finish (or, of two finishing together, the one holding
    # the lock) compacts, once: one temporary copy whatever the number of ranks.
    run(images, tmp_path / "ref")
    out, log = tmp_path / "shared", tmp_path / "merges.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(images), str(out), str(log), str(k)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for k in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], results
    assert log.read_text() == "merge\n"
    assert only_part(out).read_bytes() == only_part(tmp_path / "ref").read_bytes()
    assert not list(out.glob(".*tmp*"))
