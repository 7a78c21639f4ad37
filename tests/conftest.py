"""Shared fixtures: a real sidecar server in a subprocess, a line-oriented client for it, and the trainer
that in-process tests build."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
# How numpy and OpenBLAS compute here (NPY_DISABLE_CPU_FEATURES, OPENBLAS_CORETYPE, ...): passed on to every
# sidecar a test starts, so that a run of the suite on narrower SIMD paths reaches the training too.
NUMERIC_ENV = {k: v for k, v in os.environ.items() if k.startswith(("NPY_", "OPENBLAS_"))}

# After NUMERIC_ENV, which is to hold this environment's settings, not the OPENBLAS_NUM_THREADS this import sets.
import vmafx_sidecar as vs  # noqa: E402

# A failing property prints the @reproduce_failure line that replays it; under CI the examples are
# derived from each test's name, so a red CI run is the same run again on any machine.
settings.register_profile("vmafx", print_blob=True, derandomize=os.environ.get("CI") == "true")
settings.load_profile("vmafx")


def numeric_environment() -> list[str]:
    """What decides how floats round here: what a failure report from another machine needs."""
    umath = (np._core if hasattr(np, "_core") else np.core)._multiarray_umath  # np.core became np._core in 2.0
    features, dispatch = umath.__cpu_features__, umath.__cpu_dispatch__
    return [f"numpy {np.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"Python {sys.version.split()[0]}",
            f"numpy SIMD in use: {' '.join(f for f in dispatch if features.get(f)) or 'baseline only'}",
            f"numeric environment variables: {NUMERIC_ENV or 'none set'}"]


def pytest_report_header() -> list[str]:
    return numeric_environment()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report shows what each sidecar it started logged: a CI run's only trace of the server."""
    report = yield
    if report.failed:
        for s in getattr(item, "sidecars", []):
            try:
                text = s.stderr()[-STDERR_SHOWN:]
            except OSError as e:  # the test removed its directory: the report still comes
                text = f"unreadable: {e}"
            report.sections.append((f"sidecar {s.socket}: stderr, the last {STDERR_SHOWN} characters", text))
    return report


def pytest_terminal_summary(terminalreporter, exitstatus) -> None:
    """Repeated after failures, since -q hides the header."""
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        terminalreporter.write_sep("-", "numeric environment")
        for line in numeric_environment():
            terminalreporter.write_line(line)


def system_program(name: str, package: str) -> str:
    """The path of a program a test needs from the system: where it is missing the test is skipped, naming the
    Debian package that brings it, but fails under CI=true, so CI never passes by silently skipping it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package: {package}; apt-get install {package})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


# How long a client waits for an ACK before it fails the test: a hang's bound, never a latency's. A loaded CI machine
# has kept one ACK of a checkpointing step over 5 s (its fsyncs), where 0.3 s is the worst seen here beside the suite.
ACK_TIMEOUT_S = 60.0
STDERR_SHOWN = 6000


class Client:
    """Speaks the node's protocol: one request line, then exactly one ACK line."""

    def __init__(self, path: str, timeout: float = ACK_TIMEOUT_S):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_ack(self) -> dict:
        line = self.reader.readline()
        assert line.endswith(b"\n"), f"connection closed or partial ACK: {line!r}"
        return json.loads(line)

    def request(self, message: dict | bytes) -> dict:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        self.send_raw(data + b"\n")
        return self.read_ack()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class Sidecar:
    """A `python -m vmafx_sidecar serve` subprocess on a private socket and checkpoint dir."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir = workdir
        # AF_UNIX paths are limited to ~107 bytes, so the socket lives in a short temp dir.
        self.sockdir = tempfile.mkdtemp(prefix="vx")
        self.checkpoint_dir = workdir / "ckpt"
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT),
            "VMAFX_SIDECAR_SOCKET": os.path.join(self.sockdir, "s.sock"),
            "VMAFX_SIDECAR_CHECKPOINT_DIR": str(self.checkpoint_dir),
            "VMAFX_BASE_MODEL_PATH": "",
            **NUMERIC_ENV,
            # Most tests count steps and samples exactly; those about the hold-out set it themselves.
            "VMAFX_SIDECAR_HOLDOUT_FRACTION": "0",
            **env,
        }
        self.socket = self.env["VMAFX_SIDECAR_SOCKET"]  # the one `env` names, if it names one
        self.proc: subprocess.Popen | None = None
        self.stderr_path = workdir / f"stderr-{time.monotonic_ns()}.log"
        self.clients: list[Client] = []

    def start(self, timeout: float = 15.0) -> Sidecar:
        """Returns once the sidecar answers a ping; AssertionError with its stderr if it does not."""
        self.stderr_file = open(self.stderr_path, "wb")
        try:
            self.proc = vs.start_server(self.env, timeout, stderr=self.stderr_file, cwd=self.workdir)
        except vs.ServerNotReady as e:
            raise AssertionError(f"{e}:\n{self.stderr()}") from None
        return self

    def client(self) -> Client:
        c = Client(self.socket)
        self.clients.append(c)
        return c

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        for c in self.clients:
            c.close()
        self.clients.clear()
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self) -> None:
        self.stop(signal.SIGKILL)
        self.stderr_file.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)


def open_descriptors() -> dict[int, str]:
    """This process's descriptors and what each is open on (the listing's own among them, gone once listed); none
    known without /proc."""
    opened: dict[int, str] = {}
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
        try:
            opened[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return opened


@pytest.fixture(autouse=True)
def close_state_descriptors_left_open():
    """In-process Journals and SampleLogs (of StateStores, SampleLogs and fleet runs a test makes) hold raw
    descriptors (os.open) that nothing closes, the sidecar relying on its exit: one run of the suite ended with
    ~500 open in pytest's process, each test leaving less of `ulimit -n` to the tests after it. No module-wide
    fixture holds one, so those a test opened are closed after it."""
    before = open_descriptors()
    yield
    for fd, target in open_descriptors().items():
        if before.get(fd) != target and re.fullmatch(r"(journal\.bin|\d{16}\.seg)(\..*)?( \(deleted\))?",
                                                     os.path.basename(target)):
            os.close(fd)


@pytest.fixture
def sidecar_factory(tmp_path, request):
    """Start sidecars with extra env: `sidecar_factory(VMAFX_SIDECAR_BATCH_SIZE="8")`."""
    started: list[Sidecar] = []
    request.node.sidecars = started  # for the report of a failure

    def start(workdir: Path | None = None, **env: str) -> Sidecar:
        s = Sidecar(workdir or tmp_path, env)
        started.append(s)
        return s.start()

    yield start
    for s in started:
        s.cleanup()


@pytest.fixture
def sidecar(sidecar_factory) -> Sidecar:
    return sidecar_factory()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m vmafx_sidecar ARGS` from the repository, with its exit status and text output."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **NUMERIC_ENV}
    return subprocess.run([sys.executable, "-m", "vmafx_sidecar", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def sample(rng: np.random.Generator, n_features: int = 80, job_id: str | None = None) -> dict:
    message = {"features": rng.uniform(0, 1, n_features).tolist(), "true_score": float(rng.uniform(20, 100))}
    if job_id is not None:
        message["job_id"] = job_id
    return message


RELU = vs.Activation("relu")
NO_EVIDENCE = vs.Evidence(0, {"candidate": None})
UNGATED = vs.Verdict("off", NO_EVIDENCE, NO_EVIDENCE, "published by the test")  # for tests of the writer alone
REFUSED = UNGATED.refused("refused by the test")


def make_trainer(directory: Path, *, sizes: list[int] | None = None, activation: vs.Activation = RELU,
                 backend: vs.Backend = vs.NUMPY, **settings: Any) -> vs.Trainer:
    """A trainer on a fresh model, put together as vs.build_trainer puts one: its initial weights and its
    replay draws from one generator seeded with `seed`. `settings` are Config fields; no checkpoint is due
    unless they say so. `sizes`, for a model the settings cannot describe, also sets n_features."""
    settings = {"min_samples_ckpt": 10**9, **({"n_features": sizes[0]} if sizes else {}), **settings}
    config = vs.Config(checkpoint_dir=str(directory), **settings)
    rng = np.random.default_rng(config.seed)
    model = vs.MLP.initial(sizes or [config.n_features, config.hidden, 1], activation, rng)
    writer = vs.CheckpointWriter(config.checkpoint_dir, config.keep_checkpoints)
    return vs.Trainer(config, model.to(backend), writer, rng)


class NoState:
    """The state store of an in-process server whose state need not outlive it: keeps nothing. It has the calls
    vs.Server makes of vs.StateStore."""

    samples = None  # no sample log

    def record_sample(self, row: np.ndarray, score: np.float32, held_out: bool, job_id: str | None) -> None:
        pass

    def record_rejection(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def tick(self) -> None:
        pass

    def save(self) -> None:
        pass

    def write_failures(self) -> dict[str, int]:
        return {}

    def unsaved_samples(self) -> int:
        return 0
