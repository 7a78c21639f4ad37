"""The sidecar's wire protocol and server behaviour, through a real Unix socket to a server subprocess.

Covers: ACK format (byte-exact), one ACK per non-blank line in order, the training cadence seen
in ACKs, every kind of malformed line (each rejected with a field-specific error, the connection
staying usable, nothing malformed reaching the model), control ops, fairness between clients
(stalled and non-reading clients do not delay others), the line-length limit, EOF handling,
SIGTERM/SIGINT shutdown, socket-file handling at start-up and logging volume.
"""
from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

import vmafx_sidecar as vs
from conftest import ACK_TIMEOUT_S, ROOT, Client, NoState, Sidecar, make_trainer, sample

N_FEATURES = 80
SILENCE_S = 0.5  # how long "nothing more arrives" is watched for; a correct server passes regardless
# A "not delayed" check, not a benchmark: 0.2 s at worst here, loaded or not, where a loaded CI machine has held one
# ACK over 5 s (its fsyncs).
ROUND_TRIP_LIMIT_S = 10.0


# ---- helpers ----

def encode(message: dict) -> bytes:
    return json.dumps(message).encode() + b"\n"


def assert_silent(client: Client, wait: float = SILENCE_S) -> None:
    """Nothing more arrives on the connection (no unsolicited line, no close). Ends the client's reads."""
    client.sock.settimeout(wait)
    try:
        data = client.reader.peek(1)
    except TimeoutError:
        return
    pytest.fail(f"expected silence, got {data[:300]!r}" if data else "expected silence, the server closed")


def read_ack(sidecar: Sidecar, client: Client) -> dict:
    """Client.read_ack, with the server's fate and stderr in the failure when the connection dies."""
    try:
        return client.read_ack()
    except AssertionError as e:
        time.sleep(0.2)  # only on the failure path: let a crashing server finish writing its traceback
        rc = sidecar.proc.poll()
        raise AssertionError(f"{e}\nserver exit status: {rc}\nserver stderr (tail):\n{sidecar.stderr()[-3000:]}")


def status(client: Client) -> dict:
    ack = client.request({"op": "status"})
    assert ack["ok"] is True and ack["op"] == "status", ack
    return ack


def accepted_within(client: Client, count: int) -> int:
    """The status's samples_accepted once it reaches `count`, or when ACK_TIMEOUT_S has passed (a hang's bound)."""
    deadline = time.monotonic() + ACK_TIMEOUT_S
    while (accepted := status(client)["samples_accepted"]) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return accepted


def feature_list(bad: str | None = None, at: int = 3, n: int = N_FEATURES) -> str:
    """The JSON text of a feature array of n numbers, element `at` replaced by the literal `bad`."""
    values = ["0.5"] * n
    if bad is not None:
        values[at] = bad
    return "[" + ", ".join(values) + "]"


VALID_FEATURES = feature_list()


def sample_text(features: str | None = VALID_FEATURES, score: str | None = "87.25",
                job_id: str | None = '"bad"') -> bytes:
    """A sample request written as text, so that NaN, 1e999 and 10**400 can be spelled as literals.
    Each argument is the raw JSON text of its field; None leaves the field out."""
    fields = {"job_id": job_id, "features": features, "true_score": score}
    return ("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items() if v is not None) + "}").encode()


HUGE_INT = str(10**400)

# (id, request line, error prefix, text the error must also contain, job_id echoed in the error ACK)
MALFORMED = [
    # not JSON
    ("garbage", b"hello world", "not valid JSON", "", None),
    ("truncated", b'{"features": [1, 2', "not valid JSON", "", None),
    ("trailing-garbage", b'{"op": "ping"} x', "not valid JSON", "", None),
    ("invalid-utf8", b'{"job_id": "enc-\xc3\x28", "features": [], "true_score": 1}', "not valid JSON", "UTF-8", None),
    ("lone-continuation-byte", b'{"job_id": "\x80"}', "not valid JSON", "UTF-8", None),
    ("deep-array-nesting", b"[" * 100_000, "not valid JSON", "", None),
    ("deep-object-nesting", b'{"a": ' * 50_000, "not valid JSON", "", None),
    # valid JSON, not an object
    ("array", b"[1, 2, 3]", "expected a JSON object", "array", None),
    ("string", b'"features"', "expected a JSON object", "string", None),
    ("number", b"42", "expected a JSON object", "number", None),
    ("null", b"null", "expected a JSON object", "null", None),
    ("boolean", b"true", "expected a JSON object", "boolean", None),
    # features
    ("features-missing", sample_text(features=None), "features:", "missing", "bad"),
    ("features-null", sample_text(features="null"), "features:", "", "bad"),
    ("features-string", sample_text(features='"0.5, 0.5"'), "features:", "string", "bad"),
    ("features-number", sample_text(features="0.5"), "features:", "number", "bad"),
    ("features-object", sample_text(features='{"0": 0.5}'), "features:", "object", "bad"),
    ("features-empty", sample_text(features="[]"), "features:", "got 0", "bad"),
    ("features-79", sample_text(features=feature_list(n=79)), "features:", "got 79", "bad"),
    ("features-81", sample_text(features=feature_list(n=81)), "features:", "got 81", "bad"),
    ("features-holds-string", sample_text(features=feature_list('"0.5"')), "features[3]:", "string", "bad"),
    ("features-holds-boolean", sample_text(features=feature_list("true")), "features[3]:", "boolean", "bad"),
    ("features-holds-null", sample_text(features=feature_list("null")), "features[3]:", "null", "bad"),
    ("features-holds-list", sample_text(features=feature_list("[0.5]")), "features[3]:", "array", "bad"),
    ("features-holds-object", sample_text(features=feature_list("{}")), "features[3]:", "object", "bad"),
    ("features-nan", sample_text(features=feature_list("NaN")), "features[3]:", "finite", "bad"),
    ("features-infinity", sample_text(features=feature_list("Infinity")), "features[3]:", "finite", "bad"),
    ("features-minus-infinity", sample_text(features=feature_list("-Infinity")), "features[3]:", "finite", "bad"),
    ("features-1e999", sample_text(features=feature_list("1e999")), "features[3]:", "finite", "bad"),
    ("features-minus-1e999", sample_text(features=feature_list("-1e999")), "features[3]:", "finite", "bad"),
    ("features-1e39", sample_text(features=feature_list("1e39")), "features[3]:", "float32", "bad"),
    ("features-minus-1e39", sample_text(features=feature_list("-1e39")), "features[3]:", "float32", "bad"),
    ("features-last-1e39", sample_text(features=feature_list("1e39", at=79)), "features[79]:", "float32", "bad"),
    ("features-huge-int", sample_text(features=feature_list(HUGE_INT)), "features[3]:", "float32", "bad"),
    ("features-minus-huge-int", sample_text(features=feature_list("-" + HUGE_INT)), "features[3]:", "float32",
     "bad"),
    # true_score
    ("score-missing", sample_text(score=None), "true_score:", "missing", "bad"),
    ("score-string", sample_text(score='"87.25"'), "true_score:", "string", "bad"),
    ("score-boolean", sample_text(score="false"), "true_score:", "boolean", "bad"),
    ("score-null", sample_text(score="null"), "true_score:", "null", "bad"),
    ("score-list", sample_text(score="[87.25]"), "true_score:", "array", "bad"),
    ("score-nan", sample_text(score="NaN"), "true_score:", "finite", "bad"),
    ("score-1e999", sample_text(score="1e999"), "true_score:", "finite", "bad"),
    ("score-1e39", sample_text(score="1e39"), "true_score:", "float32", "bad"),
    ("score-huge-int", sample_text(score=HUGE_INT), "true_score:", "float32", "bad"),
    # job_id
    ("job-id-number", sample_text(job_id="42"), "job_id:", "number", None),
    ("job-id-boolean", sample_text(job_id="true"), "job_id:", "boolean", None),
    ("job-id-list", sample_text(job_id='["enc-1"]'), "job_id:", "array", None),
    ("job-id-object", sample_text(job_id='{"id": "enc-1"}'), "job_id:", "object", None),
]


# ---- a server shared by the tests that neither stop it nor depend on its counters ----

@pytest.fixture(scope="module")
def _shared_holder():
    holder: dict[str, Sidecar] = {}
    yield holder
    if "sidecar" in holder:
        holder["sidecar"].cleanup()


@pytest.fixture
def shared_sidecar(_shared_holder, tmp_path_factory) -> Sidecar:
    """A module-wide server, restarted if an earlier test killed it (so one crash fails one test)."""
    s = _shared_holder.get("sidecar")
    if s is None or s.proc.poll() is not None:
        if s is not None:
            s.cleanup()
        s = _shared_holder["sidecar"] = Sidecar(tmp_path_factory.mktemp("shared"), {})
        s.start()
    yield s
    for c in s.clients:
        c.close()
    s.clients.clear()


# ---- samples and ACKs ----

def test_sample_acks_are_byte_exact_and_a_step_runs_every_16_samples(sidecar):
    rng = np.random.default_rng(1)
    c = sidecar.client()
    c.send_raw(encode(sample(rng, job_id="enc-1")))
    assert c.reader.readline() == b'{"ok": true, "step": 0, "trained": false, "job_id": "enc-1"}\n'
    for i in range(2, 16):
        ack = c.request(sample(rng, job_id=f"enc-{i}"))
        assert ack == {"ok": True, "step": 0, "trained": False, "job_id": f"enc-{i}"}
        assert list(ack) == ["ok", "step", "trained", "job_id"]
    ack = c.request(sample(rng, job_id="enc-16"))
    assert list(ack) == ["ok", "step", "trained", "loss", "job_id"], ack
    assert ack["ok"] is True and ack["step"] == 1 and ack["trained"] is True and ack["job_id"] == "enc-16"
    assert type(ack["loss"]) is float and math.isfinite(ack["loss"]) and ack["loss"] >= 0
    # job_id is optional: without it the ACK has no job_id key
    for i in range(17, 32):
        ack = c.request(sample(rng))
        assert ack == {"ok": True, "step": 1, "trained": False}
        assert list(ack) == ["ok", "step", "trained"]
    ack = c.request(sample(rng))
    assert list(ack) == ["ok", "step", "trained", "loss"] and ack["step"] == 2 and ack["trained"] is True
    assert math.isfinite(ack["loss"])
    st = status(c)
    assert (st["steps"], st["samples_accepted"], st["samples_rejected"], st["replay_size"]) == (2, 32, 0, 32)
    assert st["checkpoint_version"] is None
    assert_silent(c)


def test_error_ack_is_byte_exact(shared_sidecar):
    c = shared_sidecar.client()
    c.send_raw(sample_text(features=feature_list(n=79), score="87.25", job_id='"enc-8850"') + b"\n")
    assert c.reader.readline() == \
        b'{"ok": false, "error": "features: expected 80 numbers, got 79", "job_id": "enc-8850"}\n'
    c.send_raw(b"[1]\n")
    assert c.reader.readline() == b'{"ok": false, "error": "expected a JSON object, got array"}\n'
    assert_silent(c)


def test_checkpoint_path_appears_in_the_ack_that_wrote_it(sidecar_factory):
    # The gate off: 16 random samples are too little evidence for it, and a quarantined checkpoint is not named.
    s = sidecar_factory(VMAFX_SIDECAR_MIN_SAMPLES_CKPT="16", VMAFX_SIDECAR_CKPT_INTERVAL_S="0",
                        VMAFX_SIDECAR_GATE="off")
    rng = np.random.default_rng(2)
    c = s.client()
    for i in range(15):
        assert "checkpoint" not in c.request(sample(rng, job_id=f"c-{i}"))
    ack = c.request(sample(rng, job_id="c-15"))
    assert list(ack) == ["ok", "step", "trained", "loss", "checkpoint", "job_id"], ack
    assert ack["step"] == 1 and ack["trained"] is True
    assert os.path.isfile(ack["checkpoint"]) and os.path.dirname(ack["checkpoint"]) == str(s.checkpoint_dir)
    assert status(c)["checkpoint_version"] == 1
    assert_silent(c)


def test_pipelined_lines_get_one_ack_each_in_order_and_blank_lines_none(shared_sidecar):
    rng = np.random.default_rng(3)
    c = shared_sidecar.client()
    lines, expected = [], []
    for i in range(30):
        if i % 5 == 0:
            lines.append(b"")  # blank lines of several kinds: no ACK
            lines.append(b"   \t ")
            lines.append(b"\r")
        if i % 7 == 3:
            lines.append(encode({"op": "ping", "job_id": f"p-{i}"})[:-1])
            expected.append((True, f"p-{i}"))
        elif i % 7 == 5:
            lines.append(sample_text(features=feature_list(n=3), job_id=f'"b-{i}"'))
            expected.append((False, f"b-{i}"))
        else:
            lines.append(encode(sample(rng, job_id=f"s-{i}"))[:-1])
            expected.append((True, f"s-{i}"))
    c.send_raw(b"\n".join(lines) + b"\n\n \n")
    got = [read_ack(shared_sidecar, c) for _ in expected]
    assert [(a["ok"], a["job_id"]) for a in got] == expected
    assert_silent(c)


def test_blank_lines_alone_get_no_ack(shared_sidecar):
    c = shared_sidecar.client()
    c.send_raw(b"\n   \n\t\n \r\n")
    assert_silent(c)
    c2 = shared_sidecar.client()
    c2.send_raw(b"\n\n")
    assert c2.request({"op": "ping"}) == {"ok": True, "op": "pong"}
    assert_silent(c2)


# ---- malformed lines ----

@pytest.mark.parametrize("line, prefix, contains, job_id", [case[1:] for case in MALFORMED],
                         ids=[case[0] for case in MALFORMED])
def test_malformed_line_is_rejected_and_the_connection_keeps_working(shared_sidecar, line, prefix, contains, job_id):
    rng = np.random.default_rng(4)
    c = shared_sidecar.client()
    before = status(c)
    c.send_raw(line + b"\n")
    ack = read_ack(shared_sidecar, c)
    assert ack["ok"] is False, ack
    assert list(ack) == ["ok", "error"] + (["job_id"] if job_id is not None else []), ack
    assert ack.get("job_id") == job_id
    assert ack["error"].startswith(prefix), ack["error"]
    assert contains in ack["error"], ack["error"]
    # the same connection still works, and the bad line reached neither the counters of good samples nor the model
    c.send_raw(encode(sample(rng, job_id="after")))
    ack = read_ack(shared_sidecar, c)
    assert ack["ok"] is True and ack["job_id"] == "after", ack
    after = status(c)
    assert after["samples_rejected"] == before["samples_rejected"] + 1
    assert after["samples_accepted"] == before["samples_accepted"] + 1
    assert after["replay_size"] == before["replay_size"] + 1


def test_rejections_are_counted_and_nothing_malformed_reaches_the_model(sidecar):
    rng = np.random.default_rng(5)
    c = sidecar.client()
    for name, line, prefix, _, _ in MALFORMED:
        c.send_raw(line + b"\n")
        ack = read_ack(sidecar, c)
        assert ack["ok"] is False and ack["error"].startswith(prefix), (name, ack)
        ack = c.request(sample(rng, job_id=f"ok-{name}"))
        assert ack["ok"] is True and ack["job_id"] == f"ok-{name}", (name, ack)
    st = status(c)
    n = len(MALFORMED)
    assert st["samples_rejected"] == n
    assert st["samples_accepted"] == n
    assert st["replay_size"] == n
    assert st["steps"] == n // 16
    assert_silent(c)


# ---- control ops ----

def test_ping(shared_sidecar):
    c = shared_sidecar.client()
    c.send_raw(b'{"op": "ping"}\n')
    assert c.reader.readline() == b'{"ok": true, "op": "pong"}\n'
    c.send_raw(b'{"op": "ping", "job_id": "p-1"}\n')
    assert c.reader.readline() == b'{"ok": true, "op": "pong", "job_id": "p-1"}\n'
    assert_silent(c)


def test_status_of_a_fresh_server(sidecar):
    c = sidecar.client()
    st = status(c)
    assert list(st)[:2] == ["ok", "op"]
    assert st["steps"] == 0
    assert st["samples_accepted"] == 0
    assert st["samples_rejected"] == 0
    assert st["replay_size"] == 0
    assert st["checkpoint_version"] is None
    assert type(st["uptime_s"]) in (int, float) and 0 <= st["uptime_s"] < 600
    assert st["backend"] == "numpy"
    config = st["config"]
    assert type(config) is dict
    assert config["batch_size"] == 32
    assert config["replay_mix"] == 0.5
    assert config["n_features"] == N_FEATURES
    assert config["max_line_bytes"] == 1048576
    assert config["socket"] == sidecar.socket
    assert config["checkpoint_dir"] == str(sidecar.checkpoint_dir)
    assert_silent(c)


def test_status_reflects_settings(sidecar_factory):
    s = sidecar_factory(VMAFX_SIDECAR_BATCH_SIZE="8", VMAFX_SIDECAR_REPLAY_MIX="0.25")
    c = s.client()
    assert status(c)["config"]["batch_size"] == 8
    rng = np.random.default_rng(6)
    # 8 per batch, 2 from replay: a step every 6 new samples
    acks = [c.request(sample(rng)) for _ in range(12)]
    assert [a["trained"] for a in acks] == [False] * 5 + [True] + [False] * 5 + [True]
    assert [a["step"] for a in acks] == [0] * 5 + [1] * 6 + [2]


def test_unknown_or_malformed_op_is_rejected(shared_sidecar):
    c = shared_sidecar.client()
    ack = c.request({"op": "reboot", "job_id": "op-1"})
    assert ack["ok"] is False and ack["job_id"] == "op-1"
    assert "unknown op" in ack["error"] and "reboot" in ack["error"]
    for op in (5, ["ping"], {"op": "ping"}, True):
        ack = c.request({"op": op})
        assert ack["ok"] is False and ack["error"].startswith("op:"), (op, ack)
    for op in (None, ""):  # no op: a sample, and this one has no features
        assert c.request({"op": op}) == {"ok": False, "error": "features: missing"}
    assert c.request({"op": "ping"}) == {"ok": True, "op": "pong"}
    assert_silent(c)


# ---- several clients ----

def test_interleaved_clients_each_get_their_own_acks_in_order(shared_sidecar):
    rng = np.random.default_rng(7)
    a, b = shared_sidecar.client(), shared_sidecar.client()
    for i in range(20):
        a.send_raw(encode(sample(rng, job_id=f"a-{i}")))
        b.send_raw(encode(sample(rng, job_id=f"b-{i}")))
    # a line split across sends, with the other client's whole line in between
    line = encode(sample(rng, job_id="a-20"))
    a.send_raw(line[:100])
    b.send_raw(encode(sample(rng, job_id="b-20")))
    a.send_raw(line[100:])
    assert [read_ack(shared_sidecar, a)["job_id"] for _ in range(21)] == [f"a-{i}" for i in range(21)]
    assert [read_ack(shared_sidecar, b)["job_id"] for _ in range(21)] == [f"b-{i}" for i in range(21)]
    assert_silent(a)
    assert_silent(b)


def start_flood(path: str, n_lines: int, rng: np.random.Generator):
    """A client that writes n_lines sample lines from a thread and reads nothing.
    Long job_ids make the unread ACKs (~0.2 kB each) exceed any kernel socket buffer; 4 000 lines
    stay under the 1 MiB at which the server stops reading a client until it reads."""
    bodies = [json.dumps(sample(rng))[1:] for _ in range(64)]  # '"features": [...], "true_score": x}'
    pad = "x" * 120
    job_ids = [f"flood-{i:05d}-{pad}" for i in range(n_lines)]
    data = "".join(f'{{"job_id": "{job_ids[i]}", {bodies[i % 64]}\n' for i in range(n_lines)).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(path)
    errors: list[BaseException] = []

    def write():
        try:
            sock.sendall(data)
        except OSError as e:
            errors.append(e)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return sock, thread, errors, job_ids


def stop_flood(sock: socket.socket, thread: threading.Thread) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes the writer thread if it is still blocked in sendall
    except OSError:
        pass
    sock.close()
    thread.join(10)


def test_stalled_and_non_reading_clients_do_not_delay_others(sidecar):
    rng = np.random.default_rng(8)
    n_flood = 4_000
    flood, flood_thread, flood_errors, flood_ids = start_flood(sidecar.socket, n_flood, rng)
    try:
        stalled = sidecar.client()
        stalled_line = encode(sample(rng, job_id="stalled"))
        stalled.send_raw(stalled_line[:len(stalled_line) // 2])

        c = sidecar.client()
        for i in range(50):
            started = time.monotonic()
            message = {"op": "status"} if i % 10 == 9 else sample(rng, job_id=f"third-{i}")
            c.send_raw(encode(message))
            ack = read_ack(sidecar, c)
            elapsed = time.monotonic() - started
            assert ack["ok"] is True, ack
            if "job_id" in message:
                assert ack["job_id"] == f"third-{i}"
            assert elapsed < ROUND_TRIP_LIMIT_S, f"round trip {i} took {elapsed:.2f} s"
        assert status(c)["connections"] == 3  # the stalled and flooding clients are still there

        # the stalled client finishes its line and is answered
        stalled.send_raw(stalled_line[len(stalled_line) // 2:])
        ack = read_ack(sidecar, stalled)
        assert ack["ok"] is True and ack["job_id"] == "stalled"

        # the flooding client finally reads: every ACK is there, in order
        flood.settimeout(20)
        reader = flood.makefile("rb")
        for i in range(n_flood):
            line = reader.readline()
            assert line.endswith(b"\n"), f"flood ACK {i} missing: {line!r}"
            ack = json.loads(line)
            assert ack["ok"] is True and ack["job_id"] == flood_ids[i], (i, ack)
        flood_thread.join(30)
        assert not flood_thread.is_alive() and flood_errors == []
        reader.close()
        assert_silent(stalled)
        assert_silent(c)
    finally:
        stop_flood(flood, flood_thread)


def read_while_sending(client: Client, data: bytes) -> list[bytes]:
    """Send `data` in one sendall from a thread while this one reads every ACK line until the server closes or
    stays silent; the lines read, a torn last one included."""
    client.sock.settimeout(30)
    sender = threading.Thread(target=client.sock.sendall, args=(data,), daemon=True)
    sender.start()
    lines, expected = [], data.count(b"\n")
    try:
        while line := client.reader.readline():
            lines.append(line)
            if len(lines) == expected:
                break
    except TimeoutError:
        pass
    sender.join(10)
    return lines


@pytest.mark.parametrize("line, count", [(b"x\n", 40_000), (b'{"op": "status"}\n', 4_000),
                                         (b'{"op": "' + b"\x7f" * 100 + b'"}\n', 40_000)],
                         ids=["invalid lines", "status requests", "unknown ops"])
def test_a_client_that_pipelines_more_acks_than_the_sidecar_holds_gets_them_all_while_it_reads(sidecar, line, count):
    """One recv of small lines can make megabytes of ACKs: the client that sent them, though it read all along,
    was disconnected mid-ACK once 1 MiB of them waited. Its lines now wait for room, and it gets every ACK."""
    client = sidecar.client()
    lines = read_while_sending(client, line * count)
    assert len(lines) == count  # a torn last line would be one too many, or fail below
    assert all(ack.endswith(b"\n") and json.loads(ack)["ok"] == (b"status" in line) for ack in lines)
    assert client.request({"op": "ping"}) == {"ok": True, "op": "pong"}
    assert status(client)["connections_dropped"] == 0


def test_a_client_that_reads_its_acks_slowly_is_not_taken_for_one_that_stopped(sidecar):
    """Its socket turns writable only once it has read a quarter of the buffer: at ~25 KB/s that is longer than
    the stall limit, and a reader of 40 KB/s was dropped. Its lines wait for room; it is never dropped."""
    client = sidecar.client()
    client.sock.settimeout(30)
    count = 3000
    sender = threading.Thread(target=send_quietly, args=(client.sock, b'{"op": "status"}\n' * count), daemon=True)
    sender.start()
    time.sleep(1.0)  # a full buffer of ACKs, and lines waiting
    started, received = time.monotonic(), b""
    while time.monotonic() - started < vs.STALL_S + 2:  # ~25 KB/s
        received += client.sock.recv(1250)
        time.sleep(0.05)
    while received.count(b"\n") < count and (chunk := client.sock.recv(1 << 20)):
        received += chunk
    assert received.count(b"\n") == count and received.endswith(b"\n")
    sender.join(10)
    assert status(sidecar.client())["connections_dropped"] == 0


def send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:  # the server closed the connection: what the test waits for
        pass


def test_a_client_that_sends_on_but_stops_reading_is_disconnected_once_its_acks_wait_for_stall_s(sidecar):
    client = sidecar.client()
    client.sock.settimeout(60)
    sender = threading.Thread(target=send_quietly, args=(client.sock, b"x\n" * 2_000_000), daemon=True)
    started = time.monotonic()
    sender.start()
    watcher = sidecar.client()
    while status(watcher)["connections_dropped"] == 0:
        assert time.monotonic() - started < 30, "the client that never reads was not disconnected"
        time.sleep(0.2)
    assert time.monotonic() - started >= vs.STALL_S  # a client that merely reads late is not dropped at once
    sender.join(10)
    assert not sender.is_alive() and status(watcher)["connections"] == 1


@pytest.mark.parametrize("newline", ["in the next read", "at the end of the read"])
def test_too_long_lines_from_a_client_that_never_reads_wait_for_room_like_any_other(tmp_path, newline):
    """A too-long line whose newline comes in a later read was answered with no look at the ACKs waiting, and the
    connection was never held back: a client that sent nothing else and never read grew them without bound."""
    trainer = make_trainer(tmp_path, n_features=4, max_line_bytes=16)
    server = vs.Server(trainer.config, trainer, NoState())
    ours, theirs = socket.socketpair()
    conn = vs.Connection(ours, server.on_connection_ready)
    read = b"\n" + b"x" * 40 if newline == "in the next read" else b"x" * 40 + b"\n"  # each read ends or begins one
    ack = b'{"ok": false, "error": "line too long (limit 16 bytes)"}\n'
    try:
        for _ in range(2 * vs.OUTBUF_HIGH // len(ack)):  # as the loop reads it: until it is held back
            server.take_lines(conn, read)
            if conn in server.backlog:
                break
        assert vs.OUTBUF_HIGH <= len(conn.outbuf) < vs.OUTBUF_HIGH + len(ack) and conn in server.backlog
        assert conn.outbuf == ack * (len(conn.outbuf) // len(ack))
        del conn.outbuf[:]  # the client read them all: the line that waited is answered, then it is read again
        server.take_lines(conn, b"")
        assert conn.outbuf == ack and conn not in server.backlog
    finally:
        ours.close()
        theirs.close()


# ---- line length ----
# ---- line length ----

def padded_sample_line(rng: np.random.Generator, length: int, job_prefix: str) -> bytes:
    """A valid sample line of exactly `length` bytes (newline not counted), padded through its job_id."""
    message = sample(rng, job_id=job_prefix)
    pad = length - len(json.dumps(message))
    assert pad >= 0
    message["job_id"] += "z" * pad
    line = json.dumps(message).encode()
    assert len(line) == length
    return line


def test_line_too_long_is_rejected_once_and_the_connection_continues(sidecar_factory):
    s = sidecar_factory(VMAFX_SIDECAR_MAX_LINE_BYTES="4096")
    rng = np.random.default_rng(9)
    c = s.client()
    c.send_raw(padded_sample_line(rng, 10_000, "long-") + b"\n")
    ack = read_ack(s, c)
    assert ack["ok"] is False and "line too long" in ack["error"], ack
    ack = c.request(sample(rng, job_id="next"))
    assert ack["ok"] is True and ack["job_id"] == "next", ack
    st = status(c)
    assert st["samples_rejected"] == 1 and st["samples_accepted"] == 1 and st["replay_size"] == 1
    assert_silent(c)


def test_multi_megabyte_line_sent_in_chunks_is_rejected_once(sidecar_factory):
    s = sidecar_factory(VMAFX_SIDECAR_MAX_LINE_BYTES="4096")
    rng = np.random.default_rng(10)
    c = s.client()
    chunk = b'{"features": [' + b"0.5, " * 13_000  # 65 KB, no newline
    for _ in range(48):  # about 3 MB
        c.send_raw(chunk)
    c.send_raw(b"0.5]}\n" + encode(sample(rng, job_id="next")))
    ack = read_ack(s, c)
    assert ack["ok"] is False and "line too long" in ack["error"], ack
    ack = read_ack(s, c)
    assert ack["ok"] is True and ack["job_id"] == "next", ack
    assert status(c)["samples_rejected"] == 1
    assert_silent(c)


def test_line_of_exactly_the_limit_is_accepted(tmp_path):
    """A line of exactly the limit whose newline came in a later read was refused as too long: the loop's reads are
    taken in-process, as a socket may join two sends into one read (mutation hunt)."""
    trainer = make_trainer(tmp_path, max_line_bytes=4096)
    server = vs.Server(trainer.config, trainer, NoState())
    ours, theirs = socket.socketpair()
    conn = vs.Connection(ours, server.on_connection_ready)
    rng = np.random.default_rng(11)
    line = padded_sample_line(rng, 4096, "exact-")

    def acks(*reads: bytes) -> list[dict]:
        for read in reads:
            server.take_lines(conn, read)
        answered = [json.loads(ack) for ack in bytes(conn.outbuf).splitlines()]
        del conn.outbuf[:]
        return answered

    try:
        for reads in [(line + b"\n",), (line, b"\n"), (line[:1000], line[1000:], b"\n")]:  # in one read or in pieces
            [ack] = acks(*reads)
            assert ack["ok"] is True and ack["job_id"].startswith("exact-"), (len(reads), ack)
        over = padded_sample_line(rng, 4097, "over-")
        for reads in [(over + b"\n",), (over, b"\n")]:  # one byte more is too long
            [ack] = acks(*reads)
            assert ack["ok"] is False and "line too long" in ack["error"], (len(reads), ack)
        assert acks(b'{"op": "ping"}\n') == [{"ok": True, "op": "pong"}]
    finally:
        ours.close()
        theirs.close()


# ---- end of input ----

def test_last_line_without_newline_is_answered_at_eof(shared_sidecar):
    rng = np.random.default_rng(12)
    c = shared_sidecar.client()
    c.send_raw(b'{"op": "ping"}\n' + encode(sample(rng, job_id="last"))[:-1])
    c.sock.shutdown(socket.SHUT_WR)
    assert read_ack(shared_sidecar, c) == {"ok": True, "op": "pong"}
    ack = read_ack(shared_sidecar, c)
    assert ack["ok"] is True and ack["job_id"] == "last", ack
    assert c.reader.readline() == b""  # then the server closes the connection


def test_eof_right_after_a_complete_line(shared_sidecar):
    rng = np.random.default_rng(13)
    c = shared_sidecar.client()
    c.send_raw(encode(sample(rng, job_id="done")))
    c.sock.shutdown(socket.SHUT_WR)
    ack = read_ack(shared_sidecar, c)
    assert ack["ok"] is True and ack["job_id"] == "done", ack
    assert c.reader.readline() == b""


def test_a_last_line_is_trained_on_when_its_client_closes_with_an_ack_unread(shared_sidecar):
    """Closed with an ACK unread, a client's socket resets: the server's recv() gets what it sent, then ECONNRESET,
    where a clean close gives b"". That error closed the connection, its last line (without a newline) unanswered and
    untrained, uncounted, where the same line after a clean close is trained on, as README promises."""
    rng = np.random.default_rng(14)
    asker = shared_sidecar.client()
    before = status(asker)["samples_accepted"]
    c = shared_sidecar.client()
    c.send_raw(encode(sample(rng, job_id="first")))
    assert select.select([c.sock], [], [], 5)[0]  # its ACK is there, and stays unread
    c.send_raw(encode(sample(rng, job_id="last"))[:-1])
    c.close()
    assert accepted_within(asker, before + 2) == before + 2


def test_every_line_of_a_client_gone_before_its_acks_is_trained_on(shared_sidecar):
    """A client that writes its lines and closes at once, its ACKs unread: the first ACK the server sends after the
    close gets EPIPE. That closed the connection, the lines still queued in its socket unread (1 008 of 3 000 taken)
    and a last line without its newline untaken, where README promises a gone client's lines are trained on; how
    many were taken depended on when the close came."""
    rng = np.random.default_rng(15)
    asker = shared_sidecar.client()
    before = status(asker)["samples_accepted"]
    count = 400  # 640 KB: more than a Unix socket holds, so that the server answers some before the close
    c = shared_sidecar.client()
    c.send_raw(b"".join(encode(sample(rng, job_id=f"gone-{i}")) for i in range(count))[:-1])  # the last: no newline
    c.close()
    assert accepted_within(asker, before + count) == before + count


# ---- signals ----

def test_sigterm_exits_0_promptly_and_removes_the_socket(sidecar):
    assert os.path.exists(sidecar.socket)
    started = time.monotonic()
    assert sidecar.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 3.0
    assert not os.path.exists(sidecar.socket)


def test_sigint_exits_0_and_removes_the_socket(sidecar):
    started = time.monotonic()
    assert sidecar.stop(signal.SIGINT) == 0
    assert time.monotonic() - started < 3.0
    assert not os.path.exists(sidecar.socket)


def test_lines_already_sent_are_answered_after_sigterm(sidecar):
    rng = np.random.default_rng(14)
    c = sidecar.client()
    assert c.request({"op": "ping"}) == {"ok": True, "op": "pong"}
    c.send_raw(b"".join(encode(sample(rng, job_id=f"t-{i}")) for i in range(10)))
    sidecar.proc.send_signal(signal.SIGTERM)
    acks = [read_ack(sidecar, c) for _ in range(10)]
    assert [(a["ok"], a["job_id"]) for a in acks] == [(True, f"t-{i}") for i in range(10)]
    assert c.reader.readline() == b""
    assert sidecar.proc.wait(10) == 0
    assert not os.path.exists(sidecar.socket)


def test_lines_sent_on_a_new_connection_just_before_sigterm_are_answered(sidecar):
    """The connection is made, its lines sent and SIGTERM sent while the server is busy with
    another client, so the server has most likely not accept()ed it yet: connect() succeeded,
    so its lines must be answered all the same."""
    rng = np.random.default_rng(17)
    busy = sidecar.client()
    busy_lines = [encode(sample(rng, job_id=f"busy-{i}")) for i in range(300)]  # about 500 KB
    busy.send_raw(b"".join(busy_lines))  # returns once the server has read all but a socket buffer's worth
    late = sidecar.client()
    late.send_raw(b"".join(encode(sample(rng, job_id=f"late-{i}")) for i in range(10)))
    sidecar.proc.send_signal(signal.SIGTERM)
    acks = [read_ack(sidecar, late) for _ in range(10)]
    assert [(a["ok"], a["job_id"]) for a in acks] == [(True, f"late-{i}") for i in range(10)]
    acks = [read_ack(sidecar, busy) for _ in range(300)]
    assert [(a["ok"], a["job_id"]) for a in acks] == [(True, f"busy-{i}") for i in range(300)]
    assert sidecar.proc.wait(10) == 0
    assert not os.path.exists(sidecar.socket)


def test_sigterm_with_stalled_and_non_reading_clients_still_exits_promptly(sidecar):
    rng = np.random.default_rng(15)
    flood, flood_thread, _, _ = start_flood(sidecar.socket, 20_000, rng)
    stalled = Client(sidecar.socket)  # not sidecar.client(): stop() would close it before the signal
    try:
        stalled.send_raw(encode(sample(rng))[:300])
        probe = Client(sidecar.socket)
        assert probe.request({"op": "ping"}) == {"ok": True, "op": "pong"}
        probe.close()
        started = time.monotonic()
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.proc.wait(10) == 0
        # The grace (SHUTDOWN_GRACE_S, 1.5 s) is spent whenever the flood is still being read at the signal, then the
        # state is saved: 1.8 s on a quiet machine, 2.3 s on a loaded one, where a grace of 6 s takes 6.2 s.
        assert time.monotonic() - started < 4.5
        assert not os.path.exists(sidecar.socket)
    finally:
        stalled.close()
        stop_flood(flood, flood_thread)


def test_a_flooding_client_does_not_crowd_out_others_at_sigterm(sidecar):
    """Lines that other clients sent before SIGTERM are answered even while one client keeps
    writing as fast as the server reads (and never reads its ACKs). A shutdown that drains one
    connection at a time until it would block fails this whenever it happens to reach the flood
    before the others (most runs, not all); one that reads the connections round robin passes."""
    rng = np.random.default_rng(18)
    flood, flood_thread, _, _ = start_flood(sidecar.socket, 20_000, rng)
    others = [Client(sidecar.socket) for _ in range(4)]  # not sidecar.client(): stop() would close them
    try:
        for c in others:
            assert c.request({"op": "ping"}) == {"ok": True, "op": "pong"}
        for k, c in enumerate(others):
            c.send_raw(b"".join(encode(sample(rng, job_id=f"o{k}-{i}")) for i in range(10)))
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.proc.wait(10) == 0
        for k, c in enumerate(others):
            acks = [read_ack(sidecar, c) for _ in range(10)]
            assert [(a["ok"], a["job_id"]) for a in acks] == [(True, f"o{k}-{i}") for i in range(10)], k
    finally:
        for c in others:
            c.close()
        stop_flood(flood, flood_thread)


# ---- the socket file ----

def test_socket_file_is_mode_0600(shared_sidecar):
    mode = os.stat(shared_sidecar.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


@pytest.fixture
def short_dir():
    path = tempfile.mkdtemp(prefix="vx")  # AF_UNIX paths are short
    yield path
    shutil.rmtree(path, ignore_errors=True)


def serve_env(socket_path: str, checkpoint_dir) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "VMAFX_SIDECAR_SOCKET": socket_path,
        "VMAFX_SIDECAR_CHECKPOINT_DIR": str(checkpoint_dir),
        "VMAFX_BASE_MODEL_PATH": "",
    }


def run_serve(env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    """A server expected to refuse to start; a hang fails the test through TimeoutExpired."""
    return subprocess.run([sys.executable, "-m", "vmafx_sidecar", "serve"], env=env, cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=20)


def test_refuses_a_regular_file_at_the_socket_path(tmp_path, short_dir):
    path = os.path.join(short_dir, "s.sock")
    with open(path, "wb") as f:
        f.write(b"precious data\n")
    os.chmod(path, 0o640)
    result = run_serve(serve_env(path, tmp_path / "ckpt"), tmp_path)
    assert result.returncode != 0
    stderr = result.stderr.decode(errors="replace")
    assert path in stderr and "not a socket" in stderr, stderr
    mode = os.lstat(path).st_mode
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o640
    with open(path, "rb") as f:
        assert f.read() == b"precious data\n"


def test_refuses_to_start_over_a_live_server(sidecar, tmp_path):
    result = run_serve(serve_env(sidecar.socket, tmp_path / "ckpt2"), tmp_path)
    assert result.returncode != 0
    stderr = result.stderr.decode(errors="replace")
    assert "already listening" in stderr and sidecar.socket in stderr, stderr
    assert stat.S_ISSOCK(os.stat(sidecar.socket).st_mode)
    assert sidecar.client().request({"op": "ping"}) == {"ok": True, "op": "pong"}
    assert sidecar.proc.poll() is None


def test_replaces_a_stale_socket_file(tmp_path):
    s = Sidecar(tmp_path, {})
    try:
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(s.socket)
        stale.close()  # the file stays, nobody listens: what a killed server leaves behind
        assert stat.S_ISSOCK(os.stat(s.socket).st_mode)
        s.start()
        c = s.client()
        assert c.request({"op": "ping"}) == {"ok": True, "op": "pong"}
        assert status(c)["samples_accepted"] == 0
        assert stat.S_IMODE(os.stat(s.socket).st_mode) == 0o600
        assert s.stop() == 0
        assert not os.path.exists(s.socket)
    finally:
        s.cleanup()


def test_a_sidecar_comes_back_on_the_socket_its_environment_names(sidecar_factory, short_dir):
    path = os.path.join(short_dir, "named.sock")
    s = sidecar_factory(VMAFX_SIDECAR_SOCKET=path)  # start() returns once that socket answers a ping
    assert s.socket == path
    assert s.stop(signal.SIGKILL) == -signal.SIGKILL  # a crash: the socket file stays behind
    s.stderr_file.close()
    s.start()
    assert s.client().request({"op": "ping"}) == {"ok": True, "op": "pong"}


# ---- logging ----

def test_no_log_line_per_message(sidecar):
    rng = np.random.default_rng(16)
    c = sidecar.client()
    c.send_raw(b"".join(encode(sample(rng, job_id=f"quiet-{i}")) for i in range(100)))
    assert all(read_ack(sidecar, c)["ok"] for _ in range(100))
    for _ in range(10):
        assert c.request({"op": "ping"}) == {"ok": True, "op": "pong"}
    status(c)
    stderr = sidecar.stderr()
    lines = stderr.splitlines()
    assert any("serving on" in line for line in lines), stderr
    assert len(lines) < 10, stderr
    assert "quiet-" not in stderr


# ---- probe: the health check the chart runs ----

def run_probe(*args: str, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python_flags, "-m", "vmafx_sidecar", "probe", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def test_probe_exits_0_when_the_sidecar_answers(shared_sidecar):
    result = run_probe("--socket", shared_sidecar.socket)
    assert result.returncode == 0, result.stderr


def test_probe_fails_without_a_server(short_dir):
    result = run_probe("--socket", os.path.join(short_dir, "absent.sock"))
    assert result.returncode == 1 and "absent.sock" in result.stderr


def test_probe_fails_when_the_server_does_not_answer_in_time(short_dir):
    path = os.path.join(short_dir, "mute.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(path)
        mute.listen()
        started = time.monotonic()
        result = run_probe("--socket", path, "--timeout", "0.5")
    assert result.returncode == 1 and "timed out" in result.stderr
    assert time.monotonic() - started < 10


def test_probe_answers_without_importing_numpy_or_onnx(short_dir):
    # Kubernetes runs the probe every few seconds beside the encoders; those imports cost 0.5 s of CPU.
    result = run_probe("--socket", os.path.join(short_dir, "absent.sock"), python_flags=("-X", "importtime"))
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert result.returncode == 1 and "socket" in imported
    assert not imported & {"numpy", "onnx"}, sorted(imported & {"numpy", "onnx"})
