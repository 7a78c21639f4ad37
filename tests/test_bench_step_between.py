"""benchmarks/bench_step_between.py: a smoke run keeps it working as the trainer it times changes. Its figures are
for people to read (BENCHMARKS.md, issue 19), not asserted here."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODES = ("alone", "neighbour", "self", "self, idle", "partner, same", "partner, other")


@pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="the bench pins its processes to CPUs 0 and 1")
def test_bench_step_between_times_the_step_in_every_configuration():
    bench = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step_between.py"), "--rounds", "1",
                            "--steps", "20"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0, bench.stdout + bench.stderr
    header, _, row = (line.strip("|").split("|") for line in bench.stdout.splitlines() if line.startswith("|"))
    columns = dict(zip((name.strip() for name in header), (float(cell) for cell in row)))
    assert [name for name in columns if name.startswith("step, ")] == [f"step, {mode}" for mode in MODES]
    assert sum(name.startswith("a line's parse, ") for name in columns) == 4  # the modes with lines
    assert all(value > 0 for value in columns.values()), bench.stdout
