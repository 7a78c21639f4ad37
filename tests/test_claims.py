"""One trainer per checkpoint directory: the socket and directory claims come before any state is read or
written, a refused sidecar names the holder and changes nothing, kill -9 releases both claims; replicas
scaled up and down hand their trainer state over (adoption); latest.onnx always holds the model latest.json
names, after start-up repair too."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import vmafx_sidecar as vs
from conftest import NUMERIC_ENV, ROOT, Sidecar, run_cli, sample

N_FEATURES = 6
# A checkpoint every 16 trained samples (4 steps of 4), the gate off: every checkpoint is published.
SETTINGS = dict(VMAFX_SIDECAR_N_FEATURES=str(N_FEATURES), VMAFX_SIDECAR_HIDDEN="5", VMAFX_SIDECAR_BATCH_SIZE="4",
                VMAFX_SIDECAR_REPLAY_MIX="0", VMAFX_SIDECAR_REPLAY_CAPACITY="32", VMAFX_SIDECAR_CKPT_INTERVAL_S="0",
                VMAFX_SIDECAR_MIN_SAMPLES_CKPT="16", VMAFX_SIDECAR_GATE="off")


def settings_for(directory: Path, adopt: Path | None = None) -> dict[str, str]:
    """A sidecar training in `directory` (and adopting from `adopt`)."""
    adopting = {"VMAFX_SIDECAR_ADOPT_DIR": str(adopt)} if adopt is not None else {}
    return {**SETTINGS, "VMAFX_SIDECAR_CHECKPOINT_DIR": str(directory), **adopting}


def run_serve(sidecar_socket: str, directory: Path, **env: str) -> subprocess.CompletedProcess:
    """A second `serve`, expected to exit on its own."""
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **NUMERIC_ENV, **SETTINGS,
                "VMAFX_SIDECAR_SOCKET": sidecar_socket, "VMAFX_SIDECAR_CHECKPOINT_DIR": str(directory),
                "VMAFX_BASE_MODEL_PATH": "", **env}
    return subprocess.run([sys.executable, "-m", "vmafx_sidecar", "serve"], env=full_env, capture_output=True,
                          text=True, timeout=30)


def feed(s: Sidecar, n: int, seed: int) -> list[dict]:
    client = s.client()
    rng = np.random.default_rng(seed)
    acks = [client.request(sample(rng, N_FEATURES, job_id=f"{seed}-{i}")) for i in range(n)]
    assert all(a["ok"] for a in acks), acks
    return acks


def status(s: Sidecar) -> dict:
    return s.client().request({"op": "status"})


def contents(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def trainer_files(directory: Path) -> set[str]:
    return {p.name for p in vs.trainer_state_in(directory)}


def assert_latest_model_is_named_one(directory: Path) -> None:
    latest = json.loads((directory / "latest.json").read_text())
    named = (directory / latest["file"]).read_bytes()
    assert (directory / "latest.onnx").read_bytes() == named
    digest = hashlib.sha256(named).hexdigest()
    assert latest["sha256"] == digest
    assert (directory / "latest.onnx.sha256").read_text() == f"{digest}  latest.onnx\n"


@pytest.fixture
def start(tmp_path):
    """start(directory, adopt=None): a sidecar on a socket of its own, killed at the end of the test."""
    sidecars: list[Sidecar] = []

    def start_in(directory: Path, adopt: Path | None = None) -> Sidecar:
        sidecars.append(Sidecar(tmp_path, settings_for(directory, adopt)))
        return sidecars[-1].start()

    yield start_in
    for s in sidecars:
        s.cleanup()


# ---- the directory claim ----

def test_second_sidecar_on_a_claimed_directory_exits_naming_the_holder_and_changes_nothing(tmp_path, start):
    directory = tmp_path / "models"
    first = start(directory)
    client = first.client()
    rng = np.random.default_rng(0)
    acks = [client.request(sample(rng, N_FEATURES, job_id=f"a-{i}")) for i in range(40)]
    assert acks[-1]["ok"] and any("checkpoint" in a for a in acks)
    before = contents(directory)

    other_socket = os.path.join(first.sockdir, "other.sock")
    done = run_serve(other_socket, directory)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and errors == done.stderr.strip().splitlines()[-1:], done.stderr
    assert f"checkpoint directory {directory} is claimed by another sidecar" in errors[0]
    assert f"pid {first.proc.pid} on {socket.gethostname()}, serving {first.socket}" in errors[0]
    assert "a directory of its own" in errors[0]
    assert contents(directory) == before  # snapshot, journal, checkpoints, latest files: byte for byte
    assert not os.path.exists(other_socket)

    # The first sidecar's client saw nothing and goes on.
    client.sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        client.sock.recv(1)
    client.sock.settimeout(5)
    ack = client.request(sample(rng, N_FEATURES, job_id="a-40"))
    assert ack["ok"] and ack["job_id"] == "a-40"
    assert status(first)["samples_accepted"] == 41


@pytest.mark.parametrize("claim", ["socket", "directory"])
def test_a_filesystem_that_takes_no_lock_stops_the_start_in_one_line_naming_the_lock(tmp_path, monkeypatch, claim):
    """NFSv3 without its lock service answers flock with ENOLCK: a traceback had said nothing of which file."""
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(vs.fcntl, "flock", no_locks)
    with pytest.raises(vs.StartupError) as refused:
        vs.lock_beside(str(tmp_path / "s.sock")) if claim == "socket" else vs.claim_directory(tmp_path / "ckpt", "me")
    lock = tmp_path / ("s.sock.lock" if claim == "socket" else f"ckpt/{vs.DIRECTORY_LOCK}")
    assert str(refused.value).startswith(f"cannot lock {lock}: {os.strerror(errno.ENOLCK)}: the sidecar needs")


def test_lock_file_names_its_holder_and_read_only_tools_work_beside_it(tmp_path, start):
    directory = tmp_path / "models"
    s = start(directory)
    feed(s, 20, seed=1)
    holder = (directory / ".trainer.lock").read_text()
    assert holder.startswith(f"pid {s.proc.pid} on {socket.gethostname()}, serving {s.socket}, since 20")
    assert (directory / ".trainer.lock").stat().st_mode & 0o777 == 0o600
    listing = run_cli("checkpoints", str(directory))
    assert listing.returncode == 0 and "published, latest" in listing.stdout, listing.stdout + listing.stderr
    verify = run_cli("verify", str(directory))
    assert verify.returncode == 0 and "FAILED" not in verify.stdout, verify.stdout + verify.stderr
    assert f"ok      {directory / 'latest.onnx'}" in verify.stdout
    assert status(s)["samples_accepted"] == 20  # still serving


def test_same_socket_twice_exits_before_touching_any_state(tmp_path, start):
    directory = tmp_path / "models"
    first = start(directory)
    feed(first, 40, seed=2)
    before = contents(directory)
    same_directory = run_serve(first.socket, directory)
    assert same_directory.returncode == 1 and "already listening" in same_directory.stderr
    assert contents(directory) == before  # .state/ above all: a second process must not restore or rewrite it
    fresh = tmp_path / "fresh"
    other_directory = run_serve(first.socket, fresh)
    assert other_directory.returncode == 1 and "already listening" in other_directory.stderr
    assert not fresh.exists()  # the socket claim came first: its directory was never even created
    assert status(first)["samples_accepted"] == 40


def test_kill_9_releases_both_claims_and_the_next_sidecar_loses_nothing(tmp_path, start):
    directory = tmp_path / "models"
    first = start(directory)
    acks = feed(first, 37, seed=3)  # mid-batch, after a checkpoint
    first.stop(signal.SIGKILL)
    second = start(directory)  # a claim still held would make it exit 1 at once
    resumed = status(second)
    assert resumed["samples_accepted"] == 37 and resumed["steps"] == acks[-1]["step"]
    assert (directory / ".trainer.lock").read_text().startswith(f"pid {second.proc.pid} ")


def half_moved(parent: Path, replica: Path, moved: tuple[str, ...]) -> dict[str, bytes]:
    """What a kill -9 leaves after `moved` entries of an adoption of parent's state by replica: both markers, those
    entries there, the rest still here. The directory's files before the move, for comparing."""
    everything = {n: c for n, c in contents(parent).items() if n != ".trainer.lock"}
    replica.mkdir()
    (parent / ".adopted-by").write_text(f"{replica}\n")
    (replica / ".adopting").write_text(f"{parent}\n")
    for name in moved:
        (parent / name).rename(replica / name)
    return everything


def test_a_trainer_whose_state_a_crash_left_half_moved_takes_it_back_and_can_hand_it_over_again(tmp_path, start):
    """1 -> N, pod 0 killed mid-move, then back to 1 replica: the single trainer started with the half of its state
    left (the checkpoints, no .state: none of its 40 samples), and pod 0 could never start again."""
    parent, replica = tmp_path / "online", tmp_path / "online" / "node-0"
    single = start(parent, adopt=replica)  # the chart's Deployment
    feed(single, 40, seed=41)
    single.stop()
    everything = half_moved(parent, replica, (".state", "model_v000001.onnx"))
    single = start(parent, adopt=replica)
    assert (status(single)["samples_accepted"], status(single)["checkpoint_version"]) == (40, 2)
    assert "took back the trainer state a crash left half moved to" in single.stderr()
    assert trainer_files(replica) == set() and not (replica / ".adopting").exists()
    assert not (parent / ".adopted-by").exists()
    single.stop()
    assert {n: c for n, c in contents(parent).items() if n != ".trainer.lock" and not n.startswith(("node-0/",
            ".state/"))} == {n: c for n, c in everything.items() if not n.startswith(".state/")}
    pod = start(replica, adopt=parent)  # 1 -> N again
    assert (status(pod)["samples_accepted"], status(pod)["checkpoint_version"]) == (40, 2)


def test_a_half_move_whose_markers_spell_the_directories_otherwise_is_still_taken_back(tmp_path, start):
    """A replica configured with VMAFX_SIDECAR_ADOPT_DIR=<replica>/../online (or through a symbolic link) wrote that
    spelling into its marker: the source took the move for ended, dropped its marker, started fresh, and the
    replica could never start again."""
    parent, replica = tmp_path / "online", tmp_path / "online" / "node-0"
    single = start(parent)
    feed(single, 40, seed=43)
    single.stop()
    half_moved(parent, replica, (".state", "model_v000001.onnx"))
    (tmp_path / "link").symlink_to(tmp_path)
    (replica / ".adopting").write_text(f"{replica}/../../link/online\n")
    single = start(parent)
    assert status(single)["samples_accepted"] == 40
    assert "took back the trainer state a crash left half moved to" in single.stderr()


def test_markers_and_the_lock_hold_paths_that_are_not_utf8(tmp_path):
    """A socket path or an adopted directory in Latin-1 (a start from a shell): the start had stopped with a
    UnicodeEncodeError, after writing the first of a move's two markers."""
    source, directory = Path(os.fsdecode(bytes(tmp_path) + b"/src\xff")), tmp_path / "ckpt"
    (source / ".state").mkdir(parents=True)
    (source / ".state" / "snapshot.bin").write_bytes(b"a state")
    sock = os.fsdecode(bytes(tmp_path) + b"/s\xff.sock")
    os.close(vs.claim_directory(directory, f"pid 1, socket {sock}"))
    assert b"/s\xff.sock" in (directory / vs.DIRECTORY_LOCK).read_bytes()
    vs.adopt_trainer_state(directory, source, "pid 1")
    assert (directory / ".state" / "snapshot.bin").read_bytes() == b"a state"
    assert not (directory / vs.ADOPTING).exists() and not (source / vs.ADOPTED_BY).exists()


@pytest.mark.parametrize("adopt", [True, False], ids=["as configured", "its setting gone since"])
def test_a_replica_a_crash_stopped_mid_move_finishes_it_whatever_its_setting(tmp_path, start, adopt):
    """Restarted without VMAFX_SIDECAR_ADOPT_DIR, it took its half for a state, pointed latest.json back at v1
    and published a second v2; later, with the setting back, it could not start."""
    parent, replica = tmp_path / "online", tmp_path / "online" / "node-0"
    single = start(parent)
    feed(single, 40, seed=42)
    single.stop()
    half_moved(parent, replica, (".state", "latest.json", "model_v000001.onnx"))
    pod = start(replica, adopt=parent if adopt else None)
    assert (status(pod)["samples_accepted"], status(pod)["checkpoint_version"]) == (40, 2)
    assert trainer_files(parent) == set() and not (parent / ".adopted-by").exists()


def test_a_second_replica_leaves_a_state_half_moved_to_the_first_alone(tmp_path, start):
    """Two replicas adopting one directory (a Parallel StatefulSet), the first killed mid-move: the second took the
    rest, and the state ended split, two sidecars publishing the same versions."""
    parent, replicas = tmp_path / "online", [tmp_path / "online" / f"node-{i}" for i in (0, 1)]
    single = start(parent)
    feed(single, 40, seed=43)
    single.stop()
    half_moved(parent, replicas[0], (".state",))
    second = start(replicas[1], adopt=parent)
    assert status(second)["samples_accepted"] == 0 and trainer_files(replicas[1]) == {".state", "quarantine"}
    assert "not adopting the trainer state in" in second.stderr()
    first = start(replicas[0], adopt=parent)
    assert (status(first)["samples_accepted"], status(first)["checkpoint_version"]) == (40, 2)


def test_a_replica_leaves_alone_a_directory_a_crash_left_half_way_through_adopting(tmp_path):
    """N -> 1, the single trainer killed while it took replica 0's state, then replica 1 (ADOPT_DIR the single
    trainer's directory) started first: it took the half that had moved, and the state ended split."""
    parent, replicas = tmp_path / "online", [tmp_path / "online" / f"node-{i}" for i in (0, 1)]
    replicas[0].mkdir(parents=True)
    replicas[1].mkdir()
    for name in ("latest.json", "model_v000001.onnx", "model_v000001.json"):
        (replicas[0] / name).write_text(name)
    (replicas[0] / ".state").mkdir()
    (replicas[0] / ".adopted-by").write_text(f"{parent}\n")
    (parent / ".adopting").write_text(f"{replicas[0]}\n")
    for name in (".state", "latest.json"):
        (replicas[0] / name).rename(parent / name)
    vs.adopt_trainer_state(replicas[1], parent, "replica 1")
    assert trainer_files(replicas[1]) == set() and trainer_files(parent) == {".state", "latest.json"}
    vs.adopt_trainer_state(replicas[0], parent, "replica 0")  # takes back what had moved
    assert trainer_files(replicas[0]) == {".state", "latest.json", "model_v000001.onnx", "model_v000001.json"}
    assert not {".adopting", ".adopted-by"} & {p.name for p in (*parent.iterdir(), *replicas[0].iterdir())}


def test_a_marker_write_the_disk_refused_leaves_a_move_that_the_next_start_makes_whole(tmp_path, monkeypatch):
    parent, replica = tmp_path / "online", tmp_path / "online" / "node-0"
    (parent / ".state").mkdir(parents=True)
    (parent / "model_v000001.onnx").write_bytes(b"model")
    replica.mkdir()
    real = vs.write_synced

    def full(path: Path, chunks: list, mode: int = 0o644) -> None:
        if path.name == ".adopting.tmp":
            path.write_bytes(b"")  # created, then refused: as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, chunks, mode)

    monkeypatch.setattr(vs, "write_synced", full)
    with pytest.raises(vs.StartupError, match="No space left on device"):
        vs.adopt_trainer_state(replica, parent, "test")
    monkeypatch.undo()
    assert not (replica / ".adopting").exists() and trainer_files(parent) == {".state", "model_v000001.onnx"}
    vs.adopt_trainer_state(replica, parent, "test")  # room again
    assert trainer_files(replica) == {".state", "model_v000001.onnx"} and trainer_files(parent) == set()
    assert not {".adopting", ".adopted-by"} & {p.name for p in (*parent.iterdir(), *replica.iterdir())}


@pytest.mark.parametrize("marker", ["", "relative/path", "\udcff"], ids=["empty", "relative", "not UTF-8"])
def test_a_move_marker_that_names_no_directory_stops_the_start_in_one_line(tmp_path, monkeypatch, marker):
    """An empty marker was read as the working directory, taken for the source."""
    monkeypatch.chdir(tmp_path)  # what a regression would claim and write into
    replica = tmp_path / "node-0"
    replica.mkdir()
    (replica / ".adopting").write_bytes(marker.encode("utf-8", "surrogateescape"))
    with pytest.raises(vs.StartupError, match=r"\.adopting"):
        vs.adopt_trainer_state(replica, None, "test")


def test_an_adopt_dir_that_is_a_file_stops_the_start_in_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    done = run_serve(str(tmp_path / "s.sock"), tmp_path / "models", VMAFX_SIDECAR_ADOPT_DIR=str(tmp_path / "a-file"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"cannot read {tmp_path / 'a-file'}: Not a directory" in done.stderr


def test_adopt_dir_must_differ_from_the_checkpoint_directory(tmp_path):
    directory = tmp_path / "models"
    done = run_serve(str(tmp_path / "s.sock"), directory, VMAFX_SIDECAR_ADOPT_DIR=str(directory / "."))
    assert done.returncode == 2 and "VMAFX_SIDECAR_ADOPT_DIR" in done.stderr
    assert not directory.exists()


# ---- latest.onnx ----

def test_latest_onnx_follows_every_published_checkpoint(tmp_path, start):
    directory = tmp_path / "models"
    s = start(directory)
    client = s.client()
    rng = np.random.default_rng(4)
    published = 0
    for i in range(80):
        ack = client.request(sample(rng, N_FEATURES, job_id=f"l-{i}"))
        if "checkpoint" in ack:
            published += 1
            assert_latest_model_is_named_one(directory)  # already when the ACK names the checkpoint
            assert json.loads((directory / "latest.json").read_text())["file"] == Path(ack["checkpoint"]).name
    assert published == 5
    assert not list(directory.glob(".*.tmp"))


def crash_states(directory: Path) -> dict[str, dict[str, bytes]]:
    """What a kill -9 can leave while v2 is published over v1: each prefix of the write sequence
    (checkpoint files, then latest.onnx, latest.onnx.sha256 and latest.json, each via a temp file), plus an
    older version's directory that has no latest.onnx at all."""
    v1, v2 = (json.loads((directory / f"model_v{v:06d}.json").read_text()) for v in (1, 2))
    files = contents(directory)
    model = {v["version"]: files[v["file"]] for v in (v1, v2)}

    def pointing(onnx_version: int, sha_version: int, json_version: int, **extra: bytes) -> dict[str, bytes]:
        record = {1: v1, 2: v2}
        return {**files, "latest.onnx": model[onnx_version],
                "latest.onnx.sha256": f"{record[sha_version]['sha256']}  latest.onnx\n".encode(),
                "latest.json": (json.dumps(record[json_version], indent=2) + "\n").encode(), **extra}

    no_latest_model = {n: c for n, c in pointing(2, 2, 2).items() if not n.startswith("latest.onnx")}
    return {"before-pointing": pointing(1, 1, 1),
            "temp-of-latest.onnx": pointing(1, 1, 1, **{".latest.onnx.tmp": model[2][:100]}),
            "after-latest.onnx": pointing(2, 1, 1),
            "after-its-sha256": pointing(2, 2, 1, **{".latest.json.tmp": b"{\"vers"}),
            "written-by-an-older-version": no_latest_model}


@pytest.mark.parametrize("state", ["before-pointing", "temp-of-latest.onnx", "after-latest.onnx",
                                   "after-its-sha256", "written-by-an-older-version"])
def test_start_up_repairs_latest_onnx_whatever_a_crash_left(tmp_path, start, state):
    directory = tmp_path / "models"
    s = start(directory)
    feed(s, 32, seed=5)  # v1 and v2
    s.stop()
    left = crash_states(directory)[state]
    shutil.rmtree(directory)
    for name, content in left.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(content)
    s = start(directory)
    assert json.loads((directory / "latest.json").read_text())["version"] == 2
    assert_latest_model_is_named_one(directory)
    assert not list(directory.glob(".*.tmp"))
    assert status(s)["checkpoint_version"] == 2


def test_rollback_recipe_moves_all_three_pointers_back(tmp_path, start):
    directory = tmp_path / "models"
    s = start(directory)
    feed(s, 32, seed=6)
    s.stop()
    for name in ("model_v000002.onnx", "model_v000002.onnx.sha256", "model_v000002.json"):  # the README's recipe
        (directory / name).rename(directory / "quarantine" / name)
    s = start(directory)
    assert json.loads((directory / "latest.json").read_text())["version"] == 1
    assert_latest_model_is_named_one(directory)
    assert status(s)["checkpoint_version"] == 1


# ---- adoption: scaling replicas up and down hands the trainer state over ----

def test_scaling_1_to_3_to_1_to_3_keeps_every_trainer_state_and_numbering(tmp_path, start):
    parent = tmp_path / "online"
    replicas = [parent / f"node-{i}" for i in range(3)]

    single = start(parent, adopt=replicas[0])  # the chart's Deployment: adopts replica 0 if any
    feed(single, 40, seed=10)
    assert status(single)["checkpoint_version"] == 2
    single.stop()
    single_state = trainer_files(parent)

    # 1 -> 3: replica 0, started first, takes the single trainer's state over; the others start afresh.
    scaled = [start(replicas[i], adopt=parent) for i in range(3)]
    assert trainer_files(parent) == set()  # nothing left where later tooling would take it for a trainer
    assert trainer_files(replicas[0]) >= single_state
    first = status(scaled[0])
    assert (first["samples_accepted"], first["checkpoint_version"]) == (40, 2)
    assert [status(r)["samples_accepted"] for r in scaled[1:]] == [0, 0]
    acks = feed(scaled[0], 24, seed=11)
    assert Path(acks[-1]["checkpoint"]) == replicas[0] / "model_v000004.onnx"  # numbering continues
    for i, r in enumerate(scaled[1:], start=1):
        feed(r, 16 * i, seed=11 + i)
    for r in scaled:
        assert r.stop() == 0
    kept = {i: contents(replicas[i]) for i in (1, 2)}

    # 3 -> 1: the single trainer continues replica 0; replicas 1 and 2 stay as they were.
    single = start(parent, adopt=replicas[0])
    back = status(single)
    assert (back["samples_accepted"], back["checkpoint_version"]) == (64, 4)
    assert trainer_files(replicas[0]) == set()
    assert {i: contents(replicas[i]) for i in (1, 2)} == kept
    acks = feed(single, 16, seed=20)
    assert Path(acks[-1]["checkpoint"]) == parent / "model_v000005.onnx"
    assert_latest_model_is_named_one(parent)
    assert single.stop() == 0

    # 1 -> 3 again: replica 0 takes it over once more; replicas 1 and 2 resume their own state.
    scaled = [start(replicas[i], adopt=parent) for i in range(3)]
    assert [status(r)["samples_accepted"] for r in scaled] == [80, 16, 32]
    assert [status(r)["checkpoint_version"] for r in scaled] == [5, 1, 2]
    verify = run_cli("verify", str(replicas[0]))
    assert verify.returncode == 0, verify.stdout


def test_adoption_waits_for_the_trainer_that_still_holds_the_source(tmp_path, start):
    parent, replica = tmp_path / "online", tmp_path / "online" / "node-0"
    single = start(parent)
    feed(single, 20, seed=30)
    single.stop()
    fd = os.open(parent / ".trainer.lock", os.O_RDWR)  # a trainer still stopping there, as in a rollout
    fcntl.flock(fd, fcntl.LOCK_EX)
    while_held = {}

    def release() -> None:
        while_held.update(replica=trainer_files(replica), parent=trainer_files(parent))
        os.close(fd)

    timer = threading.Timer(1.5, release)
    timer.start()
    waiting = start(replica, adopt=parent)  # answers once it has adopted
    timer.join()
    assert while_held["replica"] == set() and ".state" in while_held["parent"]  # nothing moved while claimed
    assert status(waiting)["samples_accepted"] == 20, waiting.stderr()
    assert "adopted the trainer state in" in waiting.stderr()


def test_a_sigterm_while_an_adoption_waits_stops_the_start_at_once_as_pid_1_needs(tmp_path, start):
    """In its container the sidecar is PID 1, which gets only the signals it handles: the handler came with the
    server's loop, and a SIGTERM during a start (here the adoption's minute) was dropped, the pod killed at the end
    of its grace period (the container hunt). The start now ends where it is, as a kill would, exit 0."""
    parent, replica = tmp_path / "online", tmp_path / "online" / "node-0"
    single = start(parent)
    feed(single, 20, seed=31)
    single.stop()
    fd = os.open(parent / ".trainer.lock", os.O_RDWR)  # the single trainer still stopping
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **NUMERIC_ENV,
               **settings_for(replica, adopt=parent), "VMAFX_BASE_MODEL_PATH": "",
               "VMAFX_SIDECAR_SOCKET": str(tmp_path / "s.sock")}
        waiting = subprocess.Popen([sys.executable, "-m", "vmafx_sidecar", "serve"], env=env, stderr=subprocess.PIPE,
                                   text=True)
        said = waiting.stderr.readline()
        assert f"waiting up to 60 s for the sidecar that holds {parent / '.trainer.lock'} to stop" in said, said
        stopped_at = time.monotonic()
        waiting.send_signal(signal.SIGTERM)
        assert waiting.wait(timeout=10) == 0
        assert time.monotonic() - stopped_at < 5
        assert "stopped by SIGTERM before serving: the next start goes on from what is on disk" in waiting.stderr.read()
    finally:
        os.close(fd)
    assert trainer_files(replica) == set() and ".state" in trainer_files(parent)  # nothing moved


def test_adoption_that_waited_out_its_minute_says_the_holder_still_runs_not_that_it_is_misconfigured(tmp_path,
                                                                                                  monkeypatch):
    """A scale-up's pod 0 waits for the single trainer to stop; past ADOPT_WAIT_S it exits to be restarted, as the
    chart's README says. Its last line had ended in the advice for two trainers configured on one directory."""
    monkeypatch.setattr(vs, "ADOPT_WAIT_S", 0.2)
    parent, replica = tmp_path / "online", tmp_path / "online" / "node-0"
    (parent / ".state").mkdir(parents=True)
    fd = vs.claim_directory(parent, "the single trainer")
    try:
        with pytest.raises(vs.StartupError) as refused:
            vs.adopt_trainer_state(replica, parent, "pod 0")
    finally:
        os.close(fd)
    assert str(refused.value) == (f"cannot adopt the trainer state in {parent} yet: the sidecar that holds it (the "
                                  "single trainer) still runs after 0.2 s; the next start tries again")


def test_adoption_interrupted_midway_resumes_on_the_next_start(tmp_path, start):
    parent, replica = tmp_path / "online", tmp_path / "online" / "node-0"
    single = start(parent)
    feed(single, 40, seed=40)
    single.stop()
    everything = contents(parent)
    # What a kill -9 after two moves leaves: the marker, two entries here, the rest still in the source.
    replica.mkdir()
    (replica / ".adopting").write_text(f"{parent}\n")
    for name in (".state", "model_v000001.onnx"):
        (parent / name).rename(replica / name)
    s = start(replica, adopt=parent)
    assert not (replica / ".adopting").exists() and trainer_files(parent) == set()
    moved = contents(replica)
    assert {n: c for n, c in moved.items() if n != ".trainer.lock" and not n.startswith(".state/")} == \
        {n: c for n, c in everything.items() if n != ".trainer.lock" and not n.startswith(".state/")}
    assert (status(s)["samples_accepted"], status(s)["checkpoint_version"]) == (40, 2)


def test_a_full_disk_costs_the_holders_name_not_the_claim(tmp_path, monkeypatch):
    """The holder's name is written into the lock file after the lock is taken: on a full disk that write had
    stopped the start with a traceback. The claim holds; a second sidecar is refused without the name."""
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    fd = vs.claim_directory(tmp_path / "ckpt", "pid 1 on a full disk")
    monkeypatch.undo()
    try:
        with pytest.raises(vs.StartupError, match=r"claimed by another sidecar \(it has not written its name yet\)"):
            vs.claim_directory(tmp_path / "ckpt", "pid 2")
    finally:
        os.close(fd)
