"""End to end: a stream of samples of a learnable target, through the socket, produces a
checkpoint that predicts held-out samples far better than the model the server started from, and the
gate publishes it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort

from conftest import Client

N_FEATURES = 80
N_STREAM = 3000
N_HELD_OUT = 500


def learnable_data() -> tuple[np.ndarray, np.ndarray]:
    """A smooth VMAF-like target in (30, 90), the same one `vmafx_sidecar demo` streams."""
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, N_FEATURES)
    x = rng.uniform(0, 1, (N_STREAM + N_HELD_OUT, N_FEATURES))
    y = 60 + 30 * np.tanh((x - 0.5) @ w / 3)
    return x, y


def held_out_mse(checkpoint: Path, x: np.ndarray, y: np.ndarray) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(checkpoint), options, providers=["CPUExecutionProvider"])
    (scores,) = session.run(["score"], {"features": x.astype(np.float32)})
    assert scores.shape == (len(x), 1)
    return float(np.mean((scores[:, 0].astype(np.float64) - y) ** 2))


def records(checkpoint_dir: Path) -> dict[int, dict]:
    """Every checkpoint's record by version, published or quarantined."""
    paths = [*checkpoint_dir.glob("model_v*.json"), *checkpoint_dir.glob("quarantine/model_v*.json")]
    return {record["version"]: record for record in (json.loads(p.read_text()) for p in paths)}


def rule_holds(metrics: dict, min_eval: int, max_drop: float) -> bool:
    """The gate's rule on a record's scores: on each set with min_eval samples or more, R² > 2/√n and a PLCC
    within max_drop of the best reference's; and at least one such set."""
    judged = [metrics[name] for name in ("window", "history") if metrics[name]["n"] >= min_eval]
    return bool(judged) and all(holds_on(evidence, max_drop) for evidence in judged)


def holds_on(evidence: dict, max_drop: float) -> bool:
    ours = evidence["candidate"]
    references = [s["plcc"] for name, s in evidence.items() if name not in ("n", "held_out", "candidate") and s]
    return ours["r2"] > 2 / math.sqrt(evidence["n"]) and all(ours["plcc"] >= plcc - max_drop for plcc in references)


def stream(client: Client, x: np.ndarray, y: np.ndarray) -> list[dict]:
    acks = []
    for i in range(len(x)):
        ack = client.request({"job_id": f"job-{i}", "features": x[i].tolist(), "true_score": float(y[i])})
        assert ack["ok"] is True and ack["job_id"] == f"job-{i}", ack
        acks.append(ack)
    return acks


def test_streamed_samples_train_a_checkpoint_that_beats_the_initial_model(sidecar_factory, tmp_path):
    x, y = learnable_data()
    stream_x, stream_y = x[:N_STREAM], y[:N_STREAM]
    held_x, held_y = x[N_STREAM:], y[N_STREAM:]

    # The initial model, as the server builds it (same seed, width and feature count as below):
    # a server whose one step at lr 1e-12 leaves the EMA weights at their initial values to
    # float32 rounding checkpoints it after 16 samples. Asking the server, instead of rebuilding
    # MLP.initial here, keeps the baseline honest if the initialisation ever changes. The gate off: that
    # checkpoint is a copy of the initial model, not a candidate.
    (tmp_path / "initial").mkdir()
    snapshot = sidecar_factory(workdir=tmp_path / "initial", VMAFX_SIDECAR_LR="1e-12",
                               VMAFX_SIDECAR_CKPT_INTERVAL_S="0", VMAFX_SIDECAR_MIN_SAMPLES_CKPT="16",
                               VMAFX_SIDECAR_GATE="off")
    acks = stream(snapshot.client(), stream_x[:16], stream_y[:16])
    initial_checkpoint = Path(acks[-1]["checkpoint"])
    assert snapshot.stop() == 0
    initial_mse = held_out_mse(initial_checkpoint, held_x, held_y)

    (tmp_path / "train").mkdir()
    s = sidecar_factory(workdir=tmp_path / "train", VMAFX_SIDECAR_LR="0.05", VMAFX_SIDECAR_EMA_DECAY="0.95",
                        VMAFX_SIDECAR_CKPT_INTERVAL_S="0", VMAFX_SIDECAR_MIN_SAMPLES_CKPT="500")
    client = s.client()
    assert client.request({"op": "status"})["model"] == f"{N_FEATURES}-64-1"
    acks = stream(client, stream_x, stream_y)
    checkpoints = [Path(a["checkpoint"]) for a in acks if "checkpoint" in a]
    status = client.request({"op": "status"})
    assert status["steps"] == N_STREAM // 16 and status["steps_skipped"] == 0

    # 16 new samples a step: the first step with >= 500 new samples is every 32nd (512 samples), and each
    # checkpoint is judged on a window of those 512, more than GATE_MIN_EVAL (200 by default).
    written = records(s.checkpoint_dir)
    assert sorted(written) == [1, 2, 3, 4, 5]
    assert all(record["metrics"]["window"]["n"] == 512 for record in written.values())
    for record in written.values():  # each verdict is the rule applied to the scores it records
        assert (record["gate"] == "passed") == rule_holds(record["metrics"], 200, 0.005), record
    # The ACKs name exactly the published checkpoints, in order.
    published = [v for v, record in sorted(written.items()) if record["gate"] == "passed"]
    assert [p.name for p in checkpoints] == [f"model_v{v:06d}.onnx" for v in published]
    assert all(p.is_file() for p in checkpoints)
    # A fresh model starts near the mean (in standardized coordinates), and the first window holds its
    # predictions from before it learned: no better than their mean (R² -0.14 to +0.02 over the seeds tried,
    # below the floor 2/√512 = 0.088), so it is quarantined for its R². The last one, trained on 2560 samples
    # (window R² 0.94-0.97), is published.
    assert written[1]["gate"] == "quarantined" and written[1]["reason"].startswith("window: R²"), written[1]
    assert published[-1] == 5, {v: record["reason"] for v, record in written.items()}

    final_mse = held_out_mse(checkpoints[-1], held_x, held_y)
    variance = float(np.var(held_y))
    report = f"held-out MSE: initial {initial_mse:.1f}, last checkpoint {final_mse:.1f}, target variance {variance:.1f}"
    print(report)
    assert np.isfinite(final_mse), report
    # The initial model predicts near the first batch's mean, so initial_mse is about the variance: a
    # fifth of it is a held-out R² of about 0.8 (0.95-0.976 over the seeds tried: ratios 0.024-0.051).
    assert final_mse < 0.2 * initial_mse, report
    assert final_mse < variance, report  # it beats always predicting the mean
