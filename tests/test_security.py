"""Socket and file security: modes, the lock beside the socket, symlinks never followed."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, sample


def serve(socket_path: str, checkpoint_dir: Path, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "VMAFX_SIDECAR_SOCKET": socket_path,
            "VMAFX_SIDECAR_CHECKPOINT_DIR": str(checkpoint_dir), "VMAFX_BASE_MODEL_PATH": ""}
    return subprocess.run([sys.executable, "-m", "vmafx_sidecar", "serve"], env={**base, **env},
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def short_dir():
    with tempfile.TemporaryDirectory(prefix="vx") as d:
        yield Path(d)


def test_socket_mode_setting_is_the_only_way_to_widen_it(sidecar_factory):
    s = sidecar_factory(VMAFX_SIDECAR_SOCKET_MODE="0660")
    assert stat.S_IMODE(os.stat(s.socket).st_mode) == 0o660


@pytest.mark.parametrize("mode", ["0666", "0644", "0400", "rw", "0o600"])
def test_socket_modes_open_to_others_or_not_octal_are_refused(short_dir, mode):
    done = serve(str(short_dir / "s.sock"), short_dir / "ckpt", VMAFX_SIDECAR_SOCKET_MODE=mode)
    assert done.returncode == 2 and "VMAFX_SIDECAR_SOCKET_MODE" in done.stderr


def test_lock_file_keeps_a_second_sidecar_off_the_path(sidecar, tmp_path):
    lock = Path(sidecar.socket + ".lock")
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    os.unlink(sidecar.socket)  # even with the socket file gone, the lock still says who owns the path
    done = serve(sidecar.socket, tmp_path / "other")
    assert done.returncode == 1 and "already listening" in done.stderr and ".lock" in done.stderr
    assert not os.path.exists(sidecar.socket)


def test_symlink_at_the_socket_path_is_neither_followed_nor_removed(short_dir, tmp_path):
    target = tmp_path / "precious"
    target.write_text("data\n")
    link = short_dir / "s.sock"
    link.symlink_to(target)
    done = serve(str(link), short_dir / "ckpt")
    assert done.returncode == 1 and "not a socket" in done.stderr
    assert link.is_symlink() and target.read_text() == "data\n"


def test_symlinked_checkpoint_directory_is_refused(short_dir, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (short_dir / "ckpt").symlink_to(real)
    done = serve(str(short_dir / "s.sock"), short_dir / "ckpt")
    assert done.returncode == 1 and "symlink" in done.stderr and "configure the real path" in done.stderr


def test_files_are_never_world_writable(sidecar_factory, tmp_path):
    # The gate off, so that the checkpoint is published beside latest.json rather than quarantined.
    s = sidecar_factory(VMAFX_SIDECAR_CKPT_INTERVAL_S="0", VMAFX_SIDECAR_MIN_SAMPLES_CKPT="16",
                        VMAFX_SIDECAR_GATE="off")
    client = s.client()
    rng = np.random.default_rng(0)
    acks = [client.request(sample(rng)) for _ in range(16)]
    assert acks[-1]["checkpoint"]
    assert s.stop() == 0
    for path in [*s.checkpoint_dir.rglob("*"), Path(s.socket + ".lock")]:
        assert not path.stat().st_mode & stat.S_IWOTH, path
    for name in ("model_v000001.onnx", "model_v000001.onnx.sha256"):
        assert stat.S_IMODE((s.checkpoint_dir / name).stat().st_mode) == 0o644
