"""Resource exhaustion: out of file descriptors, the server neither spins nor drops waiting clients."""
import json
import resource
import signal
import subprocess
import time

import numpy as np

from conftest import Client, Sidecar, sample


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
        assert sidecar.stop(signal.SIGTERM) == 0
    finally:
        sidecar.cleanup()
