"""The stability gate end to end, against a real server: a clean stream publishes checkpoints and
latest.json follows them; a burst of inverted scores makes the next candidate regress on the held-out
set, so it is quarantined and latest.json keeps naming the last good checkpoint, across a restart in the
middle of the burst too; once clean data returns and the model recovers, publishing resumes, numbered
after the quarantined ones.

Training is chaotic: on another CPU or numpy version float sums round differently and the same stream
trains different weights. So this test asserts properties that hold for any such run, never a figure one
run produced. Beside the verdicts it recomputes every gate record from the files: the held-out set from
the job_ids sent, each model from its checkpoint, so the record's metrics and its verdict are checked
exactly whatever the weights came out as."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import vmafx_onnx_builder as onnx_builder
import vmafx_sidecar as sidecar_module
from conftest import Client, Sidecar, run_cli

N_FEATURES = 8
MIN_EVAL = 100
HOLDOUT_FRACTION = 0.2
SEEDS = dict(weights=1, stream=2, test_set=3, server=0)  # every random stream of this test
# Small and fast, so checkpoints come often: batch 16 = 8 new + 8 replayed samples a step, and a
# checkpoint is due every 40 steps (320 new samples trained, about 400 sent: a fifth is held out).
# A large learning rate (momentum 0.9, gradients clipped to norm 1) learns the target in a few hundred
# samples and lets one checkpoint interval of inverted scores turn the model around; EMA decay 0.5 makes
# the candidate follow the live weights within a few steps. The small replay ring (256) forgets the burst
# soon after clean data returns. The eval ring (2000) never fills here, so it keeps every held-out
# sample, the burst's too.
# MAX_PLCC_DROP sits far from both sides of what it separates, in every seed and CPU tried: a clean
# candidate's held-out PLCC wobbles by a small fraction of it, and a candidate trained on one interval of
# inverted scores falls by several times it.
MAX_PLCC_DROP = 0.1
SETTINGS = dict(
    VMAFX_SIDECAR_N_FEATURES=str(N_FEATURES),
    VMAFX_SIDECAR_HIDDEN="16",
    VMAFX_SIDECAR_SEED=str(SEEDS["server"]),
    VMAFX_SIDECAR_BATCH_SIZE="16",
    VMAFX_SIDECAR_REPLAY_MIX="0.5",
    VMAFX_SIDECAR_REPLAY_CAPACITY="256",
    VMAFX_SIDECAR_LR="0.2",
    VMAFX_SIDECAR_WARMUP_STEPS="10",
    VMAFX_SIDECAR_EMA_DECAY="0.5",
    VMAFX_SIDECAR_CKPT_INTERVAL_S="0",
    VMAFX_SIDECAR_MIN_SAMPLES_CKPT="320",
    VMAFX_SIDECAR_HOLDOUT_FRACTION=str(HOLDOUT_FRACTION),
    VMAFX_SIDECAR_EVAL_CAPACITY="2000",
    VMAFX_SIDECAR_GATE="on",
    VMAFX_SIDECAR_GATE_MIN_EVAL=str(MIN_EVAL),
    VMAFX_SIDECAR_GATE_MAX_PLCC_DROP=str(MAX_PLCC_DROP),
    VMAFX_SIDECAR_KEEP_CHECKPOINTS="0",  # keep every published checkpoint, to check them all at the end
)
N_CLEAN = 3000  # first clean phase: ~600 held-out samples, ~7 checkpoints
BURST_LIMIT = 1000  # each part of the burst lasts until the next checkpoint; one interval is ~400 samples
RECOVERY_LIMIT = 4000  # clean samples allowed after the burst until publishing resumes
LEARNED_PLCC = 0.9  # a model that has learned the target, with wide slack: a smooth function, 16 units
WEIGHTS = np.random.default_rng(SEEDS["weights"]).normal(0, 1, N_FEATURES)


def target(x: np.ndarray) -> np.ndarray:
    """A smooth VMAF-like score in (30, 90), symmetric around 60 (test_learning's target, for 8 features)."""
    return 60 + 30 * np.tanh((x - 0.5) @ WEIGHTS / 1.5)


def invert(y: float) -> float:
    """A mislabelled score: same distribution as the true ones (the target is symmetric around 60), so
    nothing but its relation to the features gives it away."""
    return 120.0 - y


def held_out(job_id: str) -> bool:
    """The sidecar's hold-out rule for a sample with a job_id (the first 8 bytes of its blake2b, big-endian,
    below the fraction of 2**64), written out here; each record's eval_n confirms that the two agree."""
    digest = hashlib.blake2b(job_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < HOLDOUT_FRACTION * 2**64


@dataclass
class Written:
    """A checkpoint as the stream saw it: the ACK of the step that wrote it, the status `gate` record
    right after, latest.json then, and how many samples had been sent."""
    phase: str
    ack: dict
    record: dict
    latest: dict | None
    n_sent: int

    @property
    def version(self) -> int:
        return self.record["version"]

    @property
    def published(self) -> bool:
        return self.record["gate"] != "quarantined"


class Stream:
    """Sends samples of the target (seeded, so every run sends the same ones), each with its own job_id,
    and after each ACK of a step asks for status to see whether that step wrote a checkpoint."""

    def __init__(self, ckpt: Path):
        self.ckpt = ckpt
        self.rng = np.random.default_rng(SEEDS["stream"])
        self.sent: list[tuple[str, np.ndarray, float]] = []  # job_id, features, score as sent
        self.written: list[Written] = []
        self.last_version: int | None = None
        self.client: Client | None = None

    def connect(self, sidecar: Sidecar) -> None:
        self.client = sidecar.client()
        gate = self.status()["gate"]
        self.last_version = gate and gate["version"]

    def status(self) -> dict:
        status = self.client.request({"op": "status"})
        assert status["ok"] is True, status
        return status

    def latest(self) -> dict | None:
        path = self.ckpt / "latest.json"
        return json.loads(path.read_text()) if path.exists() else None

    def send(self, phase: str, mislabelled: bool = False) -> Written | None:
        x = self.rng.uniform(0, 1, N_FEATURES)
        y = float(target(x))
        score = invert(y) if mislabelled else y
        job_id = f"{phase}-{len(self.sent)}"
        self.sent.append((job_id, x, score))
        ack = self.client.request({"job_id": job_id, "features": x.tolist(), "true_score": score})
        assert ack["ok"] is True and ack["job_id"] == job_id, ack
        if not ack["trained"]:
            assert "checkpoint" not in ack, ack
            return None
        record = self.status()["gate"]
        if record is None or record["version"] == self.last_version:
            assert "checkpoint" not in ack, ack  # an ACK names only a checkpoint its own step published
            return None
        self.last_version = record["version"]
        written = Written(phase, ack, record, self.latest(), len(self.sent))
        self.written.append(written)
        return written

    def until_written(self, phase: str, limit: int, mislabelled: bool = False, published: bool = False) -> Written:
        """Send until a step writes a checkpoint (a published one, if `published`)."""
        for _ in range(limit):
            written = self.send(phase, mislabelled)
            if written and (written.published or not published):
                return written
        raise AssertionError(f"{phase}: no {'published ' if published else ''}checkpoint within {limit} samples; "
                             f"{self.summary()}")

    def held_out_set(self, n_sent: int) -> tuple[np.ndarray, np.ndarray]:
        """The evaluation ring after the first n_sent samples, as the server keeps it (float32)."""
        rows = [(x, score) for job_id, x, score in self.sent[:n_sent] if held_out(job_id)]
        return (np.array([x for x, _ in rows], np.float32).reshape(-1, N_FEATURES),
                np.array([score for _, score in rows], np.float32))

    def summary(self) -> str:
        """What a failure report needs: the seeds, and each checkpoint's verdict and held-out PLCCs."""
        rows = [(w.version, w.phase, w.record["gate"], w.record["metrics"]["eval_n"],
                 *(round(m["plcc"], 4) if m else None for m in (w.record["metrics"]["candidate"],
                                                                 w.record["metrics"]["incumbent"])))
                for w in self.written]
        return f"seeds {SEEDS}, numpy {np.__version__}; written (version, phase, gate, eval_n, plcc, incumbent plcc): {rows}"


def files_of(directory: Path, version: int) -> list[Path]:
    stem = f"model_v{version:06d}"
    return [directory / f"{stem}.onnx", directory / f"{stem}.onnx.sha256", directory / f"{stem}.json"]


def checkpoint_file(ckpt: Path, w: Written) -> Path:
    return (ckpt if w.published else ckpt / "quarantine") / w.record["file"]


def assert_published(w: Written, ckpt: Path) -> None:
    """A published checkpoint: named by its ACK and by latest.json, in the main directory, intact."""
    record = w.record
    assert w.published and record["gate"] in ("passed", "insufficient-data"), record
    assert Path(w.ack["checkpoint"]) == ckpt / record["file"], (w.ack, record)
    assert w.latest == record, (w.latest, record)  # latest.json is the checkpoint's record, and names its file
    onnx_file, sha_file, json_file = files_of(ckpt, w.version)
    digest = hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert record["sha256"] == digest
    assert sha_file.read_text() == f"{digest}  {onnx_file.name}\n"
    assert json.loads(json_file.read_text()) == record
    assert not any(p.exists() for p in files_of(ckpt / "quarantine", w.version))


def assert_quarantined(w: Written, ckpt: Path, good: dict) -> None:
    """A quarantined checkpoint: not named by its ACK, its files only under quarantine/, with a reason
    naming both PLCCs, and latest.json still the last good record."""
    record = w.record
    assert record["gate"] == "quarantined", record
    assert "checkpoint" not in w.ack, w.ack
    metrics = record["metrics"]
    assert "PLCC" in record["reason"], record  # and it gives both PLCCs:
    numbers = [float(n) for n in re.findall(r"-?\d+\.\d+", record["reason"])]
    for model in ("incumbent", "candidate"):
        assert any(abs(n - metrics[model]["plcc"]) < 1e-3 for n in numbers), record
    onnx_file, sha_file, json_file = files_of(ckpt / "quarantine", w.version)
    assert onnx_file.is_file() and sha_file.is_file() and json_file.is_file()
    digest = hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert record["sha256"] == digest and sha_file.read_text() == f"{digest}  {onnx_file.name}\n"
    assert json.loads(json_file.read_text()) == record
    assert not any(p.exists() for p in files_of(ckpt, w.version))
    assert w.latest == good, (w.latest, good)  # same version, file and sha256: untouched


def measured(model_file: Path, x: np.ndarray, y: np.ndarray) -> dict:
    """The gate's metrics of a checkpoint file on (x, y), computed here from the file's weights."""
    weights = onnx_builder.read_mlp_model(onnx.load(str(model_file)))
    metrics = sidecar_module.measure(sidecar_module.MLP.from_weights(weights), x, y)
    return {"plcc": metrics.plcc, "srcc": metrics.srcc, "rmse": metrics.rmse}


def assert_record_recomputes(w: Written, ckpt: Path, incumbent: Written | None, stream: Stream) -> None:
    """The record's figures are the gate's metrics of this checkpoint and of the incumbent it names (the
    last published checkpoint before it) on the held-out samples sent so far, and the verdict follows
    from them by the gate's rule."""
    record, metrics = w.record, w.record["metrics"]
    assert set(metrics["candidate"]) == set(metrics["incumbent"]) == {"plcc", "srcc", "rmse"}, record
    x, y = stream.held_out_set(w.n_sent)
    assert metrics["eval_n"] == len(y), (record, len(y))
    expected = {"candidate": measured(checkpoint_file(ckpt, w), x, y)}
    if incumbent is not None:  # before the first publication the incumbent is the untrained model
        expected["incumbent"] = measured(checkpoint_file(ckpt, incumbent), x, y)
    for model, figures in expected.items():
        for name, value in figures.items():
            assert metrics[model][name] == pytest.approx(value, rel=1e-9, abs=1e-12), (model, name, record)
    if len(y) < MIN_EVAL:
        assert record["gate"] == "insufficient-data", record
    else:
        fell = metrics["candidate"]["plcc"] < metrics["incumbent"]["plcc"] - MAX_PLCC_DROP
        assert record["gate"] == ("quarantined" if fell else "passed"), record


def clean_plcc(model: Path, x: np.ndarray, y: np.ndarray) -> float:
    """PLCC of a checkpoint on clean samples the server never saw, run by onnxruntime."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    (scores,) = session.run(["score"], {"features": x.astype(np.float32)})
    return float(np.corrcoef(scores[:, 0].astype(np.float64), y)[0, 1])


def test_mislabelled_burst_is_quarantined_and_publishing_resumes_after_recovery(sidecar_factory, tmp_path):
    sidecar = sidecar_factory(**SETTINGS)
    ckpt = sidecar.checkpoint_dir
    stream = Stream(ckpt)
    stream.connect(sidecar)

    # ---- 1. clean: checkpoints are published and latest.json follows them ----
    for _ in range(N_CLEAN):
        stream.send("clean")
    good = stream.until_written("clean", 500)  # so that the burst starts right after a checkpoint
    clean = list(stream.written)
    assert len(clean) >= 5, stream.summary()
    assert [w.version for w in clean] == list(range(1, len(clean) + 1))
    for w in clean:  # a healthy stream: the gate refuses none of its candidates
        assert_published(w, ckpt)
    assert clean[0].record["gate"] == "insufficient-data"  # the eval ring starts empty
    assert sum(w.record["gate"] == "passed" for w in clean) >= 2, stream.summary()
    assert good.record["metrics"]["candidate"]["plcc"] > LEARNED_PLCC, stream.summary()
    status = stream.status()
    assert status["checkpoint_version"] == good.version and status["gate"] == good.record
    assert status["samples_held_out"] == status["eval_size"] > 300
    good_record = good.record

    # ---- 2. a burst of inverted scores: the next candidate regresses and is quarantined ----
    # About a fifth of the burst, chosen by job_id like any other sample, lands in the eval ring too and
    # stays there. They lower every model's held-out PLCC but cannot rescue a candidate that has
    # learned the inverted relation.
    bad = stream.until_written("burst", BURST_LIMIT, mislabelled=True)
    assert_quarantined(bad, ckpt, good_record)
    assert bad.version == good.version + 1
    status = stream.status()
    assert status["checkpoint_version"] == good.version and status["gate"] == bad.record

    # ---- 3. restart in the middle of the burst: latest.json, the gate record and the numbering survive ----
    assert sidecar.stop() == 0
    latest_bytes = (ckpt / "latest.json").read_bytes()
    sidecar = sidecar_factory(workdir=tmp_path, **SETTINGS)
    stream.connect(sidecar)
    status = stream.status()
    assert status["checkpoint_version"] == good.version and status["gate"] == bad.record
    assert (ckpt / "latest.json").read_bytes() == latest_bytes
    # The burst goes on: the restarted gate still compares with the last good checkpoint, not with the
    # quarantined one (assert_record_recomputes below checks which model it measured).
    still_bad = stream.until_written("burst", BURST_LIMIT, mislabelled=True)
    assert still_bad.version == bad.version + 1  # numbering continues after the restart
    assert_quarantined(still_bad, ckpt, good_record)

    # ---- 4. clean again: the model recovers and publishing resumes ----
    recovered = stream.until_written("recovery", RECOVERY_LIMIT, published=True)
    for w in stream.written:
        if w.phase == "recovery" and w.version < recovered.version:
            assert_quarantined(w, ckpt, good_record)
    assert_published(recovered, ckpt)
    assert recovered.record["gate"] == "passed"
    # ... and goes on: the next checkpoint is compared with the recovered one, and published too.
    after = stream.until_written("recovery", 500)
    assert after.version == recovered.version + 1
    assert_published(after, ckpt)
    assert after.record["gate"] == "passed", stream.summary()
    status = stream.status()
    assert status["checkpoint_version"] == after.version and status["steps_skipped"] == 0
    assert sidecar.stop() == 0

    # Every record is the gate's rule applied to the right models on the right samples.
    incumbent = None
    for w in stream.written:
        assert_record_recomputes(w, ckpt, incumbent, stream)
        incumbent = w if w.published else incumbent

    # The gate judged right: on clean samples the server never saw, the quarantined candidates are
    # worse than every published one, the good checkpoint before the burst and the recovered ones after.
    test_x = np.random.default_rng(SEEDS["test_set"]).uniform(0, 1, (1000, N_FEATURES))
    test_y = target(test_x)
    plcc = {w.version: clean_plcc(checkpoint_file(ckpt, w), test_x, test_y)
            for w in (good, bad, still_bad, recovered, after)}
    unseen = f"PLCC on unseen clean samples by version: {plcc}; {stream.summary()}"
    print(unseen)
    assert plcc[good.version] > LEARNED_PLCC, unseen
    assert max(plcc[bad.version], plcc[still_bad.version]) < min(plcc[w.version] for w in (good, recovered, after)), unseen

    # Every checkpoint written is where its verdict says, and the tools agree.
    quarantined = [w.version for w in stream.written if not w.published]
    published = [w.version for w in stream.written if w.published]
    assert [w.version for w in stream.written] == list(range(1, len(stream.written) + 1))
    assert sorted(p.name for p in (ckpt / "quarantine").glob("model_v*.onnx")) == \
        [f"model_v{v:06d}.onnx" for v in quarantined]
    assert sorted(p.name for p in ckpt.glob("model_v*.onnx")) == [f"model_v{v:06d}.onnx" for v in published]
    assert json.loads((ckpt / "latest.json").read_text()) == after.record

    verify = run_cli("verify", str(ckpt))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "FAILED" not in verify.stdout, verify.stdout
    for w in stream.written:  # it checked them all, the quarantined ones too
        assert w.record["file"] in verify.stdout, verify.stdout

    listing = run_cli("checkpoints", str(ckpt))
    assert listing.returncode == 0, listing.stderr
    rows = {int(line.split()[0]): line for line in listing.stdout.splitlines() if line.split()[0].isdigit()}
    assert sorted(rows) == list(range(1, len(stream.written) + 1)), listing.stdout
    for v in quarantined:
        assert rows[v].split()[-2:] == ["quarantined", "quarantined"], rows[v]  # gate verdict, then state
        assert f"v{v:06d}: held-out PLCC fell from" in listing.stdout, listing.stdout
    for v in published:
        assert rows[v].endswith("published, latest" if v == after.version else "published"), rows[v]
