"""Time the trainer-state snapshot with full rings (it runs inline, so it delays ACKs).

    .venv/bin/python benchmarks/bench_snapshot.py [--capacity 10000] [--held N] [--runs 20]

Builds the trainer as `serve` does, with vmafx_sidecar.build_trainer (a fresh 80-64-1 model, default
settings), fills the replay buffer (with `--held` samples, all it holds by default) and the evaluation ring, then
times StateStore.save() (serialize, checksum, write, fsync, rename, fsync the directory, empty the journal) and the
restore at start-up, and measures what the restore allocates beyond the rings at its peak (tracemalloc, in a
second restore: what a memory limit must leave room for at a restart).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vmafx_sidecar as vs  # noqa: E402  before numpy: it pins BLAS to one thread, as in the server

import numpy as np  # noqa: E402


def build(directory: str, capacity: int) -> vs.Server:
    config = vs.Config(checkpoint_dir=directory, base_model_path="", replay_capacity=capacity,
                       min_samples_ckpt=10**9)
    trainer, _ = vs.build_trainer(config)
    return vs.Server(config, trainer, vs.StateStore(config, trainer))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capacity", type=int, default=10000)
    parser.add_argument("--held", type=int, help="samples in the replay ring (default: its capacity)")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    held = args.capacity if args.held is None else args.held
    with tempfile.TemporaryDirectory(prefix="vmafx-bench-snapshot-") as tmp:
        server = build(tmp, args.capacity)
        server.state.restore()
        data = np.random.default_rng(1)
        for _ in range(held):
            server.trainer.add(data.uniform(0, 1, 80).astype(np.float32), np.float32(data.uniform(20, 100)))
        held_out = server.config.eval_capacity  # a ring not full is saved as what it holds: both full, as they run
        server.trainer.eval.extend(data.uniform(0, 1, (held_out, 80)).astype(np.float32),
                                   data.uniform(20, 100, held_out).astype(np.float32))
        times = []
        for _ in range(args.runs):
            started = time.perf_counter()
            server.state.save()
            times.append((time.perf_counter() - started) * 1e3)
        size = (Path(tmp) / ".state" / "snapshot.bin").stat().st_size
        started = time.perf_counter()
        build(tmp, args.capacity).state.restore()
        restore_ms = (time.perf_counter() - started) * 1e3
        restarted = build(tmp, args.capacity)
        tracemalloc.start()
        restarted.state.restore()
        restore_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(f"replay buffer {held} in {args.capacity} x 80 and evaluation ring {held_out} x 80, full: snapshot "
          f"{size / 1e6:.1f} MB")
    print("| figure | value |\n|---|---|")
    print(f"| snapshot, median of {args.runs} | {statistics.median(times):.1f} ms |")
    print(f"| snapshot, max | {max(times):.1f} ms |")
    print(f"| restore at start-up | {restore_ms:.1f} ms |")
    print(f"| restore's peak allocations beyond the rings | {restore_peak / 1e6:.1f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
