"""The Prometheus endpoint (VMAFX_SIDECAR_METRICS_ADDR): strict exposition format, values that move with
the traffic, a strict little HTTP/1.1 server, and scrapers that cannot stall the trainer."""
from __future__ import annotations

import errno
import json
import math
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import vmafx_sidecar as vs
from conftest import ROOT, NoState, make_trainer, sample
from test_faults import wait_for

N_FEATURES = 8
# The gate off: random scores never pass it, and these tests need published checkpoints for the checkpoint
# families to move. Its verdict's scores are measured and exported all the same.
SETTINGS = dict(VMAFX_SIDECAR_N_FEATURES=str(N_FEATURES), VMAFX_SIDECAR_HIDDEN="8", VMAFX_SIDECAR_BATCH_SIZE="8",
                VMAFX_SIDECAR_CKPT_INTERVAL_S="0", VMAFX_SIDECAR_MIN_SAMPLES_CKPT="40",
                VMAFX_SIDECAR_HOLDOUT_FRACTION="0.25", VMAFX_SIDECAR_GATE="off")
FAMILIES = {  # name: type, as the issue names them
    "vmafx_sidecar_samples_total": "counter", "vmafx_sidecar_rejected_total": "counter",
    "vmafx_sidecar_train_steps_total": "counter", "vmafx_sidecar_train_loss": "gauge",
    "vmafx_sidecar_train_loss_smoothed": "gauge", "vmafx_sidecar_step_duration_seconds": "histogram",
    "vmafx_sidecar_replay_buffer_samples": "gauge", "vmafx_sidecar_connections": "gauge",
    "vmafx_sidecar_checkpoints_total": "counter", "vmafx_sidecar_checkpoint_version": "gauge",
    "vmafx_sidecar_last_checkpoint_timestamp_seconds": "gauge", "vmafx_sidecar_eval_plcc": "gauge",
    "vmafx_sidecar_window_samples": "gauge", "vmafx_sidecar_window_plcc": "gauge", "vmafx_sidecar_window_r2": "gauge",
    "vmafx_sidecar_window_rmse": "gauge", "vmafx_sidecar_gate_samples": "gauge", "vmafx_sidecar_gate_plcc": "gauge",
    "vmafx_sidecar_gate_r2": "gauge", "vmafx_sidecar_gate_rmse": "gauge",
    "vmafx_sidecar_nonfinite_steps_total": "counter", "vmafx_sidecar_fleet_model_version": "gauge",
    "vmafx_sidecar_fleet_model_age_seconds": "gauge", "vmafx_sidecar_backend_info": "gauge",
    # issue 18's: what the alerts and the dashboard need
    "vmafx_sidecar_ack_latency_seconds": "histogram", "vmafx_sidecar_replay_buffer_capacity": "gauge",
    "vmafx_sidecar_eval_buffer_samples": "gauge", "vmafx_sidecar_eval_buffer_capacity": "gauge",
    "vmafx_sidecar_connections_refused_total": "counter", "vmafx_sidecar_connections_dropped_total": "counter",
    "vmafx_sidecar_write_failures_total": "counter", "vmafx_sidecar_sample_log_dropped_total": "counter",
    "vmafx_sidecar_build_info": "gauge", "process_resident_memory_bytes": "gauge",
    "process_cpu_seconds_total": "counter", "process_start_time_seconds": "gauge",
}
SAMPLE_LINE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_]\w*="[^"\\\n]*",?)*)\})? (\S+)')


# ---- helpers ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes; (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(request)
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert status_line.startswith("HTTP/1.1 "), status_line
    assert int(headers["content-length"]) == len(body) or request.startswith(b"HEAD")
    return int(status_line.split()[1]), headers, body


def parse_exposition(text: str) -> dict[tuple[str, tuple], float]:
    """A strict reader of the text format: every family has HELP then TYPE before its samples, sample
    names belong to the family being read, no series twice, histograms cumulative up to +Inf == _count."""
    assert text.endswith("\n") and "\n\n" not in text
    series: dict[tuple[str, tuple], float] = {}
    family, kind, seen = None, None, set()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# HELP "):
            family = line.split()[2]
            assert family not in seen, f"family {family} twice"
            seen.add(family)
            assert len(line.split(" ", 3)) == 4, line  # a help text
            assert lines[i + 1].startswith(f"# TYPE {family} "), lines[i + 1]
            kind = lines[i + 1].split()[3]
            assert kind in ("counter", "gauge", "histogram"), line
        elif line.startswith("# TYPE "):
            assert lines[i - 1].startswith(f"# HELP {line.split()[2]} "), line
        else:
            match = SAMPLE_LINE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            name, labels, value = match.groups()
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
            assert any(name == family + s for s in suffixes), f"{name} outside its family {family}"
            label_pairs = tuple(re.findall(r'(\w+)="([^"]*)"', labels or ""))
            assert (name, label_pairs) not in series, f"{name}{label_pairs} twice"
            series[(name, label_pairs)] = float(value)
    for name in [f for f, k in FAMILIES.items() if k == "histogram"]:
        buckets = [(lbl, v) for (n, lbl), v in series.items() if n == name + "_bucket"]
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and buckets[-1][0] == (("le", "+Inf"),)
        assert counts[-1] == series[(name + "_count", ())]
    return series


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    status, headers, body = http(port, b"GET /metrics HTTP/1.1\r\nHost: sidecar\r\n\r\n")
    assert status == 200 and headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert types == FAMILIES
    return parse_exposition(text)


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics[(name, tuple(labels.items()))]


def family(metrics: dict, name: str) -> dict[tuple, float]:
    """A family's series: their labels, as (name, value) pairs, and values."""
    return {labels: v for (n, labels), v in metrics.items() if n == name}


def scores_by_labels(evidence: dict, **labels: str) -> dict[str, dict[tuple, float]]:
    """A gate evidence record (status "window", or a verdict's "window" or "history") as the score families
    should export it: for each score, the measured models' values by their labels."""
    measured = {model: s for model, s in evidence.items() if isinstance(s, dict)}
    return {score: {(*labels.items(), ("model", model)): s[score] for model, s in measured.items()}
            for score in ("plcc", "r2", "rmse")}


@pytest.fixture
def served(sidecar_factory):
    port = free_port()
    s = sidecar_factory(VMAFX_SIDECAR_METRICS_ADDR=f"127.0.0.1:{port}", **SETTINGS)
    return s, port


# ---- the exposition ----

def test_values_move_as_traffic_flows(served):
    s, port = served
    before = scrape(port)
    assert value(before, "vmafx_sidecar_samples_total", result="accepted") == 0
    assert value(before, "vmafx_sidecar_backend_info", backend="numpy") == 1
    assert ("vmafx_sidecar_train_loss", ()) not in before  # no step yet: absent, not a made-up 0
    assert ("vmafx_sidecar_checkpoint_version", ()) not in before

    client = s.client()
    rng = np.random.default_rng(0)
    acks = [client.request(sample(rng, N_FEATURES, job_id=f"m-{i}")) for i in range(200)]
    bad = [b"not json", b'{"features": [1], "true_score": 1}', b'{"op": "reboot"}', b"[1]"]
    for line in bad:
        assert client.request(line)["ok"] is False
    status = client.request({"op": "status"})
    after = scrape(port)

    held_out = status["samples_held_out"]
    assert 0 < held_out < 200
    assert value(after, "vmafx_sidecar_samples_total", result="accepted") == 200 - held_out
    assert value(after, "vmafx_sidecar_samples_total", result="held_out") == held_out
    assert value(after, "vmafx_sidecar_samples_total", result="rejected") == 4
    reasons = {r: value(after, "vmafx_sidecar_rejected_total", reason=r)
               for r in ("invalid_json", "features", "unknown_op", "not_an_object", "true_score", "line_too_long")}
    assert reasons == {"invalid_json": 1, "features": 1, "unknown_op": 1, "not_an_object": 1, "true_score": 0,
                       "line_too_long": 0}
    assert value(after, "vmafx_sidecar_train_steps_total") == status["steps"] > 0
    assert value(after, "vmafx_sidecar_train_loss") == pytest.approx(status["last_loss"])
    assert value(after, "vmafx_sidecar_step_duration_seconds_count") == status["steps"]
    assert 0 < value(after, "vmafx_sidecar_step_duration_seconds_sum") < status["steps"]
    assert value(after, "vmafx_sidecar_replay_buffer_samples") == status["replay_size"]
    assert value(after, "vmafx_sidecar_replay_buffer_capacity") == status["config"]["replay_capacity"]
    assert value(after, "vmafx_sidecar_eval_buffer_samples") == status["eval_size"] > 0
    assert value(after, "vmafx_sidecar_eval_buffer_capacity") == status["config"]["eval_capacity"]
    assert value(after, "vmafx_sidecar_connections") == 1
    # every line answered since (200 samples, 4 bad lines, the status request), each ACK observed once
    observed = [value(m, "vmafx_sidecar_ack_latency_seconds_count") for m in (before, after)]
    assert observed[1] - observed[0] == 205
    assert 0 < value(after, "vmafx_sidecar_ack_latency_seconds_sum") < 205 * 10
    assert family(after, "vmafx_sidecar_write_failures_total") == {
        (("kind", k),): 0 for k in ("journal", "snapshot", "sample_log", "checkpoint")}
    assert value(after, "vmafx_sidecar_connections_refused_total") == 0
    assert value(after, "vmafx_sidecar_connections_dropped_total") == 0
    assert ("vmafx_sidecar_sample_log_dropped_total", ()) not in after  # the sample log is off
    published = sum("checkpoint" in a for a in acks)
    assert published > 0
    assert value(after, "vmafx_sidecar_checkpoints_total", result="published") == published
    assert value(after, "vmafx_sidecar_checkpoint_version") == status["checkpoint_version"]
    assert abs(value(after, "vmafx_sidecar_last_checkpoint_timestamp_seconds") - time.time()) < 600
    assert value(after, "vmafx_sidecar_eval_plcc") == pytest.approx(status["gate"]["metrics"]["candidate"]["plcc"])
    assert_gate_families_match_status(after, status)
    assert value(after, "process_resident_memory_bytes") > 10e6
    assert abs(value(after, "process_start_time_seconds") - time.time()) < 600  # for VmafxFleetSamplesLost
    assert value(after, "process_cpu_seconds_total") >= value(before, "process_cpu_seconds_total")
    assert [v for (n, lbl), v in after.items() if n == "vmafx_sidecar_build_info"] == [1]


def assert_gate_families_match_status(metrics: dict, status: dict) -> None:
    """The live window's and the last verdict's families hold what the status answer does, model by model."""
    window = status["window"]
    assert set(window) == {"n", "candidate", "incumbent", "champion"}  # after a publish: both references
    assert window["n"] > 0 and window["candidate"] is not None  # samples trained since the last checkpoint
    assert value(metrics, "vmafx_sidecar_window_samples") == window["n"]
    for score, expected in scores_by_labels(window).items():
        assert family(metrics, f"vmafx_sidecar_window_{score}") == pytest.approx(expected), score
    judged = {name: status["gate"]["metrics"][name] for name in ("window", "history")}
    assert family(metrics, "vmafx_sidecar_gate_samples") == {(("set", name),): e["n"] for name, e in judged.items()}
    for score in ("plcc", "r2", "rmse"):
        expected = {k: v for name, e in judged.items() for k, v in scores_by_labels(e, set=name)[score].items()}
        assert len(expected) >= 4, judged  # the candidate and at least one reference measured on each set
        assert family(metrics, f"vmafx_sidecar_gate_{score}") == pytest.approx(expected), score


# ---- HTTP ----

@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", 200),
    (b"GET / HTTP/1.1\r\n\r\n", 404),
    (b"GET /metrics/../etc HTTP/1.1\r\n\r\n", 404),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    (b"DELETE /healthz HTTP/1.1\r\n\r\n", 405),
    (b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 400),
    (b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 400),
    (b"GET /metrics\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"GET /metrics HTTP/1.1\n\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost: x\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: x\nContent-Length: 5\r\n\r\nhello", 400),
], ids=["healthz", "query", "root", "other path", "post", "delete", "body", "chunked", "http2", "http0.9",
        "bad header", "empty", "huge head", "bare LF, answered not left to time out",
        "a bare LF, then a CRLF blank line", "a bare LF request line, then a CRLF blank line",
        "a bare LF inside a head of CRLFs (its Content-Length read as part of Host)"])
def test_http_answers_strictly(served, request_bytes, status):
    _, port = served
    got, headers, body = http(port, request_bytes)
    assert got == status, body
    assert headers["connection"] == "close"
    if status == 405:
        assert headers["allow"] == "GET, HEAD"
    if status == 200 and b"healthz" in request_bytes:
        assert body == b"ok\n"


def test_head_gets_the_headers_without_the_body(served):
    _, port = served
    status, headers, body = http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 1000
    status, headers, body = http(port, b"HEAD /nope HTTP/1.1\r\n\r\n")
    assert status == 404 and body == b"" and int(headers["content-length"]) > 0  # whatever the status


def test_a_stalled_scraper_neither_delays_acks_nor_other_scrapes_and_is_cut_off(served):
    s, port = served
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    for c in stalled:
        c.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the end of its head
    client = s.client()
    rng = np.random.default_rng(1)
    started = time.monotonic()
    for i in range(50):
        assert client.request(sample(rng, N_FEATURES, job_id=f"s-{i}"))["ok"] is True
    assert time.monotonic() - started < 5
    assert value(scrape(port), "vmafx_sidecar_samples_total", result="rejected") == 0
    for c in stalled:  # the server closes them at its 5 s deadline
        c.settimeout(15)
        assert c.recv(100) == b""
        c.close()


def test_connections_beyond_the_limit_are_closed_and_scrapes_still_work(served):
    _, port = served
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        closed = 0
        for c in idle[16:]:
            c.settimeout(5)
            closed += c.recv(1) == b""
        assert closed == len(idle) - 16
    finally:
        for c in idle:
            c.close()
    assert http(port, b"GET /healthz HTTP/1.1\r\n\r\n")[0] == 200


def test_metrics_are_off_by_default(sidecar_factory):
    s = sidecar_factory(**SETTINGS)
    assert "metrics on" not in s.stderr()


@pytest.mark.parametrize("address", ["9464", "localhost", ":0", ":70000", "1.2.3.4:", "[::1]9464", "a b:1",
                                     "[1.2.3.4]:9464", "999.1.1.1:9464", "-:9464", "[:::]:9464",
                                     ":\u0669\u0664\u0666\u0664"])
def test_invalid_metrics_address_exits_2_naming_it(tmp_path, address):
    result = subprocess.run([sys.executable, "-m", "vmafx_sidecar", "serve"], cwd=ROOT, capture_output=True,
                            text=True, timeout=30, env={"VMAFX_SIDECAR_METRICS_ADDR": address, "PATH": ""})
    assert result.returncode == 2 and "VMAFX_SIDECAR_METRICS_ADDR" in result.stderr, result.stderr


def test_a_metrics_port_in_use_stops_startup_before_the_socket_exists(sidecar_factory, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(AssertionError, match="exited with 1") as failure:
            sidecar_factory(VMAFX_SIDECAR_METRICS_ADDR=f"127.0.0.1:{port}", **SETTINGS)
    assert f"cannot serve metrics on 127.0.0.1:{port}" in str(failure.value)


def test_ipv6_loopback_address(sidecar_factory):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    port = free_port()
    sidecar_factory(VMAFX_SIDECAR_METRICS_ADDR=f"[::1]:{port}", **SETTINGS)
    with socket.create_connection(("::1", port), timeout=10) as c:
        c.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert c.recv(100).startswith(b"HTTP/1.1 200 OK")


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_every_interface_means_ipv6_and_ipv4(sidecar_factory):
    """`:port`, the chart's address: a pod's IP may be IPv6 (an IPv6 or dual-stack cluster) or IPv4."""
    port = free_port()
    s = sidecar_factory(VMAFX_SIDECAR_METRICS_ADDR=f":{port}", **SETTINGS)
    hosts = ["127.0.0.1", *(["::1"] if ipv6_loopback() else [])]  # a machine without IPv6 checks the fallback
    for host in hosts:
        with socket.create_connection((host, port), timeout=10) as c:
            c.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            assert c.recv(100).startswith(b"HTTP/1.1 200 OK"), host
    assert s.proc.poll() is None
    said = f"metrics on http://{'[::]' if ipv6_loopback() else '0.0.0.0'}:{port}/metrics"  # a URL curl takes
    assert said in s.stderr(), s.stderr()  # it was http://:PORT/metrics (the README hunt)


def test_every_interface_is_ipv4_alone_where_the_pod_has_no_ipv6(monkeypatch):
    real, port = vs.bound, free_port()

    def without_ipv6(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, host, port)

    monkeypatch.setattr(vs, "bound", without_ipv6)
    with vs.listen_on(*vs.parse_listen_address(f":{port}")) as sock:
        assert sock.family == socket.AF_INET and sock.getsockname() == ("0.0.0.0", port)
    with pytest.raises(OSError):  # a host named is that host's or nothing
        vs.listen_on(*vs.parse_listen_address(f"[::1]:{port}"))


def test_exposition_values_are_plain_numbers(served):
    _, port = served
    for value_ in scrape(port).values():
        assert math.isfinite(value_)


# ---- what the alerts count: refused writes, refused connections, ACK latency ----

def test_counters_count_from_the_process_start_whatever_the_state_it_took_over(tmp_path):
    """They had continued the saved counts: after a kill that lost samples the disk had refused, they came back lower
    than the last scrape, and Prometheus counted the state's whole lifetime again as new samples (the alerts hunt)."""
    def started() -> vs.Server:
        trainer = make_trainer(tmp_path, n_features=N_FEATURES, hidden=8, batch_size=8, holdout_fraction=0.25)
        state = vs.StateStore(trainer.config, trainer)
        state.restore()
        return vs.Server(trainer.config, trainer, state)

    def answered(server: vs.Server, n: int) -> dict:
        for _ in range(n):
            server.answer(json.dumps(sample(rng, N_FEATURES)).encode())
        server.answer(b"not json")
        server.state.commit()
        return parse_exposition(vs.metrics_text(server))
    rng = np.random.default_rng(12)
    first = started()
    metrics = answered(first, 40)
    assert sum(value(metrics, "vmafx_sidecar_samples_total", result=r) for r in ("accepted", "held_out")) == 40
    first.state.save()
    again = started()  # the state goes on: 40 samples, 1 rejected, and its steps
    assert again.trainer.samples_accepted == 40 and again.trainer.steps > 0
    metrics = answered(again, 16)
    assert sum(value(metrics, "vmafx_sidecar_samples_total", result=r) for r in ("accepted", "held_out")) == 16
    assert value(metrics, "vmafx_sidecar_samples_total", result="rejected") == 1
    assert value(metrics, "vmafx_sidecar_train_steps_total") == again.trainer.steps - first.trainer.steps


def test_refused_writes_are_counted_by_what_was_written(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, n_features=N_FEATURES, hidden=8, batch_size=8, sample_log="1", gate="off",
                           min_samples_ckpt=8, ckpt_interval_s=0)
    state = vs.StateStore(trainer.config, trainer)
    state.restore()
    server = vs.Server(trainer.config, trainer, state)
    refused: set[str] = set()  # what the disk refuses now
    real_write_all, real_write_synced, real_publish = vs.write_all, vs.write_synced, vs.publish
    real_fsync_directory = vs.fsync_directory

    def write_all(fd, content):
        if fd in [state.journal.fd] * ("journal" in refused) + [state.samples.fd] * ("sample_log" in refused):
            raise OSError(28, "No space left on device")
        real_write_all(fd, content)

    def write_synced(path, chunks, mode=0o644):
        if "snapshot" in refused and path.parent == state.directory:
            raise OSError(28, "No space left on device")
        real_write_synced(path, chunks, mode)

    def publish(t):
        if "checkpoint" in refused:
            raise OSError(28, "No space left on device")
        return real_publish(t)

    def fsync_directory(directory):
        if "checkpoint directory" in refused and directory == trainer.checkpoints.directory:
            raise OSError(5, "Input/output error")  # after the checkpoint's files are in place
        real_fsync_directory(directory)
    monkeypatch.setattr(vs, "write_all", write_all)
    monkeypatch.setattr(vs, "write_synced", write_synced)
    monkeypatch.setattr(vs, "publish", publish)
    monkeypatch.setattr(vs, "fsync_directory", fsync_directory)
    rng = np.random.default_rng(4)

    def batches(n: int, *kinds: str) -> None:
        refused.clear()
        refused.update(kinds)
        for _ in range(n):  # a line a batch, as a client with one request in flight sends them
            server.answer(json.dumps(sample(rng, N_FEATURES)).encode())
            state.commit()
    batches(3, "journal")  # the sample log waits for the journal: never tried
    batches(2, "sample_log")
    refused.add("snapshot")
    state.save()  # which first tries what the turn recorded: the sample log is refused once more
    batches(3, "checkpoint")  # a step every 4 samples: the 8th sample's has a checkpoint due
    batches(1)
    batches(8, "checkpoint directory")  # the retried checkpoint, published, its directory's fsync refused
    assert trainer.checkpoint_results == {"failed": 1, "published": 1}
    failures = family(parse_exposition(vs.metrics_text(server)), "vmafx_sidecar_write_failures_total")
    assert failures == {(("kind", "journal"),): 3, (("kind", "snapshot"),): 1, (("kind", "sample_log"),): 3,
                        (("kind", "checkpoint"),): 2}
    assert [x.sequence for x in vs.read_log(tmp_path, N_FEATURES)] == list(range(1, 18))  # all retried, in order


def test_connections_over_the_limit_are_counted(sidecar_factory):
    port = free_port()
    s = sidecar_factory(VMAFX_SIDECAR_METRICS_ADDR=f"127.0.0.1:{port}", VMAFX_SIDECAR_MAX_CONNECTIONS="1",
                        **SETTINGS)
    # the start's readiness ping may still hold the one connection allowed
    assert wait_for(lambda: value(scrape(port), "vmafx_sidecar_connections") == 0, 10)
    kept = s.client()
    assert kept.request({"op": "ping"})["ok"]
    for _ in range(2):
        with socket.socket(socket.AF_UNIX) as refused:
            refused.connect(str(s.socket))
            refused.settimeout(10)
            refused.sendall(b'{"features": [], "true_score": 1}\n')  # no ping: closed unanswered
            assert refused.recv(1) == b""
    metrics = scrape(port)
    assert value(metrics, "vmafx_sidecar_connections_refused_total") == 2
    assert value(metrics, "vmafx_sidecar_connections_dropped_total") == 0
    assert value(metrics, "vmafx_sidecar_connections") == 1


def test_a_histogram_takes_one_value_for_many_observations():
    h = vs.Histogram((0.001, 0.01))
    h.observe(0.005, times=40)
    h.observe(0.0005)
    assert h.samples() == [("_bucket", {"le": "0.001"}, 1), ("_bucket", {"le": "0.01"}, 41),
                           ("_bucket", {"le": "+Inf"}, 41), ("_sum", {}, pytest.approx(0.2005)), ("_count", {}, 41)]


def test_an_observation_equal_to_a_bound_is_counted_in_that_bounds_bucket():
    """Prometheus buckets hold values <= le: with bisect_right, a value equal to a bound went to the next bucket,
    read as above its bound (mutation hunt)."""
    h = vs.Histogram((0.001, 0.01))
    h.observe(0.001)
    h.observe(0.01, times=2)
    assert [(labels["le"], n) for name, labels, n in h.samples() if name == "_bucket"] == [
        ("0.001", 1), ("0.01", 3), ("+Inf", 3)]


@pytest.mark.parametrize("record", [{"metrics": 5}, {"metrics": {"candidate": [1], "window": {"base": {}}}},
                                    {"metrics": {"history": {"base": {"plcc": "x", "r2": None}}}}, [1]])
def test_a_gate_record_of_any_shape_is_scraped_not_a_crash(tmp_path, record):
    """The last gate record comes back from disk (a checkpoint's record, the snapshot), and one edited by hand held
    anything: a scrape that met it raised in the loop and ended the sidecar (the review)."""
    trainer = make_trainer(tmp_path, n_features=N_FEATURES, hidden=8)
    server = vs.Server(trainer.config, trainer, NoState())
    trainer.last_gate = record
    metrics = parse_exposition(vs.metrics_text(server))
    assert not family(metrics, "vmafx_sidecar_gate_plcc") and not family(metrics, "vmafx_sidecar_eval_plcc")
    assert value(metrics, "vmafx_sidecar_train_steps_total") == 0
