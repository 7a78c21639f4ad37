"""Faults (issue 4): kill -9 in the middle of a stream, checkpoint writes that fail, steps whose update
overflows, abusive clients and too many connections.

Each server test runs a real `vmafx_sidecar serve` subprocess (conftest's Sidecar) with a small model
(8 features, 8 hidden units) so that the time goes into the faults, not into training. The in-process
tests build a Trainer directly, like tests/test_model.py does.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import random
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import vmafx_sidecar as vs
from conftest import Client, NoState, Sidecar, make_trainer, sample

N_FEATURES = 8
SMALL_MODEL = dict(VMAFX_SIDECAR_N_FEATURES=str(N_FEATURES), VMAFX_SIDECAR_HIDDEN="8")
PUBLISHED = re.compile(r"model_v(\d{6,})\.onnx\.sha256")
CHECKPOINT_FILE = re.compile(r"model_v(\d{6,})\.onnx")


# ---- helpers ----

def encode(message: dict) -> bytes:
    return json.dumps(message).encode() + b"\n"


def status(client: Client) -> dict:
    ack = client.request({"op": "status"})
    assert ack["ok"] is True and ack["op"] == "status", ack
    return ack


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def wait_for(predicate, timeout: float, interval: float = 0.05):
    """Poll until predicate() returns something truthy; returns the last value either way."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def ort_outputs(model_bytes: bytes, n_features: int = N_FEATURES) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the sidecar may be running on the other core
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(0, 1, (16, n_features)).astype(np.float32)
    (out,) = session.run(["score"], {"features": x})
    return out


def verify_published(onnx_path: Path) -> str:
    """The pair verifies (sha256sum -c format) and the model loads in onnxruntime with finite outputs.
    Returns the sha256 of the .onnx bytes."""
    data = onnx_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    text = onnx_path.with_name(onnx_path.name + ".sha256").read_text()
    assert text == f"{digest}  {onnx_path.name}\n", f"{onnx_path.name}: .sha256 does not verify: {text!r}"
    out = ort_outputs(data)
    assert out.shape == (16, 1) and np.all(np.isfinite(out)), f"{onnx_path.name}: outputs {out.ravel()}"
    return digest


def checkpoint_weights_are_finite(path: Path) -> bool:
    return all(np.all(np.isfinite(numpy_helper.to_array(t))) for t in onnx.load(str(path)).graph.initializer)


def dir_contents(directory: Path) -> dict[str, bytes]:
    """Every file beside the checkpoints and in quarantine/ (temp files included), the state directory left out."""
    files = [*(directory / "quarantine").iterdir(), *(p for p in directory.iterdir() if p.is_file())]
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(files)}


# ---- 1. kill -9 at random moments during a stream of 10 000 messages ----

KILL_ENV = {
    **SMALL_MODEL,
    "VMAFX_SIDECAR_CKPT_INTERVAL_S": "0",
    "VMAFX_SIDECAR_MIN_SAMPLES_CKPT": "32",  # a checkpoint (and a snapshot) every 2nd step: often in flight
    "VMAFX_SIDECAR_REPLAY_CAPACITY": "1000",
    "VMAFX_SIDECAR_LR": "0.001",
    "VMAFX_SIDECAR_KEEP_CHECKPOINTS": "0",  # the ledger checks that no published checkpoint ever changes
    "VMAFX_SIDECAR_HOLDOUT_FRACTION": "0.1",  # journal records of held-out samples are replayed too
    "VMAFX_SIDECAR_GATE": "off",  # random scores never pass the gate; the ledger needs published checkpoints
}
KILL_MESSAGES = 5_000  # with MIN_KILLS, half of what it was: the suite's longest test, 96 s in a run beside other
# work, with CI's 10 minutes near (a hunt since killed the sidecar at each of 1 480 system calls: nothing broke)
KILL_CLIENTS = 2
MIN_KILLS = 10
KILL_SEED = 4
SEND_INTERVAL_S = 0.002  # per client: ~1000 messages/s in all, so the stream spans 10+ server lifetimes
FAKE_TEMPS = (".model_v000999.onnx.tmp", ".model_v000999.onnx.sha256.tmp")


class Counter:
    def __init__(self) -> None:
        self.value = 0


class StreamClient(threading.Thread):
    """Like the Go client: one line, then its ACK; on a connection error it reconnects and resends
    the line that was not acknowledged. Paced, and gated so that at least MIN_KILLS kills happen
    before the last line is sent."""

    def __init__(self, name: str, path: str, checkpoint_dir: Path, kills: Counter, abort: threading.Event,
                 rng: np.random.Generator, n: int):
        super().__init__(name=name, daemon=True)
        self.path, self.checkpoint_dir, self.kills, self.abort = path, str(checkpoint_dir), kills, abort
        self.job_ids = [f"{name}-{i}" for i in range(n)]
        self.lines = [encode(sample(rng, N_FEATURES, job_id=j)) for j in self.job_ids]
        self.acked: list[str] = []  # job_ids that got ok:true, in order
        self.checkpoints: list[int] = []  # versions named in this client's ACKs, in order
        self.sends = 0
        self.reconnects = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.stream()
        except BaseException as e:  # reported by the test thread
            self.error = f"{type(e).__name__}: {e}"
            self.abort.set()

    def stream(self) -> None:
        n, i, sock, reader, next_at = len(self.lines), 0, None, None, 0.0
        try:
            while i < n:
                if self.abort.is_set():
                    return
                if self.kills.value < i * (MIN_KILLS + 1) // n:
                    time.sleep(0.005)
                    continue
                if sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.settimeout(10)
                    try:
                        sock.connect(self.path)
                    except OSError:  # dead server (refused) or socket file not yet there
                        sock.close()
                        sock = None
                        time.sleep(0.01)
                        continue
                    reader = sock.makefile("rb")
                    next_at = time.monotonic()
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at = max(next_at + SEND_INTERVAL_S, time.monotonic() - SEND_INTERVAL_S)
                try:
                    self.sends += 1
                    sock.sendall(self.lines[i])
                    line = reader.readline()
                    if not line.endswith(b"\n"):
                        raise ConnectionError(f"EOF or partial ACK {line!r}")
                except OSError:
                    reader.close()
                    sock.close()
                    sock = None
                    self.reconnects += 1
                    continue
                ack = json.loads(line)
                if ack.get("ok") is not True or ack.get("job_id") != self.job_ids[i]:
                    raise AssertionError(f"ACK for {self.job_ids[i]}: {ack}")
                if "checkpoint" in ack:
                    path = ack["checkpoint"]
                    m = CHECKPOINT_FILE.fullmatch(os.path.basename(path))
                    if not m or os.path.dirname(path) != self.checkpoint_dir:
                        raise AssertionError(f"ACK names something that is not a checkpoint: {ack}")
                    version = int(m.group(1))
                    if self.checkpoints and version <= self.checkpoints[-1]:
                        raise AssertionError(f"checkpoint numbering went from v{self.checkpoints[-1]} to v{version}")
                    self.checkpoints.append(version)
                self.acked.append(self.job_ids[i])
                i += 1
        finally:
            if sock is not None:
                reader.close()
                sock.close()


class CheckpointLedger:
    """What the checkpoint directory showed at each kill: published versions never change or vanish."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.published: dict[int, str] = {}  # version -> sha256 of its .onnx
        self.highest = 0
        self.mid_write = 0  # kills that left a checkpoint half-written (temp files or an .onnx without .sha256)
        self.unpublished: set[int] = set()

    def check(self, when: str) -> None:
        names = os.listdir(self.directory)
        versions = {int(m.group(1)) for n in names if (m := PUBLISHED.fullmatch(n))}
        unpublished = {int(m.group(1)) for n in names if (m := CHECKPOINT_FILE.fullmatch(n))} - versions
        self.mid_write += any(n.startswith(".model_v") for n in names) or bool(unpublished - self.unpublished)
        self.unpublished |= unpublished
        for version, digest in self.published.items():
            assert version in versions, f"{when}: published v{version} disappeared"
            onnx_path = self.directory / f"model_v{version:06d}.onnx"
            assert hashlib.sha256(onnx_path.read_bytes()).hexdigest() == digest, \
                f"{when}: v{version}.onnx changed after its .sha256 was written"
        for version in sorted(versions - self.published.keys()):
            self.published[version] = verify_published(self.directory / f"model_v{version:06d}.onnx")
        top = max(versions, default=0)
        assert top >= self.highest, f"{when}: highest published version went from {self.highest} to {top}"
        self.highest = top
        assert not any(n.startswith("model_v000999") for n in names), f"{when}: a planted temp file became v999"


def restart(s: Sidecar, n: int) -> None:
    s.stderr_file.close()
    s.stderr_path = s.workdir / f"stderr-incarnation-{n:03d}.log"
    s.start()


def test_kill_9_at_random_moments_during_a_stream(tmp_path):
    chooser = random.Random(KILL_SEED)  # the kill moments
    rng = np.random.default_rng(KILL_SEED)  # the samples
    s = Sidecar(tmp_path, KILL_ENV)
    kills, abort = Counter(), threading.Event()
    ledger = CheckpointLedger(s.checkpoint_dir)
    clients = [StreamClient(f"c{k}", s.socket, s.checkpoint_dir, kills, abort, rng, KILL_MESSAGES // KILL_CLIENTS)
               for k in range(KILL_CLIENTS)]
    # A stream that never ends: 140 s here beside other work, 176 s beside two CPU hogs, where 150 s was the bound;
    # within CI's 10 minutes.
    deadline = time.monotonic() + 300
    planted = 0
    try:
        s.start()
        for c in clients:
            c.start()
        while any(c.is_alive() for c in clients):
            lifetime_end = time.monotonic() + chooser.uniform(0.2, 0.6)
            while time.monotonic() < lifetime_end and any(c.is_alive() for c in clients):
                time.sleep(0.01)
            assert not abort.is_set(), [c.error for c in clients if c.error]
            assert time.monotonic() < deadline, f"stream not done after {kills.value} kills"
            if not any(c.is_alive() for c in clients):
                break
            assert s.proc.poll() is None, f"server died on its own:\n{s.stderr()[-3000:]}"
            s.proc.kill()
            s.proc.wait()
            kills.value += 1
            assert "Traceback" not in s.stderr(), s.stderr()[-3000:]
            ledger.check(f"after kill {kills.value}")
            if kills.value % 2 == 1:  # debris a crash could leave, with a number far above the real ones
                for name in FAKE_TEMPS:
                    (s.checkpoint_dir / name).write_bytes(b"half a checkpoint")
                planted += 1
            restart(s, kills.value)
            log = s.stderr()
            # resumed from its snapshot; nothing set aside (a torn journal tail is fine: it was never ACKed)
            assert "resumed: step" in log and "moved to" not in log, log
            for name in FAKE_TEMPS:
                assert not (s.checkpoint_dir / name).exists(), f"{name} was not removed at start"
            acked = sum(len(c.acked) for c in clients)  # read before the status request: all counted by then
            probe = Client(s.socket, timeout=10)
            st = status(probe)
            probe.close()
            assert st["samples_accepted"] >= acked, \
                f"after kill {kills.value}: {st['samples_accepted']} samples accepted, {acked} acknowledged"
            version = st["checkpoint_version"] or 0
            assert ledger.highest <= version < 999, (version, ledger.highest)

        assert not abort.is_set(), [c.error for c in clients if c.error]
        assert kills.value >= MIN_KILLS
        assert planted >= 5
        # One more kill -9 after the last ACK, then the state must account for every acknowledged sample.
        s.proc.kill()
        s.proc.wait()
        ledger.check("after the final kill")
        restart(s, kills.value + 1)
        assert "resumed: step" in s.stderr()
        probe = Client(s.socket, timeout=10)
        st = status(probe)
        probe.close()
        acked_ids = [j for c in clients for j in c.acked]
        assert len(acked_ids) == len(set(acked_ids)) == KILL_MESSAGES
        assert len(acked_ids) <= st["samples_accepted"] <= sum(c.sends for c in clients), \
            (st["samples_accepted"], len(acked_ids), sum(c.sends for c in clients))
        assert s.stop() == 0
        ledger.check("after a clean stop")
        assert ledger.highest <= st["checkpoint_version"] < 999
        reported = {v for c in clients for v in c.checkpoints}
        assert reported and reported <= ledger.published.keys(), sorted(reported - ledger.published.keys())
        assert sum(c.reconnects for c in clients) >= MIN_KILLS  # the kills really cut the stream
        print(f"{kills.value} kills ({ledger.mid_write} mid-checkpoint), {len(ledger.published)} checkpoints, "
              f"{sum(c.reconnects for c in clients)} reconnects, {sum(c.sends for c in clients)} lines sent, "
              f"{st['samples_accepted']} samples accepted for {len(acked_ids)} acknowledged")
    finally:
        abort.set()
        for c in clients:
            c.join(15)
        s.cleanup()


# ---- 2. checkpoint writes that fail ----

# make_trainer settings: a small model that steps every 4 samples, with a checkpoint due at every step,
# published unless the write or its read-back fails: the gate, which 4 samples could never satisfy, is off. Raw
# coordinates: the overflow tests below work their premises out in them.
STEPPING = dict(n_features=N_FEATURES, hidden=8, batch_size=4, replay_mix=0.0, replay_capacity=64, min_samples_ckpt=4,
                ckpt_interval_s=0.0, lr=0.01, gate="off", normalize="off")


def one_step(trainer: vs.Trainer, x: np.ndarray, y: np.ndarray):
    """Feed one batch of new samples; every add but the last must not step. Returns the last add's result."""
    results = [trainer.add(row, score) for row, score in zip(x.astype(np.float32), y.astype(np.float32))]
    assert all(r is None for r in results[:-1])
    return results[-1]


def normal_batch(rng: np.random.Generator, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(0, 1, (n, N_FEATURES)), rng.uniform(20, 100, n)


FAULTS = {"ENOSPC": (errno.ENOSPC, "No space left on device"), "EROFS": (errno.EROFS, "Read-only file system")}


@pytest.mark.parametrize("code", list(FAULTS))
@pytest.mark.parametrize("where", ["write_synced", "os.replace"])
def test_failing_checkpoint_writes_keep_training_and_retry_when_next_due(tmp_path, monkeypatch, caplog, where, code):
    err, reason = FAULTS[code]
    directory = tmp_path / "ckpt"
    trainer = make_trainer(directory, **STEPPING)
    rng = np.random.default_rng(1)
    first = one_step(trainer, *normal_batch(rng))
    assert first is not None and first.checkpoint.path == directory / "model_v000001.onnx", first
    before = dir_contents(directory)

    def failing_write_synced(path, chunks, mode=0o644):
        if err == errno.ENOSPC:  # the disk fills up half-way: a partial temp file is on disk
            content = b"".join(chunks)
            with open(path, "wb") as f:
                f.write(content[:len(content) // 2])
        raise OSError(err, reason)

    def failing_replace(src, dst, *args, **kwargs):
        raise OSError(err, reason)

    if where == "write_synced":
        monkeypatch.setattr(vs, "write_synced", failing_write_synced)
    else:
        monkeypatch.setattr(os, "replace", failing_replace)
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    caplog.clear()
    steps, trained = trainer.steps, trainer.samples_trained
    for attempt in range(1, 6):
        result = one_step(trainer, *normal_batch(rng))
        assert result is not None and math.isfinite(result.loss), "the step must still run (its ACK says trained)"
        assert result.checkpoint is None
        assert (trainer.steps, trainer.samples_trained) == (steps + attempt, trained + 4 * attempt)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == attempt, errors  # one ERROR line per failed attempt
        assert reason in errors[-1], errors[-1]
        assert dir_contents(directory) == before  # no partial file, no temp file, nothing rewritten
        assert trainer.checkpoints.version == 1

    monkeypatch.undo()
    result = one_step(trainer, *normal_batch(rng))  # with ckpt_interval_s=0 the next step is due
    assert result is not None and result.checkpoint.path == directory / "model_v000002.onnx", result
    assert trainer.checkpoints.version == 2
    verify_published(directory / "model_v000002.onnx")
    assert onnx.load(str(directory / "model_v000002.onnx")).metadata_props  # a real checkpoint
    assert sorted(dir_contents(directory)) == sorted(
        [*before, "model_v000002.json", "model_v000002.onnx", "model_v000002.onnx.sha256"])
    pointers = ("latest.json", "latest.onnx", "latest.onnx.sha256")  # now v2
    assert {n: c for n, c in dir_contents(directory).items() if n in before and n not in pointers} == \
        {n: c for n, c in before.items() if n not in pointers}
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 5


def test_checkpoint_whose_sha256_cannot_be_renamed_leaves_no_partial_checkpoint(tmp_path, monkeypatch, caplog):
    """The .onnx is renamed into place first; if the .sha256 rename then fails, that .onnx is a partial
    checkpoint (never published) and must not be left behind."""
    directory = tmp_path / "ckpt"
    trainer = make_trainer(directory, **STEPPING)
    rng = np.random.default_rng(2)
    assert one_step(trainer, *normal_batch(rng)).checkpoint.path.name == "model_v000001.onnx"
    before = dir_contents(directory)
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(".sha256"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    caplog.clear()
    result = one_step(trainer, *normal_batch(rng))
    assert result is not None and result.checkpoint is None
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert trainer.checkpoints.version == 1
    assert sorted(dir_contents(directory)) == sorted(before), "a partial checkpoint or temp file was left"
    monkeypatch.undo()
    result = one_step(trainer, *normal_batch(rng))
    assert result.checkpoint.path == directory / "model_v000002.onnx"
    verify_published(directory / "model_v000002.onnx")


# Runs the real CLI with os.replace failing for checkpoint files while a flag file exists.
FAULTY_SERVER = """
import errno, os, sys
flag = os.environ["VMAFX_TEST_CHECKPOINT_FAULT"]
real_replace, real_rename = os.replace, os.rename
def faulty(real):
    def call(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)).startswith("model_v") and os.path.exists(flag):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *args, **kwargs)
    return call
os.replace, os.rename = faulty(real_replace), faulty(real_rename)
import vmafx_sidecar
sys.exit(vmafx_sidecar.main(["serve"]))
"""


def test_acks_keep_flowing_through_the_server_while_checkpoint_writes_fail(tmp_path, monkeypatch):
    flag = tmp_path / "disk-full"
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen",
                        lambda args, **kwargs: real_popen([sys.executable, "-c", FAULTY_SERVER], **kwargs))
    s = Sidecar(tmp_path, {**SMALL_MODEL, "VMAFX_SIDECAR_CKPT_INTERVAL_S": "0", "VMAFX_SIDECAR_MIN_SAMPLES_CKPT": "16",
                           "VMAFX_SIDECAR_GATE": "off",  # every written checkpoint is published, as in STEPPING
                           "VMAFX_TEST_CHECKPOINT_FAULT": str(flag)})
    try:
        s.start()
        monkeypatch.undo()
        rng = np.random.default_rng(3)
        c = s.client()
        acks = [c.request(sample(rng, N_FEATURES, job_id=f"a-{i}")) for i in range(16)]
        assert acks[-1]["checkpoint"].endswith("model_v000001.onnx"), acks[-1]
        before = dir_contents(s.checkpoint_dir)
        flag.write_bytes(b"")
        for i in range(64):  # 4 steps, each with a checkpoint due
            ack = c.request(sample(rng, N_FEATURES, job_id=f"b-{i}"))
            assert ack["ok"] is True and ack["job_id"] == f"b-{i}" and "checkpoint" not in ack, ack
            assert ack["trained"] is (i % 16 == 15)
        st = status(c)
        assert st["steps"] == 5 and st["checkpoint_version"] == 1 and st["samples_accepted"] == 80, st
        failures = [line for line in s.stderr().splitlines() if "ERROR" in line and "No space left on device" in line]
        assert len(failures) == 4, s.stderr()
        assert dir_contents(s.checkpoint_dir) == before
        flag.unlink()
        acks = [c.request(sample(rng, N_FEATURES, job_id=f"c-{i}")) for i in range(16)]
        assert acks[-1]["checkpoint"] == str(s.checkpoint_dir / "model_v000002.onnx"), acks[-1]
        verify_published(s.checkpoint_dir / "model_v000002.onnx")
        assert s.stop() == 0
    finally:
        s.cleanup()


# ---- 3. a step whose update overflows the weights is undone ----

# lr 1e30 without clipping: a batch of +-1e6 features has a loss and a gradient norm (and its square)
# that are finite in float32, but lr * gradient is not (assert_update_overflows checks both premises).
# Ordinary samples still give finite, if absurd, weights, so a later checkpoint can be written; its
# outputs overflow float32, so the read-back check quarantines it, even with the gate off.
OVERFLOW = dict(lr=1e30, max_grad_norm=1e30, warmup_steps=0, ema_decay=0.9)


def overflowing_batch() -> tuple[np.ndarray, np.ndarray]:
    # Rows of +1e6 and -1e6: every hidden unit is active on one of them, so every layer gets a huge gradient.
    x = np.array([[1e6] * N_FEATURES, [-1e6] * N_FEATURES] * 2)
    return x, np.full(4, 50.0)


def assert_update_overflows(model: vs.MLP, momentum: np.ndarray, config: vs.Config) -> None:
    """The test's premise, checked on a copy: finite loss and gradient norm, non-finite update."""
    probe, grad = model.copy(), vs.MLP(model.sizes, model.activations)
    x, y = overflowing_batch()
    with np.errstate(over="ignore", invalid="ignore"):
        loss = probe.loss_and_grad(x.astype(np.float32), y.astype(np.float32), grad)
        squared_norm = np.dot(grad.flat, grad.flat)  # float32
        update = np.float32(config.lr) * (np.float32(config.momentum) * momentum + grad.flat)
        after = model.flat - update
    assert math.isfinite(loss) and np.isfinite(squared_norm), (loss, squared_norm)
    assert float(np.sqrt(squared_norm)) < config.max_grad_norm  # not clipped
    assert not np.all(np.isfinite(after)), "premise: this batch's update should overflow float32"


def test_a_step_that_makes_weights_non_finite_is_undone(tmp_path):
    directory = tmp_path / "ckpt"
    trainer = make_trainer(directory, **(STEPPING | OVERFLOW))
    rng = np.random.default_rng(6)
    # A history: momentum and EMA away from their start, so "exactly as before" is not "reset to zero".
    trainer.momentum[...] = rng.normal(0, 0.01, trainer.momentum.shape)
    trainer.ema.flat[...] = trainer.model.flat + rng.normal(0, 0.01, trainer.model.flat.shape)
    trainer.steps = 7
    assert_update_overflows(trainer.model, trainer.momentum, trainer.config)
    before = (trainer.model.flat.tobytes(), trainer.momentum.tobytes(), trainer.ema.flat.tobytes())
    skipped = trainer.steps_skipped

    with np.errstate(all="ignore"):
        result = one_step(trainer, *overflowing_batch())
    assert trainer.model.flat.tobytes() == before[0], "weights changed by an overflowing step"
    assert trainer.momentum.tobytes() == before[1], "momentum changed by an overflowing step"
    assert trainer.ema.flat.tobytes() == before[2], "EMA changed by an overflowing step"
    assert trainer.steps == 7
    assert trainer.steps_skipped == skipped + 1
    assert result is None or result.checkpoint is None
    assert trainer.checkpoints.version == 0 and dir_contents(directory) == {}

    result = one_step(trainer, *normal_batch(rng))  # then training goes on and checkpoints only finite weights
    assert result is not None and result.checkpoint.path == directory / "quarantine" / "model_v000001.onnx", result
    assert result.checkpoint.record["reason"] == "read-back check failed: the weights give outputs that are not finite"
    assert trainer.steps == 8 and trainer.steps_skipped == skipped + 1
    assert np.all(np.isfinite(trainer.model.flat)) and np.all(np.isfinite(trainer.ema.flat))
    assert checkpoint_weights_are_finite(result.checkpoint.path)


def test_status_counts_a_step_undone_for_overflow(sidecar_factory):
    s = sidecar_factory(**SMALL_MODEL, VMAFX_SIDECAR_BATCH_SIZE="4", VMAFX_SIDECAR_REPLAY_MIX="0",
                        VMAFX_SIDECAR_LR="1e30", VMAFX_SIDECAR_MAX_GRAD_NORM="1e30", VMAFX_SIDECAR_WARMUP_STEPS="0",
                        VMAFX_SIDECAR_CKPT_INTERVAL_S="0", VMAFX_SIDECAR_MIN_SAMPLES_CKPT="4",
                        VMAFX_SIDECAR_GATE="off",  # so that only the overflowing outputs can quarantine it
                        VMAFX_SIDECAR_NORMALIZE="off")  # raw coordinates, in which the premise below is checked
    # The server's fresh model (seed 0), rebuilt here only to check the test's premise.
    model = vs.MLP.initial([N_FEATURES, 8, 1], vs.Activation("relu"), np.random.default_rng(0))
    assert_update_overflows(model, np.zeros_like(model.flat), vs.Config(lr=1e30, max_grad_norm=1e30))
    c = s.client()
    x, y = overflowing_batch()
    acks = [c.request({"job_id": f"huge-{i}", "features": row.tolist(), "true_score": float(score)})
            for i, (row, score) in enumerate(zip(x, y))]
    assert all(a["ok"] is True and a["step"] == 0 for a in acks), acks
    st = status(c)
    assert (st["steps"], st["steps_skipped"], st["samples_accepted"]) == (0, 1, 4), st
    assert st["checkpoint_version"] is None
    rng = np.random.default_rng(7)
    acks = [c.request(sample(rng, N_FEATURES, job_id=f"ok-{i}")) for i in range(4)]
    assert acks[-1]["trained"] is True and acks[-1]["step"] == 1, acks[-1]
    st = status(c)
    assert st["steps_skipped"] == 1 and st["gate"]["gate"] == "quarantined", st
    assert st["gate"]["reason"] == "read-back check failed: the weights give outputs that are not finite", st
    assert checkpoint_weights_are_finite(s.checkpoint_dir / "quarantine" / "model_v000001.onnx")


# ---- 4. input abuse through the real server ----

N_CLIENTS = 64
PER_CLIENT = 2000

INVALID = [
    lambda jid: b"this is not json",
    lambda jid: b'[1, 2, 3]',
    lambda jid: encode({"job_id": jid, "features": [0.5] * (N_FEATURES - 1), "true_score": 50.0})[:-1],
    lambda jid: ('{"job_id": "%s", "features": [%s], "true_score": 50.0}'
                 % (jid, ", ".join(["0.5"] * (N_FEATURES - 1) + ["NaN"]))).encode(),
    lambda jid: encode({"job_id": jid, "features": [0.5] * N_FEATURES, "true_score": "50"})[:-1],
    lambda jid: encode({"job_id": jid, "features": [0.5] * N_FEATURES})[:-1],
    lambda jid: encode({"job_id": 17, "features": [0.5] * N_FEATURES, "true_score": 50.0})[:-1],
    lambda jid: encode({"job_id": jid, "op": "reboot"})[:-1],
    lambda jid: b'{"job_id": "' + jid.encode() + b'", "features": [0.5, ',
]
# Which of them echo their job_id in the error ACK.
INVALID_ECHOES = [False, False, True, True, True, True, False, True, False]


def abuse_script(k: int) -> tuple[list[bytes], list[tuple[bool, str | None]], int, int]:
    """Client k's lines and the (ok, job_id) each ACK must carry: ~90 % valid samples, ~8 % invalid lines,
    ~2 % pings. Also returns how many samples and how many invalid lines it sends."""
    rng = np.random.default_rng(1000 + k)
    lines, expected, n_samples, n_invalid = [], [], 0, 0
    for i in range(PER_CLIENT):
        jid = f"k{k}-{i}"
        r = rng.random()
        if r < 0.08:
            kind = int(rng.integers(len(INVALID)))
            lines.append(INVALID[kind](jid) + b"\n")
            expected.append((False, jid if INVALID_ECHOES[kind] else None))
            n_invalid += 1
        elif r < 0.10:
            lines.append(encode({"op": "ping", "job_id": jid}))
            expected.append((True, jid))
        else:
            lines.append(encode({"job_id": jid, "features": rng.uniform(0, 1, N_FEATURES).tolist(),
                                 "true_score": float(rng.uniform(20, 100))}))
            expected.append((True, jid))
            n_samples += 1
    return lines, expected, n_samples, n_invalid


def test_64_concurrent_clients_with_a_mix_of_valid_and_invalid_lines(sidecar_factory):
    s = sidecar_factory(**SMALL_MODEL, VMAFX_SIDECAR_MAX_CONNECTIONS="128")
    scripts = [abuse_script(k) for k in range(N_CLIENTS)]
    barrier = threading.Barrier(N_CLIENTS)
    problems: list[str] = []
    counted = [0] * N_CLIENTS  # ok:true sample ACKs per client

    def run(k: int) -> None:
        lines, expected, _, _ = scripts[k]
        try:
            c = Client(s.socket, timeout=60)
            barrier.wait(30)
            for i, line in enumerate(lines):
                c.send_raw(line)
                ack = c.read_ack()
                want_ok, want_job = expected[i]
                if ack["ok"] is not want_ok or ack.get("job_id") != want_job:
                    problems.append(f"client {k} line {i} {line[:80]!r}: expected {expected[i]}, got {ack}")
                    return
                if want_ok and "op" not in ack:
                    counted[k] += 1
            c.close()
        except BaseException as e:
            problems.append(f"client {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(N_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not any(t.is_alive() for t in threads), "clients still running"
    assert problems == [], problems[:5]
    n_samples = sum(script[2] for script in scripts)
    n_invalid = sum(script[3] for script in scripts)
    assert sum(counted) == n_samples
    st = status(s.client())
    assert st["samples_accepted"] == n_samples
    assert st["samples_rejected"] == n_invalid


def test_memory_stays_bounded_with_idle_oversized_and_non_reading_clients(sidecar_factory):
    s = sidecar_factory(**SMALL_MODEL, VMAFX_SIDECAR_MAX_CONNECTIONS="256")
    pid = s.proc.pid
    rng = np.random.default_rng(8)
    control = s.client()
    for i in range(200):
        assert control.request(sample(rng, N_FEATURES, job_id=f"warm-{i}"))["ok"] is True
    baseline = rss_bytes(pid)
    bound = baseline + 32 * 2**20
    stop = threading.Event()
    peak = [baseline]
    good: dict = {"n": 0, "worst_s": 0.0, "errors": []}

    def monitor() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes(pid))
            time.sleep(0.01)

    def well_behaved() -> None:
        c = Client(s.socket, timeout=30)
        good_rng = np.random.default_rng(9)
        try:
            while not stop.is_set():
                n = good["n"]
                started = time.monotonic()
                ack = c.request(sample(good_rng, N_FEATURES, job_id=f"good-{n}"))
                good["worst_s"] = max(good["worst_s"], time.monotonic() - started)
                if ack.get("ok") is not True or ack.get("job_id") != f"good-{n}":
                    good["errors"].append(ack)
                    return
                good["n"] = n + 1
                time.sleep(0.002)
        except BaseException as e:
            good["errors"].append(f"{type(e).__name__}: {e}")
        finally:
            c.close()

    helpers = [threading.Thread(target=monitor, daemon=True), threading.Thread(target=well_behaved, daemon=True)]
    for t in helpers:
        t.start()
    idle, flood, flood_thread, flood_errors = [], None, None, []
    try:
        # 100 connections that send nothing
        for _ in range(100):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(s.socket)
            idle.append(sock)
        assert wait_for(lambda: status(control)["connections"] >= 102, 10)

        # 10 MB without a newline: one "line too long", and the rest of that line gets no second ACK
        big = s.client()
        big.sock.settimeout(60)
        chunk = b'{"features": [' + b"0.5, " * 20_000  # 100 KB
        for _ in range(100):
            big.send_raw(chunk)
        ack = big.read_ack()
        assert ack["ok"] is False and "line too long" in ack["error"], ack
        big.send_raw(b"0.5]}\n" + encode({"op": "ping", "job_id": "after-long"}))
        assert big.read_ack() == {"ok": True, "op": "pong", "job_id": "after-long"}

        # valid lines, ACKs never read: up to 45 MB of ACKs (long job_ids) against a 1 MiB output cap, so a
        # server that buffered them all would also break the RSS bound
        pad = "x" * 400
        body = json.dumps(sample(rng, N_FEATURES))[1:]
        flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        flood.settimeout(60)
        flood.connect(s.socket)

        def write_flood() -> None:
            try:
                for start in range(0, 100_000, 1000):
                    flood.sendall(b"".join(f'{{"job_id": "flood-{i:06d}-{pad}", {body}\n'.encode()
                                           for i in range(start, start + 1000)))
            except OSError as e:
                flood_errors.append(e)

        flood_thread = threading.Thread(target=write_flood, daemon=True)
        flood_thread.start()
        dropped = wait_for(lambda: status(control).get("connections_dropped", 0) >= 1, 15, interval=0.1)
        flood_thread.join(10)
        stop.set()
        for t in helpers:
            t.join(35)

        assert good["errors"] == [] and good["n"] > 0, good
        assert good["worst_s"] < 5.0, good
        print(f"RSS: baseline {baseline / 2**20:.1f} MiB, peak {peak[0] / 2**20:.1f} MiB; "
              f"well-behaved client: {good['n']} round trips, slowest {good['worst_s'] * 1e3:.0f} ms")
        assert peak[0] <= bound, f"RSS peaked at {peak[0] / 2**20:.1f} MiB, baseline {baseline / 2**20:.1f} MiB"
        st = status(control)
        assert dropped, f"the client that never reads its ACKs was not disconnected: {st}"
        assert st["connections_dropped"] == 1, st
        assert not flood_thread.is_alive() and flood_errors, "the non-reading client's writes did not fail"
        flood.settimeout(10)
        try:  # what the server had sent, then end of stream
            while flood.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass
        # the idle connections were left alone
        idle[0].sendall(b'{"op": "ping"}\n')
        idle[0].settimeout(10)
        assert idle[0].recv(4096) == b'{"ok": true, "op": "pong"}\n'
    finally:
        stop.set()
        for sock in idle:
            sock.close()
        if flood is not None:
            try:
                flood.shutdown(socket.SHUT_RDWR)  # wakes the writer if it is still blocked
            except OSError:
                pass
            flood.close()
            if flood_thread is not None:
                flood_thread.join(10)


# ---- 5. more connections than VMAFX_SIDECAR_MAX_CONNECTIONS ----

def full_sidecar(sidecar_factory, limit: int) -> tuple[Sidecar, list[Client]]:
    """A sidecar serving `limit` clients, its limit."""
    s = sidecar_factory(**SMALL_MODEL, VMAFX_SIDECAR_MAX_CONNECTIONS=str(limit))
    clients = [served_client(s) for _ in range(limit)]
    assert status(clients[0])["connections"] == limit
    return s, clients


def served_client(s: Sidecar) -> Client:
    """A client the sidecar serves: while start()'s ping connection still holds a place, a new one may be over
    the limit, which answers one ping and closes."""
    deadline = time.monotonic() + 10
    while True:
        client = s.client()
        try:
            if [client.request({"op": "ping"}) for _ in range(2)] == [{"ok": True, "op": "pong"}] * 2:
                return client
        except (OSError, AssertionError):  # closed after its one answer: a reset, a broken pipe, or EOF (read_ack)
            pass
        client.close()
        assert time.monotonic() < deadline, "no place at the sidecar for 10 s"
        time.sleep(0.05)


def over_the_limit(s: Sidecar, line: bytes | None, within_s: float) -> None:
    """A connection over the limit that sends `line` (or nothing) is closed unanswered within `within_s`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(s.socket)
        started = time.monotonic()
        if line is not None:
            sock.sendall(line)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            pytest.fail("a connection over the limit was kept open (no EOF within 5 s)")
        assert data == b"", f"a connection over the limit got {data!r} instead of EOF"
        assert time.monotonic() - started < within_s


def test_connections_beyond_the_limit_are_closed_unanswered_and_counted(sidecar_factory):
    s, clients = full_sidecar(sidecar_factory, 8)
    first, rng = clients[0], np.random.default_rng(10)
    accepted = status(first)["samples_accepted"]
    for k in range(3):  # a node's sample on a ninth connection: EOF, no ACK, so it sends it again later
        over_the_limit(s, encode(sample(rng, N_FEATURES, job_id=f"over-{k}")), within_s=1.0)
    over_the_limit(s, None, within_s=vs.RESERVED_WAIT_S + 2.5)  # one that asks nothing waits its second at most
    st = status(first)
    assert st["connections"] == 8 and st["connections_refused"] == 4, st
    assert st["samples_accepted"] == accepted and st["samples_rejected"] == 0, st
    for k, c in enumerate(clients):  # the 8 keep working
        ack = c.request(sample(rng, N_FEATURES, job_id=f"kept-{k}"))
        assert ack["ok"] is True and ack["job_id"] == f"kept-{k}", ack
        assert c.request({"op": "ping"}) == {"ok": True, "op": "pong"}

    clients.pop(3).close()
    assert wait_for(lambda: status(first)["connections"] == 7, 10)
    newcomer = s.client()
    assert newcomer.request({"op": "ping"}) == {"ok": True, "op": "pong"}
    ack = newcomer.request(sample(rng, N_FEATURES, job_id="newcomer"))
    assert ack["ok"] is True and ack["job_id"] == "newcomer", ack
    over_the_limit(s, b'{"op": "nope"}\n', within_s=1.0)  # full again; an unknown op is no probe either
    st = status(first)
    assert st["connections"] == 8 and st["connections_refused"] == 5, st


def test_the_probe_and_status_are_answered_at_the_connection_limit(sidecar_factory):
    # The chart's startup, readiness and liveness probes ping the socket: at the limit, a refusal would take a
    # busy sidecar out of service and then restart it.
    s, clients = full_sidecar(sidecar_factory, 2)
    for _ in range(3):
        assert vs.feedback.probe(str(s.socket), 5.0) == 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # a last line without its newline is one
        sock.settimeout(5)
        sock.connect(s.socket)
        sock.sendall(b'{"op": "ping"}')
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(4096) == b'{"ok": true, "op": "pong"}\n' and sock.recv(1) == b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(s.socket)
        sock.sendall(b'{"op": "status", "job_id": "asked"}\n')
        answer = b""
        while not answer.endswith(b"\n"):
            answer += sock.recv(65536)
        assert sock.recv(1) == b""  # one question, then closed
    st = json.loads(answer)
    assert st["ok"] is True and st["job_id"] == "asked" and st["connections"] == 2, st
    assert st["connections_refused"] == 0, st
    assert all(c.request({"op": "ping"}) == {"ok": True, "op": "pong"} for c in clients)


def in_process_server(tmp_path: Path, max_connections: int = 128) -> vs.Server:
    trainer = make_trainer(tmp_path, n_features=N_FEATURES, hidden=8, max_connections=max_connections)
    return vs.Server(trainer.config, trainer, NoState())


def full_in_process_server(tmp_path: Path) -> tuple[vs.Server, vs.Connection, socket.socket]:
    """A server at its limit of one connection: the connection, and its client's end."""
    server = in_process_server(tmp_path, max_connections=1)
    ours, theirs = socket.socketpair()
    return server, accepted(server, ours, reserved=False), theirs


def accepted(server: vs.Server, sock: socket.socket, reserved: bool) -> vs.Connection:
    """`sock` as the loop holds a connection it accepted: served, or over the limit, in the reserve."""
    sock.setblocking(False)
    conn = vs.Connection(sock, server.on_reserved_ready if reserved else server.on_connection_ready)
    server.selector.register(sock, selectors.EVENT_READ, conn)
    if reserved:
        server.reserved[conn] = time.monotonic()
    else:
        server.connections.add(conn)
    return conn


class RefusingSocket:
    """A socket whose send() fails with `error`."""

    def __init__(self, sock: socket.socket, error: OSError):
        self.sock, self.error = sock, error

    def send(self, data: bytes) -> int:
        raise self.error

    def __getattr__(self, name: str):
        return getattr(self.sock, name)


@pytest.mark.parametrize("error, closed", [(BrokenPipeError(errno.EPIPE, "Broken pipe"), False),
                                           (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), False),
                                           (OSError(errno.ENOBUFS, "No buffer space available"), True)],
                         ids=["EPIPE", "ECONNRESET", "ENOBUFS"])
def test_a_send_error_closes_the_connection_unless_its_client_is_gone(tmp_path, error, closed):
    """A client gone (EPIPE, ECONNRESET) has its ACKs dropped and is read on to its end, its lines trained on; any
    other error of send() closes the connection: a client still there would wait for ACKs that never come."""
    server, conn, theirs = full_in_process_server(tmp_path)
    try:
        conn.sock = RefusingSocket(conn.sock, error)
        conn.outbuf += b'{"ok": true, "op": "pong"}\n'
        server.flush(conn)
        assert (conn not in server.connections) == closed
        if not closed:
            assert not conn.outbuf and conn.events == selectors.EVENT_READ
    finally:
        theirs.close()


def test_a_probe_waiting_through_a_slow_turn_is_answered_not_expired(tmp_path):
    """A turn that ran a long step (a checkpoint, a slow disk) after accepting a probe over the limit had closed it
    at the turn's end as silent, its ping unread in the socket."""
    server, _, served = full_in_process_server(tmp_path)
    ours, theirs = socket.socketpair()
    try:
        conn = accepted(server, ours, reserved=True)
        server.reserved[conn] -= 2 * vs.RESERVED_WAIT_S  # accepted before the slow turn
        theirs.sendall(b'{"op": "ping"}\n')  # asked at once, never read
        server.expire_reserved()
        theirs.settimeout(5)
        assert theirs.recv(100) == b'{"ok": true, "op": "pong"}\n' and server.connections_refused == 0
        quiet, quiet_peer = socket.socketpair()  # the peer stays open, and sends nothing
        silent = accepted(server, quiet, reserved=True)
        server.reserved[silent] -= 2 * vs.RESERVED_WAIT_S
        server.expire_reserved()  # one that asked nothing is still refused
        assert server.connections_refused == 1 and not server.reserved
        quiet_peer.close()
    finally:
        theirs.close()
        served.close()


def test_a_probe_over_the_limit_has_the_whole_wait_from_its_answer_to_take_it(tmp_path):
    """A probe that asked late in its wait, its answer too long for the socket buffer, was dropped as a stopped
    reader at the wait's end counted from its accept, not from its answer (mutation hunt)."""
    server, _, served = full_in_process_server(tmp_path)
    ours, theirs = socket.socketpair()
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024)
        conn = accepted(server, ours, reserved=True)
        server.reserved[conn] -= 2 * vs.RESERVED_WAIT_S  # accepted a while ago
        theirs.sendall(b'{"op": "ping", "job_id": "' + b"x" * 60_000 + b'"}\n')
        conn(selectors.EVENT_READ)
        assert conn.closing and conn.outbuf  # answered, not all of it sent yet
        server.expire_reserved()
        assert conn in server.reserved and server.connections_dropped == 0
        theirs.settimeout(5)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = theirs.recv(65536)
            assert chunk, f"closed after {len(answer)} bytes of the answer"
            answer += chunk
            if conn in server.reserved:
                conn(selectors.EVENT_WRITE)
        assert json.loads(answer) == {"ok": True, "op": "pong", "job_id": "x" * 60_000}
        assert not server.reserved and server.connections_dropped == 0
    finally:
        for sock in (ours, theirs, served):
            sock.close()


def test_a_connection_accepted_over_the_limit_is_served_once_a_place_frees(tmp_path):
    """A client that closed in the turn that accepted another left a place the newcomer did not get: accepted
    over the limit, its sample was refused (the docs hunt saw 187 of 200 reconnections at a limit refused so)."""
    server, conn, served = full_in_process_server(tmp_path)
    ours, theirs = socket.socketpair()
    try:
        newcomer = accepted(server, ours, reserved=True)  # the listener first, in the turn that reads the EOF
        served.close()
        server.on_connection_ready(conn, selectors.EVENT_READ)
        server.end_turn()
        assert not server.connections
        theirs.sendall(json.dumps(sample(np.random.default_rng(0), N_FEATURES, job_id="next")).encode() + b"\n")
        newcomer(selectors.EVENT_READ)
        server.end_turn()
        theirs.settimeout(5)
        ack = json.loads(theirs.recv(4096))
        assert ack["ok"] is True and ack["job_id"] == "next", ack
        assert server.connections == {newcomer} and not server.reserved and server.connections_refused == 0
    finally:
        theirs.close()


def test_a_connection_a_place_frees_for_at_a_turns_end_gets_its_ack_in_that_turn(tmp_path):
    """expire_reserved() reads a waiting connection's line once more, and one that a freed place takes is answered:
    run after the turn's ACKs went out, its ACK waited for the next turn (the 1 s select timeout, when nothing else
    came), and the ACK latency histogram never counted it."""
    trainer = make_trainer(tmp_path / "ckpt", n_features=N_FEATURES, hidden=8, max_connections=1)
    server = vs.Server(dataclasses.replace(trainer.config, socket=str(tmp_path / "s.sock")), trainer, NoState())
    server.bind()
    first, waiting = (socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2))
    real_expire, ack = server.expire_reserved, {}

    def expire_reserved():  # the waiting one's line arrives in the turn that reads the first one's EOF
        if not server.connections and not ack:
            for conn in server.reserved:
                server.reserved[conn] -= 2 * vs.RESERVED_WAIT_S
            waiting.sendall(json.dumps(sample(np.random.default_rng(0), N_FEATURES, job_id="w")).encode() + b"\n")
            ack["sent"] = True
        real_expire()
    server.expire_reserved = expire_reserved

    def client() -> None:
        first.connect(server.config.socket)
        waiting.connect(server.config.socket)
        time.sleep(0.3)  # both accepted, the second over the limit
        first.close()
        waiting.settimeout(10)
        ack["answer"] = json.loads(waiting.makefile("rb").readline())
        server.stopping = True
    thread = threading.Thread(target=client)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}  # pytest's own
    thread.start()
    try:
        server.serve_forever()
    finally:
        thread.join(15)
        waiting.close()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert ack["answer"]["ok"] is True and ack["answer"]["job_id"] == "w"
    assert sum(server.ack_seconds.counts) == 1


def test_one_turn_accepts_the_backlog_while_it_has_places(tmp_path):
    """At one accept a turn, and turns of busy clients long, a probe waited seconds behind a hundred reconnecting
    nodes (the hunt: a median of 6 s, its probes timed out)."""
    trainer = make_trainer(tmp_path / "ckpt", n_features=N_FEATURES, hidden=8, max_connections=8)
    server = vs.Server(dataclasses.replace(trainer.config, socket=str(tmp_path / "s.sock")), trainer, NoState())
    server.bind()
    clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(20)]
    try:
        for client in clients:
            client.connect(server.config.socket)
        server.on_listener_ready(selectors.EVENT_READ)
        server.take_accepts()  # served up to the limit, and the reserve's 4
        assert (len(server.connections), len(server.reserved), server.connections_refused) == (8, 4, 0)
        for client in clients[8:12]:  # the reserve's: nodes reconnecting, each with a sample
            client.sendall(json.dumps(sample(np.random.default_rng(0), N_FEATURES)).encode() + b"\n")
        # A turn: the reads first, which refuse the reserve's 4 (a sample is not a probe's question) and free its
        # places; then the backlog takes them, where a refusal first had reset a probe queued behind the nodes.
        for key, mask in server.selector.select(1):
            key.data(mask)
        server.take_accepts()
        assert (len(server.connections), len(server.reserved), server.connections_refused) == (8, 4, 4)
    finally:
        for conn in [*server.connections, *server.reserved]:
            server.close(conn)
        for client in clients:
            client.close()
        server.listener.close()


def test_the_shutdown_grace_ends_within_a_pass_over_busy_clients(tmp_path, monkeypatch):
    """A pass read every connection before the deadline was looked at again: with many pipelining clients a SIGTERM
    took 3-3.6 s, not the README's 2 s. Here each read takes a tenth of a second of a clock the test turns."""
    server = in_process_server(tmp_path)
    peers = []
    for _ in range(40):
        ours, theirs = socket.socketpair()
        accepted(server, ours, reserved=False)
        theirs.sendall(json.dumps(sample(np.random.default_rng(0), N_FEATURES)).encode() + b"\n")
        peers.append(theirs)
    offset, real_monotonic, real_read, reads = [0.0], time.monotonic, server.read, []
    monkeypatch.setattr(vs.time, "monotonic", lambda: real_monotonic() + offset[0])

    def slow_read(conn):
        reads.append(conn)
        offset[0] += 0.1
        return real_read(conn)
    server.read = slow_read
    try:
        server.shutdown()
    finally:
        for peer in peers:
            peer.close()
    assert len(reads) <= vs.SHUTDOWN_GRACE_S / 0.1 + 1 and not server.connections


def test_connections_over_the_limit_wait_only_in_their_reserve(sidecar_factory):
    s, clients = full_sidecar(sidecar_factory, 1)
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(vs.RESERVED_CONNECTIONS)]
    try:
        for sock in idle:  # the reserve, filled by connections that ask nothing
            sock.connect(s.socket)
        assert clients[0].request({"op": "ping"}) == {"ok": True, "op": "pong"}  # they are accepted and wait
        over_the_limit(s, None, within_s=vs.RESERVED_WAIT_S / 2)  # one more is closed at once
        for sock in idle:  # and theirs ends
            sock.settimeout(5)
            assert sock.recv(1) == b""
    finally:
        for sock in idle:
            sock.close()
    assert vs.feedback.probe(str(s.socket), 5.0) == 0  # the reserve is free again
    assert status(clients[0])["connections_refused"] == 1 + vs.RESERVED_CONNECTIONS


def test_a_connection_over_the_limit_that_does_not_take_its_answer_keeps_its_place_then_is_dropped(tmp_path):
    """One whose answer (a long job_id, echoed) did not fit in its socket had left the reserve once answered: open
    for as long as it did not read, outside every limit, and any number of them."""
    server, _, served = full_in_process_server(tmp_path)
    ours, theirs = socket.socketpair()
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # whatever this machine's default
        conn = accepted(server, ours, reserved=True)
        line = b'{"op": "ping", "job_id": "' + b"x" * 60000 + b'"}\n'
        theirs.sendall(line)
        while not conn.closing and conn in server.reserved:  # its line read, answered, and its answer begun
            server.on_reserved_ready(conn, selectors.EVENT_READ)
        assert conn.outbuf and list(server.reserved) == [conn]  # it holds a place in the reserve
        server.expire_reserved()  # within its second: kept
        assert list(server.reserved) == [conn]
        server.reserved[conn] -= 2 * vs.RESERVED_WAIT_S
        server.expire_reserved()
        assert not server.reserved and server.connections_dropped == 1 and server.connections_refused == 0
        theirs.settimeout(5)
        taken = b""
        while data := theirs.recv(65536):
            taken += data
        assert b'"op": "pong"' in taken and len(taken) < len(line)  # what its socket held, then EOF
    finally:
        theirs.close()
        served.close()


def test_a_shutdown_that_has_closed_every_connection_waits_no_longer(tmp_path, monkeypatch):
    """A node keeps its connection open: every SIGTERM had waited out the whole grace after closing it."""
    server = in_process_server(tmp_path)
    ours, theirs = socket.socketpair()
    try:
        accepted(server, ours, reserved=False)
        waits = []
        monkeypatch.setattr(server.selector, "select", lambda timeout=None: waits.append(timeout) or [])
        server.shutdown()
        assert not server.connections and waits == []
        theirs.settimeout(5)
        assert theirs.recv(1) == b""
    finally:
        theirs.close()


def test_samples_at_the_float32_limit_skip_steps_quietly_and_boundedly(tmp_path, caplog):
    # Valid by the protocol (inside float32's range), yet every batch that holds one overflows.
    trainer = make_trainer(tmp_path / "ckpt", **(STEPPING | {"min_samples_ckpt": 10**9}))
    caplog.set_level(logging.WARNING, logger="vmafx_sidecar")
    before = trainer.model.flat.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning reaches stderr either
        for _ in range(40):
            one_step(trainer, np.full((4, N_FEATURES), 3.4e38), np.full(4, 50.0))
    assert trainer.steps_skipped == 40 and trainer.steps == 0
    np.testing.assert_array_equal(trainer.model.flat, before)
    skipped = [r.getMessage() for r in caplog.records if "skipped a step" in r.getMessage()]
    assert [m.rsplit("(", 1)[1] for m in skipped] == [f"{n} skipped so far)" for n in (1, 2, 4, 8, 16, 32)]
