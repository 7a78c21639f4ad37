"""Time the trainer-state snapshot with full rings (it runs inline, so it delays ACKs).

    .venv/bin/python benchmarks/bench_snapshot.py [--capacity 10000] [--runs 20]

Builds the trainer as `serve` does, with vmafx_sidecar.build_trainer (a fresh 80-64-1 model, default
settings), fills the replay buffer and the evaluation ring, then times StateStore.save() (serialize, checksum,
write, fsync, rename, fsync the directory, empty the journal) and the restore at start-up.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
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
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmafx-bench-snapshot-") as tmp:
        server = build(tmp, args.capacity)
        server.state.restore()
        data = np.random.default_rng(1)
        for _ in range(args.capacity):
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
    print(f"replay buffer {args.capacity} x 80 and evaluation ring {held_out} x 80, full: snapshot "
          f"{size / 1e6:.1f} MB")
    print("| figure | value |\n|---|---|")
    print(f"| snapshot, median of {args.runs} | {statistics.median(times):.1f} ms |")
    print(f"| snapshot, max | {max(times):.1f} ms |")
    print(f"| restore at start-up | {restore_ms:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
