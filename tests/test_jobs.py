"""The batch-job framework (detector/base/jobs.py, detector/base/pool.py) on a toy job: square roots of
numbers, one JSON file per chunk. A negative number fails (math.sqrt raises), as an unreadable image would."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest

from detector.base.errors import UserError
from detector.base.files import atomic_write
from detector.base.jobs import (
    PROCESSES,
    THREADS,
    Chunks,
    JobConfig,
    Shard,
    claim_manifest,
    imap_outcomes,
    run_job,
    wait_for_chunks,
)

NUMBERS = [4.0, 9.0, -1.0, 16.0, 2.0, -5.0, 25.0]  # chunks of 3: [4, 9, -1], [16, 2, -5], [25]
NAMES = [f"n{i}" for i in range(len(NUMBERS))]


class FolderSink:
    """chunk-<c>.json: position -> [value, error]; ``kill_after`` chunks written, the next write is a kill."""

    def __init__(self, folder: Path, chunk_size: int = 3, kill_after: int | None = None):
        self.folder, self.chunks, self.kill_after, self.written = folder, Chunks(len(NUMBERS), chunk_size), kill_after, []
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, chunk: int) -> Path:
        return self.folder / f"chunk-{chunk}.json"

    def read(self, chunk: int) -> dict:
        return {int(p): v for p, v in json.loads(self.path(chunk).read_text()).items()}

    def pending(self, chunk, positions, retry_failed):
        if not self.path(chunk).exists():
            return list(positions)
        held = self.read(chunk)
        return [p for p in positions if p not in held or (retry_failed and held[p][1])]

    def write(self, chunk, results):
        if self.kill_after is not None and len(self.written) == self.kill_after:
            raise KeyboardInterrupt  # a kill between two chunks
        held = self.read(chunk) if self.path(chunk).exists() else {}
        held |= {p: [o.value, o.error] for p, o in results}
        atomic_write(self.path(chunk), json.dumps(held, sort_keys=True))
        self.written.append(chunk)

    def failures(self, positions):
        out = {}
        for p in positions:
            chunk = self.chunks.of(p)
            if self.path(chunk).exists() and p in self.read(chunk) and self.read(chunk)[p][1]:
                out[NAMES[p]] = self.read(chunk)[p][1]
        return out

    def files(self) -> dict:
        return {p.name: p.read_text() for p in sorted(self.folder.glob("chunk-*.json"))}


def job(sink, numbers=NUMBERS, **config):
    return run_job(numbers, NAMES, math.sqrt, sink, JobConfig(chunk_size=3, progress=False, **config))


def test_one_run_records_failures_and_goes_on(tmp_path):
    report = job(FolderSink(tmp_path))
    assert (report.total, report.skipped, report.done, report.failed_now) == (7, 0, 7, 2)
    assert report.failures == {"n2": "ValueError: math domain error", "n5": "ValueError: math domain error"}
    assert report.complete and report.missing_chunks == []
    assert report.to_dict()["failed"] == 2 and json.dumps(report.to_dict())  # JSON-ready
    assert "shard 0/1: 7 images, 0 already done, 7 processed in" in report.summary()


def test_two_shards_equal_one_run(tmp_path):
    whole = FolderSink(tmp_path / "whole")
    job(whole)
    sharded = FolderSink(tmp_path / "sharded")
    first = job(sharded, shard=Shard(1, 2))  # chunk 1 of chunks 0, 1, 2
    assert (first.total, first.done, first.missing_chunks, first.complete) == (3, 3, [0, 2], True)
    assert list(first.failures) == ["n5"]  # this shard's failures only
    second = job(sharded, shard=Shard(0, 2))
    assert (second.total, second.missing_chunks) == (4, [])
    assert sharded.files() == whole.files()


def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path):
    whole = FolderSink(tmp_path / "whole")
    job(whole)
    killed = FolderSink(tmp_path / "killed", kill_after=1)
    with pytest.raises(KeyboardInterrupt):
        job(killed)
    assert list(killed.files()) == ["chunk-0.json"]
    resumed = job(FolderSink(tmp_path / "killed"))
    assert (resumed.skipped, resumed.done) == (3, 4)
    assert FolderSink(tmp_path / "killed").files() == whole.files()


def test_failures_are_listed_again_and_retried_with_retry_failed(tmp_path):
    sink = FolderSink(tmp_path)
    job(sink)
    again = job(sink)  # nothing to do, the failures are still listed
    assert (again.skipped, again.done, list(again.failures)) == (7, 0, ["n2", "n5"])
    fixed = [abs(x) for x in NUMBERS]  # what a repaired image would be
    retried = job(sink, numbers=fixed, retry_failed=True)
    assert (retried.skipped, retried.done, retried.failures) == (5, 2, {})
    assert sink.read(0)[2] == [1.0, ""] and sink.read(1)[5] == [math.sqrt(5), ""]


@pytest.mark.parametrize("pool", [PROCESSES, THREADS])
def test_a_pool_gives_the_serial_results_in_order(tmp_path, pool):
    serial = FolderSink(tmp_path / "serial")
    job(serial)
    pooled = FolderSink(tmp_path / pool)
    report = job(pooled, workers=2, pool=pool)  # spawned processes, or threads
    assert pooled.files() == serial.files() and report.failures == job(serial).failures
    outcomes = list(imap_outcomes(math.sqrt, NUMBERS, workers=2, pool=pool, read_ahead=1))
    assert [o.value for o in outcomes] == [None if x < 0 else math.sqrt(x) for x in NUMBERS]


def test_at_most_read_ahead_items_are_in_flight():
    started, lock = [], threading.Lock()

    def work(x):
        with lock:
            started.append(x)
        return x

    consumed = []
    for outcome in imap_outcomes(work, range(20), workers=2, pool=THREADS, read_ahead=3):
        consumed.append(outcome.value)
        assert len(started) <= len(consumed) + 3  # the consumer is never more than 3 items behind
    assert consumed == list(range(20))


def test_a_manifest_with_other_settings_is_refused_in_one_line(tmp_path):
    settings = {"method": "ss-fast", "options": {"max_side": 96}, "chunk_size": 3}
    digest = claim_manifest(tmp_path / "run.json", settings, kind="toy")
    assert claim_manifest(tmp_path / "run.json", settings, kind="toy") == digest  # the same settings resume
    assert json.loads((tmp_path / "run.json").read_text())["digest"] == digest
    other = {**settings, "options": {"max_side": 64}}
    with pytest.raises(UserError) as err:
        claim_manifest(tmp_path / "run.json", other, kind="toy", what="proposals")
    message = str(err.value)
    assert "\n" not in message and "holds proposals made with other settings (options.max_side 96 there, 64 now)" \
        in message and "use another --out" in message
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable run settings"):
        claim_manifest(tmp_path / "run.json", settings, kind="toy")


def test_a_first_proposal_store_manifest_still_resumes(tmp_path):
    # store.json of the first precompute runs: {"format", "meta"}
    (tmp_path / "store.json").write_text(json.dumps({"format": "proposal-store", "meta": {"method": "ss-fast"}}))
    claim_manifest(tmp_path / "store.json", {"method": "ss-fast"}, kind="proposal-store")
    with pytest.raises(UserError, match="other settings"):
        claim_manifest(tmp_path / "store.json", {"method": "ss-quality"}, kind="proposal-store")


def test_shards_from_the_flag_or_torchrun_and_who_merges():
    assert Shard.parse("1/4") == Shard(1, 4) and str(Shard(1, 4)) == "1/4"
    assert Shard.parse(None, {"RANK": "0", "WORLD_SIZE": "2"}) == Shard(0, 2, torchrun=True)
    assert Shard.parse(None, {}) == Shard() and Shard(2, 3).chunks(8) == [2, 5]
    for bad in ("4/4", "-1/2", "a/b", "1"):
        with pytest.raises(UserError):
            Shard.parse(bad)
    with pytest.raises(UserError, match="not integers"):
        Shard.parse(None, {"RANK": "x", "WORLD_SIZE": "2"})
    # separate --shard runs: whoever finds every chunk there merges; torchrun: rank 0 waits, then merges
    assert [Shard(1, 2).after_run(m) for m in ([], [0])] == ["merge", "leave"]
    assert [Shard(0, 2, torchrun=True).after_run(m) for m in ([], [1])] == ["merge", "wait"]
    assert [Shard(1, 2, torchrun=True).after_run(m) for m in ([], [0])] == ["leave", "leave"]


def test_waiting_for_the_other_shards(tmp_path):
    sink = FolderSink(tmp_path)
    job(sink, shard=Shard(0, 2))  # chunks 0 and 2; chunk 1 is the other shard's
    with pytest.raises(UserError, match="1 chunks still missing"):
        wait_for_chunks(sink, sink.chunks, poll_seconds=0.05, timeout=0.2, progress=False)
    late = threading.Timer(0.2, job, (FolderSink(tmp_path),), {"shard": Shard(1, 2)})
    late.start()
    wait_for_chunks(sink, sink.chunks, poll_seconds=0.05, timeout=60, progress=False)
    late.join()
