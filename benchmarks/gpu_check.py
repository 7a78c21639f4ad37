"""GPU check of the CuPy backend: the same training on numpy and on CuPy, and what a step costs on each.

    python benchmarks/gpu_check.py [--steps 2000] [--activation relu]

Installs nothing: it expects CuPy and a CUDA device on the machine (exit 2 without them). It trains
--steps steps on numpy and on CuPy from the same weights, stream and seed, through Trainer.add as the server
does (hold-out, replay and a few gated checkpoints included), and prints the largest absolute difference of
the final live and EMA weights: more than 1e-4 is a mismatch (exit 1). Then it times Trainer.step (median,
device synchronized around each step) at batch 32 with the default 80-64-1 model and at batch 1024 with
hidden 256, on both backends. About a minute on a recent GPU, most of it CuPy compiling its kernels once.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vmafx_sidecar as vs  # noqa: E402

TOLERANCE = 1e-4
N_FEATURES = 80


def stream(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A learnable VMAF-like stream: scores 20..100 from a linear function of the features, plus noise."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, N_FEATURES)
    x = rng.uniform(0, 1, (n, N_FEATURES)).astype(np.float32)
    raw = x @ w + rng.normal(0, 0.5, n)
    y = 20 + 80 * (raw - raw.min()) / (raw.max() - raw.min())
    return x, y.astype(np.float32)


def make_trainer(cuda: str, directory: str, batch: int, hidden: int, activation: str,
                 checkpoints_every: int) -> vs.Trainer:
    """Built as serve builds it: on numpy with `cuda` "0", on CuPy with "require"."""
    config = vs.Config(checkpoint_dir=directory, base_model_path="", cuda=cuda, batch_size=batch, hidden=hidden,
                       n_features=N_FEATURES, activation=activation, lr=0.001, ckpt_interval_s=0.0,
                       min_samples_ckpt=checkpoints_every, gate_min_eval=50, eval_capacity=2000, keep_checkpoints=0,
                       seed=0)
    return vs.build_trainer(config)[0]


def train(cuda: str, steps: int, activation: str) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """Final live and EMA weights (host), the gate's verdicts, and seconds, after `steps` steps."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as directory:
        t = make_trainer(cuda, directory, 32, 64, activation, checkpoints_every=steps * 16 // 4)
        x, y = stream(steps * 18 + 1000)  # ~5% held out (by job_id), the rest trained 16 new per step
        verdicts, started, i = [], time.perf_counter(), 0
        while t.steps < steps:
            result = t.ingest(x[i], y[i], t.is_held_out(f"job-{i // 10}"), unnamed=False)
            if result is not None and result.checkpoint is not None:
                verdicts.append(result.checkpoint.record["gate"])
            i += 1
        live, ema = t.backend.to_host(t.model.flat), t.backend.to_host(t.ema.flat)
        return live, ema, verdicts, time.perf_counter() - started


def step_time(cuda: str, sync, batch: int, hidden: int, repeats: int) -> float:
    """Median seconds of one Trainer.step, batch new + replay samples already gathered on the host."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as directory:
        t = make_trainer(cuda, directory, batch, hidden, "relu", checkpoints_every=10**12)
        x, y = stream(t.n_new * 8)
        times = []
        for k in range(repeats + 10):  # the first 10 warm up (and fill the replay ring)
            block = slice((k % 8) * t.n_new, (k % 8 + 1) * t.n_new)
            t.pending_x[...], t.pending_y[...] = x[block], y[block]
            sync()
            started = time.perf_counter()
            t.step()
            sync()
            times.append(time.perf_counter() - started)
        return statistics.median(times[10:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--activation", default="relu", choices=vs.onnx_builder.ACTIVATION_KINDS)
    parser.add_argument("--repeats", type=int, default=200, help="timed steps per configuration")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the checkpoint log lines would bury the table
    try:
        import cupy
    except ImportError as e:
        print(f"gpu_check: CuPy is not installed ({e}); install cupy-cuda12x (or the build for this CUDA) "
              "on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    try:
        vs.select_backend("require")
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    except Exception as e:  # StartupError: no driver or no device, the reason in the message
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    name = name.decode() if isinstance(name, bytes) else str(name)
    device = cupy.cuda.Device(0)
    print(f"GPU: {name}, CuPy {cupy.__version__}, numpy {np.__version__}")

    cpu_live, cpu_ema, cpu_verdicts, cpu_s = train("0", args.steps, args.activation)
    gpu_live, gpu_ema, gpu_verdicts, gpu_s = train("require", args.steps, args.activation)
    d_live = float(np.max(np.abs(cpu_live.astype(np.float64) - gpu_live)))
    d_ema = float(np.max(np.abs(cpu_ema.astype(np.float64) - gpu_ema)))
    ok = d_live <= TOLERANCE and d_ema <= TOLERANCE and np.isfinite(gpu_live).all()
    print(f"{args.steps} steps, 80-64-1 {args.activation}, batch 32: numpy {cpu_s:.1f} s, cupy {gpu_s:.1f} s "
          f"(first cupy run includes kernel compilation)")
    print(f"max |delta| live weights {d_live:.3g}, EMA weights {d_ema:.3g} (limit {TOLERANCE:g}): "
          f"{'OK' if ok else 'MISMATCH'}")
    print(f"gate verdicts numpy {cpu_verdicts}, cupy {gpu_verdicts}"
          f"{'' if cpu_verdicts == gpu_verdicts else '  (differ)'}")

    print(f"\n{'median Trainer.step':<28}{'numpy ms':>10}{'cupy ms':>10}{'speedup':>9}")
    for batch, hidden in ((32, 64), (1024, 256)):
        cpu_t = step_time("0", lambda: None, batch, hidden, args.repeats)
        gpu_t = step_time("require", device.synchronize, batch, hidden, args.repeats)
        print(f"{f'batch {batch}, {N_FEATURES}-{hidden}-1':<28}{cpu_t * 1e3:>10.3f}{gpu_t * 1e3:>10.3f}"
              f"{cpu_t / gpu_t:>8.1f}x")
    if not ok:
        print("gpu_check: MISMATCH between numpy and CuPy weights", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
