"""Resource exhaustion: out of file descriptors, the server neither spins nor drops waiting clients."""
import json
import os
import resource
import signal
import socket
import subprocess
import time

import numpy as np

import vmafx_sidecar
from conftest import ACK_TIMEOUT_S, Client, Sidecar, sample
from test_metrics import free_port, scrape


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def test_out_of_descriptors_pauses_accepts_until_a_connection_closes(tmp_path, monkeypatch):
    def low_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))

    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: real_popen(*a, preexec_fn=low_fd_limit, **k))
    sidecar = Sidecar(tmp_path, {})
    try:
        sidecar.start()
        monkeypatch.undo()
        rng = np.random.default_rng(0)
        clients = []
        for _ in range(30):  # more than the server has descriptors for: the last ones wait in the backlog
            c = Client(sidecar.socket, timeout=0.3)
            c.send_raw(b'{"op": "ping"}\n')
            clients.append(c)
        answered = []
        for c in clients[:5]:  # within the descriptors: answered, however long a loaded machine takes
            c.sock.settimeout(ACK_TIMEOUT_S)
        for c in clients:
            try:
                answered.append(c.read_ack() == {"ok": True, "op": "pong"})
            except TimeoutError:
                answered.append(False)
        assert 5 < sum(answered) < 30 and all(answered[:5])
        before = cpu_seconds(sidecar.proc.pid)
        time.sleep(1.0)
        assert cpu_seconds(sidecar.proc.pid) - before < 0.3, "the loop spins while out of descriptors"
        waiting = [c for c, ok in zip(clients, answered) if not ok]
        for c, ok in zip(clients, answered):
            if ok:
                c.close()
        for c in waiting:  # now served, their early ping included (raw reads: the timed-out reader is spent)
            c.sock.settimeout(5)
            assert c.sock.recv(4096) == b'{"ok": true, "op": "pong"}\n'
            c.send_raw(json.dumps(sample(rng)).encode() + b"\n")
            assert json.loads(c.sock.recv(4096))["ok"] is True
            c.close()
        assert "pausing accepts" in sidecar.stderr()
        assert "open files are limited to 24 (ulimit -n), and VMAFX_SIDECAR_MAX_CONNECTIONS=128 needs about " \
            in sidecar.stderr()  # said at the start, the hard limit below what the connections need
        assert sidecar.stop(signal.SIGTERM) == 0
    finally:
        sidecar.cleanup()


def test_a_soft_limit_on_open_files_below_the_connections_is_lifted_within_the_hard_one(tmp_path, monkeypatch):
    """Under a container's common soft limit, a sidecar configured for more connections paused its accepts there,
    its clients waiting in the backlog; it now lifts the soft limit, as Go's runtime does."""
    def low_soft_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096))

    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: real_popen(*a, preexec_fn=low_soft_limit, **k))
    sidecar = Sidecar(tmp_path, {"VMAFX_SIDECAR_MAX_CONNECTIONS": "100"})
    try:
        sidecar.start()
        monkeypatch.undo()
        assert resource.prlimit(sidecar.proc.pid, resource.RLIMIT_NOFILE) == (
            100 + vmafx_sidecar.RESERVED_CONNECTIONS + vmafx_sidecar.HTTP_MAX_CONNECTIONS + vmafx_sidecar.OWN_FILES,
            4096)
        clients = [Client(sidecar.socket, timeout=10) for _ in range(100)]
        for c in clients:
            c.send_raw(b'{"op": "ping"}\n')
        assert all(c.read_ack() == {"ok": True, "op": "pong"} for c in clients)
        for c in clients:
            c.close()
        assert "pausing accepts" not in sidecar.stderr() and "ulimit" not in sidecar.stderr()
        assert sidecar.stop(signal.SIGTERM) == 0
    finally:
        sidecar.cleanup()


def lowest_free_descriptor(pid: int) -> int:
    """The soft limit that leaves process `pid` no descriptor to open: the lowest one it has free."""
    taken = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(fd for fd in range(len(taken) + 1) if fd not in taken)


def starve_descriptors(pid: int) -> None:
    """Leave process `pid` no descriptor to open, set again until its lowest free one stays put: one it was about to
    close (the connection of the ping that found it ready) had freed a descriptor under the limit, and the accept
    meant to fail took it."""
    hard, limit = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1], None
    while limit != (lowest := lowest_free_descriptor(pid)):
        limit = lowest
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
        time.sleep(0.2)


def test_accepts_paused_with_no_connection_open_resume_once_descriptors_are_back(tmp_path):
    """No connection is open to close and bring accepts back: they are retried a second later."""
    sidecar = Sidecar(tmp_path, {})
    try:
        sidecar.start()
        pid = sidecar.proc.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        starve_descriptors(pid)
        first = Client(sidecar.socket, timeout=10)  # waits in the backlog: its accept fails with EMFILE
        first.send_raw(b'{"op": "ping"}\n')
        deadline = time.monotonic() + 10
        while "pausing accepts" not in sidecar.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "pausing accepts" in sidecar.stderr()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert first.read_ack() == {"ok": True, "op": "pong"}
        later = Client(sidecar.socket, timeout=10)
        assert later.request({"op": "ping"}) == {"ok": True, "op": "pong"}
        first.close()
        later.close()
        assert sidecar.stop(signal.SIGTERM) == 0
    finally:
        sidecar.cleanup()


def test_the_metrics_endpoint_out_of_descriptors_retries_a_second_later_without_spinning(tmp_path):
    port = free_port()
    sidecar = Sidecar(tmp_path, {"VMAFX_SIDECAR_METRICS_ADDR": f"127.0.0.1:{port}"})
    try:
        sidecar.start()
        pid = sidecar.proc.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        starve_descriptors(pid)
        waiting = socket.create_connection(("127.0.0.1", port), timeout=10)  # in the backlog: EMFILE
        waiting.sendall(b"GET /healthz HTTP/1.1\r\nHost: sidecar\r\n\r\n")
        before, started = cpu_seconds(pid), time.monotonic()
        time.sleep(1.5)
        assert cpu_seconds(pid) - before < 0.3, "the loop spins while out of descriptors"
        while "cannot accept a metrics connection" not in sidecar.stderr() and time.monotonic() < started + 10:
            time.sleep(0.05)  # a loaded machine may not have run the loop's turn yet
        refusals = sidecar.stderr().count("cannot accept a metrics connection")
        assert 1 <= refusals <= 2 + time.monotonic() - started  # once a second at most
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert waiting.recv(4096).startswith(b"HTTP/1.1 200")
        waiting.close()
        assert scrape(port)
        assert sidecar.stop(signal.SIGTERM) == 0
    finally:
        sidecar.cleanup()
