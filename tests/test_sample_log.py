"""The sample log (issue #17, first part): every accepted sample appended to checksummed segments, read
back exactly, torn tails ignored, sequences continued across restarts and never written twice."""
from __future__ import annotations

import numpy as np
import pytest

import vmafx_sidecar as vs

N_FEATURES = 5


def sample(sequence: int, rng: np.random.Generator, job_id: str | None = "job") -> vs.LoggedSample:
    return vs.LoggedSample(sequence, 1.8e9 + sequence / 10, sequence % 7 == 0, job_id and f"{job_id}-{sequence}",
                           rng.normal(0, 1, N_FEATURES).astype(np.float32), np.float32(rng.uniform(0, 100)))


def read_all(directory, after: int = 0) -> list[vs.LoggedSample]:
    return [s for path in vs.segment_paths(directory / vs.SAMPLE_LOG_DIR)
            for s in vs.read_segment(path, N_FEATURES, after)]


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
        log.commit()
    assert_same(read_all(tmp_path), written)
    assert_same(read_all(tmp_path, after=60), written[60:])


def test_a_restart_continues_after_the_last_record_and_never_writes_one_twice(tmp_path):
    rng = np.random.default_rng(1)
    written = [sample(i, rng) for i in range(1, 41)]
    log = vs.SampleLog(tmp_path, N_FEATURES)
    for s in written[:25]:
        log.append(s)
    log.commit()
    again = vs.SampleLog(tmp_path, N_FEATURES)  # as after a crash: the journal replays 20..40
    assert again.last_sequence == 25
    for s in written[19:]:
        again.append(s)
    again.commit()
    assert_same(read_all(tmp_path), written)
    assert len(vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)) == 2  # a restart starts a new segment


@pytest.mark.parametrize("cut", [1, 9, 30, -1], ids=["in-header", "in-fields", "in-body", "last-byte"])
def test_a_torn_tail_is_ignored_never_misread(tmp_path, cut):
    rng = np.random.default_rng(2)
    written = [sample(i, rng) for i in range(1, 11)]
    log = vs.SampleLog(tmp_path, N_FEATURES)
    for s in written:
        log.append(s)
    log.commit()
    (path,) = vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)
    data = path.read_bytes()
    record = (len(data) - vs.SEGMENT_HEADER.size) // 10
    path.write_bytes(data[:len(data) - record + cut] if cut > 0 else data[:cut])
    assert_same(read_all(tmp_path), written[:9])
    assert vs.SampleLog(tmp_path, N_FEATURES).last_sequence == 9


def test_a_flipped_byte_ends_the_segment_there(tmp_path):
    rng = np.random.default_rng(3)
    written = [sample(i, rng) for i in range(1, 11)]
    log = vs.SampleLog(tmp_path, N_FEATURES)
    for s in written:
        log.append(s)
    log.commit()
    (path,) = vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)
    data = bytearray(path.read_bytes())
    record = (len(data) - vs.SEGMENT_HEADER.size) // 10
    data[vs.SEGMENT_HEADER.size + 4 * record + record // 2] ^= 0x10  # inside the fifth record
    path.write_bytes(bytes(data))
    assert_same(read_all(tmp_path), written[:4])


def test_segments_rotate_by_size_and_each_starts_at_its_first_sequence(tmp_path, monkeypatch):
    monkeypatch.setattr(vs, "SEGMENT_BYTES", 1000)
    rng = np.random.default_rng(4)
    written = [sample(i, rng) for i in range(1, 201)]
    log = vs.SampleLog(tmp_path, N_FEATURES)
    for s in written:
        log.append(s)
        log.commit()
    paths = vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)
    assert len(paths) > 5
    for path in paths:
        first = next(vs.read_segment(path, N_FEATURES)).sequence
        assert path.name == f"{first:016d}.seg"
    assert_same(read_all(tmp_path), written)


def test_a_segment_of_another_feature_count_is_refused_by_name(tmp_path):
    log = vs.SampleLog(tmp_path, N_FEATURES)
    log.append(sample(1, np.random.default_rng(5)))
    log.commit()
    (path,) = vs.segment_paths(tmp_path / vs.SAMPLE_LOG_DIR)
    with pytest.raises(ValueError, match=f"{path.name}: not a sample log segment of 6 features"):
        list(vs.read_segment(path, 6))
