"""Fleet benchmark of vmafx-sidecar: what one fleet trainer (`vmafx_sidecar fleet ROOT`) learns from the sample
logs of N replicas that each see mostly their own kind of content, against the replicas themselves and against
one trainer fed the union of their streams in-process; and how fast the fleet trainer reads logs and trains.

    .venv/bin/python benchmarks/bench_fleet.py [--samples 480000] [--wide-samples 200000] [--rounds 3] [--quick]

The teacher is Netflix's VMAF v0.6.1 (benchmarks/vmaf_teacher.py: adm2, motion2, vif_scale0..3). Content is
synthetic live action as in bench_learning.py: each encode has a latent quality q, adm2 and the VIF scales follow
it, motion2 is independent of it. The stream is partitioned by content: the q range [0, 1] is cut into N bands,
and replica i gets 90 % of its samples from band i and 10 % from the whole range, so that a replica alone sees
one slice of the score range well and the rest barely. The total number of samples is fixed per N (--samples,
split evenly among the replicas in expectation), and every sample has one arrival time on a common clock.

For N = 2, 4, 8, 16, in one process (numpy pinned to one thread by vmafx_sidecar, as in the server):
- N replica trainers (vs.build_trainer with a fresh 6-64-1 model and the default settings, bar
  holdout_fraction 0 and no checkpoints), each fed its own stream in-process, the same samples appended with
  their arrival times to a vs.SampleLog in ROOT/vmafx-node-<i>/.samples, as a replica with
  VMAFX_SIDECAR_SAMPLE_LOG=1 writes it;
- one fleet run, vs.fleet(ROOT, Config(n_features=6, base_model_path="", gate="off", ckpt_interval_s=0,
  min_samples_ckpt=<all trained samples - 15>)), so that its one checkpoint is written at its last step; the
  model scored is the published ROOT/fleet/latest.onnx, run by onnxruntime;
- a union trainer: one trainer with the same settings fed every replica's stream, interleaved in arrival order.

Printed, with the machine:
1. Per N: test RMSE (VMAF points) and PLCC on a test set covering all content (q uniform on [0, 1]) of the fleet
   model, the union trainer (raw EMA weights) and the replicas (best, median, worst), with the issue's targets:
   fleet RMSE <= 1.05 x the union trainer's, and below every replica's for N >= 4.
2. Per N: the fleet run's wall and CPU time, its throughput in samples/s (the whole vs.fleet call: building the
   trainer, reading and merging the logs, training, the snapshot and the checkpoint), and the logs' bytes per
   sample (every .samples file / samples; records carry no job id here). Target: >= 50 000 samples/s on one core.
3. The same throughput with the default model size, 80 features (an 80-64-1 network, every other setting the
   default), on a synthetic 80-feature stream (Gaussian features, a tanh-of-a-projection teacher) logged by 4
   replicas: every round, the whole fleet run, and beside it reading and merging the logs alone and in-process
   ingest of the same samples alone, to show where the time goes (the fleet run's first checkpoint, at 1000
   samples, is judged by the gate, as with the defaults; its quarantine is not logged here). Throughput
   depends on the feature count: table 2 is at 6 features, table 3 at 80 (the default, which the target names).
"""
from __future__ import annotations

import argparse
import heapq
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import vmafx_sidecar as vs  # noqa: E402  before numpy: it pins BLAS to one thread, as in the server

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from bench_ingest import machine  # noqa: E402
from vmaf_teacher import N_FEATURES, VMAF_MODEL, VmafTeacher, live_action  # noqa: E402

REPLICAS = (2, 4, 8, 16)
OWN_SHARE = 0.9  # of a replica's samples from its own band of content
TEST_SAMPLES = 5000
COMMIT_EVERY = 256  # samples per SampleLog.commit, as a journal batch would be
ARRIVAL_START = 1_760_000_000.0
ARRIVAL_GAP = 0.001  # seconds between consecutive samples on the common clock
WIDE_FEATURES = 80  # the default Config.n_features
WIDE_REPLICAS = 4
FLEET_TARGET = 50_000  # samples/s on one core
RMSE_RATIO_TARGET = 1.05


# ---- the content, partitioned ----

def partitioned_stream(rng: np.random.Generator, samples: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The replica of each sample, in arrival order, and its latent quality: 90 % from the replica's band of
    q, 10 % from anywhere."""
    replica = rng.integers(0, n, samples)
    own = rng.random(samples) < OWN_SHARE
    q = np.where(own, (replica + rng.random(samples)) / n, rng.random(samples))
    return replica, q


# ---- replicas and their sample logs ----

def config_for(directory: Path, n_features: int, **overrides) -> vs.Config:
    settings = dict(n_features=n_features, checkpoint_dir=str(directory), base_model_path="",
                    holdout_fraction=0.0, min_samples_ckpt=10**12)
    settings.update(overrides)
    return vs.Config(**settings)


def write_logs(root: Path, n: int, replica: np.ndarray, x: np.ndarray, y: np.ndarray,
               trainers: list[vs.Trainer] | None = None) -> None:
    """Append each replica's samples, with their arrival times, to its sample log in ROOT/vmafx-node-<i>/ and,
    with `trainers`, feed each replica's trainer the same samples in the same order."""
    logs = []
    for i in range(n):
        directory = root / f"vmafx-node-{i}"
        directory.mkdir(exist_ok=True)
        logs.append(vs.SampleLog(directory, x.shape[1]))
    counts = [0] * n
    y32 = y.astype(np.float32)
    for k in range(len(y32)):
        i = int(replica[k])
        counts[i] += 1
        logs[i].append(vs.LoggedSample(counts[i], ARRIVAL_START + k * ARRIVAL_GAP, False, None, x[k], y32[k]))
        if trainers is not None:
            trainers[i].ingest(x[k], y32[k], False, True)
        if counts[i] % COMMIT_EVERY == 0:
            logs[i].commit(vs.Config.sample_log_max_bytes)
    for log in logs:
        log.commit(vs.Config.sample_log_max_bytes)
        log.sync()
        if log.fd is not None:
            os.close(log.fd)


def log_bytes(root: Path) -> int:
    return sum(p.stat().st_size for d in root.iterdir() if d.name != vs.FLEET_DIR
               for p in (d / vs.SAMPLE_LOG_DIR).glob("*"))


def timed_fleet(root: Path, config: vs.Config) -> tuple[float, float]:
    """One fleet run over ROOT from scratch: its wall and CPU seconds."""
    shutil.rmtree(root / vs.FLEET_DIR, ignore_errors=True)
    wall, cpu = time.perf_counter(), time.process_time()
    status = vs.fleet(root, config)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if status != 0:
        raise SystemExit(f"fleet run over {root} ended {status}")
    return wall, cpu


# ---- scoring ----

def scores(predicted: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """RMSE and PLCC."""
    predicted = predicted.astype(np.float64).ravel()
    return float(np.sqrt(np.mean((predicted - y) ** 2))), float(np.corrcoef(predicted, y)[0, 1])


def trainer_scores(trainer: vs.Trainer, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    model = vs.MLP.from_weights(trainer.raw_weights(trainer.ema), np.float64)
    return scores(model.forward(x.astype(np.float64))[:, 0], y)


def published_predictions(directory: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(directory / vs.LATEST_MODEL), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


# ---- 1 and 2: the VMAF stream, partitioned among N replicas ----

def fleet_vs_replicas(teacher: VmafTeacher, samples: int, rng: np.random.Generator) -> None:
    test_x = live_action(rng, rng.random(TEST_SAMPLES))
    test_y = teacher(test_x.astype(np.float64))
    trained = samples // 16 * 16  # what the union and the fleet trainers train on: 16 new samples a step
    print(f"\n{samples} samples per N, split among the replicas ({OWN_SHARE:.0%} of each from its own band of "
          f"latent quality); test set: {TEST_SAMPLES} encodes of any quality (score spread {test_y.std():.1f}, "
          "so predicting the mean scores about that)\n")
    quality, speed, notes = [], [], []
    for n in REPLICAS:
        replica, q = partitioned_stream(rng, samples, n)
        x = live_action(rng, q)
        y = teacher(x.astype(np.float64))
        with tempfile.TemporaryDirectory() as directory:
            root = Path(directory)
            trainers = [vs.build_trainer(config_for(root / f"vmafx-node-{i}", N_FEATURES))[0] for i in range(n)]
            write_logs(root, n, replica, x, y, trainers)
            replicas = sorted(trainer_scores(t, test_x, test_y) for t in trainers)
            with tempfile.TemporaryDirectory() as union_dir:
                union = vs.build_trainer(config_for(Path(union_dir), N_FEATURES))[0]
                y32 = y.astype(np.float32)
                for k in range(samples):
                    union.ingest(x[k], y32[k], False, True)
            union_rmse, union_plcc = trainer_scores(union, test_x, test_y)
            config = vs.Config(n_features=N_FEATURES, base_model_path="", gate="off", ckpt_interval_s=0,
                               min_samples_ckpt=trained - 15, holdout_fraction=0.0)
            wall, cpu = timed_fleet(root, config)
            record = vs.read_record(root / vs.FLEET_DIR / vs.LATEST)
            fleet_predicted = published_predictions(root / vs.FLEET_DIR, test_x)[:, 0]
            fleet_rmse, fleet_plcc = scores(fleet_predicted, test_y)
            union_predicted = vs.MLP.from_weights(union.raw_weights(union.ema), np.float64).forward(
                test_x.astype(np.float64))[:, 0]
            per_sample = log_bytes(root) / samples
        rmses = [r for r, _ in replicas]
        plccs = sorted(p for _, p in replicas)
        median = len(rmses) // 2
        ratio = fleet_rmse / union_rmse
        below = fleet_rmse < rmses[0]
        ratio_met = "met" if ratio <= RMSE_RATIO_TARGET else "NOT met"
        below_met = ("met" if below else "NOT met") if n >= 4 else ("yes" if below else "no") + " (N < 4: no target)"
        quality.append(f"| {n} | {samples // n} | {fleet_rmse:.3f} | {union_rmse:.3f} | {ratio:.3f} ({ratio_met}) | "
                       f"{rmses[0]:.3f} / {rmses[median]:.3f} / {rmses[-1]:.3f} | {below_met} | "
                       f"{fleet_plcc:.4f} | {union_plcc:.4f} | {plccs[-1]:.4f} / {plccs[median]:.4f} / "
                       f"{plccs[0]:.4f} |")
        rate = samples / wall
        speed.append(f"| {n} | {samples} | {wall:.2f} | {cpu:.2f} | {rate:,.0f} | "
                     f"{'met' if rate >= FLEET_TARGET else 'NOT met'} | {per_sample:.1f} |")
        notes.append(f"N={n}: fleet checkpoint v{record['version'] if record else '?'} at "
                     f"{record.get('samples_trained', '?') if record else '?'} samples trained; union trainer "
                     f"{union.samples_trained} samples trained, step {union.steps}; largest test "
                     f"prediction difference fleet - union {np.abs(fleet_predicted - union_predicted).max():.2g}")
        print(f"(N={n} done)", flush=True)
    print("\n1. Test RMSE (VMAF points) and PLCC on all content, fresh 6-64-1 model, defaults\n")
    print("| N | samples per replica | fleet RMSE | union RMSE | fleet / union (target <= 1.05) | "
          "replica RMSE best / median / worst | fleet below every replica (target, N >= 4) | fleet PLCC | "
          "union PLCC | replica PLCC best / median / worst |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(quality))
    print("\n" + "\n".join(notes))
    print("\n2. The fleet run over the N logs (6 features), one core\n")
    print("| N | samples | wall s | CPU s | samples/s (wall) | target >= 50 000 | log bytes per sample |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(speed), flush=True)


# ---- 3: throughput at the default model size ----

def wide_stream(rng: np.random.Generator, samples: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(0, 1, (samples, WIDE_FEATURES)).astype(np.float32)
    direction = rng.normal(0, 1 / np.sqrt(WIDE_FEATURES), WIDE_FEATURES)
    y = 60 + 20 * np.tanh(x.astype(np.float64) @ direction) + rng.normal(0, 2, samples)
    return x, np.clip(y, 0, 100)


def read_only(root: Path) -> None:
    """Read and merge every replica's log as vs.fleet does, without training."""
    logs = [vs.replica_samples(path, key, WIDE_FEATURES, 0, 0) for path, key in vs.replica_logs(root)]
    for _ in heapq.merge(*logs):
        pass


def wide_throughput(rng: np.random.Generator, samples: int, rounds: int) -> None:
    x, y = wide_stream(rng, samples)
    replica = rng.integers(0, WIDE_REPLICAS, samples)
    y32 = y.astype(np.float32)
    print(f"\n3. Fleet throughput at the default model size: {WIDE_FEATURES} features, an {WIDE_FEATURES}-64-1 "
          f"model, every setting the default; {samples} synthetic samples logged by {WIDE_REPLICAS} replicas "
          "(samples/s, wall; one core)\n")
    print("| round | fleet run | target >= 50 000 | fleet CPU s | reading and merging alone | "
          "in-process ingest alone | log bytes per sample |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        write_logs(root, WIDE_REPLICAS, replica, x, y)
        per_sample = log_bytes(root) / samples
        config = vs.Config(n_features=WIDE_FEATURES, base_model_path="")
        for r in range(1, rounds + 1):
            wall, cpu = timed_fleet(root, config)
            started = time.perf_counter()
            read_only(root)
            reading = time.perf_counter() - started
            with tempfile.TemporaryDirectory() as other:
                trainer = vs.build_trainer(config_for(Path(other), WIDE_FEATURES,
                                                      holdout_fraction=vs.Config.holdout_fraction,
                                                      min_samples_ckpt=vs.Config.min_samples_ckpt))[0]
                started = time.perf_counter()
                for k in range(samples):
                    trainer.ingest(x[k], y32[k], False, True)
                ingesting = time.perf_counter() - started
            rate = samples / wall
            print(f"| {r} | {rate:,.0f} | {'met' if rate >= FLEET_TARGET else 'NOT met'} | {cpu:.2f} | "
                  f"{samples / reading:,.0f} | {samples / ingesting:,.0f} | {per_sample:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=480_000, help="samples per N (default 480000)")
    parser.add_argument("--wide-samples", type=int, default=200_000,
                        help="samples of the 80-feature throughput run (default 200000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the 80-feature throughput (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (about 10 s): 48000 and 20000 samples, one round")
    args = parser.parse_args()
    samples, wide, rounds = (48_000, 20_000, 1) if args.quick else (args.samples, args.wide_samples, args.rounds)
    vs.log.setLevel("WARNING")
    teacher = VmafTeacher.load()
    print(f"bench_fleet on {machine()}; teacher {VMAF_MODEL.name}")
    rng = np.random.default_rng(2026)
    fleet_vs_replicas(teacher, samples, rng)
    vs.log.setLevel("ERROR")  # the default fleet run's first checkpoint, at 1000 samples, is quarantined: no news
    wide_throughput(rng, wide, rounds)


if __name__ == "__main__":
    main()
