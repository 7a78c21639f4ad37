"""benchmarks/bench_fleet.py: a smoke run of its throughput part (the one that needs no VMAF model from
../shared) keeps it working as the fleet it times changes: it had called replica_samples with the arguments
of three changes before, and ended in a TypeError. Its figures are for people to read, not asserted here."""
import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_fleet  # noqa: E402


def test_bench_fleet_times_a_fleet_run_and_its_reading_at_the_default_model_size():
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        bench_fleet.wide_throughput(np.random.default_rng(0), 2000, 1)
    rows = [line.strip("|").split("|") for line in printed.getvalue().splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 1, printed.getvalue()
    fleet, reading, ingesting = (float(rows[0][i].replace(",", "")) for i in (1, 4, 5))
    assert fleet > 0 and reading > 0 and ingesting > 0, printed.getvalue()


def test_the_learning_benchmarks_say_which_file_they_lack(tmp_path):
    """bench_learning and bench_fleet learn from ../shared's VMAF model; without it they ended in a bare
    FileNotFoundError, which named the file but not what it is or where BENCHMARKS.md says it comes from."""
    missing = tmp_path / "vmaf_v0.6.1.json"
    with pytest.raises(SystemExit) as stop:
        bench_fleet.VmafTeacher.load(missing)
    assert str(missing) in str(stop.value) and "VMAF v0.6.1" in str(stop.value) and "BENCHMARKS.md" in str(stop.value)
