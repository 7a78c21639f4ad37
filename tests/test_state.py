"""Snapshot + journal: a restart, clean or kill -9, continues bit for bit as if it never happened."""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import errno
import os
import re
import selectors
import shutil
import signal
import socket
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import vmafx_sidecar as vs
from conftest import ACK_TIMEOUT_S, RELU, make_trainer, sample

SETTINGS = dict(VMAFX_SIDECAR_BATCH_SIZE="8", VMAFX_SIDECAR_REPLAY_CAPACITY="64", VMAFX_SIDECAR_LR="0.01",
                VMAFX_SIDECAR_CKPT_INTERVAL_S="0", VMAFX_SIDECAR_MIN_SAMPLES_CKPT="40", VMAFX_SIDECAR_N_FEATURES="5",
                VMAFX_SIDECAR_HIDDEN="7", VMAFX_SIDECAR_HOLDOUT_FRACTION="0.2", VMAFX_SIDECAR_EVAL_CAPACITY="16",
                VMAFX_SIDECAR_GATE_MIN_EVAL="4")
BASE_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ts_relu_op17.onnx"  # 6 features, relu
TOTAL, STOP_AT = 150, 73  # 73: mid-batch (4 new samples a step), after a checkpoint and its snapshot


def messages(n: int = TOTAL) -> list[dict]:
    rng = np.random.default_rng(11)  # every third without a job_id: both ways of holding samples out
    return [sample(rng, 5, job_id=None if i % 3 == 0 else f"job-{i}") for i in range(n)]


def read_snapshot(directory: Path) -> tuple[dict, dict[str, np.ndarray]]:
    data = (directory / ".state" / "snapshot.bin").read_bytes()
    return vs.unpack_arrays(data[len(vs.SNAPSHOT_MAGIC) + vs.SNAPSHOT_HEADER.size:])


def write_snapshot(directory: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """The snapshot in `directory` replaced by one of these fields and arrays, framed and checksummed."""
    payload = b"".join(vs.pack_arrays(meta, arrays))
    framed = vs.SNAPSHOT_MAGIC + vs.SNAPSHOT_HEADER.pack(len(payload), vs.zlib.crc32(payload)) + payload
    (directory / ".state" / "snapshot.bin").write_bytes(framed)


def feed(sidecar, batch: list[dict]) -> list[dict]:
    client = sidecar.client()
    acks = [client.request(m) for m in batch]
    assert all(a["ok"] for a in acks)
    return acks


def assert_same_state(a: Path, b: Path) -> None:
    meta_a, arrays_a = read_snapshot(a)
    meta_b, arrays_b = read_snapshot(b)
    for meta in (meta_a, meta_b):  # wall-clock time, and how many snapshots were taken on the way
        meta.pop("last_checkpoint_unix")
        meta.pop("generation")
        for key in ("created", "created_unix", "sha256"):  # the checkpoint's metadata holds its time
            meta["last_gate"].pop(key)
    assert meta_a == meta_b
    assert arrays_a.keys() == arrays_b.keys()
    for key in arrays_a:
        assert arrays_a[key].tobytes() == arrays_b[key].tobytes(), key


@pytest.fixture
def uninterrupted(sidecar_factory, tmp_path) -> Path:
    (tmp_path / "a").mkdir()
    s = sidecar_factory(workdir=tmp_path / "a", **SETTINGS)
    feed(s, messages())
    assert s.stop() == 0
    return s.checkpoint_dir


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_restart_continues_bit_for_bit(sidecar_factory, tmp_path, uninterrupted, stop):
    (tmp_path / "b").mkdir()
    first = sidecar_factory(workdir=tmp_path / "b", **SETTINGS)
    feed(first, messages()[:STOP_AT])
    first.stop(stop)
    second = sidecar_factory(workdir=tmp_path / "b", **SETTINGS)
    log = second.stderr()
    assert "resumed: step" in log, log
    if stop == signal.SIGKILL:  # the samples after the last snapshot come back from the journal
        assert "0 journal records replayed" not in log, log
    acks = feed(second, messages()[STOP_AT:])
    status = second.client().request({"op": "status"})
    assert status["samples_accepted"] == TOTAL and status["steps"] == acks[-1]["step"]
    assert second.stop() == 0
    assert_same_state(uninterrupted, second.checkpoint_dir)
    meta, _ = read_snapshot(uninterrupted)  # the hold-out was exercised both ways, past a full ring
    assert meta["unnamed_samples"] == TOTAL // 3 and meta["samples_held_out"] > 16 == meta["eval_size"]
    assert meta["last_gate"]["metrics"]["candidate"] is not None


def test_a_restart_with_leaky_relus_default_slope_continues_bit_for_bit(sidecar_factory, tmp_path):
    """The bare leaky_relu's slope was 0.01 in memory and float32's 0.0099999998 in a checkpoint: a restarted
    sidecar's incumbent, read back from latest.onnx, scored other figures in the next records (1e-11 apart) than
    the same incumbent of a sidecar never stopped, where the slope written as leaky_relu(0.01) matched."""
    settings = {**SETTINGS, "VMAFX_SIDECAR_ACTIVATION": "leaky_relu", "VMAFX_SIDECAR_GATE": "off"}  # an incumbent
    directories = []
    for name, stop_at in (("unstopped", TOTAL), ("restarted", STOP_AT)):
        (tmp_path / name).mkdir()
        s = sidecar_factory(workdir=tmp_path / name, **settings)
        feed(s, messages()[:stop_at])
        assert s.stop() == 0
        if stop_at < TOTAL:
            s = sidecar_factory(workdir=tmp_path / name, **settings)
            feed(s, messages()[stop_at:])
            assert s.stop() == 0
        directories.append(s.checkpoint_dir)
    a, b = (sorted(directory.glob("model_v*.json")) for directory in directories)
    assert [p.name for p in a] == [p.name for p in b] and len(a) >= 2  # v2 came after the restart, against v1
    for record_a, record_b in zip(a, b):
        assert json.loads(record_a.read_text())["metrics"] == json.loads(record_b.read_text())["metrics"], record_a.name
    assert_same_state(*directories)


@pytest.mark.parametrize("base_at", ["the first start", "the restart"])
def test_a_state_saved_before_its_first_step_trains_as_it_began_whatever_base_file_is_there_at_the_restart(
        sidecar_factory, tmp_path, base_at):
    """Whether the model is a fresh one (its first step declares it in its first batch's standardized coordinates)
    came from the base file there at this start, not from the state's: a state saved before its first step and
    begun from a base whose file was gone at the restart had the base's weights taken as standardized (coordinates
    "provisional", v1 other weights), and one begun fresh, the file there at the restart, trained in raw ones."""
    base = tmp_path / "base.onnx"
    settings = dict(VMAFX_SIDECAR_N_FEATURES="6", VMAFX_SIDECAR_HIDDEN="8", VMAFX_BASE_MODEL_PATH=str(base),
                    VMAFX_SIDECAR_GATE="off", VMAFX_SIDECAR_MIN_SAMPLES_CKPT="100", VMAFX_SIDECAR_CKPT_INTERVAL_S="0",
                    VMAFX_SIDECAR_HOLDOUT_FRACTION="0", VMAFX_SIDECAR_LR="0.001")
    stream = [sample(np.random.default_rng(3), 6) for _ in range(120)]
    runs = []
    for name, stop_at in (("unstopped", len(stream)), ("restarted", 10)):  # 10: before the first step (16)
        if base_at == "the first start":
            shutil.copy(BASE_FIXTURE, base)
        (tmp_path / name).mkdir()
        s = sidecar_factory(workdir=tmp_path / name, **settings)
        feed(s, stream[:stop_at])
        if stop_at < len(stream):
            assert s.stop() == 0
            if base_at == "the first start":
                base.unlink()
            else:
                shutil.copy(BASE_FIXTURE, base)
            s = sidecar_factory(workdir=tmp_path / name, **settings)
            feed(s, stream[stop_at:])
        v1 = onnx.load(s.checkpoint_dir / "model_v000001.onnx")
        runs.append((s.client().request({"op": "status"})["coordinates"],
                     [numpy_helper.to_array(t).tobytes() for t in v1.graph.initializer]))
        assert s.stop() == 0
        base.unlink(missing_ok=True)
    assert runs[1] == runs[0]


def test_a_state_loaded_onto_this_starts_trainer_takes_its_first_step_as_it_began(tmp_path, monkeypatch):
    """When no twin with the state's own batch settings can be built (rings no memory holds: Trainer.replayer), the
    state loads onto this start's trainer, whose smaller batches its waiting samples fill at once: those steps ran
    before the model was made fresh or not as the state began, its base file gone at the restart."""
    base = tmp_path / "base.onnx"
    shutil.copy(BASE_FIXTURE, base)
    env = base_env(tmp_path, base)
    first = started(env)
    trainer, state = first.trainer, first.state
    for m in messages(10):  # before the first step (16 new samples)
        row, score = np.array(m["features"][:5] + [0.5], np.float32), np.float32(m["true_score"])
        state.record_sample(row, score, False, "job")
        trainer.ingest(row, score, False, False)
    state.save()
    base.unlink()
    monkeypatch.setattr(vs.Trainer, "replayer", lambda self, saved_for: self)  # no twin: as under a memory limit
    trainer, _ = vs.build_trainer(vs.Config.load({**env, "VMAFX_SIDECAR_BATCH_SIZE": "8"}, {}))
    assert trainer.fresh  # a fresh model stands in for the base that is gone
    vs.StateStore(trainer.config, trainer).restore()
    assert trainer.steps == 2 and not trainer.fresh
    assert trainer.coords.standardized == "none"  # the base's weights, in raw coordinates as they began


def base_env(directory: Path, base: Path, **settings: str) -> dict[str, str]:
    """The settings of a 6-feature sidecar on the base model file `base`, its state in `directory`; `settings`
    (VMAFX_* variables) override them."""
    return {**dict(VMAFX_SIDECAR_N_FEATURES="6", VMAFX_SIDECAR_HIDDEN="8", VMAFX_BASE_MODEL_PATH=str(base),
                   VMAFX_SIDECAR_CHECKPOINT_DIR=str(directory / "ckpt"), VMAFX_SIDECAR_SOCKET=str(directory / "s.sock"),
                   VMAFX_SIDECAR_HOLDOUT_FRACTION="0", VMAFX_SIDECAR_SAMPLE_LOG="0", VMAFX_SIDECAR_BATCH_SIZE="32"),
            **settings}


def started(env: dict[str, str]) -> vs.Server:
    """A server in this process with its state restored, as `serve` starts one (no socket)."""
    config = vs.Config.load(env, {})
    trainer, _ = vs.build_trainer(config)
    state = vs.StateStore(config, trainer)
    state.restore()
    return vs.Server(config, trainer, state)


@pytest.mark.parametrize("set_aside", ["unreadable", "incompatible"])
def test_a_state_begun_fresh_and_set_aside_leaves_a_base_model_trained_as_a_start_without_state(tmp_path, set_aside):
    """load_snapshot makes the model fresh or not as the state began; a state set aside (a field edited, another
    model's shape) must leave the flag as this start built it. Left as the state's, a base's weights were taken for
    a fresh model's: its first step declared them in standardized coordinates, a model other than a clean start's."""
    base = tmp_path / "base.onnx"
    stream = [sample(np.random.default_rng(5), 6) for _ in range(40)]

    def env(name: str, hidden: str = "8") -> dict[str, str]:
        return base_env(tmp_path / name, base, VMAFX_SIDECAR_HIDDEN=hidden, VMAFX_SIDECAR_BATCH_SIZE="8")

    first = started(env("restarted", hidden="7" if set_aside == "incompatible" else "8"))  # no base file: fresh
    assert first.trainer.fresh
    for m in stream[:20]:
        assert json.loads(first.answer(json.dumps(m).encode()))["ok"]
    first.state.save()
    if set_aside == "unreadable":
        meta, arrays = read_snapshot(tmp_path / "restarted" / "ckpt")
        meta["steps"] = -1
        write_snapshot(tmp_path / "restarted" / "ckpt", meta, arrays)
    shutil.copy(BASE_FIXTURE, base)  # a base file there at the restart
    runs = []
    for name in ("restarted", "clean"):
        server = started(env(name))
        assert server.trainer.samples_accepted == 0  # the state set aside
        for m in stream:
            assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
        runs.append((server.trainer.coords.standardized, server.trainer.model.flat.tobytes()))
    assert runs[0] == runs[1]


def test_a_snapshot_saved_before_it_named_its_base_is_taken_as_begun_from_this_starts(tmp_path, caplog):
    """A snapshot of a sidecar from before the base_model field began from the base this start reads, as
    load_snapshot says ("saved before it was: taken as this start's"): no warning of another base, the model not
    made fresh, and the base it names on is this start's, saved in the next snapshot."""
    base = tmp_path / "base.onnx"
    shutil.copy(BASE_FIXTURE, base)
    env = base_env(tmp_path, base)
    first = started(env)
    for m in [sample(np.random.default_rng(5), 6) for _ in range(10)]:  # before the first step (32)
        assert json.loads(first.answer(json.dumps(m).encode()))["ok"]
    first.state.save()
    meta, arrays = read_snapshot(tmp_path / "ckpt")
    del meta["base_model"], meta["base_sha256"]  # as an older sidecar wrote it
    write_snapshot(tmp_path / "ckpt", meta, arrays)
    caplog.clear()
    again = started(env)
    assert again.trainer.samples_accepted == 10 and not again.trainer.fresh
    assert "began from base model" not in caplog.text
    assert again.state.base_model == str(base)


def test_start_up_line_says_a_resumed_state_is_resumed(sidecar_factory, tmp_path):
    first = sidecar_factory(**SETTINGS)
    assert "(fresh, seed 0)" in first.stderr()
    acks = feed(first, messages(20))
    assert first.stop() == 0
    serving = [line for line in sidecar_factory(**SETTINGS).stderr().splitlines() if "serving on" in line]
    resumed = f"(resumed from {tmp_path / 'ckpt' / '.state'}, step {acks[-1]['step']})"
    assert len(serving) == 1 and resumed in serving[0], serving
    assert "fresh" not in serving[0]


def test_torn_journal_tail_is_ignored(sidecar_factory, tmp_path):
    s = sidecar_factory(**SETTINGS)
    feed(s, messages()[:STOP_AT])
    s.stop(signal.SIGKILL)
    journal = s.checkpoint_dir / ".state" / "journal.bin"
    intact = journal.stat().st_size
    assert intact > 0
    with open(journal, "ab") as f:
        f.write(vs.JOURNAL_RECORD.pack(24, 0) + b"\x01\x02\x03")  # a record cut short by the crash
    again = sidecar_factory(**SETTINGS)
    assert "torn or corrupt tail" in again.stderr()
    assert again.client().request({"op": "status"})["samples_accepted"] == STOP_AT


@pytest.mark.parametrize("where", [0, 5, 20], ids=["length field", "checksum", "payload"])
def test_a_corrupt_journal_record_costs_its_own_sample_not_those_after_it(tmp_path, where, caplog):
    server = in_process_server(tmp_path)
    lines = [json.dumps(m).encode() for m in messages(10)]
    for line in lines[:6] + [b"[1]"] + lines[6:]:
        server.answer(line)
    server.state.journal.commit()  # killed here: the ten samples and the rejection are in the journal only
    journal = tmp_path / ".state" / "journal.bin"
    data = bytearray(journal.read_bytes())
    data[vs.JOURNAL_HEADER.size + 2 * (vs.JOURNAL_RECORD.size + 4 * 6) + where] ^= 0x01  # in the third record
    journal.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING)
    again = in_process_server(tmp_path)
    assert (again.trainer.samples_accepted, again.trainer.samples_rejected) == (9, 1)
    [copy] = (tmp_path / ".state").glob("journal.bin.*.corrupt")
    assert copy.read_bytes() == bytes(data) and "32 bytes of corrupt records" in caplog.text
    rows = np.concatenate([again.trainer.replay.x[:again.trainer.replay.size], again.trainer.eval.x[:again.trainer.eval.size],
                           again.trainer.held_x[:again.trainer.n_held], again.trainer.pending_x[:again.trainer.n_pending]])
    expected = [np.float32(m["features"]) for i, m in enumerate(messages(10)) if i != 2]
    assert sorted(map(bytes, rows)) == sorted(map(bytes, expected))


def three_journal_records(path: Path) -> bytearray:
    """A journal of generation 1 at `path` with three samples of 2 features, scored 0, 1 and 2; its bytes."""
    journal = vs.Journal(path, "off", 1, 0, 0, vs.JOURNAL_FORMAT)
    for i in range(3):
        journal.append(np.full(2, i, np.float32), np.float32(i), False, False)
    journal.commit()
    return bytearray(path.read_bytes())


def test_a_corrupt_journal_record_followed_by_one_ending_at_the_end_of_the_file_costs_only_itself(tmp_path):
    """The intact record after a corrupt one was not found when it ended exactly at the end of the file: the
    corrupt record was read as a torn tail, and the last ACKed sample was lost with it (mutation hunt)."""
    path = tmp_path / "journal.bin"
    data = three_journal_records(path)
    data[vs.JOURNAL_HEADER.size + (vs.JOURNAL_RECORD.size + 4 * 3) + vs.JOURNAL_RECORD.size] ^= 0x01  # the middle one
    path.write_bytes(bytes(data))
    records, intact, skipped = vs.Journal.read(path, 2, 1)
    assert [r.score for r in records] == [0, 2]
    assert (intact, skipped) == (len(data), vs.JOURNAL_RECORD.size + 4 * 3)


def test_zeros_past_a_journals_last_fsync_are_a_torn_tail_not_rejected_lines(tmp_path, caplog):
    """A power loss can keep a file's length but not its unsynced data: 8 zero bytes were a rejected line's record,
    and the zeros read as hundreds of rejected lines, counted for good in the status (the crash hunt)."""
    again = restarted_on(tmp_path, journal_after_a_snapshot(tmp_path) + bytes(4096))
    assert (again.trainer.samples_accepted, again.trainer.samples_rejected) == (80, 0)
    assert "journal.bin: ignored 4096 bytes of a torn or corrupt tail" in caplog.text


@pytest.mark.parametrize("flag", [vs.HELD_OUT, vs.UNNAMED])
def test_a_flag_flipped_in_a_journal_record_fails_its_checksum(tmp_path, flag):
    """The flags sat outside the checksum: a flipped HELD_OUT trained on a held-out sample (or held one out that had
    been trained on), a flipped UNNAMED moved every later hold-out (the flip hunt). The record is now skipped."""
    path = tmp_path / "journal.bin"
    data = three_journal_records(path)
    second = vs.JOURNAL_HEADER.size + vs.JOURNAL_RECORD.size + 4 * 3
    length = vs.RECORD_LENGTH.unpack_from(data, second)[0]
    vs.RECORD_LENGTH.pack_into(data, second, length ^ flag)
    path.write_bytes(bytes(data))
    records, _, skipped = vs.Journal.read(path, 2, 1)
    assert [(r.score, r.held_out, r.unnamed) for r in records] == [(0, False, False), (2, False, False)]
    assert skipped == vs.JOURNAL_RECORD.size + 4 * 3


def test_a_format_1_journal_is_read_and_continued_in_its_format_until_its_reset(tmp_path):
    """An earlier version's journal, left by a kill: a start whose snapshot the disk then refused appended to it, and
    records of another format after its header would not have read at the next start."""
    path = tmp_path / "journal.bin"
    path.write_bytes(vs.JOURNAL_HEADER.pack(b"VMAFX-JOURNAL-1\n", 3) + vs.JOURNAL_RECORD.pack(0, 0))
    records, intact, _ = vs.Journal.read(path, 2, 3)
    assert records == [None] and intact == len(path.read_bytes())
    journal = vs.Journal(path, "off", 3, intact, 0, vs.Journal.format_of(vs.Journal.header_of(path), 3))
    journal.append(np.ones(2, np.float32), np.float32(5), True, False)
    journal.append_rejection()
    journal.commit()
    records, intact, _ = vs.Journal.read(path, 2, 3)
    assert [r and (r.score, r.held_out) for r in records] == [None, (5, True), None] and intact == path.stat().st_size
    journal.reset(4)
    journal.append(np.ones(2, np.float32), np.float32(6), False, True)
    journal.append_rejection()
    journal.commit()
    assert path.read_bytes().startswith(vs.JOURNAL_MAGIC)
    assert [r and (r.score, r.unnamed) for r in vs.Journal.read(path, 2, 4)[0]] == [(6, True), None]


def test_a_disk_too_full_for_the_copy_of_a_corrupt_journal_still_lets_the_sidecar_start(tmp_path, monkeypatch,
                                                                                        caplog):
    server = in_process_server(tmp_path)
    for m in messages(10):
        server.answer(json.dumps(m).encode())
    server.state.journal.commit()
    journal = tmp_path / ".state" / "journal.bin"
    data = bytearray(journal.read_bytes())
    data[vs.JOURNAL_HEADER.size + 2 * (vs.JOURNAL_RECORD.size + 4 * 6) + 20] ^= 0x01
    journal.write_bytes(bytes(data))
    real_write_bytes = Path.write_bytes

    def write_bytes(path, content):
        if path.name.endswith(".corrupt"):
            real_write_bytes(path, content[:7])  # what fitted
            raise OSError(28, "No space left on device")
        return real_write_bytes(path, content)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    caplog.set_level(logging.WARNING)
    again = in_process_server(tmp_path)
    assert again.trainer.samples_accepted == 9
    assert "no copy could be kept" in caplog.text and not list((tmp_path / ".state").glob("*.corrupt"))


def test_a_state_directory_turned_read_only_costs_snapshots_not_the_process(tmp_path, monkeypatch, caplog):
    """A snapshot refused by a read-only directory (a remount, a changed mode) cannot remove its temp file either:
    that second refusal crashed a serving sidecar, and stopped one from starting over a temp file a kill left."""
    server = in_process_server(tmp_path)
    state_dir = tmp_path / ".state"
    (state_dir / ".snapshot.bin.tmp").write_bytes(b"what a kill mid-snapshot left")
    read_only = OSError(errno.EROFS, "Read-only file system")

    def refused(*args, **kwargs):
        raise read_only
    real_unlink = Path.unlink

    def unlink(path, missing_ok=False):
        if path.parent == state_dir:
            raise read_only
        return real_unlink(path, missing_ok=missing_ok)
    monkeypatch.setattr(vs, "write_synced", refused)
    monkeypatch.setattr(Path, "unlink", unlink)
    for m in messages(10):
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
    server.state.save()  # refused, counted, and the server goes on
    assert server.state.write_failures()["snapshot"] == 1
    again = in_process_server(tmp_path)  # starts: its first snapshot is refused the same way
    assert again.trainer.samples_accepted == 10 and again.state.write_failures()["snapshot"] == 1
    assert caplog.text.count("state snapshot failed, will retry: [Errno 30] Read-only file system") == 2


def test_a_refused_snapshot_is_tried_again_while_no_line_comes(tmp_path, monkeypatch):
    """A refused snapshot counted as taken: with no new line, tick() never tried it again (whatever its "will
    retry"), so a journal that spans a checkpoint (the snapshot after it refused) stayed to be replayed."""
    server = in_process_server(tmp_path, state_interval_s=0.0)
    state = server.state
    for m in messages(10):
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
    with monkeypatch.context() as refusing:
        refusing.setattr(vs, "write_synced", refused)
        state.save()
    assert state.write_failures()["snapshot"] == 1 and state.generation == 1  # the start's snapshot only
    state.tick()  # no new line since: the disk works again
    assert state.generation == 2
    assert read_snapshot(tmp_path)[0]["samples_accepted"] == 10


def test_idle_ticks_write_no_snapshot_when_no_line_came_since_the_last(tmp_path):
    """A snapshot is written when its interval has passed and lines were answered since the last one: an idle
    sidecar rewrote the whole state at every interval for nothing (mutation hunt)."""
    server = in_process_server(tmp_path, state_interval_s=0.0)
    for m in messages(10):
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
    server.state.tick()
    generation = server.state.generation
    for _ in range(5):
        server.state.tick()
    assert server.state.generation == generation


def test_a_snapshot_the_disk_refuses_leaves_no_temp_file(tmp_path, monkeypatch):
    """The temp file a refused snapshot leaves (created, then its writes refused: a full disk) is removed: left
    behind, it holds space the journal and the next snapshot need (mutation hunt)."""
    server = in_process_server(tmp_path)
    for m in messages(10):
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
    server.state.commit()
    monkeypatch.setattr(vs, "write_all", refused)
    server.state.save()
    assert server.state.write_failures()["snapshot"] == 1
    assert sorted(p.name for p in (tmp_path / ".state").iterdir()) == ["journal.bin", "snapshot.bin"]


@pytest.mark.parametrize("where", [0, 21, 22, 29], ids=["magic", "magic's end", "length", "length's end"])
def test_a_bit_flipped_in_the_snapshots_magic_or_length_keeps_the_state(tmp_path, caplog, where):
    """The payload's checksum proved the state intact, yet it was moved aside as "corrupt (bad checksum or
    truncated)" and training started again from the base model (the flip hunt)."""
    server = in_process_server(tmp_path)
    for m in messages(40):
        server.answer(json.dumps(m).encode())
    server.state.save()
    snapshot = tmp_path / ".state" / "snapshot.bin"
    data = bytearray(snapshot.read_bytes())
    data[where] ^= 0x04
    snapshot.write_bytes(data)
    caplog.set_level(logging.WARNING, logger="vmafx_sidecar")
    again = in_process_server(tmp_path)
    assert (again.trainer.samples_accepted, again.trainer.steps) == (40, server.trainer.steps)
    assert "snapshot.bin has a corrupt magic or length, its checksummed payload read all the same" in caplog.text
    assert [p.read_bytes() for p in (tmp_path / ".state").glob("snapshot.bin.*.corrupt")] == [data]


@pytest.mark.parametrize("damage", ["flip-a-byte", "truncate"])
def test_corrupt_snapshot_is_moved_aside_and_training_starts_fresh(sidecar_factory, tmp_path, damage):
    s = sidecar_factory(**SETTINGS)
    feed(s, messages()[:STOP_AT])
    assert s.stop() == 0
    snapshot = s.checkpoint_dir / ".state" / "snapshot.bin"
    data = bytearray(snapshot.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2:]
    else:
        data[len(data) // 2] ^= 0xFF
    snapshot.write_bytes(bytes(data))
    again = sidecar_factory(**SETTINGS, TZ="XST-5:45")  # a pod's local time, 5 h 45 min ahead: no tzdata needed
    assert "corrupt" in again.stderr()
    status = again.client().request({"op": "status"})
    assert status["steps"] == 0 and status["samples_accepted"] == 0
    [aside] = (s.checkpoint_dir / ".state").glob("snapshot.bin.*.corrupt")
    # Its name and the log's times are UTC, as the sidecar's records are: local time, they were hours apart.
    named = datetime.datetime.strptime(aside.name.split(".")[2], "%Y%m%dT%H%M%SZ")
    logged = datetime.datetime.strptime(again.stderr().split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S.%fZ")
    for when in (named, logged):
        assert abs(when.replace(tzinfo=datetime.timezone.utc).timestamp() - time.time()) < 600
    # Checkpoint numbering still continues after what is on disk (published or quarantined).
    feed(again, messages()[:60])
    assert again.client().request({"op": "status"})["gate"]["version"] == 2


def test_incompatible_snapshot_is_moved_aside(sidecar_factory, tmp_path):
    s = sidecar_factory(**SETTINGS)
    feed(s, messages()[:STOP_AT])
    s.stop(signal.SIGKILL)
    again = sidecar_factory(**{**SETTINGS, "VMAFX_SIDECAR_HIDDEN": "9"})
    assert "incompatible" in again.stderr()
    status = again.client().request({"op": "status"})
    assert status["steps"] == 0 and status["model"] == "5-9-1"
    state = s.checkpoint_dir / ".state"
    assert list(state.glob("snapshot.bin.*.incompatible")) and list(state.glob("journal.bin.*.incompatible"))


def test_counters_survive_any_number_of_kills(sidecar_factory, tmp_path):
    sent, rejected = 0, 0
    for round_ in range(4):
        s = sidecar_factory(**SETTINGS)
        client = s.client()
        for m in messages(30):
            assert client.request(m)["ok"]
            sent += 1
        assert not client.request(b"not json")["ok"]
        rejected += 1
        status = client.request({"op": "status"})
        assert status["samples_accepted"] == sent
        s.stop(signal.SIGKILL if round_ % 2 == 0 else signal.SIGTERM)
    final = sidecar_factory(**SETTINGS).client().request({"op": "status"})
    assert final["samples_accepted"] == sent
    assert final["samples_rejected"] == rejected


def test_state_files_are_private(sidecar_factory):
    s = sidecar_factory(**SETTINGS)
    feed(s, messages()[:10])
    assert s.stop() == 0
    state = s.checkpoint_dir / ".state"
    assert state.stat().st_mode & 0o777 == 0o700
    for name in ("snapshot.bin", "journal.bin"):
        assert (state / name).stat().st_mode & 0o777 == 0o600


def in_process_server(directory: Path, **settings) -> vs.Server:
    """A server on a small model with its state restored from `directory`; `settings` (Config fields) override
    its own."""
    trainer = make_trainer(directory, **{"n_features": 5, "hidden": 7, "batch_size": 8, "replay_capacity": 64,
                                         **settings})
    state = vs.StateStore(trainer.config, trainer)
    state.restore()
    return vs.Server(trainer.config, trainer, state)


@pytest.mark.parametrize("name", ["snapshot.bin", "journal.bin"])
def test_a_directory_where_the_state_goes_stops_the_start_in_one_line(tmp_path, name):
    (tmp_path / ".state" / name).mkdir(parents=True)
    with pytest.raises(vs.StartupError, match=re.escape(f"cannot read {tmp_path / '.state' / name}: ")):
        in_process_server(tmp_path)


def test_a_symlink_where_the_journal_goes_stops_the_start_in_one_line(tmp_path):
    """The journal was read through the link, then its writes' O_NOFOLLOW refused it: a traceback, not a line."""
    (tmp_path / ".state").mkdir()
    (tmp_path / "elsewhere.bin").write_bytes(b"")
    journal = tmp_path / ".state" / "journal.bin"
    journal.symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(vs.StartupError, match=re.escape(f"cannot read {journal}: a symlink")):
        in_process_server(tmp_path)


def refused_for(name: str, call, *, writing: bool = False):
    """`call` (os.open, os.unlink, read_small_file) refused with an I/O error for a path ending in `name`; with
    `writing`, only for an open to write."""
    def refused(path, *args, **kwargs):
        if str(path).endswith(name) and (not writing or args[0] & (os.O_WRONLY | os.O_RDWR)):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return call(path, *args, **kwargs)
    return refused


def test_a_journal_that_cannot_be_opened_to_write_stops_the_start_in_one_line(tmp_path, monkeypatch):
    """Its reads said why in one line; its open to write ended the start in a traceback (the strace hunt)."""
    monkeypatch.setattr(vs.os, "open", refused_for("journal.bin", os.open, writing=True))
    journal = tmp_path / ".state" / "journal.bin"
    with pytest.raises(vs.StartupError, match=re.escape(f"cannot write {journal}: Input/output error")):
        in_process_server(tmp_path)


def test_a_sample_log_whose_name_cannot_be_read_stops_the_start_in_one_line(tmp_path, monkeypatch):
    """An I/O error on .samples/id read as a log without a name: the journal's samples then went unlogged, with no
    line, and the snapshot said they need not be (the strace hunt)."""
    in_process_server(tmp_path, sample_log="1").shutdown()
    monkeypatch.setattr(vs, "read_small_file", refused_for(vs.LOG_ID, vs.read_small_file))
    with pytest.raises(vs.StartupError, match=re.escape(f"Input/output error ({tmp_path / '.samples' / vs.LOG_ID})")):
        in_process_server(tmp_path, sample_log="1")


def test_a_socket_file_that_cannot_be_removed_leaves_the_rest_of_the_shutdown_to_run(tmp_path, monkeypatch, caplog):
    """A refused unlink (a read-only remount) escaped shutdown(): the lines clients had sent went unanswered, no
    snapshot was taken, and the process ended in a traceback (the strace hunt)."""
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    trainer = make_trainer(tmp_path / "ckpt", n_features=5, hidden=7, batch_size=8, replay_capacity=64)
    config = dataclasses.replace(trainer.config, socket=str(tmp_path / "s.sock"))
    state = vs.StateStore(config, trainer)
    state.restore()
    server = vs.Server(config, trainer, state)
    server.bind()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(config.socket)
        client.sendall(json.dumps(messages(1)[0]).encode() + b"\n")
        monkeypatch.setattr(vs.os, "unlink", refused_for("s.sock", os.unlink))
        server.shutdown()
        assert json.loads(client.makefile("rb").readline())["ok"] is True
    assert f"cannot remove {config.socket}: Input/output error" in caplog.text
    assert "stopped after 0 steps (1 samples accepted" in caplog.text
    assert read_snapshot(tmp_path / "ckpt")[0]["samples_accepted"] == 1


def test_a_restart_that_names_another_base_model_than_the_states_says_the_state_goes_on(tmp_path, caplog):
    """A state goes on from itself, whatever base model is configured: a new VMAFX_BASE_MODEL_PATH was silently not
    trained, while the status showed it (the ops hunt)."""
    server = in_process_server(tmp_path, base_model_path="")
    for m in messages(40):
        server.answer(json.dumps(m).encode())
    server.state.save()
    caplog.set_level(logging.WARNING, logger="vmafx_sidecar")
    in_process_server(tmp_path, base_model_path="")  # the same base (none: a fresh model): nothing to say
    assert "began from base model" not in caplog.text
    in_process_server(tmp_path, base_model_path=str(tmp_path / "missing.npz"))  # a fresh model all the same
    assert "began from base model" not in caplog.text
    for _ in range(2):  # the state keeps the base it began from, restart after restart
        trainer = make_trainer(tmp_path, **{"n_features": 5, "hidden": 7, "batch_size": 8, "replay_capacity": 64,
                                            "base_model_path": str(tmp_path / "base_v3.npz")})
        trainer.fresh = False  # as build_trainer makes one from a base model it read
        again = vs.StateStore(trainer.config, trainer)
        again.restore()
        again.save()
        assert f"began from base model none (a fresh model), not {tmp_path / 'base_v3.npz'}" in caplog.text
        assert again.trainer.samples_accepted == 40
        caplog.clear()


def test_a_base_model_file_gone_since_the_state_began_is_no_other_base(tmp_path, caplog):
    """Its state went on, yet the start warned that the state began from that base "not none (a fresh model)" and
    advised moving .state/ out to train from the base: from a fresh model, the base's file being gone (the words
    hunt)."""
    base = tmp_path / "base.npz"

    def restarted(fresh: bool) -> vs.StateStore:
        trainer = make_trainer(tmp_path, n_features=5, hidden=7, batch_size=8, replay_capacity=64,
                               base_model_path=str(base))
        trainer.fresh = fresh  # as build_trainer makes one: from the base it read, or a fresh model without it
        store = vs.StateStore(trainer.config, trainer)
        store.restore()
        return store

    restarted(fresh=False).save()
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    again = restarted(fresh=True)
    assert "move .state/" not in caplog.text
    assert f"began from base model {base}, whose file is missing now: training goes on from the state" in caplog.text
    assert again.base_model == str(base)  # and the next snapshot says so


def test_a_base_model_replaced_in_place_is_told_apart_by_its_digest(tmp_path, caplog):
    """In a pod the base model is a file at a fixed path: a new base copied over the old one kept its path, and the
    warning that the state goes on from itself, not from that base, compared paths only."""
    base = tmp_path / "base.npz"
    base.write_bytes(b"the base the state began from")

    def restarted() -> vs.StateStore:
        trainer = make_trainer(tmp_path, n_features=5, hidden=7, batch_size=8, replay_capacity=64,
                               base_model_path=str(base))
        trainer.fresh = False  # as build_trainer makes one from a base model it read
        store = vs.StateStore(trainer.config, trainer)
        store.restore()
        return store

    restarted().save()
    caplog.set_level(logging.WARNING, logger="vmafx_sidecar")
    restarted().save()  # the same file: nothing to say
    assert "began from base model" not in caplog.text
    base.write_bytes(b"a new base, copied over the old one")
    for _ in range(2):  # the state keeps the digest it began from, restart after restart
        restarted().save()
        assert f"began from base model {base} as it was then (sha256 " in caplog.text
        assert "not the file there now (sha256 " in caplog.text
        caplog.clear()


def test_a_state_whose_base_model_file_is_gone_stops_the_start_rather_than_being_set_aside(tmp_path):
    """The base file missing, a fresh model of the configured size took its place, which the state did not fit: the
    state and its journal were set aside, training back at step 0 (the new-user hunt). The state needs no base file,
    but only a model of its own shape can take it; the start stops, saying what to do."""
    base = str(tmp_path / "base.npz")
    trainer = make_trainer(tmp_path, n_features=5, hidden=6, batch_size=8, replay_capacity=64, base_model_path=base)
    trainer.fresh = False  # as build_trainer makes it from a 5-6-1 base
    state = vs.StateStore(trainer.config, trainer)
    state.restore()
    server = vs.Server(trainer.config, trainer, state)
    for m in messages(40):
        server.answer(json.dumps(m).encode())
    state.save()
    with pytest.raises(vs.StartupError, match=f"base model {re.escape(base)} is missing, and the trainer state in"):
        in_process_server(tmp_path, base_model_path=base)  # a fresh 5-7-1 model: the base file is gone
    assert (tmp_path / ".state" / "snapshot.bin").exists() and in_process_server(
        tmp_path, hidden=6, base_model_path=base).trainer.samples_accepted == 40  # nothing set aside


def test_the_smoothed_loss_continues_across_a_restart(tmp_path):
    """vmafx_sidecar_train_loss_smoothed averages ~100 steps: a restart neither drops it nor restarts it from one
    batch; a snapshot saved before the field existed starts it again from the next batch."""
    server = in_process_server(tmp_path)
    for m in messages(100):
        server.answer(json.dumps(m).encode())
    smoothed = server.trainer.loss_smoothed
    assert smoothed is not None and smoothed != server.trainer.last_loss
    server.state.save()
    assert in_process_server(tmp_path).trainer.loss_smoothed == smoothed
    meta, arrays = read_snapshot(tmp_path)
    del meta["loss_smoothed"]
    write_snapshot(tmp_path, meta, arrays)
    again = in_process_server(tmp_path)
    assert again.trainer.loss_smoothed is None and again.trainer.last_loss == server.trainer.last_loss


def test_the_checkpoint_interval_runs_on_from_the_last_checkpoint_across_a_restart(tmp_path):
    """A restart resumes the time since the last checkpoint from the snapshot: ignored, the next checkpoint came
    as soon as MIN_SAMPLES_CKPT samples did, however little of CKPT_INTERVAL_S had passed (mutation hunt)."""
    server = in_process_server(tmp_path, ckpt_interval_s=3600.0, min_samples_ckpt=0)
    server.trainer.last_checkpoint_time = time.monotonic() - 100  # a checkpoint 100 s ago
    server.state.save()
    again = in_process_server(tmp_path, ckpt_interval_s=3600.0, min_samples_ckpt=0)
    assert again.trainer.last_checkpoint_time is not None
    assert 100 <= time.monotonic() - again.trainer.last_checkpoint_time < 3600
    assert not again.trainer.checkpoint_due()


def save_killed_before_the_journal_reset(server: vs.Server, monkeypatch) -> None:
    """A snapshot whose process dies after its rename, before the journal it now holds is emptied."""
    def crash(generation):
        raise KeyboardInterrupt("killed after the snapshot's rename, before the journal was emptied")

    monkeypatch.setattr(server.state.journal, "reset", crash)
    with pytest.raises(KeyboardInterrupt):
        server.state.save()


def test_crash_between_snapshot_and_journal_reset_replays_nothing_twice(tmp_path, monkeypatch):
    server = in_process_server(tmp_path)
    for m in messages(100):
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
    assert not json.loads(server.answer(b"[1]"))["ok"]
    server.state.journal.commit()
    save_killed_before_the_journal_reset(server, monkeypatch)
    monkeypatch.undo()
    assert (tmp_path / ".state" / "journal.bin").stat().st_size > 100 * 24  # the old journal is still there

    again = in_process_server(tmp_path)
    assert (again.trainer.samples_accepted, again.trainer.samples_rejected) == (100, 1)
    assert again.trainer.replay.size == 64 and again.trainer.steps == server.trainer.steps
    np.testing.assert_array_equal(again.trainer.model.flat, server.trainer.model.flat)


@pytest.mark.parametrize("removed", [".state", ".state/journal.bin"])
def test_a_state_removed_while_the_sidecar_runs_loses_no_acked_sample(tmp_path, removed, caplog):
    """Its journal was opened once and written by its descriptor for ever: removed while the process ran, every
    record went into a file no restart reads, and with the directory gone no snapshot could be written either (200
    samples ACKed since, 0 after a clean stop; with the journal alone removed, 0 after a kill, no failure counted)."""
    first, second, third = messages(90)[:30], messages(90)[30:60], messages(90)[60:]
    server = in_process_server(tmp_path)
    for m in first:
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
    server.state.commit()
    shutil.rmtree(tmp_path / removed) if removed == ".state" else (tmp_path / removed).unlink()
    for m in second:
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
    server.state.commit()
    caplog.set_level(logging.ERROR, logger="vmafx_sidecar")
    server.state.journal_checked -= 1.0  # a second later
    server.state.tick()
    assert "journal.bin was removed or replaced while the sidecar ran" in caplog.text
    assert server.state.write_failures()["journal"] == 1
    for m in third:
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
    server.state.commit()  # then a kill: no snapshot at the stop
    resumed = in_process_server(tmp_path)
    assert resumed.trainer.samples_accepted == 90
    np.testing.assert_array_equal(resumed.trainer.model.flat, server.trainer.model.flat)


def test_a_lost_journal_is_counted_once_while_the_snapshots_that_replace_it_are_refused(tmp_path, monkeypatch):
    """A journal removed while the sidecar runs is one journal failure, however many seconds the snapshot that
    replaces it is refused (each refusal a snapshot failure): it was counted again every second (mutation hunt)."""
    server = in_process_server(tmp_path)
    for m in messages(10):
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
    server.state.commit()
    (tmp_path / ".state" / "journal.bin").unlink()
    monkeypatch.setattr(vs, "write_synced", refused)
    for _ in range(4):
        server.state.journal_checked -= 1.0  # a second later
        server.state.tick()
    assert server.state.write_failures() == {"journal": 1, "snapshot": 4, "sample_log": 0}


def os_error(errno: int, *args):
    raise OSError(errno, os.strerror(errno))


def refused(*args, **kwargs):
    os_error(28)  # a full disk


@pytest.mark.parametrize("left_behind", ["a torn tail", "a journal the snapshot holds", "no snapshot yet"])
def test_samples_acked_while_a_restart_cannot_snapshot_survive_the_next_restart(tmp_path, monkeypatch, left_behind):
    """A restart whose snapshot the disk refuses journals what it ACKs right after the records it resumed
    from: not after a torn tail or a journal its snapshot already holds, which the next start would stop at or
    ignore; and with no snapshot yet, in a journal the next start replays onto the fresh model."""
    first, second = messages(60)[:30], messages(60)[30:]
    if left_behind == "no snapshot yet":
        monkeypatch.setattr(vs, "write_synced", refused)
    server = in_process_server(tmp_path)
    for m in first:
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
    server.state.commit()
    if left_behind == "a torn tail":
        with open(tmp_path / ".state" / "journal.bin", "ab") as f:
            f.write(vs.JOURNAL_RECORD.pack(24, 0) + b"\x01\x02\x03")  # a record cut short by a crash
    elif left_behind == "a journal the snapshot holds":
        save_killed_before_the_journal_reset(server, monkeypatch)
    monkeypatch.setattr(vs, "write_synced", refused)  # the restart's snapshot, and every one after, refused
    again = in_process_server(tmp_path)
    assert again.trainer.samples_accepted == len(first)
    for m in second:
        assert json.loads(again.answer(json.dumps(m).encode()))["ok"]
    again.state.commit()
    monkeypatch.undo()  # a crash, then a start on a disk that works again
    resumed = in_process_server(tmp_path)
    assert resumed.trainer.samples_accepted == len(first) + len(second)
    np.testing.assert_array_equal(resumed.trainer.model.flat, again.trainer.model.flat)


@pytest.mark.parametrize("changed", [{"batch_size": 16}, {"replay_mix": 0.25}, {"replay_capacity": 40}],
                         ids=["batch size", "replay mix", "replay capacity"])
def test_a_kill_then_a_restart_with_other_batch_settings_continues_as_a_sigterm_would(tmp_path, changed):
    """After a kill, the journal was replayed under the new settings: the steps its ACKs had counted were taken
    again in other batches, so the step count went back (100 ACKed, 50 after the restart, in the chaos hunt) and
    the weights became a model that never was. It replays under the settings it was trained with."""
    restarted = {}
    for stop in ("sigterm", "kill"):
        first = in_process_server(tmp_path / stop)
        acks = [json.loads(first.answer(json.dumps(m).encode())) for m in messages(61)]
        first.state.commit()
        if stop == "sigterm":
            first.state.save()
        restarted[stop] = in_process_server(tmp_path / stop, **changed).trainer
    killed, stopped = restarted["kill"], restarted["sigterm"]
    assert killed.steps == stopped.steps >= acks[-1]["step"] > 0
    assert killed.samples_accepted == stopped.samples_accepted == 61
    for name, array in stopped.state_dict().items():
        if isinstance(array, np.ndarray):
            np.testing.assert_array_equal(killed.state_dict()[name], array, err_msg=name)
    assert killed.rng.bit_generator.state == stopped.rng.bit_generator.state


def test_the_trainer_a_journal_replays_on_has_this_trainers_layout_and_its_references(tmp_path):
    """It was built from the incumbent, which is latest.onnx whatever its hidden width: a state of this trainer's
    layout then failed to load into it, and was set aside with its journal."""
    trainer = make_trainer(tmp_path, n_features=5, hidden=7, batch_size=8, replay_capacity=64)
    trainer.incumbent = vs.MLP.initial([5, 8, 1], RELU, np.random.default_rng(1))  # published with hidden 8
    twin = trainer.replayer({"batch_size": 16, "replay_mix": 0.5, "replay_capacity": 64, "eval_capacity": 2000})
    assert twin is not trainer and twin.config.batch_size == 16
    assert twin.model.sizes == trainer.model.sizes and twin.incumbent is trainer.incumbent


@pytest.mark.parametrize("saved", [{"replay_mix": 1}, {"replay_mix": 5}, {"replay_mix": 10**400},
                                   {"replay_capacity": 2**61}, {"eval_capacity": 2**61}, {"batch_size": True},
                                   {"batch_size": "8"}])
def test_a_fingerprint_of_settings_no_sidecar_takes_replays_under_the_configured_ones(tmp_path, saved):
    """An int where a float goes skipped its range check (a mix of 1 crashed every start), and rings too big for
    numpy were a ValueError that set the state aside."""
    trainer = make_trainer(tmp_path, n_features=5, hidden=7, batch_size=8, replay_capacity=64)
    assert trainer.replayer({"batch_size": 8, "replay_mix": 0.5, "replay_capacity": 64, "eval_capacity": 2000,
                             **saved}) is trainer


def test_a_journal_replayed_after_refused_snapshots_publishes_no_checkpoint_again(tmp_path):
    """A snapshot after each checkpoint ends the journal, unless the disk refuses it (one of 4 MB, where a
    checkpoint of 22 KB still fits): the journal then spans checkpoints, and its replay took each again, published
    under a new version with the weights of one already published, latest.json walking back through them."""
    def server() -> vs.Server:
        return in_process_server(tmp_path, min_samples_ckpt=8, ckpt_interval_s=0.0, gate="off")

    first = server()
    (tmp_path / ".state" / ".snapshot.bin.tmp").mkdir()  # every snapshot refused from now on, checkpoints not
    acks = [json.loads(first.answer(json.dumps(m).encode())) for m in messages(60)]
    first.state.commit()
    published = sorted(tmp_path.glob("model_v*.onnx"))
    assert len(published) == sum("checkpoint" in a for a in acks) >= 5, acks
    latest = (tmp_path / "latest.json").read_bytes()
    again = server()  # after a kill
    assert sorted(tmp_path.glob("model_v*.onnx")) == published and not list(tmp_path.glob("quarantine/model_v*"))
    assert (tmp_path / "latest.json").read_bytes() == latest
    assert (again.trainer.samples_accepted, again.trainer.steps) == (60, first.trainer.steps)
    np.testing.assert_array_equal(again.trainer.ema.flat, first.trainer.ema.flat)
    # The window starts again at the newest checkpoint: replayed, it held samples the incumbent trained on.
    assert again.trainer.last_gate == first.trainer.last_gate and not again.trainer.replaying
    assert again.trainer.window.n == again.trainer.samples_since_checkpoint == 0
    # The next checkpoint is the next version, judged as any other.
    for m in messages(80)[60:]:
        if "checkpoint" in (ack := json.loads(again.answer(json.dumps(m).encode()))):
            break
    assert ack["checkpoint"].endswith(f"model_v{len(published) + 1:06d}.onnx"), ack


def test_a_fresh_state_over_older_checkpoints_keeps_its_window_across_a_kill(tmp_path):
    """The window starts again after a replay only at a checkpoint written after the snapshot: a state begun afresh
    (its .state/ moved out to train from a restored checkpoint, say) over older checkpoints had lost its window and
    its count towards the next checkpoint at every kill, and reported a gate record it never wrote."""
    def server(**settings) -> vs.Server:
        return in_process_server(tmp_path, ckpt_interval_s=0.0, gate="off", **settings)

    older = server(min_samples_ckpt=8)
    for m in messages(40):
        older.answer(json.dumps(m).encode())
    assert older.trainer.checkpoints.version >= 3
    older.state.save()
    shutil.move(tmp_path / ".state", tmp_path / "older-state")
    fresh = server()  # MIN_SAMPLES_CKPT at make_trainer's 10**9: no checkpoint of its own
    for m in messages(100)[40:]:
        fresh.answer(json.dumps(m).encode())
    fresh.state.commit()
    again = server()  # after a kill: the journal replayed onto its first snapshot
    assert again.trainer.window.n == fresh.trainer.window.n > 0 and again.trainer.last_gate is None
    assert again.trainer.samples_since_checkpoint == fresh.trainer.samples_since_checkpoint > 0


def test_a_state_that_cannot_be_set_up_on_a_full_disk_stops_the_start_in_one_line(tmp_path, monkeypatch):
    """A new replica's directory, or the sample log switched on, on a full disk: a StartupError that says where
    and why, not a traceback."""
    trainer = make_trainer(tmp_path, n_features=5, hidden=7, sample_log="1")
    monkeypatch.setattr(vs, "write_whole", refused)
    with pytest.raises(vs.StartupError, match=f"cannot set up the trainer's state under {tmp_path}: No space left"):
        vs.StateStore(trainer.config, trainer)


def test_a_first_journal_of_another_feature_count_is_set_aside_not_cut(tmp_path, monkeypatch):
    """Samples a first start ACKed while the disk refused its snapshots cannot be read once the feature count
    changes: the journal is moved aside whole, as a snapshot of another layout is, not cut after its header."""
    monkeypatch.setattr(vs, "write_synced", refused)
    server = in_process_server(tmp_path)  # 5 features
    for m in messages(30):
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
    server.state.commit()
    journal = (tmp_path / ".state" / "journal.bin").read_bytes()
    monkeypatch.undo()
    trainer = make_trainer(tmp_path, n_features=6, hidden=7, batch_size=8, replay_capacity=64)
    assert not vs.StateStore(trainer.config, trainer).restore() and trainer.samples_accepted == 0
    [aside] = (tmp_path / ".state").glob("journal.bin.*.unreadable")
    assert aside.read_bytes() == journal


def test_rejections_are_journaled(sidecar_factory):
    s = sidecar_factory(**SETTINGS)
    client = s.client()
    for line in (b"nope", b'{"op": "bogus"}', b"x" * 10):
        assert not client.request(line)["ok"]
    s.stop(signal.SIGKILL)
    assert sidecar_factory(**SETTINGS).client().request({"op": "status"})["samples_rejected"] == 3


def test_snapshot_missing_a_field_is_set_aside_not_fatal(tmp_path):
    server = in_process_server(tmp_path)
    for m in messages(20):
        server.answer(json.dumps(m).encode())
    server.state.save()
    meta, arrays = read_snapshot(tmp_path)
    del meta["generation"]  # as a snapshot of an older sidecar would be
    write_snapshot(tmp_path, meta, arrays)
    again = in_process_server(tmp_path)
    assert again.trainer.samples_accepted == 0 and again.trainer.steps == 0
    assert list((tmp_path / ".state").glob("snapshot.bin.*.unreadable"))


def test_a_format_3_snapshot_saved_before_its_champion_had_a_version_resumes(tmp_path):
    """Format 3's first days saved the champion without its version: an upgrade set such a state aside as unreadable
    (KeyError: 'champion_version'), its journal with it, and training started again from the base model."""
    server = in_process_server(tmp_path)
    for m in messages(20):
        server.answer(json.dumps(m).encode())
    server.state.save()
    meta, arrays = read_snapshot(tmp_path)
    for later in ("champion_version", "coordinates", "sources", "window_unscored", "kept_raw", "kept_features",
                  "loss_smoothed", "samples_since_publish", "window_incumbent", "newest_checkpoint"):
        meta.pop(later, None)
    for later in ("window_x", "window_y", "window_candidate"):
        del arrays[later]
    write_snapshot(tmp_path, {**meta, "format": 3}, arrays)
    again = in_process_server(tmp_path)
    assert (again.trainer.samples_accepted, again.trainer.steps) == (20, server.trainer.steps)
    assert not list((tmp_path / ".state").glob("snapshot.bin.*"))


def test_a_snapshot_saved_before_its_windows_incumbent_was_says_so_not_none(tmp_path, caplog):
    """The upgrade's start logged that the window "was scored against checkpoint None" (the words hunt)."""
    server = in_process_server(tmp_path, gate="off")
    for m in messages(40):
        server.answer(json.dumps(m).encode())
    server.trainer.take_checkpoint()
    server.state.save()
    meta, arrays = read_snapshot(tmp_path)
    assert meta.pop("window_incumbent") == 1
    write_snapshot(tmp_path, meta, arrays)
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    in_process_server(tmp_path, gate="off")
    assert ("the window was scored against the base model, or an incumbent a snapshot of an earlier version did "
            "not name, the incumbent now is checkpoint 1: a new window starts") in caplog.text


def test_a_journal_newer_than_its_snapshot_is_set_aside_not_cut(tmp_path, caplog):
    """An older snapshot put back (from a backup, say): its journal, which holds ACKed samples it lacks, was logged
    as one the snapshot "already holds" and cut to its header by the first save, no copy kept."""
    server = in_process_server(tmp_path)
    for m in messages(40):
        server.answer(json.dumps(m).encode())
    server.state.save()
    older = (tmp_path / ".state" / "snapshot.bin").read_bytes()
    for m in messages(80)[40:]:
        server.answer(json.dumps(m).encode())
    server.state.save()
    for m in messages(120)[80:]:
        server.answer(json.dumps(m).encode())
    server.state.commit()
    journal = (tmp_path / ".state" / "journal.bin").read_bytes()
    (tmp_path / ".state" / "snapshot.bin").write_bytes(older)
    caplog.set_level(logging.WARNING, logger="vmafx_sidecar")
    again = in_process_server(tmp_path)
    assert again.trainer.samples_accepted == 40
    assert "journal.bin is newer than its snapshot (generation 3, the snapshot's 2)" in caplog.text
    assert [p.read_bytes() for p in (tmp_path / ".state").glob("journal.bin.*.newer")] == [journal]


def test_the_directories_a_first_start_creates_are_made_to_last(tmp_path, monkeypatch):
    """.state/, .samples/ and quarantine/ were created without an fsync of the directory above them, the only one
    that names them: until a first checkpoint was published, every ACK rested on entries a power loss could take,
    JOURNAL_FSYNC=always included (the crash hunt)."""
    synced, real_fsync_directory = [], vs.fsync_directory
    monkeypatch.setattr(vs, "fsync_directory", lambda d: (synced.append(Path(d)), real_fsync_directory(d)))
    directory = tmp_path / "volume" / "ckpt"
    os.close(vs.claim_directory(directory, "the test"))
    server = in_process_server(directory, sample_log="1")
    assert json.loads(server.answer(json.dumps(messages(1)[0]).encode()))["ok"]
    for created in (tmp_path / "volume", directory, directory / ".state", directory / ".samples",
                    directory / "quarantine"):
        assert created.is_dir() and created.parent in synced, created


def journal_after_a_snapshot(directory: Path) -> bytes:
    """40 samples in a snapshot, 40 more in its journal, as a kill -9 leaves them; the journal's bytes."""
    server = in_process_server(directory)
    for m in messages(40):
        server.answer(json.dumps(m).encode())
    server.state.save()
    for m in messages(80)[40:]:
        server.answer(json.dumps(m).encode())
    server.state.commit()
    return (directory / ".state" / "journal.bin").read_bytes()


def restarted_on(directory: Path, journal: bytes) -> vs.Server:
    """The restart after a kill -9, with `journal` in place of the journal the kill left."""
    (directory / ".state" / "journal.bin").write_bytes(journal)
    return in_process_server(directory)


def journal_copies(directory: Path, tag: str) -> list[bytes]:
    """The journals set aside, or copied, as `tag`."""
    return [p.read_bytes() for p in (directory / ".state").glob(f"journal.bin.*.{tag}")]


def test_a_bit_flipped_in_the_journals_magic_loses_none_of_its_samples(tmp_path, caplog):
    """Its header was read as a journal the snapshot "already holds": every sample ACKed since the snapshot was
    dropped at the restart, and the first save cut the file, no copy kept."""
    journal = bytearray(journal_after_a_snapshot(tmp_path))
    journal[3] ^= 0x10
    assert restarted_on(tmp_path, journal).trainer.samples_accepted == 80
    assert "journal.bin has a corrupt header, its records read all the same" in caplog.text
    assert journal_copies(tmp_path, "corrupt") == [journal]


@pytest.mark.parametrize("offset", [0, 4, 8, 12])
def test_a_journal_header_of_no_journal_is_set_aside_with_a_warning(tmp_path, caplog, offset):
    """Not one that names the snapshot's generation: its records may be this state's or an earlier one's, so they
    are not replayed, but neither ignored in silence nor cut."""
    journal = bytearray(journal_after_a_snapshot(tmp_path))
    journal[offset:offset + 4] = b"\0\0\0\0"
    assert restarted_on(tmp_path, journal).trainer.samples_accepted == 40
    assert "journal.bin is corrupt (a header that names no journal of the snapshot's generation 2)" in caplog.text
    assert journal_copies(tmp_path, "corrupt") == [journal]


def test_a_journal_older_than_its_snapshots_predecessor_is_set_aside_with_a_warning(tmp_path, caplog):
    """A bit flipped in its generation (2 to 0) was taken for the journal a crash between the snapshot and the
    journal's reset leaves, generation 1: every sample since the snapshot dropped in silence, the file cut (the flip
    hunt). Which of the two it is cannot be told from the file; the one a crash leaves stays silent."""
    journal = bytearray(journal_after_a_snapshot(tmp_path))
    journal[16] = 0
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    assert restarted_on(tmp_path, journal).trainer.samples_accepted == 40
    assert "journal.bin is older than its snapshot's predecessor (generation 0, the snapshot's 2)" in caplog.text
    assert journal_copies(tmp_path, "older") == [journal]
    journal = bytearray(journal_after_a_snapshot(tmp_path / "again"))
    journal[16] = 1
    caplog.clear()
    assert restarted_on(tmp_path / "again", journal).trainer.samples_accepted == 40
    assert "journal.bin predates the snapshot, which already holds it" in caplog.text and "WARNING" not in caplog.text


def full_disk_for(journal: vs.Journal):
    """vs.write_all as a disk that refuses the journal's writes, and takes the others."""
    real_write_all = vs.write_all

    def write_all(fd, content):
        if fd == journal.fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(fd, content)
    return write_all


def test_journal_keeps_samples_while_the_disk_refuses_them(tmp_path, monkeypatch, caplog):
    server = in_process_server(tmp_path)
    journal = server.state.journal
    monkeypatch.setattr(vs, "write_all", full_disk_for(journal))
    for batch in (messages(10), messages(20)[10:]):
        for m in batch:
            assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
        journal.commit()
    assert [r.message for r in caplog.records if r.levelname == "ERROR"] == [
        "journal write failed, keeping the samples in memory until it works: [Errno 28] No space left on device"]
    monkeypatch.undo()
    server.state.tick()  # the idle-time retry writes them all
    assert not journal.pending and not journal.write_outage.ongoing
    again = in_process_server(tmp_path)
    assert again.trainer.samples_accepted == 20
    np.testing.assert_array_equal(again.trainer.model.flat, server.trainer.model.flat)


def stopped_with_the_snapshot_refused(server: vs.Server, monkeypatch) -> int:
    monkeypatch.setattr(vs, "write_synced", refused)
    server.stopping = True
    return server.serve_forever()


@pytest.mark.parametrize("where", ["pending", "dropped", "in a removed journal"])
def test_a_stop_that_loses_acknowledged_samples_says_how_many_and_exits_1(tmp_path, monkeypatch, caplog, where):
    """README's one exception to what "ok": true guarantees: a stop whose snapshot the disk refuses loses the samples
    the journal a restart reads lacks: records the disk refused (still pending, or dropped past the memory bound)
    or written to a journal file removed since. It logged "state snapshot failed, will retry" and exited 0; the
    stop now counts them in an error and exits 1. One whose snapshot the disk takes loses nothing, and exits 0."""
    server = in_process_server(tmp_path)
    for m in messages(10):
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
    server.state.commit()
    if where == "in a removed journal":
        (tmp_path / ".state" / "journal.bin").unlink()
        monkeypatch.setattr(vs, "write_synced", refused)  # the snapshot that would replace it
        server.state.check_journal_in_place()
    else:
        monkeypatch.setattr(vs, "write_all", full_disk_for(server.state.journal))
        if where == "dropped":
            monkeypatch.setattr(vs, "JOURNAL_MEMORY_LIMIT", 100)  # a record of 5 features is 32 bytes
    for m in messages(TOTAL)[10:16]:
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
        server.state.commit()
    server.answer(b"not json")  # a rejected line's record is no sample
    server.state.commit()
    lost = 16 if where == "in a removed journal" else 6
    assert stopped_with_the_snapshot_refused(server, monkeypatch) == 1
    errors = [r.message for r in caplog.records if r.levelname == "ERROR"]
    assert errors[-1] == (f"stopping with {lost} acknowledged samples lost: the disk refused the snapshot that would "
                          "have held them, and the journal a restart reads does not")
    monkeypatch.undo()
    assert in_process_server(tmp_path).trainer.samples_accepted == 16 - lost


def test_a_stop_whose_snapshot_is_written_loses_nothing_and_exits_0(tmp_path, monkeypatch):
    server = in_process_server(tmp_path)
    monkeypatch.setattr(vs, "write_all", full_disk_for(server.state.journal))
    for m in messages(6):
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
    server.state.commit()
    assert server.state.unsaved_samples() == 6
    monkeypatch.undo()  # the disk takes the snapshot
    server.stopping = True
    assert server.serve_forever() == 0
    assert in_process_server(tmp_path).trainer.samples_accepted == 6


@pytest.mark.parametrize("since", ["dropped", "in a removed journal"])
def test_a_stop_after_a_snapshot_counts_as_lost_only_the_samples_acked_since_it(tmp_path, monkeypatch, caplog, since):
    """The samples a snapshot holds are not lost when a later one is refused: the journal's counts start again at
    each snapshot (Journal.reset). A stop whose own snapshot the disk refuses, with nothing acked since the last
    one written, loses nothing and exits 0."""
    server = in_process_server(tmp_path)
    if since == "dropped":
        monkeypatch.setattr(vs, "write_all", full_disk_for(server.state.journal))
        monkeypatch.setattr(vs, "JOURNAL_MEMORY_LIMIT", 100)  # records dropped past the bound
    for m in messages(6):
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
        server.state.commit()
    server.state.save()  # the disk takes this snapshot: it holds all 6
    monkeypatch.undo()
    if since == "in a removed journal":
        (tmp_path / ".state" / "journal.bin").unlink()
        monkeypatch.setattr(vs, "write_synced", refused)
        server.state.check_journal_in_place()
    assert stopped_with_the_snapshot_refused(server, monkeypatch) == 0
    assert not [r for r in caplog.records if "acknowledged samples lost" in r.getMessage()]
    monkeypatch.undo()
    assert in_process_server(tmp_path).trainer.samples_accepted == 6


def test_samples_replayed_at_a_start_whose_snapshot_is_refused_count_as_lost_when_their_journal_goes(
        tmp_path, monkeypatch, caplog):
    """A start whose snapshot the disk refuses goes on writing to the journal it replayed: the samples of its intact
    records are in no snapshot. With that journal removed and the stop's snapshot refused too, they are lost, and
    the stop says so and exits 1 (Journal's intact_samples)."""
    server = in_process_server(tmp_path)
    for m in messages(10):
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
    server.state.commit()  # journaled, then a kill: no snapshot holds them
    monkeypatch.setattr(vs, "write_synced", refused)  # from the restart on, every snapshot is refused
    again = in_process_server(tmp_path)
    assert again.trainer.samples_accepted == 10
    (tmp_path / ".state" / "journal.bin").unlink()
    again.state.check_journal_in_place()
    assert stopped_with_the_snapshot_refused(again, monkeypatch) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors[-1].startswith("stopping with 10 acknowledged samples lost")
    monkeypatch.undo()
    assert in_process_server(tmp_path).trainer.samples_accepted == 0  # as said


def test_a_sidecar_process_that_stops_losing_acknowledged_samples_exits_1(sidecar_factory):
    """The process's exit status, which the in-process tests of the stop do not see (they call serve_forever): its
    state directory gone and the snapshot that would replace it refused (a file where the directory goes), the
    SIGTERM's stop loses what the journal held, says so, and the process exits 1 (mutation hunt: `serve` returning
    0 passed every test)."""
    s = sidecar_factory(**SETTINGS)
    feed(s, messages(10))
    state = s.checkpoint_dir / ".state"
    shutil.rmtree(state)
    state.write_bytes(b"")  # no directory can be made there: every snapshot is refused
    deadline = time.monotonic() + ACK_TIMEOUT_S
    while "was removed or replaced while the sidecar ran" not in s.stderr() and time.monotonic() < deadline:
        time.sleep(0.1)  # the check of a second finds the journal gone
    assert s.stop() == 1
    assert "stopping with 10 acknowledged samples lost" in s.stderr()


def test_a_long_outage_bounds_the_journals_memory_and_keeps_a_fresh_journals_header(tmp_path, monkeypatch):
    """Past the memory bound the pending records are dropped; in a journal of no record yet its header must stay
    pending with them, or the records written once the disk works again follow no header, and a restart reads
    none of them (mutation hunt)."""
    monkeypatch.setattr(vs, "JOURNAL_MEMORY_LIMIT", 100)  # bytes: a few records
    path = tmp_path / "journal.bin"
    journal = vs.Journal(path, "off", 7, 0, 0, vs.JOURNAL_FORMAT)
    monkeypatch.setattr(vs, "append_whole", refused)
    for i in range(10):
        journal.append(np.full(3, i, np.float32), np.float32(i), False, False)
        journal.commit()
        assert len(journal.pending) <= 100
    monkeypatch.undo()  # the disk works again
    journal.append(np.full(3, 99, np.float32), np.float32(99), False, False)
    journal.commit()
    scores = [r.score for r in vs.Journal.read(path, 3, 7)[0]]
    assert scores == list(range(11 - len(scores), 10)) + [99]  # those kept in memory, then the new one


def test_a_backlog_larger_than_the_space_a_full_disk_frees_does_not_keep_out_the_snapshot_that_replaces_it(
        tmp_path, monkeypatch):
    """A disk that fills, then frees less than the journal's backlog but more than a snapshot: the backlog's write
    is refused part-way, and its partial bytes must not take the space, or every snapshot (which holds the backlog
    and would empty the journal) is refused too, and nothing ACKed after the recovery survives a kill."""
    server = in_process_server(tmp_path, eval_capacity=64)  # rings smaller than the backlog: a small snapshot
    state_dir = tmp_path / ".state"
    used = lambda: sum(p.stat().st_size for p in state_dir.iterdir())  # noqa: E731
    disk = {"capacity": used()}  # full
    real_write = os.write

    def small_disk(fd, data):  # writes to the state directory take what is free, then ENOSPC, as a real disk does
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(str(state_dir)):
            return real_write(fd, data)
        free = disk["capacity"] - used()
        if free <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data[:free]))

    monkeypatch.setattr(os, "write", small_disk)
    for m in messages(4000):
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
        server.state.commit()
    backlog = len(server.state.journal.pending)
    assert server.state.journal.write_outage.ongoing
    disk["capacity"] = used() + backlog // 2  # less than the backlog
    generation = server.state.generation
    server.state.save()
    assert (state_dir / "snapshot.bin").stat().st_size < backlog // 2  # the premise: room for the snapshot
    assert server.state.generation == generation + 1 and not server.state.journal.pending
    monkeypatch.undo()
    assert in_process_server(tmp_path).trainer.samples_accepted == 4000


def test_a_refused_fsync_of_a_journal_that_syncs_only_at_snapshots_says_so(tmp_path, monkeypatch, caplog):
    """With JOURNAL_FSYNC=no, a snapshot's reset fsyncs the new journal: refused, it was logged as "retrying every
    second", where nothing retries it before the next snapshot."""
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    journal = vs.Journal(tmp_path / "journal.bin", "no", 0, 0, 0, vs.JOURNAL_FORMAT)
    real_fsync = os.fsync

    def failing_disk(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_disk)
    journal.reset(1)
    journal.last_sync -= 2
    assert not journal.sync_if_due() and journal.failures == 1  # a second later: not retried
    monkeypatch.setattr(os, "fsync", real_fsync)
    journal.reset(2)
    assert [r.getMessage() for r in caplog.records] == [
        "journal fsync failed, retrying with the next snapshot: [Errno 5] Input/output error",
        "journal fsyncs work again"]


def test_a_sample_logs_refused_fsync_under_always_is_no_refused_write(tmp_path, monkeypatch, caplog):
    """With VMAFX_SIDECAR_JOURNAL_FSYNC=always it was logged as "sample log write failed, keeping the samples in
    memory", though they were written and not kept (the words hunt)."""
    server = in_process_server(tmp_path, sample_log="1", journal_fsync="always")
    samples, real_fsync = server.state.samples, os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: os_error(errno.EIO) if fd == samples.fd else real_fsync(fd))
    for m in messages(3):
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
        server.state.commit()
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "sample log fsync failed, retrying with the journal's next fsync: [Errno 5] Input/output error"]
    assert samples.pending == b"" and server.state.write_failures()["sample_log"] == 3
    monkeypatch.undo()
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    assert json.loads(server.answer(json.dumps(messages(4)[3]).encode()))["ok"]
    server.state.commit()
    assert "sample log fsyncs work again" in caplog.text


@pytest.mark.parametrize("refused", ["journal", "sample log"])
def test_a_refused_fsync_is_counted_and_retried_not_fatal(tmp_path, monkeypatch, caplog, refused):
    """The sample log's refused fsync was logged every second the disk refused it, not once an outage as the
    journal's (the coverage hunt)."""
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    server = in_process_server(tmp_path, sample_log="1")  # the journal fsynced every second, the default
    journal, samples = server.state.journal, server.state.samples
    for m in messages(10):
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
    server.state.commit()
    real_fsync = os.fsync

    def failing_disk(fd):
        if fd == (journal.fd if refused == "journal" else samples.fd):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_disk)
    for m in messages(3):
        journal.last_sync -= 2  # a second has passed
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]  # and something to sync
        server.state.commit()
        server.state.tick()
    kind = refused.replace(" ", "_")
    assert server.state.write_failures()[kind] == 3
    retried = {"journal": "every second", "sample log": "with the journal's next fsync"}[refused]
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"{refused} fsync failed, retrying {retried}: [Errno 5] Input/output error"]
    server.state.tick()  # within the second: not retried
    assert server.state.write_failures()[kind] == 3
    monkeypatch.undo()
    journal.last_sync -= 2
    assert json.loads(server.answer(json.dumps(messages(1)[0]).encode()))["ok"]
    server.state.commit()
    server.state.tick()
    assert not journal.unsynced and f"{refused} fsyncs work again" in caplog.text
    assert in_process_server(tmp_path).trainer.samples_accepted == 14


@pytest.mark.parametrize("synced", ["journal", "sample log"])
def test_journal_fsync_always_fsyncs_each_commit(tmp_path, monkeypatch, synced):
    """With VMAFX_SIDECAR_JOURNAL_FSYNC=always a line is ACKed only once its record is on disk: the journal's
    commit, and the sample log's after it, fsync their file before returning (mutation hunt)."""
    server = in_process_server(tmp_path, sample_log="1", journal_fsync="always")
    first, second = messages(2)
    assert json.loads(server.answer(json.dumps(first).encode()))["ok"]
    server.state.commit()  # the sample log's first segment is open from here
    fsynced = []
    real_fsync = os.fsync

    def counted_fsync(fd):
        fsynced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counted_fsync)
    assert json.loads(server.answer(json.dumps(second).encode()))["ok"]
    server.state.commit()
    fd = server.state.journal.fd if synced == "journal" else server.state.samples.fd
    assert fsynced.count(fd) == 1, fsynced


@pytest.mark.parametrize("refused", ["snapshot", "journal"])
def test_a_snapshot_whose_fsync_is_refused_still_hands_over_to_a_journal_a_restart_reads(tmp_path, monkeypatch,
                                                                                          refused):
    """Once the snapshot is renamed into place a restart reads it, so the journal starts anew after it even when
    the disk refuses the fsync of the snapshot's directory or of the emptied journal: counted as that kind's
    write failure, and what is ACKed next is still replayed after a crash."""
    server = in_process_server(tmp_path)
    first, second = messages(60)[:30], messages(60)[30:]
    for m in first:
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
    server.state.commit()
    if refused == "snapshot":
        monkeypatch.setattr(vs, "fsync_directory", lambda directory: os_error(5))
    else:
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: os_error(5) if fd == server.state.journal.fd else real_fsync(fd))
    server.state.save()
    monkeypatch.undo()
    assert server.state.write_failures() == {"journal": int(refused == "journal"),
                                             "snapshot": int(refused == "snapshot"), "sample_log": 0}
    for m in second:
        assert json.loads(server.answer(json.dumps(m).encode()))["ok"]
    server.state.commit()
    resumed = in_process_server(tmp_path)  # as after a kill -9
    assert resumed.trainer.samples_accepted == len(first) + len(second)
    np.testing.assert_array_equal(resumed.trainer.model.flat, server.trainer.model.flat)


# ---- upgrades: state an older sidecar wrote is read, never reset ----

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "state_v1"


def test_state_written_by_an_older_version_resumes_exactly(sidecar_factory, tmp_path):
    """tests/fixtures/state_v1/killed is a directory as 974ac50 left it after a kill -9: snapshot format 1,
    records past it in the journal (which compute nothing when replayed, so the figures hold on any CPU),
    a published checkpoint. restored.bin is the snapshot that version wrote after resuming a copy of it.
    This version must resume to the same state, make the published checkpoint (its incumbent) its first
    champion, and write its own format."""
    old_meta, old_arrays = vs.read_snapshot((FIXTURE / "restored.bin").read_bytes())
    shutil.copytree(FIXTURE / "killed", tmp_path / "ckpt")
    s = sidecar_factory(**SETTINGS)
    status = s.client().request({"op": "status"})
    assert (status["samples_accepted"], status["checkpoint_version"]) == (old_meta["samples_accepted"], 1), status
    replayed = re.search(r"(\d+) journal records replayed", s.stderr())
    assert replayed and int(replayed[1]) > 0, s.stderr()
    assert "moved to" not in s.stderr(), s.stderr()  # nothing set aside
    assert s.stop() == 0
    meta, arrays = vs.read_snapshot((tmp_path / "ckpt" / ".state" / "snapshot.bin").read_bytes())
    assert "format" not in old_meta and meta["format"] == vs.SNAPSHOT_FORMAT
    incumbent = vs.MLP.from_weights(vs.onnx_builder.read_mlp_model(vs.onnx.load(FIXTURE / "killed" / "latest.onnx")))
    expected = {**vs.migrated({**old_meta, **old_arrays}), "has_champion": True, "champion_version": 1,
                "champion": incumbent.flat, "window_incumbent": 1, "sample_log": None, "newest_checkpoint": 1,
                "base_model": "", "base_sha256": ""}  # as configured: an older state is taken to have begun from it
    for ring in vs.RINGS:  # that version saved a ring not yet full at its capacity; this one as what it holds
        held = expected[f"{ring}_size"]
        if held < len(expected[f"{ring}_y"]) and expected[f"{ring}_next"] == held:
            expected |= {f"{ring}_x": expected[f"{ring}_x"][:held], f"{ring}_y": expected[f"{ring}_y"][:held],
                         f"{ring}_next": 0}
    assert {**meta, **arrays}.keys() == expected.keys()
    for key in meta.keys() - {"last_checkpoint_unix"}:  # that one is a wall-clock time
        assert meta[key] == expected[key], key
    for name in arrays:
        np.testing.assert_array_equal(arrays[name], expected[name], err_msg=name)
    latest = json.loads((tmp_path / "ckpt" / "latest.json").read_text())
    assert latest == json.loads((FIXTURE / "killed" / "latest.json").read_text())


def test_a_format_4_fleet_snapshot_keeps_the_positions_it_read_to():
    """For three minutes of issue 17 (3999a9e), a fleet's snapshot held its positions in the replicas' logs
    under format 4: the migration emptied them, and the next fleet run trained on every logged sample again."""
    fleet_state = {"format": 4, "theta": np.zeros(3), "fingerprint": {"sizes": [1, 1, 1]}, "sources": {"r0": 700}}
    assert vs.migrated(fleet_state)["sources"] == {"r0": 700}
    assert vs.migrated({k: v for k, v in fleet_state.items() if k != "sources"})["sources"] == {}


def test_snapshot_of_a_newer_format_is_set_aside_with_one_line(tmp_path, caplog):
    server = in_process_server(tmp_path)
    for m in messages(20):
        server.answer(json.dumps(m).encode())
    server.state.save()
    meta, arrays = read_snapshot(tmp_path)
    write_snapshot(tmp_path, {**meta, "format": vs.SNAPSHOT_FORMAT + 1}, arrays)
    caplog.clear()
    again = in_process_server(tmp_path)
    assert again.trainer.samples_accepted == 0
    lines = [r.getMessage() for r in caplog.records if "snapshot.bin is" in r.getMessage()]
    assert len(lines) == 1 and "newer than this sidecar reads" in lines[0], lines


def state_scalar_names() -> list[str]:
    with tempfile.TemporaryDirectory() as directory:  # the trainer makes its checkpoint directory: not in the cwd
        return sorted(make_trainer(Path(directory), n_features=5, hidden=7).state_scalars())


SCALARS = state_scalar_names()
STORE_FIELDS = ["generation", "sources", "sample_log", "base_model", "base_sha256"]  # the review: these too


@pytest.mark.parametrize("field", [*SCALARS, *STORE_FIELDS, "theta"])
def test_a_snapshot_whose_checksum_holds_and_one_field_does_not_is_set_aside_before_anything_loads(tmp_path, field,
                                                                                                   caplog):
    """A field of another kind (edited by hand, another tool's): the state was loaded up to that field, then set aside
    "starting without it", leaving the weights trained in standardized coordinates read as raw ones; some fields
    ended the start in a traceback (the coverage hunt). Every field is checked before anything loads."""
    server = in_process_server(tmp_path)
    for m in messages(60):
        server.answer(json.dumps(m).encode())
    server.state.save()
    assert server.trainer.coords.standardized != "none"  # a fresh model's weights, standardized since
    meta, arrays = read_snapshot(tmp_path)
    if field == "theta":
        arrays["theta"] = np.full(arrays["theta"].shape, "x")
    else:
        meta[field] = 5 if field in STORE_FIELDS[1:] else "x"  # where a string is right, a number is not
    write_snapshot(tmp_path, meta, arrays)
    again = in_process_server(tmp_path)
    fresh = make_trainer(tmp_path / "fresh", n_features=5, hidden=7, batch_size=8, replay_capacity=64)
    assert again.trainer.samples_accepted == 0 and again.trainer.coords.standardized == "none"
    assert np.array_equal(again.trainer.model.flat, fresh.model.flat)
    assert np.array_equal(again.trainer.replay.y, fresh.replay.y)
    assert list((tmp_path / ".state").glob("snapshot.bin.*")), "not set aside"


@pytest.mark.parametrize("when", [float("nan"), float("inf"), -float("inf")], ids=["NaN", "inf", "-inf"])
def test_a_snapshot_whose_last_checkpoint_time_is_not_finite_is_set_aside(tmp_path, when):
    """69ef01a: the last checkpoint's time must be finite, as check_scalars says (maybe(is_finite_number)); the
    parametrized test of every field edits it only to a string, which any check of a number refuses."""
    server = in_process_server(tmp_path)
    for m in messages(60):
        server.answer(json.dumps(m).encode())
    server.state.save()
    meta, arrays = read_snapshot(tmp_path)
    meta["last_checkpoint_unix"] = when
    write_snapshot(tmp_path, meta, arrays)
    again = in_process_server(tmp_path)
    assert again.trainer.samples_accepted == 0 and again.trainer.coords.standardized == "none"
    assert list((tmp_path / ".state").glob("snapshot.bin.*")), "not set aside"


@pytest.mark.parametrize("damage", ["arrays listed, not named", "a dtype numpy cannot parse", "no sources"])
def test_a_snapshot_whose_checksum_holds_and_whose_framing_does_not_is_set_aside(tmp_path, damage, caplog):
    """Each ended every start in a traceback (AttributeError, SyntaxError, KeyError) and left the file in place, so
    the sidecar restarted in a loop (the fuzz hunt: a foreign or hand-edited file, its checksum made to hold)."""
    server = in_process_server(tmp_path)
    for m in messages(20):
        server.answer(json.dumps(m).encode())
    server.state.save()
    meta, arrays = read_snapshot(tmp_path)
    specs = {name: [a.dtype.str, list(a.shape)] for name, a in arrays.items()}
    if damage == "no sources":
        del meta["sources"]
    elif damage == "arrays listed, not named":
        specs = list(specs.items())
    else:
        specs["theta"][0] = "(,4)f4"
    header = json.dumps({"meta": meta, "arrays": specs}).encode()
    payload = struct.pack("<I", len(header)) + header + b"".join(a.tobytes() for a in arrays.values())
    framed = vs.SNAPSHOT_MAGIC + vs.SNAPSHOT_HEADER.pack(len(payload), vs.zlib.crc32(payload)) + payload
    (tmp_path / ".state" / "snapshot.bin").write_bytes(framed)
    caplog.clear()
    again = in_process_server(tmp_path)
    assert again.trainer.samples_accepted == 0 and list((tmp_path / ".state").glob("snapshot.bin.*"))
    said = [r.getMessage() for r in caplog.records if "snapshot.bin is" in r.getMessage()]
    assert len(said) == 1 and ("corrupt" in said[0] or "unreadable" in said[0]), said


def test_a_ring_capacity_of_another_kind_in_a_snapshots_fingerprint_is_not_trusted(tmp_path, caplog):
    """Since a ring not yet full is saved as what it holds, its capacity is read from the fingerprint: a string there
    (a hand-edited snapshot, its checksum made to hold) made the load's log line a logging error's traceback (the
    review)."""
    server = in_process_server(tmp_path)
    for m in messages(20):
        server.answer(json.dumps(m).encode())
    server.state.save()
    meta, arrays = read_snapshot(tmp_path)
    write_snapshot(tmp_path, {**meta, "fingerprint": {**meta["fingerprint"], "replay_capacity": "x"}}, arrays)
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    again = in_process_server(tmp_path)
    assert again.trainer.samples_accepted == 20
    assert all(isinstance(r.getMessage(), str) for r in caplog.records)  # each formats


def not_finite_scale(meta: dict, arrays: dict) -> None:
    meta["coordinates"]["y_scale"] = float("nan")


def not_finite_shift(meta: dict, arrays: dict) -> None:
    meta["window_shift"] = float("inf")


def generation_past_8_bytes(meta: dict, arrays: dict) -> None:
    meta["generation"] = 2**64 - 1


def older_format_without_sizes(meta: dict, arrays: dict) -> None:
    meta.update(format=5, fingerprint={**meta["fingerprint"], "sizes": []})


def ring_position_at_its_capacity(meta: dict, arrays: dict) -> None:
    meta["replay_next"] = len(arrays["replay_y"])


def a_negative_count(meta: dict, arrays: dict) -> None:
    meta["steps"] = -1


def a_kept_feature_past_the_features(meta: dict, arrays: dict) -> None:
    meta["kept_features"] = [5]  # of 5: 0 to 4


def scores_of_another_kind(meta: dict, arrays: dict) -> None:
    arrays["replay_y"] = arrays["replay_y"] != 0  # booleans, of the same shape


def coordinates_for_fewer_features(meta: dict, arrays: dict) -> None:
    coordinates = meta["coordinates"]
    coordinates.update(x_shift=coordinates["x_shift"][:-1], x_scale=coordinates["x_scale"][:-1])


@pytest.mark.parametrize("edit", [not_finite_scale, not_finite_shift, generation_past_8_bytes,
                                  older_format_without_sizes, ring_position_at_its_capacity, a_negative_count,
                                  a_kept_feature_past_the_features, scores_of_another_kind,
                                  coordinates_for_fewer_features])
def test_a_snapshot_whose_values_do_not_hold_is_set_aside_too(tmp_path, edit):
    """Of the right kind but not a value the sidecar writes: a NaN scale loaded, and no step was taken again; a
    generation past the journal header's 8 bytes, and an older format without its layer sizes, ended every start in
    a traceback (the second review). The others pin checks a mutant of each let through (mutation hunt)."""
    server = in_process_server(tmp_path)
    for m in messages(60):
        server.answer(json.dumps(m).encode())
    server.state.save()
    meta, arrays = read_snapshot(tmp_path)
    edit(meta, arrays)
    write_snapshot(tmp_path, meta, arrays)
    again = in_process_server(tmp_path)
    assert again.trainer.samples_accepted == 0 and again.trainer.coords.standardized == "none"
    again.state.save()  # a journal of its own generation
    assert list((tmp_path / ".state").glob("snapshot.bin.*")), "not set aside"


def test_a_snapshot_from_before_the_first_publish_resumes_with_a_new_window(tmp_path):
    """A kill -9 between the first publish and the snapshot after it: the saved window scored the base, but
    the restarted trainer compares with the incumbent and the champion; it starts a new window rather than
    give the base's sums their names."""
    settings = dict(n_features=4, hidden=4, batch_size=4, replay_mix=0.0, replay_capacity=16, gate="off",
                    min_samples_ckpt=8, ckpt_interval_s=0.0)
    trainer = make_trainer(tmp_path, **settings)
    rng = np.random.default_rng(0)
    for _ in range(4):
        trainer.ingest(rng.uniform(0, 1, 4).astype(np.float32), np.float32(rng.uniform(20, 90)), False, True)
    before_publish = trainer.state_dict()
    assert before_publish["window_n"] == 4 and not before_publish["has_champion"]
    for _ in range(4):
        trainer.ingest(rng.uniform(0, 1, 4).astype(np.float32), np.float32(rng.uniform(20, 90)), False, True)
    assert trainer.checkpoints.latest is not None  # published, and latest.json names it
    again, _ = vs.build_trainer(vs.Config(checkpoint_dir=str(tmp_path), base_model_path="", **settings))
    again.load_state_dict(before_publish)
    assert again.window.n == 0 and list(again.references()) == ["incumbent", "champion"]
    assert again.window.evidence(again.references()).scores == {"candidate": None, "incumbent": None,
                                                                  "champion": None}


def four_feature_stream(seed: int, n: int) -> list[tuple[np.ndarray, np.float32]]:
    rng = np.random.default_rng(seed)
    return [(rng.uniform(0, 1, 4).astype(np.float32), np.float32(rng.uniform(20, 90))) for _ in range(n)]


def ingest_holding_out(trainer: vs.Trainer, stream: list[tuple[np.ndarray, np.float32]]) -> None:
    """The samples, without job_ids: held out by count, as the server holds such samples out."""
    for x, y in stream:
        trainer.ingest(x, y, trainer.is_held_out(None), True)


def test_a_window_scored_a_block_at_a_time_resumes_bit_for_bit(tmp_path, monkeypatch):
    """The references score a window's samples a block at a time: a state saved with a part of a block unscored
    continues exactly as the trainer that saved it, blocks and checkpoints included."""
    monkeypatch.setattr(vs, "WINDOW_BLOCK", 12)  # three steps of 4 new samples
    settings = dict(n_features=4, hidden=4, batch_size=8, replay_capacity=32, min_samples_ckpt=40,
                    ckpt_interval_s=0.0, gate_min_eval=8, eval_capacity=16)
    stream = four_feature_stream(2, 200)
    trainer = make_trainer(tmp_path / "a", **settings)
    for x, y in stream[:100]:
        trainer.ingest(x, y, False, True)
    saved = trainer.state_dict()
    assert 0 < saved["window_unscored"] < trainer.window.n and trainer.checkpoints.version == 2
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the checkpoints the state names
    again, _ = vs.build_trainer(vs.Config(checkpoint_dir=str(tmp_path / "b"), base_model_path="", **settings))
    again.load_state_dict(saved)
    for t in (trainer, again):
        for x, y in stream[100:]:
            t.ingest(x, y, False, True)
    assert trainer.checkpoints.version == again.checkpoints.version > 2
    assert trainer.last_gate["metrics"] == again.last_gate["metrics"]
    mine, theirs = trainer.state_dict(), again.state_dict()
    for key in mine.keys() - {"last_checkpoint_unix", "last_gate"}:
        as_bytes = (lambda v: v.tobytes()) if isinstance(mine[key], np.ndarray) else (lambda v: v)
        assert as_bytes(mine[key]) == as_bytes(theirs[key]), key


def test_a_ring_not_yet_full_is_saved_as_what_it_holds_and_resumes_bit_for_bit(tmp_path, caplog):
    """A snapshot held each ring at its capacity, whatever it held: with VMAFX_SIDECAR_REPLAY_CAPACITY=3000000 and
    80 features it wrote 928 MB for 50 samples, and took 4.9 s at SIGTERM, where README promises 2 (the settings
    hunt). A ring not yet full is saved as a full one of what it holds; it resumes where it was, and fills and wraps
    as the uninterrupted one does."""
    settings = dict(n_features=4, hidden=4, batch_size=8, replay_capacity=100_000, eval_capacity=200,
                    holdout_fraction=0.2, ckpt_interval_s=0.0, min_samples_ckpt=400)  # checkpoints by count
    stream = four_feature_stream(3, 1600)
    trainer = make_trainer(tmp_path / "a", **settings)
    ingest_holding_out(trainer, stream[:100])
    saved = trainer.state_dict()
    assert 0 < trainer.replay.size < 100 and 0 < trainer.eval.size < 100  # the premise: neither ring full
    assert saved["replay_x"].shape == (trainer.replay.size, 4) and saved["eval_y"].shape == (trainer.eval.size,)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    again, _ = vs.build_trainer(vs.Config(checkpoint_dir=str(tmp_path / "b"), base_model_path="", **settings))
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    again.load_state_dict(saved)
    assert "ring was saved with capacity" not in caplog.text
    for t in (trainer, again):
        ingest_holding_out(t, stream[100:])
    assert trainer.eval.size == 200 and trainer.checkpoints.version == again.checkpoints.version > 1  # filled, wrapped
    for ring in ("replay", "eval"):
        for part in ("x", "y", "size", "next"):
            as_bytes = (lambda v: v.tobytes()) if part in "xy" else (lambda v: v)
            assert as_bytes(getattr(getattr(trainer, ring), part)) == as_bytes(getattr(getattr(again, ring), part))
    mine, theirs = trainer.state_dict(), again.state_dict()
    for key in mine.keys() - {"last_checkpoint_unix", "last_gate"}:
        as_bytes = (lambda v: v.tobytes()) if isinstance(mine[key], np.ndarray) else (lambda v: v)
        assert as_bytes(mine[key]) == as_bytes(theirs[key]), key


@pytest.mark.parametrize("batch", [dict(batch_size=16), dict(batch_size=2), dict(replay_mix=0.25)],
                         ids=["a larger batch", "a smaller batch than the samples waiting", "another replay mix"])
def test_a_state_continues_under_other_batch_settings(tmp_path, monkeypatch, batch):
    """Batch settings can change between restarts: the state is not set aside, the weights and the window go on,
    and the samples waiting for a step go into the new batches, none lost; a window block longer than the new
    batch's is kept whole."""
    monkeypatch.setattr(vs, "WINDOW_BLOCK", 12)  # three steps of 4 new samples; one of 8 with the larger batch
    settings = dict(n_features=4, hidden=4, batch_size=8, replay_capacity=32, gate_min_eval=8, eval_capacity=16)
    stream = four_feature_stream(3, 200)
    trainer = make_trainer(tmp_path / "a", **settings)
    taken = 0
    while not (trainer.window.unscored == 12 and trainer.n_pending == 3):  # a full block, 3 of 4 samples waiting
        trainer.ingest(*stream[taken], False, True)
        taken += 1
    saved = trainer.state_dict()
    again = make_trainer(tmp_path / "b", **{**settings, **batch})
    again.load_state_dict(saved)
    n_new = again.n_new
    assert again.steps == trainer.steps + 3 // n_new and again.n_pending == 3 % n_new
    assert again.samples_trained == trainer.samples_trained + 3 // n_new * n_new
    if 3 < n_new:  # nothing trained on load: the same weights and the same samples waiting
        np.testing.assert_array_equal(again.vectors[:3], trainer.vectors[:3])  # theta, EMA, momentum
        np.testing.assert_array_equal(again.pending_x[:3], trainer.pending_x[:3])
        assert again.window.evidence(again.references()) == trainer.window.evidence(trainer.references())
    for x, y in stream[taken:]:
        again.ingest(x, y, False, True)
    assert again.samples_accepted == len(stream) and again.samples_trained + again.n_pending == len(stream)
    assert again.window.n == again.samples_trained - trainer.samples_trained + trainer.window.n
    assert np.isfinite(again.vectors).all()


@pytest.mark.parametrize("capacities", [dict(replay_capacity=64, eval_capacity=32),
                                        dict(replay_capacity=20, eval_capacity=5)], ids=["larger", "smaller"])
def test_a_state_continues_with_other_ring_capacities(tmp_path, capacities):
    """The replay and evaluation rings may be resized between restarts: each keeps its newest samples that fit,
    in order, and training goes on from the same weights."""
    settings = dict(n_features=4, hidden=4, batch_size=8, replay_capacity=32, eval_capacity=16, holdout_fraction=0.3)
    stream = four_feature_stream(4, 200)
    trainer = make_trainer(tmp_path / "a", **settings)
    ingest_holding_out(trainer, stream[:100])
    saved = trainer.state_dict()
    assert trainer.replay.size == 32 and trainer.replay.next != 0 and trainer.eval.size == 16  # full, wrapped
    again = make_trainer(tmp_path / "b", **{**settings, **capacities})
    again.load_state_dict(saved)
    np.testing.assert_array_equal(again.vectors[:3], trainer.vectors[:3])
    for ring in ("replay", "eval"):
        mine, theirs = getattr(trainer, ring), getattr(again, ring)
        assert theirs.size == min(mine.size, len(theirs.y))
        for ours, kept in zip(mine.older(0, theirs.size), theirs.older(0, theirs.size)):  # newest first
            np.testing.assert_array_equal(ours, kept)
    ingest_holding_out(again, stream[100:])
    assert again.samples_accepted == len(stream) and np.isfinite(again.vectors).all()
    assert again.replay_size == len(again.replay.y) and again.eval_size == len(again.eval.y)  # full again


@pytest.mark.parametrize("saved, size, position", [(9_000, 9_000, 9_000), (12_000, 12_000, 5_000), (0, 0, 0)],
                         ids=["saved before it filled", "saved larger, wrapped", "saved empty"])
def test_a_saved_ring_is_loaded_without_a_copy_of_it(saved, size, position):
    """Loaded through an index, a temporary copy of it whole: a restart took as much memory again as the ring,
    990 MiB at peak for a million rows of 80 features (the scarce hunt)."""
    ring = vs.Ring(10_000, 80, vs.NUMPY)
    x = np.arange(saved * 80, dtype=np.float32).reshape(saved, 80)
    y = np.arange(saved, dtype=np.float32)
    tracemalloc.start()
    try:
        ring.load(x, y, size, position)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < max(x.nbytes, 10**6) / 10
    newest = (position - 1 - np.arange(ring.size)) % saved  # newest first, as older() gives them
    for loaded, expected in zip(ring.older(0, ring.size), (x[newest], y[newest])):
        np.testing.assert_array_equal(loaded, expected)


def test_a_restart_with_other_batch_and_ring_settings_resumes_instead_of_starting_over(sidecar_factory, tmp_path):
    s = sidecar_factory(**SETTINGS)
    client, sent = s.client(), 0
    while (before := client.request({"op": "status"}))["pending"] < 2:  # samples waiting for a step of 4 new
        assert client.request(messages()[sent])["ok"]
        sent += 1
    s.stop(signal.SIGKILL)
    again = sidecar_factory(**{**SETTINGS, "VMAFX_SIDECAR_BATCH_SIZE": "2",  # a step every sample
                               "VMAFX_SIDECAR_REPLAY_CAPACITY": "40", "VMAFX_SIDECAR_EVAL_CAPACITY": "8"})
    status = again.client().request({"op": "status"})
    assert "resumed" in again.stderr() and "incompatible" not in again.stderr()
    assert status["samples_accepted"] == before["samples_accepted"]
    assert status["steps"] == before["steps"] + before["pending"] and status["pending"] == 0
    assert status["samples_trained"] == before["samples_trained"] + before["pending"]
    assert not list((s.checkpoint_dir / ".state").glob("*.incompatible"))
    feed(again, messages()[sent:])
    final = again.client().request({"op": "status"})
    assert final["samples_trained"] + final["samples_held_out"] == final["samples_accepted"] == TOTAL


def published_twice(directory) -> vs.Trainer:
    """A trainer that published v1 and v2 (the gate off), with the champion forced to v1 as the gate leaves it
    when v2 was published a little worse."""
    settings = dict(n_features=4, hidden=4, batch_size=4, replay_mix=0.0, replay_capacity=16, gate="off",
                    min_samples_ckpt=8, ckpt_interval_s=0.0, lr=0.05)
    trainer = make_trainer(directory, **settings)
    rng = np.random.default_rng(1)
    while trainer.checkpoints.version < 1:
        trainer.ingest(rng.uniform(0, 1, 4).astype(np.float32), np.float32(rng.uniform(20, 90)), False, True)
    v1 = trainer.champion.flat.copy()
    while trainer.checkpoints.version < 2:
        trainer.ingest(rng.uniform(0, 1, 4).astype(np.float32), np.float32(rng.uniform(20, 90)), False, True)
    trainer.champion.flat[...] = v1
    trainer.checkpoints.champion_version = 1
    return trainer


def test_a_rolled_back_champion_gives_way_to_the_incumbent(tmp_path, caplog):
    trainer = published_twice(tmp_path)
    saved = trainer.state_dict()
    assert (saved["has_champion"], saved["champion_version"]) == (True, 1)
    for path in tmp_path.glob("model_v000001.*"):  # the README's rollback, of the champion
        path.rename(tmp_path / "quarantine" / path.name)
    config = dataclasses.replace(trainer.config, base_model_path="")
    again, _ = vs.build_trainer(config)
    caplog.set_level(logging.WARNING, logger="vmafx_sidecar")
    again.load_state_dict(saved)
    assert again.checkpoints.champion_version == 2 == again.checkpoints.latest["version"]
    np.testing.assert_array_equal(again.champion.flat, again.incumbent.flat)
    assert again.window.n == 0  # the saved window scored the rolled-back champion
    assert any("v000001, is no longer published" in r.getMessage() for r in caplog.records)
    for path in (tmp_path / "quarantine").glob("model_v000001.*"):  # undone: the saved champion stays
        path.rename(tmp_path / path.name)
    kept, _ = vs.build_trainer(config)
    kept.load_state_dict(saved)
    assert kept.checkpoints.champion_version == 1
    np.testing.assert_array_equal(kept.champion.flat, saved["champion"])


def test_a_checkpoint_deleted_by_hand_does_not_give_its_version_to_another(tmp_path):
    """Not the README's rollback (a move into quarantine/), but an operator's rm: the next checkpoint was written
    as a different model under the deleted one's version, which a node that had loaded it would not reload."""
    trainer = published_twice(tmp_path)
    saved = trainer.state_dict()
    for path in [*tmp_path.glob("model_v000002.*"), *tmp_path.glob("latest.*")]:
        path.unlink()
    config = dataclasses.replace(trainer.config, base_model_path="")
    again, _ = vs.build_trainer(config)
    assert again.checkpoints.version == 1  # what the directory alone says
    again.load_state_dict(saved)
    assert again.checkpoints.version == 2
    rng = np.random.default_rng(3)
    while again.checkpoints.version < 3:
        again.ingest(rng.uniform(0, 1, 4).astype(np.float32), np.float32(rng.uniform(20, 90)), False, True)
    assert not (tmp_path / "model_v000002.onnx").exists() and (tmp_path / "model_v000003.onnx").exists()


def test_retention_keeps_the_champion(tmp_path, monkeypatch):
    trainer = published_twice(tmp_path)
    monkeypatch.setattr(vs.Verdict, "displaces_champion", lambda self, least: False)  # v1 stays the champion
    trainer.checkpoints.keep = 1
    rng = np.random.default_rng(2)
    while trainer.checkpoints.version < 4:
        trainer.ingest(rng.uniform(0, 1, 4).astype(np.float32), np.float32(rng.uniform(20, 90)), False, True)
    assert trainer.checkpoints.champion_version == 1
    published = sorted(p.name for p in tmp_path.glob("model_v*.onnx.sha256"))
    assert published == ["model_v000001.onnx.sha256", "model_v000004.onnx.sha256"], published


def test_a_loop_turn_journals_its_lines_in_one_write_before_any_of_their_acks(tmp_path, monkeypatch):
    server = in_process_server(tmp_path)
    writes = []
    real_write_all = vs.write_all
    monkeypatch.setattr(vs, "write_all", lambda fd, content: (writes.append(bytes(content)), real_write_all(fd, content)))
    pairs = [socket.socketpair(socket.AF_UNIX) for _ in range(3)]
    connections = []
    for server_end, client_end in pairs:
        server_end.setblocking(False)
        client_end.setblocking(False)
        connections.append(vs.Connection(server_end, server.on_connection_ready))
        server.connections.add(connections[-1])
        server.selector.register(server_end, selectors.EVENT_READ, connections[-1])
    for (_, client_end), m in zip(pairs, messages(3)):
        client_end.sendall(json.dumps(m).encode() + b"\n")
    for conn in connections:  # the turn's callbacks, as select() reported the three ready
        conn(selectors.EVENT_READ)
    for _, client_end in pairs:
        with pytest.raises(BlockingIOError):  # no ACK before the journal has the samples
            client_end.recv(100)
    assert writes == []
    server.end_turn()
    assert len(writes) == 1  # one write for the three connections' samples
    for (_, client_end), m in zip(pairs, messages(3)):
        ack = json.loads(client_end.recv(1000))
        assert ack["ok"] and ack.get("job_id") == m.get("job_id")
    records, _, _ = vs.Journal.read(server.state.journal_path, 5, server.state.generation)
    assert [r.features.tolist() for r in records] == [np.float32(m["features"]).tolist() for m in messages(3)]
    for pair in pairs:
        for end in pair:
            end.close()
