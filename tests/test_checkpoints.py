"""Checkpoints: when they are written, what the files hold, how the graph reads back, and
what happens on restart, with a base model, and when a write fails half-way."""
from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import vmafx_onnx_builder
import vmafx_sidecar
from conftest import REFUSED, ROOT, UNGATED, Client, NoState, Sidecar, make_trainer, sample

N_FEATURES = 80
# batch 32 with replay_mix 0.5 (the defaults, spelled out): each step trains 16 new samples,
# so the 4th step, at the 64th sample, is the first with >= 64 new samples trained. The gate off: these
# tests are about the files, and 64 random samples are too little evidence for it to publish anything.
CKPT_ENV = {
    "VMAFX_SIDECAR_CKPT_INTERVAL_S": "0",
    "VMAFX_SIDECAR_MIN_SAMPLES_CKPT": "64",
    "VMAFX_SIDECAR_BATCH_SIZE": "32",
    "VMAFX_SIDECAR_REPLAY_MIX": "0.5",
    "VMAFX_SIDECAR_GATE": "off",
}


# ---- helpers ----

def ort_session(model: str | Path | onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the sidecar may be running on the other core
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def ort_scores(model: str | Path | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    (out,) = ort_session(model).run(["score"], {"features": x})
    return out


def numpy_scores(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return vmafx_sidecar.MLP.from_weights(vmafx_onnx_builder.read_mlp_model(model)).forward(x)


def assert_ort_matches_numpy(model: str | Path | onnx.ModelProto, n_features: int, seed: int = 0) -> None:
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    session = ort_session(proto)
    rng = np.random.default_rng(seed)
    for batch in (1, 7, 1024):
        x = rng.uniform(-1, 2, (batch, n_features)).astype(np.float32)
        (got,) = session.run(["score"], {"features": x})
        want = numpy_scores(proto, x)
        assert got.dtype == np.float32 and got.shape == (batch, 1)
        assert want.dtype == np.float32 and want.shape == (batch, 1)
        assert np.all(np.isfinite(got))
        diff = float(np.max(np.abs(got - want)))
        # Two float32 engines sum in different orders: a few ulps of the outputs' scale apart (scores are ~100).
        tolerance = max(1e-5, 8 * float(np.spacing(np.abs(want).max())))
        assert diff <= tolerance, f"batch {batch}: onnxruntime and numpy differ by {diff} (> {tolerance})"


def relu_mlp(layers: list[tuple[np.ndarray, np.ndarray]]) -> vmafx_onnx_builder.MLPWeights:
    return vmafx_onnx_builder.MLPWeights(layers, [vmafx_onnx_builder.Activation("relu")] * (len(layers) - 1))


def random_layers(rng: np.random.Generator, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """torch.nn.Linear-like scales, so outputs stay O(1) and 1e-5 is a float32-sized tolerance."""
    layers = []
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        bound = 1 / np.sqrt(fan_in)
        layers.append((rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32),
                       rng.uniform(-bound, bound, fan_out).astype(np.float32)))
    return layers


def feed(client: Client, rng: np.random.Generator, n: int, n_features: int = N_FEATURES) -> list[dict]:
    acks = []
    for i in range(n):
        ack = client.request(sample(rng, n_features, job_id=f"job-{i}"))
        assert ack["ok"] is True, ack
        acks.append(ack)
    return acks


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_sha256_file_verifies(model_path: Path) -> None:
    sha_path = model_path.with_name(model_path.name + ".sha256")
    text = sha_path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}  " + re.escape(model_path.name) + r"\n", text), repr(text)
    assert text[:64] == sha256_file(model_path)
    if shutil.which("sha256sum"):
        done = subprocess.run(["sha256sum", "-c", sha_path.name], cwd=model_path.parent,
                              capture_output=True, text=True, timeout=20)
        assert done.returncode == 0, done.stdout + done.stderr


PROBE = np.random.default_rng(7).uniform(0, 1, (16, 80)).astype(np.float32)  # inputs of the read-back check


def temp_files(directory: Path) -> list[str]:
    """Dot-files beside the checkpoints, other than the trainer's state directory and its claim."""
    return sorted(n for n in os.listdir(directory) if n.startswith(".") and n not in (".state", ".trainer.lock"))


def checkpoint_files(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n != ".state")


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def run_serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run a server that is expected to exit on its own (a startup failure)."""
    full_env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "VMAFX_SIDECAR_SOCKET": str(tmp_path / "never.sock"),
        "VMAFX_SIDECAR_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        **env,
    }
    return subprocess.run([sys.executable, "-m", "vmafx_sidecar", "serve"], env=full_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=20)


def first_checkpoint(s: Sidecar, seed: int = 0) -> Path:
    acks = feed(s.client(), np.random.default_rng(seed), 64)
    assert "checkpoint" in acks[-1], acks[-1]
    return Path(acks[-1]["checkpoint"])


# ---- the checkpoint the server writes ----

def test_first_checkpoint_is_written_with_the_ack_of_the_64th_sample(sidecar_factory):
    s = sidecar_factory(**CKPT_ENV)
    target = s.checkpoint_dir / "model_v000001.onnx"
    client = s.client()
    rng = np.random.default_rng(0)
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    for i in range(1, 65):
        ack = client.request(sample(rng, job_id=f"job-{i}"))
        assert ack["ok"] is True and ack["job_id"] == f"job-{i}", ack
        assert ack["trained"] is (i % 16 == 0), (i, ack)
        assert ack["step"] == i // 16, (i, ack)
        if i < 64:
            assert "checkpoint" not in ack, (i, ack)
            assert not target.exists(), f"checkpoint exists after only {i} samples"
    after = datetime.datetime.now(datetime.timezone.utc)

    assert os.path.isabs(ack["checkpoint"]), ack
    assert ack["checkpoint"].endswith("model_v000001.onnx")
    assert Path(ack["checkpoint"]) == target
    assert target.is_file()
    assert checkpoint_files(s.checkpoint_dir) == [".trainer.lock", "latest.json", "latest.onnx", "latest.onnx.sha256",
                                                  "model_v000001.json", "model_v000001.onnx",
                                                  "model_v000001.onnx.sha256", "quarantine"]
    assert (s.checkpoint_dir / "latest.onnx").read_bytes() == target.read_bytes()
    assert temp_files(s.checkpoint_dir) == []
    assert_sha256_file_verifies(target)

    status = client.request({"op": "status"})
    assert status["checkpoint_version"] == 1 and status["steps"] == 4 and status["samples_trained"] == 64

    model = onnx.load(str(target))
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")] == [("", 17)]

    (inp,) = model.graph.input
    assert inp.name == "features"
    assert inp.type.tensor_type.elem_type == TensorProto.FLOAT
    batch_dim, feature_dim = inp.type.tensor_type.shape.dim
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    assert feature_dim.dim_value == N_FEATURES

    (out,) = model.graph.output
    assert out.name == "score"
    assert out.type.tensor_type.elem_type == TensorProto.FLOAT
    out_batch, out_units = out.type.tensor_type.shape.dim
    assert out_batch.dim_param == batch_dim.dim_param and not out_batch.HasField("dim_value")
    assert out_units.dim_value == 1

    meta = metadata(model)
    assert meta["version"] == "1"
    assert meta["step"] == "4"
    assert meta["samples_trained"] == "64"
    created = datetime.datetime.fromisoformat(meta["created"])
    assert created.utcoffset() == datetime.timedelta(0), meta["created"]
    # A minute of slack for clock adjustments; a local time mislabelled as UTC is off by far more.
    slack = datetime.timedelta(seconds=60)
    assert before - slack <= created <= after + slack, (before, meta["created"], after)


def test_a_checkpoint_that_falls_due_after_the_last_step_is_taken_while_idle(sidecar_factory, tmp_path):
    """A burst trains MIN_SAMPLES_CKPT more samples within the interval after a checkpoint, then traffic stops: the
    next checkpoint falls due with no step to take it. The idle loop takes it at the interval, not once samples
    come again (until then, nodes would serve a model that had not seen the burst)."""
    # The burst takes 0.1 s; a machine's stall as long as the interval during it takes v2 at its last step, which
    # fails the premise, not the property: the burst is tried once more, with four times the interval.
    for interval in (5.0, 20.0):
        env = {**CKPT_ENV, "VMAFX_SIDECAR_CKPT_INTERVAL_S": str(interval)}
        (workdir := tmp_path / f"interval-{interval:g}").mkdir()
        s = sidecar_factory(workdir=workdir, **env)
        client = s.client()
        started = time.monotonic()  # before v1's interval begins: it counts from its checkpoint's start, before its ACK
        acks = feed(client, np.random.default_rng(0), 64)
        assert acks[-1]["checkpoint"].endswith("model_v000001.onnx")  # the first is due at once
        first = time.monotonic()
        acks = feed(client, np.random.default_rng(1), 64)
        if time.monotonic() - first < interval and all("checkpoint" not in a for a in acks):
            break
        s.stop(signal.SIGKILL)
    else:
        pytest.fail("the burst took a checkpoint within its interval twice: one taken at a step before it was due?")
    deadline = first + interval + 10
    while (status := client.request({"op": "status"}))["checkpoint_version"] == 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status["checkpoint_version"] == 2 and status["samples_accepted"] == 128, status
    assert time.monotonic() - started >= interval  # from after v1's ACK, a slow publish of v1 made it 4.97 s
    assert metadata(onnx.load(str(s.checkpoint_dir / "model_v000002.onnx")))["samples_trained"] == "128"
    s.stop(signal.SIGKILL)  # the state was saved with the checkpoint: a restart replays nothing to write another
    restarted = sidecar_factory(workdir=s.workdir, **env)
    status = restarted.client().request({"op": "status"})
    assert status["checkpoint_version"] == 2 and status["samples_accepted"] == 128, status
    assert not (s.checkpoint_dir / "model_v000003.onnx").exists()


def test_no_checkpoint_waits_while_nothing_was_trained_since_the_last(tmp_path):
    """MIN_SAMPLES_CKPT 0 makes a checkpoint due with nothing new: the idle loop must not write the same weights
    again every interval (the first checkpoint comes with the first step, as before)."""
    trainer = make_trainer(tmp_path, min_samples_ckpt=0, ckpt_interval_s=0)
    assert trainer.checkpoint_due() and not trainer.checkpoint_waiting()
    trainer.samples_since_checkpoint = 16
    assert trainer.checkpoint_waiting()


def test_the_loop_takes_a_due_checkpoint_only_once_no_sample_has_come_for_a_second(tmp_path):
    """While samples come, the next step takes a due checkpoint, and its ACK names it. Had the loop taken every one
    due a second after a step, at 2 samples a second (a step every 8 s) 7 checkpoints in 8 would go unnamed."""
    trainer = make_trainer(tmp_path, n_features=4, hidden=4, batch_size=8, min_samples_ckpt=4,
                           ckpt_interval_s=3600, gate="off")
    server = vmafx_sidecar.Server(trainer.config, trainer, NoState())
    rng = np.random.default_rng(0)
    for _ in range(4):  # a step: the first checkpoint, in its ACK
        ack = json.loads(server.answer(json.dumps(sample(rng, 4)).encode()))
    assert ack["checkpoint"].endswith("model_v000001.onnx")
    for _ in range(4):  # a step, with no checkpoint due: the interval has not passed
        trainer.ingest(np.zeros(4, np.float32), np.float32(50), held_out=False, unnamed=True)
    trainer.last_checkpoint_time -= 3600  # now it has: due, with a step's samples trained since
    start = time.perf_counter()
    for now in (start, start + 0.9):
        server.publish_when_idle(now)
    trainer.ingest(np.zeros(4, np.float32), np.float32(50), held_out=False, unnamed=True)  # a sample came
    for now in (start + 1.5, start + 2.4):
        server.publish_when_idle(now)
    assert trainer.checkpoint_results["published"] == 1  # a second had not passed since that sample
    server.publish_when_idle(start + 2.6)
    assert trainer.checkpoint_results["published"] == 2 and trainer.samples_since_checkpoint == 0


def test_checkpoint_path_in_ack_is_absolute_for_a_relative_checkpoint_dir(sidecar_factory, tmp_path):
    # The node reads the ACK in another working directory; a relative path is useless to it.
    s = sidecar_factory(VMAFX_SIDECAR_CHECKPOINT_DIR="relative-ckpt", **CKPT_ENV)
    path = first_checkpoint(s)
    assert path.is_absolute(), f"ACK checkpoint path {str(path)!r} is relative"
    assert path == tmp_path / "relative-ckpt" / "model_v000001.onnx"
    assert path.is_file()


def test_server_checkpoint_runs_in_onnxruntime_like_the_numpy_forward_pass(sidecar_factory):
    s = sidecar_factory(**CKPT_ENV)
    assert_ort_matches_numpy(first_checkpoint(s), N_FEATURES)


def test_restart_continues_numbering_and_keeps_old_checkpoints(sidecar_factory, tmp_path):
    s1 = sidecar_factory(workdir=tmp_path, **CKPT_ENV)
    v1 = first_checkpoint(s1, seed=0)
    v1_bytes, v1_sha = v1.read_bytes(), Path(str(v1) + ".sha256").read_bytes()
    assert s1.stop() == 0

    s2 = sidecar_factory(workdir=tmp_path, **CKPT_ENV)
    assert s2.checkpoint_dir == s1.checkpoint_dir
    acks = feed(s2.client(), np.random.default_rng(1), 64)
    assert all("checkpoint" not in a for a in acks[:-1])
    v2 = Path(acks[-1]["checkpoint"])
    assert v2 == s2.checkpoint_dir / "model_v000002.onnx"
    assert v1.read_bytes() == v1_bytes
    assert Path(str(v1) + ".sha256").read_bytes() == v1_sha
    assert checkpoint_files(s2.checkpoint_dir) == [
        ".trainer.lock", "latest.json", "latest.onnx", "latest.onnx.sha256",
        "model_v000001.json", "model_v000001.onnx", "model_v000001.onnx.sha256",
        "model_v000002.json", "model_v000002.onnx", "model_v000002.onnx.sha256", "quarantine"]
    assert_sha256_file_verifies(v2)
    meta = metadata(onnx.load(str(v2)))
    assert meta["version"] == "2"


# ---- base models ----

def test_checkpoint_loads_as_base_model(sidecar_factory, tmp_path):
    # A base that is clearly not what a fresh server would build: another seed and width, and trained.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    s1 = sidecar_factory(workdir=tmp_path / "a", VMAFX_SIDECAR_SEED="7", VMAFX_SIDECAR_HIDDEN="24",
                         VMAFX_SIDECAR_LR="0.01", VMAFX_SIDECAR_EMA_DECAY="0.5", **CKPT_ENV)
    base = first_checkpoint(s1)
    assert s1.stop() == 0

    x = np.random.default_rng(5).uniform(0, 1, (256, N_FEATURES)).astype(np.float32)
    base_scores = ort_scores(base, x)
    fresh = vmafx_sidecar.MLP.initial([N_FEATURES, 24, 1], vmafx_sidecar.Activation("relu"),
                                       np.random.default_rng(0))
    assert np.max(np.abs(fresh.forward(x) - base_scores)) > 1e-2, "base is indistinguishable from a fresh model"

    s2 = sidecar_factory(workdir=tmp_path / "b", VMAFX_BASE_MODEL_PATH=str(base), VMAFX_SIDECAR_LR="1e-12",
                         VMAFX_SIDECAR_CKPT_INTERVAL_S="0", VMAFX_SIDECAR_MIN_SAMPLES_CKPT="16",
                         VMAFX_SIDECAR_GATE="off")  # as CKPT_ENV: the checkpoint is what is looked at
    client = s2.client()
    status = client.request({"op": "status"})
    assert status["steps"] == 0
    assert status["model"] == f"{N_FEATURES}-24-1"
    acks = feed(client, np.random.default_rng(2), 16)
    assert all("checkpoint" not in a for a in acks[:-1])
    assert acks[-1]["step"] == 1
    after_one_step = Path(acks[-1]["checkpoint"])
    assert after_one_step == s2.checkpoint_dir / "model_v000001.onnx"
    diff = float(np.max(np.abs(ort_scores(after_one_step, x) - base_scores)))
    assert diff <= 1e-5, f"a step at lr 1e-12 moved the outputs by {diff}: the base was not loaded"


def test_deeper_base_model_is_trained_and_checkpointed_in_its_own_shape(sidecar_factory, tmp_path):
    base = tmp_path / "deep.onnx"
    layers = random_layers(np.random.default_rng(4), [N_FEATURES, 32, 16, 1])
    onnx.save(vmafx_onnx_builder.build_mlp_model(relu_mlp(layers), {}), str(base))
    s = sidecar_factory(VMAFX_BASE_MODEL_PATH=str(base), VMAFX_SIDECAR_CKPT_INTERVAL_S="0",
                        VMAFX_SIDECAR_MIN_SAMPLES_CKPT="32", VMAFX_SIDECAR_LR="0.01",
                        VMAFX_SIDECAR_GATE="off")  # as CKPT_ENV: the checkpoint's shape is what is looked at
    client = s.client()
    assert client.request({"op": "status"})["model"] == f"{N_FEATURES}-32-16-1"
    acks = feed(client, np.random.default_rng(0), 32)
    assert all(a["ok"] and np.isfinite(a.get("loss", 0.0)) for a in acks)
    path = Path(acks[-1]["checkpoint"])
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    read = vmafx_onnx_builder.read_mlp_model(model).layers
    assert [w.shape for w, _ in read] == [(N_FEATURES, 32), (32, 16), (16, 1)]
    assert any(not np.array_equal(w, w0) for (w, _), (w0, _) in zip(read, layers)), "no step changed the weights"
    assert_ort_matches_numpy(model, N_FEATURES)


def test_base_model_with_other_feature_count_stops_startup(tmp_path):
    path = tmp_path / "base40.onnx"
    model = vmafx_onnx_builder.build_mlp_model(relu_mlp(random_layers(np.random.default_rng(0), [40, 16, 1])), {})
    onnx.save(model, str(path))
    done = run_serve(tmp_path, VMAFX_BASE_MODEL_PATH=str(path))
    assert done.returncode != 0, done.stderr
    assert re.search(r"\b40\b", done.stderr) and re.search(r"\b80\b", done.stderr), done.stderr
    assert "VMAFX_SIDECAR_N_FEATURES" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "never.sock").exists()


@pytest.mark.parametrize("content", [b"this is not an onnx model\n" * 3, bytes(range(256)) * 4],
                         ids=["text", "binary"])
def test_garbage_base_model_stops_startup_with_a_clear_message(tmp_path, content):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(content)
    done = run_serve(tmp_path, VMAFX_BASE_MODEL_PATH=str(path))
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "base model" in lines[0] and str(path) in lines[0], done.stderr
    assert not (tmp_path / "never.sock").exists()


def test_missing_base_model_starts_fresh_with_a_warning(sidecar_factory, tmp_path):
    missing = tmp_path / "no-such-model.onnx"
    s = sidecar_factory(VMAFX_BASE_MODEL_PATH=str(missing))
    warnings = [line for line in s.stderr().splitlines() if "WARNING" in line and str(missing) in line]
    assert warnings, s.stderr()
    status = s.client().request({"op": "status"})
    assert status["steps"] == 0
    assert status["model"] == f"{N_FEATURES}-64-1"


# ---- vmafx_onnx_builder on its own ----

@pytest.mark.parametrize("sizes", [[80, 1], [80, 64, 1], [80, 32, 16, 1], [13, 7, 5, 3, 1]],
                         ids=["no-hidden", "1-hidden", "2-hidden", "3-hidden"])
def test_built_model_reads_back_exactly_and_matches_onnxruntime(sizes):
    layers = random_layers(np.random.default_rng(len(sizes)), sizes)
    model = vmafx_onnx_builder.build_mlp_model(relu_mlp(layers), {"version": "9"})
    onnx.checker.check_model(model, full_check=True)
    assert metadata(model) == {"version": "9"}

    read = vmafx_onnx_builder.read_mlp_model(model).layers
    assert len(read) == len(layers)
    for (w, b), (w0, b0) in zip(read, layers):
        assert w.dtype == np.float32 and b.dtype == np.float32
        assert w.shape == w0.shape and b.shape == b0.shape
        assert np.array_equal(w, w0) and np.array_equal(b, b0)
    # And through serialization, as the sidecar writes and reads files.
    reread = vmafx_onnx_builder.read_mlp_model(onnx.load_from_string(model.SerializeToString())).layers
    assert all(np.array_equal(w, w0) and np.array_equal(b, b0) for (w, b), (w0, b0) in zip(reread, layers))

    assert_ort_matches_numpy(model, sizes[0], seed=len(sizes))


def gemm(name: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    return helper.make_node("Gemm", inputs, [output], name=name, **attrs)


def make_graph_model(nodes, initializers: dict[str, np.ndarray], outputs: dict[str, int],
                     extra_inputs: dict[str, tuple] | None = None, n_features: int = 6) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", n_features])]
    for name, shape in (extra_inputs or {}).items():
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
    graph = helper.make_graph(
        nodes, "test",
        inputs,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", units]) for n, units in outputs.items()],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in initializers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _weights(rng, *shapes_by_name) -> dict[str, np.ndarray]:
    return {name: rng.normal(0, 0.3, shape) for name, shape in shapes_by_name}


def unsupported_models() -> dict[str, onnx.ModelProto]:
    rng = np.random.default_rng(0)
    two_layers = _weights(rng, ("W0", (6, 4)), ("b0", (4,)), ("W1", (4, 1)), ("b1", (1,)))
    relu = helper.make_node("Relu", ["d0"], ["r0"], name="relu0")
    last = gemm("gemm1", ["r0", "W1", "b1"], "score")
    return {
        "gemm-transA": make_graph_model(
            [gemm("gemm0", ["features", "W0", "b0"], "d0", transA=1), relu, last],
            {**two_layers, "W0": rng.normal(0, 0.3, (6, 4))}, {"score": 1}, n_features=6),
        "two-output-units": make_graph_model(
            [gemm("gemm0", ["features", "W0", "b0"], "d0"), relu, last],
            {**two_layers, "W1": rng.normal(0, 0.3, (4, 2)), "b1": rng.normal(0, 0.3, (2,))}, {"score": 2}),
        "weight-is-a-graph-input": make_graph_model(
            [gemm("gemm0", ["features", "W0", "b0"], "d0"), relu, last],
            {k: v for k, v in two_layers.items() if k != "W0"}, {"score": 1}, extra_inputs={"W0": (6, 4)}),
        "ends-with-relu": make_graph_model(
            [gemm("gemm0", ["features", "W0", "b0"], "d0"), relu, gemm("gemm1", ["r0", "W1", "b1"], "d1"),
             helper.make_node("Relu", ["d1"], ["score"], name="relu1")], two_layers, {"score": 1}),
        "two-relus-in-a-row": make_graph_model(
            [gemm("gemm0", ["features", "W0", "b0"], "d0"), relu, helper.make_node("Relu", ["r0"], ["r1"], name="r1"),
             gemm("gemm1", ["r1", "W1", "b1"], "score")], two_layers, {"score": 1}),
        "side-branch": make_graph_model(
            [gemm("gemm0", ["features", "W0", "b0"], "d0"), relu, last,
             helper.make_node("Neg", ["features"], ["neg"], name="neg")], two_layers, {"score": 1}),
        "two-graph-outputs": make_graph_model(
            [gemm("gemm0", ["features", "W0", "b0"], "d0"), relu, last], two_layers, {"score": 1, "d0": 4}),
        "layer-sizes-do-not-chain": make_graph_model(
            [gemm("gemm0", ["features", "W0", "b0"], "d0"), relu, last],
            {**two_layers, "W1": rng.normal(0, 0.3, (5, 1))}, {"score": 1}),
    }


def supported_variants() -> dict[str, onnx.ModelProto]:
    """Gemm forms and activations torch exports, beyond the sidecar's own checkpoint graph."""
    rng = np.random.default_rng(0)
    two_layers = _weights(rng, ("W0", (6, 4)), ("b0", (4,)), ("W1", (4, 1)), ("b1", (1,)))
    relu = helper.make_node("Relu", ["d0"], ["r0"], name="relu0")
    last = gemm("gemm1", ["r0", "W1", "b1"], "score")
    return {
        "sigmoid-between-gemms": make_graph_model(
            [gemm("gemm0", ["features", "W0", "b0"], "d0"), helper.make_node("Sigmoid", ["d0"], ["r0"], name="sig"),
             last], two_layers, {"score": 1}),
        "gemm-alpha-2": make_graph_model(
            [gemm("gemm0", ["features", "W0", "b0"], "d0", alpha=2.0), relu, last], two_layers, {"score": 1}),
        "gemm-beta-0.5": make_graph_model(
            [gemm("gemm0", ["features", "W0", "b0"], "d0"), relu, gemm("gemm1", ["r0", "W1", "b1"], "score", beta=0.5)],
            two_layers, {"score": 1}),
        "gemm-without-bias": make_graph_model(
            [gemm("gemm0", ["features", "W0"], "d0"), relu, last], two_layers, {"score": 1}),
    }


SUPPORTED = supported_variants()


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_read_mlp_model_reads_gemm_variants_exactly(name):
    model = SUPPORTED[name]
    onnx.checker.check_model(model, full_check=True)
    assert_ort_matches_numpy(model, 6)


UNSUPPORTED = unsupported_models()
# read_mlp_model's contract: the error names the offending node.
NAMES_NODE = {"gemm-transA": "gemm0", "two-relus-in-a-row": "r1", "side-branch": "neg",
              "weight-is-a-graph-input": "W0"}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_read_mlp_model_refuses_unsupported_graphs(name):
    model = UNSUPPORTED[name]
    onnx.checker.check_model(model)  # a valid ONNX model, just not one the sidecar can train
    with pytest.raises(vmafx_onnx_builder.UnsupportedModelError) as error:
        vmafx_onnx_builder.read_mlp_model(model)
    if name in NAMES_NODE:
        assert re.search(rf"\b{NAMES_NODE[name]}\b", str(error.value)), str(error.value)


def test_read_mlp_model_accepts_transposed_gemm_weights():
    rng = np.random.default_rng(3)
    layers = random_layers(rng, [6, 4, 1])
    inits = {"W0t": layers[0][0].T.copy(), "b0": layers[0][1], "W1": layers[1][0], "b1": layers[1][1]}
    model = make_graph_model(
        [gemm("gemm0", ["features", "W0t", "b0"], "d0", transB=1), helper.make_node("Relu", ["d0"], ["r0"]),
         gemm("gemm1", ["r0", "W1", "b1"], "score")], inits, {"score": 1})
    onnx.checker.check_model(model, full_check=True)
    read = vmafx_onnx_builder.read_mlp_model(model).layers
    assert np.array_equal(read[0][0], layers[0][0]) and np.array_equal(read[1][0], layers[1][0])
    assert_ort_matches_numpy(model, 6)


# ---- CheckpointWriter: atomic writes and recovery from a crash ----

@pytest.mark.parametrize("failing_call", [1, 2, 3], ids=["replace-of-onnx", "replace-of-json", "replace-of-sha256"])
def test_failed_write_leaves_no_temp_files_and_no_sha256(tmp_path, monkeypatch, failing_call):
    directory = tmp_path / "ckpt"
    writer = vmafx_sidecar.CheckpointWriter(str(directory))
    layers = random_layers(np.random.default_rng(0), [N_FEATURES, 8, 1])
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst, **kwargs):
        calls.append((src, dst))
        if len(calls) == failing_call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError):
        vmafx_sidecar.write_checkpoint(writer, relu_mlp(layers), 3, 48, UNGATED, PROBE)
    assert len(calls) == failing_call
    assert writer.version == 0
    assert temp_files(directory) == []
    assert os.listdir(directory) == ["quarantine"]  # not even an .onnx without its .sha256

    monkeypatch.setattr(os, "replace", real_replace)
    path = vmafx_sidecar.write_checkpoint(writer, relu_mlp(layers), 4, 64, UNGATED, PROBE).path
    assert path == directory / "model_v000001.onnx"
    assert writer.version == 1
    assert_sha256_file_verifies(path)
    assert metadata(onnx.load(str(path)))["step"] == "4"
    assert temp_files(directory) == []


def refused_fsync(directory: Path) -> None:
    raise OSError(errno.EIO, "Input/output error")


def os_error(number: int, filename: str | None = None):
    raise OSError(number, os.strerror(number), filename)


def refused_write():
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_quarantined_checkpoint_whose_directory_fsync_is_refused_is_not_said_to_be_retried(tmp_path, monkeypatch,
                                                                                             caplog):
    """The writer said "(retried until it takes it)", as for a published one, yet nothing names a quarantined
    checkpoint, and nothing tried that fsync again (the words hunt)."""
    writer = vmafx_sidecar.CheckpointWriter(str(tmp_path / "ckpt"))
    monkeypatch.setattr(vmafx_sidecar, "fsync_directory", refused_fsync)
    layers = random_layers(np.random.default_rng(0), [N_FEATURES, 8, 1])
    vmafx_sidecar.write_checkpoint(writer, relu_mlp(layers), 1, 16, REFUSED, PROBE)
    assert "checkpoint v000001 is in quarantine/, but the disk refused that directory's fsync (not retried)" in \
        caplog.text and "retried until" not in caplog.text
    assert writer.unpointed is None and writer.failures == 1


def test_a_published_version_is_never_rewritten_after_a_failed_directory_fsync(tmp_path, monkeypatch):
    # Both files are renamed into place before the directory fsync; if that fsync fails, readers
    # may already have seen (and loaded) the complete pair, so the number must not be reused
    # for other weights, just as "a restart never overwrites".
    directory = tmp_path / "ckpt"
    writer = vmafx_sidecar.CheckpointWriter(str(directory))
    rng = np.random.default_rng(0)
    first, second = random_layers(rng, [N_FEATURES, 8, 1]), random_layers(rng, [N_FEATURES, 8, 1])
    real_fsync_directory = vmafx_sidecar.fsync_directory
    monkeypatch.setattr(vmafx_sidecar, "fsync_directory", refused_fsync)
    try:
        vmafx_sidecar.write_checkpoint(writer, relu_mlp(first), 1, 16, UNGATED, PROBE)
    except OSError:
        pass
    monkeypatch.setattr(vmafx_sidecar, "fsync_directory", real_fsync_directory)
    v1 = directory / "model_v000001.onnx"
    published = {n: (directory / n).read_bytes() for n in os.listdir(directory)  # the pointer moves on
                 if (directory / n).is_file() and n != "latest.json"}
    assert temp_files(directory) == []

    path = vmafx_sidecar.write_checkpoint(writer, relu_mlp(second), 2, 32, UNGATED, PROBE).path
    for name, content in published.items():
        assert (directory / name).read_bytes() == content, f"{name} was rewritten with other content"
    if v1.name + ".sha256" in published:
        assert path == directory / "model_v000002.onnx"
    assert_sha256_file_verifies(path)


def test_a_checkpoint_in_place_when_its_directory_fsync_is_refused_is_the_incumbent(tmp_path, monkeypatch):
    """Readers may load a checkpoint as soon as its .sha256 is renamed into place: a refused fsync after that
    counts as a write failure, and the trainer judges its next candidates against it, not against the model
    before it; latest.json names it with the next checkpoint."""
    trainer = make_trainer(tmp_path, n_features=4, hidden=4, batch_size=4, replay_mix=0.0, replay_capacity=16,
                           gate="off", min_samples_ckpt=8, ckpt_interval_s=0.0)
    rng = np.random.default_rng(5)

    def until_version(version: int) -> None:
        while trainer.checkpoints.version < version:
            trainer.ingest(rng.uniform(0, 1, 4).astype(np.float32), np.float32(rng.uniform(20, 90)), False, True)

    until_version(1)
    monkeypatch.setattr(vmafx_sidecar, "fsync_directory", refused_fsync)
    until_version(2)
    monkeypatch.undo()
    assert trainer.checkpoint_results == {"published": 2} and trainer.checkpoints.failures == 1
    v2 = vmafx_sidecar.MLP.from_weights(vmafx_onnx_builder.read_mlp_model(onnx.load(tmp_path / "model_v000002.onnx")))
    np.testing.assert_array_equal(trainer.incumbent.flat, v2.flat)
    assert trainer.checkpoints.latest["version"] == 1  # not pointed at yet
    until_version(3)
    assert trainer.checkpoints.latest["version"] == 3 and trainer.checkpoints.failures == 1


def test_writer_removes_leftover_temp_files_and_continues_after_highest_version(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    leftovers = [".model_v000003.onnx.tmp", ".model_v000003.onnx.sha256.tmp"]
    for name in leftovers:
        (directory / name).write_bytes(b"half a checkpoint")
    kept = {
        "model_v000005.onnx": b"five",
        "model_v000005.onnx.sha256": b"not checked here\n",
        ".keep": b"",
        "notes.txt": b"not a checkpoint",
    }
    for name, content in kept.items():
        (directory / name).write_bytes(content)
    (directory / "model_v000007.onnx").write_bytes(b"seven, its .sha256 never written")

    writer = vmafx_sidecar.CheckpointWriter(str(directory))
    for name in leftovers:
        assert not (directory / name).exists(), f"{name} was not removed"
    assert writer.version == 7
    for name, content in kept.items():
        assert (directory / name).read_bytes() == content, f"{name} was touched"
    # never published whole: quarantined, with the .sha256 of what it holds, its number still taken
    assert not (directory / "model_v000007.onnx").exists()
    assert (directory / "quarantine" / "model_v000007.onnx").read_bytes() == b"seven, its .sha256 never written"
    assert_sha256_file_verifies(directory / "quarantine" / "model_v000007.onnx")
    assert vmafx_sidecar.CheckpointWriter(str(directory)).version == 7

    weights = relu_mlp(random_layers(np.random.default_rng(0), [N_FEATURES, 8, 1]))
    path = vmafx_sidecar.write_checkpoint(writer, weights, 1, 16, UNGATED, PROBE).path
    assert path == directory / "model_v000008.onnx"
    assert_sha256_file_verifies(path)
    assert metadata(onnx.load(str(path)))["version"] == "8"
    assert temp_files(directory) == [".keep"]


def test_a_quarantined_checkpoint_its_retention_was_deleting_is_deleted_at_the_next_start(tmp_path):
    directory = tmp_path / "ckpt"
    quarantine = directory / "quarantine"
    quarantine.mkdir(parents=True)
    for version in (2, 5):
        (quarantine / f"model_v{version:06d}.onnx").write_bytes(b"refused")
    (quarantine / "model_v000005.onnx.sha256").write_text(f"{sha256_file(quarantine / 'model_v000005.onnx')}  "
                                                          "model_v000005.onnx\n")
    assert vmafx_sidecar.CheckpointWriter(str(directory)).version == 5
    assert sorted(n.name for n in quarantine.iterdir()) == ["model_v000005.onnx", "model_v000005.onnx.sha256"]


def test_a_directory_retention_cannot_list_does_not_make_a_published_checkpoint_a_failed_write(tmp_path,
                                                                                                monkeypatch):
    """Retention lists the directories after latest.json names the new checkpoint: a listing the disk refused (EIO,
    EACCES, a file where quarantine/ goes) made it "checkpoint write failed", the old incumbent still judged against
    while nodes served the new one."""
    trainer = make_trainer(tmp_path, n_features=3, hidden=4, batch_size=8, min_samples_ckpt=8, ckpt_interval_s=0,
                           gate="off")
    real_listdir = os.listdir

    def listdir(path="."):
        if Path(path) == tmp_path / "quarantine":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_listdir(path)
    monkeypatch.setattr(os, "listdir", listdir)
    rng = np.random.default_rng(0)
    result = None
    while not trainer.checkpoint_results:
        result = trainer.ingest(rng.uniform(0, 1, 3).astype(np.float32), np.float32(50), False, True)
    assert dict(trainer.checkpoint_results) == {"published": 1} and result.checkpoint is not None
    assert trainer.has_champion and trainer.last_gate["version"] == 1 and trainer.window.n == 0
    np.testing.assert_array_equal(trainer.incumbent.flat, trainer.champion.flat)


def test_a_full_disk_neither_stops_the_start_nor_leaves_a_partial_sha256_when_it_finishes_one(tmp_path,
                                                                                              monkeypatch):
    directory = tmp_path / "ckpt"
    (directory / "quarantine").mkdir(parents=True)
    (directory / "model_v000003.onnx").write_bytes(b"three, its .sha256 never written")
    real_write_synced = vmafx_sidecar.write_synced

    def full(path, *args, **kwargs):
        if ".sha256" in path.name:
            path.write_bytes(b"")  # what a full disk leaves of it
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_synced(path, *args, **kwargs)
    monkeypatch.setattr(vmafx_sidecar, "write_synced", full)
    assert vmafx_sidecar.CheckpointWriter(str(directory)).version == 3
    assert not (directory / "quarantine" / "model_v000003.onnx.sha256").exists()
    monkeypatch.undo()
    assert vmafx_sidecar.CheckpointWriter(str(directory)).version == 3
    assert_sha256_file_verifies(directory / "quarantine" / "model_v000003.onnx")


@pytest.mark.parametrize("published", [1, 2])
def test_a_bit_flipped_in_the_latest_checkpoints_record_keeps_it_the_latest(tmp_path, caplog, published):
    """Its model and .sha256 intact, latest.json holding the same record whole: the start rolled latest.* back to the
    checkpoint before, or with none before removed latest.json and latest.onnx, what nodes load (the flip hunt)."""
    directory = tmp_path / "ckpt"
    writer = vmafx_sidecar.CheckpointWriter(str(directory))
    rng = np.random.default_rng(0)
    for version in range(1, published + 1):
        vmafx_sidecar.write_checkpoint(writer, relu_mlp(random_layers(rng, [N_FEATURES, 8, 1])), version, 16,
                                       UNGATED, PROBE)
    served = {name: (directory / name).read_bytes() for name in ("latest.json", "latest.onnx", "latest.onnx.sha256")}
    record = directory / f"model_v{published:06d}.json"
    record.write_bytes(record.read_bytes().replace(b'"version"', b'"vession"'))
    started = vmafx_sidecar.CheckpointWriter(str(directory))
    assert started.latest["version"] == published and started.latest_model() is not None
    assert {name: (directory / name).read_bytes() for name in served} == served
    assert f"{record} cannot be read; latest.json holds its record whole" in caplog.text


def latest_behind(directory: Path) -> Path:
    """v1 and v2 published, latest.* as v1's publish left them: a kill between placing v2 and pointing at it."""
    writer = vmafx_sidecar.CheckpointWriter(str(directory))
    rng = np.random.default_rng(0)
    for version in (1, 2):
        vmafx_sidecar.write_checkpoint(writer, relu_mlp(random_layers(rng, [N_FEATURES, 8, 1])), version, 16,
                                       UNGATED, PROBE)
    for name in ("model_v000001.json", "model_v000001.onnx"):
        shutil.copyfile(directory / name, directory / name.replace("model_v000001", "latest"))
    (directory / "latest.onnx.sha256").write_text(f"{sha256_file(directory / 'latest.onnx')}  latest.onnx\n")
    return directory


def test_a_latest_onnx_sha256_of_bytes_that_are_not_text_is_reported_and_repaired(tmp_path, capsys):
    """Its non-UTF-8 bytes ended verify and every start in a UnicodeDecodeError: the sidecar never repaired the
    file, and restarted in a loop (the platform hunt)."""
    directory = tmp_path / "ckpt"
    writer = vmafx_sidecar.CheckpointWriter(str(directory))
    vmafx_sidecar.write_checkpoint(writer, relu_mlp(random_layers(np.random.default_rng(0), [N_FEATURES, 8, 1])),
                                   1, 16, UNGATED, PROBE)
    (directory / "latest.onnx.sha256").write_bytes(b"\xff\xfe garbage\n")
    assert vmafx_sidecar.verify_checkpoints(directory) == 1
    said = capsys.readouterr().out
    assert f"FAILED  {directory / 'latest.onnx'}" in said and "latest.onnx.sha256 is not the sha256" in said, said
    vmafx_sidecar.CheckpointWriter(str(directory))  # a start
    assert (directory / "latest.onnx.sha256").read_text() == f"{sha256_file(directory / 'latest.onnx')}  latest.onnx\n"
    assert vmafx_sidecar.verify_checkpoints(directory) == 0


def test_a_start_on_a_full_disk_with_latest_json_behind_serves_and_catches_up_later(tmp_path, monkeypatch):
    """latest.json a checkpoint behind (a kill between placing one and pointing at it, or a publish whose
    pointer update the disk refused) on a disk that is still full: the start had failed, in a loop, until space
    was freed. It starts with the newest published checkpoint as its incumbent, counts the refused write, and
    points latest.json and latest.onnx at it once the disk takes them; meanwhile what latest.json names, in the
    status and the metrics, is what it names on disk (the start said 2 while it named 1: the words hunt)."""
    directory = latest_behind(tmp_path / "ckpt")
    behind = {name: (directory / name).read_bytes() for name in ("latest.json", "latest.onnx", "latest.onnx.sha256")}
    monkeypatch.setattr(vmafx_sidecar, "write_synced", lambda *args, **kwargs: refused_write())
    started = vmafx_sidecar.CheckpointWriter(str(directory))
    assert started.incumbent_version() == 2 and started.latest["version"] == 1 and started.failures == 1
    v2 = vmafx_onnx_builder.read_mlp_model(onnx.load(directory / "model_v000002.onnx"))
    assert started.latest_model().flat.tobytes() == vmafx_sidecar.MLP.from_weights(v2).flat.tobytes()
    assert {name: (directory / name).read_bytes() for name in behind} == behind
    assert temp_files(directory) == []
    monkeypatch.undo()
    started.pointing_tried = 0.0
    started.point_latest_again()
    assert started.unpointed is None and started.latest["version"] == 2
    assert (directory / "latest.onnx").read_bytes() == (directory / "model_v000002.onnx").read_bytes()
    (directory / "latest.json").write_bytes(behind["latest.json"])  # behind again, for the start below
    vmafx_sidecar.CheckpointWriter(str(directory))  # a start once there is room
    assert json.loads((directory / "latest.json").read_text())["version"] == 2
    assert (directory / "latest.onnx").read_bytes() == (directory / "model_v000002.onnx").read_bytes()


@pytest.mark.parametrize("damage", ["a flipped byte", "a directory in its place"])
def test_latest_json_behind_a_damaged_checkpoint_stays_on_the_intact_one(tmp_path, caplog, damage):
    """A kill between placing v2 and pointing at it, and v2's model damaged since: latest.json was pointed at a file
    that fails its sha256, latest.onnx could not follow, and the gate lost v1 as its incumbent."""
    directory = latest_behind(tmp_path / "ckpt")
    model = directory / "model_v000002.onnx"
    if damage == "a flipped byte":
        model.write_bytes(model.read_bytes()[:-1] + bytes([model.read_bytes()[-1] ^ 0xFF]))
    else:
        model.unlink()
        model.mkdir()
    started = vmafx_sidecar.CheckpointWriter(str(directory))
    assert started.latest["version"] == 1 and json.loads((directory / "latest.json").read_text())["version"] == 1
    assert started.latest_model() is not None
    assert (directory / "latest.onnx").read_bytes() == (directory / "model_v000001.onnx").read_bytes()
    assert f"{model} is not the model its record names" in caplog.text


@pytest.mark.parametrize("odd", ["latest.onnx a directory, nothing published",
                                 "the model latest.json names a directory, latest.onnx damaged"])
def test_a_start_beside_an_odd_entry_it_cannot_tidy_serves_with_a_line_that_says_so(tmp_path, caplog, odd):
    """Both had stopped the start with a traceback."""
    directory = tmp_path / "ckpt"
    if odd.startswith("latest.onnx"):
        (directory / "latest.onnx").mkdir(parents=True)
    else:
        writer = vmafx_sidecar.CheckpointWriter(str(directory))
        vmafx_sidecar.write_checkpoint(writer, relu_mlp(random_layers(np.random.default_rng(0), [N_FEATURES, 8, 1])),
                                       1, 16, UNGATED, PROBE)
        (directory / "model_v000001.onnx").unlink()
        (directory / "model_v000001.onnx").mkdir()
        (directory / "latest.onnx").write_bytes(b"damaged")
    started = vmafx_sidecar.CheckpointWriter(str(directory))
    assert (started.latest is None) == odd.startswith("latest.onnx") and started.latest_model() is None
    said = "cannot remove" if odd.startswith("latest.onnx") else "cannot update"
    assert f"{said} {directory / 'latest.onnx'}" in caplog.text


def test_debris_of_a_crash_that_cannot_be_removed_stops_the_start_in_one_line(tmp_path, monkeypatch):
    """An unfinished checkpoint file whose removal the disk refused ended the start in a traceback (the strace
    hunt)."""
    (tmp_path / "ckpt").mkdir()
    debris = tmp_path / "ckpt" / f".model_v000001.onnx{vmafx_sidecar.TEMP_SUFFIX}"
    debris.write_bytes(b"half a model")
    unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda path, missing_ok=False: os_error(errno.EIO) if path == debris
                        else unlink(path, missing_ok))
    said = f"cannot remove {debris}: Input/output error"
    with pytest.raises(vmafx_sidecar.StartupError, match=f"^{re.escape(said)}"):
        vmafx_sidecar.CheckpointWriter(str(tmp_path / "ckpt"))


def test_a_checkpoint_file_the_disk_cannot_read_at_start_is_named_in_the_refusal(tmp_path, monkeypatch):
    """An I/O error on a checkpoint's file while latest.json was brought up to date was told as one on
    latest.json itself."""
    directory = tmp_path / "ckpt"
    writer = vmafx_sidecar.CheckpointWriter(str(directory))
    vmafx_sidecar.write_checkpoint(writer, relu_mlp(random_layers(np.random.default_rng(0), [N_FEATURES, 8, 1])),
                                   1, 16, UNGATED, PROBE)
    unreadable = directory / "model_v000001.onnx.sha256"
    exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda path: os_error(errno.EIO, str(path)) if path == unreadable
                        else exists(path))
    said = f"cannot update {directory / 'latest.json'}: Input/output error ({unreadable})"
    with pytest.raises(vmafx_sidecar.StartupError, match=f"^{re.escape(said)}$"):
        vmafx_sidecar.CheckpointWriter(str(directory))
    stray = tmp_path / "empty" / "latest.json"  # with nothing published, it is removed: an error there names it once
    stray.parent.mkdir()
    stray.write_text("{}")
    unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda path, missing_ok=False: os_error(errno.EIO, str(path)) if path == stray
                        else unlink(path, missing_ok))
    said = f"cannot update {stray}: Input/output error"
    with pytest.raises(vmafx_sidecar.StartupError, match=f"^{re.escape(said)}$"):
        vmafx_sidecar.CheckpointWriter(str(stray.parent))


def test_a_file_where_quarantine_goes_is_named_in_the_refusal(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "quarantine").write_text("not a directory")
    with pytest.raises(vmafx_sidecar.StartupError, match=f"^{re.escape(f'cannot use {tmp_path}/ckpt/quarantine: ')}"):
        vmafx_sidecar.CheckpointWriter(str(tmp_path / "ckpt"))


def test_a_refused_checkpoint_after_quarantine_was_removed_by_hand_is_placed_there_again(tmp_path):
    """Every refused candidate had failed as a write, until a restart, and its window had gone on growing."""
    directory = tmp_path / "ckpt"
    writer = vmafx_sidecar.CheckpointWriter(str(directory))
    rng = np.random.default_rng(0)
    vmafx_sidecar.write_checkpoint(writer, relu_mlp(random_layers(rng, [N_FEATURES, 8, 1])), 1, 16, UNGATED, PROBE)
    shutil.rmtree(directory / "quarantine")
    refused = vmafx_sidecar.write_checkpoint(writer, relu_mlp(random_layers(rng, [N_FEATURES, 8, 1])), 2, 32,
                                             REFUSED, PROBE)
    assert refused.path == directory / "quarantine" / "model_v000002.onnx"
    assert_sha256_file_verifies(refused.path)
    assert writer.latest["version"] == 1 and writer.failures == 0


def refuse_writes_of(monkeypatch, name: str) -> None:
    """write_whole refused (a full disk) for files named `name`, and for no other."""
    real_write_whole = vmafx_sidecar.write_whole

    def refused_for(path, content, mode=0o644):
        if path.name == name:
            refused_write()
        real_write_whole(path, content, mode)
    monkeypatch.setattr(vmafx_sidecar, "write_whole", refused_for)


def test_a_refused_update_of_latest_is_retried_until_the_disk_takes_it(tmp_path, monkeypatch):
    """A refusal between latest.onnx and its .sha256 left the two a publish apart until the next publish (hours,
    with the gate refusing candidates): a node that checks the .sha256 refused latest.onnx all that time."""
    directory = tmp_path / "ckpt"
    writer = vmafx_sidecar.CheckpointWriter(str(directory))
    rng = np.random.default_rng(0)
    vmafx_sidecar.write_checkpoint(writer, relu_mlp(random_layers(rng, [N_FEATURES, 8, 1])), 1, 16, UNGATED, PROBE)
    refuse_writes_of(monkeypatch, "latest.onnx.sha256")
    second = vmafx_sidecar.write_checkpoint(writer, relu_mlp(random_layers(rng, [N_FEATURES, 8, 1])), 2, 32,
                                            UNGATED, PROBE)
    assert (directory / "latest.onnx").read_bytes() == second.path.read_bytes()
    assert sha256_file(directory / "latest.onnx") not in (directory / "latest.onnx.sha256").read_text()
    assert writer.unpointed == second.record and writer.failures == 1
    writer.point_latest_again()  # within the second: not tried
    writer.pointing_tried = 0.0
    writer.point_latest_again()  # still refused: counted once, with the refusal that began it
    assert writer.unpointed == second.record and writer.failures == 1
    monkeypatch.undo()
    writer.pointing_tried = 0.0
    writer.point_latest_again()
    assert writer.unpointed is None and writer.latest == second.record
    assert json.loads((directory / "latest.json").read_text()) == second.record
    assert (directory / "latest.onnx.sha256").read_text() == f"{sha256_file(second.path)}  latest.onnx\n"
    # Out of descriptors for a moment: tried again, not given up.
    writer.unpointed, writer.pointing_tried = second.record, 0.0
    monkeypatch.setattr(vmafx_sidecar, "read_named_checkpoint", lambda *args: os_error(errno.EMFILE))
    writer.point_latest_again()
    assert writer.unpointed == second.record
    monkeypatch.undo()
    # One moved into quarantine/ by hand before the disk took the update is not pointed at: no retry for ever.
    writer.unpointed, writer.pointing_tried = dict(second.record, file="model_v000009.onnx"), 0.0
    writer.point_latest_again()
    assert writer.unpointed is None and writer.latest == second.record


def test_latest_json_never_names_a_model_latest_onnx_does_not_hold(tmp_path, monkeypatch):
    """latest.onnx is replaced before latest.json: written the other way round, a disk that refused latest.onnx
    left latest.json naming v2 while nodes loaded v1 from latest.onnx (mutation hunt)."""
    directory = tmp_path / "ckpt"
    writer = vmafx_sidecar.CheckpointWriter(str(directory))
    rng = np.random.default_rng(0)
    first = vmafx_sidecar.write_checkpoint(writer, relu_mlp(random_layers(rng, [N_FEATURES, 8, 1])), 1, 16, UNGATED,
                                           PROBE)
    refuse_writes_of(monkeypatch, "latest.onnx")
    second = vmafx_sidecar.write_checkpoint(writer, relu_mlp(random_layers(rng, [N_FEATURES, 8, 1])), 2, 32,
                                            UNGATED, PROBE)
    assert (directory / "latest.onnx").read_bytes() == first.path.read_bytes()
    assert json.loads((directory / "latest.json").read_text()) == first.record, "latest.json ran ahead of latest.onnx"
    assert writer.unpointed == second.record and writer.failures == 1


def test_a_refused_update_of_latest_is_not_retried_more_than_once_a_second(tmp_path, monkeypatch):
    """The loop calls point_latest_again() on every turn: without its once-a-second throttle, a full disk took a
    write of latest.* (and a read of the whole model) per loop turn (mutation hunt)."""
    writer = vmafx_sidecar.CheckpointWriter(str(tmp_path / "ckpt"))
    tried = []

    def refused_latest(path, content, mode=0o644):
        tried.append(path.name)
        refused_write()
    monkeypatch.setattr(vmafx_sidecar, "write_whole", refused_latest)
    vmafx_sidecar.write_checkpoint(writer, relu_mlp(random_layers(np.random.default_rng(0), [N_FEATURES, 8, 1])), 1,
                                   16, UNGATED, PROBE)
    assert writer.unpointed is not None and tried == ["latest.onnx"]
    for _ in range(1000):  # loop turns within well under a second
        writer.point_latest_again()
    assert tried == ["latest.onnx"], f"{len(tried) - 1} retries within a second"
    writer.pointing_tried -= 1.0
    writer.point_latest_again()
    assert tried == ["latest.onnx"] * 2


def test_a_newer_sidecars_latest_json_naming_the_newest_checkpoint_is_left_as_it_is(tmp_path, caplog):
    """An image rolled back beside a latest.json a newer sidecar wrote that names the newest checkpoint: it stands,
    and candidates face the base model; only one naming an older checkpoint than the newest is repointed, and with
    `<` for `<=` this one was rewritten in the older format too (mutation hunt)."""
    directory = tmp_path / "ckpt"
    writer = vmafx_sidecar.CheckpointWriter(str(directory))
    vmafx_sidecar.write_checkpoint(writer, relu_mlp(random_layers(np.random.default_rng(0), [N_FEATURES, 8, 1])), 1,
                                   16, UNGATED, PROBE)
    latest = directory / "latest.json"
    latest.write_text(json.dumps({**json.loads(latest.read_text()), "format": vmafx_sidecar.RECORD_FORMAT + 1}))
    written = latest.read_bytes()
    assert vmafx_sidecar.CheckpointWriter(str(directory)).latest is None
    assert latest.read_bytes() == written
    assert "written by a newer sidecar: left as it is" in caplog.text


def test_a_checkpoints_sha256_is_renamed_into_place_after_its_model_and_record(tmp_path, monkeypatch):
    """A reader that sees a checkpoint's .sha256 trusts it whole: renamed first, the .sha256 named a model and a
    record not yet there, and a kill between the renames left a "published" checkpoint without them (mutation
    hunt)."""
    directory = tmp_path / "ckpt"
    writer = vmafx_sidecar.CheckpointWriter(str(directory))
    real_replace = os.replace
    present_with_sha256 = []

    def replace(src, dst, **kwargs):
        if Path(dst) == directory / "model_v000001.onnx.sha256":
            present_with_sha256.append(sorted(n for n in os.listdir(directory) if n.startswith("model_v")))
        return real_replace(src, dst, **kwargs)
    monkeypatch.setattr(os, "replace", replace)
    vmafx_sidecar.write_checkpoint(writer, relu_mlp(random_layers(np.random.default_rng(0), [N_FEATURES, 8, 1])), 1,
                                   16, UNGATED, PROBE)
    assert present_with_sha256 == [["model_v000001.json", "model_v000001.onnx"]]


def test_a_checkpoint_whose_sha256_is_gone_is_not_published(tmp_path):
    """is_published() decides whether a newer sidecar's latest.json stands and whether a saved champion is kept: a
    model whose .sha256 is gone (retention deletes it first) is not whole, and it was counted on its model alone
    (mutation hunt)."""
    directory = tmp_path / "ckpt"
    writer = vmafx_sidecar.CheckpointWriter(str(directory))
    vmafx_sidecar.write_checkpoint(writer, relu_mlp(random_layers(np.random.default_rng(0), [N_FEATURES, 8, 1])), 1,
                                   16, UNGATED, PROBE)
    assert writer.is_published(1) and not writer.is_published(2)
    (directory / "model_v000001.onnx.sha256").unlink()
    assert (directory / "model_v000001.onnx").exists()
    assert not writer.is_published(1)


@pytest.mark.parametrize("crash", ["placing, after the model", "placing, after the record",
                                   "retention, after the .sha256", "retention, after the record"])
def test_a_checkpoint_a_crash_left_without_its_sha256_is_finished_at_the_next_start(tmp_path, crash):
    """Being placed, it was never published: quarantined, with the .sha256 of what it holds. Being deleted by
    retention (older than a published one), it is deleted."""
    directory = tmp_path / "ckpt"
    writer = vmafx_sidecar.CheckpointWriter(str(directory))
    rng = np.random.default_rng(3)
    for seed in (1, 2):
        vmafx_sidecar.write_checkpoint(writer, relu_mlp(random_layers(rng, [N_FEATURES, 8, 1])), seed, seed * 10,
                                       UNGATED, rng.uniform(0, 1, (4, N_FEATURES)).astype(np.float32))
    left = {"placing, after the model": [".sha256", ".json"], "placing, after the record": [".sha256"],
            "retention, after the .sha256": [".sha256"], "retention, after the record": [".sha256", ".json"]}[crash]
    version = 2 if crash.startswith("placing") else 1  # retention deletes the oldest; placing writes the newest
    if version == 2:
        (directory / "latest.json").write_bytes((directory / "model_v000001.json").read_bytes())
    for suffix in left:
        (directory / f"model_v{version:06d}{'.onnx' if suffix == '.sha256' else ''}{suffix}").unlink()
    again = vmafx_sidecar.CheckpointWriter(str(directory))
    assert not list(directory.glob(f"model_v{version:06d}*"))
    if version == 2:
        assert_sha256_file_verifies(directory / "quarantine" / f"model_v{version:06d}.onnx")
    else:
        assert not list((directory / "quarantine").iterdir())
    assert again.version == 2 and again.latest["version"] == 3 - version
    done = subprocess.run([sys.executable, "-m", "vmafx_sidecar", "verify", str(directory)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
