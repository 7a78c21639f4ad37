"""The sample log (issue #17, first part): every accepted sample appended to checksummed segments, read
back exactly, torn tails ignored, sequences continued across restarts and never written twice."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import vmafx_sidecar as vs
from conftest import NUMERIC_ENV, ROOT, make_trainer

N_FEATURES = 5


def sample(sequence: int, rng: np.random.Generator, job_id: str | None = "job") -> vs.LoggedSample:
    return vs.LoggedSample(sequence, 1.7e9 + sequence / 10, sequence % 7 == 0, job_id and f"{job_id}-{sequence}",
                           rng.normal(0, 1, N_FEATURES).astype(np.float32), np.float32(rng.uniform(0, 100)))


def logged(directory, samples: list[vs.LoggedSample]) -> vs.SampleLog:
    """A sample log in `directory` that took `samples` in one batch."""
    log = vs.SampleLog(directory, N_FEATURES)
    for s in samples:
        log.append(s)
    log.commit(10**9)
    return log


def append_each(log: vs.SampleLog, samples: list[vs.LoggedSample], max_bytes: int = 10**9) -> None:
    """Each sample in a batch of its own, as a server answering one line a turn writes them."""
    for s in samples:
        log.append(s)
        log.commit(max_bytes)


def read_all(directory, after: int = 0) -> list[vs.LoggedSample]:
    return list(vs.read_log(directory, N_FEATURES, after))


def assert_same(found: list[vs.LoggedSample], written: list[vs.LoggedSample]) -> None:
    assert [s.sequence for s in found] == [s.sequence for s in written]
    for a, b in zip(found, written):
        assert (a.arrival, a.held_out, a.job_id) == (b.arrival, b.held_out, b.job_id)
        assert a.features.tobytes() == b.features.tobytes() and a.score.tobytes() == b.score.tobytes()


def test_samples_come_back_exactly_in_order_and_from_a_cursor(tmp_path):
    rng = np.random.default_rng(0)
    log = vs.SampleLog(tmp_path, N_FEATURES)
    written = [sample(i, rng, job_id=None if i % 3 == 0 else "job") for i in range(1, 101)]
    for batch in range(0, 100, 7):
        for s in written[batch:batch + 7]:
            log.append(s)
        log.commit(10**9)
    assert_same(read_all(tmp_path), written)
    assert_same(read_all(tmp_path, after=60), written[60:])


def test_a_restart_continues_after_the_last_record_and_never_writes_one_twice(tmp_path):
    rng = np.random.default_rng(1)
    written = [sample(i, rng) for i in range(1, 41)]
    logged(tmp_path, written[:25])
    again = vs.SampleLog(tmp_path, N_FEATURES)  # as after a crash: the journal replays 20..40
    assert again.last_sequence == 25
    for s in written[19:]:
        again.append(s)
    again.commit(10**9)
    assert_same(read_all(tmp_path), written)
    assert len(vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)) == 2  # a restart starts a new segment


@pytest.mark.parametrize("cut", [1, 9, 30, -1], ids=["in-header", "in-fields", "in-body", "last-byte"])
def test_a_torn_tail_is_ignored_never_misread(tmp_path, cut):
    rng = np.random.default_rng(2)
    written = [sample(i, rng) for i in range(1, 11)]
    logged(tmp_path, written)
    (path,) = vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)
    data = path.read_bytes()
    record = (len(data) - vs.SEGMENT_HEADER.size) // 10
    path.write_bytes(data[:len(data) - record + cut] if cut > 0 else data[:cut])
    assert_same(read_all(tmp_path), written[:9])
    assert vs.SampleLog(tmp_path, N_FEATURES).last_sequence == 9


@pytest.mark.parametrize("where", [0, 1, 4, 9], ids=["first record", "its sequence", "a record's body", "the last"])
def test_a_flipped_byte_costs_its_own_record_and_no_other(tmp_path, caplog, where):
    """It ended the segment there: every intact record after it (up to a segment's 16 MiB, ~40 000 samples) was
    lost to the fleet and deleted by retention as read, uncounted. The record skipped is said (the fleet's gap line
    blamed a replica's retention, its disk or its settings: the words hunt); a last one reads as a torn tail."""
    rng = np.random.default_rng(3)
    written = [sample(i, rng) for i in range(101, 111)]
    logged(tmp_path, written)  # its segment named by its first sequence, 101
    (path,) = vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)
    data = bytearray(path.read_bytes())
    record = (len(data) - vs.SEGMENT_HEADER.size) // 10
    flipped = 10 if where == 1 else record // 2  # the sequence field, or inside the body
    data[vs.SEGMENT_HEADER.size + where * record + flipped] ^= 0x10
    path.write_bytes(bytes(data))
    assert_same(read_all(tmp_path), written[:where] + written[where + 1:])
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    skipped = f"{record} bytes of corrupt records at byte {vs.SEGMENT_HEADER.size + where * record} skipped"
    assert said == ([] if where == 9 else [f"sample log {path}: {skipped}, with their samples"])
    caplog.clear()
    assert_same(read_all(tmp_path, after=109), written[9:] if where != 9 else [])  # a fleet run's next: said once
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_corrupt_record_after_the_largest_sequence_ends_the_segment(tmp_path):
    """Looking for the sequences that may follow 2**64 - 1 packed numbers past 8 bytes: `fleet` ended in a struct.error
    traceback on a segment a foreign writer made, its record's checksum holding (the fuzz hunt)."""
    rng = np.random.default_rng(5)
    logged(tmp_path, [sample(1, rng), sample(2, rng)])
    (path,) = vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)
    data = bytearray(path.read_bytes())
    first = vs.SAMPLE_RECORD.unpack_from(data, vs.SEGMENT_HEADER.size)
    end = vs.SEGMENT_HEADER.size + vs.SAMPLE_RECORD.size + first[0]
    body = bytes(data[vs.SEGMENT_HEADER.size + vs.SAMPLE_RECORD.size:end])
    rest = vs.SAMPLE_RECORD.pack(0, 0, 2**64 - 1, *first[3:])[8:] + body  # what the checksum covers
    data[vs.SEGMENT_HEADER.size:end] = struct.pack("<II", first[0], vs.zlib.crc32(rest)) + rest
    data[-1] ^= 0xFF  # the second record corrupt
    path.write_bytes(bytes(data))
    assert [s.sequence for s in read_all(tmp_path)] == [2**64 - 1]


def test_a_torn_last_record_ends_the_segment_and_hides_nothing(tmp_path):
    rng = np.random.default_rng(38)
    written = [sample(i, rng) for i in range(1, 11)]
    logged(tmp_path, written)
    (path,) = vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    assert_same(read_all(tmp_path), written[:9])


def test_segments_rotate_by_size_and_each_starts_at_its_first_sequence(tmp_path, monkeypatch):
    monkeypatch.setattr(vs, "SEGMENT_BYTES", 1000)
    rng = np.random.default_rng(4)
    written = [sample(i, rng) for i in range(1, 201)]
    append_each(vs.SampleLog(tmp_path, N_FEATURES), written)
    paths = vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)
    assert len(paths) > 5
    for path in paths:
        first = next(vs.read_segment(path, N_FEATURES)).sequence
        assert path.name == f"{first:016d}.seg"
    assert_same(read_all(tmp_path), written)


def test_a_segment_of_another_feature_count_is_refused_by_name(tmp_path):
    log = vs.SampleLog(tmp_path, N_FEATURES)
    log.append(sample(1, np.random.default_rng(5)))
    log.commit(10**9)
    (path,) = vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)
    with pytest.raises(ValueError, match=f"{path.name}: not a sample log segment of 6 features"):
        list(vs.read_segment(path, 6))


@pytest.mark.parametrize("damage, kept", [
    (lambda data: data[:0], False), (lambda data: data[:10], False), (lambda data: data[:vs.SEGMENT_HEADER.size], False),
    (lambda data: data[:vs.SEGMENT_HEADER.size + 30], True),
    (lambda data: bytes(vs.SEGMENT_HEADER.size + 30) + data[vs.SEGMENT_HEADER.size + 30:], True)],
    ids=["nothing", "a torn header", "the header alone", "a torn first record", "a head zeroed by a power loss"])
def test_a_newest_segment_without_a_record_that_can_be_read_is_put_out_of_the_way(tmp_path, damage, kept):
    """What a crash leaves as a segment begins, or a power loss makes of one: left there, its name would end the
    segment before it, hiding every sample the restart writes there. One that holds nothing but a header is
    removed; one with bytes that might be records is set aside."""
    rng = np.random.default_rng(12)
    written = [sample(i, rng) for i in range(1, 41)]
    logged(tmp_path, written[:20])
    logged(tmp_path, written[20:25])  # a second segment, starting at 21, then damaged
    newest = vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)[-1]
    newest.write_bytes(damage(newest.read_bytes()))
    again = vs.SampleLog(tmp_path, N_FEATURES)  # restarted: did not fail
    assert again.last_sequence == 20 and not newest.exists()
    assert bool(list(newest.parent.glob(newest.name + ".*.unreadable"))) == kept
    for s in written[20:]:  # the journal's replay, then new samples, in a segment that begins at 21 again
        again.append(s)
    again.commit(10**9)
    assert_same(read_all(tmp_path), written)


@pytest.mark.parametrize("where, value", [(0, 0x56 ^ 0x01), (15, 0x0A ^ 0x20), (16, N_FEATURES ^ 0x02), (16, 0)],
                         ids=["magic", "magic's end", "feature count", "feature count zeroed"])
def test_a_segment_whose_header_took_a_bit_flip_is_read_by_its_records(tmp_path, caplog, where, value):
    """A flip in the newest segment's header set it aside as holding "no record that can be read", or the whole log
    as "of another feature count" (every sample the fleet had not read lost to it); in an older one it stopped the
    fleet reading that replica until retention deleted the segment (the flip hunt). Its records check: they are read,
    and the header's damage said."""
    rng = np.random.default_rng(15)
    written = [sample(i, rng) for i in range(1, 31)]
    logged(tmp_path, written[:10])
    logged(tmp_path, written[10:20])
    for damaged in vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR):  # the older one, then the newest too
        data = bytearray(damaged.read_bytes())
        data[where] = value
        damaged.write_bytes(data)
        again = vs.SampleLog(tmp_path, N_FEATURES)  # the replica's restart
        assert again.last_sequence == 20 and damaged.exists()
        assert sorted(p.name for p in (tmp_path / vs.SAMPLE_LOG_DIR).iterdir() if ".seg." in p.name) == []
        assert_same(read_all(tmp_path), written[:20])  # the fleet's read
        assert f"sample log {damaged}: its header is corrupt; its records, which check, are read all the same" in \
            caplog.text
    for s in written[20:]:
        again.append(s)
    again.commit(10**9)
    assert_same(read_all(tmp_path), written)


def test_a_segment_removed_at_a_restart_still_ends_the_one_before_it_where_it_began(tmp_path):
    """An earlier version's log: segment 1 superseded from 21 on by a segment that a crash left empty."""
    rng = np.random.default_rng(14)
    written = [sample(i, rng) for i in range(1, 31)]
    logged(tmp_path, written)
    superseding = tmp_path / vs.SAMPLE_LOG_DIR / f"{21:016d}.seg"
    superseding.write_bytes(vs.SEGMENT_HEADER.pack(vs.SEGMENT_MAGIC, N_FEATURES))
    assert vs.SampleLog(tmp_path, N_FEATURES).last_sequence == 20


def test_a_log_of_another_feature_count_is_moved_aside_and_a_new_one_started(tmp_path, caplog):
    rng = np.random.default_rng(13)
    logged(tmp_path, [sample(i, rng) for i in range(1, 11)])
    caplog.set_level(logging.WARNING)
    again = vs.SampleLog(tmp_path, N_FEATURES + 1)
    assert not vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)
    assert again.last_sequence == 10  # numbers on: the fleet read the old log's up to 10, and may have
    [aside] = tmp_path.glob(f"{vs.SAMPLE_LOG_DIR}.*.set-aside")
    assert [s.sequence for s in vs.read_log(tmp_path, N_FEATURES, 0)] == []
    assert len(list(vs.read_segment(next(aside.glob("*.seg")), N_FEATURES))) == 10  # kept, not deleted
    assert f"of another feature count than {N_FEATURES + 1}" in caplog.text and aside.name in caplog.text


def test_a_log_set_aside_by_a_process_killed_between_its_renames_keeps_its_name_and_origin(tmp_path, monkeypatch):
    """Killed after the old log moved and before the new one had its name and origin, the next start began a log
    of a new name from 1: the fleet read it as another replica's, and the old log's unread samples as no gap."""
    rng = np.random.default_rng(14)
    logged(tmp_path, [sample(i, rng) for i in range(1, 11)])
    name, replace = vs.log_id(tmp_path), os.replace

    def killed_after_the_first(src, dst):
        replace(src, dst)
        if str(dst).endswith(".set-aside"):
            raise KeyboardInterrupt("killed")
    monkeypatch.setattr(vs.os, "replace", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        vs.SampleLog(tmp_path, N_FEATURES + 1)
    monkeypatch.undo()
    synced, real_fsync_directory = [], vs.fsync_directory
    monkeypatch.setattr(vs, "fsync_directory", lambda d: (synced.append(Path(d)), real_fsync_directory(d)))
    again = vs.SampleLog(tmp_path, N_FEATURES + 1)
    assert tmp_path in synced  # the rename that finishes it made to last (the crash hunt)
    assert vs.log_id(tmp_path) == name and vs.log_origin(tmp_path) == 1
    assert again.last_sequence == 10  # numbers on from the old log's last (from the fleet's position, its
    # samples took the numbers of the old log's unread ones, and the fleet saw no gap)
    assert not (tmp_path / f"{vs.SAMPLE_LOG_DIR}.begun").exists()
    [aside] = tmp_path.glob(f"{vs.SAMPLE_LOG_DIR}.*.set-aside")
    assert len(list(vs.read_segment(next(aside.glob("*.seg")), N_FEATURES))) == 10


def test_a_log_set_aside_numbers_on_from_the_old_one_after_a_restart_before_its_first_sample(tmp_path):
    rng = np.random.default_rng(15)
    logged(tmp_path, [sample(i, rng) for i in range(1, 11)])
    assert vs.SampleLog(tmp_path, N_FEATURES + 1).last_sequence == 10
    assert vs.SampleLog(tmp_path, N_FEATURES + 1).last_sequence == 10  # stopped before it logged a sample


def test_a_restart_with_another_feature_count_starts_with_the_sample_log_on(tmp_path):
    for n_features in (N_FEATURES, N_FEATURES + 1):
        settings = dict(n_features=n_features, sample_log="1")
        store = vs.StateStore(vs.Config(checkpoint_dir=str(tmp_path), **settings), make_trainer(tmp_path, **settings))
        store.restore()
        row = np.full(n_features, 0.5, np.float32)
        store.record_sample(row, np.float32(1.0), False, "job")
        store.trainer.ingest(row, np.float32(1.0), False, False)
        store.commit()
    assert [(s.sequence, s.features.size) for s in vs.read_log(tmp_path, N_FEATURES + 1)] == [(2, N_FEATURES + 1)]


def test_a_segment_ends_where_the_next_one_begins(tmp_path):
    """As earlier versions wrote a log continued from a state that held fewer samples than it: the new
    segment superseded the old one's tail."""
    rng = np.random.default_rng(6)
    first = [sample(i, rng) for i in range(1, 31)]
    logged(tmp_path, first)
    again = vs.SampleLog(tmp_path, N_FEATURES)
    again.last_sequence = 20  # what such a version set: its state held 20 samples
    second = [sample(i, rng, job_id="again") for i in range(21, 41)]
    for s in second:
        again.append(s)
    again.commit(10**9)
    assert_same(read_all(tmp_path), first[:20] + second)


def test_the_size_bound_deletes_the_oldest_segments_and_counts_their_samples(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(vs, "SEGMENT_BYTES", 1000)
    rng = np.random.default_rng(7)
    written = [sample(i, rng) for i in range(1, 301)]
    log = vs.SampleLog(tmp_path, N_FEATURES)
    append_each(log, written, 5000)
    kept = read_all(tmp_path)
    sizes = [p.stat().st_size for p in vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)]
    assert sum(sizes) <= 5000 + 1000 + 200  # the bound, then at most the segment being filled
    assert kept and kept[-1].sequence == 300
    assert log.samples_dropped == kept[0].sequence - 1  # every sample before the oldest kept one is counted
    assert_same(kept, written[kept[0].sequence - 1:])
    assert any("VMAFX_SIDECAR_SAMPLE_LOG_MAX_BYTES" in r.getMessage() for r in caplog.records)


def test_a_segment_deleted_unread_counts_its_records_up_to_where_the_next_one_begins(tmp_path):
    """As earlier versions wrote a log continued from a state that held fewer samples: the tail of a segment past
    the next one's name is superseded, and none of the log's (read_log skips it too)."""
    rng = np.random.default_rng(43)
    logged(tmp_path, [sample(i, rng) for i in range(1, 51)])
    again = vs.SampleLog(tmp_path, N_FEATURES)
    again.last_sequence = 30
    append_each(again, [sample(i, rng) for i in range(31, 41)])
    first = vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)[0]
    assert vs.unread_records(first, 0, 31) == 30 and vs.unread_records(first, 20, 31) == 10
    assert vs.unread_records(first, 0, 10**9) == 50


@pytest.mark.parametrize("lost_by", ["the size bound", "a change of feature count"])
def test_samples_never_in_the_log_are_not_counted_as_lost_from_it(tmp_path, monkeypatch, lost_by):
    """Samples 31-80 were accepted with the log off, 81-90 logged after: with the fleet at 30, the whole stretch
    up to the next segment's name had been counted as lost, and VmafxFleetSamplesLost fired for samples the log
    never held."""
    rng = np.random.default_rng(41)
    replica(tmp_path, "vmafx-node-0", [sample(i, rng) for i in range(1, 31)])
    assert vs.fleet(tmp_path, fleet_config()) == 0
    replica(tmp_path, "vmafx-node-0", [sample(i, rng) for i in range(81, 91)])  # a start numbers a segment anew
    node = tmp_path / "vmafx-node-0"
    if lost_by == "the size bound":
        log = vs.SampleLog(node, N_FEATURES)
        monkeypatch.setattr(vs, "SEGMENT_BYTES", 1)  # the next batch opens a segment, and the bound deletes both
        append_each(log, [sample(i, rng) for i in range(91, 93)], 1)
        assert [p.name for p in vs.segment_paths(node / vs.SAMPLE_LOG_DIR)] == [f"{92:016d}.seg"]
    else:
        log = vs.SampleLog(node, N_FEATURES + 1)
    assert log.samples_dropped == 10 + (lost_by == "the size bound")  # 81-90, and 91 with the bound


# ---- a real sidecar with the log on ----

LOGGING = dict(VMAFX_SIDECAR_N_FEATURES=str(N_FEATURES), VMAFX_SIDECAR_SAMPLE_LOG="1",
               VMAFX_SIDECAR_HOLDOUT_FRACTION="0.2")


def messages(rng: np.random.Generator, start: int, n: int) -> list[dict]:
    """Samples with a job_id, and every fourth without one."""
    return [{**({} if i % 4 == 0 else {"job_id": f"job-{i}"}),
             "features": rng.uniform(0, 1, N_FEATURES).astype(np.float32).tolist(),
             "true_score": float(np.float32(rng.uniform(20, 100)))} for i in range(start, start + n)]


def test_every_acknowledged_sample_is_logged_once_across_a_kill(sidecar_factory, tmp_path):
    rng = np.random.default_rng(8)
    sent = messages(rng, 0, 300)
    s = sidecar_factory(**LOGGING)
    client = s.client()
    assert all(client.request(m)["ok"] for m in sent[:150])
    s.stop(vs.signal.SIGKILL)  # mid-stream: the last batch may be journaled but not logged
    s = sidecar_factory(workdir=tmp_path, **LOGGING)
    client = s.client()
    assert all(client.request(m)["ok"] for m in sent[150:])
    held_out = client.request({"op": "status"})["samples_held_out"]
    assert s.stop() == 0
    logged = list(vs.read_log(s.checkpoint_dir, N_FEATURES))
    assert [x.sequence for x in logged] == list(range(1, 301))
    for x, m in zip(logged, sent):
        assert x.features.tolist() == m["features"] and float(x.score) == m["true_score"]
        assert x.job_id in (m.get("job_id"), None)  # None: re-logged from the journal after the kill
    assert sum(x.held_out for x in logged) == held_out > 0


def test_the_sample_log_is_off_by_default(sidecar_factory):
    s = sidecar_factory(VMAFX_SIDECAR_N_FEATURES=str(N_FEATURES))
    client = s.client()
    assert all(client.request(m)["ok"] for m in messages(np.random.default_rng(9), 0, 20))
    assert s.stop() == 0
    assert not (s.checkpoint_dir / vs.SAMPLE_LOG_DIR).exists()


def test_samples_journaled_but_not_logged_when_the_process_died_are_logged_at_restart(tmp_path):
    settings = dict(n_features=N_FEATURES, sample_log="1", holdout_fraction=0.2)
    rng = np.random.default_rng(10)
    trainer = make_trainer(tmp_path, **settings)
    store = vs.StateStore(trainer.config, trainer)
    store.restore()
    rows = [(rng.uniform(0, 1, N_FEATURES).astype(np.float32), np.float32(rng.uniform(20, 100))) for _ in range(30)]
    for i, (row, score) in enumerate(rows):
        held_out = store.trainer.is_held_out(f"job-{i}")
        store.record_sample(row, score, held_out, f"job-{i}")
        store.trainer.ingest(row, score, held_out, False)
        if i == 19:
            store.commit()  # 20 journaled and logged
    store.journal.commit()  # the last 10 journaled; the process dies before the log's write
    again = vs.StateStore(store.config, make_trainer(tmp_path, **settings))
    again.restore()
    logged = list(vs.read_log(tmp_path, N_FEATURES))
    assert [x.sequence for x in logged] == list(range(1, 31))
    assert [x.job_id for x in logged] == [f"job-{i}" for i in range(20)] + [None] * 10
    assert all(x.features.tobytes() == row.tobytes() for x, (row, _) in zip(logged, rows))


def test_samples_a_checkpoints_snapshot_took_in_mid_turn_are_logged_before_it(tmp_path):
    """A checkpoint's snapshot, taken while a turn's lines are answered, holds the turn's earlier samples and
    empties the journal of them: killed before the turn's end, they must already be in the log."""
    settings = dict(n_features=N_FEATURES, sample_log="1", batch_size=8, min_samples_ckpt=12, ckpt_interval_s=0.0,
                    gate="off")
    rng = np.random.default_rng(11)
    store = vs.StateStore(vs.Config(checkpoint_dir=str(tmp_path), **settings), make_trainer(tmp_path, **settings))
    store.restore()
    checkpoint = None
    while checkpoint is None:  # one turn, as Server.answer runs it: no commit until the turn's end
        row, score = rng.uniform(0, 1, N_FEATURES).astype(np.float32), np.float32(rng.uniform(20, 100))
        store.record_sample(row, score, False, None)
        result = store.trainer.ingest(row, score, False, True)
        checkpoint = result and result.checkpoint
    store.save()  # the checkpoint's snapshot; the process dies before the turn's end
    again = vs.StateStore(store.config, make_trainer(tmp_path, **settings))
    again.restore()
    assert again.trainer.samples_accepted == store.trainer.samples_accepted
    assert [x.sequence for x in vs.read_log(tmp_path, N_FEATURES)] == list(range(1, store.trainer.samples_accepted + 1))


def accept(store: vs.StateStore, n: int, rng: np.random.Generator) -> None:
    """`n` more samples through a replica's running store, each answered in a turn of its own."""
    for _ in range(n):
        row = rng.uniform(0, 1, N_FEATURES).astype(np.float32)
        store.record_sample(row, np.float32(50.0), False, None)
        store.trainer.ingest(row, np.float32(50.0), False, True)
        store.commit()


def fleet_status_row(root: Path, capsys) -> list[str]:
    """The first replica's row of `fleet --status`, its name left out."""
    capsys.readouterr()
    vs.fleet_status(root, N_FEATURES)
    return capsys.readouterr().out.splitlines()[1].split()[1:]


@pytest.mark.parametrize("removed", [vs.SAMPLE_LOG_DIR, "the segment being written"])
def test_a_log_removed_while_the_sidecar_runs_goes_on_under_its_name_and_the_fleet_reports_the_gap(
        tmp_path, removed, caplog, capsys):
    """Its segment was written by its descriptor for ever: every sample went into a file the fleet never reads, no
    failure was counted, and the next start began a log of another name, which hid the loss from the fleet."""
    node = tmp_path / "vmafx-node-0"
    node.mkdir()
    rng = np.random.default_rng(42)
    store = replica_run(node, 20, rng, killed=True)
    assert vs.fleet(tmp_path, fleet_config()) == 0  # the fleet read 1-20
    name = vs.log_id(node)
    accept(store, 10, rng)  # 21-30, then the removal
    if removed == vs.SAMPLE_LOG_DIR:
        shutil.rmtree(node / vs.SAMPLE_LOG_DIR)
    else:
        vs.segment_paths(node / vs.SAMPLE_LOG_DIR)[-1].unlink()
    caplog.set_level(logging.ERROR, logger="vmafx_sidecar")
    store.journal_checked -= 1.0  # a second later
    store.tick()
    assert "the segment being written was removed or replaced while the sidecar ran" in caplog.text
    assert store.write_failures()["sample_log"] == 1
    accept(store, 5, rng)  # 31-35
    assert vs.log_id(node) == name and vs.log_origin(node) == 1
    assert [x.sequence for x in vs.read_log(node, N_FEATURES, 20)] == list(range(31, 36))
    assert fleet_status_row(tmp_path, capsys) == ["35", "20", "5", "0", "10"]  # 21-30 missing


@pytest.mark.parametrize("when", ["before a restart's first segment", "with the disk refusing its name once"])
def test_a_log_removed_comes_back_under_its_name_and_origin_whatever_the_moment(tmp_path, monkeypatch, when, capsys):
    """Removed before a segment was open, the log stayed gone (every batch a failed write, until a restart began
    one of another name); its name refused once, it went on without one, from a later origin: both hid the gap."""
    node = tmp_path / "vmafx-node-0"
    node.mkdir()
    rng = np.random.default_rng(44)
    replica_run(node, 10, rng)
    assert vs.fleet(tmp_path, fleet_config()) == 0  # the fleet read 1-10
    store = replica_run(node, 10, rng, killed=True)  # 11-20, unread
    name = vs.log_id(node)
    if when.startswith("before"):
        store = vs.StateStore(store.config, make_trainer(node, n_features=N_FEATURES, sample_log="1"))
        store.restore()  # a restart: no segment open
    else:
        store.journal_checked -= 1.0
    shutil.rmtree(node / vs.SAMPLE_LOG_DIR)
    if when.startswith("with"):
        write_whole = vs.write_whole

        def refused_once(path, *args, **kwargs):
            monkeypatch.setattr(vs, "write_whole", write_whole)
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(vs, "write_whole", refused_once)
    store.tick()
    accept(store, 5, rng)  # 21-25
    assert vs.log_id(node) == name and vs.log_origin(node) == 1
    assert [x.sequence for x in vs.read_log(node, N_FEATURES, 10)] == list(range(21, 26))
    assert fleet_status_row(tmp_path, capsys) == ["25", "10", "5", "0", "10"]  # 11-20 missing


def test_a_job_id_up_to_the_bound_is_logged_whole_and_a_longer_one_refused(tmp_path):
    """The log stores a job_id's length in 16 bits: a longer one is refused as the line is parsed, never
    left to fail the log's write (which took the whole server down)."""
    trainer = make_trainer(tmp_path, n_features=N_FEATURES, sample_log="1")
    store = vs.StateStore(trainer.config, trainer)
    store.restore()
    server = vs.Server(trainer.config, trainer, store)
    features = [0.5] * N_FEATURES
    for job_id in ("\U0001F600" * 16383 + "xyz", "x" * 65536):
        ack = json.loads(server.answer(json.dumps({"features": features, "true_score": 1.0, "job_id": job_id}).encode()))
        assert ack["ok"] == (len(job_id) < 65536), ack.get("error")
    store.commit()
    [logged] = read_all(tmp_path)
    assert logged.job_id == "\U0001F600" * 16383 + "xyz"


def replica_run(directory, n: int, rng: np.random.Generator, sample_log: str = "1",
                killed: bool = False) -> vs.StateStore:
    """A replica's process: a start, `n` samples each answered in a turn of its own, then a snapshot at its
    stop, or none (`killed`)."""
    settings = dict(n_features=N_FEATURES, sample_log=sample_log)
    store = vs.StateStore(vs.Config(checkpoint_dir=str(directory), **settings), make_trainer(directory, **settings))
    store.restore()
    for _ in range(n):
        row, score = rng.uniform(0, 1, N_FEATURES).astype(np.float32), np.float32(rng.uniform(20, 100))
        store.record_sample(row, score, False, None)
        store.trainer.ingest(row, score, False, True)
        store.commit()
    if not killed:
        store.save()
    return store


def set_aside_at_the_next_start(directory) -> None:
    snapshot = directory / ".state" / "snapshot.bin"
    snapshot.write_bytes(snapshot.read_bytes()[:-1] + b"?")  # corrupt


@pytest.mark.parametrize("story", ["state set aside", "state set aside, fleet read first", "log off meanwhile",
                                   "first journal replayed", "corrupt journal record"])
def test_a_state_holding_fewer_samples_than_its_log_counts_on_so_the_fleet_misses_none(tmp_path, monkeypatch,
                                                                                      story):
    """A replica whose state holds fewer samples than its log (begun afresh over it, or short of records the
    log kept) numbered its samples from its own count: they superseded the log's unread ones, and the fleet
    trainer, already past those numbers, skipped them."""
    replica_dir = tmp_path / "vmafx-node-0"
    replica_dir.mkdir()
    rng = np.random.default_rng(19)
    if story == "corrupt journal record":
        replica_run(replica_dir, 10, rng, killed=True)
        journal = replica_dir / ".state" / "journal.bin"
        data = bytearray(journal.read_bytes())
        data[vs.JOURNAL_HEADER.size + 2 * (vs.JOURNAL_RECORD.size + 4 * (N_FEATURES + 1)) + 20] ^= 1  # the 3rd
        journal.write_bytes(bytes(data))
        logged_before = 10
    else:
        replica_run(replica_dir, 30, rng)
        if story == "state set aside, fleet read first":
            assert vs.fleet(tmp_path, fleet_config()) == 0
        set_aside_at_the_next_start(replica_dir)
        logged_before = 30
        if story == "log off meanwhile":
            replica_run(replica_dir, 20, rng, sample_log="0")  # a new state, its samples never logged
        if story == "first journal replayed":  # a new state, whose snapshots the disk refuses: killed
            real_write_synced = vs.write_synced

            def write_synced(path, *args, **kwargs):
                if path.name.startswith(".snapshot"):
                    raise OSError(28, "No space left on device")
                real_write_synced(path, *args, **kwargs)
            monkeypatch.setattr(vs, "write_synced", write_synced)
            replica_run(replica_dir, 10, rng, killed=True)
            monkeypatch.undo()
            logged_before = 40
    last = replica_run(replica_dir, 5, rng)
    numbers = [x.sequence for x in vs.read_log(replica_dir, N_FEATURES)]
    assert numbers == sorted(set(numbers)) and numbers[-5:] == list(range(logged_before + 1, logged_before + 6))
    assert last.trainer.samples_accepted == logged_before + 5
    assert vs.fleet(tmp_path, fleet_config()) == 0
    fleet_read = fleet_state(tmp_path)["samples_accepted"]
    assert fleet_read == logged_before + 5


# ---- the fleet trainer ----

def replica(root, name: str, samples: list[vs.LoggedSample]) -> None:
    (root / name).mkdir(exist_ok=True)
    logged(root / name, samples)


def fleet_config(**settings) -> vs.Config:
    return vs.Config(**{"n_features": N_FEATURES, "hidden": 8, "base_model_path": "", "min_samples_ckpt": 10**9,
                        **settings})


def fleet_state(root) -> dict:
    meta, _ = vs.read_snapshot((root / vs.FLEET_DIR / ".state" / "snapshot.bin").read_bytes())
    return meta


def positions(root) -> dict[str, int]:
    """The fleet's position in each replica's log, by the replica's directory name (it keeps them by log name)."""
    names = {vs.log_id(path): path.name for path in root.iterdir() if path.is_dir() and not path.is_symlink()}
    return {names.get(key, key): n for key, n in fleet_state(root)["sources"].items()}


def test_a_fleet_run_ingests_every_replicas_new_samples_once(tmp_path):
    rng = np.random.default_rng(11)
    for name, count in (("vmafx-node-0", 40), ("vmafx-node-1", 25)):
        replica(tmp_path, name, [sample(i, rng) for i in range(1, count + 1)])
    (tmp_path / "not-a-replica").mkdir()
    assert vs.fleet(tmp_path, fleet_config()) == 0
    meta = fleet_state(tmp_path)
    assert meta["samples_accepted"] == 65 and positions(tmp_path) == {"vmafx-node-0": 40, "vmafx-node-1": 25}
    assert vs.fleet(tmp_path, fleet_config()) == vs.FLEET_NOTHING_NEW
    replica(tmp_path, "vmafx-node-1", [sample(i, rng) for i in range(26, 31)])
    assert vs.fleet(tmp_path, fleet_config()) == 0
    meta = fleet_state(tmp_path)
    assert meta["samples_accepted"] == 70 and positions(tmp_path) == {"vmafx-node-0": 40, "vmafx-node-1": 30}
    held_out = sum(s.held_out for i in range(1, 41) for s in [sample(i, np.random.default_rng(0))])
    assert meta["samples_held_out"] >= held_out  # the flags as logged, never decided again


def test_each_fleet_run_publishes_once_at_its_end_with_what_it_read(tmp_path):
    """With the checkpoint interval its schedule's (600 s), a run counted the interval from the last run's
    checkpoint: one that started sooner after its tick published nothing (a third of them, with real start-up
    delays), one that started later published at its first step, and no run's model held what it had read."""
    rng = np.random.default_rng(41)
    config = fleet_config(min_samples_ckpt=1000, ckpt_interval_s=600, gate="off")
    versions = []
    for first, count in ((1, 3000), (3001, 2000), (5001, 500)):  # the last: too few new samples to publish
        replica(tmp_path, "vmafx-node-0", [sample(i, rng) for i in range(first, first + count)])
        assert vs.fleet(tmp_path, config) == 0
        record = json.loads((tmp_path / vs.FLEET_DIR / "latest.json").read_text())
        meta = fleet_state(tmp_path)
        versions.append(record["version"])
        if count >= 1000:  # one checkpoint, of everything trained, all but the samples waiting for a step
            trainable = meta["samples_accepted"] - meta["samples_held_out"]
            assert record["samples_trained"] == meta["samples_trained"] > trainable - 16
    assert versions == [1, 2, 2]
    zero = fleet_config(min_samples_ckpt=0, ckpt_interval_s=600, gate="off")  # allowed: a model of every run
    for _ in range(2):  # the first publishes the last run's 500, unpublished; the second has trained nothing since
        assert vs.fleet(tmp_path, zero) == vs.FLEET_NOTHING_NEW
        assert json.loads((tmp_path / vs.FLEET_DIR / "latest.json").read_text())["version"] == 3


def full_disk_for_names(part: str):
    """vs.write_synced as a full disk for the files whose names hold `part`, their temp files' included."""
    real_write = vs.write_synced

    def write_synced(path, chunks, mode=0o644):
        if part in path.name:
            raise OSError(28, "No space left on device")
        real_write(path, chunks, mode)
    return write_synced


@pytest.mark.parametrize("refused", ["model_v000001", "latest"])
def test_a_run_whose_checkpoint_or_latest_json_the_disk_refuses_fails_and_the_next_run_writes_it(
        tmp_path, monkeypatch, caplog, refused):
    """A refused write of the run's checkpoint, or of latest.json's update, was logged as "retried every second" (a
    sidecar's loop retries; a run has none) and the run exited 0: its Job succeeded while nodes saw nothing of it."""
    replica(tmp_path, "vmafx-node-0", [sample(i, np.random.default_rng(13)) for i in range(1, 201)])
    config = fleet_config(min_samples_ckpt=100, gate="off")
    monkeypatch.setattr(vs, "write_synced", full_disk_for_names(refused))
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    assert vs.fleet(tmp_path, config) == 1
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fleet run: the disk refused")]
    what = "the checkpoint of what it trained" if refused.startswith("model") else "the update of latest.json to"
    assert len(errors) == 1 and what in errors[0], errors
    assert fleet_state(tmp_path)["samples_accepted"] == 200  # what it read is saved: not read again
    assert not (tmp_path / vs.FLEET_DIR / "latest.json").exists()
    monkeypatch.undo()
    assert vs.fleet(tmp_path, config) == vs.FLEET_NOTHING_NEW
    latest = json.loads((tmp_path / vs.FLEET_DIR / "latest.json").read_text())
    assert latest["file"] == "model_v000001.onnx", latest
    assert latest["samples_trained"] == fleet_state(tmp_path)["samples_trained"] > 0  # all the first run trained


def test_a_run_whose_cursors_the_disk_refuses_fails_with_one_line_and_the_next_run_writes_them(tmp_path, monkeypatch):
    """A refused write of cursors.json ended the run in a traceback (the review)."""
    replica(tmp_path, "vmafx-node-0", [sample(i, np.random.default_rng(14)) for i in range(1, 41)])
    monkeypatch.setattr(vs, "write_synced", full_disk_for_names(vs.FLEET_CURSORS))
    with pytest.raises(vs.StartupError, match=r"^cannot write .*/cursors\.json: No space left on device \(the next"):
        vs.fleet(tmp_path, fleet_config())
    assert positions(tmp_path) == {"vmafx-node-0": 40}  # the state saved first: read once
    assert vs.fleet_cursor(tmp_path / "vmafx-node-0") == 0  # the replica's retention keeps its samples meanwhile
    monkeypatch.undo()
    assert vs.fleet(tmp_path, fleet_config()) == vs.FLEET_NOTHING_NEW
    assert vs.fleet_cursor(tmp_path / "vmafx-node-0") == 40


def test_a_replica_of_another_feature_count_is_skipped_with_one_line(tmp_path, caplog):
    replica(tmp_path, "good", [sample(i, np.random.default_rng(12)) for i in range(1, 11)])
    (tmp_path / "other").mkdir()
    other = vs.SampleLog(tmp_path / "other", N_FEATURES + 1)
    other.append(vs.LoggedSample(1, 1.0, False, None, np.zeros(N_FEATURES + 1, np.float32), np.float32(50)))
    other.commit(10**9)
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert positions(tmp_path) == {"good": 10}
    lines = [r.getMessage() for r in caplog.records if "other" in r.getMessage()]
    assert len(lines) == 1 and "not a sample log segment of 5 features" in lines[0], lines


def test_fleet_runs_killed_anywhere_ingest_every_sample_exactly_once(tmp_path):
    rng = np.random.default_rng(13)
    total = 0
    for r in range(3):
        count = 15000 + 2000 * r
        replica(tmp_path, f"vmafx-node-{r}", [sample(i, rng) for i in range(1, count + 1)])
        total += count
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **NUMERIC_ENV,
           "VMAFX_SIDECAR_N_FEATURES": str(N_FEATURES), "VMAFX_SIDECAR_HIDDEN": "8", "VMAFX_BASE_MODEL_PATH": "",
           "VMAFX_SIDECAR_CKPT_INTERVAL_S": "0", "VMAFX_SIDECAR_MIN_SAMPLES_CKPT": "400", "VMAFX_SIDECAR_GATE": "off"}
    command = [sys.executable, "-m", "vmafx_sidecar", "fleet", str(tmp_path)]
    kills = 0
    # kill -9 at random moments until a run gets through: a random number of checkpoints into each run (0: at
    # its first log line), a moment in its progress rather than in seconds, so that a fast machine is killed
    # as often as a slow one; then up to the next checkpoint or two, its save included
    for checkpoints in rng.integers(0, 30, 60):
        run = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        lines, published = [], 0
        for line in run.stderr:
            lines.append(line)
            published += " published: " in line
            if published >= checkpoints:
                time.sleep(rng.uniform(0, 0.02))
                run.kill()
                break
        code = run.wait()
        run.stderr.close()
        if code == -signal.SIGKILL:
            kills += 1
            continue
        assert code in (0, vs.FLEET_NOTHING_NEW), "".join(lines)
        if code == vs.FLEET_NOTHING_NEW:
            break
    assert kills >= 2 and code == vs.FLEET_NOTHING_NEW, (kills, code)
    meta = fleet_state(tmp_path)
    assert meta["samples_accepted"] == total  # never twice, never skipped
    assert positions(tmp_path) == {f"vmafx-node-{r}": 15000 + 2000 * r for r in range(3)}
    verify = subprocess.run([sys.executable, "-m", "vmafx_sidecar", "verify", str(tmp_path / vs.FLEET_DIR)],
                            env=env, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_segments_the_fleet_has_read_are_deleted_and_only_unread_losses_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(vs, "SEGMENT_BYTES", 1000)
    rng = np.random.default_rng(14)
    node = tmp_path / "vmafx-node-0"
    node.mkdir()
    log = vs.SampleLog(node, N_FEATURES)
    append_each(log, [sample(i, rng) for i in range(1, 101)])
    assert vs.fleet(tmp_path, fleet_config()) == 0  # reads 1..100
    assert vs.fleet_cursor(node) == 100
    append_each(log, [sample(i, rng) for i in range(101, 131)])  # rotations delete what the fleet has read
    assert log.samples_dropped == 0
    assert vs.read_log(node, N_FEATURES).__next__().sequence > 80
    assert [s.sequence for s in vs.read_log(node, N_FEATURES, after=100)] == list(range(101, 131))
    append_each(log, [sample(i, rng) for i in range(131, 331)], 3000)  # unread, over the bound: the oldest go
    kept = list(vs.read_log(node, N_FEATURES))
    assert log.samples_dropped == kept[0].sequence - 101 > 0
    assert kept[-1].sequence == 330


def test_fleet_status_shows_each_replicas_lag_and_what_was_deleted_unread(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(15)
    replica(tmp_path, "vmafx-node-0", [sample(i, rng) for i in range(1, 51)])
    assert vs.fleet(tmp_path, fleet_config()) == 0
    replica(tmp_path, "vmafx-node-0", [sample(i, rng) for i in range(51, 71)])
    monkeypatch.setattr(vs, "SEGMENT_BYTES", 1000)
    node = tmp_path / "vmafx-node-1"
    node.mkdir()
    append_each(vs.SampleLog(node, N_FEATURES), [sample(i, rng) for i in range(1, 301)], 4000)  # the oldest go
    first_kept = next(vs.read_log(node, N_FEATURES)).sequence
    capsys.readouterr()
    assert vs.fleet_status(tmp_path, N_FEATURES) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["vmafx-node-0"][1:4] == ["70", "50", "20"] and rows["vmafx-node-0"][5] == "0"
    assert rows["vmafx-node-1"][1:4] == ["300", "0", str(301 - first_kept)]  # logged, read, lag: those kept
    assert rows["vmafx-node-1"][5] == str(first_kept - 1)  # missing: those deleted
    assert "fleet model: none published" in rows["fleet"][0] + " " + " ".join(rows["fleet"][1:])


def test_a_replica_whose_clock_runs_ahead_is_warned_of_and_no_age_or_lag_is_negative(tmp_path, caplog, capsys,
                                                                                       monkeypatch):
    """The fleet merges the replicas by their own nodes' clocks: one an hour ahead went unsaid, while its lag, and
    the model age the replicas report, read an hour below 0 (the time hunt)."""
    rng, now = np.random.default_rng(25), time.time()
    replica(tmp_path, "vmafx-node-0", [dataclasses.replace(sample(i, rng), arrival=now + 3600 + i)
                                      for i in range(1, 41)])
    replica(tmp_path, "vmafx-node-1", [dataclasses.replace(sample(i, rng), arrival=now - 100 + i)
                                      for i in range(1, 41)])
    capsys.readouterr()
    assert vs.fleet_status(tmp_path, N_FEATURES) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["vmafx-node-0"][4] == "0" and 90 <= int(rows["vmafx-node-1"][4]) < 700  # lag (s)
    caplog.set_level(logging.WARNING, logger="vmafx_sidecar")
    assert vs.fleet(tmp_path, fleet_config(min_samples_ckpt=1, gate="off")) == 0
    assert caplog.text.count("ahead of this node's clock") == 1  # once a run, of the replica ahead
    assert "fleet: vmafx-node-0: sample 1 is stamped 360" in caplog.text
    monkeypatch.setattr(vs.time, "time", lambda: now - 3600)  # a replica an hour behind the fleet job's node
    assert vs.fleet_model(tmp_path / vs.FLEET_DIR)["age_s"] == 0


def test_a_sigterm_during_a_fleet_run_ends_it_at_once_and_the_next_run_redoes_it(tmp_path, monkeypatch, caplog):
    """The CronJob's fleet run is its container's PID 1, which gets only the signals it handles: it had none, and a
    SIGTERM (a deadline, a deleted pod) was dropped, the run going on to the grace period's kill (the container
    hunt). It now ends where it is, exit 1, and the next run redoes it from the last save."""
    rng = np.random.default_rng(26)
    replica(tmp_path, "vmafx-node-0", [sample(i, rng) for i in range(1, 41)])
    ingest = vs.Trainer.ingest

    def ingest_then_sigterm(trainer, *args):
        if trainer.samples_accepted == 20:
            os.kill(os.getpid(), signal.SIGTERM)
        return ingest(trainer, *args)

    monkeypatch.setattr(vs.Trainer, "ingest", ingest_then_sigterm)
    monkeypatch.setenv("VMAFX_SIDECAR_N_FEATURES", str(N_FEATURES))
    monkeypatch.setenv("VMAFX_BASE_MODEL_PATH", "")
    caplog.set_level(logging.WARNING, logger="vmafx_sidecar")
    before = signal.getsignal(signal.SIGTERM)
    assert vs.main(["fleet", str(tmp_path)]) == 1
    assert "stopped by SIGTERM before the end of the run: the next run goes on from what is on disk" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.setattr(vs.Trainer, "ingest", ingest)
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert fleet_state(tmp_path)["samples_accepted"] == 40


def test_fleet_status_keeps_the_processs_own_signal_handlers(tmp_path, monkeypatch):
    """It only reads: stopped, it had said the next run would go on from what is on disk (the review). The handlers
    are looked at, not tried: a suite run in the background inherits SIGINT ignored."""
    handlers = {}

    def status(*args):
        handlers.update({signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)})
        return 0

    monkeypatch.setattr(vs, "fleet_status", status)
    monkeypatch.setenv("VMAFX_BASE_MODEL_PATH", "")
    assert vs.main(["fleet", "--status", str(tmp_path)]) == 0
    assert handlers and vs.stop_by_signal not in handlers.values()


def test_a_fleet_run_reads_no_segment_it_has_read_whole(tmp_path, monkeypatch):
    """Every run read and checked every record of every segment, those wholly before its position too: a stopped
    replica's directory keeps what the fleet read after it stopped, and 50 of them at their bound cost minutes a run
    (the scale hunt)."""
    rng = np.random.default_rng(28)
    monkeypatch.setattr(vs, "SEGMENT_BYTES", 1000)
    node = tmp_path / "vmafx-node-0"
    node.mkdir()
    log = vs.SampleLog(node, N_FEATURES)
    append_each(log, [sample(i, rng) for i in range(1, 41)])
    assert vs.fleet(tmp_path, fleet_config()) == 0
    append_each(log, [sample(i, rng) for i in range(41, 46)])
    assert len(vs.segment_paths(node / vs.SAMPLE_LOG_DIR)) > 2
    read = []
    real = vs.read_segment
    monkeypatch.setattr(vs, "read_segment", lambda path, *args: read.append(path) or real(path, *args))
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert fleet_state(tmp_path)["samples_accepted"] == 45
    assert read == vs.segment_paths(node / vs.SAMPLE_LOG_DIR)[-len(read):] and len(read) <= 2


def test_three_sidecars_and_two_fleet_runs_end_to_end(sidecar_factory, tmp_path):
    """Three replicas on one root, each logging what it accepts; a fleet run trains fleet/ on all of it and
    publishes a model every replica then reports; a second run finds nothing new."""
    rng = np.random.default_rng(16)
    root, sent = tmp_path / "models", {}
    for r in range(3):  # each on its own socket, in its own directory of one root, as a StatefulSet's pods
        directory = root / f"vmafx-node-{r}"
        (tmp_path / f"pod-{r}").mkdir()
        s = sidecar_factory(workdir=tmp_path / f"pod-{r}", VMAFX_SIDECAR_CHECKPOINT_DIR=str(directory), **LOGGING)
        client = s.client()
        sent[directory] = messages(rng, 1000 * r, 200 + 50 * r)
        assert all(client.request(m)["ok"] for m in sent[directory])
        assert s.stop() == 0
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **NUMERIC_ENV,
           "VMAFX_SIDECAR_N_FEATURES": str(N_FEATURES), "VMAFX_BASE_MODEL_PATH": "", "VMAFX_SIDECAR_GATE": "off",
           "VMAFX_SIDECAR_CKPT_INTERVAL_S": "0", "VMAFX_SIDECAR_MIN_SAMPLES_CKPT": "400"}
    command = [sys.executable, "-m", "vmafx_sidecar", "fleet", str(root)]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    meta = fleet_state(root)
    assert positions(root) == {d.name: len(m) for d, m in sent.items()} and meta["samples_accepted"] == 750
    assert (root / vs.FLEET_DIR / "latest.onnx").is_file()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == vs.FLEET_NOTHING_NEW, again.stderr
    status = subprocess.run([*command, "--status"], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "fleet model: model_v" in status.stdout, status.stdout + status.stderr
    s = sidecar_factory(workdir=tmp_path / "pod-0", VMAFX_SIDECAR_CHECKPOINT_DIR=str(root / "vmafx-node-0"), **LOGGING)
    fleet = s.client().request({"op": "status"})["fleet"]
    assert fleet["version"] == json.loads((root / vs.FLEET_DIR / "latest.json").read_text())["version"]
    assert 0 <= fleet["age_s"] < 120


def test_a_replica_that_starts_logging_late_has_lost_nothing(tmp_path, caplog, capsys):
    """An upgraded replica, or one whose log was turned on late, starts at its count of accepted samples."""
    rng = np.random.default_rng(17)
    replica(tmp_path, "vmafx-node-0", [sample(i, rng) for i in range(501, 541)])
    caplog.set_level(logging.WARNING, logger="vmafx_sidecar")
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert fleet_state(tmp_path)["samples_accepted"] == 40
    assert not [r for r in caplog.records if "not in its log" in r.getMessage()]
    capsys.readouterr()
    vs.fleet_status(tmp_path, N_FEATURES)
    assert capsys.readouterr().out.splitlines()[1].split()[1:] == ["540", "540", "0", "0", "0"]


def test_samples_a_replica_accepted_with_its_log_off_are_reported_as_such_not_only_as_deleted(tmp_path, caplog):
    rng = np.random.default_rng(18)
    replica(tmp_path, "vmafx-node-0", [sample(i, rng) for i in range(1, 11)])
    logged(tmp_path / "vmafx-node-0", [sample(i, rng) for i in range(41, 51)])  # 11 to 40 accepted, log off
    caplog.set_level(logging.WARNING, logger="vmafx_sidecar")
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert fleet_state(tmp_path)["samples_accepted"] == 20
    [gap] = [r.getMessage() for r in caplog.records if "not in its log" in r.getMessage()]
    assert "samples 11 to 40" in gap and "VMAFX_SIDECAR_SAMPLE_LOG was off" in gap


def test_a_replica_directory_begun_afresh_under_a_name_the_fleet_has_read_is_read_from_its_start(tmp_path):
    """Its directory deleted, a replica starts afresh under the same name: its log numbered from 1 again, below
    the fleet trainer's position for that name, which skipped all of it, and retention deleted it as read. A new
    log has a name of its own, read from its start."""
    rng = np.random.default_rng(29)
    node = tmp_path / "vmafx-node-1"
    node.mkdir()
    replica_run(node, 30, rng)
    assert vs.fleet(tmp_path, fleet_config()) == 0
    shutil.rmtree(node)
    node.mkdir()
    assert replica_run(node, 20, rng).trainer.samples_accepted == 20
    assert [x.sequence for x in vs.read_log(node, N_FEATURES)] == list(range(1, 21))
    assert vs.fleet_cursor(node) == 0  # its retention keeps all of it for the fleet
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert fleet_state(tmp_path)["samples_accepted"] == 50 and positions(tmp_path)["vmafx-node-1"] == 20


@pytest.mark.parametrize("moved", ["renamed", "reached by a symlink"])
def test_a_replica_directory_renamed_keeps_the_fleets_position_in_its_log(tmp_path, moved):
    """Positions were kept by directory name: renamed (a replica's state moved to a new release's pod name), or
    reached by a symlink once its first name went, a replica's log was read again from its start."""
    rng = np.random.default_rng(30)
    old, new = tmp_path / "vmafx-a-node-1", tmp_path / "vmafx-b-node-1"
    old.mkdir()
    replica_run(old, 30, rng)
    assert vs.fleet(tmp_path, fleet_config()) == 0
    if moved == "renamed":
        old.rename(new)
    else:
        elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
        old.rename(elsewhere)
        new.symlink_to(elsewhere)
    assert vs.fleet_cursor(new) == 30  # its retention and its numbers know what the fleet read
    replica_run(new, 10, rng)
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert fleet_state(tmp_path)["samples_accepted"] == 40 and list(fleet_state(tmp_path)["sources"].values()) == [40]


@pytest.mark.parametrize("stop", ["killed", "stopped"])
def test_a_state_adopted_from_a_directory_that_logged_its_samples_is_not_logged_again(tmp_path, stop):
    """A replica killed with samples in its journal (logged, not yet in a snapshot), its state then adopted by
    another whose log is on too: the adopter replayed the journal into its own log, and the fleet trained on
    those samples twice."""
    rng = np.random.default_rng(34)
    nodes = [tmp_path / f"vmafx-node-{i}" for i in (0, 1)]
    nodes[0].mkdir()
    replica_run(nodes[0], 20, rng, killed=stop == "killed")
    nodes[1].mkdir()
    vs.adopt_trainer_state(nodes[1], nodes[0], "test")
    assert replica_run(nodes[1], 10, rng).trainer.samples_accepted == 30
    assert [x.sequence for x in vs.read_log(nodes[1], N_FEATURES)] == list(range(21, 31))
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert fleet_state(tmp_path)["samples_accepted"] == 30


def test_a_log_keeps_its_name_written_whole_and_never_replaces_one_it_cannot_read(tmp_path):
    """A name it could not read now (an I/O error, a damaged file) was replaced by a new one, and the fleet read the
    whole log again under it."""
    logged(tmp_path, [sample(1, np.random.default_rng(35))])
    name = vs.log_id(tmp_path)
    assert name and len(name) == 16 and (tmp_path / vs.SAMPLE_LOG_DIR / "id").stat().st_mode & 0o777 == 0o600
    logged(tmp_path, [sample(2, np.random.default_rng(35))])
    assert vs.log_id(tmp_path) == name  # a restart keeps it
    (tmp_path / vs.SAMPLE_LOG_DIR / "id").write_bytes(b"\xff\n")
    logged(tmp_path, [sample(3, np.random.default_rng(35))])
    assert (tmp_path / vs.SAMPLE_LOG_DIR / "id").read_bytes() == b"\xff\n" and vs.log_id(tmp_path) is None


def test_a_copy_of_a_replica_directory_is_skipped_with_one_line(tmp_path, caplog):
    rng = np.random.default_rng(32)
    replica(tmp_path, "vmafx-node-0", [sample(i, rng) for i in range(1, 11)])
    shutil.copytree(tmp_path / "vmafx-node-0", tmp_path / "vmafx-node-9")
    caplog.set_level(logging.WARNING, logger="vmafx_sidecar")
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert fleet_state(tmp_path)["samples_accepted"] == 10
    assert fleet_state(tmp_path)["sources"] == {vs.log_id(tmp_path / "vmafx-node-0"): 10}
    assert "fleet: vmafx-node-9 skipped: its sample log is named" in caplog.text


def test_a_log_whose_name_cannot_be_read_now_waits_for_the_next_run(tmp_path, monkeypatch, caplog):
    """Keyed by its directory's name while an I/O error kept its name from being read, a log was read again from its
    start, and the run after read again what came after the position kept under its name."""
    rng = np.random.default_rng(36)
    node = tmp_path / "vmafx-node-0"
    node.mkdir()
    replica_run(node, 100, rng)
    assert vs.fleet(tmp_path, fleet_config()) == 0
    replica_run(node, 20, rng)
    read_small_file = vs.read_small_file

    def failing(path: Path) -> bytes:
        if path.name == vs.LOG_ID:
            raise OSError(5, "Input/output error")
        return read_small_file(path)
    monkeypatch.setattr(vs, "read_small_file", failing)
    caplog.set_level(logging.WARNING, logger="vmafx_sidecar")
    assert vs.fleet(tmp_path, fleet_config()) == vs.FLEET_NOTHING_NEW
    assert "vmafx-node-0 skipped this run: the name of its sample log cannot be read" in caplog.text
    monkeypatch.undo()
    replica_run(node, 10, rng)
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert fleet_state(tmp_path)["samples_accepted"] == 130 and positions(tmp_path) == {"vmafx-node-0": 130}


@pytest.mark.parametrize("copy", ["backup-vmafx-node-0", "vmafx-node-9"], ids=["sorted first", "sorted last"])
def test_a_copy_of_a_replica_directory_is_skipped_wherever_its_name_sorts(tmp_path, caplog, copy):
    """A copy whose name sorted before the replica's was read instead of it: the replica's new samples were never
    trained on, and its retention, reading the position kept under the name the two share, dropped them."""
    rng = np.random.default_rng(37)
    live = tmp_path / "vmafx-node-0"
    live.mkdir()
    log = vs.SampleLog(live, N_FEATURES)
    append_each(log, [sample(i, rng) for i in range(1, 101)])
    assert vs.fleet(tmp_path, fleet_config()) == 0
    shutil.copytree(live, tmp_path / copy)
    append_each(log, [sample(i, rng) for i in range(101, 201)])
    caplog.set_level(logging.WARNING, logger="vmafx_sidecar")
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert fleet_state(tmp_path)["samples_accepted"] == 200 and vs.fleet_cursor(live) == 200
    assert f"fleet: {copy} skipped: its sample log is named" in caplog.text


def test_a_fleet_state_set_aside_keeps_the_positions_of_the_logs_it_cannot_read(tmp_path):
    """A rollout to another feature count whose fleet run comes before a replica is replaced: the fleet's state is
    set aside, the replica's log (of the count before) skipped, and the positions written without it. The replica
    then counted all its log held as lost, and the fleet reported as a gap what it had read (the replicas hunt)."""
    rng = np.random.default_rng(27)
    node = tmp_path / "vmafx-node-0"
    replica(tmp_path, node.name, [sample(i, rng) for i in range(1, 51)])
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert vs.fleet_cursor(node) == 50
    assert vs.fleet(tmp_path, fleet_config(n_features=N_FEATURES + 1)) == vs.FLEET_NOTHING_NEW
    assert vs.fleet_cursor(node) == 50


def test_a_position_kept_under_a_directory_name_by_an_older_version_moves_to_the_logs_name(tmp_path):
    rng = np.random.default_rng(33)
    replica(tmp_path, "vmafx-node-0", [sample(i, rng) for i in range(1, 11)])
    assert vs.fleet(tmp_path, fleet_config()) == 0
    name = vs.log_id(tmp_path / "vmafx-node-0")
    state = vs.StateStore(fleet_config(checkpoint_dir=str(tmp_path / vs.FLEET_DIR)),
                          make_trainer(tmp_path / vs.FLEET_DIR, n_features=N_FEATURES, hidden=8))
    state.restore()
    state.sources = {"vmafx-node-0": state.sources.pop(name)}  # as an older version kept it
    vs.save_fleet_state(state, {})
    assert vs.fleet_cursor(tmp_path / "vmafx-node-0") == 10  # read by name until the fleet runs
    assert vs.fleet(tmp_path, fleet_config()) == vs.FLEET_NOTHING_NEW  # nothing read again
    logged(tmp_path / "vmafx-node-0", [sample(i, rng) for i in range(11, 16)])
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert fleet_state(tmp_path)["samples_accepted"] == 15 and fleet_state(tmp_path)["sources"] == {name: 15}


def test_a_log_set_aside_with_samples_the_fleet_had_not_read_is_a_gap_both_report(tmp_path, caplog, capsys):
    """A log moved aside (VMAFX_SIDECAR_N_FEATURES changed by mistake, then back) took 15 samples the fleet had not
    read: the new log began with its own origin, which hid them from the fleet's gap report and its status. The
    fleet's state and cursors.json agree on its position: none of the gap was "read by the fleet state set aside
    since" (mutation hunt: an INFO line saying so for samples 11 to 10 passed)."""
    rng = np.random.default_rng(31)
    node = tmp_path / "vmafx-node-0"
    replica(tmp_path, "vmafx-node-0", [sample(i, rng) for i in range(1, 11)])
    assert vs.fleet(tmp_path, fleet_config()) == 0
    replica(tmp_path, "vmafx-node-0", [sample(i, rng) for i in range(11, 26)])
    assert vs.SampleLog(node, N_FEATURES + 1).samples_dropped == 15  # set aside, 15 of its samples unread
    logged(node, [sample(i, rng) for i in range(26, 31)])  # back to N_FEATURES: the log numbers on
    capsys.readouterr()
    vs.fleet_status(tmp_path, N_FEATURES)
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[1:4] == ["30", "10", "5"] and row[5] == "15"  # logged, read, lag, missing
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert fleet_state(tmp_path)["samples_accepted"] == 15
    said = [r.getMessage() for r in caplog.records if "vmafx-node-0: samples" in r.getMessage()]
    assert len(said) == 1 and "samples 11 to 25 are not in its log" in said[0], said


def test_fleet_status_counts_a_gap_within_the_unread_samples_as_missing_not_as_lag(tmp_path, capsys):
    rng = np.random.default_rng(37)
    replica(tmp_path, "vmafx-node-0", [sample(i, rng) for i in range(1, 101)])
    logged(tmp_path / "vmafx-node-0", [sample(i, rng) for i in range(201, 301)])  # 101 to 200 with the log off
    vs.fleet_status(tmp_path, N_FEATURES)
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[1:4] == ["300", "0", "200"] and row[5] == "100"  # logged, read, lag, missing


@pytest.mark.parametrize("kind", ["sample log", "snapshot"])
def test_what_is_set_aside_twice_within_a_second_is_kept_twice(tmp_path, monkeypatch, kind):
    """The name of what is set aside has the time to the second: a second one (a restart loop) crashed the start
    on the sample log's directory, and would have replaced a snapshot set aside before."""
    monkeypatch.setattr(vs.time, "strftime", lambda *args: "20261201T000000")
    if kind == "sample log":
        for n_features in (N_FEATURES, N_FEATURES + 1, N_FEATURES):
            log = vs.SampleLog(tmp_path, n_features)
            log.append(vs.LoggedSample(log.last_sequence + 1, 1.0, False, None, np.zeros(n_features, np.float32),
                                       np.float32(1)))
            log.commit(10**9)
        assert len(list(tmp_path.glob(f"{vs.SAMPLE_LOG_DIR}.20261201T000000*.set-aside"))) == 2
        assert log.samples_dropped == 1  # the second log's one sample, not the first's again
    else:
        store = vs.StateStore(vs.Config(checkpoint_dir=str(tmp_path), n_features=N_FEATURES),
                              make_trainer(tmp_path, n_features=N_FEATURES))
        for content in (b"first", b"second"):
            store.snapshot_path.write_bytes(content)
            store.move_aside(store.snapshot_path, "corrupt (test)")
        assert sorted(p.read_bytes() for p in store.directory.glob("snapshot.bin.20261201T000000*")) == [
            b"first", b"second"]
def test_a_replica_reached_by_two_names_is_read_once(tmp_path, caplog):
    rng = np.random.default_rng(23)
    replica(tmp_path, "vmafx-node-1", [sample(i, rng) for i in range(1, 21)])
    (tmp_path / "vmafx-node-0").symlink_to(tmp_path / "vmafx-node-1")  # sorts first, and is not the replica
    caplog.set_level(logging.WARNING, logger="vmafx_sidecar")
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert fleet_state(tmp_path)["samples_accepted"] == 20
    assert "vmafx-node-0 skipped: it is a directory read under another name" in caplog.text
    assert positions(tmp_path) == {"vmafx-node-1": 20}


def test_a_replica_the_fleet_may_not_search_is_skipped_and_the_others_read(tmp_path, monkeypatch, caplog, capsys):
    rng = np.random.default_rng(24)
    for name in ("vmafx-node-0", "vmafx-node-1"):
        replica(tmp_path, name, [sample(i, rng) for i in range(1, 11)])
    locked = tmp_path / "vmafx-node-0" / vs.SAMPLE_LOG_DIR
    real_is_dir = Path.is_dir

    def is_dir(path):  # as a mode-000 directory answers a process without root's override
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_is_dir(path)
    monkeypatch.setattr(Path, "is_dir", is_dir)
    caplog.set_level(logging.WARNING, logger="vmafx_sidecar")
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert fleet_state(tmp_path)["samples_accepted"] == 10 and "vmafx-node-0 skipped: Permission denied" in caplog.text
    capsys.readouterr()
    assert vs.fleet_status(tmp_path, N_FEATURES) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].startswith("vmafx-node-0") and "unreadable: [Errno 13] Permission denied" in rows[1]


@pytest.mark.parametrize("status", [False, True], ids=["fleet", "fleet --status"])
@pytest.mark.parametrize("root", ["missing", "a file"])
def test_a_fleet_root_that_is_no_directory_fails_in_one_line_and_creates_nothing(tmp_path, root, status):
    path = tmp_path / "typo"
    if root == "a file":
        path.write_text("")
    done = subprocess.run([sys.executable, "-m", "vmafx_sidecar", "fleet", str(path), *(["--status"] if status else [])],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, **NUMERIC_ENV}, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"fleet: {path} is not a directory" in done.stderr
    assert path.exists() == (root == "a file") and not (tmp_path / "typo" / "fleet").exists()


def test_a_fleet_model_record_without_its_time_is_no_fleet_model_to_a_replica(tmp_path):
    (tmp_path / vs.FLEET_DIR).mkdir()
    record = {"format": vs.RECORD_FORMAT, "version": 3, "file": "model_v000003.onnx", "sha256": "0" * 64}
    (tmp_path / vs.FLEET_DIR / vs.LATEST).write_text(json.dumps(record))
    assert vs.fleet_model(tmp_path / vs.FLEET_DIR) is None  # a scrape or a status used to raise KeyError here
    (tmp_path / vs.FLEET_DIR / vs.LATEST).write_text(json.dumps({**record, "created_unix": time.time() - 60}))
    assert vs.fleet_model(tmp_path / vs.FLEET_DIR)["version"] == 3


@pytest.mark.parametrize("latest", [
    "[" * 100_000,  # nested past the parser's recursion limit: a scrape or a status op stopped the sidecar
    '{"format": 2, "version": 3, "file": "model_v000003.onnx", "sha256": "0", "created_unix": 1' + "0" * 400 + "}",
    '{"format": 2, "version": 3, "file": "model_v000003.onnx", "sha256": "0", "created_unix": Infinity}',
    '{"format": 2, "version": true, "file": "model_v000001.onnx", "sha256": "0", "created_unix": 1.0}',
], ids=["nested", "huge time", "infinite time", "version true"])
def test_a_damaged_fleet_record_or_cursor_file_is_no_fleet_model_and_no_position(tmp_path, latest):
    """What a replica reads of the fleet's files, for its metrics, its status op and its log's retention: a
    hand-edited or damaged file is none, never an exception in the serving loop or a value JSON cannot carry."""
    (tmp_path / vs.FLEET_DIR).mkdir()
    (tmp_path / vs.FLEET_DIR / vs.LATEST).write_text(latest)
    (tmp_path / vs.FLEET_DIR / vs.FLEET_CURSORS).write_text(
        latest.replace('"version"', '"sources": {"node": Infinity}, "v"') if latest[0] == "{" else latest)
    assert vs.fleet_model(tmp_path / vs.FLEET_DIR) is None
    assert vs.fleet_cursor(tmp_path / "node") == 0


@pytest.mark.parametrize("kind", ["a FIFO", "larger than a record"])
def test_a_fifo_or_a_huge_file_among_the_fleet_files_is_no_fleet_model_and_no_position(tmp_path, kind):
    """A replica reads these at every scrape and status op and at its log's retention: open() of a FIFO without a
    writer held its loop for good, and a file of any size was read whole each time."""
    fleet = tmp_path / vs.FLEET_DIR
    fleet.mkdir()
    record = {"format": vs.RECORD_FORMAT, "version": 3, "file": "model_v000003.onnx", "sha256": "0" * 64,
              "created_unix": time.time(), "sources": {"node": 5}}  # a record and a cursor file in one
    for name in (vs.LATEST, vs.FLEET_CURSORS):
        if kind == "a FIFO":
            os.mkfifo(fleet / name)
        else:
            (fleet / name).write_text(json.dumps(record) + " " * vs.SMALL_FILE_MAX)
    read = ("import sys, pathlib, vmafx_sidecar as vs; root = pathlib.Path(sys.argv[1]); "
            "print(vs.fleet_model(root / vs.FLEET_DIR), vs.fleet_cursor(root / 'node'))")
    # In a process of its own: a signal cannot be trusted to reach a thread held in open().
    done = subprocess.run([sys.executable, "-c", read, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert done.returncode == 0 and done.stdout == "None 0\n", done.stdout + done.stderr


@pytest.mark.parametrize("damage", ["header cut short", "not a segment"])
def test_a_replica_with_a_half_written_or_foreign_segment_is_skipped_with_one_line(tmp_path, caplog, damage):
    replica(tmp_path, "good", [sample(i, np.random.default_rng(18)) for i in range(1, 11)])
    bad = tmp_path / "bad" / vs.SAMPLE_LOG_DIR
    bad.mkdir(parents=True)
    (bad / f"{1:016d}.seg").write_bytes(vs.SEGMENT_MAGIC[:7] if damage == "header cut short" else b"x" * 64)
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert positions(tmp_path) == {"good": 10}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fleet: bad")]
    assert len(lines) == 1 and "not a sample log segment" in lines[0], lines


def test_a_fleet_run_whose_state_cannot_be_saved_fails_without_moving_the_replicas_cursors(tmp_path, monkeypatch):
    replica(tmp_path, "vmafx-node-0", [sample(i, np.random.default_rng(19)) for i in range(1, 21)])
    assert vs.fleet(tmp_path, fleet_config()) == 0
    replica(tmp_path, "vmafx-node-0", [sample(i, np.random.default_rng(20)) for i in range(21, 41)])

    def refused(path, chunks, mode=0o644):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(vs, "write_synced", refused)
    with pytest.raises(vs.StartupError, match="cannot save the fleet trainer's state"):
        vs.fleet(tmp_path, fleet_config())
    monkeypatch.undo()
    assert vs.fleet_cursor(tmp_path / "vmafx-node-0") == 20  # retention keeps 21..40 for the next run
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert fleet_state(tmp_path)["samples_accepted"] == 40


@pytest.mark.parametrize("cut", ["taken", "refused"])
def test_a_write_the_disk_cut_short_is_redone_whole(tmp_path, monkeypatch, cut):
    """The torn part is cut before the batch is written again. With that cut refused as the write failed, it
    must be cut before the next write: a mutant that did not left it in the segment, where the reader skipped it
    and the file kept it (mutation hunt)."""
    rng = np.random.default_rng(21)
    written = [sample(i, rng) for i in range(1, 31)]
    log = logged(tmp_path, written[:10])

    def refused_cut(fd, size):
        raise OSError(5, "Input/output error")

    def torn(fd, content):  # the disk takes half of the next batch, then refuses it
        os.write(fd, bytes(content)[:len(content) // 2])
        if cut == "refused":
            monkeypatch.setattr(vs.os, "ftruncate", refused_cut)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(vs, "write_all", torn)
    for s in written[10:20]:
        log.append(s)
    with pytest.raises(OSError):
        log.commit(10**9)
    monkeypatch.undo()
    for s in written[20:]:
        log.append(s)
    log.commit(10**9)  # the pending batch and the new one, after the torn half is cut away
    assert_same(read_all(tmp_path), written)
    (tmp_path / "clean").mkdir()
    logged(tmp_path / "clean", written)  # the same records, never torn
    assert [p.read_bytes() for p in vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)] == [
        p.read_bytes() for p in vs.segment_paths(tmp_path / "clean" / vs.SAMPLE_LOG_DIR)]


def test_a_refused_sample_log_write_is_logged_once_and_retried(tmp_path, monkeypatch, caplog):
    trainer = make_trainer(tmp_path, n_features=N_FEATURES, sample_log="1")
    store = vs.StateStore(trainer.config, trainer)
    store.restore()
    real_write_all = vs.write_all
    refusing = {"on": True}

    def write_all(fd, content):  # the journal's writes go through, the log's are refused
        if refusing["on"] and fd != store.journal.fd:
            raise OSError(28, "No space left on device")
        real_write_all(fd, content)
    monkeypatch.setattr(vs, "write_all", write_all)
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    rng = np.random.default_rng(23)
    rows = [rng.uniform(0, 1, N_FEATURES).astype(np.float32) for _ in range(30)]
    for i, row in enumerate(rows):
        store.record_sample(row, np.float32(50), False, f"job-{i}")
        trainer.ingest(row, np.float32(50), False, False)
        store.commit()  # a batch per sample: 20 refused, then 10 written with all before them
        if i == 19:
            refusing["on"] = False
    messages = [r.getMessage() for r in caplog.records if "sample log" in r.getMessage()]
    assert sum("write failed" in m for m in messages) == 1 and any("work again" in m for m in messages), messages
    assert [x.sequence for x in vs.read_log(tmp_path, N_FEATURES)] == list(range(1, 31))


@pytest.mark.parametrize("case", ["a snapshot due", "a journal removed meanwhile"])
def test_a_snapshot_gives_up_the_samples_the_log_refused_counted(tmp_path, monkeypatch, caplog, case):
    """The log refuses a write, then a snapshot is due (the interval's, a checkpoint's, a SIGTERM's last, or one for a
    journal removed while the sidecar ran): it empties the journal, their one copy on disk, and after the restart
    they never reached the log, nor were counted as dropped (the server-code read). Now they are counted, and the
    fleet reports them as a gap."""
    trainer = make_trainer(tmp_path, n_features=N_FEATURES, sample_log="1")
    store = vs.StateStore(trainer.config, trainer)
    store.restore()
    real_write_all = vs.write_all
    refusing = {"on": False}

    def write_all(fd, content):  # the log's segment (a new one's header too); the journal's and the snapshot's go
        if refusing["on"] and (fd == store.samples.fd or bytes(content[:len(vs.SEGMENT_MAGIC)]) == vs.SEGMENT_MAGIC):
            raise OSError(5, "Input/output error")
        real_write_all(fd, content)
    monkeypatch.setattr(vs, "write_all", write_all)
    rng = np.random.default_rng(8)

    def accept(into: vs.StateStore, n: int) -> None:
        for _ in range(n):
            row = rng.uniform(0, 1, N_FEATURES).astype(np.float32)
            into.record_sample(row, np.float32(50), False, None)
            into.trainer.ingest(row, np.float32(50), False, True)
            into.commit()
    accept(store, 10)
    refusing["on"] = True
    accept(store, 10)
    if case == "a snapshot due":
        store.save()
    else:
        shutil.rmtree(tmp_path / ".state")
        store.journal_checked -= 2  # a second later
        store.tick()
    assert store.samples.samples_dropped == 10 and not store.samples.pending
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    store.commit()  # a turn that logged nothing (a ping, a rejected line) says nothing of the disk
    assert store.sample_write_outage.ongoing and "work again" not in caplog.text
    again = vs.StateStore(store.config, make_trainer(tmp_path, n_features=N_FEATURES, sample_log="1"))
    refusing["on"] = False
    again.restore()  # as after a kill
    assert again.trainer.samples_accepted == 20
    accept(again, 1)
    assert [x.sequence for x in vs.read_log(tmp_path, N_FEATURES)] == [*range(1, 11), 21]


def test_a_snapshot_logs_the_samples_that_waited_for_the_journal_not_give_them_up(tmp_path, monkeypatch):
    """The log's samples wait for the journal's refused writes (a logged sample is always a journaled one); once a
    snapshot holds them they may be logged. They were given up, the log blamed (the third review)."""
    trainer = make_trainer(tmp_path, n_features=N_FEATURES, sample_log="1")
    store = vs.StateStore(trainer.config, trainer)
    store.restore()
    real_write_all, refusing = vs.write_all, {"on": False}

    def write_all(fd, content):  # the journal's writes only
        if refusing["on"] and fd == store.journal.fd:
            raise OSError(5, "Input/output error")
        real_write_all(fd, content)
    monkeypatch.setattr(vs, "write_all", write_all)
    rng = np.random.default_rng(1)
    for i in range(10):
        refusing["on"] = i >= 5
        row = rng.uniform(0, 1, N_FEATURES).astype(np.float32)
        store.record_sample(row, np.float32(50), False, None)
        trainer.ingest(row, np.float32(50), False, True)
        store.commit()
    store.save()  # the snapshot is written: it holds samples 6 to 10
    assert [x.sequence for x in vs.read_log(tmp_path, N_FEATURES)] == list(range(1, 11))
    assert store.samples.samples_dropped == 0


@pytest.mark.parametrize("refused", ["the log's", "the journal's"])
def test_samples_given_up_in_a_long_outage_are_counted_as_dropped(tmp_path, monkeypatch, refused):
    """The log's waiting samples stay within JOURNAL_MEMORY_LIMIT in an outage of its own writes or of the journal's,
    which they wait for: in a long journal outage they were kept without bound (~420 bytes a sample), the journal's
    own records bounded, until the pod ran out of memory."""
    trainer = make_trainer(tmp_path, n_features=N_FEATURES, sample_log="1")
    store = vs.StateStore(trainer.config, trainer)
    store.restore()
    monkeypatch.setattr(vs, "JOURNAL_MEMORY_LIMIT", 300)  # a record: memory stays bounded that soon
    real_write_all = vs.write_all
    refusing = {"on": True}

    def write_all(fd, content):
        if refusing["on"] and (fd == store.journal.fd) == (refused == "the journal's"):
            raise OSError(28, "No space left on device")
        real_write_all(fd, content)
    monkeypatch.setattr(vs, "write_all", write_all)
    rng = np.random.default_rng(5)
    for i in range(40):
        row = rng.uniform(0, 1, N_FEATURES).astype(np.float32)
        store.record_sample(row, np.float32(50), False, f"job-{i}")
        trainer.ingest(row, np.float32(50), False, False)
        store.commit()
        assert len(store.samples.pending) <= vs.JOURNAL_MEMORY_LIMIT
        refusing["on"] = i < 30
    logged = [x.sequence for x in vs.read_log(tmp_path, N_FEATURES)]
    assert 0 < len(logged) < 40 and logged == sorted(logged) and logged[-1] == 40
    assert store.samples.samples_dropped == 40 - len(logged)


@pytest.mark.parametrize("left", ["refused", "empty"], ids=["its write refused", "left empty by a crash"])
def test_a_log_origin_the_disk_refused_is_written_when_it_takes_it(tmp_path, monkeypatch, left):
    """A replica that starts logging late writes where its log begins: written in place, a refused write (or a kill
    after the open) had left it empty for good, read as 1, and the fleet reported every earlier sample missing."""
    rng = np.random.default_rng(19)
    log = vs.SampleLog(tmp_path, N_FEATURES)
    log.append(sample(5001, rng))
    real_write_whole = vs.write_whole

    def full(path, content, mode=0o644):
        if path.name == vs.LOG_ORIGIN:
            raise OSError(28, "No space left on device")
        real_write_whole(path, content, mode)
    if left == "refused":
        monkeypatch.setattr(vs, "write_whole", full)
        with pytest.raises(OSError):
            log.commit(10**9)
        monkeypatch.undo()
    else:
        (tmp_path / vs.SAMPLE_LOG_DIR / vs.LOG_ORIGIN).write_bytes(b"")
    log.commit(10**9)  # retried with the next batch, as any refused write
    assert vs.log_origin(tmp_path) == 5001 and [s.sequence for s in read_all(tmp_path)] == [5001]
    # One lost once segments exist (an older version's log, say) is the first segment's, not the next one's.
    (tmp_path / vs.SAMPLE_LOG_DIR / vs.LOG_ORIGIN).write_bytes(b"")
    os.close(log.fd)
    log.fd, log.size = None, 0  # the next batch opens a segment
    log.append(sample(5002, rng))
    log.commit(10**9)
    assert vs.log_origin(tmp_path) == 5001 and [s.sequence for s in read_all(tmp_path)] == [5001, 5002]


def test_a_log_under_a_bound_smaller_than_a_segment_stays_within_it_and_a_quarter(tmp_path):
    """Segments of 16 MiB under a bound of 4 MiB had let the log reach 16.9 MB, then drop every unread sample of
    the segment at once as it closed: a segment is now a quarter of the bound."""
    rng = np.random.default_rng(20)
    bound = 40_000
    log = vs.SampleLog(tmp_path, N_FEATURES)
    peak = 0
    for start in range(1, 2001, 50):
        append_each(log, [sample(i, rng) for i in range(start, start + 50)], bound)
        peak = max(peak, sum(p.stat().st_size for p in vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)))
    assert vs.segment_bytes(bound) == bound // 4 and peak <= bound * 5 // 4 + 200  # and one record
    kept = read_all(tmp_path)
    assert kept[-1].sequence == 2000 and log.samples_dropped == kept[0].sequence - 1
    assert kept[0].sequence > 1 and 2000 - kept[0].sequence > 0.6 * bound / 75  # most of the bound's worth is kept


def test_an_origin_past_the_logs_oldest_segment_is_not_taken_for_where_it_began(tmp_path, caplog):
    """A bit flipped in the origin's digits ("1" to "5"): the fleet skipped the samples below it in silence, and its
    --status showed no lag for them (the flip hunt)."""
    rng = np.random.default_rng(33)
    node = tmp_path / "vmafx-node-0"
    replica(tmp_path, node.name, [sample(i, rng) for i in range(1, 21)])
    (node / vs.SAMPLE_LOG_DIR / vs.LOG_ORIGIN).write_text("5\n")
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert fleet_state(tmp_path)["samples_accepted"] == 20
    assert f"sample log {node / vs.SAMPLE_LOG_DIR}: origin says 5, its oldest segment begins at 1" in caplog.text


def test_cursors_ahead_of_the_fleet_state_are_said_not_taken_for_a_state_set_aside(tmp_path, caplog):
    """cursors.json past the fleet state's position (a bit flipped in a digit, 10 to 30): the replica's retention
    deleted what lay between as read, and the next run said those samples "were read by the fleet state set aside
    since", a state that was never set aside (the flip hunt)."""
    rng = np.random.default_rng(32)
    node = tmp_path / "vmafx-node-0"
    replica(tmp_path, node.name, [sample(i, rng) for i in range(1, 11)])
    assert vs.fleet(tmp_path, fleet_config()) == 0
    cursors = tmp_path / vs.FLEET_DIR / vs.FLEET_CURSORS
    content = json.loads(cursors.read_text())
    cursors.write_text(json.dumps({**content, "sources": {key: 30 for key in content["sources"]}}))
    logged(node, [sample(i, rng) for i in range(11, 21)])
    logged(node, [sample(i, rng) for i in range(21, 41)])  # its retention deletes 11 to 20, read by the cursor
    assert [int(p.name[:16]) for p in vs.segment_paths(node / vs.SAMPLE_LOG_DIR)] == [21]
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert fleet_state(tmp_path)["samples_accepted"] == 30
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "set aside since" in m], messages
    assert f"fleet: {node.name}: cursors.json says 30 of its samples were read, the fleet state 10 (a state put " \
           "back from an older copy, or the file damaged)" in caplog.text
    assert any("samples 11 to 20 are not in its log" in m for m in messages), messages


def test_samples_a_fleet_state_set_aside_had_read_are_not_reported_lost(tmp_path, caplog):
    """A fleet state set aside (another model, a corrupt snapshot) takes its positions with it: the next run reads
    each log from its start, and the segments the earlier state had read and retention deleted were reported as
    given up unread (a size bound or an outage), the fleet's own "missing" 0 before the run."""
    rng = np.random.default_rng(31)
    node = tmp_path / "vmafx-node-0"
    replica(tmp_path, node.name, [sample(i, rng) for i in range(1, 11)])
    assert vs.fleet(tmp_path, fleet_config()) == 0
    for segment in vs.segment_paths(node / vs.SAMPLE_LOG_DIR):  # deleted as read, as the replica's retention does
        segment.unlink()
    logged(node, [sample(i, rng) for i in range(11, 21)])
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    assert vs.fleet(tmp_path, fleet_config(hidden=16)) == 0  # another model: the state is set aside
    assert fleet_state(tmp_path)["samples_accepted"] == 10
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "not in its log" in m], messages
    assert any("samples 1 to 10 were read by the fleet state set aside since" in m for m in messages), messages


def test_a_fleet_run_says_what_it_published_in_the_runbooks_words(tmp_path, caplog):
    """It said `latest vNone` while nothing was published, where the runbook quotes `latest vV`."""
    rng = np.random.default_rng(41)
    replica(tmp_path, "vmafx-node-0", [sample(i, rng) for i in range(1, 41)])
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    assert vs.fleet(tmp_path, fleet_config()) == 0  # no checkpoint due
    assert "fleet run: 40 samples ingested, step 2, nothing published yet" in caplog.text
    replica(tmp_path, "vmafx-node-0", [sample(i, rng) for i in range(41, 81)])
    caplog.clear()
    assert vs.fleet(tmp_path, fleet_config(min_samples_ckpt=10, gate="off")) == 0
    assert re.search(r"fleet run: 40 samples ingested, step \d+, latest v000001$", caplog.text, re.M), caplog.text


# ---- boundaries: a segment's size, the bound, the fleet's position, a torn write, MIN_SAMPLES_CKPT ----

def unnamed(sequence: int, rng: np.random.Generator) -> vs.LoggedSample:
    """A sample whose record has the same size as every other unnamed one's."""
    return sample(sequence, rng, job_id=None)


def record_bytes() -> int:
    return vs.SAMPLE_RECORD.size + 2 + 4 * N_FEATURES + 4


def test_a_segment_filled_exactly_to_its_size_ends_there(tmp_path, monkeypatch):
    """A segment holding exactly its size took the next batch too, and grew past it. (mutation hunt)"""
    monkeypatch.setattr(vs, "SEGMENT_BYTES", vs.SEGMENT_HEADER.size + 4 * record_bytes())
    rng = np.random.default_rng(51)
    append_each(vs.SampleLog(tmp_path, N_FEATURES), [unnamed(i, rng) for i in range(1, 10)])
    paths = vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)
    assert [p.name[:16] for p in paths] == [f"{first:016d}" for first in (1, 5, 9)]
    assert [p.stat().st_size for p in paths[:2]] == [vs.SEGMENT_BYTES] * 2


def test_a_log_exactly_at_its_bound_deletes_nothing_unread(tmp_path, monkeypatch):
    """The bound is the most the log may hold: a log of exactly that size had its oldest unread segment deleted,
    its samples counted as lost. (mutation hunt)"""
    monkeypatch.setattr(vs, "SEGMENT_BYTES", vs.SEGMENT_HEADER.size + 5 * record_bytes())
    rng = np.random.default_rng(53)
    log = vs.SampleLog(tmp_path, N_FEATURES)
    append_each(log, [unnamed(i, rng) for i in range(1, 21)])  # four full segments, nothing read
    bound = sum(p.stat().st_size for p in vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)) + vs.SEGMENT_HEADER.size
    assert vs.segment_bytes(bound) == vs.SEGMENT_BYTES
    append_each(log, [unnamed(21, rng)], bound)  # a fifth segment begins: the log is then exactly at the bound
    assert log.samples_dropped == 0
    assert [s.sequence for s in read_all(tmp_path)] == list(range(1, 22))


def test_a_segment_the_fleet_has_read_to_its_last_record_is_deleted_as_the_next_begins(tmp_path, monkeypatch):
    """A segment read whole, its last record being the fleet's position, was kept until the size bound took it.
    (mutation hunt)"""
    monkeypatch.setattr(vs, "SEGMENT_BYTES", vs.SEGMENT_HEADER.size + 5 * record_bytes())
    rng = np.random.default_rng(54)
    node = tmp_path / "vmafx-node-0"
    node.mkdir()
    log = vs.SampleLog(node, N_FEATURES)
    append_each(log, [unnamed(i, rng) for i in range(1, 6)])  # one full segment: 1..5
    assert vs.fleet(tmp_path, fleet_config()) == 0
    assert vs.fleet_cursor(node) == 5
    append_each(log, [unnamed(6, rng)])  # the next segment begins
    assert [p.name[:16] for p in vs.segment_paths(node / vs.SAMPLE_LOG_DIR)] == [f"{6:016d}"]
    assert log.samples_dropped == 0


def test_a_full_segment_is_synced_before_it_is_closed(tmp_path, monkeypatch):
    """With JOURNAL_FSYNC=everysec only the segment being written is synced: one closed without a sync of its own
    was never synced, and a power loss could take its samples. (mutation hunt)"""
    monkeypatch.setattr(vs, "SEGMENT_BYTES", vs.SEGMENT_HEADER.size + 3 * record_bytes())
    rng = np.random.default_rng(55)
    log = vs.SampleLog(tmp_path, N_FEATURES)
    append_each(log, [unnamed(i, rng) for i in range(1, 4)])  # one full segment, not synced yet
    synced, real_fsync = set(), os.fsync

    def fsync(fd):
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)
    monkeypatch.setattr(vs.os, "fsync", fsync)
    first = vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)[0]
    append_each(log, [unnamed(4, rng)])  # the next segment begins
    assert first.stat().st_ino in synced


def test_an_unreadable_segment_counts_unread_only_the_records_after_the_fleets_position(tmp_path):
    """Counted from its name where it cannot be read: the record at the fleet's position, read already, was
    counted as lost too. (mutation hunt)"""
    gone = tmp_path / f"{1:016d}.seg"  # holds 1..10 (the next segment begins at 11); here: cannot be read
    assert vs.unread_records(gone, 5, 11) == 5
    assert vs.unread_records(gone, 0, 11) == 10 and vs.unread_records(gone, 10, 11) == 0


def test_a_fleet_run_with_exactly_min_samples_ckpt_trained_publishes(tmp_path):
    """MIN_SAMPLES_CKPT is the least a checkpoint needs: a run that had trained exactly that many published
    nothing. (mutation hunt)"""
    replica(tmp_path, "vmafx-node-0", [sample(i, np.random.default_rng(56)) for i in range(1, 101)])
    assert vs.fleet(tmp_path, fleet_config(gate="off")) == 0  # MIN_SAMPLES_CKPT 10**9: nothing published
    trained = fleet_state(tmp_path)["samples_since_checkpoint"]
    assert trained > 0 and not (tmp_path / vs.FLEET_DIR / "latest.json").exists()
    assert vs.fleet(tmp_path, fleet_config(gate="off", min_samples_ckpt=trained)) == vs.FLEET_NOTHING_NEW
    latest = tmp_path / vs.FLEET_DIR / "latest.json"
    assert latest.exists(), f"nothing published with {trained} samples trained and MIN_SAMPLES_CKPT {trained}"
    assert json.loads(latest.read_text())["version"] == 1
