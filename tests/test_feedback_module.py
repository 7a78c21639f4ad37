"""vmafx_feedback, what producers and health probes import: the standard library alone, and in step with
the sidecar at the other end of the socket."""
from __future__ import annotations

import collections
import dataclasses
import enum
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

import vmafx_feedback as vf
import vmafx_sidecar as vs
from conftest import ROOT

BLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def test_a_producer_loads_neither_numpy_nor_onnx_nor_the_sidecar_and_keeps_its_environment(tmp_path):
    # A producer's environment is every encoder's it launches: the sidecar's BLAS pinning must stay out of it.
    script = ("import os, sys\n"
              "before = dict(os.environ)\n"
              "import vmafx_feedback\n"
              "client = vmafx_feedback.FeedbackClient(sys.argv[1])\n"  # and using the client imports none later
              "assert client.send([0.5] * 4, 50.0, 'j')\n"
              "client.close(timeout=0)\n"
              "print(sorted({'numpy', 'onnx', 'vmafx_sidecar'} & set(sys.modules)), dict(os.environ) == before)\n")
    env = {k: v for k, v in os.environ.items() if k not in BLAS_VARIABLES} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "nobody.sock")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[] True\n"


def test_the_deprecated_import_from_the_sidecar_is_the_same_client():
    from vmafx_sidecar import FeedbackClient
    assert FeedbackClient is vf.FeedbackClient


def test_both_ends_agree_on_the_socket_and_the_float32_range():
    socket_setting = next(f for f in dataclasses.fields(vs.Config) if f.name == "socket")
    assert (socket_setting.metadata["env"], socket_setting.default) == (vf.SOCKET_ENV, vf.DEFAULT_SOCKET)
    assert vf.F32_MAX == float(np.finfo(np.float32).max) and vs.F32_BOUND == vf.F32_BOUND


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e39, -1e39, 2 ** 1024, -2 ** 128])
def test_a_bad_number_is_refused_in_the_words_of_the_sidecar(bad):
    for features, score in (([0.5, bad, 0.5, 0.5], 50.0), ([0.5] * 4, bad)):
        with pytest.raises(vf.InvalidSample) as here:
            vf.feedback_message(features, score, None, 4, None)
        with pytest.raises(vs.BadRequest) as there:
            vs.parse_request(json.dumps({"features": features, "true_score": score}).encode(), 4)
        assert str(here.value) == there.value.error


@pytest.mark.parametrize("features, score, job_id", [
    ([0.5, "1", 0.5, 0.5], 50.0, None), ([0.5, True, 0.5, 0.5], 50.0, None), ([0.5, None, 0.5, 0.5], 50.0, None),
    ([0.5, [1], 0.5, 0.5], 50.0, None), ([0.5] * 4, {"a": 1}, None), ([0.5] * 4, False, None),
    ({"a": 1}, 50.0, None), ("0.5,0.5,0.5,0.5", 50.0, None), ([0.5] * 4, 50.0, 7), ([0.5] * 4, 50.0, ["j"]),
], ids=["str", "bool", "None", "list", "dict score", "bool score", "dict features", "str features", "int job_id",
        "list job_id"])
def test_a_value_of_another_type_is_refused_in_the_words_of_the_sidecar(features, score, job_id):
    """The producer named Python types (str, NoneType, dict) where the sidecar names JSON ones."""
    with pytest.raises(vf.InvalidSample) as here:
        vf.feedback_message(features, score, job_id, 4, None)
    request = {"features": features, "true_score": score, **({"job_id": job_id} if job_id is not None else {})}
    with pytest.raises(vs.BadRequest) as there:
        vs.parse_request(json.dumps(request).encode(), 4)
    assert str(here.value) == there.value.error


class Score(float):
    def __float__(self) -> float:  # what json.dumps sends is the value, not what this says
        return 0.0


class Kind(enum.IntEnum):
    FULL_HD = 1080


class JobId(str):
    def __str__(self) -> str:
        return "another"


Features = collections.namedtuple("Features", "a b c d")


@pytest.mark.parametrize("features, score, job_id", [
    ([0.5] * 4, 50.0, np.str_("enc-1")), ([0.5] * 4, 50.0, JobId("enc-1")), ([0.5] * 4, Score(50.5), None),
    ([0.5, Kind.FULL_HD, 0.5, 0.5], Kind.FULL_HD, None), (Features(0.5, 0.25, 0.5, 0.5), 50.0, None),
], ids=["numpy.str_ job_id", "str subclass job_id", "float subclass", "IntEnum", "namedtuple"])
def test_subclasses_of_str_float_int_list_and_tuple_pass_as_what_json_sends(features, score, job_id):
    """What json.dumps sends for them is a JSON string, number or array, which the sidecar accepts: so does the
    producer, queueing the plain values it sends."""
    message = vf.feedback_message(features, score, job_id, 4, None)
    sent = json.loads(vf.feedback_line(message))
    assert sent == json.loads(json.dumps({"features": list(features), "true_score": score,
                                          **({"job_id": job_id} if job_id is not None else {})}))
    assert type(vs.parse_request(vf.feedback_line(message).rstrip(), 4)) is vs.Sample
    assert {type(v) for v in [*message["features"], message["true_score"], message.get("job_id", "")]} <= {
        float, int, str}


@pytest.mark.parametrize("features, score, job_id, sidecar_says", [
    ([0.5] * 4, 50.0, Kind.FULL_HD, "job_id: expected a string, got number"),
    ([0.5] * 4, 50.0, np.float64(7.0), "job_id: expected a string, got number"),
    (np.float64(0.5), 50.0, None, "features: expected a list of 4 numbers, got number"),
    ([0.5] * 4, collections.OrderedDict(), None, "true_score: expected a number, got object"),
    ([collections.OrderedDict(), 0.5, 0.5, 0.5], 50.0, None, "features[0]: expected a number, got object"),
], ids=["IntEnum job_id", "numpy.float64 job_id", "numpy.float64 features", "OrderedDict score",
        "OrderedDict feature"])
def test_a_subclass_refused_is_named_as_json_sends_it(features, score, job_id, sidecar_says):
    """Named by its Python class ("got Kind", "got OrderedDict"), where the sidecar names what json.dumps sent."""
    with pytest.raises(vf.InvalidSample) as refused:
        vf.feedback_message(features, score, job_id, 4, None)
    assert str(refused.value) == sidecar_says
    sent = json.dumps({"features": features, "true_score": score, **({"job_id": job_id} if job_id else {})},
                      default=float)  # numpy.float64 is a float: json.dumps sends it as a number
    with pytest.raises(vs.BadRequest) as answered:
        vs.parse_request(sent.encode(), 4)
    assert answered.value.error == sidecar_says


@pytest.mark.parametrize("job_id, refused", [("x" * 65535, False), ("x" * 65536, True), ("\U0001F600" * 16383, False),
                                             ("\U0001F600" * 16384, True), ("\ud800" * 21845, False),
                                             ("\ud800" * 21846, True), ("\ud83d\ude00" * 16383, False)],
                         ids=["ascii, at the bound", "ascii, over", "4-byte, at", "4-byte, over", "lone surrogates, at",
                              "lone surrogates, over", "surrogate pairs, which JSON joins, at"])
def test_both_ends_bound_a_job_id_by_its_utf8_bytes_alike(job_id, refused):
    line = json.dumps({"features": [0.5] * 4, "true_score": 1.0, "job_id": job_id}).encode()
    if not refused:
        assert vf.feedback_message([0.5] * 4, 1.0, job_id, 4, None)["job_id"] == job_id
        assert vs.parse_request(line, 4).job_id == json.loads(json.dumps(job_id))  # a pair as one character
        return
    with pytest.raises(vf.InvalidSample) as here:
        vf.feedback_message([0.5] * 4, 1.0, job_id, 4, None)
    with pytest.raises(vs.BadRequest) as there:
        vs.parse_request(line, 4)
    assert str(here.value) == there.value.error == "job_id: longer than 65535 bytes in UTF-8"


def test_a_line_that_only_a_job_id_past_u_ffff_makes_too_long_is_refused_before_it_is_sent():
    job_id = "\U0001F600" * 1000  # 6 bytes a character would say 6 000; \ud83d\ude00 makes it 12 000
    line = json.dumps({"features": [0.5] * 4, "true_score": 1.0, "job_id": job_id}, separators=(",", ":"))
    assert len(line) > 10000
    with pytest.raises(vf.InvalidSample, match=r"line too long \(limit 10000 bytes\)"):
        vf.feedback_message([0.5] * 4, 1.0, job_id, 4, 10000)


def test_the_float32_edges_pass_on_both_ends():
    features, score = [vf.F32_MAX, -vf.F32_MAX, 2 ** 127, -2 ** 127], 0
    assert vf.feedback_message(features, score, None, 4, None) == {"features": features, "true_score": score}
    assert vs.parse_request(json.dumps({"features": features, "true_score": score}).encode(), 4).features == features


@pytest.mark.parametrize("value", [3.4028235e38, -3.4028235e38, vf.F32_BOUND, int(vf.F32_BOUND), -vf.F32_BOUND],
                         ids=["Go's largest float32", "its negative", "the bound", "the bound as an integer",
                              "the negative bound"])  # the last: a true_score there was refused (mutation hunt)
def test_a_number_float32_rounds_to_its_largest_value_passes_on_both_ends(value):
    """3.4028235e+38, how Go writes math.MaxFloat32, is above F32_MAX as a float64 and was refused; every number
    below the midpoint to 2**128 becomes F32_MAX, without an overflow."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array([value], np.float32)[0] == math.copysign(vf.F32_MAX, value)
    features = [0.5, value, 0.5, 0.5]
    assert vf.feedback_message(features, value, None, 4, None) == {"features": features, "true_score": value}
    line = b'{"features": [0.5, %s, 0.5, 0.5], "true_score": %s}' % ((repr(value).encode(),) * 2)
    assert vs.parse_request(line, 4) == vs.Sample(features, value, None)


@pytest.mark.parametrize("value", [2.0 ** 128 - 2.0 ** 103, int(vf.F32_BOUND) + 1], ids=["the midpoint", "past it"])
def test_a_number_float32_rounds_to_infinity_is_refused_on_both_ends(value):
    with pytest.raises(vf.InvalidSample, match=r"features\[1\]: outside the float32 range"):
        vf.feedback_message([0.5, value, 0.5, 0.5], 1.0, None, 4, None)
    with pytest.raises(vs.BadRequest, match=r"features\[1\]: outside the float32 range"):
        vs.parse_request(b'{"features": [0.5, %s, 0.5, 0.5], "true_score": 1}' % repr(value).encode(), 4)


def peer_answering(path: str, answer) -> tuple[socket.socket, threading.Thread]:
    """A listener at `path` whose first connection has the probe's ping read, then is answered by `answer(conn)`."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(100)
            answer(conn)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_the_probe_timeout_bounds_the_whole_answer_not_each_read(tmp_path):
    """A peer that dribbles its answer a byte at a time kept a 1 s probe going for as long as it liked."""
    def dribble(conn: socket.socket) -> None:
        for byte in vf.PONG:
            time.sleep(0.1)
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                return
    listener, _ = peer_answering(str(tmp_path / "slow.sock"), dribble)
    started = time.monotonic()
    assert vf.probe(str(tmp_path / "slow.sock"), 0.5) == 1
    assert time.monotonic() - started < 1.5  # the pong would take 2.6 s
    listener.close()


def test_the_probe_fails_on_an_answer_that_only_begins_like_a_pong(tmp_path, capsys):
    """Any line starting as the pong does passed the probe: a peer that is not the sidecar was taken for a healthy
    one (mutation hunt)."""
    listener, thread = peer_answering(str(tmp_path / "other.sock"),
                                      lambda conn: conn.sendall(vf.PONG[:-1] + b', "not": "the sidecar"}\n'))
    try:
        assert vf.probe(str(tmp_path / "other.sock"), 2.0) == 1
        assert "unexpected answer" in capsys.readouterr().err
    finally:
        thread.join(5)
        listener.close()


def test_a_line_of_exactly_the_sidecars_limit_passes_and_one_byte_more_is_refused():
    """The client compared the line with its newline to the limit, which the sidecar counts without it: a line of
    exactly max_line bytes was refused here though the sidecar takes it (mutation hunt)."""
    message = vf.feedback_message([0.5] * 4, 50.0, "job", 4, None)
    length = len(vf.feedback_line(message)) - 1  # the newline not counted
    assert vf.feedback_message([0.5] * 4, 50.0, "job", 4, length) == message
    with pytest.raises(vf.InvalidSample, match="too long"):
        vf.feedback_message([0.5] * 4, 50.0, "job", 4, length - 1)


def test_the_probe_waits_out_a_full_listen_backlog_within_its_timeout(tmp_path):
    """A loop held up (a checkpoint, a snapshot) while connections queue: past the listen backlog, a timed AF_UNIX
    connect fails at once with EAGAIN, and the probe failed in no time, whatever its timeout."""
    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued = []
    while True:  # the backlog filled by connections not accepted yet
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        try:
            client.connect(path)
        except BlockingIOError:
            client.close()
            break
        queued.append(client)

    def answer_once_free():  # the loop comes back, takes the queue and answers the probe's ping
        time.sleep(0.3)
        listener.settimeout(5)
        for _ in range(len(queued) + 1):
            conn, _ = listener.accept()
            if conn.recv(100):
                conn.sendall(vf.PONG)
            conn.close()
    thread = threading.Thread(target=answer_once_free, daemon=True)
    thread.start()
    for client in queued:
        client.close()
    try:
        assert vf.probe(path, 3.0) == 0
    finally:
        thread.join(5)
        listener.close()
