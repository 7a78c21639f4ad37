"""The stability gate's scenarios (issue 15), each against a real sidecar over its socket, fed by a seeded
stream of a smooth teacher's scores:

1. ratchet: a converged model, restarted with a three times larger learning rate, so that its candidates
   wander and tend to get worse: the gate publishes none that falls below the champion (the best
   published model) by more than the tolerance on its own evidence, and on a test set of our own the
   published models never drift down far;
2. a fresh model with the default learning rate and EMA: nothing not clearly better than predicting the mean is
   published, and the records say so;
3. a mislabelled burst, late and early: in test_gate_stream.py, which recomputes every record from the files;
4. a genuine shift: a new kind of content with correct scores is learned and published within a few
   checkpoints, and the published models keep the old kind;
5. a low rate: with the default checkpoint settings the first checkpoint is judged on a window of every
   sample trained since the start;
6. a burst on another scale: scores shifted by a constant (a node on another VMAF model) keep every PLCC, and
   their candidates are quarantined for their R².

Training is chaotic: on another CPU or numpy version float sums round differently and the same stream
trains different weights. So these tests assert properties that hold for any correct gate on any such run,
with wide margins, never a figure one run produced. The test sets are scored by onnxruntime on the
checkpoint files, independently of the sidecar's own arithmetic."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

import vmafx_sidecar as vs
from conftest import ROOT, Client, Sidecar

N_FEATURES = 8
SEEDS = dict(teacher=1, server=0, ratchet=11, fresh=12, shift=14, low_rate=15, calibration=16,
             test_sets=20)  # every random stream
WEIGHTS = np.random.default_rng(SEEDS["teacher"]).normal(0, 1, N_FEATURES)
CHUNK = 200  # lines sent before their ACKs are read: fewer than a checkpoint interval, so at most one per chunk
TEST_SET = 2000  # samples of each test set

# A small model that learns the teacher in a few thousand samples: batch 16 (8 new + 8 replayed), a
# checkpoint every 400 trained samples (~500 sent: a fifth is held out), sets judged from 100 samples.
FAST_MIN_EVAL = 100
FAST = dict(
    VMAFX_SIDECAR_N_FEATURES=str(N_FEATURES),
    VMAFX_SIDECAR_HIDDEN="16",
    VMAFX_SIDECAR_SEED=str(SEEDS["server"]),
    VMAFX_SIDECAR_BATCH_SIZE="16",
    VMAFX_SIDECAR_LR="0.05",
    VMAFX_SIDECAR_WARMUP_STEPS="10",
    VMAFX_SIDECAR_EMA_DECAY="0.95",
    VMAFX_SIDECAR_CKPT_INTERVAL_S="0",
    VMAFX_SIDECAR_MIN_SAMPLES_CKPT="400",
    VMAFX_SIDECAR_HOLDOUT_FRACTION="0.2",
    VMAFX_SIDECAR_GATE_MIN_EVAL=str(FAST_MIN_EVAL),
    VMAFX_SIDECAR_KEEP_CHECKPOINTS="0",  # keep every published checkpoint
)
# Defaults but for the model's size and how often checkpoints come (conftest holds nothing out by default).
DEFAULTS = dict(
    VMAFX_SIDECAR_N_FEATURES=str(N_FEATURES),
    VMAFX_SIDECAR_HIDDEN="16",
    VMAFX_SIDECAR_SEED=str(SEEDS["server"]),
    VMAFX_SIDECAR_CKPT_INTERVAL_S="0",
    VMAFX_SIDECAR_HOLDOUT_FRACTION="0.05",
    VMAFX_SIDECAR_KEEP_CHECKPOINTS="0",
)
DEFAULT_MIN_EVAL = 200  # VMAFX_SIDECAR_GATE_MIN_EVAL
DEFAULT_MIN_SAMPLES_CKPT = 1000
REFERENCES = ("base", "incumbent", "champion")


def teacher(x: np.ndarray) -> np.ndarray:
    """A smooth VMAF-like score in about (20, 90): a saturating ridge, less a soft ramp that only the
    last feature's upper half reaches (the new kind of content of the shift scenario)."""
    return 60 + 30 * np.tanh((x - 0.5) @ WEIGHTS / 1.5) - 0.8 * np.logaddexp(0, 20 * (x[:, -1] - 0.5))


def content(rng: np.random.Generator, n: int, kind: str = "old") -> np.ndarray:
    """Feature vectors of one kind of content: uniform, but for the last feature, in its lower half for the
    old kind and its upper half for the new one."""
    x = rng.uniform(0, 1, (n, N_FEATURES))
    x[:, -1] = 0.5 * x[:, -1] + (0.5 if kind == "new" else 0.0)
    return x


@dataclass
class Written:
    """A checkpoint as the stream saw it: its record, as status reported it right after the chunk that
    wrote it, and its model file, read then (quarantine/ keeps only the newest ten)."""
    phase: str
    record: dict
    model: bytes

    @property
    def version(self) -> int:
        return self.record["version"]

    @property
    def published(self) -> bool:
        return self.record["gate"] == "passed"

    def judged(self, min_eval: int) -> dict[str, dict]:
        """The sets the gate had to judge the candidate on: those with at least GATE_MIN_EVAL samples."""
        return {name: self.record["metrics"][name] for name in ("window", "history")
                if self.record["metrics"][name]["n"] >= min_eval}


class Feed:
    """A producer of teacher-scored samples on one connection, pipelined as a node with many jobs in flight
    does: a chunk of lines, then their ACKs; after each chunk, status says whether a checkpoint was written."""

    def __init__(self, sidecar: Sidecar, seed: int):
        self.ckpt = sidecar.checkpoint_dir
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.n_sent = 0
        self.written: list[Written] = []
        self.connect(sidecar)

    def connect(self, sidecar: Sidecar) -> None:
        self.client: Client = sidecar.client()
        self.last_version = (self.status()["gate"] or {}).get("version")

    def status(self) -> dict:
        status = self.client.request({"op": "status"})
        assert status["ok"] is True, status
        return status

    def send(self, phase: str, n: int, kind: str = "old", offset: float = 0.0) -> list[Written]:
        """Send n samples of a kind of content, their scores `offset` from the teacher's; the checkpoints they
        made."""
        x = content(self.rng, n, kind)
        y = teacher(x) + offset
        written = []
        for start in range(0, n, CHUNK):
            lines = [json.dumps({"job_id": f"{phase}-{self.n_sent + i}", "features": x[i].tolist(),
                                 "true_score": float(y[i])}) for i in range(start, min(n, start + CHUNK))]
            self.client.send_raw("\n".join(lines).encode() + b"\n")
            acks = [self.client.read_ack() for _ in lines]
            assert all(ack["ok"] for ack in acks), [ack for ack in acks if not ack["ok"]]
            written += self.take_checkpoint(phase, [Path(ack["checkpoint"]) for ack in acks if "checkpoint" in ack])
        self.n_sent += n
        self.written += written
        return written

    def take_checkpoint(self, phase: str, named: list[Path]) -> list[Written]:
        """The checkpoint the last chunk wrote, if any, with its file; the ACKs named it if it was published."""
        record = self.status()["gate"]
        if record is None or record["version"] == self.last_version:
            assert not named, named
            return []
        assert record["version"] == (self.last_version or 0) + 1, ("a chunk wrote two checkpoints", record)
        self.last_version = record["version"]
        published = record["gate"] == "passed"
        path = (self.ckpt if published else self.ckpt / "quarantine") / record["file"]
        assert named == ([path] if published else []), (named, record)
        return [Written(phase, record, path.read_bytes())]

    def summary(self) -> str:
        """What a failure report needs: the seeds, and each checkpoint's verdict, evidence and reason."""
        def scores(w: Written, name: str) -> str:
            evidence = w.record["metrics"][name]
            models = [m for m in ("candidate", *REFERENCES) if evidence.get(m)]
            return f"{name} n={evidence['n']} " + " ".join(
                f"{m} {evidence[m]['plcc']:.5f}/{evidence[m]['r2']:.3f}" for m in models)
        rows = [f"  v{w.version} {w.phase} {w.record['gate']}: {scores(w, 'window')}; {scores(w, 'history')}; "
                f"{w.record['reason']}" for w in self.written]
        return "\n".join([f"seeds {SEEDS}, stream seed {self.seed}, numpy {np.__version__}; checkpoints "
                          "(PLCC/R² of the candidate and the references on each set):", *rows])


def assert_champion_is_the_best_published(feed: Feed) -> None:
    """From the records alone: after each publication the champion is the incumbent (the same scores on both
    sets) exactly when the published candidate's history PLCC and R² were both at least the champion's, or
    nothing was published before; otherwise the champion stays the model it was, across a restart too."""
    champion_is_incumbent = None  # unknown until something is published
    for w in feed.written:
        metrics = w.record["metrics"]
        if champion_is_incumbent is not None:
            same = all(metrics[name]["incumbent"] == metrics[name]["champion"] for name in ("window", "history"))
            assert same == champion_is_incumbent, f"v{w.version}\n{feed.summary()}"
        if w.published:
            history = metrics["history"]
            champion_is_incumbent = champion_is_incumbent is None or all(
                history["candidate"][metric] >= history["champion"][metric] for metric in ("plcc", "r2"))


@dataclass(frozen=True)
class Measured:
    plcc: float
    r2: float
    rmse: float


def scored(model: bytes, x: np.ndarray, y: np.ndarray) -> Measured:
    """A checkpoint's scores on a test set, run by onnxruntime, computed here in float64."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    (predicted,) = session.run(["score"], {"features": x.astype(np.float32)})
    predicted = predicted[:, 0].astype(np.float64)
    sse = float(np.sum((predicted - y) ** 2))
    return Measured(plcc=float(np.corrcoef(predicted, y)[0, 1]), r2=1 - sse / float(np.sum((y - y.mean()) ** 2)),
                    rmse=float(np.sqrt(sse / len(y))))


def unseen(kind: str = "old") -> tuple[np.ndarray, np.ndarray]:
    """A test set of one kind of content, from its own seed: samples the sidecar never saw."""
    x = content(np.random.default_rng([SEEDS["test_sets"], ("old", "new").index(kind)]), TEST_SET, kind)
    return x, teacher(x)


# ---- 1. ratchet ----

RATCHET_DROP = 0.002  # VMAFX_SIDECAR_GATE_MAX_PLCC_DROP: below the walk's steps, so a ratchet would show
# The walk: three times the learning rate, and an EMA that follows it more closely, for ~70 checkpoints. Its
# candidates' PLCC on a test set wandered down to 0.004-0.007 below the converged model's in the runs tried
# (seeds, SIMD paths, numpy 1.26): less would not show on the test set beside the evidence's sampling error;
# more (0.2 and up, in standardized coordinates) collapses the model, leaving nothing to publish.
WALK = dict(VMAFX_SIDECAR_LR="0.15", VMAFX_SIDECAR_EMA_DECAY="0.9")
WALK_SAMPLES = 36000
# How far below the converged model a published one may be on the test set: five tolerances, for the
# evidence's sampling error; the published walk models stayed within 0.0011-0.0020 in every run tried.
DRIFT_BOUND = 5 * RATCHET_DROP


def test_ratchet_publishes_nothing_below_the_champion(sidecar_factory, tmp_path):
    settings = {**FAST, "VMAFX_SIDECAR_REPLAY_CAPACITY": "2000",
                "VMAFX_SIDECAR_GATE_MAX_PLCC_DROP": str(RATCHET_DROP)}
    sidecar = sidecar_factory(**settings)
    feed = Feed(sidecar, SEEDS["ratchet"])
    converged = [w for w in feed.send("converge", 6000) if w.published]
    assert converged and converged[-1].record["metrics"]["history"]["candidate"]["plcc"] > 0.99, feed.summary()
    before = feed.status()
    assert sidecar.stop() == 0

    # The same directory, so the state resumes: the model, the window, the incumbent and the champion.
    sidecar = sidecar_factory(workdir=tmp_path, **{**settings, **WALK})
    feed.connect(sidecar)
    after = feed.status()
    resumed = [(s["steps"], s["checkpoint_version"], s["gate"]) for s in (before, after)]
    assert resumed[0] == resumed[1], resumed
    walk = feed.send("walk", WALK_SAMPLES)
    published = [w for w in walk if w.published]
    quarantined = [w for w in walk if not w.published]
    assert len(published) >= 2 and quarantined, feed.summary()  # the walk went both ways, past its first step

    # On the gate's own evidence: every published candidate is within the tolerance of the champion (and
    # of the incumbent) on every set it was judged on.
    for w in published:
        judged = w.judged(FAST_MIN_EVAL)
        assert judged, feed.summary()
        for name, evidence in judged.items():
            assert {"incumbent", "champion"} <= evidence.keys(), f"v{w.version} {name}\n{feed.summary()}"
            best = max(evidence["incumbent"]["plcc"], evidence["champion"]["plcc"])
            assert evidence["candidate"]["plcc"] >= best - RATCHET_DROP, f"v{w.version} {name}\n{feed.summary()}"

    assert_champion_is_the_best_published(feed)

    # On a test set of our own: the published models stay near the converged one. (Whether the walk's
    # refused candidates are also worse there than every published one depends on the seed: in one of 13
    # seeds tried the walk drifted up, not down, and its refusals were within the test set's noise.)
    x, y = unseen()
    start = scored(converged[-1].model, x, y).plcc
    plcc = {w.version: scored(w.model, x, y).plcc for w in walk}
    report = f"converged v{converged[-1].version}: {start:.5f}; test PLCC by version {plcc}\n{feed.summary()}"
    assert min(plcc[w.version] for w in published) >= start - DRIFT_BOUND, report


# ---- 2. fresh model, defaults ----

def test_fresh_model_with_defaults_publishes_nothing_no_better_than_the_mean(sidecar_factory):
    """At the default learning rate and EMA a fresh model (which starts near the mean, in standardized
    coordinates) needs far more than these samples to clearly beat the mean: each checkpoint is judged on its
    window and refused for its R², and nothing no better than the mean on unseen data is published."""
    # A checkpoint every 16 steps of 16 new samples: a window just over GATE_MIN_EVAL.
    sidecar = sidecar_factory(**DEFAULTS, VMAFX_SIDECAR_MIN_SAMPLES_CKPT="256")
    feed = Feed(sidecar, SEEDS["fresh"])
    written = feed.send("fresh", 6000)
    assert len(written) >= 15, feed.summary()
    x, y = unseen()
    for w in written:
        judged = w.judged(DEFAULT_MIN_EVAL)
        assert "window" in judged, feed.summary()  # every sample since the last checkpoint is evidence
        no_better = [name for name, evidence in judged.items()
                     if evidence["candidate"]["r2"] <= 2 / math.sqrt(evidence["n"])]
        if no_better:
            assert not w.published and "R²" in w.record["reason"], f"v{w.version}\n{feed.summary()}"
            assert any(w.record["reason"].startswith(f"{name}: R²") for name in no_better), feed.summary()
        if w.published:
            assert scored(w.model, x, y).r2 > 0, f"v{w.version}\n{feed.summary()}"
    assert any(not w.published and "R²" in w.record["reason"] for w in written), feed.summary()

    # The records on disk say the same as status did: the newest ten quarantined ones are kept.
    status = feed.status()
    last_published = max((w.version for w in written if w.published), default=None)
    assert (status["gate"], status["checkpoint_version"]) == (written[-1].record, last_published), feed.summary()
    kept = [w for w in written if w.published] + [w for w in written if not w.published][-10:]
    for w in kept:
        where = feed.ckpt if w.published else feed.ckpt / "quarantine"
        assert json.loads((where / f"model_v{w.version:06d}.json").read_text()) == w.record, feed.summary()


# ---- 4. genuine shift ----

SHIFT_DROP = 0.005  # the default VMAFX_SIDECAR_GATE_MAX_PLCC_DROP
SHIFT_PATIENCE = 4  # checkpoints after the shift starts by which a model that has learned the new kind is out
# On the old kind's test set a published model keeps its PLCC within six tolerances of the model before the
# shift (it gave up 0.006-0.0075 in the runs tried, learning a ramp it had never seen) ...
OLD_KIND_SLACK = 6 * SHIFT_DROP
# ... and has learned the new kind when its RMSE there is below three quarters of the old model's (0.28-0.38
# of it by the second checkpoint after the shift in the runs tried).
LEARNED_RMSE_RATIO = 0.75


def test_genuine_shift_is_published_and_keeps_the_old_content(sidecar_factory):
    # The default replay ring (10000) keeps the old content while the new one is learned.
    sidecar = sidecar_factory(**FAST, VMAFX_SIDECAR_GATE_MAX_PLCC_DROP=str(SHIFT_DROP))
    feed = Feed(sidecar, SEEDS["shift"])
    before = [w for w in feed.send("old", 6000) if w.published]
    assert before and before[-1].record["metrics"]["history"]["candidate"]["plcc"] > 0.99, feed.summary()
    shift = feed.send("new", 4000, kind="new")

    old_x, old_y = unseen("old")
    new_x, new_y = unseen("new")
    start_old, start_new = scored(before[-1].model, old_x, old_y), scored(before[-1].model, new_x, new_y)
    on_old = {w.version: scored(w.model, old_x, old_y) for w in shift if w.published}
    on_new = {w.version: scored(w.model, new_x, new_y) for w in shift if w.published}
    report = (f"before the shift v{before[-1].version}: old {start_old}, new {start_new}; after, published: "
              f"old {on_old}, new {on_new}\n{feed.summary()}")
    assert_champion_is_the_best_published(feed)
    learned = [w for w in shift[:SHIFT_PATIENCE]
               if w.published and on_new[w.version].rmse < LEARNED_RMSE_RATIO * start_new.rmse]
    assert learned, report  # the gate did not freeze
    for scores in on_old.values():
        assert scores.plcc >= start_old.plcc - OLD_KIND_SLACK, report


# ---- 5. low rate ----

def test_low_rate_first_checkpoint_is_judged_on_a_full_window(sidecar_factory):
    """With MIN_SAMPLES_CKPT 1000 and five percent held out, the first checkpoint comes with ~50 held-out
    samples, too few to judge on; every sample trained is in its window, which is enough."""
    sidecar = sidecar_factory(**DEFAULTS)
    feed = Feed(sidecar, SEEDS["low_rate"])
    live = feed.status()["window"]
    assert live["n"] == 0 and live.keys() == {"n", "candidate", "base"}, live
    first = feed.send("low", 1200)
    assert first, feed.summary()
    record = first[0].record
    window, history = record["metrics"]["window"], record["metrics"]["history"]
    assert window["n"] >= DEFAULT_MIN_SAMPLES_CKPT and window["n"] == record["samples_trained"], feed.summary()
    # Paired: the candidate and the base model predicted the same samples.
    assert window["candidate"] is not None and window["base"] is not None, feed.summary()
    # No replayed samples are older than the window yet, so the history is the held-out ones: too few.
    assert history["n"] == history["held_out"] < DEFAULT_MIN_EVAL, feed.summary()
    assert record["reason"].startswith("window: "), feed.summary()  # judged, on the window alone
    live = feed.status()
    assert live["window"]["n"] == live["samples_trained"] - record["samples_trained"], (live, feed.summary())


# ---- 6. a burst on another scale ----

# A node scoring with another model of the same family: the same ranking, 4 points higher (a quarter of the
# scores' spread). A candidate that has followed part of it is 5× worse than the converged model on the test
# set in the runs tried, with every PLCC within the tolerance: only its R² shows it.
CALIBRATION_OFFSET = 4.0
CALIBRATION_BURST = 2000  # five checkpoint intervals: its held-out samples stay a minority of the history


def test_a_burst_on_another_scale_is_quarantined_though_its_ranking_holds(sidecar_factory):
    sidecar = sidecar_factory(**FAST)
    feed = Feed(sidecar, SEEDS["calibration"])
    converged = [w for w in feed.send("converge", 6000) if w.published]
    assert converged and converged[-1].record["metrics"]["history"]["candidate"]["plcc"] > 0.99, feed.summary()
    burst = feed.send("burst", CALIBRATION_BURST, offset=CALIBRATION_OFFSET)
    x, y = unseen()
    good = scored(converged[-1].model, x, y)
    on_test = {w.version: scored(w.model, x, y) for w in burst}
    report = f"converged v{converged[-1].version}: {good}; burst: {on_test}\n{feed.summary()}"
    assert all(on_test[w.version].rmse <= 2 * good.rmse for w in burst if w.published), report
    # What the R² rule caught: candidates far worse on our test set, whose PLCC passed on every set.
    caught = [w for w in burst if "VMAFX_SIDECAR_GATE_MAX_R2_DROP" in w.record["reason"]]
    assert caught, report
    for w in caught:
        for evidence in w.judged(FAST_MIN_EVAL).values():
            best = max(evidence[name]["plcc"] for name in REFERENCES if evidence.get(name))
            assert evidence["candidate"]["plcc"] >= best - vs.Config.gate_max_plcc_drop, report
        assert on_test[w.version].rmse > 2 * good.rmse, report


# ---- the same scenarios in-process ----

def test_bench_gate_quick_run_goes_through_every_scenario_and_measurement():
    """benchmarks/bench_gate.py runs these scenarios in-process and times the gate; a smoke run keeps it
    working as the code it calls changes. Its figures are for people to read, not asserted here."""
    bench = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gate.py"), "--quick"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0, bench.stdout + bench.stderr
    for heading in ("### ratchet", "### fresh", "### burst-late", "### burst-early", "### shift", "### low-rate",
                    "median overhead", "median checkpoint"):
        assert heading in bench.stdout, bench.stdout
