"""FeedbackClient: the node's delivery contract, against the real sidecar and scripted stand-ins for it."""
from __future__ import annotations

import errno
import gc
import json
import logging
import math
import os
import re
import resource
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import vmafx_feedback as vf
from conftest import ACK_TIMEOUT_S, Sidecar
from test_cli_send_status import flooding

N = 8
ENV = {"VMAFX_SIDECAR_N_FEATURES": str(N), "VMAFX_SIDECAR_MIN_SAMPLES_CKPT": str(10**9)}


def good(rng: np.random.Generator) -> tuple[list[float], float]:
    return rng.uniform(0, 1, N).tolist(), float(rng.uniform(20, 100))


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.005)


def server_status(sidecar) -> dict:
    return sidecar.client().request({"op": "status"})


def assert_no_loss(client: vf.FeedbackClient, accepted: int, sent: int) -> None:
    """Every sample got an ok ACK; the server counted each at least once, twice only if it was resent."""
    assert (client.delivered, client.dropped, client.rejected) == (sent, 0, 0)
    assert sent <= accepted <= sent + client.resent


@pytest.fixture
def clients():
    """Makes FeedbackClients and closes them at the end, so no delivery thread outlives its test."""
    made: list[vf.FeedbackClient] = []

    def make(*args, **kwargs) -> vf.FeedbackClient:
        made.append(vf.FeedbackClient(*args, **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close(timeout=0)


@pytest.fixture
def fast_retry(monkeypatch):
    monkeypatch.setattr(vf, "FEEDBACK_RETRY_S", (0.05, 0.2))


@pytest.fixture
def patient_acks(monkeypatch):
    """For a test that counts the sidecar's samples exactly: an ACK later than FEEDBACK_ACK_DEADLINE_S (2 s), as a
    loaded machine's can be, has the sample resent and counted twice. Here the deadline bounds a hang only."""
    monkeypatch.setattr(vf, "FEEDBACK_ACK_DEADLINE_S", ACK_TIMEOUT_S)


@pytest.fixture
def sidecar_later(tmp_path):
    """A sidecar not started yet, so that its socket path is known before it listens."""
    s = Sidecar(tmp_path, ENV)
    yield s
    if s.proc is None:
        shutil.rmtree(s.sockdir, ignore_errors=True)
    else:
        s.cleanup()


def start_again(s: Sidecar) -> None:
    """Start a stopped sidecar on the same socket and checkpoint directory, with a log of its own."""
    s.stderr_file.close()
    s.stderr_path = s.workdir / "stderr-restarted.log"
    s.start()


@pytest.fixture
def short_dir():
    """A directory short enough for AF_UNIX socket paths (~107 bytes)."""
    path = tempfile.mkdtemp(prefix="vxf")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class FakeSidecar:
    """A scripted stand-in: answers status with n_features, then `on_sample(connection_index, line)` decides
    the fate of each sample line: an ACK line to send, None to stay silent, or "close" to hang up."""

    def __init__(self, path: str, on_sample, max_line_bytes: int = 1 << 20):
        self.on_sample = on_sample
        self.max_line_bytes = max_line_bytes  # as its status tells it
        self.samples: list[bytes] = []  # every sample line received, resends included
        self.stopping = False
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.listener.settimeout(0.05)
        self.threads = [threading.Thread(target=self.accept_loop, daemon=True)]
        self.threads[0].start()

    def accept_loop(self) -> None:
        index = 0
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            t = threading.Thread(target=self.serve, args=(conn, index), daemon=True)
            self.threads.append(t)
            t.start()
            index += 1

    def serve(self, conn: socket.socket, index: int) -> None:
        conn.settimeout(0.05)
        try:
            for line in self.lines(conn):
                if json.loads(line).get("op") == "status":
                    conn.sendall(json.dumps({"ok": True, "op": "status", "config": {
                        "n_features": N, "max_line_bytes": self.max_line_bytes}}).encode() + b"\n")
                    continue
                self.samples.append(line)
                answer = self.on_sample(index, line)
                if answer == "close":
                    return
                if answer is not None:
                    conn.sendall(answer)
        except OSError:
            return
        finally:
            conn.close()

    def lines(self, conn: socket.socket):
        buffer = bytearray()
        while not self.stopping:
            if (end := buffer.find(b"\n")) >= 0:
                yield bytes(buffer[:end + 1])
                del buffer[:end + 1]
                continue
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            buffer += data

    def stop(self) -> None:
        self.stopping = True
        for t in self.threads:
            t.join(5)
        self.listener.close()


OK_ACK = b'{"ok": true, "step": 0, "trained": false}\n'


# ---- against the real server


def test_delivers_every_sample_and_reports_prometheus_counters(sidecar_factory, clients):
    s = sidecar_factory(**ENV)
    client = clients(s.socket)
    rng = np.random.default_rng(1)
    assert all(client.send(*good(rng), job_id=f"j{i}") for i in range(300))
    assert not client.send([math.nan] * N, 50.0)  # rejected locally
    client.close(timeout=30)
    assert not client.send(*good(rng))  # after close: dropped
    status = server_status(s)
    assert client.delivered == 300 and 300 <= status["samples_accepted"] <= 300 + client.resent
    assert (client.dropped, client.rejected, status["samples_rejected"]) == (1, 1, 0)
    assert parse_prometheus(client.metrics_text()) == {
        "vmafx_training_feedback_delivered_total": 300,
        "vmafx_training_feedback_dropped_total": 1,
        "vmafx_training_feedback_rejected_total": 1,
    }


def parse_prometheus(text: str) -> dict[str, float]:
    """A strict reader of the text format as metrics_text writes it: HELP, TYPE counter, one sample each."""
    assert text.endswith("\n")
    lines = text[:-1].split("\n")
    assert len(lines) % 3 == 0
    values: dict[str, float] = {}
    name_re = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
    for i in range(0, len(lines), 3):
        help_line, type_line, sample_line = lines[i:i + 3]
        m = re.fullmatch(rf"# HELP ({name_re}) (\S.*)", help_line)
        assert m, help_line
        name = m.group(1)
        assert "\\" not in m.group(2)  # nothing that would need escaping
        assert type_line == f"# TYPE {name} counter"
        m = re.fullmatch(rf"({name_re}) (\S+)", sample_line)
        assert m and m.group(1) == name, sample_line
        value = float(m.group(2))
        assert value >= 0 and name.endswith("_total") and name not in values
        values[name] = value
    return values


def test_server_rejections_count_until_the_length_is_known(sidecar_factory, clients, patient_acks):
    s = sidecar_factory(**ENV)
    client = clients(s.socket)
    # Before the first connection the client cannot know n_features: the server refuses the sample.
    assert client.send([0.5] * (N - 3), 50.0, job_id="short")
    wait_until(lambda: client.rejected == 1)
    assert server_status(s)["samples_rejected"] == 1
    # Now it knows: the same mistake is refused locally and never travels.
    assert not client.send([0.5] * (N - 3), 50.0)
    assert client.send([0.5] * N, 50.0)
    client.close(timeout=30)
    status = server_status(s)
    assert (client.delivered, client.rejected, client.dropped) == (1, 2, 0)
    assert (status["samples_accepted"], status["samples_rejected"]) == (1, 1)


class BrokenArray(np.ndarray):
    def tolist(self):
        raise RuntimeError("a producer bug")


def test_invalid_samples_are_refused_locally_and_never_raise(sidecar_factory, clients, caplog):
    s = sidecar_factory(VMAFX_SIDECAR_MAX_LINE_BYTES="4096", **ENV)
    client = clients(s.socket)
    rng = np.random.default_rng(2)
    assert client.send(*good(rng))
    wait_until(lambda: client.delivered == 1)  # connected: n_features and the line limit are known
    row = [0.5] * N
    invalid = [
        ([math.nan] + row[1:], 50.0, None), ([math.inf] + row[1:], 50.0, None),
        (row[:-1] + [-math.inf], 50.0, None), ([1e39] + row[1:], 50.0, None), ([-1e39] + row[1:], 50.0, None),
        ([2 ** 1024] + row[1:], 50.0, None), ([True] + row[1:], 50.0, None), (["0.5"] + row[1:], 50.0, None),
        ([None] + row[1:], 50.0, None), ([np.bool_(True)] + row[1:], 50.0, None), ([1 + 2j] + row[1:], 50.0, None),
        (row, math.nan, None), (row, math.inf, None), (row, 1e39, None), (row, True, None), (row, "87", None),
        (row, None, None), (row[:-1], 50.0, None), (row + [0.5], 50.0, None), ([0.5] * 10**6, 50.0, None),
        (None, 50.0, None), ("abcdefgh", 50.0, None), ({i: 0.5 for i in range(N)}, 50.0, None),
        (object(), 50.0, None), ([object()] * N, 50.0, None), (np.zeros((N, 1)), 50.0, None),
        (row, 50.0, 17), (row, 50.0, b"job"), (row, 50.0, "x" * 5000),  # the last: longer than the line limit
    ]
    for features, score, job_id in invalid:
        assert client.send(features, score, job_id) is False, (features, score, job_id)
    assert client.rejected == len(invalid)
    # A failure inside send() is a dropped sample, logged once per kind, never an exception.
    with caplog.at_level(logging.WARNING, logger="vmafx_sidecar"):
        assert not client.send(np.zeros(N).view(BrokenArray), 50.0)
        assert not client.send(np.zeros(N).view(BrokenArray), 50.0)
    assert client.dropped == 2
    assert sum("unexpected error" in r.getMessage() for r in caplog.records) == 1
    # The edges that are valid: float32 extremes, ints, numpy arrays and scalars, a tuple.
    valid = [([3.4028234663852886e38, -3.4028234663852886e38] + row[2:], 0, "edge"),
             (np.float32(0.25) + np.zeros(N, np.float32), np.float64(42.0), None), (tuple(range(N)), 7, None),
             ([np.int64(3)] * N, np.float32(1.5), None)]
    for features, score, job_id in valid:
        assert client.send(features, score, job_id) is True
    client.close(timeout=30)
    status = server_status(s)
    assert (client.delivered, client.rejected, client.dropped) == (1 + len(valid), len(invalid), 2)
    assert status["samples_rejected"] == 0
    assert 1 + len(valid) <= status["samples_accepted"] <= 1 + len(valid) + client.resent


def test_server_down_at_start_then_up_delivers_everything(sidecar_later, clients, fast_retry):
    client = clients(sidecar_later.socket)
    rng = np.random.default_rng(3)
    assert all(client.send(*good(rng), job_id=f"j{i}") for i in range(50))
    time.sleep(0.3)  # a few refused connects and backoff pauses, not a condition to wait for
    assert client.delivered == 0
    sidecar_later.start()
    client.close(timeout=30)
    assert_no_loss(client, server_status(sidecar_later)["samples_accepted"], 50)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_server_restart_mid_stream_loses_nothing(sidecar_later, clients, fast_retry, sig):
    s = sidecar_later.start()
    client = clients(s.socket, capacity=5000)
    rng = np.random.default_rng(4)
    sent = 0

    def produce(n: int) -> None:
        nonlocal sent
        for _ in range(n):
            assert client.send(*good(rng), job_id=f"j{sent}")
            sent += 1

    produce(1000)
    wait_until(lambda: client.delivered >= 100)
    # The stream goes on across the restart: same socket, same checkpoint directory (journal and snapshot).
    s.stop(sig)
    produce(500)
    start_again(s)
    produce(500)
    client.close(timeout=60)
    assert_no_loss(client, server_status(s)["samples_accepted"], sent)


# ---- against stand-ins: the cases the real server does not produce on demand


def test_queue_full_drops_are_counted_exactly(clients, short_dir):
    client = clients(f"{short_dir}/nobody.sock", capacity=5)  # no server: nothing drains
    rng = np.random.default_rng(5)
    assert [client.send(*good(rng)) for _ in range(12)] == [True] * 5 + [False] * 7
    assert (client.dropped, client.delivered, client.rejected) == (7, 0, 0)
    client.close(timeout=0)
    assert client.dropped == 12


@pytest.mark.parametrize("capacity", [0, -1])
def test_a_queue_that_holds_no_sample_is_refused(short_dir, capacity):
    """A capacity of 0 was taken, and the client then dropped every sample it was given (mutation hunt)."""
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        vf.FeedbackClient(f"{short_dir}/nobody.sock", capacity=capacity)


def test_close_with_the_server_down_counts_the_queue_as_dropped_in_time(clients, short_dir, monkeypatch):
    monkeypatch.setattr(vf, "FEEDBACK_RETRY_S", (30.0, 120.0))  # a pause close() must cut short
    path = f"{short_dir}/nobody.sock"
    monkeypatch.setenv("VMAFX_SIDECAR_SOCKET", path)
    client = clients()  # the default socket path comes from the environment
    assert client.socket_path == path
    rng = np.random.default_rng(6)
    assert all(client.send(*good(rng)) for _ in range(10))
    started = time.monotonic()
    client.close(timeout=0.5)
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 10, elapsed
    assert (client.dropped, client.delivered) == (10, 0)
    assert not client.send(*good(rng))
    client.close(timeout=5)  # idempotent
    assert client.dropped == 11


def test_close_in_a_long_backoff_pause_delivers_to_a_sidecar_back_since(clients, short_dir, monkeypatch):
    """A sidecar that starts after its producers, or restarts, leaves the thread in a pause of up to two minutes:
    close() ends it, so its timeout is spent delivering, not waiting for the next try."""
    monkeypatch.setattr(vf, "FEEDBACK_RETRY_S", (30.0, 120.0))
    client = clients(f"{short_dir}/s.sock")
    rng = np.random.default_rng(8)
    assert all(client.send(*good(rng), job_id=f"j{i}") for i in range(10))
    wait_until(lambda: not client._reachable)  # its first connect was refused: now in a 30 s pause
    fake = FakeSidecar(f"{short_dir}/s.sock", lambda conn, line: OK_ACK)
    try:
        started = time.monotonic()
        client.close(timeout=10)
        assert time.monotonic() - started < 10
        assert (client.delivered, client.dropped) == (10, 0) and len(fake.samples) == 10
    finally:
        fake.stop()


def test_close_during_a_connection_attempt_retries_soon_after_it_fails(clients, short_dir, monkeypatch):
    """close() called while a connection attempt waits (a sidecar still starting): the pause after that attempt
    failed was the grown one, not FEEDBACK_RETRY_S[0], and the queue was dropped though the sidecar was back."""
    monkeypatch.setattr(vf, "FEEDBACK_RETRY_S", (30.0, 120.0))  # the pause the thread would take after a failure
    monkeypatch.setattr(vf, "FEEDBACK_ACK_DEADLINE_S", 0.5)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{short_dir}/s.sock")
    listener.listen(4)
    held: list[socket.socket] = []

    def serve() -> None:  # the first connection is never answered; the next ones are
        held.append(listener.accept()[0])
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                answer = {"ok": True, "op": "status", "config": {"n_features": N, "max_line_bytes": 1 << 20}}
                conn.sendall(json.dumps(answer if b'"op"' in line else {"ok": True}).encode() + b"\n")

    threading.Thread(target=serve, daemon=True).start()
    try:
        client = clients(f"{short_dir}/s.sock")
        assert client.send([0.5] * N, 50.0, job_id="once")
        wait_until(lambda: held)  # the thread now waits for its status answer
        monkeypatch.setattr(vf, "FEEDBACK_RETRY_S", (0.05, 120.0))
        started = time.monotonic()
        client.close(timeout=10)
        assert time.monotonic() - started < 10 and (client.delivered, client.dropped) == (1, 0)
    finally:
        for conn in held:
            conn.close()
        listener.close()


@pytest.mark.parametrize("failure", ["hang up", "no ACK before the deadline"])
def test_unknown_delivery_is_resent_on_a_new_connection(clients, short_dir, monkeypatch, fast_retry, failure):
    monkeypatch.setattr(vf, "FEEDBACK_ACK_DEADLINE_S", 1.0)
    lost_answer = "close" if failure == "hang up" else None
    fake = FakeSidecar(f"{short_dir}/s.sock", lambda conn, line: lost_answer if conn == 0 else OK_ACK)
    try:
        client = clients(f"{short_dir}/s.sock")
        assert client.send([0.5] * N, 50.0, job_id="once")
        client.close(timeout=30)
        assert (client.delivered, client.resent, client.dropped) == (1, 1, 0)
        assert len(fake.samples) == 2 and fake.samples[0] == fake.samples[1]
        assert json.loads(fake.samples[0])["job_id"] == "once"
    finally:
        fake.stop()


def test_send_never_blocks_and_close_cuts_a_stalled_delivery(clients, short_dir, monkeypatch):
    monkeypatch.setattr(vf, "FEEDBACK_ACK_DEADLINE_S", 30.0)  # a wait that send() and close() must not share
    fake = FakeSidecar(f"{short_dir}/s.sock", lambda conn, line: None)  # takes samples, never answers
    try:
        client = clients(f"{short_dir}/s.sock", capacity=3000)
        rng = np.random.default_rng(7)
        rows = [good(rng) for _ in range(2000)]
        assert client.send(*rows[0])
        wait_until(lambda: len(fake.samples) == 1)  # the thread now waits for that ACK
        started = time.monotonic()
        assert all(client.send(*row) for row in rows[1:])
        assert time.monotonic() - started < 10
        started = time.monotonic()
        client.close(timeout=0)
        assert time.monotonic() - started < 10  # close() interrupted the ACK wait
        assert (client.dropped, client.delivered, client.resent) == (2000, 0, 0)  # the one in flight included
    finally:
        fake.stop()


def test_backoff_doubles_to_the_cap_and_resets_after_an_ack(clients, short_dir, monkeypatch):
    pauses: list[float] = []
    original_wait_for = threading.Condition.wait_for

    def record_pause(self, predicate, timeout=None):
        if timeout is None:  # waiting for work: not a backoff pause
            return original_wait_for(self, predicate, timeout)
        pauses.append(timeout)
        return original_wait_for(self, predicate, 0.001)  # the schedule is recorded, not slept

    # Connections 0-7 hang up on the first sample; 8 acks it, then hangs up on the second, as do all later ones.
    fake = FakeSidecar(f"{short_dir}/s.sock", lambda conn, line: OK_ACK if len(fake.samples) == 9 else "close")
    try:
        client = clients(f"{short_dir}/s.sock")
        monkeypatch.setattr(client._cond, "wait_for", record_pause.__get__(client._cond))
        assert client.send([0.5] * N, 50.0)
        assert client.send([0.5] * N, 51.0)
        wait_until(lambda: client.delivered == 1 and len(pauses) >= 10)
        assert pauses[:10] == [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 120.0, 120.0, 2.0, 4.0]
    finally:
        client.close(timeout=0)
        fake.stop()


def test_a_queued_sample_is_a_copy_the_caller_may_reuse_its_list():
    row = [0.5] * N
    message = vf.feedback_message(row, 50.0, "j", N, 1 << 20)
    row[0] = 99.0  # a producer refilling its buffer for the next job
    assert message["features"] == [0.5] * N and message["features"] is not row
    assert vf.feedback_line(message) == b'{"features":[' + b",".join([b"0.5"] * N) + b'],"true_score":50.0,"job_id":"j"}\n'


# ---- the delivery thread outlives whatever the connection brings

def test_an_answer_nested_past_jsons_limit_costs_one_connection_not_the_thread(clients, short_dir, fast_retry):
    def on_sample(index: int, line: bytes):
        return b"[" * 100_000 + b"\n" if index == 0 else OK_ACK  # RecursionError in json.loads
    fake = FakeSidecar(f"{short_dir}/s.sock", on_sample)
    try:
        client = clients(f"{short_dir}/s.sock")
        rng = np.random.default_rng(5)
        for _ in range(3):
            assert client.send(*good(rng))
        wait_until(lambda: client.delivered == 3)
        assert (client.dropped, client.rejected, client.resent) == (0, 0, 1)
    finally:
        fake.stop()


class GoneAfterStatus(FakeSidecar):
    """Its first connection answers the client's status request, then is closed (`gone` set); later ones are served."""

    def __init__(self, path: str, on_sample):
        self.gone = threading.Event()
        super().__init__(path, on_sample)

    def serve(self, conn: socket.socket, index: int) -> None:
        if index:
            return super().serve(conn, index)
        next(self.lines(conn))
        status = {"ok": True, "op": "status", "config": {"n_features": N, "max_line_bytes": 1 << 20}}
        conn.sendall(json.dumps(status).encode() + b"\n")
        conn.close()
        self.gone.set()


def sample_lines_wait_until_gone(monkeypatch, fake: GoneAfterStatus) -> None:
    """The client's sample lines leave only once `fake` has closed the connection that answered its status: they
    meet a closed connection (EPIPE) however the threads run. Left to them, a line often left before the close,
    and the client saw a reset on its read instead."""
    real_send = socket.socket.send

    def send_once_gone(sock: socket.socket, data: bytes, *flags: int) -> int:
        if data != vf.FEEDBACK_STATUS_REQUEST:
            assert fake.gone.wait(5)
        return real_send(sock, data, *flags)
    monkeypatch.setattr(socket.socket, "send", send_once_gone)


def test_a_write_to_a_connection_the_sidecar_closed_raises_no_sigpipe(clients, short_dir, fast_retry, monkeypatch):
    """A producer that restored SIGPIPE's default action (a C program embedding Python does) would be killed. The
    write is made to meet the closed connection: left to the threads' timing, the test missed a send without
    MSG_NOSIGNAL in 2 runs of 6 (the review)."""
    previous = signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        fake = GoneAfterStatus(f"{short_dir}/s.sock", lambda index, line: OK_ACK)
        sample_lines_wait_until_gone(monkeypatch, fake)
        try:
            client = clients(f"{short_dir}/s.sock")
            assert client.send(*good(np.random.default_rng(6)))
            wait_until(lambda: client.delivered == 1)
        finally:
            fake.stop()
    finally:
        signal.signal(signal.SIGPIPE, previous)


def test_a_write_that_sent_no_byte_is_retried_but_not_counted_as_resent(clients, short_dir, fast_retry, monkeypatch):
    """A line refused whole (EPIPE: the sidecar closed before any byte left) cannot be a duplicate; it was counted in
    `resent` all the same, which bounds the sidecar's double counts (mutation hunt)."""
    fake = GoneAfterStatus(f"{short_dir}/s.sock", lambda index, line: OK_ACK)
    sample_lines_wait_until_gone(monkeypatch, fake)
    try:
        client = clients(f"{short_dir}/s.sock")
        assert client.send(*good(np.random.default_rng(6)))
        client.close(timeout=30)
        assert (client.delivered, client.resent, client.dropped) == (1, 0, 0) and len(fake.samples) == 1
    finally:
        fake.stop()


@pytest.mark.parametrize("limit", ["n_features", "max_line_bytes"])
def test_a_sidecar_gone_since_it_told_the_limits_judges_the_samples_itself(clients, short_dir, monkeypatch, limit):
    """With the connection that learned n_features already closed (the client between retries), a sample of another
    count was refused here by the old sidecar's limit instead of queued for the next one (mutation hunt); a later
    mutation hunt found the line limit's half untested (a rollout may raise VMAFX_SIDECAR_MAX_LINE_BYTES)."""
    monkeypatch.setattr(vf, "FEEDBACK_RETRY_S", (30.0, 120.0))  # no retry within the test, however slow the machine
    fake = FakeSidecar(f"{short_dir}/s.sock", lambda index, line: "close", max_line_bytes=200)  # hangs up on samples
    try:
        client = clients(f"{short_dir}/s.sock")
        assert client.send([0.5] * N, 50.0)
        wait_until(lambda: client.resent == 1)  # disconnected, its first retry 30 s away
        assert client._sock is None
        features, job_id = ([0.5] * (N + 1), None) if limit == "n_features" else ([0.5] * N, "j" * 300)
        assert client.send(features, 50.0, job_id=job_id) and client.rejected == 0  # past the limits it was told
    finally:
        fake.stop()


@pytest.mark.parametrize("answer", [b'{"step": 0, "trained": false}\n', b'{"ok": "false"}\n'],
                         ids=["no ok", "a string ok"])
def test_an_answer_without_a_boolean_ok_costs_one_connection_not_the_sample(clients, short_dir, fast_retry, answer):
    """An answer with no "ok", or one that is not a boolean, raised a KeyError (the sample dropped) or was read as
    a delivery: it is no ACK, and the sample is sent again on a new connection (mutation hunt)."""
    fake = FakeSidecar(f"{short_dir}/s.sock", lambda index, line: answer if index == 0 else OK_ACK)
    try:
        client = clients(f"{short_dir}/s.sock")
        assert client.send([0.5] * N, 50.0)
        client.close(timeout=30)
        assert (client.delivered, client.resent, client.dropped, client.rejected) == (1, 1, 0, 0)
    finally:
        fake.stop()


def test_numpy_long_double_values_are_numbers():
    features = np.full(N, 0.5, np.longdouble)
    message = vf.feedback_message(features, np.longdouble(70.5), None, N, None)
    assert message == {"features": [0.5] * N, "true_score": 70.5}
    assert all(type(v) is float for v in message["features"])


def test_a_forked_child_delivers_its_own_samples_with_its_own_counters(clients, short_dir):
    received: list[bytes] = []
    fake = FakeSidecar(f"{short_dir}/s.sock", lambda index, line: received.append(line) or OK_ACK)
    try:
        client = clients(f"{short_dir}/s.sock")
        rng = np.random.default_rng(7)
        assert client.send(*good(rng))
        wait_until(lambda: client.delivered == 1)
        with client._cond:  # fork while the parent's lock is held, as a sending thread may hold it
            pid = os.fork()
            if pid == 0:
                try:
                    sent = client.send([0.25] * N, 42.0)
                    client.close(timeout=5)
                    os._exit(0 if sent and (client.delivered, client.dropped) == (1, 0) else 3)
                except BaseException:
                    os._exit(4)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert len(received) == 2 and json.loads(received[1])["true_score"] == 42.0
        assert client.send(*good(rng))  # the parent goes on as it was
        wait_until(lambda: client.delivered == 2)
    finally:
        fake.stop()


def test_out_of_file_descriptors_is_the_sidecar_out_of_reach_not_every_sample_lost(clients, short_dir, monkeypatch,
                                                                                     fast_retry):
    """A process out of file descriptors (EMFILE) for a while: the samples wait, as for any failure to connect. The
    error had reached the thread's guard against bugs, which dropped the whole queue a sample at a time."""
    fake = FakeSidecar(f"{short_dir}/s.sock", lambda index, line: OK_ACK)
    real_socket, refused = socket.socket, []

    def no_descriptor(*args, **kwargs):  # an accepted socket (fileno given) is the fake sidecar's own
        if "fileno" not in kwargs and len(refused) < 3:
            refused.append(args)
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_socket(*args, **kwargs)
    monkeypatch.setattr(socket, "socket", no_descriptor)
    try:
        client = clients(f"{short_dir}/s.sock")
        for score in range(20):
            assert client.send([0.5] * N, float(score))
        client.close(timeout=30)
        assert (client.delivered, client.dropped, len(refused)) == (20, 0, 3)
    finally:
        fake.stop()


def test_an_unexpected_error_in_the_thread_costs_that_sample_only(clients, short_dir, monkeypatch, caplog):
    real_line = vf.feedback_line

    def line(message):
        if message["true_score"] == 13.0:
            raise RuntimeError("a bug in encoding")
        return real_line(message)
    monkeypatch.setattr(vf, "feedback_line", line)
    fake = FakeSidecar(f"{short_dir}/s.sock", lambda index, line: OK_ACK)
    try:
        client = clients(f"{short_dir}/s.sock")
        for score in (10.0, 13.0, 20.0):
            assert client.send([0.5] * N, score)
        wait_until(lambda: client.delivered == 2)
        assert client.dropped == 1 and "sample dropped on an unexpected error: RuntimeError" in caplog.text
    finally:
        fake.stop()


@pytest.mark.parametrize("timeout", [None, math.inf, 1e10, threading.TIMEOUT_MAX])
def test_close_with_a_timeout_past_what_a_lock_can_wait_waits_for_delivery(sidecar_later, fast_retry, patient_acks,
                                                                           timeout):
    """close(math.inf), "deliver everything, however long": the lock's own wait had raised OverflowError, with
    send() already refused and the thread left retrying. It delivers once the sidecar is back, then returns; so does
    close(None), threading's spelling of no bound."""
    client = vf.FeedbackClient(sidecar_later.socket)
    rng = np.random.default_rng(0)
    assert all(client.send(*good(rng)) for _ in range(5))
    starter = threading.Timer(0.3, sidecar_later.start)
    starter.start()
    try:
        client.close(timeout=timeout)
    finally:
        starter.join()
    assert (client.delivered, client.dropped) == (5, 0) and not client._thread.is_alive()
    assert server_status(sidecar_later)["samples_accepted"] == 5


def test_a_client_used_as_a_context_manager_is_closed_on_leaving_it(sidecar_factory):
    """Its thread holds the client, so one dropped without close() is never collected: `with` closes it."""
    sidecar = sidecar_factory(**ENV)
    with vf.FeedbackClient(sidecar.socket) as client:
        assert client.send(*good(np.random.default_rng(1)))
    assert client.delivered == 1 and not client._thread.is_alive() and not client.send(*good(np.random.default_rng(2)))


def test_an_exception_from_a_signal_handler_inside_send_never_leaves_the_lock_held(tmp_path):
    """Ctrl-C, or a SIGALRM job timeout, raised inside send(): the Condition's __enter__ is Python code, and an
    exception landing there after it took the lock left it held, so that every later send() and close() blocked and
    the delivery thread stopped (the producer hunt)."""
    client = vf.FeedbackClient(str(tmp_path / "absent.sock"), capacity=10**6)  # closed only if its lock is free
    inside = False

    def interrupt(*_):
        if inside:
            raise KeyboardInterrupt

    # No garbage collection in the storm: an earlier test's object finalized inside send() took the interrupt in its
    # __del__, and pytest's unraisable hook, interrupted in turn, failed the test (1 run in 3 after other files).
    gc.collect()
    gc.disable()
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.00005)
    interrupted, deadline = 0, time.monotonic() + 5
    try:
        while interrupted < 300 and time.monotonic() < deadline:
            try:
                inside = True
                client.send([0.5] * N, 50.0)
                inside = False
            except KeyboardInterrupt:
                inside, interrupted = False, interrupted + 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        gc.enable()
    other = threading.Thread(target=client.send, args=([0.5] * N, 50.0), daemon=True)
    other.start()
    other.join(5)
    assert interrupted > 0 and not other.is_alive(), f"send() blocked after {interrupted} interrupts"
    client.close(timeout=0)


def test_an_answer_that_never_ends_costs_the_connection_not_all_memory(tmp_path, clients, fast_retry, caplog):
    """A foreign server on the socket path writing one endless line: the delivery thread read it unbounded until
    its 2 s deadline, gigabytes a try (the producer hunt)."""
    path = str(tmp_path / "s.sock")
    stop = flooding(path)
    try:
        client = clients(path)
        with caplog.at_level(logging.WARNING, logger="vmafx_sidecar"):
            assert client.send([0.5] * N, 50.0)
            wait_until(lambda: vf.NOT_AN_ANSWER in caplog.text)
        assert client.delivered == 0 and len(client._inbuf) <= vf.ANSWER_MAX_BYTES + vf.RECV_BYTES
    finally:
        stop.set()


def test_a_socket_path_given_as_a_path_object_is_delivered_to(sidecar_factory, clients):
    """A pathlib.Path was taken, then every connect() failed on it (a TypeError), the sidecar reported unreachable
    and each sample dropped at close (the producer hunt)."""
    s = sidecar_factory(**ENV)
    client = clients(Path(s.socket))
    assert client.send([0.5] * N, 50.0)
    client.close(timeout=30)
    assert (client.delivered, client.dropped) == (1, 0)


def test_a_sidecar_restarted_with_another_feature_count_judges_the_samples_itself(sidecar_factory, clients, tmp_path):
    """The count learned from the sidecar that stopped refused, before they were queued, every sample of the count
    its successor takes: the client never connected again to learn it, and delivered nothing until the producer
    restarted (the producer hunt)."""
    path = str(tmp_path / "s.sock")
    (tmp_path / "before").mkdir()
    (tmp_path / "after").mkdir()
    before = sidecar_factory(workdir=tmp_path / "before", **ENV, VMAFX_SIDECAR_SOCKET=path)
    client = clients(path)
    assert client.send([0.5] * N, 50.0)
    wait_until(lambda: client.delivered == 1)
    assert not client.send([0.5] * (N + 1), 50.0)  # the sidecar that said N still runs: refused here
    before.stop()
    sidecar_factory(workdir=tmp_path / "after", **{**ENV, "VMAFX_SIDECAR_N_FEATURES": str(N + 1)},
                    VMAFX_SIDECAR_SOCKET=path)
    assert client.send([0.5] * (N + 1), 50.0)
    client.close(timeout=30)
    assert (client.delivered, client.rejected, client.dropped) == (2, 1, 0)


def test_a_client_whose_socket_is_past_descriptor_1023_still_tells_a_live_sidecars_limits(sidecar_factory, clients):
    """A busy producer holds many files: select() refuses a descriptor past 1023, and the check whether the sidecar
    that said n_features still runs dropped the sample as an unexpected error (the review)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"a hard limit of {hard} open files: no descriptor past 1023")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200) if hard == resource.RLIM_INFINITY
                                                else min(max(soft, 1200), hard), hard))
    held = []
    try:
        s = sidecar_factory(**ENV)
        while not held or held[-1] < 1030:
            held.append(os.open(os.devnull, os.O_RDONLY))
        client = clients(s.socket)
        assert client.send([0.5] * N, 50.0)
        wait_until(lambda: client.delivered == 1)
        assert client._sock.fileno() > 1023
        assert not client.send([0.5] * (N + 1), 50.0)  # refused here: the sidecar that said N still runs
        assert (client.rejected, client.dropped) == (1, 0)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
