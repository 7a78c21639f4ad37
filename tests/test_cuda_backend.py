"""The CuPy backend, run on a numpy-backed stand-in for CuPy (tests/fakecupy) on machines without a GPU.

The stand-in's device arrays refuse every numpy function and ufunc, every host array mixed into an operation
and every implicit conversion to the host, so a numpy-only call anywhere on the device path fails here. It
runs the very numpy operations the numpy backend does, so results must be bitwise those of numpy. The real
GPU is checked by benchmarks/gpu_check.py.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vmafx_sidecar as vs
from conftest import ROOT, Sidecar, make_trainer, sample

FAKE_DIR = ROOT / "tests" / "fakecupy"
FAKE_MODULES = ("cupy", "cupyx", "cupyx.scipy", "cupyx.scipy.special")
FAKE_PATH = f"{ROOT}{os.pathsep}{FAKE_DIR}"  # PYTHONPATH of a sidecar that finds the stand-in
ACTIVATIONS = [vs.Activation("relu"), vs.Activation("leaky_relu", 0.1), vs.Activation("tanh"),
               vs.Activation("sigmoid"), vs.Activation("gelu")]
REAL_CUPY = importlib.util.find_spec("cupy") is not None  # the fallback tests need a machine without it


@pytest.fixture
def fake_cupy(monkeypatch):
    """The stand-in, importable as cupy and cupyx.scipy.special for this test only."""
    assert not any(name in sys.modules for name in FAKE_MODULES), "a cupy module is already imported"
    monkeypatch.syspath_prepend(str(FAKE_DIR))
    monkeypatch.delenv("FAKE_CUPY_DEVICES", raising=False)
    import cupy
    import cupyx.scipy.special  # noqa: F401
    assert cupy.FAKE
    yield cupy
    for name in FAKE_MODULES:
        sys.modules.pop(name, None)


@pytest.fixture
def gpu(fake_cupy) -> vs.Backend:
    backend = vs.select_backend("1")
    assert backend.name == "cupy" and backend.xp is fake_cupy
    return backend


# ---- the stand-in is strict: what would leak a numpy-only call fails on it ----

def test_numpy_functions_and_ufuncs_refuse_device_arrays(fake_cupy):
    d = fake_cupy.asarray(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4))
    for call in (lambda: np.maximum(d, 0), lambda: np.tanh(d), lambda: np.exp(d), lambda: np.where(d > 0, d, 0),
                 lambda: np.sum(d, axis=0), lambda: np.matmul(d, d.T), lambda: np.vdot(d, d), lambda: np.sign(d),
                 lambda: np.isfinite(d), lambda: vs.NUMPY.erf(d), lambda: np.zeros_like(d)):
        with pytest.raises(TypeError):
            call()
    # The same operations through the module, the operators and the methods work and stay on the device.
    xp = fake_cupy
    for result in (xp.maximum(d, 0), xp.tanh(d), xp.where(d > 0, d, 0), xp.sum(d, axis=0), d @ d.T, 2 * d,
                   np.float32(0.5) * d, d / 3.0, -d, 1 - d * d, d.T, d.reshape(4, 3), d.astype(np.float64),
                   xp.isfinite(d).all(), xp.vdot(d, d), d[1:, None]):
        assert isinstance(result, xp.ndarray)


def test_host_and_device_arrays_do_not_mix(fake_cupy):
    d = fake_cupy.zeros((2, 3), np.float32)
    host = np.ones((2, 3), np.float32)
    for call in (lambda: d + host, lambda: host + d, lambda: host * d, lambda: d.__setitem__(..., host),
                 lambda: host.__setitem__(..., d), lambda: fake_cupy.maximum(d, host),
                 lambda: d.take(np.array([0]), axis=0), lambda: fake_cupy.matmul(d.T, d, out=np.zeros((3, 3))),
                 lambda: fake_cupy.zeros_like(host)):
        with pytest.raises(TypeError):
            call()


def test_only_asnumpy_goes_back_to_the_host(fake_cupy):
    d = fake_cupy.asarray(np.arange(4, dtype=np.float32))
    for call in (lambda: np.asarray(d), lambda: np.array(d), lambda: np.float32(1) + np.zeros(4) + d):
        with pytest.raises(TypeError, match="Implicit conversion|Unsupported type"):
            call()
    host = fake_cupy.asnumpy(d)
    assert type(host) is np.ndarray and host.tolist() == [0, 1, 2, 3]
    assert float(fake_cupy.vdot(d, d)) == 14.0 and bool(fake_cupy.isfinite(d).all()) and len(d) == 4
    source = np.zeros(3, np.float32)  # asarray copies, as a transfer does
    on_device = fake_cupy.asarray(source)
    source[0] = 7
    assert fake_cupy.asnumpy(on_device)[0] == 0


def test_a_numpy_only_function_is_caught(fake_cupy):
    """The detection the other tests rely on: written against np instead of xp, it works on the host and
    fails on the device; written against xp, it gives numpy's result bit for bit."""
    def numpy_only(z):
        return np.where(z > 0, z, 0.1 * z).astype(z.dtype) * np.tanh(z)

    def backend_agnostic(z, xp):
        return xp.where(z > 0, z, 0.1 * z).astype(z.dtype) * xp.tanh(z)

    host = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    numpy_only(host)
    with pytest.raises(TypeError):
        numpy_only(fake_cupy.asarray(host))
    on_device = fake_cupy.asnumpy(backend_agnostic(fake_cupy.asarray(host), fake_cupy))
    assert on_device.tobytes() == backend_agnostic(host, np).tobytes()


def test_erf_is_elementwise_math_erf_in_the_input_dtype(fake_cupy):
    import cupyx.scipy.special
    z = np.linspace(-4, 4, 101, dtype=np.float32)
    erf = fake_cupy.asnumpy(cupyx.scipy.special.erf(fake_cupy.asarray(z)))
    assert erf.dtype == np.float32
    assert erf.tobytes() == np.array([vs.math.erf(v) for v in z.tolist()], np.float32).tobytes()
    with pytest.raises(TypeError):
        cupyx.scipy.special.erf(z)


# ---- the model and the trainer on the CuPy code path: the same results as numpy ----

def host_arrays(model: vs.MLP) -> list[np.ndarray]:
    return [a for layer in model.weights().layers for a in layer]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=str)
def test_forward_and_gradient_on_the_device_match_numpy(gpu, act):
    rng = np.random.default_rng(3)
    host = vs.MLP.initial([6, 9, 5, 1], act, rng)  # two hidden layers: both backprop branches
    device, host_grad = host.to(gpu), vs.MLP(host.sizes, host.activations)
    device_grad = vs.MLP(host.sizes, host.activations, backend=gpu)
    x, y = rng.normal(size=(11, 6)).astype(np.float32), rng.uniform(0, 4, 11).astype(np.float32)
    loss = host.loss_and_grad(x, y, host_grad)
    device_loss = device.loss_and_grad(gpu.xp.asarray(x), gpu.xp.asarray(y), device_grad)
    assert isinstance(device.flat, gpu.xp.ndarray) and isinstance(device_grad.flat, gpu.xp.ndarray)
    assert device_loss == loss
    assert gpu.to_host(device_grad.flat).tobytes() == host_grad.flat.tobytes()
    scores = gpu.to_host(device.forward(gpu.xp.asarray(x)))
    assert scores.tobytes() == host.forward(x).tobytes()


# make_trainer settings: a 6-9-5-1 model, replay mixed in, the hold-out on, clipping and decay active, a checkpoint
# every 2 steps (all kept). Each window (8 samples) is too small to judge, so the history decides: 24 samples,
# held-out ones topped up with replayed ones while fewer than 16 are held out, and no PLCC drop allowed:
# passes and quarantines.
BUSY = dict(sizes=[6, 9, 5, 1], hidden=9, batch_size=8, replay_mix=0.5, replay_capacity=24, eval_capacity=24,
            holdout_fraction=0.25, gate="on", gate_min_eval=16, gate_max_plcc_drop=0.0, min_samples_ckpt=8,
            ckpt_interval_s=0.0, lr=0.05, warmup_steps=5, weight_decay=0.001, max_grad_norm=2.0, momentum=0.9,
            ema_decay=0.8, seed=5, keep_checkpoints=0)


def train(trainer: vs.Trainer, n: int = 400) -> list[dict]:
    """Feed a learnable stream (a third without job_id); the checkpoint records, less time and digest. Its
    signal stands well above its noise, so that the candidates of every activation come out on both sides
    of the gate (9 or more of each per activation here)."""
    rng = np.random.default_rng(17)
    w = rng.normal(size=6)
    records = []
    for i in range(n):
        x = rng.uniform(0, 1, 6).astype(np.float32)
        score = np.float32(3 * (x @ w) + rng.normal(0, 0.1))
        job_id = None if i % 3 == 0 else f"job-{i % 40}"
        result = trainer.ingest(x, score, trainer.is_held_out(job_id), unnamed=job_id is None)
        if result is not None and result.checkpoint is not None:
            record = dict(result.checkpoint.record)
            for key in ("created", "created_unix", "sha256"):
                record.pop(key)
            records.append(record)
    return records


def trainer_state(t: vs.Trainer) -> dict:
    host = t.backend.to_host
    arrays = {"theta": t.model.flat, "ema": t.ema.flat, "momentum": t.momentum, "incumbent": t.incumbent.flat,
              "replay_x": t.replay.x, "replay_y": t.replay.y, "eval_x": t.eval.x, "eval_y": t.eval.y}
    return {
        **{name: host(a).tobytes() for name, a in arrays.items()},
        "counters": (t.steps, t.steps_skipped, t.samples_trained, t.samples_held_out, t.unnamed_samples,
                     t.samples_since_checkpoint, t.n_pending, t.n_held, t.replay.size, t.replay.next,
                     t.eval.size, t.eval.next, t.last_loss, t.loss_smoothed, dict(t.checkpoint_results)),
        "rng": t.rng.bit_generator.state,
    }


@pytest.mark.parametrize("act", ACTIVATIONS, ids=str)
def test_trainer_on_the_device_matches_numpy_bit_for_bit(gpu, tmp_path, act):
    cpu_trainer = make_trainer(tmp_path / "numpy", activation=act, backend=vs.NUMPY, **BUSY)
    gpu_trainer = make_trainer(tmp_path / "cupy", activation=act, backend=gpu, **BUSY)
    cpu_records, gpu_records = train(cpu_trainer), train(gpu_trainer)
    assert isinstance(gpu_trainer.momentum, gpu.xp.ndarray) and isinstance(gpu_trainer.replay.x, gpu.xp.ndarray)
    assert gpu_records == cpu_records  # weights stepped, verdicts and metrics alike
    assert trainer_state(gpu_trainer) == trainer_state(cpu_trainer)
    # The run exercised what it claims: replay and hold-out past full rings, clipping, both verdicts, and a
    # history topped up from the replay ring.
    assert cpu_trainer.replay.size == 24 and cpu_trainer.samples_held_out > 24 and cpu_trainer.steps > 30
    verdicts = {r["gate"] for r in cpu_records}
    assert {"quarantined", "passed"} <= verdicts and len(cpu_records) > 10, verdicts
    assert any(r["metrics"]["history"]["held_out"] < r["metrics"]["history"]["n"] for r in cpu_records)
    for name in os.listdir(tmp_path / "numpy"):  # and the same files, but for their creation time
        if name.endswith(".json") and name != "latest.json":
            a, b = (json.loads((tmp_path / d / name).read_text()) for d in ("numpy", "cupy"))
            assert {**a, "created": 0, "created_unix": 0, "sha256": 0} == {**b, "created": 0, "created_unix": 0,
                                                                             "sha256": 0}


def test_a_feature_that_changes_its_regime_is_standardized_again_on_the_device_as_on_numpy(gpu, tmp_path, caplog):
    """retake_statistics picked the outgrown features' columns of a device array with a host mask, which CuPy
    is not asked to take (the fake refuses it): the path had never run on the device."""
    def run(trainer: vs.Trainer) -> None:
        rng = np.random.default_rng(23)
        for i in range(240):
            x = rng.uniform(0, 1, 6).astype(np.float32)
            x[2] = 0.0 if i < 120 else rng.uniform(0, 1e4)  # a field the node began to fill in later
            trainer.ingest(x, np.float32(3 * x[0] + x[1]), False, unnamed=True)
    caplog.set_level(logging.INFO, logger="vmafx_sidecar")
    settings = {**BUSY, "gate": "off", "min_samples_ckpt": 10**9}
    cpu_trainer = make_trainer(tmp_path / "numpy", backend=vs.NUMPY, **settings)
    gpu_trainer = make_trainer(tmp_path / "cupy", backend=gpu, **settings)
    run(cpu_trainer)
    assert "feature(s) 2 moved far past the statistics taken for them" in caplog.text
    run(gpu_trainer)
    assert trainer_state(gpu_trainer) == trainer_state(cpu_trainer)
    assert gpu_trainer.coords == cpu_trainer.coords


# ---- backend selection ----

def test_select_backend_uses_cupy_when_it_and_a_device_are_there(fake_cupy):
    import cupyx.scipy.special
    for cuda in ("1", "require"):
        backend = vs.select_backend(cuda)
        assert (backend.name, backend.xp, backend.erf, backend.to_host) == (
            "cupy", fake_cupy, cupyx.scipy.special.erf, fake_cupy.asnumpy)
    assert vs.select_backend("0") is vs.NUMPY


@pytest.mark.parametrize("devices, why", [("0", "no CUDA device"), ("error", "CUDARuntimeError")])
def test_select_backend_falls_back_without_a_device(fake_cupy, monkeypatch, caplog, devices, why):
    monkeypatch.setenv("FAKE_CUPY_DEVICES", devices)
    with caplog.at_level(logging.WARNING, logger=vs.log.name):
        assert vs.select_backend("1") is vs.NUMPY
    assert len(caplog.records) == 1 and why in caplog.text and "numpy" in caplog.text, caplog.text
    with pytest.raises(vs.StartupError, match=f"VMAFX_SIDECAR_CUDA=require.*{why}"):
        vs.select_backend("require")


@pytest.mark.skipif(REAL_CUPY, reason="cupy is installed here")
def test_select_backend_falls_back_without_cupy(caplog):
    with caplog.at_level(logging.WARNING, logger=vs.log.name):
        assert vs.select_backend("1") is vs.NUMPY
    assert len(caplog.records) == 1 and "ModuleNotFoundError" in caplog.text, caplog.text
    with pytest.raises(vs.StartupError, match="ModuleNotFoundError"):
        vs.select_backend("require")


# ---- a real server on the CuPy code path ----

SETTINGS = dict(VMAFX_SIDECAR_BATCH_SIZE="8", VMAFX_SIDECAR_REPLAY_CAPACITY="48", VMAFX_SIDECAR_LR="0.01",
                VMAFX_SIDECAR_CKPT_INTERVAL_S="0", VMAFX_SIDECAR_MIN_SAMPLES_CKPT="40", VMAFX_SIDECAR_N_FEATURES="5",
                VMAFX_SIDECAR_HIDDEN="7", VMAFX_SIDECAR_HOLDOUT_FRACTION="0.2", VMAFX_SIDECAR_EVAL_CAPACITY="16",
                VMAFX_SIDECAR_GATE="off")  # every checkpoint published: its path in an ACK; the verdicts are above
TOTAL, STOP_AT = 150, 73  # 73: mid-batch, after a checkpoint and the snapshot it takes
ON = {"numpy": dict(VMAFX_SIDECAR_CUDA="0"), "cupy": dict(VMAFX_SIDECAR_CUDA="1", PYTHONPATH=FAKE_PATH)}


def messages() -> list[dict]:
    rng = np.random.default_rng(11)
    return [sample(rng, 5, job_id=None if i % 3 == 0 else f"job-{i}") for i in range(TOTAL)]


def start(workdir: Path, **env: str) -> Sidecar:
    workdir.mkdir(exist_ok=True)
    return Sidecar(workdir, {**SETTINGS, **env}).start()


def feed(sidecar: Sidecar, batch: list[dict]) -> list[dict]:
    client = sidecar.client()
    acks = [client.request(m) for m in batch]
    assert all(a["ok"] for a in acks)
    client.close()
    return acks


def status(sidecar: Sidecar) -> dict:
    client = sidecar.client()
    try:
        return client.request({"op": "status"})
    finally:
        client.close()


def read_snapshot(directory: Path) -> tuple[dict, dict[str, np.ndarray]]:
    data = (directory / ".state" / "snapshot.bin").read_bytes()
    meta, arrays = vs.unpack_arrays(data[len(vs.SNAPSHOT_MAGIC) + vs.SNAPSHOT_HEADER.size:])
    meta.pop("last_checkpoint_unix")  # wall-clock time, and how many snapshots were taken on the way
    meta.pop("generation")
    for key in ("created", "created_unix", "sha256"):
        meta["last_gate"].pop(key)
    return meta, {name: a.tobytes() for name, a in arrays.items()}


def without_directory(acks: list[dict], checkpoint_dir) -> list[dict]:
    """The ACKs with checkpoint paths relative to their directory, which differs between runs."""
    return [{**a, "checkpoint": os.path.relpath(a["checkpoint"], checkpoint_dir)} if "checkpoint" in a else a
            for a in acks]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, tuple]:
    """The whole stream on each backend, in one process: the ACKs (checkpoint paths made relative),
    status and the final snapshot."""
    runs = {}
    for name, env in ON.items():
        workdir = tmp_path_factory.mktemp(f"uninterrupted-{name}")
        s = start(workdir, **env)
        try:
            acks = feed(s, messages())
            info = status(s)
            assert s.stop() == 0
        finally:
            s.cleanup()
        runs[name] = without_directory(acks, s.checkpoint_dir), info, read_snapshot(s.checkpoint_dir), s.stderr()
    return runs


def test_socket_exchange_on_the_device_matches_numpy(uninterrupted):
    cpu_acks, cpu_status, cpu_state, _ = uninterrupted["numpy"]
    gpu_acks, gpu_status, gpu_state, gpu_log = uninterrupted["cupy"]
    assert (gpu_status["backend"], cpu_status["backend"]) == ("cupy", "numpy")
    assert " on cupy, batch 8" in gpu_log and "WARNING" not in gpu_log, gpu_log
    assert gpu_acks == cpu_acks
    assert sum(a["trained"] for a in cpu_acks) > 10 and any("checkpoint" in a for a in cpu_acks)
    assert gpu_state == cpu_state
    meta, _ = cpu_state  # the hold-out went past a full evaluation ring, and the gate measured
    assert meta["samples_held_out"] > 16 == meta["eval_size"] and meta["last_gate"]["metrics"]["candidate"]
    for info in (gpu_status, cpu_status):  # what differs by clock or by design
        for key in ("uptime_s", "backend", "config"):
            info.pop(key)
        for key in ("created", "created_unix", "sha256"):
            info["gate"].pop(key)
    assert gpu_status == cpu_status


@pytest.mark.parametrize("first, second, stop", [("cupy", "numpy", signal.SIGKILL), ("numpy", "cupy", signal.SIGTERM)],
                         ids=["cupy-killed-then-numpy", "numpy-stopped-then-cupy"])
def test_state_moves_between_backends(uninterrupted, tmp_path, first, second, stop):
    """A state saved on one backend resumes on the other (journal replay included after kill -9), and
    training goes on as if the whole stream had been seen by one process."""
    s = start(tmp_path, **ON[first])
    try:
        acks = feed(s, messages()[:STOP_AT])
        s.stop(stop)
    finally:
        s.cleanup()
    s = start(tmp_path, **ON[second])
    try:
        assert "resumed: step" in s.stderr() and status(s)["backend"] == second
        acks += feed(s, messages()[STOP_AT:])
        assert s.stop() == 0
    finally:
        s.cleanup()
    reference_acks, _, reference_state, _ = uninterrupted["numpy"]
    assert without_directory(acks, s.checkpoint_dir) == reference_acks
    assert read_snapshot(s.checkpoint_dir) == reference_state


# ---- fallback and require, as the process sees them ----

def serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """A sidecar that is expected not to start; what it said and its exit status."""
    sock = Sidecar(tmp_path, env)  # its environment, socket and checkpoint paths
    try:
        return subprocess.run([sys.executable, "-m", "vmafx_sidecar", "serve"], env=sock.env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=30)
    finally:
        assert not os.path.exists(sock.socket)  # only the socket's lock file, which claimed the path first
        shutil.rmtree(sock.sockdir)


@pytest.mark.parametrize("why, env", [
    pytest.param("ModuleNotFoundError", {}, marks=pytest.mark.skipif(REAL_CUPY, reason="cupy is installed here")),
    ("no CUDA device", dict(PYTHONPATH=FAKE_PATH, FAKE_CUPY_DEVICES="0")),
], ids=["without-cupy", "without-a-device"])
def test_cuda_1_falls_back_to_numpy_with_one_warning(tmp_path, why, env):
    s = Sidecar(tmp_path, dict(VMAFX_SIDECAR_CUDA="1", **env)).start()
    try:
        backend = status(s)["backend"]
    finally:
        s.cleanup()
    warnings = [line for line in s.stderr().splitlines() if " WARNING " in line]
    assert backend == "numpy"
    assert len(warnings) == 1 and "VMAFX_SIDECAR_CUDA=1" in warnings[0] and why in warnings[0], s.stderr()


@pytest.mark.skipif(REAL_CUPY, reason="cupy is installed here")
def test_cuda_require_without_cupy_exits_1(tmp_path):
    done = serve(tmp_path, VMAFX_SIDECAR_CUDA="require")
    assert done.returncode == 1, done.stderr
    assert "VMAFX_SIDECAR_CUDA=require, but CuPy cannot run: ModuleNotFoundError" in done.stderr, done.stderr
    assert not os.path.exists(tmp_path / "ckpt" / "latest.json")


def test_cuda_require_with_cupy_runs_on_it(tmp_path):
    s = Sidecar(tmp_path, dict(VMAFX_SIDECAR_CUDA="require", PYTHONPATH=FAKE_PATH)).start()
    try:
        assert status(s)["backend"] == "cupy"
    finally:
        s.cleanup()
    assert "WARNING" not in s.stderr(), s.stderr()


@pytest.mark.parametrize("value", ["2", "yes", "", "REQUIRE"])
def test_invalid_cuda_setting_exits_2(tmp_path, value):
    done = serve(tmp_path, VMAFX_SIDECAR_CUDA=value)
    assert done.returncode == 2, done.stderr
    assert "VMAFX_SIDECAR_CUDA" in done.stderr and repr(value) in done.stderr, done.stderr
