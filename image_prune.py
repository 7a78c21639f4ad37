"""Delete from the image's runtime layer, a `pip install --target DIR` of the sidecar, what the sidecar never
loads: the test suites and test data its dependencies ship in their wheels, and pip's console scripts. Then
import what it does load from DIR alone, so that a rule that removed too much fails the build.

The Dockerfile runs it on /app, and tests/test_image.py runs the Dockerfile's own build step, so that both
prune by the rules below: `python image_prune.py DIR` (stdlib only: the build stage has nothing else).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

# Glob patterns under DIR, each a rule by name rather than a list of one release's files, so that they hold for
# whichever numpy and onnx pip picks; the import check below, and the image test, catch a rule that outgrows
# its reason.
PRUNED = (
    # Console scripts whose shebang names the build stage's interpreter; the image runs `python3 -m`.
    "bin",
    # A package's own test suite, by the convention numpy follows (one per subpackage, with data files):
    # nothing outside a test run imports a module named `tests`.
    "**/tests",
    # onnx's unit tests (onnx/test, in older wheels: 1.16's) and its backend conformance suite (onnx/backend/test:
    # a runner for those who write an onnx backend, and ~10 MB of test models and tensors). Only onnx's
    # operator-doc generator (onnx/defs/gen_doc.py) imports them.
    "onnx/**/test",
)

# What the sidecar imports, and what it loads on first use: numpy.random (numpy 2 imports it lazily) and
# onnx.reference's operators (the first ReferenceEvaluator loads every one of them). Measured with
# `python -X importtime` over `serve` with the gate on and `verify`: nothing else but the standard library.
RUNTIME_IMPORTS = ("vmafx_sidecar", "numpy.random", "onnx.reference.ops")


def prune(target: Path) -> dict[str, int]:
    """Delete what PRUNED matches under `target`: the bytes freed, by rule."""
    freed = {}
    for pattern in PRUNED:
        freed[pattern] = 0
        for path in sorted(target.glob(pattern)):
            if path.is_dir():  # not already gone with a match above it
                freed[pattern] += size(path)
                shutil.rmtree(path)
    return freed


def size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def check_imports(target: Path) -> None:
    """Import RUNTIME_IMPORTS from `target` alone: -S, no site-packages; cwd `target`, not the sources beside
    this script; -B, since a timestamp .pyc left there would be kept by compileall in place of the
    unchecked-hash one the image needs."""
    subprocess.run([sys.executable, "-S", "-B", "-c", f"import {', '.join(RUNTIME_IMPORTS)}"], cwd=target,
                   env={"PYTHONPATH": str(target)}, check=True)


def main(argv: list[str]) -> int:
    (target,) = map(Path, argv)
    for pattern, freed in prune(target).items():
        print(f"image_prune: {pattern}: {freed / 1e6:.1f} MB")
    check_imports(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
