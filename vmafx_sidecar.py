"""vmafx-sidecar: online fine-tuning of the VMAFX quality regressor.

vmafx-node sends each finished job's feature vector and true score over a Unix
socket; this process trains a small MLP on that stream (SGD with momentum, an EMA
shadow, a replay buffer against forgetting) and now and then writes the EMA
weights as a versioned ONNX checkpoint that nodes load.

One process, one thread: a selectors loop owns the socket, every connection and
the training step. The sections follow a sample, after the start-up ones (probe,
an early exit before numpy and onnx; config; claims, one sidecar per socket and
directory):

  server      Server.on_connection_ready -> read -> take_lines -> answer, then the
              turn's end_turn: its samples journaled in one write, then its ACKs sent
              (and publish_when_idle: a checkpoint that fell due after traffic stopped)
  protocol    parse_request (and encode_ack or untrained_ack, the answer's last step)
  state       StateStore.record_sample, then StateStore.commit: journaled before its ACK
  sample log  SampleLog.append: with VMAFX_SIDECAR_SAMPLE_LOG=1, logged for the fleet
  trainer     Trainer.is_held_out -> ingest -> add -> step, which goes through
    backend     the array module (numpy or CuPy) the rings and the model use
    rings       Ring.extend, Ring.sample_into: a batch of new and replayed samples
    coordinates Coordinates.of_samples (mean_and_spread) for Trainer.take_statistics
                (provisional at a fresh model's first step, final once the replay ring holds
                enough samples; Trainer.retake_statistics for a feature that changes its
                regime), remap to move the weights there; then Trainer.standardize: the batch
                in the model's standardized coordinates
    model       MLP.forward for Trainer.validate (into the gate's Window), then
                MLP.loss_and_grad: forward pass and backprop
              then Trainer.apply_gradient -> checkpoint_due -> take_checkpoint
  gate        gather_evidence (Window.evidence; Trainer.history less the wild scores
              plausible_scores finds, predictions then scored) -> judge: a Verdict
  publish     publish -> write_checkpoint
  checkpoints CheckpointWriter.stage -> readback_problem -> place -> point_latest

then the fleet trainer (fleet: the same path, fed by every replica's sample log),
and what watches or feeds that path: the prometheus endpoint, base models, the
CLI (serve, demo), the checkpoint tools and the command line.

The producer side (the probe, FeedbackClient, the send and status commands) lives
in vmafx_feedback, standard library only; this module imports it, never the reverse.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import dataclasses
import datetime
import errno
import fcntl
import fractions
import functools
import hashlib
import heapq
import importlib.metadata
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import pickle
import pickletools
import re
import resource
import secrets
import select
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import vmafx_feedback as feedback
from vmafx_feedback import DEFAULT_SOCKET

# Deprecated: producers import FeedbackClient from vmafx_feedback, which loads neither numpy nor onnx and
# leaves their environment alone (see the BLAS settings below); this name keeps older ones working.
FeedbackClient = feedback.FeedbackClient


# ---- probe: the pod's health check, answered before numpy and onnx are imported ----
# Kubernetes runs it every few seconds beside the encoders: 0.04 s of CPU this way, 0.5 s after the imports.
# The chart runs `python -m vmafx_sidecar probe`: vmafx_feedback answers it, and the process exits here.

if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    sys.exit(feedback.probe_main(sys.argv[2:]))


# Single-threaded by design, next to CPU-hungry encoders: a BLAS thread pool would only add
# wake-ups to these tiny matrix products (it doubled the step time here). Must precede numpy.
for _threads_var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_threads_var, "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import vmafx_onnx_builder as onnx_builder  # noqa: E402

log = logging.getLogger("vmafx_sidecar")

ENV_PREFIX = "VMAFX_SIDECAR_"


# ---- config: every setting with its env var, default and allowed range, in one place ----

@dataclass(frozen=True)
class Check:
    ok: Callable[[Any], bool]
    allowed: str  # completes "must be ..." in the error message


def at_least(low: float) -> Check:
    return Check(lambda v: v >= low, f">= {low}")


def above(low: float) -> Check:
    return Check(lambda v: v > low, f"> {low}")


def unit_interval() -> Check:
    return Check(lambda v: 0 <= v < 1, "in [0, 1)")


def one_of(*choices: str) -> Check:
    return Check(lambda v: v in choices, "one of " + ", ".join(choices))


# A space or line break around a path is a quoting slip (a YAML block's last newline), never meant: taken as written,
# checkpoints went to "online\n", where no node looks, and a base model read as missing was replaced by a fresh one.
PATH = Check(lambda v: bool(v) and v == v.strip(), "a path, not empty, without spaces or line breaks around it")
PATH_OR_EMPTY = Check(lambda v: v == v.strip(), "a path without spaces or line breaks around it, or empty")
# The kernel's sun_path holds 108 bytes, its end among them: a longer socket path failed only at the bind, after the
# claims, the journal's replay and the metrics endpoint.
SOCKET_PATH = Check(lambda v: PATH.ok(v) and len(os.fsencode(v)) <= 107,
                    "a path of at most 107 bytes (a Unix socket's limit), without spaces or line breaks around it")


def listen_address_ok(text: str) -> bool:
    try:
        return not text or bool(parse_listen_address(text))
    except ValueError:
        return False


def activation_ok(text: str) -> bool:
    try:
        return bool(onnx_builder.parse_activation(text))
    except ValueError:
        return False


def setting(default: Any, env: str, check: Check, help: str) -> Any:
    return field(default=default, metadata={"env": env, "check": check, "help": help})


@dataclass(frozen=True)
class Config:
    socket: str = setting(DEFAULT_SOCKET, "VMAFX_SIDECAR_SOCKET", SOCKET_PATH,
                          "Unix socket the node connects to (created with mode 0600)")
    base_model_path: str = setting("/mnt/vmafx-models/base/model.onnx", "VMAFX_BASE_MODEL_PATH", PATH_OR_EMPTY,
                                   "model to fine-tune: ONNX, PyTorch state-dict (.pt, .pth) or .npz; empty or "
                                   "missing file: a fresh model")
    checkpoint_dir: str = setting("/mnt/vmafx-models/online", "VMAFX_SIDECAR_CHECKPOINT_DIR", PATH,
                                  "where model_vNNNNNN.onnx checkpoints are written")
    adopt_dir: str = setting("", "VMAFX_SIDECAR_ADOPT_DIR", PATH_OR_EMPTY,
                             "at start, take over the trainer state in this directory if the checkpoint "
                             "directory holds none (scaling replicas); empty: never")
    replay_capacity: int = setting(10000, "VMAFX_SIDECAR_REPLAY_CAPACITY", at_least(1),
                                   "samples kept for replay (FIFO)")
    batch_size: int = setting(32, "VMAFX_SIDECAR_BATCH_SIZE", at_least(1), "samples per gradient step")
    replay_mix: float = setting(0.5, "VMAFX_SIDECAR_REPLAY_MIX", unit_interval(),
                                "fraction of each batch drawn from the replay buffer")
    lr: float = setting(0.0001, "VMAFX_SIDECAR_LR", above(0), "SGD learning rate after warmup")
    ema_decay: float = setting(0.999, "VMAFX_SIDECAR_EMA_DECAY", unit_interval(),
                               "EMA decay of the checkpointed weights")
    ckpt_interval_s: float = setting(600.0, "VMAFX_SIDECAR_CKPT_INTERVAL_S", at_least(0),
                                     "minimum seconds between checkpoints")
    min_samples_ckpt: int = setting(1000, "VMAFX_SIDECAR_MIN_SAMPLES_CKPT", at_least(0),
                                    "minimum new samples trained between checkpoints")
    holdout_fraction: float = setting(0.05, "VMAFX_SIDECAR_HOLDOUT_FRACTION", unit_interval(),
                                      "fraction of samples never trained on, kept for the gate's history")
    eval_capacity: int = setting(2000, "VMAFX_SIDECAR_EVAL_CAPACITY", at_least(1),
                                 "held-out samples kept for the gate's history (FIFO)")
    gate: str = setting("on", "VMAFX_SIDECAR_GATE", one_of("on", "off"),
                        "off: publish every due checkpoint unjudged (non-finite ones are still quarantined)")
    gate_max_plcc_drop: float = setting(0.005, "VMAFX_SIDECAR_GATE_MAX_PLCC_DROP", at_least(0),
                                        "a candidate whose PLCC falls further below the best reference's, on the "
                                        "window or the history, is quarantined")
    gate_max_r2_drop: float = setting(0.01, "VMAFX_SIDECAR_GATE_MAX_R2_DROP", at_least(0),
                                      "a candidate whose R² falls further below the best reference's, on the "
                                      "window or the history, is quarantined (PLCC misses a shift of the scale)")
    gate_min_eval: int = setting(200, "VMAFX_SIDECAR_GATE_MIN_EVAL", at_least(2),
                                 "samples a set (window, history) needs to be judged on; with neither, a "
                                 "candidate is not published")
    keep_checkpoints: int = setting(50, "VMAFX_SIDECAR_KEEP_CHECKPOINTS", at_least(0),
                                    "published checkpoints kept (older ones deleted); 0 keeps all")
    n_features: int = setting(80, "VMAFX_SIDECAR_N_FEATURES", at_least(1), "length of each feature vector")
    hidden: int = setting(64, "VMAFX_SIDECAR_HIDDEN", at_least(1), "hidden width of a fresh model")
    activation: str = setting("relu", "VMAFX_SIDECAR_ACTIVATION",
                              Check(activation_ok, onnx_builder.ACTIVATIONS_ALLOWED),
                              "activation of a fresh model and of a state-dict or .npz base model without one")
    normalize: str = setting("on", "VMAFX_SIDECAR_NORMALIZE", one_of("on", "off"),
                             "on: train on standardized features and scores, export a model of raw ones; off: "
                             "train on raw ones, step for step as the PyTorch reference")
    momentum: float = setting(0.9, "VMAFX_SIDECAR_MOMENTUM", unit_interval(), "SGD momentum")
    weight_decay: float = setting(0.00001, "VMAFX_SIDECAR_WEIGHT_DECAY", at_least(0), "L2 weight decay")
    max_grad_norm: float = setting(1.0, "VMAFX_SIDECAR_MAX_GRAD_NORM", above(0),
                                   "gradients are clipped to this global L2 norm")
    warmup_steps: int = setting(100, "VMAFX_SIDECAR_WARMUP_STEPS", at_least(0),
                                "steps of linear learning-rate warmup")
    seed: int = setting(0, "VMAFX_SIDECAR_SEED", at_least(0), "seed of initial weights and replay draws")
    max_connections: int = setting(128, "VMAFX_SIDECAR_MAX_CONNECTIONS", at_least(1),
                                   "connections served at once; over it, only a probe's ping or status is answered")
    socket_mode: str = setting("0600", "VMAFX_SIDECAR_SOCKET_MODE", Check(
        lambda v: re.fullmatch(r"0?[67][0-7]0", v) is not None, "an octal mode with owner read-write and no "
        "access for others, such as 0600 or 0660"), "permissions of the socket file")
    max_line_bytes: int = setting(1048576, "VMAFX_SIDECAR_MAX_LINE_BYTES", at_least(1),
                                  "longest request line accepted")
    journal_fsync: str = setting("everysec", "VMAFX_SIDECAR_JOURNAL_FSYNC", one_of("always", "everysec", "no"),
                                 "how often the journal of acknowledged samples is fsynced")
    sample_log: str = setting("0", "VMAFX_SIDECAR_SAMPLE_LOG", one_of("0", "1"),
                              "1: append every accepted sample to <checkpoint dir>/.samples/, for a fleet trainer")
    sample_log_max_bytes: int = setting(1 << 30, "VMAFX_SIDECAR_SAMPLE_LOG_MAX_BYTES", at_least(1),
                                        "the sample log's size bound: beyond it the oldest segments go, counted")
    state_interval_s: float = setting(60.0, "VMAFX_SIDECAR_STATE_INTERVAL_S", at_least(0),
                                      "seconds between snapshots of the trainer state (when it changed)")
    metrics_addr: str = setting("", "VMAFX_SIDECAR_METRICS_ADDR", Check(listen_address_ok, "HOST:PORT such as "
                                ":9464, 127.0.0.1:9464 or [::1]:9464, or empty"),
                                "serve GET /metrics and /healthz here (empty: off)")
    log_level: str = setting("info", "VMAFX_SIDECAR_LOG_LEVEL", one_of("debug", "info", "warning", "error"),
                             "log level")
    cuda: str = setting("0", "VMAFX_SIDECAR_CUDA", one_of("0", "1", "require"),
                        "1: train on the GPU through CuPy if it can run, else numpy with a warning; "
                        "require: CuPy or exit")

    @classmethod
    def load(cls, environ: dict[str, str], overrides: dict[str, str]) -> Config:
        """Read settings from the environment, with `overrides` (field -> text) from flags winning."""
        for env in sorted(RETIRED_SETTINGS.keys() & environ.keys()):
            raise ConfigError(f"{env}: no longer read by this version; {RETIRED_SETTINGS[env]}")
        values = {}
        for f in dataclasses.fields(cls):
            env = f.metadata["env"]
            if f.name in overrides:
                raw, source = overrides[f.name], f"{env} (--{flag_name(f.name)})"
            elif env in environ:
                raw, source = environ[env], env
            else:
                continue
            values[f.name] = parse_setting(raw, type(f.default), f.metadata["check"], source)
        config = cls(**values)
        config.check()
        return config

    def replaced(self, values: dict[str, Any]) -> Config:
        """This config with `values` (field -> value) in their place, each checked alone as load() checks it
        (not against the others: see check())."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        taken = {}
        for name, value in values.items():
            kind, check, env = type(fields[name].default), fields[name].metadata["check"], fields[name].metadata["env"]
            try:
                taken[name] = float(value) if kind is float and type(value) is int else value
            except OverflowError:  # past any float: refused below, as an int
                taken[name] = value
            if type(taken[name]) is not kind or not check.ok(taken[name]) or (kind is int and value > INT_SETTING_MAX):
                raise ConfigError(f"{env}: must be {check.allowed}, got {value!r}")
        return dataclasses.replace(self, **taken)

    def check(self) -> None:
        """The checks across settings: ConfigError for the first that fails."""
        if self.replay_capacity < self.batch_size:
            raise ConfigError(f"VMAFX_SIDECAR_REPLAY_CAPACITY: must be >= VMAFX_SIDECAR_BATCH_SIZE "
                              f"({self.batch_size}), got {self.replay_capacity}")
        shortest_sample = len('{"features":[],"true_score":0}') + 2 * self.n_features - 1  # every value a "0"
        if self.max_line_bytes < shortest_sample:  # every sample refused, and the probes' pings with them
            raise ConfigError(f"VMAFX_SIDECAR_MAX_LINE_BYTES: must be >= {shortest_sample}, the shortest sample "
                              f"line of VMAFX_SIDECAR_N_FEATURES ({self.n_features}) features, got "
                              f"{self.max_line_bytes}")
        if self.adopt_dir and os.path.abspath(self.adopt_dir) == os.path.abspath(self.checkpoint_dir):
            raise ConfigError("VMAFX_SIDECAR_ADOPT_DIR: must be another directory than "
                              f"VMAFX_SIDECAR_CHECKPOINT_DIR, got {self.adopt_dir!r}")
        if self.gate == "on" and self.gate_min_eval > self.eval_capacity:
            raise ConfigError(f"VMAFX_SIDECAR_GATE_MIN_EVAL: must be <= VMAFX_SIDECAR_EVAL_CAPACITY "
                              f"({self.eval_capacity}) or the history is never judged, got {self.gate_min_eval}")
        if self.gate == "on" and self.eval_capacity < R2_MIN_SAMPLES:
            raise ConfigError(f"VMAFX_SIDECAR_EVAL_CAPACITY: must be >= {R2_MIN_SAMPLES} with the gate on or the "
                              f"history is never judged (on fewer samples no R² clears its floor), got "
                              f"{self.eval_capacity}")


class ConfigError(ValueError):
    pass


def flag_name(field_name: str) -> str:
    return field_name.replace("_", "-")


def parse_setting(raw: str, kind: type, check: Check, source: str) -> Any:
    kind_name = {int: "an integer", float: "a number", str: ""}[kind]  # "a string one of ..." says the kind twice
    try:
        value = kind(raw.strip()) if kind is not str else raw
    except ValueError:
        value = None
    if value is None or (kind is float and not math.isfinite(value)) or not check.ok(value):
        raise ConfigError(f"{source}: must be {' '.join(filter(None, (kind_name, check.allowed)))}, got {raw!r}")
    if kind is int and value > INT_SETTING_MAX:
        raise ConfigError(f"{source}: must be at most {INT_SETTING_MAX}, got {raw!r}")
    return value


INT_SETTING_MAX = 2**63 - 1  # the status answer shows every setting, and a Go node reads an integer as an int64


# Settings an older version read, and what to do instead: a sidecar started with one exits 2, rather than run
# on a default its operator did not choose. Add a setting here when it is renamed or removed.
RETIRED_SETTINGS: dict[str, str] = {}


def warn_of_a_path_nodes_cannot_read(config: Config) -> None:
    """Nodes read a checkpoint's path from its ACK and latest.json, as JSON: bytes that are not UTF-8 (which the
    environment keeps as surrogate escapes) reach a Go node as U+FFFD, a path it cannot open."""
    try:
        config.checkpoint_dir.encode()
    except UnicodeEncodeError:
        log.warning("VMAFX_SIDECAR_CHECKPOINT_DIR %r is not UTF-8: a node that reads a checkpoint's path from an ACK "
                    "or latest.json gets U+FFFD for those bytes, and cannot open it", config.checkpoint_dir)


def warn_unknown_settings(environ: dict[str, str]) -> None:
    known = {f.metadata["env"] for f in dataclasses.fields(Config)}
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            log.warning("unknown setting %s ignored (known: %s)", name, ", ".join(sorted(known)))


# ---- claims: one sidecar per socket and per checkpoint directory, taken before any state is touched ----

DIRECTORY_LOCK = ".trainer.lock"
ADOPTING = ".adopting"  # in a directory taking over another's trainer state: the source, until all is moved
ADOPTED_BY = ".adopted-by"  # in that source meanwhile: the directory taking it, so that neither passes for whole
ADOPT_WAIT_S = 60.0  # for the trainer in a directory to adopt to stop, e.g. the pod a rollout replaces
# What makes up a trainer's state in its directory; the lock file and other directories are not part of it.
TRAINER_STATE = re.compile(r"\.state|quarantine|latest\.(json|onnx|onnx\.sha256)"
                           r"|model_v\d{6,}\.(onnx|onnx\.sha256|json)")


def take_claims(config: Config) -> None:
    """The socket, then the checkpoint directory (and the one to adopt, while adopting it): each an flock
    on a descriptor left open until the process exits, when the kernel releases it, after kill -9 too. A
    sidecar refused either claim has read and written no state."""
    holder = f"pid {os.getpid()} on {socket.gethostname()}, serving {config.socket}, since {utc_text(time.time())}"
    lock_beside(config.socket)
    claim_socket_path(config.socket)
    directory = Path(config.checkpoint_dir).absolute()
    claim_directory(directory, holder)
    adopt_trainer_state(directory, Path(config.adopt_dir).absolute() if config.adopt_dir else None, holder)


def open_lock(path: Path) -> int:
    """Opened once per process and kept open: on NFS an flock is a POSIX lock, which closing *any*
    descriptor of the file releases."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StartupError(f"cannot open lock file {path}: {e.strerror or e}") from None


def take_lock_within(fd: int, path: Path, wait_s: float) -> bool:
    """Take the exclusive flock on `fd` (the lock file `path`), trying for up to wait_s seconds; whether this
    process got it. StartupError where the filesystem takes no lock at all."""
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            if not said:
                log.info("waiting up to %g s for the sidecar that holds %s to stop", wait_s, path)
                said = True
            time.sleep(0.1)
        except OSError as e:  # ENOLCK: NFSv3 without its lock service, say
            os.close(fd)
            raise StartupError(f"cannot lock {path}: {e.strerror or e}: the sidecar needs a filesystem that "
                               "takes flock locks, to keep two sidecars off one socket or directory") from None


def lock_beside(path: str) -> None:
    """Hold <socket>.lock for the process's lifetime, so two sidecars never both claim one path."""
    lock = Path(path + ".lock")
    fd = open_lock(lock)
    if not take_lock_within(fd, lock, 0):
        os.close(fd)
        raise StartupError(f"another sidecar is already listening on {path} (it holds {path}.lock)")


def claim_socket_path(path: str) -> None:
    """Remove a stale socket left by a dead server; refuse a live one, a symlink or any other file."""
    try:
        mode = os.lstat(path).st_mode  # lstat: a symlink is never followed, nor removed
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        error = probe.connect_ex(path)
    finally:
        probe.close()
    if error == errno.ECONNREFUSED:  # only a refused connection proves nobody is listening
        os.unlink(path)
        log.warning("removed stale socket %s left by a previous process", path)
    elif error in (0, errno.EAGAIN, errno.EINPROGRESS):
        raise StartupError(f"another server is already listening on {path}")
    else:
        raise StartupError(f"cannot check existing socket {path}: {os.strerror(error)}")


def claim_directory(directory: Path, holder: str, wait_s: float = 0.0) -> int:
    """Hold <directory>/.trainer.lock: one trainer per checkpoint directory. The file names its holder, so
    a refused sidecar can say who has the directory."""
    if directory.is_symlink():
        raise StartupError(f"checkpoint directory {directory} is a symlink to {os.readlink(directory)}: "
                           "configure the real path")
    try:
        make_directory(directory, parents=True)
    except OSError as e:
        raise StartupError(f"cannot use checkpoint directory {directory}: {e.strerror or e}") from None
    fd = open_lock(directory / DIRECTORY_LOCK)
    if not take_lock_within(fd, directory / DIRECTORY_LOCK, wait_s):
        other = os.pread(fd, 1024, 0).decode("utf-8", "replace").strip() or "it has not written its name yet"
        os.close(fd)
        raise DirectoryClaimed(f"checkpoint directory {directory} is claimed by another sidecar ({other}); each "
                               "trainer needs a directory of its own", other)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, os.fsencode(f"{holder}\n"), 0)  # a path in it that is not UTF-8 as it is
    except OSError as e:  # a full disk: the lock holds all the same, and only a refused sidecar reads the name
        log.warning("cannot write this sidecar's name into %s: %s", directory / DIRECTORY_LOCK, e.strerror or e)
    return fd


def trainer_state_in(directory: Path) -> list[Path]:
    """The entries of a trainer's state in `directory`, if any."""
    try:
        return [directory / name for name in sorted(os.listdir(directory)) if TRAINER_STATE.fullmatch(name)]
    except FileNotFoundError:
        return []
    except OSError as e:  # a file, or a directory this process may not read
        raise StartupError(f"cannot read {directory}: {e.strerror or e}") from None


def adopt_trainer_state(directory: Path, source: Path | None, holder: str) -> None:
    """Move the trainer state in `source` (VMAFX_SIDECAR_ADOPT_DIR) into `directory` when `directory` holds none
    (replicas scaled up or down), under both claims: training resumes where it stopped and numbering continues.
    While entries move, each directory names the other (ADOPTING here, ADOPTED_BY there), so that a crash
    midway leaves neither taken for a whole state: the next start here resumes the move, whatever the setting
    says now, and one in the source, should this directory's sidecar not come back, moves them back."""
    directory, source = real_directory(directory), source and real_directory(source)
    unfinished = marked_directory(directory / ADOPTING)
    if unfinished is None and (taker := marked_directory(directory / ADOPTED_BY)) is not None:
        take_back(directory, taker, holder)
    source = unfinished or source
    if source is None or (unfinished is None and (trainer_state_in(directory) or not trainer_state_in(source))):
        return
    try:
        source_claim = claim_directory(source, holder, ADOPT_WAIT_S)
    except DirectoryClaimed as e:  # a replica handing over (a rollout, a scale-up) stops later than this one starts
        raise StartupError(f"cannot adopt the trainer state in {source} yet: the sidecar that holds it ({e.holder}) "
                           f"still runs after {ADOPT_WAIT_S:g} s; the next start tries again") from None
    except StartupError as e:
        raise StartupError(f"cannot adopt the trainer state in {source} yet: {e}") from None
    try:
        entries = trainer_state_in(source)  # again, under its claim: another replica may have taken it
        if unfinished is None:
            busy = unfinished_move(source, directory)
            if not entries or busy:
                if entries:  # the sidecars of the two directories finish that move, or undo it
                    log.warning("not adopting the trainer state in %s: %s is unfinished", source, busy)
                return
            for marker, named in ((source / ADOPTED_BY, directory), (directory / ADOPTING, source)):
                write_whole(marker, os.fsencode(f"{named}\n"), mode=0o600)
                fsync_directory(marker.parent)
        move_entries(entries, source, directory)
        end_move(directory, source)
    except OSError as e:
        raise StartupError(f"cannot adopt the trainer state in {source}: {e.strerror or e}") from None
    finally:
        os.close(source_claim)
    log.warning("adopted the trainer state in %s (%s): training resumes from it here",
                source, ", ".join(entry.name for entry in entries) or "the rest of it")


def unfinished_move(source: Path, directory: Path) -> str | None:
    """A move a crash left unfinished that `source` is part of, other than one from it to `directory`: its state is
    not whole, and is not to be adopted."""
    taker = marked_directory(source / ADOPTED_BY)
    if taker not in (None, directory) and marked_directory(taker / ADOPTING) == source:
        return f"a move of it to {taker}"
    giver = marked_directory(source / ADOPTING)
    return f"a move into it from {giver}" if giver is not None else None


def take_back(directory: Path, taker: Path, holder: str) -> None:
    """Undo a move of this directory's trainer state into `taker` that a crash interrupted, unless a sidecar there
    is starting, which resumes it: taker held no state of its own, so all it holds came from here."""
    if marked_directory(taker / ADOPTING) != directory:  # the move ended: nothing of it is left to undo
        try:
            (directory / ADOPTED_BY).unlink(missing_ok=True)
        except OSError as e:
            raise StartupError(f"cannot remove {directory / ADOPTED_BY}: {e.strerror or e}") from None
        return
    try:
        taker_claim = claim_directory(taker, holder)
    except StartupError as e:
        raise StartupError(f"the trainer state in {directory} is half moved to {taker}, whose sidecar is starting "
                           f"and finishes the move: start this one again once it has ({e})") from None
    try:
        move_entries(trainer_state_in(taker), taker, directory)
        end_move(taker, directory)
    except OSError as e:
        raise StartupError(f"cannot take back the trainer state moved to {taker}: {e.strerror or e}") from None
    finally:
        os.close(taker_claim)
    log.warning("took back the trainer state a crash left half moved to %s: training resumes from it here", taker)


def move_entries(entries: list[Path], emptied: Path, directory: Path) -> None:
    """Rename each of emptied's `entries` into `directory`; then sync emptied, before any marker goes."""
    for entry in entries:
        if (directory / entry.name).exists():
            raise StartupError(f"cannot move {entry}: {directory / entry.name} exists too; move one aside")
        os.rename(entry, directory / entry.name)
    fsync_directory(emptied)


def end_move(taker: Path, source: Path) -> None:
    """The markers of a move from `source` to `taker`, ended one way or the other: taker's first, as source's
    alone is known stale (its taker names no move from it)."""
    (taker / ADOPTING).unlink(missing_ok=True)
    fsync_directory(taker)
    (source / ADOPTED_BY).unlink(missing_ok=True)
    fsync_directory(source)


def marked_directory(marker: Path) -> Path | None:
    """The directory a move's marker names; None without one. A marker is written whole (write_whole())."""
    try:
        named = Path(os.fsdecode(marker.read_bytes().strip()))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StartupError(f"cannot read {marker}: {e.strerror or e}") from None
    if not named.is_absolute():
        raise StartupError(f"{marker} names no directory ({str(named)!r}): it is not one this sidecar wrote")
    return real_directory(named)


def real_directory(path: Path) -> Path:
    """`path` without its `..` and its symbolic links: the two sides of a move compare their markers by it, since
    one directory may be spelled two ways (a move's own markers name it as the sidecar that wrote them did)."""
    return Path(os.path.realpath(path))


# ---- server: one selectors loop owns the socket, every connection and the training step ----

RECV_BYTES = 65536
# A connection whose unsent ACKs reach OUTBUF_HIGH is neither read nor answered on until it takes some: a client
# that pipelines faster than it reads waits, its lines in its socket, and one whose lines have waited STALL_S
# without it taking an ACK has stopped reading and is disconnected. Its buffers stay within this and one ACK,
# and a recv of input with a line in progress (up to VMAFX_SIDECAR_MAX_LINE_BYTES).
OUTBUF_HIGH = 1 << 20
STALL_S = 10.0  # a reader frees its socket's buffer a chunk (~100 KB) at a time: one of 10 KB/s shows in it
SHUTDOWN_GRACE_S = 1.5
ACCEPT_RETRY_S = 1.0  # out of file descriptors, a listener is unwatched this long (or until a connection closes)
# Over VMAFX_SIDECAR_MAX_CONNECTIONS, this many more connections may each ask one ping or status, within
# RESERVED_WAIT_S: the pod's probes, so that a sidecar busy at its limit is not restarted or taken out of service.
RESERVED_CONNECTIONS = 4
RESERVED_WAIT_S = 1.0
OWN_FILES = 64  # beside its connections: the listeners, selector, journal, sample log, claims, snapshots, stdio
ACK_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def raise_file_limit(config: Config) -> None:
    """Lift the soft limit on open files to what the connections need, within the hard limit (as Go's runtime
    lifts it to the hard one): under a container's common 1024, VMAFX_SIDECAR_MAX_CONNECTIONS=2000 paused accepts
    at about 1000."""
    needed = config.max_connections + RESERVED_CONNECTIONS + HTTP_MAX_CONNECTIONS + OWN_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target < needed:
        log.warning("open files are limited to %d (ulimit -n), and VMAFX_SIDECAR_MAX_CONNECTIONS=%d needs about %d: "
                    "connections past the limit wait in the backlog until others close", target,
                    config.max_connections, needed)


class StartupError(RuntimeError):
    """Something outside the process stops it from starting; the message says what."""


class Stopped(BaseException):
    """SIGTERM or SIGINT before the server's loop takes them over (a start, a fleet run): it ends where it is, as a
    kill would, which the state is made to survive. A BaseException, so that no `except Exception` takes it."""


def stop_by_signal(signum: int, frame: Any) -> None:
    raise Stopped(signal.Signals(signum).name)


class DirectoryClaimed(StartupError):
    """Another sidecar holds the checkpoint directory: `holder` is the name it wrote there."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


class Connection:
    """A client's socket and buffers; called by the loop when the socket is ready (its selector key's data)."""
    __slots__ = ("sock", "on_ready", "inbuf", "outbuf", "discarding", "closing", "events", "waiting_since")

    def __init__(self, sock: socket.socket, on_ready: Callable[[Connection, int], None]):
        self.sock = sock
        self.on_ready = on_ready
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.discarding = False  # inside a too-long line: drop bytes up to the next newline
        self.closing = False  # peer sent EOF: close once the ACKs are out
        self.events = selectors.EVENT_READ  # what the selector watches for
        self.waiting_since = 0.0  # in the backlog: when its lines began to wait, or it last took an ACK

    def __call__(self, mask: int) -> None:
        self.on_ready(self, mask)


class Server:
    def __init__(self, config: Config, trainer: Trainer, state: StateStore):
        self.config = config
        self.trainer = trainer
        self.state = state
        self.started, self.started_unix = time.monotonic(), time.time()
        # The saved counts this process took over: its counters count from its start, as Prometheus reads every
        # counter (one restored lower than a scrape had seen, after a kill that lost samples the disk refused, was
        # read as a reset, and increase() took the whole lifetime's count for new samples).
        self.counts_at_start = trainer.counts()
        self.selector = selectors.DefaultSelector()
        self.connections: set[Connection] = set()
        # Connections read this loop turn, in order: their ACKs wait in their outbufs until end_turn() has
        # journaled the turn's samples in one write.
        self.answered: dict[Connection, None] = {}
        # Connections holding whole lines not answered yet, for want of room for their ACKs: answered on in a
        # later turn, in order, and not read meanwhile (see take_lines()).
        self.backlog: dict[Connection, None] = {}
        self.listener: socket.socket | None = None
        self.socket_inode: int | None = None
        self.stopping = False
        self.accepts_paused_at: float | None = None  # out of file descriptors, since then: see retry_accepts()
        self.accepts_due = False  # the listener was ready this turn: see take_accepts()
        # Over max_connections, each for one ping or status: since it was accepted, then since it was answered.
        self.reserved: dict[Connection, float] = {}
        self.connections_refused = 0  # over max_connections, closed unanswered
        self.connections_dropped = 0  # stopped reading their ACKs
        self.rejections: collections.Counter[str] = collections.Counter()  # by reason, since the start
        self.acks = 0  # ACK lines made, since the start
        # From the moment a loop turn's requests were ready to their ACKs handed to the socket: observed once
        # per turn, for every ACK of the turn, so that measuring costs a message nothing but `acks += 1`.
        self.ack_seconds = Histogram(ACK_SECONDS_BUCKETS)
        # The trainer's samples_accepted at the last turn that changed it, and when (perf_counter): the loop takes
        # a checkpoint due once no sample has come for IDLE_CHECKPOINT_S (publish_when_idle()).
        self.accepted_seen, self.accepted_at = trainer.samples_accepted, time.perf_counter()
        self.metrics: MetricsEndpoint | None = None  # set by serve() when VMAFX_SIDECAR_METRICS_ADDR is set

    # -- lifecycle

    def bind(self) -> None:
        """Listen on the socket path, which take_claims() has already claimed."""
        path = self.config.socket
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            listener.bind(path)
            os.chmod(path, int(self.config.socket_mode, 8))  # the setting is the only way to widen 0600
        except OSError as e:
            listener.close()
            raise StartupError(f"cannot bind socket {path}: {e.strerror or e}") from None
        finally:
            os.umask(old_umask)
        listener.listen(128)
        listener.setblocking(False)
        self.listener = listener
        self.socket_inode = os.stat(path).st_ino
        self.selector.register(listener, selectors.EVENT_READ, self.on_listener_ready)

    def serve_forever(self) -> int:
        """Serve until SIGTERM or SIGINT; the exit status: 0, or 1 when the stop lost acknowledged samples."""
        wake_r, wake_w = socket.socketpair()
        for s in (wake_r, wake_w):
            s.setblocking(False)
        # The C-level handler writes here, so select() returns promptly on SIGTERM/SIGINT.
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request_stop)
        self.selector.register(wake_r, selectors.EVENT_READ, lambda mask: drain(wake_r))
        try:
            while not self.stopping:
                # A timeout, so the journal's once-a-second fsync and the snapshots also run when idle.
                ready = self.selector.select(timeout=0 if self.backlog and self.backlog_room() else 1.0)
                started, acks = time.perf_counter(), self.acks
                for key, mask in ready:
                    key.data(mask)  # each socket's callback: the listeners, the wake-up pipe, each connection
                if self.accepts_due:  # after the reads, which free the places of connections closed or refused
                    self.take_accepts()
                if self.backlog:
                    self.answer_backlog()
                if self.reserved:  # before the ACKs go out: one it reads, of a connection a freed place takes, too
                    self.expire_reserved()
                self.end_turn()
                if self.acks != acks:
                    self.ack_seconds.observe(time.perf_counter() - started, self.acks - acks)
                self.publish_when_idle(started)
                self.retry_accepts()
                self.state.tick()
                if self.trainer.checkpoints.unpointed is not None:
                    self.trainer.checkpoints.point_latest_again()
                if self.metrics:
                    self.metrics.tick()
            return self.shutdown()
        finally:
            signal.set_wakeup_fd(-1)
            self.selector.unregister(wake_r)
            wake_r.close()
            wake_w.close()

    def publish_when_idle(self, now: float) -> None:
        """Take a checkpoint that fell due after the last step once no sample has come for IDLE_CHECKPOINT_S (`now`
        from perf_counter): a burst's samples are published at the interval, not once traffic resumes. No ACK names
        it; while samples come, the next step takes it, and its ACK does."""
        accepted = self.trainer.samples_accepted
        if accepted != self.accepted_seen:
            self.accepted_seen, self.accepted_at = accepted, now
        elif now - self.accepted_at >= IDLE_CHECKPOINT_S and self.trainer.checkpoint_waiting():
            if self.trainer.take_checkpoint() is not None:
                self.state.save()

    def request_stop(self, signum: int, frame: Any) -> None:
        if not self.stopping:
            log.info("received %s: finishing open requests and exiting", signal.Signals(signum).name)
        self.stopping = True

    def shutdown(self) -> int:
        """Stop accepting, answer what clients already sent, and flush ACKs for up to SHUTDOWN_GRACE_S; then save the
        state. The exit status: 1 when acknowledged samples die with the process (the disk refused the snapshot,
        and the journal a restart reads lacks them: see StateStore.unsaved_samples), else 0."""
        self.close_listener()
        if self.metrics:
            self.metrics.close()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        # Each pass reads each connection once, until it would block (a client that keeps sending cannot use up
        # the others' grace; one whose lines wait for room is read on once they are answered); then it is closing:
        # answered, its ACKs sent, and closed.
        while self.connections and time.monotonic() < deadline:
            for conn in [c for c in self.connections if not (c.closing or c in self.backlog)]:
                if time.monotonic() >= deadline:  # a pass over many busy clients outlasts the grace
                    break
                if not self.read(conn):
                    conn.closing = True
                    self.answered[conn] = None  # flushed, or closed, by end_turn()
            self.answer_backlog()
            self.end_turn()
            waiting = self.connections and all(c.closing or c in self.backlog for c in self.connections)
            if waiting and not self.backlog_room():  # with every connection closed, nothing is left to wait for
                for key, mask in self.selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    if key.data not in self.connections:
                        key.data(mask)  # the wake-up pipe: a second signal
                    elif mask & selectors.EVENT_WRITE:
                        self.flush(key.data)
        for conn in [*self.connections, *self.reserved]:
            self.close(conn)
        self.state.save()
        if lost := self.state.unsaved_samples():
            log.error("stopping with %d acknowledged samples lost: the disk refused the snapshot that would have "
                      "held them, and the journal a restart reads does not", lost)
        log.info("stopped after %d steps (%d samples accepted, %d rejected)",
                 self.trainer.steps, self.trainer.samples_accepted, self.trainer.samples_rejected)
        return 1 if lost else 0

    def close_listener(self) -> None:
        """Unlink the socket so no new client can connect, then take those already queued: their
        requests count as received."""
        if self.listener is None:
            return
        try:  # remove the socket file only if it is still the one this process created
            if os.stat(self.config.socket).st_ino == self.socket_inode:
                os.unlink(self.config.socket)
        except FileNotFoundError:
            pass
        except OSError as e:  # the shutdown goes on: its answers and snapshot matter more than the file
            log.warning("cannot remove %s: %s; the next start replaces it", self.config.socket, e.strerror or e)
        while self.accepts_paused_at is None and self.accept():
            pass
        if self.accepts_paused_at is None:
            self.selector.unregister(self.listener)
        self.listener.close()
        self.listener = None

    # -- connections

    def on_listener_ready(self, mask: int) -> None:
        self.accepts_due = True

    def take_accepts(self) -> None:
        """The backlog while it has places, served or in the reserve (at one a turn, with busy clients' turns long,
        a probe waited seconds behind a hundred reconnecting nodes); once both are full, one a turn, refused. Taken
        after the turn's reads: the reserve's connections free their places as their lines are read, and one queued
        behind them (a probe) takes a place rather than a refusal."""
        self.accepts_due = False
        while self.accept() and self.has_a_place():
            pass

    def has_a_place(self) -> bool:
        return len(self.connections) < self.config.max_connections or len(self.reserved) < RESERVED_CONNECTIONS

    def on_connection_ready(self, conn: Connection, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            self.read(conn)
        # A connection read this turn is flushed by end_turn(); else its ACKs are an earlier turn's, journaled then.
        if mask & selectors.EVENT_WRITE and conn not in self.answered and conn in self.connections:
            self.flush(conn)

    def accept(self) -> bool:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            # Out of descriptors (EMFILE): the listener would stay ready and the loop would spin, so
            # stop watching it until a connection closes or a second has passed (retry_accepts()); the
            # clients wait in the backlog meanwhile.
            log.error("cannot accept a connection (%s): pausing accepts until one closes, or for a second",
                      e.strerror or e)
            self.selector.unregister(self.listener)
            self.accepts_paused_at = time.monotonic()
            return False
        if not self.has_a_place():
            sock.close()  # the client reads EOF at once (a reset, had it sent already) and may retry; others go on
            self.connections_refused += 1
            return True
        sock.setblocking(False)
        if len(self.connections) >= self.config.max_connections:
            conn = Connection(sock, self.on_reserved_ready)
            self.reserved[conn] = time.monotonic()
        else:
            conn = Connection(sock, self.on_connection_ready)
            self.connections.add(conn)
        self.selector.register(sock, selectors.EVENT_READ, conn)
        return True

    def on_reserved_ready(self, conn: Connection, mask: int) -> None:
        """A connection over the limit: its first line answered if it asks a ping or the status, and the connection
        closed once the answer is out; anything else closes it unanswered, as if refused at once. It stays in
        `reserved` until it is closed, counted against RESERVED_CONNECTIONS, with RESERVED_WAIT_S from its answer
        to take it. A place freed since it was accepted (a client that closed in the turn that accepted this one)
        is its own: it is served from then on, like any connection."""
        if not conn.closing and len(self.connections) < self.config.max_connections:
            del self.reserved[conn]
            conn.on_ready = self.on_connection_ready
            self.connections.add(conn)
            self.on_connection_ready(conn, mask)
            return
        if mask & selectors.EVENT_WRITE:
            self.flush(conn)
        if conn.closing or not mask & selectors.EVENT_READ or (data := received(conn.sock, RECV_BYTES)) is None:
            return
        conn.inbuf += data
        newline, limit = conn.inbuf.find(b"\n"), self.config.max_line_bytes
        if newline < 0 and data and len(conn.inbuf) <= limit:
            return  # the line goes on
        line = bytes(conn.inbuf if newline < 0 else conn.inbuf[:newline])  # at EOF, the line without its newline
        conn.inbuf.clear()
        if len(line) > limit or not asks_ping_or_status(line, self.config.n_features):
            self.refuse(conn)
            return
        conn.outbuf += self.answer(line)
        conn.closing = True
        self.reserved[conn] = time.monotonic()
        self.flush(conn)

    def refuse(self, conn: Connection) -> None:
        self.connections_refused += 1
        self.close(conn)

    def expire_reserved(self) -> None:
        """Close the connections over the limit that have not asked their question in time, unanswered (read once
        more first, as a slow turn, a checkpoint or a long step, may have kept a waiting one from being read), and
        those that have not taken their answer in time, as stopped readers."""
        now = time.monotonic()
        for conn, since in list(self.reserved.items()):
            if now - since < RESERVED_WAIT_S:
                continue
            if conn.closing:
                self.connections_dropped += 1
                self.close(conn)
                continue
            self.on_reserved_ready(conn, selectors.EVENT_READ)
            if conn in self.reserved and not conn.closing:
                self.refuse(conn)

    def read(self, conn: Connection) -> bool:
        """Read and answer what is available, the ACKs left for end_turn(); False when nothing was (would block,
        EOF, error)."""
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionResetError:  # it closed with ACKs unread: its end all the same, after what it sent
            data = b""
        except OSError:
            self.close(conn)
            return False
        self.take_lines(conn, data or b"\n")  # at EOF, a last line without its newline is one
        conn.closing = not data
        self.answered[conn] = None
        return bool(data)

    def end_turn(self) -> None:
        """Journal the samples of this turn's lines in one write, then hand their ACKs to the sockets: a sample
        is on disk (or in the page cache) before its ACK, at one write per turn, not per connection."""
        if not self.answered:
            return
        self.state.commit()
        for conn in self.answered:
            if conn in self.connections:
                self.flush(conn)
        self.answered.clear()

    def take_lines(self, conn: Connection, data: bytes) -> None:
        limit = self.config.max_line_bytes
        if conn.discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return
            data = data[newline + 1:]
            conn.discarding = False
        if conn.inbuf:  # usually empty: a client sends whole lines, so data is sliced without copies
            if data and b"\n" not in data and len(conn.inbuf) + len(data) <= limit:
                conn.inbuf += data  # a line arriving in pieces is joined once, when it ends: linear, not quadratic
                return
            data = bytes(conn.inbuf + data)
            conn.inbuf.clear()
        start = 0
        while (newline := data.find(b"\n", start)) >= 0:
            if len(conn.outbuf) >= OUTBUF_HIGH:  # the rest waits until the client has taken some ACKs
                self.hold(conn, data[start:])
                return
            if newline - start > limit:
                conn.outbuf += self.reject_too_long()
            else:
                conn.outbuf += self.answer(data[start:newline])
            start = newline + 1
        if len(data) - start > limit:  # answer now and drop the rest of the line as it arrives
            if len(conn.outbuf) >= OUTBUF_HIGH:  # or once there is room: enough of it waits to be too long
                self.hold(conn, data[start:start + limit + 1])
                return
            conn.outbuf += self.reject_too_long()
            conn.discarding = True
        else:
            conn.inbuf += data[start:]
        self.backlog.pop(conn, None)

    def hold(self, conn: Connection, rest: bytes) -> None:
        """Keep what is left of conn's input for a later turn, with no more of it read meanwhile: its unsent ACKs
        are at OUTBUF_HIGH."""
        conn.inbuf += rest
        if conn not in self.backlog:
            conn.waiting_since = time.monotonic()
            self.backlog[conn] = None

    def flush(self, conn: Connection) -> None:
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except (BrokenPipeError, ConnectionResetError):  # gone: its ACKs have no reader, what it sent is read on
                sent = len(conn.outbuf)
            except OSError:  # another error: closed, as one that broke the connection (the client resends)
                self.close(conn)
                return
            del conn.outbuf[:sent]
            if sent and conn in self.backlog:  # it reads: its lines wait for room, not for ever
                conn.waiting_since = time.monotonic()
        if conn.closing and not conn.outbuf and conn not in self.backlog:
            self.close(conn)
            return
        events = selectors.EVENT_WRITE if conn.outbuf else 0
        if not conn.closing and conn not in self.backlog:
            events |= selectors.EVENT_READ
        if events != conn.events:
            conn.events = events
            self.selector.modify(conn.sock, events, conn)

    def backlog_room(self) -> bool:
        """Whether a connection with lines waiting has room for their ACKs now."""
        return any(len(conn.outbuf) < OUTBUF_HIGH for conn in self.backlog)

    def answer_backlog(self) -> None:
        """Answer on the waiting lines of each connection that has taken some ACKs since; disconnect one whose lines
        have waited STALL_S without it taking one: it has stopped reading, and they would wait for ever."""
        now = time.monotonic()
        for conn in list(self.backlog):
            if len(conn.outbuf) < OUTBUF_HIGH:
                self.take_lines(conn, b"")
                self.answered[conn] = None
            elif now - conn.waiting_since >= STALL_S and conn not in self.answered:
                # A socket becomes writable only once its reader has taken a quarter of its buffer: a slow reader
                # shows itself to a send, which restarts the clock if it takes anything.
                self.flush(conn)
                if conn in self.connections and conn.waiting_since <= now:
                    log.warning("closed a connection that took none of its %d bytes of ACKs for %.0f s while it "
                                "sent more", len(conn.outbuf), STALL_S)
                    self.connections_dropped += 1
                    self.close(conn)

    def close(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.reserved.pop(conn, None)
        self.backlog.pop(conn, None)
        self.selector.unregister(conn.sock)
        conn.sock.close()
        self.resume_accepts()  # a descriptor is free now

    def retry_accepts(self) -> None:
        """Accepts paused with no connection open would wait for a close that never comes: after ACCEPT_RETRY_S
        they are tried again (and paused again, if descriptors are still short)."""
        if self.accepts_paused_at is not None and time.monotonic() - self.accepts_paused_at >= ACCEPT_RETRY_S:
            self.resume_accepts()

    def resume_accepts(self) -> None:
        if self.accepts_paused_at is not None and self.listener is not None:
            self.selector.register(self.listener, selectors.EVENT_READ, self.on_listener_ready)
            self.accepts_paused_at = None

    # -- requests

    def answer(self, line: bytes) -> bytes:
        """The ACK line for one request line (b"" for a blank line, which gets none)."""
        if not line or line.isspace():
            return b""
        self.acks += 1
        try:
            request = parse_request(line, self.config.n_features)
        except BadRequest as e:
            self.reject(e.error)
            return encode_ack({"ok": False, "error": e.error}, e.job_id)
        if type(request) is Control:
            return encode_ack(self.control(request.op), request.job_id)
        row, score = np.array(request.features, np.float32), np.float32(request.score)
        held_out, unnamed = self.trainer.is_held_out(request.job_id), not request.job_id
        self.state.record_sample(row, score, held_out, request.job_id)  # journaled first, then trained on
        result = self.trainer.ingest(row, score, held_out, unnamed)
        if result is None:  # most samples: json.dumps' bytes for {"ok": true, "step": ..., "trained": false, ...}
            return untrained_ack(self.trainer.steps, request.job_id)
        ack: dict[str, Any] = {"ok": True, "step": self.trainer.steps, "trained": True, "loss": result.loss}
        if result.checkpoint is not None:
            if result.checkpoint.published:
                ack["checkpoint"] = str(result.checkpoint.path)
            self.state.save()
        return encode_ack(ack, request.job_id)

    def reject(self, error: str) -> None:
        self.trainer.count_rejected()
        self.rejections[rejection_reason(error)] += 1
        self.state.record_rejection()

    def reject_too_long(self) -> bytes:
        error = feedback.LINE_TOO_LONG.format(self.config.max_line_bytes)
        self.acks += 1
        self.reject(error)
        return encode_ack({"ok": False, "error": error}, None)

    def control(self, op: str) -> dict[str, Any]:
        if op == "ping":
            return {"ok": True, "op": "pong"}
        if op == "status":
            return {"ok": True, "op": "status", **self.status()}
        shown = op if len(op) <= OP_SHOWN else op[:OP_SHOWN] + "..."  # an ACK stays short whatever the line holds
        error = f"unknown op {shown!r} (known: ping, status)"
        self.reject(error)
        return {"ok": False, "error": error}

    def status(self) -> dict[str, Any]:
        t = self.trainer
        return {
            "steps": t.steps,
            "samples_accepted": t.samples_accepted,
            "samples_rejected": t.samples_rejected,
            "samples_trained": t.samples_trained,
            "samples_held_out": t.samples_held_out,
            "steps_skipped": t.steps_skipped,
            "pending": t.n_pending,
            "replay_size": t.replay_size,
            "eval_size": t.eval_size,
            "checkpoint_version": t.checkpoints.latest["version"] if t.checkpoints.latest else None,
            "gate": t.last_gate,
            "window": t.window.evidence(t.references()).record(),
            "last_loss": t.last_loss,
            "connections": len(self.connections),
            "connections_refused": self.connections_refused,
            "connections_dropped": self.connections_dropped,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "backend": t.backend.name,
            "model": "-".join(map(str, t.model.sizes)),
            "activations": [str(a) for a in t.model.activations],
            "coordinates": t.coords.standardized,
            "fleet": fleet_model(Path(self.config.checkpoint_dir).absolute().parent / FLEET_DIR),
            "config": dataclasses.asdict(self.config),
        }


def received(sock: socket.socket, size: int) -> bytes | None:
    """Up to `size` bytes from a non-blocking socket: None when none are there yet, b"" at its end or on an error."""
    try:
        return sock.recv(size)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


# ---- protocol: newline-delimited JSON requests, one ACK line each ----

encode_json_string = json.encoder.encode_basestring_ascii  # json.dumps' own, for ensure_ascii=True
JSON_SCANNER = json.JSONDecoder().scan_once  # json.loads' own: a default decoder's C scanner
F32_BOUND = feedback.F32_BOUND  # the largest number float32 rounds to a finite value: both ends check it
F32_LOWEST = -F32_BOUND  # one float, not one negated for each value checked
JSON_TYPE_NAMES = feedback.JSON_TYPE_NAMES  # an error names a type as both ends of the socket do


@dataclass(slots=True)
class Sample:
    features: list[int | float]  # JSON numbers within float32's range
    score: int | float
    job_id: str | None


@dataclass(slots=True)
class Control:
    op: str
    job_id: str | None


# What each error message starts with, and the reason metrics count it under.
REJECTION_REASONS = {"not valid JSON": "invalid_json", "expected a JSON object": "not_an_object",
                     "job_id:": "job_id", "op:": "op", "unknown op": "unknown_op", "features": "features",
                     "true_score:": "true_score", "line too long": "line_too_long"}


OP_SHOWN = 64  # characters of an unknown op an error repeats


def rejection_reason(error: str) -> str:
    return next(reason for prefix, reason in REJECTION_REASONS.items() if error.startswith(prefix))


class BadRequest(Exception):
    def __init__(self, error: str, job_id: str | None = None):
        super().__init__(error)
        self.error = error
        self.job_id = job_id


def parse_request(line: bytes, n_features: int) -> Sample | Control:
    """Decode one request line; raise BadRequest with a specific error for anything malformed."""
    try:
        message = decoded_json(line.decode())  # UTF-8 only: json.loads(bytes) would also guess UTF-16/32
    except UnicodeDecodeError:
        raise BadRequest("not valid JSON: the line is not UTF-8") from None
    except ValueError as e:
        raise BadRequest(f"not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("not valid JSON: nested too deeply") from None
    if type(message) is not dict:
        raise BadRequest(f"expected a JSON object, got {JSON_TYPE_NAMES[type(message)]}")
    job_id = message.get("job_id")
    if job_id is not None and type(job_id) is not str:
        raise BadRequest(f"job_id: expected a string, got {JSON_TYPE_NAMES[type(job_id)]}")
    if job_id is not None and feedback.job_id_too_long(job_id):
        raise BadRequest(feedback.JOB_ID_TOO_LONG)
    op = message.get("op")
    if op is not None and op != "":  # null or "" is no op: Go writes those for a request struct's unset Op field
        if type(op) is not str:
            raise BadRequest(f"op: expected a string, got {JSON_TYPE_NAMES[type(op)]}", job_id)
        return Control(op, job_id)

    if "features" not in message:
        raise BadRequest("features: missing", job_id)
    features = message["features"]
    if type(features) is not list:
        raise BadRequest(f"features: expected a list of {n_features} numbers, "
                         f"got {JSON_TYPE_NAMES[type(features)]}", job_id)
    if len(features) != n_features:
        raise BadRequest(f"features: expected {n_features} numbers, got {len(features)}", job_id)
    for v in features:  # the fast path: every value a float32-representable number
        if (type(v) is float or type(v) is int) and F32_LOWEST <= v <= F32_BOUND:
            continue
        i, problem = next((i, p) for i, v in enumerate(features) if (p := number_problem(v)))
        raise BadRequest(f"features[{i}]: {problem}", job_id)
    if "true_score" not in message:
        raise BadRequest("true_score: missing", job_id)
    score = message["true_score"]
    if not ((type(score) is float or type(score) is int) and F32_LOWEST <= score <= F32_BOUND):
        raise BadRequest(f"true_score: {number_problem(score)}", job_id)
    return Sample(features, score, job_id)


def asks_ping_or_status(line: bytes, n_features: int) -> bool:
    try:
        request = parse_request(line, n_features)
    except BadRequest:
        return False
    return type(request) is Control and request.op in ("ping", "status")


def decoded_json(text: str) -> Any:
    """json.loads(text), without its Python wrappers (2 of a line's ~20 µs) when text is one JSON value and
    nothing else: its own C scanner, with its default settings, so the same value. Anything else (whitespace
    around the value, a BOM, an error) goes to json.loads itself, for its value or its exact error; an integer
    past the digits Python converts is valid JSON all the same (json_int)."""
    try:
        value, end = JSON_SCANNER(text, 0)
    except (StopIteration, ValueError, RecursionError):
        return json.loads(text, parse_int=json_int)
    return value if end == len(text) else json.loads(text, parse_int=json_int)


def json_int(digits: str) -> int | float:
    """int(digits), or for an integer of more digits than Python converts (4 300: a guard against quadratic time) a
    float as far outside float32's range: valid JSON, so the checks say which value is out of range."""
    try:
        return int(digits)
    except ValueError:
        return -1e308 if digits.startswith("-") else 1e308


def number_problem(v: Any) -> str | None:
    """Why `v` cannot be a float32 model input, or None when it can."""
    if type(v) is not float and type(v) is not int:
        return f"expected a number, got {JSON_TYPE_NAMES[type(v)]}"
    return feedback.float32_problem(v)


def encode_ack(fields: dict[str, Any], job_id: str | None) -> bytes:
    if job_id is not None:
        fields["job_id"] = job_id
    return json.dumps(fields).encode() + b"\n"


def untrained_ack(step: int, job_id: str | None) -> bytes:
    """encode_ack({"ok": True, "step": step, "trained": False}, job_id), byte for byte, in a fraction of its time:
    json.dumps escapes a string with this very function."""
    if job_id is None:
        return b'{"ok": true, "step": %d, "trained": false}\n' % step
    return b'{"ok": true, "step": %d, "trained": false, "job_id": %s}\n' % (step, encode_json_string(job_id).encode())


# ---- state: a snapshot plus a journal, so that a restart continues exactly where the process stopped ----

JOURNAL_HEADER = struct.Struct("<16sQ")  # magic, generation: the snapshot this journal continues
# Format 2's checksum covers a record's length field, its flags with it, so that a flipped flag fails it and a
# rejection is no run of zero bytes (a power loss can leave zeros past the last fsync: format 1 read them as
# hundreds of rejected lines). Format 1, a journal left by an earlier version, is read, and continued in its own
# format until the next snapshot resets it.
JOURNAL_FORMAT = 2
JOURNAL_MAGIC = b"VMAFX-JOURNAL-2\n"
JOURNAL_MAGICS = {b"VMAFX-JOURNAL-1\n": 1, JOURNAL_MAGIC: JOURNAL_FORMAT}
JOURNAL_RECORD = struct.Struct("<II")  # payload length (and flags), its crc32 and the payload's; then the payload
RECORD_LENGTH = struct.Struct("<I")
REJECTIONS = {1: JOURNAL_RECORD.pack(0, 0),  # a record without payload: one rejected line, for the counter
              2: JOURNAL_RECORD.pack(0, zlib.crc32(RECORD_LENGTH.pack(0)))}
HELD_OUT = 1 << 31  # flags in a record's length field: the sample went to the evaluation ring,
UNNAMED = 1 << 30  # and it had no job_id (so it advanced the hold-out count)
JOURNAL_MEMORY_LIMIT = 64 << 20  # records kept in memory while the disk refuses them
SNAPSHOT_MAGIC = b"VMAFX-SIDECAR-STATE 1\n"  # the framing, unchanged since format 1
SNAPSHOT_HEADER = struct.Struct("<QI")  # payload length, crc32 of the payload
# Format of what a snapshot holds. 1: no "format" field; 2: the same fields, with "format"; 3: the gate's
# champion and window added; 4: the coordinates the weights are in; 5: a fleet trainer's positions in the
# replicas' sample logs; 6: the window's samples not yet scored by the references. A sidecar reads every older
# format (migrated() lifts it in memory) and writes this one at its next snapshot. Format 6 later gained
# "kept_raw", "kept_features", "loss_smoothed", "samples_since_publish", "window_incumbent" and "newest_checkpoint",
# fields that older sidecars ignore (they try the refused statistics again, start the loss's average again, top the
# gate's history up from the window back, keep a window scored against another incumbent, and keep a replayed
# window across checkpoints) rather than refuse; a snapshot without "window_incumbent" that has an incumbent starts
# its window again, once, and one without "newest_checkpoint" takes its last gate record's version for it. It
# gained "base_model" (the base the state began from) and "base_sha256" (its file's digest) too: one without them is
# taken to have begun from the base configured now.
SNAPSHOT_FORMAT = 6


def is_finite_number(v: Any) -> bool:
    """A number as a snapshot's JSON holds one: an int or a finite float, not a bool, NaN or an infinity."""
    return type(v) in (int, float) and math.isfinite(v)


def check_store_fields(state: dict[str, Any]) -> None:
    """ValueError for a field of the snapshot's own (not the trainer's: see Trainer.check_scalars) not of the kind
    StateStore.save() writes, before anything loads: one that held, say, a number for the sources ended every start
    in a traceback."""
    kinds: dict[str, Callable[[Any], bool]] = {
        "generation": lambda v: type(v) is int and 0 <= v < 2**63,  # the journal's header holds it in 8 bytes
        "sources": lambda v: type(v) is dict and all(type(k) is str and type(n) is int for k, n in v.items()),
        "sample_log": lambda v: v is None or type(v) is str, "base_model": lambda v: type(v) is str,
        "base_sha256": lambda v: type(v) is str}
    for name, ok in kinds.items():
        if name in state and not ok(state[name]):  # those added later are optional
            raise ValueError(f"{name} {state[name]!r:.100} is not what a snapshot holds there")


class Outage:
    """One kind of write the disk may refuse for a while (the journal's writes, its fsyncs, the sample log's):
    logged when the first one fails and when one works again, not at every retry in between."""

    def __init__(self, kind: str, meanwhile: str):
        self.kind = kind  # of write, "journal write": "journal write failed, …", "journal writes work again"
        self.meanwhile = meanwhile  # what happens until it works
        self.ongoing = False

    def failed(self, e: OSError) -> None:
        if not self.ongoing:
            log.error("%s failed, %s: %s", self.kind, self.meanwhile, e)
        self.ongoing = True

    def ended(self) -> None:
        if self.ongoing:
            log.info("%ss work again", self.kind)
        self.ongoing = False


@dataclass(slots=True)
class JournalRecord:
    features: np.ndarray
    score: np.float32
    held_out: bool
    unnamed: bool


class Journal:
    """The samples accepted since the last snapshot, each written before its ACK is sent."""

    def __init__(self, path: Path, fsync: str, generation: int, intact: int, intact_samples: int,
                 journal_format: int):
        """Continue the journal of the state `generation` at `path` after its first `intact` bytes, the records
        read() found (`intact_samples` of them samples, in `journal_format`); whatever follows them (a torn tail, a
        journal the snapshot already holds) is cut before the next record is written. With none (0), the state's
        header goes out with the first records."""
        self.fsync = fsync
        self.journal_format = journal_format if intact else JOURNAL_FORMAT
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        self.pending = bytearray()  # records of the lines being answered now
        # The samples since the snapshot, by where their records are: pending, dropped in a long outage, written.
        self.pending_samples, self.dropped_samples, self.written_samples = 0, 0, intact_samples
        if not intact:
            self.pending += JOURNAL_HEADER.pack(JOURNAL_MAGIC, generation)
        self.size = intact  # bytes known to be written whole
        # The file may hold bytes past self.size: a reset, a failed write, a tail that is no record of this state.
        self.truncate_first = os.fstat(self.fd).st_size != intact
        self.write_outage = Outage("journal write", "keeping the samples in memory until it works")
        # Only "everysec" fsyncs between snapshots; a snapshot's reset fsyncs in every mode.
        self.sync_outage = Outage("journal fsync", "retrying every second" if fsync == "everysec" else
                                  "retrying with the next snapshot")
        self.failures = 0  # writes and fsyncs the disk refused, and the file lost or not reopened, since the start
        self.unsynced = False
        self.last_sync = time.monotonic()

    def append(self, row: np.ndarray, score: np.float32, held_out: bool, unnamed: bool) -> None:
        """A record: its header, then the row's and the score's bytes, copied once, into the pending ones."""
        length = (row.nbytes + 4) | (HELD_OUT if held_out else 0) | (UNNAMED if unnamed else 0)
        self.pending += JOURNAL_RECORD.pack(length, zlib.crc32(score, zlib.crc32(row, self.checksum_seed(length))))
        self.pending += row.data  # a buffer, not the array: ndarray's + would take over
        self.pending += score.data
        self.pending_samples += 1

    def append_rejection(self) -> None:
        self.pending += REJECTIONS[self.journal_format]

    def checksum_seed(self, length: int) -> int:
        """Where a record's crc32 starts: format 2's covers its length field first."""
        return zlib.crc32(RECORD_LENGTH.pack(length)) if self.journal_format == 2 else 0

    def commit(self) -> None:
        """Write the pending records in one go; called once per batch of lines, before their ACKs.
        If the disk refuses them (full, read-only), they stay pending and are written with the next
        batch: nothing is dropped while the process lives, and the error is logged once, not per line."""
        if not self.pending:
            return
        try:
            if self.truncate_first:
                os.ftruncate(self.fd, self.size)
            append_whole(self.fd, self.size, self.pending)
            if self.fsync == "always":
                os.fsync(self.fd)
        except OSError as e:
            self.write_outage.failed(e)
            self.truncate_first = True
            self.failures += 1
            if len(self.pending) > JOURNAL_MEMORY_LIMIT:  # memory stays bounded in a long outage
                keep = JOURNAL_HEADER.size if self.size == 0 else 0
                log.error("journal still failing: %d bytes of samples dropped, not durable",
                          len(self.pending) - keep)
                del self.pending[keep:]
                self.dropped_samples += self.pending_samples
                self.pending_samples = 0
            return
        self.write_outage.ended()
        self.truncate_first = False
        self.size += len(self.pending)
        self.pending.clear()
        self.written_samples += self.pending_samples
        self.pending_samples = 0
        self.unsynced = self.fsync != "always"
        if not self.unsynced:
            self.last_sync = time.monotonic()

    def sync_if_due(self) -> bool:
        """Retry what the disk refused, and fsync once a second with "everysec"; whether it fsynced now."""
        self.commit()  # retries records a failing disk refused
        if not (self.unsynced and self.fsync == "everysec" and time.monotonic() - self.last_sync >= 1.0):
            return False
        return self.fsync_now()

    def fsync_now(self) -> bool:
        """fsync now; whether it worked. A refused fsync (EIO) is counted, logged once per outage and retried a
        second later with "everysec", the records still in the page cache (a later fsync may miss pages a
        failed one dropped; the next snapshot holds them all the same)."""
        try:
            os.fsync(self.fd)
        except OSError as e:
            self.sync_outage.failed(e)
            self.failures += 1
            self.last_sync = time.monotonic()
            return False
        self.sync_outage.ended()
        self.unsynced = False
        self.last_sync = time.monotonic()
        return True

    def reopen(self, path: Path) -> None:
        """Write to the file at `path` from now on (reset() follows): the one written so far was removed or replaced."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        os.close(self.fd)
        self.fd = fd

    def reset(self, generation: int) -> None:
        """Start empty after the snapshot `generation`, which now holds everything the journal had.
        The header goes out with the next records if it cannot be written now."""
        self.size, self.truncate_first, self.journal_format = 0, True, JOURNAL_FORMAT
        self.pending[:] = JOURNAL_HEADER.pack(JOURNAL_MAGIC, generation)
        self.pending_samples, self.dropped_samples, self.written_samples = 0, 0, 0
        self.commit()
        if not self.write_outage.ongoing:
            self.fsync_now()

    @staticmethod
    def header_of(path: Path) -> tuple[bytes, int] | None:
        """The magic and the generation the file at `path` begins with; None for no whole header there."""
        try:
            with open(path, "rb") as f:
                return JOURNAL_HEADER.unpack(f.read(JOURNAL_HEADER.size))
        except (OSError, struct.error):
            return None

    @staticmethod
    def format_of(header: tuple[bytes, int], generation: int) -> int | None:
        """The format of a journal with `header` that continues the snapshot `generation`, None for one that does
        not: its magic whole, or this version's off in a byte or two (a bit flipped in place: the records after it,
        each with its own checksum, are that state's all the same, and a start that ignored them lost every sample
        ACKed since the snapshot)."""
        magic, written_after = header
        if written_after != generation:
            return None
        if magic in JOURNAL_MAGICS:
            return JOURNAL_MAGICS[magic]
        return JOURNAL_FORMAT if sum(a != b for a, b in zip(magic, JOURNAL_MAGIC)) <= 2 else None

    @staticmethod
    def read(path: Path, n_features: int, generation: int) -> tuple[list[JournalRecord | None], int, int]:
        """The intact records in order (None for a rejected line), the bytes they take with the header (0 when
        the file holds no journal of this generation: none, or one of another state, the snapshot's predecessor,
        which it already holds, or a snapshot set aside), and the bytes of corrupt records skipped among them.
        A record that fails its checks ends the list when no sample record follows it whole (a torn tail: a crash
        mid-write); when one does, it was corrupted in place, and reading goes on from there: a bad record costs
        what lies between it and the next sample record, not every ACKed sample after it."""
        try:  # not through a symlink, which the journal's writes (O_NOFOLLOW) then refuse
            with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return [], 0, 0
        except OSError as e:  # a directory in its place, say: no state is guessed at
            reason = "a symlink, which the sidecar's journal never is" if e.errno == errno.ELOOP else e.strerror or e
            raise StartupError(f"cannot read {path}: {reason}") from None
        header = JOURNAL_HEADER.unpack_from(data) if len(data) >= JOURNAL_HEADER.size else None
        journal_format = header and Journal.format_of(header, generation)
        if not journal_format:
            return [], 0, 0
        records, offset, size, skipped = [], JOURNAL_HEADER.size, 4 * (n_features + 1), 0
        while offset + JOURNAL_RECORD.size <= len(data):
            if data[offset:offset + JOURNAL_RECORD.size] == REJECTIONS[journal_format]:
                records.append(None)
                offset += JOURNAL_RECORD.size
                continue
            length, crc = JOURNAL_RECORD.unpack_from(data, offset)
            payload = data[offset + JOURNAL_RECORD.size:offset + JOURNAL_RECORD.size + size]
            if (length & ~(HELD_OUT | UNNAMED) != size or len(payload) != size
                    or record_checksum(length, payload, journal_format) != crc):
                following = next_sample_record(data, offset + 1, size, journal_format)
                if following is None:
                    break
                skipped += following - offset
                offset = following
                continue
            values = np.frombuffer(payload, np.float32)
            records.append(JournalRecord(values[:-1].copy(), values[-1], bool(length & HELD_OUT),
                                         bool(length & UNNAMED)))
            offset += JOURNAL_RECORD.size + size
        if offset != len(data):
            log.warning("journal %s: ignored %d bytes of a torn or corrupt tail", path, len(data) - offset)
        return records, offset, skipped


@functools.cache
def sample_record_lengths(size: int) -> re.Pattern[bytes]:
    """A sample record's length field, with any of its flags."""
    return re.compile(b"|".join(re.escape(struct.pack("<I", size | flags))
                                for flags in (0, HELD_OUT, UNNAMED, HELD_OUT | UNNAMED)))


def record_checksum(length: int, payload: bytes, journal_format: int) -> int:
    """The crc32 a journal record of `length` (with its flags) and `payload` holds in `journal_format`."""
    return zlib.crc32(payload, zlib.crc32(RECORD_LENGTH.pack(length)) if journal_format == 2 else 0)


def next_sample_record(data: bytes, start: int, size: int, journal_format: int) -> int | None:
    """The offset of the first whole sample record at or after `start`: found by its length field (with any of
    its flags; one scan for the four, resumed a byte past each candidate), then checked by its checksum."""
    lengths = sample_record_lengths(size)
    while found := lengths.search(data, start):
        offset, payload = found.start(), found.start() + JOURNAL_RECORD.size
        if payload + size <= len(data):  # whole: then its checksum, the 4 bytes after the length field matched
            length, crc = JOURNAL_RECORD.unpack_from(data, offset)
            if record_checksum(length, data[payload:payload + size], journal_format) == crc:
                return offset
        start = offset + 1
    return None


class StateStore:
    """<checkpoint dir>/.state/: snapshot.bin (the trainer's state_dict, framed with a checksum, replaced
    atomically) and journal.bin (every sample since). It frames bytes; what the state is, the trainer says."""

    def __init__(self, config: Config, trainer: Trainer):
        self.config, self.trainer = config, trainer
        self.directory = Path(config.checkpoint_dir).absolute() / ".state"
        self.snapshot_path = self.directory / "snapshot.bin"
        self.journal_path = self.directory / "journal.bin"
        self.journal: Journal | None = None
        self.sources: dict[str, int] = {}  # a fleet trainer's: the last sequence read from each replica's log
        # The base model the state began from, kept across restarts: until a snapshot says, this start's ("" for a
        # fresh model, a missing base file's included), with its file's digest ("" where unknown): a base replaced
        # in place keeps its path.
        self.base_model = "" if trainer.fresh else config.base_model_path
        self.base_sha256 = file_sha256(self.base_model) if self.base_model else ""
        try:  # what a journal and a log need before the first sample: a new directory on a full disk has not
            make_directory(self.directory, mode=0o700)
            self.samples = SampleLog(self.directory.parent, config.n_features) if config.sample_log == "1" else None
        except OSError as e:
            raise StartupError(f"cannot set up the trainer's state under {self.directory.parent}: "
                               f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}") from None
        # The log the journal's samples go to, and the one those of the snapshot restored went to: its journal's.
        self.log_name = self.samples.name if self.samples is not None else None
        self.journaled_to = self.log_name
        self.sample_write_outage = Outage("sample log write", "keeping the samples in memory until it works (a "
                                          "state snapshot meanwhile gives them up)")
        self.sample_sync_outage = Outage("sample log fsync", "retrying with the journal's next fsync")
        self.snapshot_failures = self.sample_log_failures = 0  # writes the disk refused, since the start
        self.generation = 0  # of the snapshot on disk; its journal carries the same number
        self.newest_checkpoint_saved: int | None = None  # as the snapshot restored was taken: see restore()
        self.last_save = self.journal_checked = time.monotonic()
        self.journal_lost = False  # its file removed or replaced while the process ran: see check_journal_in_place
        self.saved_at = (-1, -1)  # (samples accepted, samples rejected) in the last snapshot written: a refused
        # one is tried again an interval later, with or without new lines

    def restore(self) -> bool:
        """Load the snapshot, replay the journal through the ingest path, and start a fresh pair; whether
        there was a state to resume. Without a snapshot, the journal of generation 0 is replayed: the samples
        a first start ACKed while the disk refused its snapshots."""
        t = self.trainer
        # The steps replayed were taken before, and so was any checkpoint they took, which is on disk: retaken, it
        # would be published again under a new version (a journal outlives a checkpoint when its snapshot was
        # refused). One that falls due takes its turn once the server runs.
        t.replaying = True
        replayer = self.load_snapshot()  # with the batch settings the journal's samples were trained with
        loaded, t = replayer is not None, replayer or t
        records, intact, skipped = Journal.read(self.journal_path, self.config.n_features, self.generation)
        size = self.journal_path.stat().st_size if self.journal_path.exists() else 0
        header = Journal.header_of(self.journal_path)
        if skipped:
            self.keep_copy(self.journal_path, f"{skipped} bytes of corrupt records among its intact ones, skipped")
        if intact and header[0] not in JOURNAL_MAGICS:
            self.keep_copy(self.journal_path, "a corrupt header, its records read all the same")
        if size and not intact:
            magic, written_after = header or (JOURNAL_MAGIC, self.generation - 1)  # a reset torn in its header
            if not loaded:
                self.move_aside(self.journal_path, "without its snapshot")
            elif magic not in JOURNAL_MAGICS:  # its records may be this state's or an earlier one's: kept for a look
                self.move_aside(self.journal_path, f"corrupt (a header that names no journal of the snapshot's "
                                                   f"generation {self.generation}): not replayed")
            elif written_after > self.generation:  # an older snapshot put back, say
                self.move_aside(self.journal_path, f"newer than its snapshot (generation {written_after}, the "
                                                   f"snapshot's {self.generation}): not replayed")
            elif written_after == self.generation - 1:  # a crash between the snapshot and the journal's reset
                log.info("journal %s predates the snapshot, which already holds it: not replayed", self.journal_path)
            else:  # a bit flipped in its generation, or resets the disk refused for two snapshots: kept for a look
                self.move_aside(self.journal_path, f"older than its snapshot's predecessor (generation {written_after}"
                                                   f", the snapshot's {self.generation}): not replayed")
        elif intact < size and not loaded and not any(records):
            # Not one sample read: a journal of another feature count (or one torn in its first record), kept.
            self.move_aside(self.journal_path, "unreadable with this configuration")
            intact = 0
        for record in records:
            if record is None:
                t.count_rejected()
            else:
                t.ingest(record.features, record.score, record.held_out, record.unnamed)
                # Journaled, but not logged when the process died: its time is now. A state another directory's
                # sidecar journaled (adopted) went to that one's log, or to none: the fleet reads it there, once.
                if self.samples is not None and self.journaled_to == self.log_name:
                    self.samples.append(LoggedSample(t.samples_accepted, time.time(), record.held_out, None,
                                                     record.features, record.score))
        if t is not self.trainer:
            self.trainer.load_state_dict(t.state_dict())  # these settings from here on
            t = self.trainer
        t.replaying = False
        if records and loaded and self.newest_checkpoint_saved is not None:
            t.end_window_at_newest_checkpoint(self.newest_checkpoint_saved)
        if self.samples is not None:
            floor = max(self.samples.last_sequence, fleet_cursor(self.directory.parent))
            if floor > t.samples_accepted:
                # The log's numbers only increase: a state that holds fewer samples than its log counts on from
                # the log's last (a state begun afresh over an earlier one's log, with the log on or off then; one
                # whose journal lost records the log kept, to a power loss or a corrupt record), or than the fleet
                # trainer read under this replica's name (a directory begun afresh under it). Numbered from its
                # own count, its samples would take numbers the log, and the fleet trainer's position in it,
                # already passed: the fleet would skip them, and retention delete them as read.
                log.info("the sample log, or the fleet trainer's position in it, is past the state restored (%d "
                         "samples, %d in the state): samples are counted on from there", floor, t.samples_accepted)
                t.samples_accepted = floor
            self.commit_samples()
        resumed = loaded or bool(records)
        if resumed:
            log.info("resumed: step %d, replay buffer %d/%d, %d journal records replayed, %d samples accepted "
                     "so far", t.steps, t.replay.size, self.config.replay_capacity, len(records), t.samples_accepted)
        # What the journal holds past its intact records is cut before anything is appended: should the
        # snapshot below be refused, what is ACKed next must follow them, readable at the next start.
        try:
            self.journal = Journal(self.journal_path, self.config.journal_fsync, self.generation, intact,
                                   sum(record is not None for record in records),
                                   header and Journal.format_of(header, self.generation) or JOURNAL_FORMAT)
        except OSError as e:  # a file the process may not write, an I/O error: one line, as a refused read gives
            raise StartupError(f"cannot write {self.journal_path}: {e.strerror or e}") from None
        self.save()
        return resumed

    # The server's calls, per sample and per loop turn; the tests' NoState has the same ones.

    def record_sample(self, row: np.ndarray, score: np.float32, held_out: bool, job_id: str | None) -> None:
        self.journal.append(row, score, held_out, not job_id)
        if self.samples is not None:  # the sample's number: the trainer counts it next
            self.samples.append(LoggedSample(self.trainer.samples_accepted + 1, time.time(), held_out, job_id, row,
                                             score))

    def record_rejection(self) -> None:
        self.journal.append_rejection()

    def commit(self) -> None:
        """The journal's batch, then the sample log's: a logged sample is always a journaled one. While the
        journal's writes fail, the log's samples wait for it, within the same memory bound."""
        self.journal.commit()
        if self.samples is None:
            return
        if self.journal.write_outage.ongoing:
            self.bound_pending_samples()
        else:
            self.commit_samples()

    def commit_samples(self) -> None:
        """As the journal's commit: what the disk refuses stays pending, and is written with the next batch;
        logged once per outage, and memory stays bounded in a long one (bound_pending_samples)."""
        writing = bool(self.samples.pending)
        try:
            self.samples.commit(self.config.sample_log_max_bytes)
        except OSError as e:
            self.sample_write_outage.failed(e)
            self.sample_log_failures += 1
            self.bound_pending_samples()
            return
        if writing:  # a turn with nothing to log says nothing of the disk
            self.sample_write_outage.ended()
        if self.config.journal_fsync == "always":  # written, so not kept: a refused fsync is no refused write
            self.sync_samples()

    def bound_pending_samples(self) -> None:
        """Give up the log's waiting samples past JOURNAL_MEMORY_LIMIT, counted: the fleet then reports the gap."""
        if len(self.samples.pending) > JOURNAL_MEMORY_LIMIT:
            log.error("sample log writes (or the journal's) still failing: %d samples dropped from the log",
                      self.samples.drop_pending())

    def tick(self) -> None:
        if time.monotonic() - self.journal_checked >= 1.0:  # a call a second, not one a loop turn
            self.check_journal_in_place()
            if self.samples is not None and not self.samples.in_place():
                self.begin_log_again()
        if self.journal.sync_if_due() and self.samples is not None:  # synced as the journal is
            self.sync_samples()
        counters = (self.trainer.samples_accepted, self.trainer.samples_rejected)
        if counters != self.saved_at and time.monotonic() - self.last_save >= self.config.state_interval_s:
            self.save()

    def sync_samples(self) -> None:
        """fsync the sample log; a refused one is counted, logged once per outage as the journal's, and retried
        with the journal's next fsync."""
        try:
            self.samples.sync()
        except OSError as e:
            self.sample_log_failures += 1
            self.sample_sync_outage.failed(e)
            return
        self.sample_sync_outage.ended()

    def save(self) -> None:
        """Write the snapshot atomically, then empty the journal. What the lines answered so far recorded is
        committed first: a checkpoint's snapshot comes in the middle of a turn, and the samples it empties from
        the journal must be in the sample log before (else a kill before the turn's end keeps them out of it).
        Those the log refuses are given up once the snapshot is written, counted (the fleet reports the gap): the
        journal it empties was their one copy on disk, and a restart would never log them."""
        self.commit()
        started = time.perf_counter()
        generation = self.generation + 1
        state = self.trainer.state_dict()
        meta = {"format": SNAPSHOT_FORMAT, "generation": generation, "sources": self.sources,
                "sample_log": self.log_name, "newest_checkpoint": self.trainer.checkpoints.version,
                "base_model": self.base_model, "base_sha256": self.base_sha256,
                **{k: v for k, v in state.items() if not isinstance(v, np.ndarray)}}
        payload = pack_arrays(meta, {k: v for k, v in state.items() if isinstance(v, np.ndarray)})
        crc = 0
        for chunk in payload:
            crc = zlib.crc32(chunk, crc)
        header = SNAPSHOT_MAGIC + SNAPSHOT_HEADER.pack(sum(len(c) for c in payload), crc)
        temp = self.directory / ".snapshot.bin.tmp"
        try:
            make_directory(self.directory, mode=0o700)  # removed while the process ran: its state is here
            write_synced(temp, [memoryview(header), *payload], mode=0o600)
            os.replace(temp, self.snapshot_path)
        except OSError as e:  # the journal keeps everything since the last good snapshot
            discard(temp)
            self.snapshot_failures += 1
            log.error("state snapshot failed, will retry: %s", e)
        else:
            self.generation = generation
            if self.samples is not None and self.samples.pending:
                self.commit_samples()  # those that waited for the journal's writes: the snapshot holds them now
                if self.samples.pending:
                    log.error("state snapshot written while the sample log refuses writes: %d samples it has not "
                              "taken are given up (the fleet reports the gap)", self.samples.drop_pending())
            self.empty_journal()
            self.saved_at = (self.trainer.samples_accepted, self.trainer.samples_rejected)
        self.last_save = time.monotonic()
        log.debug("state snapshot written in %.1f ms", (time.perf_counter() - started) * 1e3)

    def empty_journal(self) -> None:
        """Start the journal of the snapshot just renamed into place, which a restart now reads: after its
        directory's fsync, so that a power loss cannot keep the emptied journal but not the rename. When the
        disk refuses that fsync the journal is emptied all the same, the refusal counted (the snapshot may not
        survive a power loss; the next one is due an interval later): what is journaled next must continue
        the snapshot a restarted process reads, or it would be ignored with the old journal."""
        try:
            fsync_directory(self.directory)
        except OSError as e:
            self.snapshot_failures += 1
            log.error("state snapshot written, but its directory's fsync failed: %s", e)
        if not self.journal_in_place():
            try:
                self.journal.reopen(self.journal_path)
                self.journal_lost = False
            except OSError as e:
                self.journal.failures += 1
                log.error("cannot open a new journal at %s: %s", self.journal_path, e)
        self.journal.reset(self.generation)

    def journal_in_place(self) -> bool:
        """Whether the journal's file is still the one at its path, the one a restart reads."""
        return is_open_as(self.journal_path, self.journal.fd)

    def check_journal_in_place(self) -> None:
        """Called once a second: a journal removed or replaced while the process runs (its directory deleted, say)
        takes every record into a file no restart reads. A snapshot then holds them, and starts a journal where one
        is read."""
        self.journal_checked = time.monotonic()
        if self.journal_in_place():
            return
        if not self.journal_lost:  # counted and logged once; a snapshot tried each second until one is written
            self.journal.failures += 1
            log.error("%s was removed or replaced while the sidecar ran: a snapshot now, then a new journal",
                      self.journal_path)
        self.journal_lost = True
        self.save()

    def begin_log_again(self) -> None:
        """The sample log's segment, or its directory, removed while the process ran: its records went to a file
        the fleet trainer never reads. Counted as a failed write of the log; the fleet reports what it lost as a
        gap, and the log goes on under its name."""
        self.sample_log_failures += 1
        log.error("sample log %s: the segment being written was removed or replaced while the sidecar ran: what the "
                  "fleet trainer had not read of it is lost to it (the fleet reports the gap); a new segment begins",
                  self.samples.directory)
        self.samples.begin_again()

    def write_failures(self) -> dict[str, int]:
        """Writes the disk refused since the process started, by what was written; the tests' NoState has the same."""
        return {"journal": self.journal.failures, "snapshot": self.snapshot_failures,
                "sample_log": self.sample_log_failures}

    def unsaved_samples(self) -> int:
        """Accepted samples since the last snapshot written that the journal a restart reads does not hold: their
        records refused by the disk (pending, or dropped in a long outage), or written to a journal file since
        removed or replaced."""
        journal = self.journal
        return journal.pending_samples + journal.dropped_samples + (journal.written_samples if self.journal_lost else 0)

    def load_snapshot(self) -> Trainer | None:
        """The trainer that holds the snapshot's state, for the journal to replay on (see Trainer.replayer); None
        when there is none to load."""
        try:
            data = self.snapshot_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:  # as in Journal.read()
            raise StartupError(f"cannot read {self.snapshot_path}: {e.strerror or e}") from None
        try:
            meta, arrays = read_snapshot(data)
        except ValueError as e:
            self.move_aside(self.snapshot_path, f"corrupt ({e})")
            return None
        if not snapshot_framing_whole(data):
            self.keep_copy(self.snapshot_path, "a corrupt magic or length, its checksummed payload read all the same")
        built_fresh = self.trainer.fresh  # whether this start found no base file: a fresh model stands in
        try:
            state = migrated({**meta, **arrays})
            check_store_fields(state)
            generation, sources = state["generation"], dict(state["sources"])  # a format since 5 holds them
            # Fresh as the state began, not as the file is now (a state saved before its first step, its base file
            # gone at the restart, had the base's weights declared in standardized coordinates, and the reverse
            # trained a fresh model's in raw ones: take_statistics()); before the load, whose waiting samples may
            # fill that first step.
            began = state.get("base_model", self.base_model)  # saved before it was: taken as this start's
            self.trainer.fresh = not began
            replayer = self.trainer.replayer(state["fingerprint"])
            replayer.load_state_dict(state)
        except IncompatibleState as e:
            self.trainer.fresh = built_fresh
            if began and began == self.config.base_model_path and built_fresh:  # its base file gone since
                raise StartupError(f"base model {self.config.base_model_path} is missing, and the trainer state in "
                                   f"{self.directory.parent} began from it ({e}): put the file back, or move .state/ "
                                   "out of the directory to start afresh") from None
            self.move_aside(self.snapshot_path, f"incompatible: {e}")
            self.move_aside(self.journal_path, "incompatible with this configuration")
            return None
        except (ValueError, KeyError, TypeError, IndexError) as e:  # e.g. written by a newer sidecar
            self.trainer.fresh = built_fresh
            self.move_aside(self.snapshot_path, f"unreadable ({type(e).__name__}: {e})")
            self.move_aside(self.journal_path, "unreadable without its snapshot")
            return None
        self.generation, self.sources = generation, sources
        # The newest checkpoint version in the directory as the snapshot was taken (saved before it was: its own)
        newest = state.get("newest_checkpoint", (state.get("last_gate") or {}).get("version"))
        self.newest_checkpoint_saved = newest if type(newest) is int else None
        self.journaled_to = state.get("sample_log", self.log_name)  # saved before it was: this directory's
        began_sha256 = state.get("base_sha256", self.base_sha256 if began == self.base_model else "")
        if began and began == self.config.base_model_path and built_fresh:  # its file gone: no other base named
            log.info("the trainer state in %s began from base model %s, whose file is missing now: training goes on "
                     "from the state", self.directory.parent, began)
        elif began != self.base_model:
            self.warn_of_another_base(began or "none (a fresh model)", self.base_model or "none (a fresh model)")
        elif began and began_sha256 and self.base_sha256 and began_sha256 != self.base_sha256:
            self.warn_of_another_base(f"{began} as it was then (sha256 {began_sha256[:12]}...)",
                                      f"the file there now (sha256 {self.base_sha256[:12]}...)")
        self.base_model, self.base_sha256 = began, began_sha256
        return replayer

    def warn_of_another_base(self, began: str, configured: str) -> None:
        log.warning("the trainer state in %s began from base model %s, not %s: training goes on from the state "
                    "(to train from that base, move .state/ out of the directory first)", self.directory.parent,
                    began, configured)

    def move_aside(self, path: Path, why: str) -> None:
        if not path.exists():
            return
        target = aside_path(path, why.split()[0].strip(":"))
        os.replace(path, target)
        log.warning("state file %s is %s: moved to %s; starting without it", path, why, target.name)

    def keep_copy(self, path: Path, why: str) -> None:
        """A copy of a state file that is read all the same (the file itself stays until a snapshot replaces
        it, in case this start dies before one), for whoever looks into why; a disk too full for it is no
        reason not to start."""
        target = aside_path(path, "corrupt")
        try:
            target.write_bytes(path.read_bytes())
        except OSError as e:
            discard(target)
            log.warning("state file %s has %s; no copy could be kept (%s)", path, why, e)
            return
        log.warning("state file %s has %s: a copy is kept as %s", path, why, target.name)


def read_snapshot(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The fields and arrays of a snapshot file's bytes, as written; ValueError if it is not whole. The payload's
    checksum decides: a bit flipped in the magic or the length before it had a whole trained state set aside, which
    the checksum proved intact (snapshot_framing_whole() tells the caller)."""
    header_end = len(SNAPSHOT_MAGIC) + SNAPSHOT_HEADER.size
    crc = SNAPSHOT_HEADER.unpack_from(data, len(SNAPSHOT_MAGIC))[1] if len(data) >= header_end else -1
    payload = memoryview(data)[header_end:]  # not a copy: a snapshot holds the rings, hundreds of MB at large ones
    if zlib.crc32(payload) != crc:
        raise ValueError("bad checksum or truncated")
    try:
        return unpack_arrays(payload)
    except (ValueError, KeyError, TypeError, AttributeError, SyntaxError, struct.error) as e:  # SyntaxError: numpy
        raise ValueError(f"{type(e).__name__}: {e}") from None  # parses a dtype string such as "(,4)f4" as Python


def snapshot_framing_whole(data: bytes) -> bool:
    """Whether the magic and the length before a snapshot's payload are as written."""
    length = SNAPSHOT_HEADER.unpack_from(data, len(SNAPSHOT_MAGIC))[0]
    return data.startswith(SNAPSHOT_MAGIC) and length == len(data) - len(SNAPSHOT_MAGIC) - SNAPSHOT_HEADER.size


def migrated(state: dict[str, Any]) -> dict[str, Any]:
    """A snapshot's fields and arrays in SNAPSHOT_FORMAT; ValueError for a format newer than this sidecar
    reads, KeyError if one it lifts lacks what it needs."""
    version = state.get("format", 1)
    if not isinstance(version, int) or version > SNAPSHOT_FORMAT:
        raise ValueError(f"snapshot format {version!r}, newer than this sidecar reads ({SNAPSHOT_FORMAT})")
    if version == 1:  # the same fields, before they carried their format
        state = {**state, "format": 2}
    if state["format"] == 2:  # no champion (the incumbent becomes the first) and an empty window
        state = {**state, "format": 3, "has_champion": False, "champion_version": None,
                 "champion": np.zeros_like(state["theta"]),
                 "window_n": 0, "window_shift": 0.0, "window_sums": np.zeros((1 + len(REFERENCES), 4)),
                 "window_truth": np.zeros(2)}
    if state["format"] == 3:  # raw weights: the identity
        n_features = state["fingerprint"]["sizes"][0]
        state = {**state, "format": 4, "coordinates": {"x_shift": [0.0] * n_features, "x_scale": [1.0] * n_features,
                                                        "y_shift": 0.0, "y_scale": 1.0, "standardized": "none"}}
    if state["format"] == 4:  # nothing read from a sample log yet, but for a fleet of the day before format 5
        state = {**state, "format": 5, "sources": state.get("sources", {})}
    if state["format"] == 5:  # every sample of the window in its sums
        n_features = state["fingerprint"]["sizes"][0]
        state = {**state, "format": 6, "window_unscored": 0, "window_x": np.zeros((0, n_features), np.float32),
                 "window_y": np.zeros(0, np.float32), "window_candidate": np.zeros(0, np.float32)}
    if "champion_version" not in state:  # format 3 held its champion without a version for its first days:
        state = {**state, "has_champion": False, "champion_version": None}  # the incumbent takes its place
    if "kept_raw" not in state:  # saved before it was: statistics the process refused are tried again
        state = {**state, "kept_raw": False}
    if "kept_features" not in state:  # the same, for a feature's regime change
        state = {**state, "kept_features": []}
    if "loss_smoothed" not in state:  # saved before it was: the average starts again from the next batch
        state = {**state, "loss_smoothed": None}
    if "samples_since_publish" not in state:  # saved before it was: the history skips the window alone, as then
        state = {**state, "samples_since_publish": 0}
    if "window_incumbent" not in state:  # saved before it was: unknown, so a window against an incumbent starts again
        state = {**state, "window_incumbent": None}
    return state


def pack_arrays(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[memoryview]:
    """A JSON header (meta, and each array's dtype and shape) followed by the arrays' raw bytes, as
    views that are written without a copy: the snapshot runs inline and the replay buffer is 3 MB."""
    specs = {name: [a.dtype.str, list(a.shape)] for name, a in arrays.items()}
    header = json.dumps({"meta": meta, "arrays": specs}).encode()
    return [memoryview(struct.pack("<I", len(header))), memoryview(header),
            *(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)) for a in arrays.values())]


def unpack_arrays(payload: bytes | memoryview) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    (length,) = struct.unpack_from("<I", payload)
    header = json.loads(bytes(payload[4:4 + length]))
    arrays, offset = {}, 4 + length
    for name, (dtype, shape) in header["arrays"].items():
        count = math.prod(shape)
        arrays[name] = np.frombuffer(payload, dtype, count, offset).reshape(shape)
        offset += count * np.dtype(dtype).itemsize
    return header["meta"], arrays


# ---- sample log: every accepted sample, appended to checksummed segments for the fleet trainer ----

SAMPLE_LOG_DIR = ".samples"
SEGMENT_MAGIC = b"VMAFX-SAMPLES-1\n"
SEGMENT_HEADER = struct.Struct("<16sI")  # magic, feature count
SAMPLE_RECORD = struct.Struct("<IIQdB")  # payload length, crc32 of the rest, sequence, arrival (Unix), held out
SEGMENT_BYTES = 16 << 20  # the most a segment holds (segment_bytes()); the next starts at the next sequence
SMALLEST_SEGMENT_BYTES = 4096  # a dozen samples of 80 features: under a tiny bound, a segment is not a record
LOG_ORIGIN = "origin"  # in .samples/: the first sequence ever logged (a replica may start logging late)
LOG_ID = "id"  # in .samples/: a random name the log keeps wherever its directory goes; the fleet's position is kept
# under it, so a replica directory renamed, or reached by a symlink, is not read again from its start


@dataclass(frozen=True)
class LoggedSample:
    sequence: int  # the replica's samples_accepted after it: unique and increasing, across restarts too
    arrival: float
    held_out: bool
    job_id: str | None
    features: np.ndarray
    score: np.float32


class SampleLog:
    """<checkpoint dir>/.samples/<first sequence>.seg: each accepted sample in the order it was accepted,
    appended with the journal's batch (one write per batch, synced as the journal is). A record is written
    whole or, after a crash mid-write, ignored with everything after it in that segment."""

    def __init__(self, directory: Path, n_features: int):
        self.directory = directory / SAMPLE_LOG_DIR
        if not os.path.lexists(self.directory) and (begun := self.begun_path()).is_dir():
            os.replace(begun, self.directory)  # a move_aside() a crash cut between its renames: finished
            fsync_directory(self.directory.parent)
        make_directory(self.directory, mode=0o700)
        if not os.path.lexists(self.directory / LOG_ID):  # one it cannot read now is still its name: kept
            write_whole(self.directory / LOG_ID, f"{secrets.token_hex(8)}\n".encode(), mode=0o600)
            fsync_directory(self.directory)
        self.n_features = n_features
        # LOG_ID and LOG_ORIGIN (once known), which open_segment() puts back. One unreadable now stops the start: as
        # none, the journal's samples were not logged, and the snapshot then said they need not be.
        self.name = readable_log_id(directory)
        self.origin = written_origin(self.directory)
        self.pending = bytearray()
        self.last_sequence = 0  # of the newest record written whole
        self.fd: int | None = None
        self.segment: Path | None = None  # the file at fd, while it is open
        self.size = 0
        self.samples_dropped = 0  # lost before the fleet read them (size bound, outage), since the start
        self.continue_log()

    def continue_log(self) -> None:
        """Continue after the newest whole record. A segment at the end without one would end the segment before
        it at its name, hiding what is written next: one that holds no more than a header (a crash as it began)
        is removed, one whose records cannot be read (a header a power loss zeroed) is set aside as
        `<name>.<time>.unreadable`. A log of another feature count is moved aside whole, and the new one numbers on
        from its last record (after a restart too, while it holds none): numbers only increase, or what the fleet
        trainer read before would cover them."""
        header = SEGMENT_HEADER.pack(SEGMENT_MAGIC, self.n_features)
        end = None  # the first number of a segment removed after this one: where this one ended
        for path in reversed(segment_paths(self.directory)):
            with open(path, "rb") as f:
                start = f.read(len(header) + 1)
            ours = start.startswith(header) or is_segment_of(path.read_bytes(), path, self.n_features)
            if not ours and start.startswith(SEGMENT_MAGIC) and len(start) >= len(header):
                _, n_features = SEGMENT_HEADER.unpack_from(start)
                self.last_sequence = int(path.name[:16]) - 1
                for sample in read_segment(path, n_features):
                    self.last_sequence = sample.sequence
                self.move_aside(f"{path.name} is a segment of another feature count than {self.n_features}")
                return
            for sample in read_segment(path, self.n_features) if ours else ():
                if end is not None and sample.sequence >= end:
                    break
                self.last_sequence = sample.sequence
            if self.last_sequence:
                return
            if header.startswith(start):
                path.unlink()
                log.info("sample log: removed %s, which holds no record (a crash as it began)", path.name)
            else:
                target = aside_path(path, "unreadable")
                os.replace(path, target)
                log.warning("sample log: %s holds no record that can be read: set aside as %s", path.name, target.name)
            end = int(path.name[:16])
        self.last_sequence = set_aside_last_sequence(self.directory)  # a log with no record yet

    def move_aside(self, why: str) -> None:
        """Set the whole log aside and begin a new one with its origin: the samples of the old one that the fleet
        trainer had not read are then a gap the fleet reports, and are counted here as lost to it."""
        origin, read = log_origin(self.directory.parent), fleet_cursor(self.directory.parent)
        self.name = self.name or secrets.token_hex(8)  # numbers go on, and the fleet's position
        paths = segment_paths(self.directory)
        ends = [int(p.name[:16]) for p in paths[1:]] + [self.last_sequence + 1]
        unread = sum(unread_records(p, read, end) for p, end in zip(paths, ends))
        begun, target = self.begun_path(), aside_path(self.directory, "set-aside")
        begun.mkdir(mode=0o700, exist_ok=True)  # the new log whole before the old one goes: its name and origin
        for file, content in ((LOG_ORIGIN, origin), (LOG_ID, self.name)):
            write_whole(begun / file, f"{content}\n".encode(), mode=0o600)
        fsync_directory(begun)
        os.replace(self.directory, target)
        os.replace(begun, self.directory)
        fsync_directory(self.directory.parent)
        self.samples_dropped += unread
        log.warning("sample log %s: %s; moved to %s, the fleet trainer no longer reads it (%d samples it had not "
                    "read); a new log starts", self.directory, why, target.name, unread)

    def begun_path(self) -> Path:
        """Where move_aside() makes the new log before it moves the old one: a start finds it there when a crash
        came between the two renames, and had otherwise begun a log of another name, hiding the gap."""
        return self.directory.with_name(f"{SAMPLE_LOG_DIR}.begun")

    def append(self, sample: LoggedSample) -> None:
        """Take a sample newer than every one logged; older ones (a journal replayed after a crash that
        came after the log's write) are already there."""
        if sample.sequence <= self.last_sequence:
            return
        job_id = (sample.job_id or "").encode("utf-8", "surrogatepass")
        body = (struct.pack("<H", len(job_id)) + job_id + sample.features.astype(np.float32).tobytes()
                + np.float32(sample.score).tobytes())
        head = struct.pack("<QdB", sample.sequence, sample.arrival, sample.held_out)
        crc = zlib.crc32(head + body)
        self.pending += SAMPLE_RECORD.pack(len(body), crc, sample.sequence, sample.arrival, sample.held_out) + body
        self.last_sequence = sample.sequence

    def commit(self, max_bytes: int) -> None:
        """Write the pending records, in a new segment when the current one is full, and keep the log within
        `max_bytes` then. OSError if the disk refuses them; they stay pending."""
        if not self.pending:
            return
        if self.fd is None or self.size >= segment_bytes(max_bytes):
            self.open_segment()
            self.prune(max_bytes)
        os.ftruncate(self.fd, self.size)  # what a failed write could not cut (see append_whole)
        append_whole(self.fd, self.size, self.pending)
        self.size += len(self.pending)
        self.pending.clear()

    def prune(self, max_bytes: int) -> None:
        """Delete the oldest segments (never the one being written) that the fleet trainer has read whole,
        then while the log is larger than `max_bytes`, counting the samples lost unread."""
        read = fleet_cursor(self.directory.parent)
        paths = segment_paths(self.directory)
        sizes = [p.stat().st_size for p in paths]
        for path, following in zip(paths, paths[1:]):
            end = int(following.name[:16])  # this segment holds [its name's number, end)
            if end - 1 > read and sum(sizes) <= max_bytes:
                return
            lost = unread_records(path, read, end) if end - 1 > read else 0
            path.unlink()
            sizes.pop(0)
            if lost > 0:
                self.samples_dropped += lost
                log.warning("sample log over VMAFX_SIDECAR_SAMPLE_LOG_MAX_BYTES (%d): deleted %s, %d samples the "
                            "fleet trainer had not read (%d so far)", max_bytes, path.name, lost, self.samples_dropped)

    def drop_pending(self) -> int:
        """Give up the samples waiting to be written (a long outage: memory stays bounded); how many."""
        if not self.pending:
            return 0
        (first,) = struct.unpack_from("<Q", self.pending, 8)
        dropped = self.last_sequence - first + 1
        self.pending.clear()
        self.samples_dropped += dropped
        return dropped

    def sync(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)

    def open_segment(self) -> None:
        """Close the current segment and start the next at the first pending sequence; on an OSError no
        segment is open, and none was left without its header."""
        if self.fd is not None:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
        (first,) = struct.unpack_from("<Q", self.pending, 8)
        self.put_back_names()
        if written_origin(self.directory) is None:  # samples before it were never logged, not lost
            segments = segment_paths(self.directory)  # one that a full disk left empty is written again
            origin = int(segments[0].name[:16]) if segments else first
            write_whole(self.directory / LOG_ORIGIN, f"{origin}\n".encode(), mode=0o600)
            self.origin = origin
        path = self.directory / f"{first:016d}.seg"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            write_all(fd, SEGMENT_HEADER.pack(SEGMENT_MAGIC, self.n_features))
            fsync_directory(self.directory)
        except OSError:
            os.close(fd)
            discard(path)
            raise
        self.fd, self.size, self.segment = fd, SEGMENT_HEADER.size, path

    def in_place(self) -> bool:
        """Whether the segment being written (if one is) is still the file at its path, where the fleet reads it."""
        return self.fd is None or is_open_as(self.segment, self.fd)

    def begin_again(self) -> None:
        """After the segment being written, or the whole log, was removed while the process ran: the next batch
        begins a segment."""
        os.close(self.fd)
        self.fd = self.segment = None

    def put_back_names(self) -> None:
        """The log's directory, name and origin, should they have been removed while the process ran: the log goes
        on as the same one, so that the fleet reports what was lost as a gap (a log of another name, or of a later
        origin, hid it). What the disk refuses is tried again with the next segment."""
        make_directory(self.directory, mode=0o700)
        for file, content in ((LOG_ID, self.name), (LOG_ORIGIN, self.origin)):
            if content is not None and not os.path.lexists(self.directory / file):
                write_whole(self.directory / file, f"{content}\n".encode(), mode=0o600)
                log.warning("sample log %s: put %s back (%s), removed while the sidecar ran", self.directory, file,
                            content)


def segment_bytes(max_bytes: int) -> int:
    """How much a segment holds before the next begins: a quarter of the log's bound, at most SEGMENT_BYTES. The log
    is kept within its bound as a segment begins, so it holds at most that and the segment being written: with
    16 MiB segments, a bound of 4 MiB had been kept at 16.9 MB, then every unread sample dropped at once."""
    return min(SEGMENT_BYTES, max(SMALLEST_SEGMENT_BYTES, max_bytes // 4))


def is_open_as(path: Path, fd: int) -> bool:
    """Whether the file at `path` is the one open as `fd` (not removed or replaced since it was opened)."""
    try:
        here, there = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def aside_path(path: Path, tag: str) -> Path:
    """Where to set `path` aside: its name, the time (UTC, as every time the sidecar writes: local time went back at
    a change from summer time, and sorted the names out of order) and `tag`, counted on when that is taken (a restart
    loop sets aside within a second): a directory would not be replaced, a file would be lost."""
    stem, n = f"{path.name}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}", 1
    target = path.with_name(f"{stem}.{tag}")
    while os.path.lexists(target):
        n += 1
        target = path.with_name(f"{stem}.{n}.{tag}")
    return target


def log_id(directory: Path) -> str | None:
    """The name of the sample log in a replica's `directory` (LOG_ID); None for one without (an older version's),
    or with one that cannot be read."""
    try:
        return readable_log_id(directory)
    except OSError:
        return None


def readable_log_id(directory: Path) -> str | None:
    """log_id, but OSError where the name cannot be read now (an I/O error), which is not a log without one."""
    try:
        return read_small_file(directory / SAMPLE_LOG_DIR / LOG_ID).decode().strip() or None
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def log_origin(directory: Path) -> int:
    """The first sequence a replica's log ever held (1 if it cannot tell): never past its oldest segment's first,
    where a bit flipped in LOG_ORIGIN's digits put it, and the fleet skipped the samples between in silence."""
    origin = written_origin(directory / SAMPLE_LOG_DIR) or 1
    try:
        oldest = min((int(p.name[:16]) for p in segment_paths(directory / SAMPLE_LOG_DIR)), default=origin)
    except OSError:  # a log that cannot be listed: its reader says why
        return origin
    if oldest < origin:
        log.warning("sample log %s: %s says %d, its oldest segment begins at %d: read from there",
                    directory / SAMPLE_LOG_DIR, LOG_ORIGIN, origin, oldest)
    return min(origin, oldest)


def written_origin(log_directory: Path) -> int | None:
    """LOG_ORIGIN's number; None where it is missing or unreadable."""
    try:
        return int(read_small_file(log_directory / LOG_ORIGIN))
    except (OSError, ValueError):
        return None


def unread_records(path: Path, read: int, end: int) -> int:
    """How many records of a segment (ending before sequence `end`, where the next begins) the fleet trainer has not
    read: counted, for sequences missing from the log (accepted with it off, or dropped in an outage and counted
    then) are none of its own; by their headers alone (decoding them took 0.3 s a segment, in the loop), as far as
    they follow one another; taken from the names where the segment cannot be read."""
    try:
        return sum(sequence > read for sequence in record_sequences(path, end))
    except OSError:
        return max(0, end - max(int(path.name[:16]), read + 1))


def record_sequences(path: Path, end: int) -> Iterator[int]:
    """The sequences of a segment's records, by their headers alone (no checksum, nothing decoded), as long as they
    follow one another below `end`; OSError where the segment cannot be read."""
    data = path.read_bytes()
    offset, last = SEGMENT_HEADER.size, int(path.name[:16]) - 1
    while offset + SAMPLE_RECORD.size <= len(data):
        length, _, sequence, _, _ = SAMPLE_RECORD.unpack_from(data, offset)
        if not last < sequence < end:  # past where the next segment begins, or not a record's header
            return
        yield sequence
        offset, last = offset + SAMPLE_RECORD.size + length, sequence


def set_aside_last_sequence(log_directory: Path) -> int:
    """The last sequence in the logs set aside beside `log_directory` (0 without one): where a log begun as one was
    set aside numbers on from when its process stopped before it logged a sample (or was killed between the
    two renames). From the fleet trainer's position, its samples took the numbers of the old log's unread ones,
    and the fleet saw no gap."""
    last = 0
    for aside in log_directory.parent.glob(f"{SAMPLE_LOG_DIR}.*.set-aside"):
        for path in reversed(segment_paths(aside)):
            try:
                newest = max(record_sequences(path, 2**64), default=0)
            except OSError:
                continue
            if newest:
                last = max(last, newest)
                break
    return last


def segment_paths(directory: Path) -> list[Path]:
    """The segments in `directory`, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [directory / n for n in sorted(n for n in names if re.fullmatch(r"\d{16}\.seg", n))]


def read_log(directory: Path, n_features: int, after: int = 0) -> Iterator[LoggedSample]:
    """The samples of a sample log with a sequence above `after`, in order. A segment ends where the next
    one begins (earlier versions continued a log from the state's count, so a state that held fewer samples
    than the log superseded its tail)."""
    paths = segment_paths(directory / SAMPLE_LOG_DIR)
    for path, following in itertools.zip_longest(paths, paths[1:]):
        end = int(following.name[:16]) if following else None
        if end is not None and end - 1 <= after:  # read whole already: a stopped replica keeps it, read on each run
            continue
        for sample in read_segment(path, n_features, after):
            if end is not None and sample.sequence >= end:
                break
            yield sample


def read_segment(path: Path, n_features: int, after: int = 0) -> Iterator[LoggedSample]:
    """The intact records of one segment with a sequence above `after`, in order; ValueError for a segment
    of another format or feature count. A corrupt record costs its own sample, as the journal's does: reading
    goes on at the next record that checks (next_intact_record); a torn one, a crash mid-write, ends it."""
    data = path.read_bytes()
    if not is_segment_of(data, path, n_features):
        raise ValueError(f"{path.name}: not a sample log segment of {n_features} features")
    if SEGMENT_HEADER.unpack_from(data) != (SEGMENT_MAGIC, n_features):
        log.warning("sample log %s: its header is corrupt; its records, which check, are read all the same", path)
    offset, vector, last = SEGMENT_HEADER.size, 4 * (n_features + 1), 0
    while offset + SAMPLE_RECORD.size <= len(data):
        end = record_end(data, offset, vector, last)
        if end is None:  # sequences increase within a segment, from the first its name gives
            corrupt, offset = offset, next_intact_record(data, offset + 1, vector, last or int(path.name[:16]) - 1)
            if offset is None:
                return
            if SAMPLE_RECORD.unpack_from(data, offset)[2] - 1 > after:  # samples not read before: said once
                log.warning("sample log %s: %d bytes of corrupt records at byte %d skipped, with their samples",
                            path, offset - corrupt, corrupt)
            continue
        _, _, last, arrival, held_out = SAMPLE_RECORD.unpack_from(data, offset)
        body = data[offset + SAMPLE_RECORD.size:end]
        offset = end
        if last > after:
            (id_length,) = struct.unpack_from("<H", body)
            values = np.frombuffer(body, np.float32, n_features + 1, 2 + id_length)
            job_id = body[2:2 + id_length].decode("utf-8", "surrogatepass") or None
            yield LoggedSample(last, arrival, bool(held_out), job_id, values[:-1].copy(), values[-1])


def is_segment_of(data: bytes, path: Path, n_features: int) -> bool:
    """Whether `data`, the bytes of the segment at `path`, is one of `n_features`: its header says so, or its first
    record checks as one of them (a bit flipped in the header had the replica's whole log set aside as of another
    feature count, or had the fleet stop reading that replica for good)."""
    if len(data) >= SEGMENT_HEADER.size and SEGMENT_HEADER.unpack_from(data) == (SEGMENT_MAGIC, n_features):
        return True
    return record_end(data, SEGMENT_HEADER.size, 4 * (n_features + 1), int(path.name[:16]) - 1) is not None


RESYNC_SEQUENCES = 64  # the sequences looked for after a corrupt record: more lost in a row end the segment


def record_end(data: bytes, offset: int, vector: int, last: int) -> int | None:
    """Where the record at `offset` ends, if it is whole, checks and follows sequence `last`; else None."""
    if offset + SAMPLE_RECORD.size > len(data):
        return None
    length, crc, sequence, _, _ = SAMPLE_RECORD.unpack_from(data, offset)
    start = offset + SAMPLE_RECORD.size
    body = data[start:start + length]
    if (sequence <= last or len(body) != length or length < 2 + vector
            or zlib.crc32(data[offset + 8:start] + body) != crc):
        return None
    return start + length if 2 + struct.unpack_from("<H", body)[0] + vector == length else None


def next_intact_record(data: bytes, start: int, vector: int, last: int) -> int | None:
    """The first record at or after `start` that checks, found by the sequences that can follow `last` (a
    segment's increase): a flipped byte cost every intact record after it, up to a segment's 16 MiB."""
    for sequence in range(last + 1, min(last + 1 + RESYNC_SEQUENCES, 2**64)):  # the field holds 8 bytes
        field = struct.pack("<Q", sequence)
        position = data.find(field, start + 8)
        while position >= 0:
            if record_end(data, position - 8, vector, last) is not None:
                return position - 8
            position = data.find(field, position + 1)
    return None


# ---- trainer: batches from the stream plus replay, SGD as torch does it, EMA shadow ----

HELD_OUT_STAGE = 64  # held-out samples gathered on the host before they go to the evaluation ring
WINDOW_BLOCK = 1024  # about this many samples of a window are predicted by the references at a time
# A checkpoint due while no sample has come for this long is taken by the server's loop, not by the next step.
IDLE_CHECKPOINT_S = 1.0
LOSS_SMOOTHING = 0.01  # each step's weight in the smoothed loss: an average over ~100 steps
# Bounds of the step-time histogram (seconds).
STEP_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


@dataclass(slots=True)
class StepResult:
    loss: float
    checkpoint: Checkpoint | None  # written by this step, published or quarantined


# The state's arrays that hold only part of their buffer, and the scalar that says how much.
PARTIAL_ARRAYS = {"pending_x": "n_pending", "pending_y": "n_pending", "window_x": "window_unscored",
                  "window_y": "window_unscored", "window_candidate": "window_unscored"}
RINGS = ("replay", "eval")  # saved as <ring>_x, <ring>_y, <ring>_size and <ring>_next, at any capacity
# The settings a state may change at a restart; its journal replays under those it was saved with (Trainer.replayer).
REPLAY_SETTINGS = ("batch_size", "replay_mix", "replay_capacity", "eval_capacity")


class IncompatibleState(ValueError):
    """A saved state of another model (layer sizes, activations) than the configured one."""


class Trainer:
    def __init__(self, config: Config, model: MLP, checkpoints: CheckpointWriter, rng: np.random.Generator,
                 fresh: bool = True):
        self.config = config
        self.fresh = fresh  # a random initialisation, not a base model: see take_statistics()
        self.backend = b = model.backend  # the model, the optimizer state and both rings live there
        # The live weights (theta), their EMA, the momentum and the gradient as the rows of one array, so that
        # a step updates the first three in one matrix product (apply_gradient).
        self.vectors = b.xp.zeros((4, len(model.flat)), np.float32)
        self.model, self.ema, self.grad = (MLP(model.sizes, model.activations, backend=b, flat=self.vectors[row])
                                           for row in (0, 1, 3))
        self.model.flat[...] = self.ema.flat[...] = model.flat
        self.momentum = self.vectors[2]
        self.updated = b.xp.empty((3, len(model.flat)), np.float32)  # a step's new theta, EMA and momentum
        self.checkpoints = checkpoints
        self.rng = rng
        self.replay = Ring(config.replay_capacity, config.n_features, b)
        self.eval = Ring(config.eval_capacity, config.n_features, b)  # held-out samples, never trained on
        self.incumbent = model.copy()  # what nodes serve now: the base model until a checkpoint is published
        self.champion = model.copy()  # the best published model, once has_champion
        self.has_champion = False  # whether anything was published: then the references are incumbent and champion
        self.use_coordinates(Coordinates.identity(config.n_features))  # what the model's inputs and outputs mean
        self.kept_raw = False  # statistics refused (they would overflow): not tried again, restarts included
        self.kept_features: list[int] = []  # the same for features that changed their regime (retake_statistics)
        self.last_gate: dict[str, Any] | None = None  # the record of the last checkpoint written
        # The setting as written: in float64, 100 × 0.29 is 28.999999999999996, and its floor 28.
        self.n_replay = math.floor(config.batch_size * fractions.Fraction(repr(config.replay_mix)))
        self.n_new = config.batch_size - self.n_replay
        # The square a step's standardized new samples hold at least when a feature has outgrown its statistics.
        self.outgrown_energy = np.float32(self.n_new / 2 * OUTGROWN_SPREADS ** 2)
        # Progressive validation since the last checkpoint, its references' predictions made a block at a time.
        self.window = Window(b, config.n_features, self.n_new * max(1, WINDOW_BLOCK // self.n_new))
        # Samples gather on the host and go to the device a batch at a time: the new ones of the next step,
        # and held-out ones in stages (written to the evaluation ring before anything reads it).
        self.pending_x = np.zeros((self.n_new, config.n_features), np.float32)
        self.pending_y = np.zeros(self.n_new, np.float32)
        self.n_pending = 0
        self.held_x = np.zeros((min(HELD_OUT_STAGE, config.eval_capacity), config.n_features), np.float32)
        self.held_y = np.zeros(len(self.held_x), np.float32)
        self.n_held = 0
        # The step's batch: the new samples at the head, replay draws in the tail.
        self.batch_x = b.xp.zeros((config.batch_size, config.n_features), np.float32)
        self.batch_y = b.xp.zeros(config.batch_size, np.float32)
        self.steps = 0
        self.steps_skipped = 0
        self.samples_accepted = 0  # valid samples taken in, held out or not
        self.samples_rejected = 0  # lines refused before they reached the trainer
        self.samples_trained = 0
        self.samples_held_out = 0
        self.unnamed_samples = 0  # samples without a job_id: their count picks which are held out
        self.samples_since_checkpoint = 0
        self.samples_since_publish = 0  # in the replay ring since the last checkpoint published: see history()
        self.last_checkpoint_time: float | None = None
        self.replaying = False  # steps taken before, from a journal: they take no checkpoint
        self.last_loss: float | None = None
        self.loss_smoothed: float | None = None
        self.step_seconds = Histogram(STEP_SECONDS_BUCKETS)  # these two count since the process started
        self.checkpoint_results: collections.Counter[str] = collections.Counter()

    def is_held_out(self, job_id: str | None) -> bool:
        """Whether the next sample is to be kept for evaluation instead of training: decided by a hash of its
        job_id, so that every sample of a job lands on the same side, or else by the count of samples
        without one, which ingest() advances. An empty job_id is none (Go writes "" for a string field never set):
        hashed as one job, every such sample went to one side (at 5 %, none was held out)."""
        fraction = self.config.holdout_fraction
        if job_id:
            digest = hashlib.blake2b(job_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
            return int.from_bytes(digest, "big") < fraction * 2**64
        n = self.unnamed_samples + 1
        return math.floor(n * fraction) > math.floor((n - 1) * fraction)

    def ingest(self, features: np.ndarray, score: np.float32, held_out: bool, unnamed: bool) -> StepResult | None:
        """Take one accepted sample: the one path for samples from the socket and from journal replay."""
        self.samples_accepted += 1
        self.unnamed_samples += unnamed
        return self.add(features, score, held_out)

    def count_rejected(self) -> None:
        self.samples_rejected += 1

    def counts(self) -> collections.Counter[str]:
        """What the metrics count, over the state's lifetime."""
        return collections.Counter({"accepted": self.samples_accepted - self.samples_held_out,
                                    "held_out": self.samples_held_out, "rejected": self.samples_rejected,
                                    "steps": self.steps, "nonfinite_steps": self.steps_skipped})

    def add(self, features: np.ndarray, score: np.float32, held_out: bool = False) -> StepResult | None:
        """Take one valid sample (float32): into the evaluation ring if held out, else into the next
        batch, running a step when enough new samples are pending."""
        if held_out:
            self.held_x[self.n_held], self.held_y[self.n_held] = features, score
            self.n_held += 1
            self.samples_held_out += 1
            if self.n_held == len(self.held_y):
                self.flush_held_out()
            return None
        self.pending_x[self.n_pending], self.pending_y[self.n_pending] = features, score
        self.n_pending += 1
        if self.n_pending < self.n_new:
            return None
        self.n_pending = 0
        return self.step()

    def flush_held_out(self) -> None:
        xp = self.backend.xp
        self.eval.extend(xp.asarray(self.held_x[:self.n_held]), xp.asarray(self.held_y[:self.n_held]))
        self.n_held = 0

    @property
    def replay_size(self) -> int:
        """Samples in the replay buffer, the pending ones counted: they are in it when they are used."""
        return min(self.replay.size + self.n_pending, len(self.replay.y))

    @property
    def eval_size(self) -> int:
        return min(self.eval.size + self.n_held, len(self.eval.y))

    def layout(self) -> dict[str, Any]:
        """The model's shape: a state saved for another cannot be loaded. Batch settings and ring capacities are
        not part of it: load_state_dict() takes a state saved with others."""
        return {"sizes": self.model.sizes, "activations": [str(a) for a in self.model.activations]}

    def state_dict(self) -> dict[str, Any]:
        """Everything a restart needs to continue exactly, arrays on the host: the one list of the trainer's
        state. Left out: the incumbent (latest.json names it) and what counts since the process started."""
        self.flush_held_out()  # the evaluation ring is then whole
        host = self.backend.to_host
        return {**self.state_scalars(), **{name: host(array) for name, array in self.state_arrays().items()}}

    def state_scalars(self) -> dict[str, Any]:
        c, last = self.config, self.last_checkpoint_time
        since_checkpoint = None if last is None else time.monotonic() - last
        return {
            # With the settings that older versions, which could not change them, require to match.
            "fingerprint": {**self.layout(), "replay_capacity": c.replay_capacity, "batch_size": c.batch_size,
                            "replay_mix": c.replay_mix, "eval_capacity": c.eval_capacity},
            "steps": self.steps, "steps_skipped": self.steps_skipped,
            "samples_accepted": self.samples_accepted, "samples_rejected": self.samples_rejected,
            "samples_trained": self.samples_trained, "samples_held_out": self.samples_held_out,
            "unnamed_samples": self.unnamed_samples, "samples_since_checkpoint": self.samples_since_checkpoint,
            "samples_since_publish": self.samples_since_publish,
            "last_checkpoint_unix": None if since_checkpoint is None else time.time() - since_checkpoint,
            "last_loss": self.last_loss, "loss_smoothed": self.loss_smoothed, "last_gate": self.last_gate,
            "rng": self.rng.bit_generator.state,
            "n_pending": self.n_pending, "replay_size": self.replay.size, "replay_next": self.replay.saved()[2],
            "eval_size": self.eval.size, "eval_next": self.eval.saved()[2], "has_champion": self.has_champion,
            "champion_version": self.checkpoints.champion_version,
            "window_incumbent": self.checkpoints.incumbent_version(),
            "window_n": self.window.n, "window_shift": self.window.shift, "window_unscored": self.window.unscored,
            "kept_raw": self.kept_raw, "kept_features": self.kept_features,
            "coordinates": dataclasses.asdict(self.coords),
        }

    def state_arrays(self) -> dict[str, Any]:
        """The state's arrays where they live: on the backend, but for the pending samples on the host. Those of
        PARTIAL_ARRAYS are as long as the state says."""
        w, (replay_x, replay_y, _), (eval_x, eval_y, _) = self.window, self.replay.saved(), self.eval.saved()
        return {"theta": self.model.flat, "ema": self.ema.flat, "momentum": self.momentum,
                "replay_x": replay_x, "replay_y": replay_y, "eval_x": eval_x, "eval_y": eval_y,
                "pending_x": self.pending_x[:self.n_pending], "pending_y": self.pending_y[:self.n_pending],
                "champion": self.champion.flat, "window_sums": w.sums, "window_truth": w.truth,
                "window_x": w.x[:w.unscored], "window_y": w.y[:w.unscored],
                "window_candidate": w.predictions[0, :w.unscored]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from what state_dict() returned, saved with these batch settings and ring capacities or with
        others: the samples waiting for a step go into the new batches, each ring keeps its newest samples that
        fit. Checks everything before it changes anything (checked_rows())."""
        rows = self.checked_rows(state)
        self.check_scalars(state)
        saved = state["coordinates"]
        coords = Coordinates(**{**saved, "x_shift": tuple(saved["x_shift"]), "x_scale": tuple(saved["x_scale"])})
        if {len(coords.x_shift), len(coords.x_scale)} != {self.config.n_features}:
            raise ValueError(f"coordinates for another number of features than {self.config.n_features}")
        if not all(map(is_finite_number, (*coords.x_shift, *coords.x_scale, coords.y_shift, coords.y_scale))):
            raise ValueError("coordinates that are not finite numbers")
        if state["window_unscored"] > len(self.window.y):  # a block of a larger batch's: scored at the next step
            self.window = Window(self.backend, self.config.n_features, state["window_unscored"])
        self.window.unscored = state["window_unscored"]  # sizes its arrays
        keeps_champion = state["has_champion"] and self.checkpoints.is_published(state["champion_version"])
        apart = {"pending_x", "pending_y", *(f"{ring}_{part}" for ring in RINGS for part in "xy")}
        for name, target in self.state_arrays().items():
            if (name == "champion" and not keeps_champion) or name in apart:
                continue  # see has_champion below; the rings are loaded below, the pending samples added last
            target[...] = state[name] if isinstance(target, np.ndarray) else self.backend.xp.asarray(state[name])
        for ring in RINGS:  # one not full is saved as a full one of what it holds (Ring.saved): its capacity is here
            target, capacity = getattr(self, ring), state["fingerprint"].get(f"{ring}_capacity")
            saved_capacity = capacity if type(capacity) is int else rows[f"{ring}_y"]  # one edited by hand: a guess
            if saved_capacity != len(target.y):
                log.info("the %s ring was saved with capacity %d: its newest samples go into one of %d", ring,
                         saved_capacity, len(target.y))
            target.load(*(state[f"{ring}_{part}"] for part in ("x", "y", "size", "next")))
        self.steps, self.steps_skipped = state["steps"], state["steps_skipped"]
        self.samples_accepted, self.samples_rejected = state["samples_accepted"], state["samples_rejected"]
        self.samples_trained, self.samples_held_out = state["samples_trained"], state["samples_held_out"]
        self.unnamed_samples = state["unnamed_samples"]
        self.samples_since_checkpoint = state["samples_since_checkpoint"]
        self.samples_since_publish = state["samples_since_publish"]
        if state["last_checkpoint_unix"] is not None:
            self.last_checkpoint_time = time.monotonic() - max(0.0, time.time() - state["last_checkpoint_unix"])
        self.last_loss, self.loss_smoothed = state["last_loss"], state["loss_smoothed"]
        self.last_gate = state["last_gate"]
        if self.last_gate and type(self.last_gate.get("version")) is int:  # its files deleted by hand since: the
            self.checkpoints.version = max(self.checkpoints.version, self.last_gate["version"])  # number stays used
        self.kept_raw, self.kept_features = bool(state["kept_raw"]), [int(i) for i in state["kept_features"]]
        self.rng.bit_generator.state = state["rng"]
        self.window.n, self.window.shift = state["window_n"], state["window_shift"]
        # Without a champion saved, or with one rolled back since (its checkpoint moved to quarantine/), the one
        # build_trainer() set stays: the published incumbent, if any (a state from before champions existed
        # makes its incumbent its first champion).
        if keeps_champion:
            self.has_champion, self.checkpoints.champion_version = True, state["champion_version"]
        elif state["has_champion"]:
            log.warning("the champion, v%06d, is no longer published: the incumbent takes its place",
                        state["champion_version"])
        scored, incumbent = state["window_incumbent"], self.checkpoints.incumbent_version()
        if not keeps_champion and (self.has_champion or state["has_champion"]):  # it scored another champion
            self.begin_window()
        elif scored != incumbent:  # rolled back, or published after this state was saved
            log.info("the window was scored against %s, the incumbent now is %s: a new window starts",
                     "the base model, or an incumbent a snapshot of an earlier version did not name"
                     if scored is None else f"checkpoint {scored}",
                     "the base model" if incumbent is None else f"checkpoint {incumbent}")
            self.begin_window()
        self.use_coordinates(coords)  # those the loaded weights are in
        if self.config.normalize == "off" and coords.standardized != "none":  # back to the reference's arithmetic
            if not self.move_to(Coordinates.identity(self.config.n_features)):
                log.error("VMAFX_SIDECAR_NORMALIZE=off, but the saved weights overflow float32 in raw coordinates: "
                          "training goes on standardized")
        self.take_pending(state["pending_x"], state["pending_y"], state["fingerprint"])

    def replayer(self, saved_for: Any) -> Trainer:
        """The trainer a journal replays on after a state saved with `saved_for` (its fingerprint): one with the
        batch settings and ring capacities the journal's samples were trained with, so that the steps their ACKs
        counted are taken again as they were; this trainer then takes its state (load_state_dict regroups what
        waits for a step). This trainer itself when the settings are its own, or not ones a sidecar takes."""
        fields = saved_for if isinstance(saved_for, dict) else {}
        saved = {name: fields[name] for name in REPLAY_SETTINGS if name in fields}
        try:
            config = self.config.replaced(saved)
        except ConfigError as e:
            log.warning("the state was saved with settings no sidecar takes (%s): its journal replays under these", e)
            return self
        if config == self.config or config.replay_capacity < config.batch_size:
            return self
        try:
            twin = Trainer(config, self.model, self.checkpoints, np.random.default_rng(), fresh=self.fresh)
        except (MemoryError, ValueError) as e:  # rings no machine holds ("array is too big")
            log.warning("no trainer with the state's own settings (%s): its journal replays under these", e)
            return self
        log.info("the state was saved with batch size %d, replay mix %s and rings of %d and %d samples: its journal "
                 "replays under those, as it was trained", *(getattr(config, name) for name in REPLAY_SETTINGS))
        twin.incumbent, twin.champion.flat[...] = self.incumbent, self.champion.flat  # the references: the same
        twin.has_champion, twin.replaying = self.has_champion, self.replaying
        return twin

    def checked_rows(self, state: dict[str, Any]) -> dict[str, int]:
        """The rows of the saved arrays whose length the state says (the partial ones, and the rings' at the
        capacity they were saved with), once the state is seen to fit this trainer: KeyError for a missing entry,
        IncompatibleState for another model, ValueError for an array or a count that does not fit."""
        arrays = self.state_arrays()  # their shapes, without copying them off the device
        missing = (self.state_scalars().keys() | arrays.keys()) - state.keys()
        if missing:
            raise KeyError(", ".join(sorted(missing)))
        layout, saved_for = self.layout(), state["fingerprint"]
        if type(saved_for) is not dict or {key: saved_for.get(key) for key in layout} != layout:
            raise IncompatibleState(f"saved for {saved_for}, configured {layout}")
        for count in ("n_pending", "window_unscored"):
            if not (type(state[count]) is int and state[count] >= 0):
                raise ValueError(f"{count} {state[count]!r} is not a count")
        rows = {name: state[count] for name, count in PARTIAL_ARRAYS.items()}
        rows |= {f"{ring}_{part}": len(state[f"{ring}_y"]) for ring in RINGS for part in "xy"}
        for name, array in arrays.items():
            shape = (rows[name], *array.shape[1:]) if name in rows else array.shape
            if not isinstance(state[name], np.ndarray) or state[name].shape != shape:
                raise ValueError(f"array {name} has another shape than {shape}")
            if state[name].dtype.kind not in "fiu":
                raise ValueError(f"array {name} holds {state[name].dtype}, not numbers")
        for ring in RINGS:
            size, position, capacity = state[f"{ring}_size"], state[f"{ring}_next"], rows[f"{ring}_y"]
            if not (type(size) is int and type(position) is int and 0 <= size <= capacity
                    and 0 <= position < max(1, capacity)):
                raise ValueError(f"the {ring} ring's size {size!r} and position {position!r} for capacity {capacity}")
        return rows

    def check_scalars(self, state: dict[str, Any]) -> None:
        """ValueError for a saved count, number, flag or record not of the kind state_scalars() saves: a snapshot
        whose checksum holds but one of whose fields does not (edited by hand, another tool's) was loaded up to that
        field, then set aside, leaving the trainer with its weights and not their coordinates (or a traceback)."""
        def count(v: Any) -> bool:
            return type(v) is int and v >= 0

        def reported(v: Any) -> bool:  # a report only: any number
            return type(v) in (int, float)

        def maybe(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
            return lambda v: v is None or ok(v)

        kinds = dict.fromkeys(("steps", "steps_skipped", "samples_accepted", "samples_rejected", "samples_trained",
                               "samples_held_out", "unnamed_samples", "samples_since_checkpoint",
                               "samples_since_publish", "window_n"), count)
        kinds |= {"last_checkpoint_unix": maybe(is_finite_number), "last_loss": maybe(reported),
                  "loss_smoothed": maybe(reported),
                  "last_gate": maybe(lambda v: type(v) is dict), "has_champion": lambda v: type(v) is bool,
                  "champion_version": maybe(lambda v: type(v) is int),
                  "window_incumbent": maybe(lambda v: type(v) is int), "window_shift": is_finite_number,
                  "kept_raw": lambda v: type(v) in (bool, int),
                  "kept_features": lambda v: type(v) is list and all(
                      type(i) is int and 0 <= i < self.config.n_features for i in v),
                  "rng": self.takes_rng_state, "coordinates": lambda v: type(v) is dict}
        for name, ok in kinds.items():
            if not ok(state[name]):
                raise ValueError(f"{name} {state[name]!r:.100} is not what a snapshot holds there")

    def takes_rng_state(self, saved: Any) -> bool:
        try:  # on a generator of its own kind, not this one's
            type(self.rng.bit_generator)().state = saved
        except (TypeError, ValueError, KeyError):
            return False
        return True

    def take_pending(self, x: np.ndarray, y: np.ndarray, saved_for: dict[str, Any]) -> None:
        """The samples a saved state's next step was waiting for, added as they arrived: with other batch
        settings than the state's, as many steps as they now fill run here."""
        batch = (saved_for.get("batch_size"), saved_for.get("replay_mix"))
        if batch != (self.config.batch_size, self.config.replay_mix):
            log.info("the state was saved with batch size %s and replay mix %s: its %d samples waiting for a step go "
                     "into batches of %d new + %d replay", *batch, len(y), self.n_new, self.n_replay)
        self.n_pending = 0
        for row, score in zip(x, y):
            self.add(row, score)

    def step(self) -> StepResult | None:
        started = time.perf_counter()
        xp = self.backend.xp
        new_x, new_y = xp.asarray(self.pending_x), xp.asarray(self.pending_y)  # the step's one transfer in
        self.replay.extend(new_x, new_y)
        self.samples_since_publish += self.n_new
        n = self.n_new + min(self.n_replay, self.replay.size)
        x, y = self.batch_x[:n], self.batch_y[:n]
        x[:self.n_new], y[:self.n_new] = new_x, new_y
        if n > self.n_new:
            self.replay.sample_into(self.rng, x[self.n_new:], y[self.n_new:])
        with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow is detected and handled: the
            if self.statistics_due():  # statistics refuse what is not finite, the step is skipped below
                self.take_statistics()
            self.standardize(x, y)
            standardized_new = x[:self.n_new]
            outgrowable = self.coords.standardized in ("provisional", "final")  # a first batch's statistics too
            if outgrowable and xp.vdot(standardized_new, standardized_new) >= self.outgrown_energy:  # one call a step
                self.retake_statistics(x)
            self.validate(new_x, standardized_new, new_y)
            loss = self.model.loss_and_grad(x, y, self.grad)
            applied = self.apply_gradient(loss)
        if not applied:
            self.steps_skipped += 1
            if self.steps_skipped & (self.steps_skipped - 1) == 0:  # 1, 2, 4, 8...: a bounded log
                log.warning("skipped a step: the loss, gradient or weights overflowed float32 (loss %s); weights "
                            "unchanged (%d skipped so far)", loss, self.steps_skipped)
            return None
        self.steps += 1
        self.samples_trained += self.n_new
        self.samples_since_checkpoint += self.n_new
        loss *= self.coords.y_scale ** 2  # reported in squared score units, whatever the model trains in
        self.last_loss = loss
        self.loss_smoothed = loss if self.loss_smoothed is None else (
            (1 - LOSS_SMOOTHING) * self.loss_smoothed + LOSS_SMOOTHING * loss)
        self.step_seconds.observe(time.perf_counter() - started)
        return StepResult(loss, self.take_checkpoint() if not self.replaying and self.checkpoint_due() else None)

    def validate(self, x: Any, model_x: Any, y: Any) -> None:
        """Progressive validation: the candidate (the EMA) predicts the step's new samples (x; model_x in the
        model's coordinates) before it trains on them; the window takes them, for the references too."""
        self.window.take(self.raw_scores(self.ema.forward(model_x)[:, 0]), x, y, self.references())

    # -- coordinates

    def statistics_due(self) -> bool:
        """Whether the step about to run takes statistics: the replay ring now holds the samples that set them,
        or a fresh model is about to take its first step (its first batch's set them provisionally)."""
        if self.config.normalize == "off" or self.coords.standardized == "final" or self.kept_raw:
            return False
        return self.replay.size >= min(STATISTICS_SAMPLES, len(self.replay.y)) or (
            self.fresh and self.steps == 0 and self.coords.standardized == "none")

    def take_statistics(self) -> None:
        """Take the statistics of the samples in the replay ring (the features' from the base model if it had
        them). A fresh model that has not stepped is declared to be in their coordinates: its weights are
        random, and a start in standardized coordinates, scores included, is what makes them a good start. Any
        other model moves to them, computing what it computed; a model that did not start standardized (a
        base model, or one trained before this version) keeps raw scores, which fine-tune it faster."""
        x, y = map(self.backend.to_host, self.replay.older(0, self.replay.size))
        starts = self.fresh and self.steps == 0 and self.coords.standardized == "none"
        final = not starts or len(y) >= min(STATISTICS_SAMPLES, len(self.replay.y))
        scores = starts or self.coords.standardized == "provisional"
        base_features = self.coords.standardized == "features"
        with np.errstate(over="ignore", invalid="ignore"):
            new = Coordinates.of_samples(x, y, "final" if final else "provisional",
                                         self.coords if base_features else None, scores)
        if starts and np.isfinite(new.x_shift + new.x_scale).all():  # final too, when its first batch fills the ring
            self.use_coordinates(new)
        elif not self.move_to(new):
            self.kept_raw = True
            log.warning("not standardizing: the statistics of the first %d samples would overflow float32 in the "
                        "weights; training goes on in the coordinates it had", len(y))
            return
        log.info("features standardized by %s%s%s; checkpoints stay models of raw ones",
                 "the base model's normalisation" if base_features else f"the {len(y)} samples in the replay ring",
                 f", scores too (shift {new.y_shift:.6g}, scale {new.y_scale:.6g})" if scores else "",
                 "" if final else ", for now")

    def retake_statistics(self, batch: Any) -> None:
        """Statistics taken while a feature was constant (a field a node began to fill in later) make its values
        huge once it varies, and training does not recover. A feature that at least half of a step's new
        samples, and OUTGROWN_LEAST of the newest OUTGROWN_SAMPLES, put OUTGROWN_SPREADS or more from its mean
        has changed its regime (one far sample is an outlier, however few new samples a step has): it takes the
        newest samples' statistics, declared (see remap: its weights weigh its new standardized values as they
        weighed the old ones, which a move would scale by the ratio of the spreads, 1e4 for a feature 0 before
        and 1e4 +- 1e4 now), and the step's `batch` is standardized anew. Where that would overflow float32, the
        feature keeps its statistics for good (kept_features)."""
        xp, host = self.backend.xp, self.backend.to_host
        recent = self.replay.older(0, min(OUTGROWN_SAMPLES, self.replay.size))[0]  # newest first: this step's
        far = xp.abs(recent - self.maps[0]) > self.outgrown
        stepped = min(self.n_new, len(far))  # this step's new samples, the first rows
        outgrown = host((2 * far[:stepped].sum(axis=0) >= stepped) & (far.sum(axis=0) >= min(OUTGROWN_LEAST, len(far))))
        outgrown[self.kept_features] = False
        if not outgrown.any():
            return
        columns = xp.asarray(outgrown)  # a device mask for device arrays: CuPy is not asked to take a host one
        x = host(recent[:, columns]).astype(np.float64)
        shift, scale = np.array(self.coords.x_shift), np.array(self.coords.x_scale)
        shift[outgrown], scale[outgrown] = x.mean(axis=0), spread(x)
        new = dataclasses.replace(self.coords, x_shift=float32_values(shift), x_scale=float32_values(scale))
        features, (old_shift, old_scale) = ", ".join(map(str, np.flatnonzero(outgrown))), self.maps[:2]
        if not self.move_to(new, declared=outgrown):
            self.kept_features = sorted({*self.kept_features, *np.flatnonzero(outgrown).tolist()})
            log.warning("feature(s) %s moved far past the statistics taken for them, but new ones would overflow "
                        "float32 in the weights: they keep theirs", features)
            return
        batch[:, columns] = (batch[:, columns] * old_scale[columns] + (old_shift - self.maps[0])[columns]) \
            / self.maps[1][columns]
        log.info("feature(s) %s moved far past the statistics taken for them: standardized again by the newest %d "
                 "samples", features, len(x))

    def standardize(self, x: Any, y: Any) -> None:
        """Move a batch of raw samples (the step's own buffers) to the model's coordinates, in place."""
        if self.coords.standardized == "none":
            return  # the reference's arithmetic, untouched
        shift, scale, y_shift, y_scale = self.maps
        x -= shift
        x /= scale
        y -= y_shift
        y /= y_scale

    def raw_scores(self, scores: Any) -> Any:
        """The model's outputs `scores` as raw scores, converted in place."""
        if self.coords.standardized in ("none", "features"):
            return scores
        _, _, y_shift, y_scale = self.maps
        scores *= y_scale
        scores += y_shift
        return scores

    def move_to(self, new: Coordinates, declared: np.ndarray | None = None) -> bool:
        """Re-parameterize the live weights, the EMA and the momentum for `new` coordinates, exactly: every
        function they compute, and every step the momentum stands for, stays what it was (but for the
        `declared` features: see remap). False, with nothing changed, if a parameter would overflow float32
        (samples near its limits)."""
        xp, host = self.backend.xp, self.backend.to_host
        vectors = (self.model.flat, self.ema.flat, self.momentum)
        moved = []
        with np.errstate(over="ignore", invalid="ignore"):
            for flat, offsets in zip(vectors, (True, True, False)):
                layers = [(host(w).astype(np.float64), host(b).astype(np.float64))
                          for w, b in layer_views(flat, self.model.sizes)]
                moved.append([(w.astype(np.float32), b.astype(np.float32))
                              for w, b in remap(layers, self.coords, new, offsets, declared)])
        if not all(np.isfinite(a).all() for layers in moved for layer in layers for a in layer):
            return False
        for flat, layers in zip(vectors, moved):
            for (w, b), (w_new, b_new) in zip(layer_views(flat, self.model.sizes), layers):
                w[...], b[...] = xp.asarray(w_new), xp.asarray(b_new)
        self.use_coordinates(new)
        return True

    def use_coordinates(self, coords: Coordinates) -> None:
        """Take `coords` as what the weights are in, without changing them."""
        xp = self.backend.xp
        self.coords = coords
        self.maps = (xp.asarray(np.array(coords.x_shift, np.float32)), xp.asarray(np.array(coords.x_scale, np.float32)),
                     np.float32(coords.y_shift), np.float32(coords.y_scale))  # as the step applies them
        with np.errstate(over="ignore"):  # a spread past float32's max / OUTGROWN_SPREADS: none outgrows it
            self.outgrown = self.maps[1] * np.float32(OUTGROWN_SPREADS)  # how far from its shift a feature outgrows it

    def raw_weights(self, model: MLP) -> onnx_builder.MLPWeights:
        """What `model` computes in the trainer's coordinates, as a model of raw features and scores."""
        if self.coords.standardized == "none":
            return model.weights()
        layers = [(w.astype(np.float64), b.astype(np.float64)) for w, b in model.weights().layers]
        raw = remap(layers, self.coords, Coordinates.identity(len(self.coords.x_shift)))
        return onnx_builder.MLPWeights([(w.astype(np.float32), b.astype(np.float32)) for w, b in raw],
                                       model.activations)

    # -- the gate's evidence and checkpoints

    def references(self) -> dict[str, MLP]:
        """The models a candidate must match, by name: the incumbent and the champion once a checkpoint is
        published; before that the base (or fresh) model, which nodes then serve."""
        if not self.has_champion:
            return {"base": self.incumbent}
        return {"incumbent": self.incumbent, "champion": self.champion}

    def history(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The gate's long memory, on the host, and how much of it is held out: the evaluation ring, topped up
        while it holds fewer samples than the gate judges on (GATE_MIN_EVAL, 5 at least) with the newest replay
        samples older than the window (up to EVAL_CAPACITY in all); once a checkpoint is published, older than it
        too: the incumbent trained on them as the candidate did, where those of windows quarantined since would
        favour a candidate that learned a burst."""
        self.flush_held_out()
        host = self.backend.to_host
        x, y = host(self.eval.x[:self.eval.size]), host(self.eval.y[:self.eval.size])
        held_out, c = len(y), self.config
        if held_out >= judged_size(c):
            return x, y, held_out
        skip = max(self.window.n, self.samples_since_publish) if self.has_champion else self.window.n
        older = min(max(0, self.replay.size - skip), c.eval_capacity - held_out)
        replay_x, replay_y = self.replay.older(skip, older)
        return np.concatenate([x, host(replay_x)]), np.concatenate([y, host(replay_y)]), held_out

    def apply_gradient(self, loss: float) -> bool:
        """clip_grad_norm_ then torch.optim.SGD (weight decay, momentum) with linear warmup, then the EMA: torch's
        update, written as one matrix product of theta, EMA, momentum and gradient (a step's cost is its numpy
        calls, not its arithmetic). False, with nothing changed, when the loss, the gradient or the new
        weights are not finite."""
        c, g, xp = self.config, self.grad.flat, self.backend.xp
        norm = float(xp.sqrt(xp.dot(g, g)))
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return False
        clip = min(1.0, c.max_grad_norm / (norm + 1e-6))
        lr = c.lr * (min(1.0, (self.steps + 1) / c.warmup_steps) if c.warmup_steps else 1.0)
        # momentum' = mu momentum + clip g + decay theta (it starts at zero: the first step sets it as torch does)
        # theta' - theta = -lr momentum'
        # ema' - ema = (1 - d) (theta' - ema)
        # Theta and the EMA as steps from where they are, which keeps their small changes exact.
        momentum = (c.weight_decay, 0.0, c.momentum, clip)  # the coefficients of theta, EMA, momentum and g
        theta = tuple(-lr * v for v in momentum)
        ema = tuple((1 - c.ema_decay) * (v + w) for v, w in zip(theta, (1.0, -1.0, 0.0, 0.0)))
        update = self.updated
        xp.matmul(xp.asarray(np.array([theta, ema, momentum], np.float32)), self.vectors, out=update)
        update[:2] += self.vectors[:2]
        if not xp.isfinite(update).all():  # overflowed: the step is not taken
            return False
        self.vectors[:3] = update
        return True

    def end_window_at_newest_checkpoint(self, saved_newest: int) -> None:
        """After a journal's replay, which takes no checkpoint: one newer than the newest as the snapshot was taken
        (`saved_newest`) is in the span replayed (the snapshot after it refused). It had ended the window there,
        and replayed, the window would hold samples its incumbent trained on, which flatter it against the
        candidate's predictions made before training. The window starts again here (the few samples trained
        after that checkpoint are left out of it)."""
        if self.checkpoints.version <= saved_newest:
            return
        name = f"model_v{self.checkpoints.version:06d}.json"
        record = read_record(self.checkpoints.directory / name) or read_record(self.checkpoints.quarantine / name)
        if record is None:
            return
        self.start_window(record)
        created = record.get("created_unix")
        ago = max(0.0, time.time() - created) if type(created) in (int, float) else 0.0
        self.last_checkpoint_time = time.monotonic() - ago

    def start_window(self, record: dict[str, Any]) -> None:
        """A checkpoint, written with `record`, ends the window (begin_window)."""
        self.begin_window()
        self.last_gate = record

    def begin_window(self) -> None:
        """An empty window, and the count towards the next checkpoint starts again with it: a candidate is judged
        on MIN_SAMPLES_CKPT samples of its window at least (one emptied at a restart had been judged on the few
        samples the count still lacked: after a rollback by hand, a candidate close to the model rolled back was
        published on about 20)."""
        self.window.reset()
        self.samples_since_checkpoint = 0

    def checkpoint_waiting(self) -> bool:
        """Whether a checkpoint is due with samples trained since the last one: with none (MIN_SAMPLES_CKPT 0), one
        taken between steps would write the same weights again every interval."""
        return self.samples_since_checkpoint > 0 and self.checkpoint_due()

    def checkpoint_due(self) -> bool:
        """Whether enough samples and time have passed since the last checkpoint, or attempt, for one now."""
        c, last = self.config, self.last_checkpoint_time
        return self.samples_since_checkpoint >= c.min_samples_ckpt and (
            last is None or time.monotonic() - last >= c.ckpt_interval_s)

    def take_checkpoint(self) -> Checkpoint | None:
        """publish() the EMA weights and take the outcome in (published: the new incumbent, and the champion
        if it is at least as good); a new window starts. Training goes on either way, and after a write the
        disk refused, the next try comes an interval later (the window goes on to then)."""
        self.last_checkpoint_time = time.monotonic()
        started = time.perf_counter()
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # a model that overflows float32 is quarantined
                checkpoint = publish(self)
        except OSError as e:  # e.g. a full disk
            log.error("checkpoint write failed, will retry: %s", e)
            self.checkpoint_results["failed"] += 1
            return None
        self.checkpoint_results["published" if checkpoint.published else "quarantined"] += 1
        self.start_window(checkpoint.record)
        if checkpoint.published:
            self.samples_since_publish = 0
            self.incumbent = MLP.from_weights(self.raw_weights(self.ema), backend=self.backend)
            if not self.has_champion or checkpoint.verdict.displaces_champion(judged_size(self.config)):
                self.champion.flat[...] = self.incumbent.flat
                self.has_champion = True
                self.checkpoints.champion_version = checkpoint.record["version"]
        log.info("checkpoint v%06d %s: %s (step %d, %d samples trained, gate %s, %.1f ms with the gate)",
                 checkpoint.record["version"], "published" if checkpoint.published else "quarantined",
                 checkpoint.path, self.steps, self.samples_trained, checkpoint.record["gate"],
                 (time.perf_counter() - started) * 1e3)
        return checkpoint


# ---- backend: numpy, or CuPy on a GPU; the rings, the model and the trainer are written against `xp` ----

@dataclass(frozen=True)
class Backend:
    name: str  # "numpy" or "cupy"
    xp: Any  # the array module
    erf: Callable[[Any], Any]  # elementwise, for exact GELU
    to_host: Callable[[Any], np.ndarray]


_erf = np.frompyfunc(math.erf, 1, 1)  # numpy has none; math.erf is exact to an ulp
# Rounded to the input's dtype, as CuPy's erf returns it, so that both backends round GELU alike.
NUMPY = Backend("numpy", np, lambda z: _erf(z).astype(z.dtype), np.asarray)


def select_backend(cuda: str) -> Backend:
    """VMAFX_SIDECAR_CUDA: 0 numpy; 1 CuPy when it and a GPU are there, else numpy with a warning;
    require: CuPy, or the sidecar does not start."""
    if cuda == "0":
        return NUMPY
    try:
        import cupy
        import cupyx.scipy.special
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
    except Exception as e:  # not installed, no driver, no device: each says so in its message
        if cuda == "require":
            raise StartupError(f"VMAFX_SIDECAR_CUDA=require, but CuPy cannot run: {type(e).__name__}: {e}") from None
        log.warning("VMAFX_SIDECAR_CUDA=1, but CuPy cannot run (%s: %s): training on numpy", type(e).__name__, e)
        return NUMPY
    return Backend("cupy", cupy, cupyx.scipy.special.erf, cupy.asnumpy)


# ---- rings: preallocated float32 rings for replay and evaluation, oldest sample evicted first ----

class Ring:
    def __init__(self, capacity: int, n_features: int, backend: Backend):
        self.xp = backend.xp
        self.x = backend.xp.zeros((capacity, n_features), np.float32)
        self.y = backend.xp.zeros(capacity, np.float32)
        self.size = 0
        self.next = 0  # write position

    def extend(self, x: Any, y: Any) -> None:
        """Store len(y) <= capacity samples (arrays of the ring's backend), evicting the oldest."""
        n, capacity = len(y), len(self.y)
        head = min(n, capacity - self.next)  # what fits before the end; the rest wraps to the start
        self.x[self.next:self.next + head], self.y[self.next:self.next + head] = x[:head], y[:head]
        if head < n:
            self.x[:n - head], self.y[:n - head] = x[head:], y[head:]
        self.next = (self.next + n) % capacity
        self.size = min(self.size + n, capacity)

    def saved(self) -> tuple[Any, Any, int]:
        """Its arrays and write position as a snapshot saves them: a ring not yet full, its samples in the first
        `size` rows, as a full one of that capacity, so that a snapshot costs what the ring holds, not what it may
        hold (a ring of 3M samples of 80 features, 928 MB, took 4.9 s to save with 50 in it)."""
        if self.size < len(self.y) and self.next == self.size:
            return self.x[:self.size], self.y[:self.size], 0
        return self.x, self.y, self.next

    def load(self, x: np.ndarray, y: np.ndarray, size: int, position: int) -> None:
        """Take a saved ring's samples (host arrays, its size and write position): where they lie, when it had this
        capacity; else its newest that fit, oldest first."""
        xp, capacity = self.xp, len(self.y)
        if len(y) == capacity:
            self.x[...], self.y[...] = xp.asarray(x), xp.asarray(y)
            self.size, self.next = size, position
            return
        kept = min(size, capacity)
        start = (position - kept) % len(y) if len(y) else 0  # an empty ring saved as what it holds: none
        head = min(kept, len(y) - start)  # the oldest kept, up to the saved array's end; the rest from its start
        # By slices, which copy nothing on the way: an index copied the saved ring whole, as much memory again.
        self.x[:head], self.y[:head] = xp.asarray(x[start:start + head]), xp.asarray(y[start:start + head])
        self.x[head:kept], self.y[head:kept] = xp.asarray(x[:kept - head]), xp.asarray(y[:kept - head])
        self.size, self.next = kept, kept % capacity

    def older(self, skip: int, count: int) -> tuple[Any, Any]:
        """Copies of the `count` samples stored before the newest `skip` ones (count <= size - skip)."""
        index = (self.next - skip - 1 - self.xp.arange(count)) % len(self.y)
        return self.x[index], self.y[index]

    def sample_into(self, rng: np.random.Generator, x: Any, y: Any) -> None:
        """Fill x and y with len(y) samples drawn uniformly with replacement, by the host's generator
        so that every backend draws the same batches: floor(u × size) for u uniform in [0, 1), which
        stays below size (rng.integers spends 4 µs a call checking its arguments, more than the step's take)."""
        index = self.xp.asarray((rng.random(len(y)) * self.size).astype(np.intp))
        self.x.take(index, axis=0, out=x)
        self.y.take(index, out=y)


# ---- coordinates: raw features and scores, and the standardized ones the model trains on ----

STATISTICS_SAMPLES = 1000  # trained samples whose mean and spread standardize the features and scores
NEAR_CONSTANT = 1e-5  # a spread below this fraction of the mean's size is too small to divide by: see spread()
SMALLEST_SPREAD = 1e-19  # and one below this, in any unit: 1e19 spreads squared is 1e38, near float32's largest
WILD_DEVIATIONS = 1000  # a value this many median absolute deviations from its median is left out of statistics,
WILD_SHARE, WILD_LEAST = 0.01, 3  # when among its column's farthest 1 % or 3, the more: a stray, not a mode
OUTGROWN_SPREADS = 100  # new samples this many spreads from a feature's mean: see Trainer.retake_statistics
OUTGROWN_SAMPLES, OUTGROWN_LEAST = 16, 4


@dataclass(frozen=True)
class Coordinates:
    """The model trains on (x - x_shift) / x_scale and predicts (y - y_shift) / y_scale; the raw model, what
    is exported and judged, has both maps folded into its first and last layers. `standardized`: "none"
    (the identity: statistics not taken yet, or VMAFX_SIDECAR_NORMALIZE=off), "features" (a base model's
    own input normalisation), "provisional" (a fresh model's first batch's) or "final" (STATISTICS_SAMPLES
    samples'). Values are float32, held as Python floats (immutable, and JSON as they are)."""
    x_shift: tuple[float, ...]
    x_scale: tuple[float, ...]
    y_shift: float = 0.0
    y_scale: float = 1.0
    standardized: str = "none"

    @classmethod
    def identity(cls, n_features: int) -> Coordinates:
        return cls((0.0,) * n_features, (1.0,) * n_features)

    @classmethod
    def of_samples(cls, x: np.ndarray, y: np.ndarray, standardized: str, features: Coordinates | None,
                   scores: bool) -> Coordinates:
        """Statistics of (x, y): the features' taken from `features` instead when given, the scores left raw
        unless `scores`."""
        x, y = x.astype(np.float64), y.astype(np.float64)
        x_shift, x_scale = (features.x_shift, features.x_scale) if features else mean_and_spread(x)
        y_shift, y_scale = (v[0] for v in mean_and_spread(y[:, None])) if scores else (0.0, 1.0)
        return cls(float32_values(x_shift), float32_values(x_scale), float(np.float32(y_shift)),
                   float(np.float32(y_scale)), standardized)

    @classmethod
    def of_normalisation(cls, scale: np.ndarray, shift: np.ndarray) -> Coordinates | None:
        """The features' coordinates of a base model's normalisation x * scale + shift, if it divides."""
        if not (np.isfinite(scale).all() and np.isfinite(shift).all() and (scale != 0).all()):
            return None
        return cls(float32_values(-shift / scale), float32_values(1 / scale), standardized="features")


def mean_and_spread(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each column's mean and spread(), without its wild values: one corrupt sample among the first thousand (a
    feature of [0, 1] at 1e6) had set its column's spread for good, its real variation then a millionth of a
    standardized unit, which no step could learn. Wild is WILD_DEVIATIONS median absolute deviations from the
    median: a lognormal feature of σ = 1 keeps its values out to 6σ, a log-uniform one over three decades all of
    them (33 at most). And among the column's farthest WILD_SHARE or WILD_LEAST values, the more: a motion
    feature with most samples in a narrow band near 0 (static scenes) and the rest in [1, 20] had every moving
    value left out, a spread 20 000 times too small. A column whose values are mostly one value (no deviation to
    measure by) keeps them all."""
    mean, deviation = values.mean(axis=0), spread(values)
    distance = np.abs(values - np.median(values, axis=0))
    deviations = np.median(distance, axis=0)
    rank = max(0, len(values) - 1 - max(WILD_LEAST, int(WILD_SHARE * len(values))))  # of the farthest value kept
    farthest_kept = np.partition(distance, rank, axis=0)[rank]
    typical = distance <= np.maximum(WILD_DEVIATIONS * deviations, farthest_kept)
    for column in np.flatnonzero(~typical.all(axis=0) & (deviations > 0)):
        kept = values[typical[:, column], column, None]
        mean[column], deviation[column] = kept.mean(), spread(kept)[0]
    return mean, deviation


def spread(values: np.ndarray) -> np.ndarray:
    """Each column's standard deviation, or its mean's size (at least 1) where the deviation is too small to divide
    by (a constant feature): below NEAR_CONSTANT of the mean's size, whatever the feature's unit (a feature of
    1e-5 +- 1e-5 varies), or below SMALLEST_SPREAD. Not 1: the raw model folds shift / spread times the first
    layer into its bias, and for a large constant (a pixel count, 2e6) that bias and the feature's own product
    cancel in float32, which costs nodes the precision the trainer had; and a feature that varies later stays a
    few units in size, or gets statistics of its own then (Trainer.retake_statistics). At a spread of NEAR_CONSTANT
    of the mean's size (84 float32 steps or more) that cancellation costs about 1 % of a standardized unit; at 1e-4
    a feature of 1e5 +- 5 was a constant, its signal lost to the model."""
    mean, deviation = values.mean(axis=0), values.std(axis=0)
    varies = (deviation > NEAR_CONSTANT * np.abs(mean)) & (deviation > SMALLEST_SPREAD)
    return np.where(varies, deviation, np.maximum(1.0, np.abs(mean)))


def float32_values(values: Any) -> tuple[float, ...]:
    return tuple(np.asarray(values, np.float32).tolist())


def remap(layers: list[tuple[np.ndarray, np.ndarray]], old: Coordinates, new: Coordinates,
          offsets: bool = True, declared: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The layers (float64) that compute in `new` coordinates what `layers` compute in `old` ones. The map is
    affine; without offsets it is its linear part, for a difference of parameters (a step, the momentum).
    Features: ((x - a1) / s1) @ W' + b' == ((x - a0) / s0) @ W + b for W' = (s1 / s0) W, b' = b + ((a1 - a0) / s0) @ W.
    Scores: s1 (h @ W' + b') + a1 == s0 (h @ W + b) + a0 for W' = (s0 / s1) W, b' = (s0 b + a0 - a1) / s1.
    The `declared` features (a mask) keep their rows of W, which then weigh their new standardized values as
    they weighed the old ones, and only their old mean (x = a0) computes what it did: b' = b + ((a1 - a0) / s1) @ W."""
    old_shift, new_shift = (np.asarray(c.x_shift) for c in (old, new))
    old_scale, new_scale = (np.asarray(c.x_scale) for c in (old, new))
    ratio, moved_by = new_scale / old_scale, old_scale
    if declared is not None:
        ratio, moved_by = np.where(declared, 1.0, ratio), np.where(declared, new_scale, old_scale)
    (w, b), *rest = layers
    layers = [(w * ratio[:, None], b + ((new_shift - old_shift) / moved_by) @ w), *rest]
    (w, b), gain = layers[-1], old.y_scale / new.y_scale
    layers[-1] = (w * gain, b * gain + ((old.y_shift - new.y_shift) / new.y_scale if offsets else 0.0))
    return layers


# ---- model: dense layers with an activation between them, backprop written out by hand ----

Activation = onnx_builder.Activation


def activate(act: Activation, z: Any, backend: Backend) -> Any:
    xp = backend.xp
    if act.kind == "relu":
        return xp.maximum(z, 0)
    if act.kind == "leaky_relu":
        return xp.where(z > 0, z, z * act.alpha).astype(z.dtype)
    if act.kind == "tanh":
        return xp.tanh(z)
    if act.kind == "sigmoid":
        return (1 / (1 + xp.exp(-z))).astype(z.dtype)
    return (0.5 * z * (1 + backend.erf(z / math.sqrt(2)))).astype(z.dtype)  # exact GELU


def activation_slope(act: Activation, z: Any, h: Any, backend: Backend) -> Any:
    """d activate(z) / dz, given z and h = activate(z)."""
    xp = backend.xp
    if act.kind == "relu":
        return xp.sign(h)  # 1 where the unit was active (h > 0), else 0, as torch takes it at 0
    if act.kind == "leaky_relu":
        return xp.where(z > 0, 1, act.alpha).astype(z.dtype)
    if act.kind == "tanh":
        return 1 - h * h
    if act.kind == "sigmoid":
        return h * (1 - h)
    cdf = 0.5 * (1 + backend.erf(z / math.sqrt(2)))
    return (cdf + z * xp.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)).astype(z.dtype)


def layer_views(flat: Any, sizes: list[int]) -> list[tuple[Any, Any]]:
    """Each layer's W (in, out) and b as views into a flat parameter vector (or one shaped like it)."""
    layers, offset = [], 0
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        w = flat[offset:offset + fan_in * fan_out].reshape(fan_in, fan_out)
        offset += fan_in * fan_out
        layers.append((w, flat[offset:offset + fan_out]))
        offset += fan_out
    return layers


class MLP:
    """All parameters live in one flat vector and each layer's W (in, out) and b are views
    into it, so that an optimizer updates every parameter at once (Trainer.apply_gradient)."""

    def __init__(self, sizes: list[int], activations: list[Activation], dtype: type = np.float32,
                 backend: Backend = NUMPY, flat: Any = None):
        """Zero parameters, or those in `flat` (a view: the model then computes with what is written there)."""
        assert len(activations) == len(sizes) - 2, "one activation per hidden layer"
        self.sizes = list(sizes)
        self.activations = list(activations)
        self.backend = backend
        if flat is None:
            flat = backend.xp.zeros(sum(i * o + o for i, o in zip(sizes, sizes[1:])), dtype)
        self.flat = flat
        self.layers = layer_views(self.flat, sizes)

    @classmethod
    def from_weights(cls, weights: onnx_builder.MLPWeights, dtype: type = np.float32,
                     backend: Backend = NUMPY) -> MLP:
        model = cls(weights.sizes(), weights.activations, dtype, backend)
        for (w, b), (w_src, b_src) in zip(model.layers, weights.layers):
            w[...] = backend.xp.asarray(w_src)
            b[...] = backend.xp.asarray(b_src)
        return model

    @classmethod
    def initial(cls, sizes: list[int], activation: Activation, rng: np.random.Generator) -> MLP:
        """Like torch.nn.Linear's default: weights and biases uniform in +-1/sqrt(fan_in)."""
        model = cls(sizes, [activation] * (len(sizes) - 2))
        for w, b in model.layers:
            bound = 1.0 / math.sqrt(w.shape[0])
            w[...] = rng.uniform(-bound, bound, w.shape)
            b[...] = rng.uniform(-bound, bound, b.shape)
        return model

    def to(self, backend: Backend) -> MLP:
        """A copy whose parameters live on `backend`."""
        return MLP.from_weights(self.weights(), self.flat.dtype, backend)

    def copy(self) -> MLP:
        twin = MLP(self.sizes, self.activations, self.flat.dtype, self.backend)
        twin.flat[...] = self.flat
        return twin

    def weights(self) -> onnx_builder.MLPWeights:
        """The parameters as host arrays (views on the numpy backend)."""
        host = self.backend.to_host
        return onnx_builder.MLPWeights([(host(w), host(b)) for w, b in self.layers], self.activations)

    def forward(self, x: Any) -> Any:
        """Scores of shape (batch, 1)."""
        for (w, b), act in zip(self.layers, self.activations):
            x = activate(act, x @ w + b, self.backend)
        w, b = self.layers[-1]
        return x @ w + b

    def loss_and_grad(self, x: Any, y: Any, grad: MLP) -> float:
        """Batch MSE of predicting y from x; its gradient is written into grad's parameters."""
        hidden, pre = [x], []
        for (w, b), act in zip(self.layers, self.activations):
            z = hidden[-1] @ w
            z += b
            pre.append(z)
            hidden.append(activate(act, z, self.backend))
        w, b = self.layers[-1]
        error = hidden[-1] @ w
        error += b
        error -= y[:, None]
        xp = self.backend.xp
        loss = xp.vdot(error, error) / len(y)
        d_out = error * (2 / len(y))  # dL/d(output of layer i), walking back from the top
        for i in range(len(self.layers) - 1, -1, -1):
            w, d_w, d_b = self.layers[i][0], *grad.layers[i]
            xp.matmul(hidden[i].T, d_out, out=d_w)
            d_out.sum(axis=0, out=d_b)
            if i:
                # A one-column d_out makes the matmul an outer product, which broadcasting does faster.
                d_out = d_out * w.T if w.shape[1] == 1 else d_out @ w.T
                d_out *= activation_slope(self.activations[i - 1], pre[i - 1], hidden[i], self.backend)
        return float(loss)


# ---- gate: progressive validation and a held-out history decide whether a checkpoint is published ----

PUBLISHED = ("passed", "off")  # the gate verdicts that publish; else "quarantined"
REFERENCES = ("incumbent", "champion", "base")  # the names of what a candidate is compared with; see references()
# A variance below this fraction of its raw second moment is rounding noise: that side is taken as constant.
CONSTANT_VARIANCE = 1e-10


@dataclass(frozen=True)
class Scores:
    """One model's scores on one set of samples."""
    plcc: float  # Pearson correlation of predictions and true scores
    srcc: float | None  # Spearman rank correlation, ties given their average rank; None on the window (sums only)
    rmse: float
    r2: float  # 1 - SSE / SST: above 0 only for a model better than predicting the set's mean


@dataclass(frozen=True)
class Evidence:
    """A set the gate judges on, its size and the candidate's and each reference's scores on it (None: not
    measurable: no samples, or outputs that are not finite)."""
    n: int
    scores: dict[str, Scores | None]  # "candidate", then the references by name
    held_out: int | None = None  # of the history: how many of its samples are held out, the rest replayed
    left_out: int = 0  # of the history: the wild samples plausible_scores() left out, beside these n

    def is_judged(self, least: int) -> bool:
        """Whether the gate judges on this set: gathered to `least` samples (the wild ones left out count: a set
        does not lose its vote to them), with enough left for an R² to clear its floor."""
        return self.n + self.left_out >= least and self.n >= R2_MIN_SAMPLES

    def best_reference(self, metric: str) -> tuple[str, Scores] | None:
        """The reference with the highest `metric` ("plcc", "r2") on this set, with its scores."""
        measured = [(name, s) for name, s in self.scores.items() if name != "candidate" and s is not None]
        return max(measured, key=lambda item: getattr(item[1], metric), default=None)

    def record(self) -> dict[str, Any]:
        held_out = {} if self.held_out is None else {"held_out": self.held_out}
        left_out = {"left_out": self.left_out} if self.left_out else {}
        scores = {name: s and dataclasses.asdict(s) for name, s in self.scores.items()}
        return {"n": self.n, **held_out, **left_out, **scores}


@dataclass(frozen=True)
class Verdict:
    """The gate's judgement of a candidate, with the evidence it was judged on."""
    gate: str  # one of PUBLISHED, or "quarantined"
    window: Evidence  # progressive validation since the last checkpoint
    history: Evidence  # the held-out ring, and older replay samples while it is small
    reason: str  # why it is published or not

    @property
    def published(self) -> bool:
        return self.gate in PUBLISHED

    def refused(self, reason: str) -> Verdict:
        return dataclasses.replace(self, gate="quarantined", reason=reason)

    def displaces_champion(self, least: int) -> bool:
        """Whether this candidate's history PLCC and R² (the window's, without a history the gate judged on: a
        score on fewer says nothing) are both at least the champion's: a champion replaced on PLCC alone would let
        each publish take R² down by GATE_MAX_R2_DROP."""
        for evidence in (self.history, self.window):
            ours, theirs = evidence.scores.get("candidate"), evidence.scores.get("champion")
            if evidence.is_judged(least) and ours is not None and theirs is not None:
                return ours.plcc >= theirs.plcc and ours.r2 >= theirs.r2
        return True

    def record(self) -> dict[str, Any]:
        """As a checkpoint's record holds it: "metrics", "gate", "reason". metrics.candidate, .incumbent and
        .eval_n are the history's (the keys nodes read since format 1); .window and .history hold it all."""
        history = self.history.scores
        incumbent = history.get("incumbent", history.get("base"))
        metrics = {"candidate": history["candidate"] and dataclasses.asdict(history["candidate"]),
                   "incumbent": incumbent and dataclasses.asdict(incumbent), "eval_n": self.history.n,
                   "window": self.window.record(), "history": self.history.record()}
        return {"metrics": metrics, "gate": self.gate, "reason": self.reason}


def judge(config: Config, window: Evidence, history: Evidence, finite_weights: bool = True) -> Verdict:
    """The rule: on every set with at least GATE_MIN_EVAL samples, the candidate must clearly beat a constant
    prediction (R² above r2_floor) and come within GATE_MAX_PLCC_DROP of the best reference's PLCC and within
    GATE_MAX_R2_DROP of the best reference's R². With no such set, nothing shows it is good, and it is not
    published."""
    verdict = Verdict("passed", window, history, "")
    if not finite_weights or any(e.n and e.scores["candidate"] is None for e in (window, history)):
        return verdict.refused("non-finite weights or outputs")
    if config.gate == "off":
        return dataclasses.replace(verdict, gate="off", reason="published unjudged: VMAFX_SIDECAR_GATE=off")
    least = judged_size(config)
    judged = [(name, e) for name, e in (("window", window), ("history", history)) if e.is_judged(least)]
    if not judged:
        needed = (f"VMAFX_SIDECAR_GATE_MIN_EVAL ({config.gate_min_eval})" if least == config.gate_min_eval
                  else f"{R2_MIN_SAMPLES} (on fewer, no R² clears its floor)")
        return verdict.refused(f"too little evidence: {window.n} window and {history.n} history samples, fewer "
                               f"than {needed} in each")
    passes = []
    for name, evidence in judged:
        ours = evidence.scores["candidate"]
        best, best_r2 = evidence.best_reference("plcc"), evidence.best_reference("r2")
        if ours.r2 <= r2_floor(evidence.n):
            return verdict.refused(f"{name}: R² {ours.r2:.4f} on {evidence.n} samples: not clearly better than "
                                   f"predicting their mean (needs more than 2/√n = {r2_floor(evidence.n):.4f})")
        if best is not None and ours.plcc < best[1].plcc - config.gate_max_plcc_drop:
            return verdict.refused(f"{name}: PLCC {ours.plcc:.6f} on {evidence.n} samples, below the {best[0]}'s "
                                   f"{best[1].plcc:.6f} by more than VMAFX_SIDECAR_GATE_MAX_PLCC_DROP "
                                   f"({config.gate_max_plcc_drop})")
        if best_r2 is not None and ours.r2 < best_r2[1].r2 - config.gate_max_r2_drop:
            return verdict.refused(f"{name}: R² {ours.r2:.4f} on {evidence.n} samples, below the {best_r2[0]}'s "
                                   f"{best_r2[1].r2:.4f} by more than VMAFX_SIDECAR_GATE_MAX_R2_DROP "
                                   f"({config.gate_max_r2_drop})")
        against = f", {best[0]} {best[1].plcc:.6f}" if best else ""
        passes.append(f"{name}: R² {ours.r2:.4f}, PLCC {ours.plcc:.6f}{against} on {evidence.n} samples")
    return dataclasses.replace(verdict, reason="; ".join(passes))


R2_MIN_SAMPLES = 5  # on fewer, r2_floor() is 1 or more, which no R² exceeds: such a set is not judged
WILD_SPAN = 10  # how many spans of the history's middle 98 % make a score wild: plausible_scores()


def judged_size(config: Config) -> int:
    """The samples a set needs to be judged on."""
    return max(config.gate_min_eval, R2_MIN_SAMPLES)


def plausible_scores(y: np.ndarray, references: list[np.ndarray]) -> np.ndarray:
    """Which of the history's samples (their scores, float64) the gate measures models on, leaving out what is
    farther than WILD_SPAN times the span of the scores' middle 98 % (the bound):
    - a corrupt label: a score the bound from their median and from every reference's prediction of it
      (`references`). One is enough to decide every model's PLCC and R² there: one of 1e4 among 2 000 VMAF scores
      held every candidate below the R² floor, the champion too, for as long as it stayed in the held-out ring
      (41 000 samples at the defaults). A rare real score a reference predicts is kept (failed encodes at 40
      among scores of 93 ± 1);
    - a corrupt input (a feature in another unit): one every reference predicts the bound (or not at all) from
      the median and from its score, as no model of these scores does. It decided every model's R² alike, as a
      corrupt label does.
    Every sample is kept when the rest would be one value, or fewer than half of them."""
    low, median, high = np.quantile(y, (0.01, 0.5, 0.99)) if len(y) else (0.0, 0.0, 0.0)
    bound = WILD_SPAN * (high - low)
    wild_score = np.abs(y - median) > bound
    wild_input = np.full(len(y), bool(references))
    for predicted in references:
        wild_score &= np.abs(y - predicted) > bound
        wild_input &= ~(np.abs(predicted - median) <= bound) & ~(np.abs(predicted - y) <= bound)  # NaN: far
    wild = wild_score | wild_input
    if not wild.any() or 2 * wild.sum() > len(y) or np.ptp(y[~wild]) == 0:
        return np.ones(len(y), bool)
    return ~wild


def r2_floor(n: int) -> float:
    """What R² must exceed on n samples: the R² of a model no better than a constant scatters by about 1/√n
    between samples of that size (0.6/√n to 1.3/√n in simulation), so a candidate at 0 plus noise would
    otherwise pass half the time. A model near the mean is where a fresh one in standardized coordinates
    starts."""
    return 2 / math.sqrt(n)


def gather_evidence(trainer: Trainer, candidate: MLP) -> tuple[Evidence, Evidence, np.ndarray]:
    """The window's scores, and the history's of `candidate` (the EMA as a raw model) and the references,
    with the history's inputs (what the written file is run on)."""
    x, y, held_out = trainer.history()
    models = {"candidate": candidate, **trainer.references()}
    x64, y64 = x.astype(np.float64), y.astype(np.float64)  # once for all the models
    predicted = {name: predictions(model, x64) for name, model in models.items()}
    plausible = plausible_scores(y64, [p for name, p in predicted.items() if name != "candidate"])
    history = Evidence(int(plausible.sum()), {name: scored(p[plausible], y64[plausible])
                                              for name, p in predicted.items()},
                       int(plausible[:held_out].sum()), int(len(y) - plausible.sum()))
    return trainer.window.evidence(trainer.references()), history, x[plausible]


class Window:
    """Progressive validation (test, then train): each model's paired errors on the new samples of every step
    since the last checkpoint, each predicted before the step trains on it. Every sample is evidence,
    none is withheld, and memory stays constant: sums in float64 of values shifted by the window's first
    score, so that no variance is lost to cancellation. Row 0 is the candidate's, then the references' in
    the order Trainer.references() gives them; the rows past those stay zero.

    The candidate (the EMA) changes every step, so it predicts a step's samples then (take()). The
    references are fixed for a window: the samples wait in a block of `capacity` until they predict them all
    in a few large products (score()), as a step costs its numpy calls far more than its arithmetic."""

    def __init__(self, backend: Backend, n_features: int, capacity: int):
        xp = backend.xp
        self.xp, self.to_host = xp, backend.to_host
        self.sums = xp.zeros((1 + len(REFERENCES), 4))  # per model: sums of d, d², d·e, (d - e)²
        self.truth = xp.zeros(2)  # sums of e and e²; d = prediction - shift, e = score - shift
        self.n = 0  # samples in the window
        self.shift = 0.0
        self.x = xp.zeros((capacity, n_features), np.float32)  # the block: raw features,
        self.y = xp.zeros(capacity, np.float32)  # scores,
        self.predictions = xp.zeros((1 + len(REFERENCES), capacity), np.float32)  # row 0 the candidate's
        self.unscored = 0  # samples in the block, the window's newest: not yet in the sums

    def take(self, candidate: Any, x: Any, y: Any, references: dict[str, MLP]) -> None:
        """Take one step's samples (raw features and scores) with the candidate's predictions of them, into the
        block, which the `references` score first if they do not fit."""
        if self.unscored + len(y) > len(self.y):
            self.score(references)
        if not self.n:
            self.shift = float(y[0])
        start, end = self.unscored, self.unscored + len(y)
        self.x[start:end], self.y[start:end], self.predictions[0, start:end] = x, y, candidate
        self.unscored = end
        self.n += len(y)

    def score(self, references: dict[str, MLP]) -> None:
        """The block's samples into the sums, predicted by the references."""
        sums, truth = self.paired_sums(self.predicted(references), self.y[:self.unscored])
        self.sums[:len(sums)] += sums
        self.truth += truth
        self.unscored = 0

    def predicted(self, references: dict[str, MLP]) -> Any:
        """The block's predictions: the candidate's, then each reference's, made now."""
        k = self.unscored
        for row, model in enumerate(references.values(), 1):
            self.predictions[row, :k] = model.forward(self.x[:k])[:, 0]
        return self.predictions[:1 + len(references), :k]

    def reset(self) -> None:
        self.sums[...] = 0
        self.truth[...] = 0
        self.n, self.shift, self.unscored = 0, 0.0, 0

    def evidence(self, references: dict[str, MLP]) -> Evidence:
        """The candidate's and the references' scores on the window so far, the block's samples included
        without changing the window (`references`: the models, by name, in the order of their rows). Asked for
        by status and metrics too: float32 overflow here gives scores that are not finite, not a warning."""
        with np.errstate(over="ignore", invalid="ignore"):
            sums, truth = self.sums, self.truth
            if self.unscored:
                block_sums, block_truth = self.paired_sums(self.predicted(references), self.y[:self.unscored])
                sums, truth = sums.copy(), truth + block_truth
                sums[:len(block_sums)] += block_sums
            sums, (sum_e, sum_ee) = self.to_host(sums), self.to_host(truth).tolist()
            names = ["candidate", *references]
            return Evidence(self.n, {name: window_scores(self.n, sums[row], sum_e, sum_ee)
                                     for row, name in enumerate(names)})

    def paired_sums(self, predictions: Any, y: Any) -> tuple[Any, Any]:
        """Per model (row), the sums of d, d², d·e and (d - e)², and the sums of e and e², where d = prediction
        - shift and e = score - shift, in float64."""
        d = predictions.astype(np.float64)
        d -= self.shift
        e = y.astype(np.float64)
        e -= self.shift
        r = d - e
        sums = self.xp.stack([d.sum(axis=1), (d * d).sum(axis=1), d @ e, (r * r).sum(axis=1)], axis=1)
        return sums, self.xp.stack([e.sum(), e @ e])


def window_scores(n: int, sums: np.ndarray, sum_e: float, sum_ee: float) -> Scores | None:
    if not n or not (np.isfinite(sums).all() and math.isfinite(sum_ee)):
        return None
    sum_d, sum_dd, sum_de, sse = sums.tolist()
    var_d, var_e = sum_dd - sum_d * sum_d / n, sum_ee - sum_e * sum_e / n  # n times the variances
    constant_d, constant_e = var_d <= CONSTANT_VARIANCE * sum_dd, var_e <= CONSTANT_VARIANCE * sum_ee
    plcc = 0.0 if constant_d or constant_e else (sum_de - sum_d * sum_e / n) / math.sqrt(var_d * var_e)
    r2 = 0.0 if constant_e else 1.0 - sse / var_e
    return Scores(plcc=min(1.0, max(-1.0, plcc)), srcc=None, rmse=math.sqrt(max(0.0, sse) / n), r2=r2)


def predictions(model: MLP, x: np.ndarray) -> np.ndarray:
    """`model`'s outputs for float64 inputs, in float64 on the host (inf or nan where they overflow)."""
    with np.errstate(all="ignore"):
        return MLP.from_weights(model.weights(), np.float64).forward(x)[:, 0]


def scored(predicted: np.ndarray, truth: np.ndarray) -> Scores | None:
    """Scores of float64 predictions of float64 scores; None when there is nothing to measure or a prediction is not
    finite, or so large that its squared error is not (an RMSE of inf is no JSON a strict reader takes)."""
    with np.errstate(all="ignore"):
        sse = float(np.sum((predicted - truth) ** 2))  # nan or inf when an output is
    if not len(truth) or not math.isfinite(sse):
        return None
    sst = float(np.sum((truth - truth.mean()) ** 2))
    return Scores(plcc=pearson(predicted, truth), srcc=pearson(average_ranks(predicted), average_ranks(truth)),
                  rmse=math.sqrt(sse / len(truth)), r2=1.0 - sse / sst if np.ptp(truth) else 0.0)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either side is constant, which no correlation can be measured for
    (a model that predicts one score for everything ranks nothing)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    a, b = a / np.abs(a).max(), b / np.abs(b).max()  # scaled so that no sum of products overflows
    return float(np.clip(a @ b / math.sqrt(float(a @ a) * float(b @ b)), -1.0, 1.0))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the average of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)
    return ranks


# ---- publish: the one path of a checkpoint: judged, written, read back, then published or quarantined ----

def publish(trainer: Trainer) -> Checkpoint:
    """The trainer's EMA weights, as a model of raw features and scores, as its next checkpoint, judged by the
    gate on the window and the history against every reference. OSError if the disk refuses it, with
    nothing partial left."""
    weights = trainer.raw_weights(trainer.ema)
    window, history, x = gather_evidence(trainer, MLP.from_weights(weights))
    finite = all(np.isfinite(a).all() for layer in weights.layers for a in layer)
    verdict = judge(trainer.config, window, history, finite)
    # The written file is run on history inputs; replayed ones stand in while there are none.
    host = trainer.backend.to_host
    probe = x[:READBACK_PROBE] if len(x) else host(trainer.replay.x[:min(trainer.replay.size, READBACK_PROBE)])
    return write_checkpoint(trainer.checkpoints, weights, trainer.steps, trainer.samples_trained, verdict, probe)


def write_checkpoint(writer: CheckpointWriter, weights: onnx_builder.MLPWeights, step: int, samples_trained: int,
                     verdict: Verdict, probe: np.ndarray) -> Checkpoint:
    """Write `weights` as the next version and place it as `verdict` says, unless the file, read back from
    disk, does not compute what `weights` do on `probe`: then it is quarantined whatever the verdict."""
    staged = writer.stage(weights, step, samples_trained)
    if verdict.published and (problem := readback_problem(staged.temp, weights, probe)):
        verdict = verdict.refused(f"read-back check failed: {problem}")
    return writer.place(staged, verdict)


# ---- checkpoints: versioned ONNX files of the EMA weights, written atomically, a pointer to the newest ----

CHECKPOINT_NAME = re.compile(r"model_v(\d{6,})\.onnx(\.sha256)?")
CHECKPOINT_FILE = re.compile(r"model_v(\d{6,})\.(?:onnx|json)")  # a model or its record: whole only with its .sha256
TEMP_SUFFIX = ".tmp"
LATEST = "latest.json"
RECORD_FORMAT = 2  # of checkpoint records and latest.json: 1 had no "format" field, 2 the same fields with it
LATEST_MODEL = "latest.onnx"  # a copy of the model latest.json names, at a path a node can be given once
QUARANTINE_KEPT = 10
READBACK_TOLERANCE = 1e-5  # relative, with scores below 1 compared absolutely
READBACK_PROBE = 256  # inputs the written file is run on


@dataclass(frozen=True)
class Staged:
    """A checkpoint's model file, written to a temp file and not yet placed."""
    version: int
    data: bytes
    temp: Path
    step: int
    samples_trained: int
    created_unix: float


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    record: dict[str, Any]  # what model_vNNNNNN.json holds, and latest.json when it is published
    verdict: Verdict

    @property
    def published(self) -> bool:
        return self.verdict.published


class CheckpointWriter:
    """Each published checkpoint is model_vNNNNNN.onnx with its .onnx.sha256 and .json in the checkpoint
    directory, and latest.json names the newest; a refused one goes to quarantine/ under the same names."""

    def __init__(self, directory: str, keep: int = 50):
        self.directory = Path(directory).absolute()  # ACKs name checkpoints for readers in other cwds
        self.quarantine = self.directory / "quarantine"
        self.keep = keep
        self.champion_version: int | None = None  # the trainer's champion, which retention keeps too
        self.failures = 0  # fsyncs and latest.json updates the disk refused after a checkpoint was in place
        # The published checkpoint latest.json and latest.onnx are to name once the disk takes their update (a
        # refused one can leave latest.onnx and its .sha256 a publish apart), and when it was last tried.
        self.unpointed: dict[str, Any] | None = None
        self.pointing_tried = 0.0
        try:
            make_directory(self.quarantine, parents=True)
            listings = {d: os.listdir(d) for d in (self.directory, self.quarantine)}
        except OSError as e:  # named: the directory itself, or its quarantine/ (a file there, say)
            raise StartupError(f"cannot use {e.filename or directory}: {e.strerror or e}") from None
        versions = [int(m.group(1)) for names in listings.values() for n in names
                    if (m := CHECKPOINT_NAME.fullmatch(n))]
        self.version = max(versions, default=0)  # numbering continues: a restart never overwrites
        for d, names in listings.items():  # debris of a write that a crash interrupted
            for name in names:
                if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                    try:
                        (d / name).unlink(missing_ok=True)
                    except OSError as e:
                        raise StartupError(f"cannot remove {d / name}: {e.strerror or e}") from None
                    log.warning("removed unfinished checkpoint file %s", d / name)
        try:
            self.finish_unfinished(listings)
            self.latest = self.recover_latest()
        except OSError as e:
            other = e.filename if e.filename and e.filename != str(self.directory / LATEST) else None  # one it read
            raise StartupError(f"cannot update {self.directory / LATEST}: {e.strerror or e}"
                               f"{f' ({other})' if other else ''}") from None
        self.sync_latest_model()

    def finish_unfinished(self, listings: dict[Path, list[str]]) -> None:
        """A checkpoint without its .sha256 is one a crash interrupted. Older than a whole one in its directory,
        retention was deleting it (.sha256 first): its other files go too. Else it was being placed, never
        published whole: it goes to (or stays in) quarantine/, where its model gets the .sha256 of what it holds,
        so that its number stays taken and `checkpoints` and `verify` show it as what it is. What the disk
        refuses is tried at the next start."""
        for directory, listed in listings.items():
            names = set(listed)  # looked up once per checkpoint: a list made a start of 32 000 of them take 25 s
            newest_whole = max((int(m.group(1)) for n in names if (m := CHECKPOINT_NAME.fullmatch(n)) and m.group(2)),
                               default=0)
            for version in sorted({int(m.group(1)) for n in names if (m := CHECKPOINT_FILE.fullmatch(n))}):
                stem = f"model_v{version:06d}"
                if f"{stem}.onnx.sha256" in names:
                    continue
                try:
                    if version < newest_whole:
                        for name in (f"{stem}.json", f"{stem}.onnx"):
                            (directory / name).unlink(missing_ok=True)
                        log.warning("deleted checkpoint v%06d, which retention was deleting when the process stopped",
                                    version)
                        continue
                    self.quarantine_unpublished(directory, stem)
                except OSError as e:
                    log.error("checkpoint v%06d was left without its .sha256 by a crash, and cannot be tidied now "
                              "(tried again at the next start): %s", version, e)

    def quarantine_unpublished(self, directory: Path, stem: str) -> None:
        for name in (f"{stem}.onnx", f"{stem}.json"):
            if directory != self.quarantine and (directory / name).exists():
                os.replace(directory / name, self.quarantine / name)
        record = read_record(self.quarantine / f"{stem}.json")
        if record and record.get("gate") in PUBLISHED:  # else `checkpoints` took it for one rolled back by hand
            reason = f"never published whole: the process stopped while it was placed ({record['gate']}: " \
                     f"{record.get('reason')})"
            write_whole(self.quarantine / f"{stem}.json",
                        json_text({**record, "gate": "quarantined", "reason": reason}).encode())
        model = self.quarantine / f"{stem}.onnx"
        if model.exists():
            digest = hashlib.sha256(model.read_bytes()).hexdigest()
            write_whole(self.quarantine / f"{stem}.onnx.sha256", f"{digest}  {stem}.onnx\n".encode())
        fsync_directory(self.quarantine)
        log.warning("%s was being written when the process stopped, never published: it is in %s", stem,
                    self.quarantine)

    def stage(self, weights: onnx_builder.MLPWeights, step: int, samples_trained: int) -> Staged:
        """The next version's model, written and synced to a temp file, where nobody looks for it."""
        now, version = time.time(), self.version + 1
        created = utc_text(now)
        metadata = {"version": str(version), "step": str(step), "samples_trained": str(samples_trained),
                    "created": created}
        staged = Staged(version, onnx_builder.build_mlp_model(weights, metadata).SerializeToString(),
                        self.directory / f".model_v{version:06d}.onnx{TEMP_SUFFIX}", step, samples_trained, now)
        try:
            write_synced(staged.temp, [memoryview(staged.data)])
        except OSError:
            discard(staged.temp)
            raise
        return staged

    def place(self, staged: Staged, verdict: Verdict) -> Checkpoint:
        """Give a staged model its record and .sha256, in the directory or in quarantine/ as `verdict` says.
        Temp files, fsync and renames (.sha256 last) make each file appear whole, and a reader that sees
        the .sha256 can trust the checkpoint; a published one becomes the latest."""
        version, created_unix = staged.version, staged.created_unix
        name, stem = f"model_v{version:06d}.onnx", f"model_v{version:06d}"
        created = utc_text(created_unix)
        digest = hashlib.sha256(staged.data).hexdigest()
        record = {"format": RECORD_FORMAT, "version": version, "file": name, "sha256": digest, "step": staged.step,
                  "samples_trained": staged.samples_trained, "created": created,
                  "created_unix": round(created_unix, 3), **verdict.record()}
        directory = self.directory if verdict.published else self.quarantine
        temps, renamed = [staged.temp], []
        try:
            make_directory(directory)  # quarantine/, should it have been cleared out while the sidecar ran
            for n, content in ((f"{stem}.json", json_text(record)), (f"{name}.sha256", f"{digest}  {name}\n")):
                temps.append(directory / f".{n}{TEMP_SUFFIX}")
                write_synced(temps[-1], [memoryview(content.encode())])
            for temp, n in zip(temps, (name, f"{stem}.json", f"{name}.sha256")):  # .sha256 last
                renamed.append(directory / n)
                os.replace(temp, renamed[-1])
        except OSError:  # files of a checkpoint without its .sha256 were never published: remove them
            for leftover in [*temps, *renamed]:
                discard(leftover)
            raise
        self.version = version  # visible now: this version is never written again, whatever follows
        checkpoint = Checkpoint(directory / name, record, verdict)
        # In place whole, and readers may see it: what the disk refuses from here on is counted, not a failed
        # checkpoint (latest.* are updated when the disk takes it: point_latest_again()).
        try:
            fsync_directory(directory)
            if verdict.published:
                self.point_latest(record, staged.data)
        except OSError as e:
            self.point_later(record if verdict.published else None)
            if verdict.published:
                log.error("checkpoint v%06d is in place, but the disk refused its directory's fsync or %s's update "
                          "(retried until it takes it): %s", version, LATEST, e)
            else:  # nothing names it: a power loss may take it, which costs the record of a refusal
                log.error("checkpoint v%06d is in quarantine/, but the disk refused that directory's fsync (not "
                          "retried): %s", version, e)
        if not verdict.published:
            log.warning("checkpoint v%06d quarantined: %s", version, verdict.reason)
        self.prune()
        return checkpoint

    def point_latest(self, record: dict[str, Any], data: bytes) -> None:
        """latest.onnx (`data`, the model `record` names), latest.onnx.sha256, then latest.json, each replaced
        whole, in that order: latest.json never names a model before latest.onnx holds it."""
        self.replace_latest_model(record, data)
        write_whole(self.directory / LATEST, json_text(record).encode())
        fsync_directory(self.directory)
        self.latest, self.unpointed = record, None

    def point_later(self, record: dict[str, Any] | None) -> None:
        """Count an update of latest.* the disk refused, and have point_latest_again() name `record` (a published
        checkpoint's; None: the one it was to name already) once the disk takes it."""
        self.failures += 1
        if record is not None:
            self.unpointed, self.pointing_tried = record, time.monotonic()

    def point_latest_again(self) -> None:
        """Retry, once a second, the update of latest.onnx, its .sha256 and latest.json that the disk refused (counted
        once, when it was refused)."""
        if time.monotonic() - self.pointing_tried < 1.0:
            return
        self.pointing_tried = time.monotonic()
        try:
            self.point_latest(self.unpointed, read_named_checkpoint(self.directory, self.unpointed))
        except (FileNotFoundError, ValueError) as e:  # moved or changed since (a rollback by hand): the next start
            log.error("cannot point %s at %s: %s", LATEST, self.unpointed["file"], e)  # points anew
            self.unpointed = None
            return
        except OSError as e:  # a full disk, out of descriptors: tried again
            log.debug("%s still not updated: %s", LATEST, e)
            return
        log.info("%s and %s now name %s", LATEST, LATEST_MODEL, self.latest["file"])

    def replace_latest_model(self, record: dict[str, Any], data: bytes) -> None:
        write_whole(self.directory / LATEST_MODEL, data)
        write_whole(self.directory / f"{LATEST_MODEL}.sha256", f"{record['sha256']}  {LATEST_MODEL}\n".encode())

    def recover_latest(self) -> dict[str, Any] | None:
        """latest.json, first pointed at the newest published checkpoint if it names another one: a crash
        came between publishing and pointing, or somebody deleted the file it named. One of a newer format that
        names a checkpoint still published, and none newer that this version reads, is left as it is, with
        latest.onnx (an image rolled back): None then, and candidates face the base model until one publishes."""
        latest = read_record(self.directory / LATEST)
        newest = newest_published_record(self.directory, latest)
        named = newer_record_version(self.directory / LATEST) if latest is None else None
        if named is not None and self.is_published(named) and (newest is None or newest["version"] <= named):
            log.warning("%s was written by a newer sidecar: left as it is, with %s", self.directory / LATEST,
                        LATEST_MODEL)
            return None
        if newest is None:  # nothing published: no latest.json, whatever one is there (corrupt, rolled back)
            if (self.directory / LATEST).exists():
                (self.directory / LATEST).unlink()
                log.warning("removed %s: no checkpoint it could name is published", self.directory / LATEST)
            return None
        if newest == latest:
            return latest
        if latest is None:
            before = f"it {record_problem(self.directory / LATEST).replace('is ', 'was ', 1)}"
        elif latest["file"] == newest["file"]:
            before = f"it held another {', '.join(differing_fields(latest, newest))}"
        else:
            before = f"it named {latest['file']}"
        try:
            write_whole(self.directory / LATEST, json_text(newest).encode())
            fsync_directory(self.directory)
        except OSError as e:  # a full disk must not keep the sidecar from answering: retried (point_later)
            self.point_later(newest)
            log.error("cannot point %s at %s, the newest published checkpoint, yet: %s", self.directory / LATEST,
                      newest["file"], e.strerror or e)
            return latest  # what it still names, as after a checkpoint's refused update: the status says so
        log.warning("%s now names %s, the newest published checkpoint, as its record says (%s)",
                    self.directory / LATEST, newest["file"], before)
        return newest

    def sync_latest_model(self) -> None:
        """latest.onnx and its .sha256 as latest.json says: after a crash between their updates, a rollback
        or a directory an older version wrote; removed when nothing is published, that is when there is no
        latest.json (one recover_latest() left is a newer sidecar's that stands). Not while an update of all three
        waits for the disk (point_latest_again()): latest.onnx keeps what nodes load until latest.json moves on."""
        if self.unpointed is not None:
            return
        if self.latest is None:
            if not (self.directory / LATEST).exists():
                for name in (f"{LATEST_MODEL}.sha256", LATEST_MODEL):
                    try:
                        (self.directory / name).unlink(missing_ok=True)
                    except OSError as e:  # a directory put there: serving matters more than this tidying
                        log.error("cannot remove %s, with nothing published: %s", self.directory / name,
                                  e.strerror or e)
            return
        if not latest_model_problems(self.directory, self.latest):
            return
        try:
            data = read_named_checkpoint(self.directory, self.latest)
        except (OSError, ValueError) as e:  # nothing trustworthy to copy; latest_model() reports it too
            log.error("cannot update %s: %s", self.directory / LATEST_MODEL, getattr(e, "strerror", None) or e)
            return
        try:
            self.replace_latest_model(self.latest, data)
            fsync_directory(self.directory)
        except OSError as e:  # as in recover_latest()
            self.point_later(self.latest)
            log.error("cannot update %s to %s yet: %s", self.directory / LATEST_MODEL, self.latest["file"],
                      e.strerror or e)
            return
        log.warning("%s now holds %s, as %s names", self.directory / LATEST_MODEL, self.latest["file"], LATEST)

    def incumbent(self) -> dict[str, Any] | None:
        """The newest published checkpoint's record: the one latest.json names, or the newer one it is to name once
        the disk takes the update (point_latest_again()); None before the first."""
        return self.unpointed or self.latest

    def incumbent_version(self) -> int | None:
        return (record := self.incumbent()) and record["version"]

    def latest_model(self) -> MLP | None:
        """The newest published model (incumbent()), from its file, or from latest.onnx, the copy nodes load, should
        the file have been damaged since; None when neither holds it intact (the gate then takes the base model)."""
        record = self.incumbent()
        if record is None:
            return None
        for name in (record["file"], LATEST_MODEL):
            try:
                data = read_named_checkpoint(self.directory, {**record, "file": name})
                return MLP.from_weights(onnx_builder.read_mlp_model(onnx.load_from_string(data)))
            except Exception as e:  # unreadable, altered or not an MLP
                log.error("cannot load %s, the latest published checkpoint: %s: %s", self.directory / name,
                          type(e).__name__, e)
        return None

    def is_published(self, version: int | None) -> bool:
        """Whether checkpoint `version` is in the directory, whole: not pruned, not rolled back."""
        return version is not None and (self.directory / f"model_v{version:06d}.onnx.sha256").exists()

    def prune(self) -> None:
        """Delete all but the newest `keep` published (0: keep all) and QUARANTINE_KEPT quarantined
        checkpoints, never the one latest.json names nor the champion; .sha256 first, so no reader trusts a
        partial one."""
        kept = {self.latest and self.latest["version"], self.champion_version}
        for directory, keep in ((self.directory, self.keep), (self.quarantine, QUARANTINE_KEPT)):
            try:
                versions = checkpoint_versions(directory)
            except OSError as e:  # the checkpoint just placed is in place all the same: this is no failed write
                log.warning("cannot list %s for old checkpoints to delete: %s", directory, e)
                continue
            for version in versions[:-keep] if keep else []:
                if directory == self.directory and version in kept:
                    continue
                stem = directory / f"model_v{version:06d}"
                try:
                    for path in (Path(f"{stem}.onnx.sha256"), Path(f"{stem}.json"), Path(f"{stem}.onnx")):
                        path.unlink(missing_ok=True)
                except OSError as e:
                    log.warning("cannot delete old checkpoint %s: %s", stem, e)


def checkpoint_versions(directory: Path) -> list[int]:
    """Versions of the model files in `directory`, ascending."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := CHECKPOINT_NAME.fullmatch(n)) and not m.group(2))


def newest_published_record(directory: Path, latest: dict[str, Any] | None) -> dict[str, Any] | None:
    """The record latest.json is to name: the newest checkpoint in `directory` with its .sha256, a record this
    version reads and the model that record names, or the one `latest` (latest.json's record) names, whose intact
    copy may be latest.onnx. One damaged since it was placed is passed over, with a line that says so."""
    for version in reversed(checkpoint_versions(directory)):
        record = read_record(directory / f"model_v{version:06d}.json")
        if not (directory / f"model_v{version:06d}.onnx.sha256").exists():
            continue
        if not record and latest and latest["version"] == version:  # a bit flipped in it took the latest away
            log.warning("%s cannot be read; %s holds its record whole: it stays the latest published checkpoint",
                        directory / f"model_v{version:06d}.json", LATEST)
            return latest
        if not record:
            continue
        if record == latest or holds_named_model(directory, record):
            return record
        log.error("%s is not the model its record names: not one latest.json can name", directory / record["file"])
    return None


SMALL_FILE_MAX = 1 << 20  # a record, a log's name, the fleet's positions: none of ours comes near it


def read_small_file(path: Path) -> bytes:
    """path.read_bytes() for the files the loop reads from a shared volume, but OSError for a FIFO or a device,
    whose open() or read() would hold the loop, and for a file larger than SMALL_FILE_MAX."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        data = file.read(SMALL_FILE_MAX + 1)
    if len(data) > SMALL_FILE_MAX:
        raise OSError(errno.EFBIG, f"larger than {SMALL_FILE_MAX} bytes", str(path))
    return data


def read_record(path: Path) -> dict[str, Any] | None:
    """A checkpoint's JSON record (latest.json or model_vNNNNNN.json), in RECORD_FORMAT; None if absent,
    malformed or of a newer format."""
    try:
        record = json.loads(read_small_file(path))
        if type(record["version"]) is not int or record["file"] != f"model_v{record['version']:06d}.onnx" \
                or not isinstance(record["sha256"], str):
            raise ValueError("its file and version do not match")
        version = record.get("format", 1)
        if not isinstance(version, int) or version > RECORD_FORMAT:
            raise ValueError(f"format {version!r}, newer than this sidecar reads ({RECORD_FORMAT})")
        return {"format": RECORD_FORMAT, **record}  # format 1: the same fields
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as e:  # RecursionError: nested too deeply
        log.warning("ignoring %s: %s: %s", path, type(e).__name__, e)
        return None


def differing_fields(record: dict[str, Any], other: dict[str, Any]) -> list[str]:
    return sorted(k for k in record.keys() | other.keys() if record.get(k) != other.get(k))


def newer_record_version(path: Path) -> int | None:
    """The checkpoint version a record of a newer format than this sidecar reads names; None for any other file
    (missing, malformed, or of a format it reads)."""
    try:
        record = json.loads(read_small_file(path))
        newer = type(record["format"]) is int and record["format"] > RECORD_FORMAT
        return record["version"] if newer and type(record["version"]) is int else None
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return None


def read_named_checkpoint(directory: Path, record: dict[str, Any]) -> bytes:
    """The model file a record such as latest.json names; ValueError if its sha256 is not the named one."""
    data = (directory / record["file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise ValueError(f"{record['file']} does not have the sha256 {LATEST} names")
    return data


def holds_named_model(directory: Path, record: dict[str, Any]) -> bool:
    try:
        read_named_checkpoint(directory, record)
    except (OSError, ValueError):
        return False
    return True


def latest_model_problems(directory: Path, record: dict[str, Any]) -> list[str]:
    """Why latest.onnx and latest.onnx.sha256 are not the model `record` (latest.json) names; [] if they are."""
    try:
        data = (directory / LATEST_MODEL).read_bytes()
        checksum = (directory / f"{LATEST_MODEL}.sha256").read_bytes()  # bytes: whatever they are, no decode error
    except OSError as e:
        return [f"{LATEST_MODEL} or its .sha256 cannot be read: {e.strerror or e}"]
    problems = []
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        problems.append(f"{LATEST_MODEL} is not {record['file']}, which {LATEST} names")
    if checksum != f"{record['sha256']}  {LATEST_MODEL}\n".encode():
        problems.append(f"{LATEST_MODEL}.sha256 is not the sha256 of {record['file']}")
    return problems


def utc_text(unix: float) -> str:
    """ISO 8601 in UTC, to the second: the time in checkpoint records, their metadata and the lock file."""
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).isoformat(timespec="seconds")


def json_text(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=2) + "\n"


def readback_problem(path: Path, weights: onnx_builder.MLPWeights, probe: np.ndarray) -> str | None:
    """Why the ONNX file at `path` does not compute what `weights` do on `probe`, or None if it does. The file
    runs in onnx's reference evaluator: another implementation than the trainer's forward pass."""
    with np.errstate(all="ignore"):
        expected = MLP.from_weights(weights).forward(probe)
    if not np.isfinite(expected).all():
        return "the weights give outputs that are not finite"
    try:
        model = onnx.load(path)
        onnx.checker.check_model(model)
        (output,) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: probe})
    except MemoryError:  # the process's, not the file's: it ends the process, as anywhere else (a restart recovers)
        raise
    except Exception as e:  # whatever is wrong with the file, it is not published
        return f"{type(e).__name__}: {e}"
    if output.shape != expected.shape:
        return f"output shape {output.shape}, expected {expected.shape}"
    with np.errstate(invalid="ignore"):
        error = np.abs(output - expected) / np.maximum(np.abs(expected), 1.0)
    worst = float(np.max(error, initial=0.0))
    return None if worst <= READBACK_TOLERANCE else f"outputs differ from the trainer's by up to {worst:.3g} relative"


def write_synced(path: Path, chunks: list[memoryview], mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        for chunk in chunks:
            write_all(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_whole(path: Path, content: bytes, mode: int = 0o644) -> None:
    """Replace `path` so that a crash leaves it as it was or whole, never part-written: a temp file beside it (hidden;
    the checkpoint writer's start takes such debris from its directories, a later write of the same file reuses
    it), synced, renamed into place. Syncing the directory, so that the rename lasts, is the caller's."""
    temp = path.with_name(f".{path.name.lstrip('.')}{TEMP_SUFFIX}")
    write_synced(temp, [memoryview(content)], mode)
    os.replace(temp, path)


def write_all(fd: int, content: bytes) -> None:
    view = memoryview(content)
    try:
        while view:
            view = view[os.write(fd, view):]
    finally:  # a refused write's traceback, kept by whatever keeps its log record, must not pin a bytearray's size
        view.release()


def append_whole(fd: int, size: int, content: bytes) -> None:
    """Append `content` to the first `size` bytes of an O_APPEND file, whole or not at all: what a refused write
    left is cut at once. Left until the next try, a backlog's partial write filled what a full disk had freed,
    and the snapshot that would have replaced the backlog never fit."""
    try:
        write_all(fd, content)
    except OSError:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass  # cut before the next write, then
        raise


def discard(path: Path) -> None:
    """Remove what a refused write left, where the directory allows it: on a read-only one that fails too, and the
    refused write is the error to handle, not this one."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def make_directory(path: Path, mode: int = 0o777, parents: bool = False) -> None:
    """mkdir(exist_ok=True), with the directory it creates made to last: its parent fsynced, as the entry of any file
    renamed into place is. The journal and the sample log ACKs rest on are in new directories at a first start, and a
    power loss that kept their files' data could have lost the directories that name them."""
    if parents and not path.parent.is_dir():
        make_directory(path.parent, parents=True)
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        if path.is_dir():
            return
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- fleet: one trainer on the union of every replica's sample log, a run per invocation ----

FLEET_DIR = "fleet"
FLEET_CURSORS = "cursors.json"  # in ROOT/fleet/: how far each replica's log was read, for its retention
FLEET_NOTHING_NEW = 3  # the exit status of a run that found no new sample; 0: trained, 1: failed


def fleet(root: Path, config: Config) -> int:
    """Train ROOT/fleet/ on the samples every replica (a directory of ROOT with a sample log) logged since
    the last run, merged by arrival time, and publish at the end (and in a run longer than the checkpoint
    interval, every interval); then save the state together with how far each log was read, so that a run
    killed anywhere is redone from the last save: each sample is ingested once."""
    directory = root.absolute() / FLEET_DIR
    config = dataclasses.replace(config, checkpoint_dir=str(directory), sample_log="0")
    claim = claim_directory(directory, f"pid {os.getpid()} on {socket.gethostname()}, fleet run, since "
                                       f"{utc_text(time.time())}")
    try:
        trainer, _ = build_trainer(config)
        state = StateStore(config, trainer)
        state.restore()
        # The schedule that runs it is the fleet's interval: a checkpoint is due mid-run only after an interval of
        # this run's own. Counted from the last run's checkpoint, a run that started a little earlier after its
        # schedule's tick than that one had published nothing, and one that did published at its first step.
        trainer.last_checkpoint_time = time.monotonic()
        replicas = replica_logs(root.absolute())
        # The positions the replicas' retention reads, as the run begins: see replica_samples and save_fleet_state
        earlier = {key: fleet_cursor(path) for path, key in replicas}
        logs = []
        for path, key in replicas:  # cursors.json's position is a set-aside state's only where this one holds none
            read = state_position(state, path, key, earlier[key])
            logs.append(replica_samples(path, key, config.n_features, read or 0,
                                        earlier[key] if read is None else read))
        ingested = 0
        for _, key, _, sample in heapq.merge(*logs):
            result = trainer.ingest(sample.features, sample.score, sample.held_out, sample.job_id is None)
            state.sources[key] = sample.sequence
            ingested += 1
            if result is not None and result.checkpoint is not None:
                save_fleet_state(state, earlier)  # the state a checkpoint came from, with the logs' positions then
        for path, key in replicas:  # a position kept under a directory's name, as before logs had names, moved
            if key in state.sources and key != path.name:
                state.sources.pop(path.name, None)
        if checkpoint_owed(trainer):  # everything the run trained on
            trainer.take_checkpoint()
        save_fleet_state(state, earlier)
    finally:
        os.close(claim)  # the kernel would release it at exit; a run in a test's process goes on
    latest = trainer.checkpoints.latest
    log.info("fleet run: %d samples ingested, step %d, %s", ingested, trainer.steps,
             f"latest v{latest['version']:06d}" if latest else "nothing published yet")
    # Nodes would not see what the run trained: a failed run, which its Job shows; the next run retries it.
    owed, unpointed = checkpoint_owed(trainer), trainer.checkpoints.unpointed
    if owed or unpointed is not None:
        refused = "the checkpoint of what it trained" if owed else f"the update of {LATEST} to {unpointed['file']}"
        log.error("fleet run: the disk refused %s; the next run writes it", refused)
        return 1
    return 0 if ingested else FLEET_NOTHING_NEW


def checkpoint_owed(trainer: Trainer) -> bool:
    """Whether a fleet run trained on samples no checkpoint holds yet (at least MIN_SAMPLES_CKPT of them)."""
    return trainer.samples_since_checkpoint >= max(1, trainer.config.min_samples_ckpt)


def save_fleet_state(state: StateStore, earlier: dict[str, int]) -> None:
    """The snapshot (the trainer's state and the logs' positions, together), then the positions for the
    replicas, whose retention keeps what was not read yet: never ahead of a saved state, so a snapshot the
    disk refused fails the run (the next one goes on from the last saved state). A replica's position the state
    lacks is kept as it was `earlier`: a state set aside since (another model) begins without positions, and a
    log it cannot read (of the feature count before) would have lost its own, the samples the earlier state read
    then counted as lost by the replica's retention and reported as a gap."""
    generation = state.generation
    state.save()
    if state.generation == generation:
        raise StartupError(f"cannot save the fleet trainer's state in {state.directory}")
    positions = {**{key: n for key, n in earlier.items() if n}, **state.sources}
    cursors = json.dumps({"sources": positions, "saved_unix": round(time.time(), 3)}).encode()
    try:
        write_whole(state.directory.parent / FLEET_CURSORS, cursors)
    except OSError as e:  # behind the state's positions meanwhile, the replicas keep more of their logs, not less
        raise StartupError(f"cannot write {state.directory.parent / FLEET_CURSORS}: {e.strerror or e} (the next "
                           "run writes it)") from None


def replica_logs(root: Path) -> list[tuple[Path, str]]:
    """Each replica directory with the name its log's position is kept under: the log's own (LOG_ID), or an older
    version's directory name. Of directories whose logs have one name (a replica's and a copy of it), the one whose
    log reaches furthest is read, the others skipped: the position of one would cut the other's samples short, or
    read them twice, and a copy's log stops where the copy was made."""
    logs: dict[str, list[Path]] = {}
    for path in replica_directories(root):
        try:
            key = readable_log_id(path) or path.name
        except OSError as e:  # keyed by its directory's name, its log would be read again from its start
            log.warning("fleet: %s skipped this run: the name of its sample log cannot be read: %s", path.name,
                        e.strerror or e)
            continue
        logs.setdefault(key, []).append(path)
    replicas = []
    for key, paths in logs.items():
        furthest = max(paths, key=log_reach)  # the first in name order of those that reach as far
        for path in paths:
            if path != furthest:
                log.warning("fleet: %s skipped: its sample log is named %s, as %s's is, which reaches further or as "
                            "far (a copy of it?): move a copy out of %s", path.name, key, furthest.name, root)
        replicas.append((furthest, key))
    return replicas


def log_reach(directory: Path) -> tuple[int, int]:
    """How far a replica's log reaches, as its newest segment's first number and size tell without reading it."""
    try:
        newest = segment_paths(directory / SAMPLE_LOG_DIR)[-1]
        return int(newest.name[:16]), newest.stat().st_size
    except (OSError, IndexError):
        return 0, 0


def replica_directories(root: Path) -> list[Path]:
    """ROOT's directories but fleet/, by name, each once: an entry that leads to one listed already (a symbolic
    link, say) is skipped with a log line, as its samples would be read twice, and so is one that cannot be
    looked at."""
    replicas, seen = [], set()
    for path in sorted(root.iterdir(), key=lambda p: (p.is_symlink(), p.name)):  # a directory's own name first
        try:
            if path.name == FLEET_DIR or not path.is_dir():
                continue
            real = path.resolve()
        except OSError as e:
            log.warning("fleet: %s skipped: %s", path.name, e.strerror or e)
            continue
        if real in seen:
            log.warning("fleet: %s skipped: it is a directory read under another name", path.name)
            continue
        seen.add(real)
        replicas.append(path)
    return sorted(replicas)


def fleet_model(directory: Path) -> dict[str, Any] | None:
    """The newest model of the fleet trainer in `directory` (its version and age in seconds), as the replicas
    beside it report it; None without one, or with a latest.json that does not say when it was made."""
    latest = read_record(directory / LATEST)
    created = latest.get("created_unix") if latest else None
    if type(created) not in (int, float) or not abs(created) < 1e15:  # a time, not NaN, inf or a huge integer
        return None
    # Made on another node, whose clock may run ahead of this one's: an age, never below 0
    return {"version": latest["version"], "age_s": round(max(0.0, time.time() - created), 3)}


def fleet_cursor(checkpoint_dir: Path) -> int:
    """How far the fleet trainer has read this replica's log (0: not at all, or no fleet)."""
    try:
        cursors = json.loads(read_small_file(checkpoint_dir.parent / FLEET_DIR / FLEET_CURSORS))
        by_name = cursors["sources"].get(checkpoint_dir.name, 0)  # as an older version, or this one before a run
        return int(cursors["sources"].get(log_id(checkpoint_dir) or checkpoint_dir.name, by_name))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError):
        return 0


CLOCK_SKEW_S = 60.0  # nodes' clocks kept by NTP agree within milliseconds


def state_position(state: StateStore, directory: Path, key: str, cursor: int) -> int | None:
    """Where the fleet state read the replica's log to (None: it holds no position for it), said when cursors.json,
    which the replica's retention deletes by, is past it: no run leaves that, saving the state first (a state put
    back from an older copy, or the file damaged), and what lies between may be gone."""
    read = state.sources.get(key, state.sources.get(directory.name))
    if read is not None and read < cursor:
        log.warning("fleet: %s: %s says %d of its samples were read, the fleet state %d (a state put back from an "
                    "older copy, or the file damaged): those between that its retention deleted as read are lost",
                    directory.name, FLEET_CURSORS, cursor, read)
    return read


def replica_samples(directory: Path, key: str, n_features: int, after: int,
                    read_before: int) -> Iterator[tuple[float, str, int, LoggedSample]]:
    """A replica's samples after sequence `after`, keyed for the merge (by the name its position is kept under);
    a directory without a sample log, or with one that cannot be read, gives none and one log line saying why.
    `read_before`: the replica's position in cursors.json, which a fleet state set aside since may have passed
    (what it read is deleted as read)."""
    try:
        has_log = (directory / SAMPLE_LOG_DIR).is_dir()
    except OSError as e:  # a replica directory this process may not search
        log.warning("fleet: %s skipped: %s", directory.name, e.strerror or e)
        return
    if not has_log:
        log.info("fleet: %s skipped: no %s (not a replica with VMAFX_SIDECAR_SAMPLE_LOG=1)", directory.name,
                 SAMPLE_LOG_DIR)
        return
    after = max(after, log_origin(directory) - 1)
    ahead_after = time.time() + CLOCK_SKEW_S  # a sample stamped later was stamped by a clock ahead of this one
    try:
        for sample in read_log(directory, n_features, after):
            if sample.arrival > ahead_after:
                log.warning("fleet: %s: sample %d is stamped %.0f s ahead of this node's clock: the replicas are "
                            "merged by their nodes' clocks, which must agree (as NTP keeps them)", directory.name,
                            sample.sequence, sample.arrival - ahead_after + CLOCK_SKEW_S)
                ahead_after = math.inf  # once a run
            if after < read_before and sample.sequence > after + 1:
                log.info("fleet: %s: samples %d to %d were read by the fleet state set aside since, and deleted "
                         "as read", directory.name, after + 1, min(read_before, sample.sequence - 1))
                after = min(read_before, sample.sequence - 1)
            if sample.sequence > after + 1:
                log.warning("fleet: %s: samples %d to %d are not in its log: given up before this run read them "
                            "(the replica's VMAFX_SIDECAR_SAMPLE_LOG_MAX_BYTES, a long outage of its disk, or a log "
                            "set aside for another feature count; it logged which), accepted while its "
                            "VMAFX_SIDECAR_SAMPLE_LOG was off, or in corrupt records (a line above says so)",
                            directory.name, after + 1, sample.sequence - 1)
            after = sample.sequence
            yield sample.arrival, key, sample.sequence, sample
    except (OSError, ValueError) as e:
        log.warning("fleet: %s skipped from here: %s", directory.name, e)


def fleet_status(root: Path, n_features: int) -> int:
    """Print each replica's lag behind the fleet trainer (samples logged and not read yet, and how long the
    oldest of them has waited) and the samples missing from its log before them (given up unread, or accepted
    while its log was off), without training."""
    directory = root.absolute() / FLEET_DIR
    latest = read_record(directory / LATEST)
    rows = [["replica", "logged", "read", "lag (samples)", "lag (s)", "missing"]]
    now = time.time()
    for path in replica_directories(root.absolute()):
        read = max(fleet_cursor(path), log_origin(path) - 1)
        first, logged, unread, missing = None, read, 0, 0  # missing: the gaps before and between the unread
        try:
            if not (path / SAMPLE_LOG_DIR).is_dir():
                continue
            for sample in read_log(path, n_features, read):
                first, missing = first or sample, missing + sample.sequence - logged - 1
                logged, unread = sample.sequence, unread + 1
        except (OSError, ValueError) as e:
            rows.append([path.name, "-", str(read), "-", "-", f"unreadable: {e}"])
            continue
        waited = max(0.0, now - first.arrival) if first else 0.0  # its node's clock may run ahead of this one's
        rows.append([path.name, str(logged), str(read), str(unread), f"{waited:.0f}", str(missing)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    model = fleet_model(directory)
    print(f"fleet model: {'none published' if latest is None else latest['file']}"
          + (f", {model['age_s']:.0f} s old" if model else ""))
    return 0


# ---- prometheus endpoint: metrics as Prometheus text on a minimal HTTP/1.1 server in the same loop ----

HTTP_MAX_REQUEST = 8192  # bytes of request line and headers
HTTP_BLANK_LINE = re.compile(rb"\n\r?\n")  # where a head ends: after CRLFs, or lines that end in a bare LF too
HTTP_TIMEOUT_S = 5.0  # a scrape that has not finished by then is cut off
HTTP_MAX_CONNECTIONS = 16
HTTP_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                431: "Request Header Fields Too Large"}


class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """`times` observations of one value: an ACK latency, once for every ACK of a loop turn."""
        self.counts[bisect.bisect_left(self.bounds, value)] += times  # a bucket holds values <= its bound
        self.sum += value * times

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        """Its series in the exposition: cumulative buckets up to +Inf, the sum and the count."""
        bounds = [*map(repr, self.bounds), "+Inf"]
        return [*(("_bucket", {"le": b}, n) for b, n in zip(bounds, itertools.accumulate(self.counts))),
                ("_sum", {}, self.sum), ("_count", {}, sum(self.counts))]


HOST_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"  # its labels


def parse_listen_address(text: str) -> tuple[socket.AddressFamily, str, int]:
    """`:9464` (every interface: the host "", see listen_on), `127.0.0.1:9464`, `localhost:9464` or `[::1]:9464`;
    ValueError for what no socket could bind: an address no IP literal is, a host name no name is, a port past
    65535."""
    match = re.fullmatch(rf"(\[[0-9A-Fa-f:.]+\]|{HOST_NAME}|):([0-9]{{1,5}})", text)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"not HOST:PORT: {text!r}")
    host = match.group(1)
    if host.startswith("["):
        return socket.AF_INET6, str(ipaddress.IPv6Address(host[1:-1])), int(match.group(2))
    if re.fullmatch(r"[0-9.]+", host):  # all digits: an IPv4 address, or nothing
        ipaddress.IPv4Address(host)
    return socket.AF_INET, host, int(match.group(2))


def listen_on(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    """A listening socket; with no host, on every interface: IPv6 and IPv4 (a pod's address may be either, as
    Go's net.Listen takes ":port"), or IPv4 alone where the pod has no IPv6."""
    if host:
        return bound(family, host, port)
    try:
        return bound(socket.AF_INET6, "::", port)
    except OSError:
        return bound(socket.AF_INET, "0.0.0.0", port)


def bound(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if host == "::":  # and IPv4's every address, whatever the node's default (net.ipv6.bindv6only)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(HTTP_MAX_CONNECTIONS)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(slots=True)
class HttpConnection:
    sock: socket.socket
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytes = b""


class MetricsEndpoint:
    """GET /metrics and /healthz, one request per connection. Sockets are non-blocking and every
    connection has a deadline, so a slow or stuck scraper never holds up the trainer or the node."""

    def __init__(self, server: Server, address: str):
        self.server = server
        try:
            self.listener = listen_on(*parse_listen_address(address))
        except OSError as e:
            raise StartupError(f"cannot serve metrics on {address}: {e.strerror or e}") from None
        self.listener.setblocking(False)
        self.connections: list[HttpConnection] = []
        self.paused_at: float | None = None  # out of file descriptors: the listener is unwatched for ACCEPT_RETRY_S
        server.selector.register(self.listener, selectors.EVENT_READ, self.accept)

    def accept(self, mask: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # EMFILE: stop watching, or the loop would spin on a ready listener
            log.error("cannot accept a metrics connection (%s): pausing for a second", e.strerror or e)
            self.server.selector.unregister(self.listener)
            self.paused_at = time.monotonic()
            return
        if len(self.connections) >= HTTP_MAX_CONNECTIONS:
            sock.close()
            return
        sock.setblocking(False)
        conn = HttpConnection(sock, time.monotonic() + HTTP_TIMEOUT_S)
        self.connections.append(conn)
        self.server.selector.register(sock, selectors.EVENT_READ, functools.partial(self.serve, conn))

    def serve(self, conn: HttpConnection, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            if (data := received(conn.sock, HTTP_MAX_REQUEST)) is None:
                return
            if not data:  # the scraper left before its request was complete
                return self.close_connection(conn)
            conn.inbuf += data
            if HTTP_BLANK_LINE.search(conn.inbuf) or len(conn.inbuf) > HTTP_MAX_REQUEST:
                conn.outbuf = http_response(bytes(conn.inbuf), self.server)
                self.server.selector.modify(conn.sock, selectors.EVENT_WRITE, functools.partial(self.serve, conn))
        if conn.outbuf:
            try:
                conn.outbuf = conn.outbuf[conn.sock.send(conn.outbuf):]
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                conn.outbuf = b""
            if not conn.outbuf:
                self.close_connection(conn)

    def tick(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self.connections if c.deadline < now]:
            self.close_connection(conn)
        if self.paused_at is not None and now - self.paused_at >= ACCEPT_RETRY_S:
            self.server.selector.register(self.listener, selectors.EVENT_READ, self.accept)
            self.paused_at = None

    def close_connection(self, conn: HttpConnection) -> None:
        self.connections.remove(conn)
        self.server.selector.unregister(conn.sock)
        conn.sock.close()

    def close(self) -> None:
        """Close the endpoint and all of its connections."""
        for conn in list(self.connections):
            self.close_connection(conn)
        if self.paused_at is None:
            self.server.selector.unregister(self.listener)
        self.listener.close()


def http_response(request: bytes, server: Server) -> bytes:
    """The whole response to one request: strict, since only Prometheus and kubelets talk to it."""
    head, complete, _ = request.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    method, target, version = (parts + [b""] * 3)[:3]
    path = target.split(b"?")[0]
    status, body, content_type = 200, b"ok\n", "text/plain; charset=utf-8"
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    # A line that ends in a bare LF: answered, not left to time out, and never read as part of a header's value.
    if (not complete and HTTP_BLANK_LINE.search(request)) or any(b"\n" in line for line in lines):
        status, body = 400, b"malformed request: lines end in CRLF\n"
    elif not complete or len(head) > HTTP_MAX_REQUEST:
        status, body = 431, b"request head too large\n"
    elif len(parts) != 3 or version not in (b"HTTP/1.0", b"HTTP/1.1") or not all(b":" in x for x in lines[1:]):
        status, body = 400, b"malformed request\n"
    elif headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers:
        status, body = 400, b"a request body is not accepted\n"
    elif path not in (b"/metrics", b"/healthz"):
        status, body = 404, b"not found: try /metrics or /healthz\n"
    elif method not in (b"GET", b"HEAD"):
        status, body = 405, b"only GET and HEAD\n"
    elif path == b"/metrics":
        body, content_type = metrics_text(server).encode(), "text/plain; version=0.0.4; charset=utf-8"
    allow = "Allow: GET, HEAD\r\n" if status == 405 else ""
    response = (f"HTTP/1.1 {status} {HTTP_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n{allow}Connection: close\r\n\r\n").encode()
    return response + (b"" if method == b"HEAD" else body)  # a response to HEAD has no body, whatever its status


def record_part(record: Any, key: str) -> dict[str, Any]:
    """record[key] where both are objects, else {}: a gate record comes back from disk (a checkpoint's record, the
    snapshot), where one edited by hand may hold anything, and a scrape that met it ended the sidecar."""
    part = record.get(key) if isinstance(record, dict) else None
    return part if isinstance(part, dict) else {}


def metrics_text(server: Server) -> str:
    """Every metric in the Prometheus text exposition format (0.0.4)."""
    t, s = server.trainer, server
    latest = t.checkpoints.latest or {}
    verdict_metrics = record_part(t.last_gate, "metrics")
    candidate = record_part(verdict_metrics, "candidate")
    judged = {name: record_part(verdict_metrics, name) for name in ("window", "history")}
    live = t.window.evidence(t.references())
    fleet = fleet_model(Path(s.config.checkpoint_dir).absolute().parent / FLEET_DIR)
    failures = {**s.state.write_failures(), "checkpoint": t.checkpoint_results["failed"] + t.checkpoints.failures}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    counted = {name: now - s.counts_at_start[name] for name, now in t.counts().items()}  # since the process started
    families = [
        ("vmafx_sidecar_samples_total", "counter", "Valid samples trained on (accepted) or kept to evaluate "
         "checkpoints (held_out), and rejected lines, since the process started",
         [({"result": result}, counted[result]) for result in ("accepted", "held_out", "rejected")]),
        ("vmafx_sidecar_rejected_total", "counter", "Rejected lines by reason, since the process started",
         [({"reason": r}, s.rejections[r]) for r in REJECTION_REASONS.values()]),
        ("vmafx_sidecar_train_steps_total", "counter", "Gradient steps taken, since the process started",
         [({}, counted["steps"])]),
        ("vmafx_sidecar_train_loss", "gauge", "MSE of the last batch trained", [({}, t.last_loss)]),
        ("vmafx_sidecar_train_loss_smoothed", "gauge", "MSE of the batches, exponentially smoothed over ~100 "
         "steps", [({}, t.loss_smoothed)]),
        ("vmafx_sidecar_step_duration_seconds", "histogram", "Time of one training step, since the process "
         "started", t.step_seconds.samples()),
        ("vmafx_sidecar_ack_latency_seconds", "histogram", "From a loop turn's requests being ready to their ACKs "
         "handed to the socket, for every ACK of the turn, since the process started", s.ack_seconds.samples()),
        ("vmafx_sidecar_replay_buffer_samples", "gauge", "Samples in the replay buffer", [({}, t.replay_size)]),
        ("vmafx_sidecar_replay_buffer_capacity", "gauge", "Samples the replay buffer holds at most",
         [({}, s.config.replay_capacity)]),
        ("vmafx_sidecar_eval_buffer_samples", "gauge", "Held-out samples kept to judge checkpoints",
         [({}, t.eval_size)]),
        ("vmafx_sidecar_eval_buffer_capacity", "gauge", "Held-out samples kept at most",
         [({}, s.config.eval_capacity)]),
        ("vmafx_sidecar_connections", "gauge", "Open client connections", [({}, len(s.connections))]),
        ("vmafx_sidecar_connections_refused_total", "counter", "Connections closed unanswered, over "
         "VMAFX_SIDECAR_MAX_CONNECTIONS, since the process started", [({}, s.connections_refused)]),
        ("vmafx_sidecar_connections_dropped_total", "counter", "Connections closed because they stopped reading "
         "their ACKs (or their answer, over the connection limit), since the process started",
         [({}, s.connections_dropped)]),
        ("vmafx_sidecar_write_failures_total", "counter", "Writes the disk refused (each retried), by what was "
         "written, since the process started", [({"kind": k}, n) for k, n in failures.items()]),
        ("vmafx_sidecar_checkpoints_total", "counter", "Checkpoints due, by outcome, since the process started",
         [({"result": r}, t.checkpoint_results[r]) for r in ("published", "quarantined", "failed")]),
        ("vmafx_sidecar_checkpoint_version", "gauge", "Version of the checkpoint latest.json names",
         [({}, latest.get("version"))]),
        ("vmafx_sidecar_last_checkpoint_timestamp_seconds", "gauge", "When the checkpoint latest.json names "
         "was written (Unix time)", [({}, latest.get("created_unix"))]),
        ("vmafx_sidecar_eval_plcc", "gauge", "History PLCC of the last checkpoint the gate judged",
         [({}, candidate.get("plcc"))]),
        ("vmafx_sidecar_window_samples", "gauge", "Samples in the live window: predicted, then trained on, since "
         "the last checkpoint", [({}, live.n)]),
        *(("vmafx_sidecar_window_" + score, "gauge", f"{score.upper()} of each model on the live window",
           [({"model": name}, getattr(measured, score)) for name, measured in live.scores.items() if measured])
          for score in ("plcc", "r2", "rmse")),
        ("vmafx_sidecar_gate_samples", "gauge", "Samples of each set the last verdict judged on",
         [({"set": name}, judged[name].get("n")) for name in judged]),
        *(("vmafx_sidecar_gate_" + score, "gauge", f"{score.upper()} of each model on each set, at the last "
           "verdict", [({"set": name, "model": model}, measured.get(score)) for name in judged
                       for model, measured in judged[name].items() if isinstance(measured, dict)])
          for score in ("plcc", "r2", "rmse")),
        ("vmafx_sidecar_nonfinite_steps_total", "counter", "Steps undone because they overflowed float32, since the "
         "process started", [({}, counted["nonfinite_steps"])]),
        ("vmafx_sidecar_fleet_model_version", "gauge", "Version of the newest fleet model (its latest.json)",
         [({}, fleet and fleet["version"])]),
        ("vmafx_sidecar_fleet_model_age_seconds", "gauge", "Seconds since the newest fleet model was written",
         [({}, fleet and fleet["age_s"])]),
        ("vmafx_sidecar_sample_log_dropped_total", "counter", "Samples gone from the sample log before the fleet "
         "trainer read them (its size bound, a long write outage), since the process started",
         [({}, s.state.samples and s.state.samples.samples_dropped)]),
        ("vmafx_sidecar_backend_info", "gauge", "The array backend in use", [({"backend": t.backend.name}, 1)]),
        ("vmafx_sidecar_build_info", "gauge", "The sidecar's version", [({"version": version()}, 1)]),
        ("process_resident_memory_bytes", "gauge", "Resident memory", [({}, resident_bytes())]),
        ("process_cpu_seconds_total", "counter", "User and system CPU time",
         [({}, usage.ru_utime + usage.ru_stime)]),
        ("process_start_time_seconds", "gauge", "When the server started, in seconds since the epoch",
         [({}, round(s.started_unix, 3))]),
    ]
    lines = []
    for name, kind, help, samples in families:
        lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
        for suffix, labels, value in (x if len(x) == 3 else ("", *x) for x in samples):
            if type(value) in (int, float):  # None where there is none yet; a record's, anything
                text = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines.append(f"{name}{suffix}{{{text}}} {value!r}" if text else f"{name}{suffix} {value!r}")
    return "\n".join(lines) + "\n"


@functools.cache
def version() -> str:
    try:
        return importlib.metadata.version("vmafx-sidecar")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        return None


# ---- base models: ONNX graphs, PyTorch state-dicts (read without torch) and .npz arrays ----

# A base model is a small MLP: past this many bytes of arrays in all a file is refused before it is read on,
# whatever it claims: a few kilobytes of zip inflate to any size, and numpy allocates what a header says.
MAX_BASE_MODEL_BYTES = 64 << 20
MAX_PICKLE_BYTES = 1 << 24  # a state-dict's data.pkl: a few kilobytes of names and tensor layouts
MAX_PICKLE_OPS = 1 << 20  # in it: some tens of opcodes a tensor
MAX_TUPLE_NODES = 1 << 12  # a tuple built by it, counted whole: a tensor's layout is a few numbers


def file_sha256(path: str) -> str:
    """The digest of a base model's file, "" where it cannot be read now (the start read it a moment ago)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return ""


def too_large() -> str:
    return f"its arrays hold more than {MAX_BASE_MODEL_BYTES} bytes: not the weights of a small MLP"


def load_base_model(config: Config) -> onnx_builder.MLPWeights | None:
    """The model to fine-tune, or None when none is configured or the file is absent."""
    path = config.base_model_path
    if not path:
        return None
    try:
        os.stat(path)
    except FileNotFoundError:
        log.warning("base model %s does not exist: a fresh model (seed %d) takes its place, where no trainer state "
                    "goes on", path, config.seed)
        return None
    except OSError as e:  # there, maybe, but not to this process: never a fresh model in its place
        raise StartupError(f"cannot read base model {path}: {e.strerror or e}") from None
    suffix = Path(path).suffix.lower()
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # weights that are not finite in float32 are refused below
            if suffix in (".pt", ".pth"):
                weights = read_state_dict(path, onnx_builder.parse_activation(config.activation))
            elif suffix == ".npz":
                weights = read_npz(path, onnx_builder.parse_activation(config.activation))
            else:
                weights = onnx_builder.read_mlp_model(checked_onnx(path))
    except onnx_builder.UnsupportedModelError as e:
        raise StartupError(f"base model {path} is not supported: {e}") from None
    except onnx.checker.ValidationError as e:  # what onnxruntime would refuse too: a cycle, an op unknown at its opset
        raise StartupError(f"base model {path} is not a valid ONNX model: {str(e).splitlines()[0]}") from None
    except Exception as e:  # truncated or corrupt files, missing external data, permissions...
        raise StartupError(f"cannot read base model {path}: {type(e).__name__}: {e}") from None
    if weights.sizes()[0] != config.n_features:
        raise StartupError(f"base model {path} takes {weights.sizes()[0]} features but "
                           f"VMAFX_SIDECAR_N_FEATURES is {config.n_features}")
    for i, (w, b) in enumerate(weights.layers):  # a NaN would make every step overflow: it would never train
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise StartupError(f"base model {path}: layer {i} has weights that are not finite in float32 (NaN, "
                               f"infinite, or beyond float32's range)")
    for act in weights.activations:  # as a NaN weight would, a NaN slope makes every step overflow
        if act.kind == "leaky_relu" and not np.isfinite(np.float32(act.alpha)):
            raise StartupError(f"base model {path}: its activation {act} has a slope that is not finite in float32")
    if 0 in weights.sizes():  # its output a constant: it could never learn, and no checkpoint would pass the gate
        raise StartupError(f"base model {path}: a layer of no units ({'-'.join(map(str, weights.sizes()))})")
    return weights


def checked_onnx(path: str) -> onnx.ModelProto:
    model = onnx.load(path)
    onnx.checker.check_model(model)
    return model


def read_npz(path: str, default: Activation) -> onnx_builder.MLPWeights:
    """W0, b0, W1, b1, ... with each W laid out like torch's Linear.weight, (out, in); optional `activation`."""
    with np.load(path, allow_pickle=False) as arrays:
        names = set(arrays.files)
        count = sum(1 for n in names if re.fullmatch(r"W\d+", n))
        expected = {f"{p}{i}" for i in range(count) for p in "Wb"} | {"activation"}
        if not count or names - expected or {f"W{i}" for i in range(count)} - names:
            raise onnx_builder.UnsupportedModelError(
                f"expected arrays W0, b0, W1, b1, ... (and optionally activation), got {', '.join(sorted(names))}")
        bytes_left = MAX_BASE_MODEL_BYTES
        for name in sorted(names):  # each array's size from its header, before numpy allocates it
            bytes_left -= npz_bytes(arrays, name)
            if bytes_left < 0:
                raise onnx_builder.UnsupportedModelError(too_large())
        pairs = [(f"W{i}", arrays[f"W{i}"], arrays[f"b{i}"] if f"b{i}" in names else None) for i in range(count)]
        named = str(arrays["activation"]) if "activation" in names else None
    try:  # as the setting takes it (a bare leaky_relu: torch's slope), which applies only to an .npz without one
        activation = default if named is None else onnx_builder.parse_activation(named)
    except ValueError as e:
        raise onnx_builder.UnsupportedModelError(str(e)) from None
    return linear_layers(pairs, activation)


def npz_bytes(arrays: Any, name: str) -> int:
    """The bytes an .npz's array holds, by its .npy header: np.load allocates that many before it reads."""
    members = {name, name + ".npy"} & set(arrays.zip.namelist())
    if len(members) != 1:  # which of the two numpy loads depends on its version
        raise onnx_builder.UnsupportedModelError(f"it holds both {name} and {name}.npy")
    with arrays.zip.open(members.pop()) as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    if not all(type(n) is int and n >= 0 for n in shape):
        raise onnx_builder.UnsupportedModelError(f"{name} has the shape {shape}")
    return math.prod(shape) * dtype.itemsize


def linear_layers(pairs: list[tuple[str, np.ndarray, np.ndarray | None]], activation: Activation
                  ) -> onnx_builder.MLPWeights:
    """MLPWeights from (name, weight (out, in), bias or None) in order, checking that the layers chain."""
    layers = []
    for name, w, b in pairs:
        for array, label in ((w, name), (b, f"the bias of {name}")):  # not converted: ints, complex (its real part)
            if array is not None and array.dtype.name not in onnx_builder.FLOAT_DTYPES and array.dtype != BFLOAT16:
                raise onnx_builder.UnsupportedModelError(f"{label} holds {array.dtype} values, not floats")
        if w.ndim != 2 or (b is not None and b.shape != (w.shape[0],)):
            raise onnx_builder.UnsupportedModelError(
                f"{name} has shape {w.shape} (bias {None if b is None else b.shape}): not a linear layer")
        if layers and layers[-1][0].shape[1] != w.shape[1]:
            raise onnx_builder.UnsupportedModelError(
                f"{name} takes {w.shape[1]} inputs but the layer before gives {layers[-1][0].shape[1]}")
        bias = np.zeros(w.shape[0], np.float32) if b is None else to_float32(b)
        layers.append((np.ascontiguousarray(to_float32(w).T), bias))
    if layers[-1][0].shape[1] != 1:
        raise onnx_builder.UnsupportedModelError(
            f"{pairs[-1][0]}: the output layer has {layers[-1][0].shape[1]} units, expected 1")
    return onnx_builder.MLPWeights(layers, [activation] * (len(layers) - 1))


# bfloat16 storages are read as their upper 16 bits of a float32, which is exactly what they are.
BFLOAT16 = np.dtype([("bfloat16", "<u2")])
STORAGE_DTYPES = {"FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"),
                  "HalfStorage": np.dtype("<f2"), "BFloat16Storage": BFLOAT16}


def to_float32(array: np.ndarray) -> np.ndarray:
    if array.dtype == BFLOAT16:
        return (array["bfloat16"].astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def read_state_dict(path: str, activation: Activation) -> onnx_builder.MLPWeights:
    """Linear layers, in order, of a state-dict saved by torch.save (its zip format), without torch."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise onnx_builder.UnsupportedModelError("not a torch.save archive (no single */data.pkl)")
        root = pickles[0][:-len("data.pkl")]
        if root + "byteorder" in archive.namelist() and (archive.getinfo(root + "byteorder").file_size > 16
                                                         or archive.read(root + "byteorder") != b"little"):
            raise onnx_builder.UnsupportedModelError("its byteorder is not 'little': big-endian archives are not "
                                                     "supported")
        state = StateDictUnpickler(archive, root).load()
    if not isinstance(state, dict):
        raise onnx_builder.UnsupportedModelError(f"the archive holds a {type(state).__name__}, not a state-dict")
    pairs, used = [], set()
    for key, value in state.items():
        if key.endswith("weight") and getattr(value, "ndim", 0) == 2:
            bias_key = key[:-len("weight")] + "bias"
            pairs.append((key, value, state.get(bias_key)))
            used |= {key, bias_key}
    extra = [k for k in state if k not in used]
    if extra or not pairs:
        raise onnx_builder.UnsupportedModelError(
            f"key {extra[0]!r} is not a linear layer's weight or bias" if extra else "no linear layers found")
    return linear_layers(pairs, activation)


class StateDictUnpickler(pickle.Unpickler):
    """Rebuilds only what a tensor state-dict holds; any other global is refused before it is loaded,
    so a malicious pickle cannot run code. The globals it allows are fresh objects the pickle cannot change
    (Inert), so that no BUILD can alter what the next storage is read with; and what it reads is bounded."""

    def __init__(self, archive: zipfile.ZipFile, root: str):
        if archive.getinfo(root + "data.pkl").file_size > MAX_PICKLE_BYTES:
            raise onnx_builder.UnsupportedModelError(f"its data.pkl is over {MAX_PICKLE_BYTES} bytes: not a state-dict")
        data = archive.read(root + "data.pkl")
        check_pickle_work(data)
        super().__init__(io.BytesIO(data))
        self.archive, self.root = archive, root
        self.bytes_left = MAX_BASE_MODEL_BYTES  # read from storages and copied into tensors, in all

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return TensorRebuild(self)
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(STORAGE_DTYPES[name])
        if module == "torch" and re.fullmatch(r"[A-Za-z0-9]*Storage", name):  # a real state-dict's, of other values
            raise onnx_builder.UnsupportedModelError(f"it holds a tensor of torch.{name} values (a BatchNorm's "
                                                     "num_batches_tracked, say): not weights of an MLP")
        raise onnx_builder.UnsupportedModelError(
            f"the pickle refers to {module}.{name}, which a tensor state-dict never does; refused without running it")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and type(pid[1]) is StorageType
                and type(pid[2]) is str and type(pid[4]) is int and pid[4] >= 0):  # by its type: a repr can be huge
            raise onnx_builder.UnsupportedModelError(f"unexpected persistent id (a {type(pid).__name__})")
        _, storage, key, _, numel = pid
        name, size = f"{self.root}data/{key}", numel * storage.dtype.itemsize
        self.take(size)
        if self.archive.getinfo(name).file_size < size:
            raise onnx_builder.UnsupportedModelError(f"storage {key} is truncated")
        with self.archive.open(name) as f:  # what the tensors use, not the whole of what the member inflates to
            return np.frombuffer(f.read(size), storage.dtype, count=numel)

    def take(self, size: int) -> None:
        self.bytes_left -= size
        if self.bytes_left < 0:
            raise onnx_builder.UnsupportedModelError(too_large())


def check_pickle_work(data: bytes) -> None:
    """Refuse a pickle whose unpickling would take work out of all proportion to its size, before it runs: one of
    over MAX_PICKLE_OPS opcodes, or one that builds a tuple of over MAX_TUPLE_NODES nodes counted whole, a shared
    one as often as it is reached (the unpickler hashes a dict key in time exponential in such sharing). Its stack
    is followed as pickletools describes each opcode's, each item's node count in place of the item."""
    stack: list[int | None] = []  # None for a mark
    memo: dict[int, int | None] = {}
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(data)):
            if count == MAX_PICKLE_OPS:
                raise onnx_builder.UnsupportedModelError(f"its data.pkl runs over {MAX_PICKLE_OPS} opcodes: not a "
                                                         "state-dict")
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if arg is None else arg] = stack[-1]
                continue
            if op.name in ("GET", "BINGET", "LONG_BINGET", "DUP"):
                stack.append(stack[-1] if arg is None else memo[arg])
                continue
            before = op.stack_before
            if pickletools.markobject in before:
                mark = len(stack) - 1 - stack[::-1].index(None)
                taken, first = stack[mark + 1:], mark - before.index(pickletools.markobject)
            else:
                taken, first = stack[len(stack) - len(before):], len(stack) - len(before)
            if first < 0:
                raise IndexError("stack underflow")
            del stack[first:]
            nodes = 1 + sum(taken) if op.name.startswith("TUPLE") else 1  # a TypeError for a mark among them
            if nodes > MAX_TUPLE_NODES:
                raise onnx_builder.UnsupportedModelError(f"its data.pkl builds a tuple of over {MAX_TUPLE_NODES} "
                                                         "items, nested ones counted: not a state-dict")
            stack += [None if item is pickletools.markobject else nodes for item in op.stack_after]
    except onnx_builder.UnsupportedModelError:
        raise
    except (ValueError, IndexError, KeyError, TypeError) as e:  # what the unpickler would misread or refuse too
        raise onnx_builder.UnsupportedModelError(f"its data.pkl is not a pickle it can follow: {e}") from None


class Inert:
    """A global as StateDictUnpickler hands it to the pickle: the BUILD opcode (__setstate__) cannot change it."""
    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise onnx_builder.UnsupportedModelError("the pickle sets the state of a storage type or of the tensor "
                                                 "rebuilder, which a state-dict never does")


class StorageType(Inert):
    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype


class TensorRebuild(Inert):
    __slots__ = ("unpickler",)

    def __init__(self, unpickler: StateDictUnpickler):
        self.unpickler = unpickler

    def __call__(self, storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                 *_: Any) -> np.ndarray:
        """torch._utils._rebuild_tensor_v2: its copy counted, as tensors may share one storage."""
        tensor = rebuild_tensor(storage, offset, size, stride)
        self.unpickler.take(tensor.nbytes)
        return tensor


def rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2, for numpy: a view into the storage, bounds-checked first."""
    # Every number within torch's int64 before any arithmetic: each product of two of 32 Mbit took ~16 s.
    if (type(storage) is not np.ndarray or storage.dtype not in STORAGE_DTYPES.values() or type(size) is not tuple
            or type(stride) is not tuple or len(size) != len(stride)
            or not all(type(n) is int and 0 <= n < 2**63 for n in (offset, *size, *stride))):
        raise onnx_builder.UnsupportedModelError("malformed tensor in the state-dict")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if last >= len(storage):
        raise onnx_builder.UnsupportedModelError("a tensor reaches past the end of its storage")
    if math.prod(size) > len(storage):  # strides that repeat values: a few bytes of file, any size of copy
        raise onnx_builder.UnsupportedModelError(f"a tensor of {math.prod(size)} values repeats the "
                                                 f"{len(storage)} of its storage: not a layer's weights")
    return np.lib.stride_tricks.as_strided(storage[offset:], tuple(size),
                                           tuple(s * storage.itemsize for s in stride)).copy()


# ---- CLI: serve, demo (a server fed a synthetic stream), start_server (for it, the tests, the benchmarks) ----

def serve(config: Config) -> int:
    raise_file_limit(config)
    take_claims(config)
    trainer, source = build_trainer(config)
    state = StateStore(config, trainer)
    if state.restore():  # the base or fresh model was only the starting point of the state resumed
        source = f"resumed from {state.directory}, step {trainer.steps}"
    server = Server(config, trainer, state)
    if config.metrics_addr:  # before the socket: a node never connects to a sidecar that then fails to start
        server.metrics = MetricsEndpoint(server, config.metrics_addr)
        host, port = server.metrics.listener.getsockname()[:2]  # ":9464" is every interface: "::" or "0.0.0.0"
        log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, port)
    server.bind()
    model = trainer.model
    shape = " ".join(["-".join(map(str, model.sizes)), *map(str, model.activations)])
    log.info("serving on %s: model %s (%s) on %s, batch %d (%d new + %d replay), lr %g, replay %d, "
             "checkpoints to %s every %gs and %d samples, next v%06d",
             config.socket, shape, source, trainer.backend.name, config.batch_size, trainer.n_new, trainer.n_replay,
             config.lr, config.replay_capacity, config.checkpoint_dir, config.ckpt_interval_s,
             config.min_samples_ckpt, trainer.checkpoints.version + 1)
    return server.serve_forever()


def build_trainer(config: Config) -> tuple[Trainer, str]:
    """The trainer on its backend, from the base model or a fresh one (which the second value names),
    with the published checkpoint as the incumbent (and champion) its candidates must match."""
    backend = select_backend(config.cuda)
    rng = np.random.default_rng(config.seed)
    base = load_base_model(config)
    source = f"base {config.base_model_path}" if base else f"fresh, seed {config.seed}"
    writer = CheckpointWriter(config.checkpoint_dir, config.keep_checkpoints)
    try:
        activation = onnx_builder.parse_activation(config.activation)
        model = MLP.from_weights(base) if base else MLP.initial([config.n_features, config.hidden, 1], activation, rng)
        trainer = Trainer(config, model.to(backend), writer, rng, fresh=base is None)
    except (MemoryError, ValueError) as e:  # sizes no machine holds ("array is too big"): one line, not a traceback
        raise StartupError(f"cannot allocate the model and its rings of {config.replay_capacity} + "
                           f"{config.eval_capacity} samples of {config.n_features} features (VMAFX_SIDECAR_"
                           f"REPLAY_CAPACITY, _EVAL_CAPACITY, _N_FEATURES, _HIDDEN): {type(e).__name__}: {e}") from None
    if config.normalize == "on" and base and base.normalisation:  # its own standardization of the features
        coords = Coordinates.of_normalisation(*base.normalisation)
        if coords is None or not trainer.move_to(coords):
            log.warning("base model %s: its input normalisation cannot be the training's coordinates; the "
                        "features' statistics come from the first samples", config.base_model_path)
    published = trainer.checkpoints.latest_model()
    if published is not None and published.sizes[0] == config.n_features:
        trainer.incumbent = published.to(backend)
        if (published.sizes, list(map(str, published.activations))) == (model.sizes, list(map(str, model.activations))):
            # the champion until the state names another; a model of other activations cannot hold its weights
            trainer.champion.flat[...] = trainer.incumbent.flat
            trainer.has_champion, trainer.checkpoints.champion_version = True, trainer.checkpoints.incumbent_version()
    elif published is not None:
        log.warning("the latest published checkpoint takes %d features, not %d: candidates are compared with "
                    "the base model instead", published.sizes[0], config.n_features)
    return trainer, source


def demo(directory: str, samples: int) -> int:
    """A real server on a temporary socket, fed a learnable synthetic stream by a client."""
    rng = np.random.default_rng(1)
    n_features = 80
    w_true = rng.normal(0, 1, n_features)
    x = rng.uniform(0, 1, (samples + 500, n_features))
    y = 60 + 30 * np.tanh((x - 0.5) @ w_true / 3)  # a smooth VMAF-like target in (30, 90)
    held_out_x, held_out_y = x[samples:].astype(np.float32), y[samples:]
    with tempfile.TemporaryDirectory() as tmp:
        sock_path = os.path.join(tmp, "demo.sock")
        env = dict(os.environ, VMAFX_SIDECAR_SOCKET=sock_path, VMAFX_SIDECAR_CHECKPOINT_DIR=directory,
                   VMAFX_SIDECAR_N_FEATURES=str(n_features), VMAFX_BASE_MODEL_PATH="",
                   VMAFX_SIDECAR_CKPT_INTERVAL_S="0", VMAFX_SIDECAR_MIN_SAMPLES_CKPT="2000", VMAFX_SIDECAR_LR="0.03",
                   VMAFX_SIDECAR_EMA_DECAY="0.99")
        try:
            server = start_server(env, timeout_s=10.0)
        except ServerNotReady as e:
            raise SystemExit(f"the demo server did not start: {e}") from None
        try:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(sock_path)
            reader = client.makefile("rb")
            client.sendall(b'{"op": "status"}\n')
            resumed = json.loads(reader.readline())
            if resumed["samples_accepted"]:
                print(f"{directory} holds a previous run's state (step {resumed['steps']}, "
                      f"{resumed['samples_accepted']} samples): training resumes from it; delete {directory} "
                      "to start afresh", flush=True)
            for i in range(samples):
                line = json.dumps({"job_id": f"demo-{i}", "features": x[i].tolist(), "true_score": y[i]})
                client.sendall(line.encode() + b"\n")
                ack = json.loads(reader.readline())
                if not ack["ok"]:  # a setting from the environment the demo's stream does not fit, say
                    raise SystemExit(f"the demo server refused a sample: {ack['error']}")
                if ack.get("checkpoint"):
                    mse = held_out_mse(ack["checkpoint"], held_out_x, held_out_y)
                    print(f"step {ack['step']:5d}  loss {ack['loss']:9.3f}  checkpoint {ack['checkpoint']}  "
                          f"held-out MSE {mse:.3f}", flush=True)
            client.close()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=10)
    print(f"held-out MSE of always predicting the mean: {np.var(held_out_y):.3f}")
    return 0


class ServerNotReady(RuntimeError):
    """A server that start_server started exited, or did not answer a ping in time."""


READY_POLL_S = 0.001  # fine-grained, since the benchmarks time the start with it


def start_server(env: dict[str, str], timeout_s: float, stderr: int | io.IOBase | None = None,
                 cwd: Path | None = None, python_args: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """`python [python_args] -m vmafx_sidecar serve` with `env`, returned once the socket that env names
    answers a ping. ServerNotReady if it exits first or `timeout_s` passes; the process is then gone."""
    server = subprocess.Popen([sys.executable, *python_args, "-m", "vmafx_sidecar", "serve"], env=env, cwd=cwd,
                              stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for_pong(server, env.get(feedback.SOCKET_ENV, DEFAULT_SOCKET), timeout_s)
    except BaseException:  # the caller never holds a server that did not start
        server.kill()
        server.wait()
        raise
    return server


def wait_for_pong(server: subprocess.Popen[bytes], path: str, timeout_s: float) -> None:
    """Ping `path` until it answers, `server` exits or `timeout_s` passes. A refused connection, or one
    closed without an answer, is a server not listening yet: the next poll() says whether it died."""
    deadline = time.monotonic() + timeout_s
    while server.poll() is None:
        try:
            answer = feedback.ask(path, b'{"op":"ping"}\n', max(deadline - time.monotonic(), READY_POLL_S))
        except OSError:
            answer = b""
        if answer == feedback.PONG:
            return
        if answer.endswith(b"\n"):
            raise ServerNotReady(f"the server answered a ping on {path} with {answer[:200]!r}")
        if time.monotonic() > deadline:
            raise ServerNotReady(f"the server did not answer a ping on {path} within {timeout_s:g} s")
        time.sleep(READY_POLL_S)
    raise ServerNotReady(f"the server exited with {server.returncode} before {path} answered a ping")


def held_out_mse(checkpoint: str, x: np.ndarray, y: np.ndarray) -> float:
    model = MLP.from_weights(onnx_builder.read_mlp_model(onnx.load(checkpoint)))
    return float(np.mean((model.forward(x)[:, 0] - y) ** 2))


# ---- checkpoint tools: `checkpoints` lists what the sidecar wrote, `verify` checks it ----

def missing_directory(path: Path) -> str:
    return "not a directory" if path.exists() else "no such directory"


def list_checkpoints(directory: Path) -> int:
    """Print every checkpoint in `directory` and its quarantine/ with its history scores and verdict, oldest
    first, then why each quarantined one was refused."""
    if not directory.is_dir():
        print(f"vmafx-sidecar checkpoints: {directory}: {missing_directory(directory)}", file=sys.stderr)
        return 1
    latest = read_record(directory / LATEST)
    rows, reasons = [], []
    for where in (directory, directory / "quarantine"):
        for version in checkpoint_versions(where):
            record = read_record(where / f"model_v{version:06d}.json") or onnx_metadata(where, version)
            if where != directory:
                state = "quarantined"
            elif (where / f"model_v{version:06d}.onnx.sha256").exists():
                state = "published"
            else:  # a kill while it was placed: the next start moves it into quarantine/
                state = "unplaced (no .sha256)"
            if latest and latest["version"] == version and where == directory:
                state += ", latest"
            rows.append([version, record.get("created", "-"), record.get("step", "-"), *listed_scores(record),
                         record.get("gate", "-"), state])
            if "reason" in record and where != directory:  # why it was refused, or that it was rolled back
                refused = record.get("gate") not in PUBLISHED
                reasons.append(f"v{version:06d}: " + (str(record["reason"]) if refused else
                                                      f"{record['gate']}, then moved to quarantine/ (rolled back)"))
    header = ["version", "created", "step", "plcc", "srcc", "rmse", "r2", "eval_n", "gate", "state"]
    table = [header, *([str(cell) for cell in row] for row in sorted(rows, key=lambda row: row[0]))]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for line in reasons:
        print(line)
    return 0


def listed_scores(record: dict[str, Any]) -> list[Any]:
    """A record's candidate PLCC, SRCC, RMSE and R² as the table prints them, then its eval_n: "-" for what it
    lacks or holds in another shape (a record edited by hand, say)."""
    metrics = record["metrics"] if isinstance(record.get("metrics"), dict) else {}
    candidate = metrics["candidate"] if isinstance(metrics.get("candidate"), dict) else {}
    scores = map(candidate.get, ("plcc", "srcc", "rmse", "r2"))
    return [*(f"{v:.4f}" if type(v) in (int, float) else "-" for v in scores), metrics.get("eval_n", "-")]


def onnx_metadata(directory: Path, version: int) -> dict[str, Any]:
    """created and step from the model file itself, for a checkpoint written without a .json record."""
    try:
        props = onnx.load(directory / f"model_v{version:06d}.onnx", load_external_data=False).metadata_props
    except Exception:  # listed anyway; `verify` says what is wrong with it
        return {}
    return {p.key: p.value for p in props if p.key in ("created", "step")}


LATEST_RECHECK_S = 0.2  # a publish's fsyncs between two of its renames take milliseconds


def verify_checkpoints(directory: Path) -> int:
    """Check every checkpoint's .sha256, record and model (onnx checker, then a run), latest.json and
    latest.onnx; 1 if anything is wrong."""
    if not directory.is_dir():
        print(f"vmafx-sidecar verify: {directory}: {missing_directory(directory)}", file=sys.stderr)
        return 1
    results = []
    for where in (directory, directory / "quarantine"):
        names = os.listdir(where) if where == directory or os.path.lexists(where) else []  # as the sidecar would
        for version in sorted({int(m.group(1)) for n in names if (m := CHECKPOINT_NAME.fullmatch(n))}):
            model = where / f"model_v{version:06d}.onnx"
            problems = checkpoint_problems(where, version, published=where == directory)
            if problems:  # a sidecar at work beside this command may have been placing it (.sha256 last)
                time.sleep(LATEST_RECHECK_S)
                problems = checkpoint_problems(where, version, published=where == directory)
            if problems and not (model.exists() or Path(f"{model}.sha256").exists()):
                continue  # gone whole since the listing: its retention deleted it
            results.append((model, problems))
    results += latest_results(directory)
    for path, problems in results:
        print(f"{'FAILED' if problems else 'ok':6}  {path}" + "".join(f"\n        {p}" for p in problems))
    failed = sum(bool(problems) for _, problems in results)
    print(f"{len(results)} files checked, {failed} with problems" if results else "no checkpoints found")
    return 1 if failed else 0


def checkpoint_problems(directory: Path, version: int, published: bool) -> list[str]:
    name = f"model_v{version:06d}.onnx"
    try:
        data = (directory / name).read_bytes()
    except OSError as e:
        return [f"cannot read the model: {e.strerror or e}"]
    problems, digest = [], hashlib.sha256(data).hexdigest()
    try:
        if (directory / f"{name}.sha256").read_text() != f"{digest}  {name}\n":
            problems.append(f"{name}.sha256 does not match the model (its sha256 is {digest})")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"no readable {name}.sha256: {getattr(e, 'strerror', None) or e}")
    record = read_record(directory / f"model_v{version:06d}.json")
    if record and (record["sha256"], record["file"]) != (digest, name):
        problems.append(f"model_v{version:06d}.json names another file or sha256")
    elif record is None and published:  # recover_latest() counts one without it as published while latest.json
        problems.append(f"model_v{version:06d}.json {record_problem(directory / f'model_v{version:06d}.json')}: "
                        f"the sidecar counts this checkpoint as published only while {LATEST} holds its record")
    elif record is None and record_problem(path := directory / f"model_v{version:06d}.json") == RECORD_CORRUPT:
        problems.append(f"{path.name} {RECORD_CORRUPT}")  # quarantined: why it was refused is lost
    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model, full_check=True)
        n_features = onnx_builder.read_mlp_model(model).sizes()[0]
        x = np.random.default_rng(0).uniform(0, 1, (16, n_features)).astype(np.float32)
        (scores,) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x})
    except Exception as e:  # corrupt, truncated or not a model of ours: the check says why
        return [*problems, f"the model does not load and run: {type(e).__name__}: {e}"]
    if scores.shape != (16, 1) or (published and not np.isfinite(scores).all()):
        problems.append(f"the model gives {scores.shape} scores, some not finite" if scores.shape == (16, 1)
                        else f"the model gives scores of shape {scores.shape}, not (16, 1)")
    return problems


def latest_results(directory: Path) -> list[tuple[Path, list[str]]]:
    """latest.json, which a directory with a published checkpoint needs, and latest.onnx, the model nodes load, as
    it names. A sidecar publishing meanwhile replaces latest.onnx, then latest.json (its first publish writes
    latest.json after its checkpoint): a pair that does not match, a latest.json naming an older checkpoint than
    the newest published or none beside a published checkpoint, is read again a moment later, twice, before it
    counts as a problem."""
    for attempt in range(3):
        if attempt:
            time.sleep(LATEST_RECHECK_S)
        latest = read_record(directory / LATEST)
        if latest is None:  # needed once a checkpoint is published; else a stray file, or none
            problem, there = record_problem(directory / LATEST), os.path.lexists(directory / LATEST)
            if not published_versions(directory):
                return [(directory / LATEST, [problem])] if there else []
            results = [(directory / LATEST, [f"{problem}, with checkpoints published"])]
            if there:  # not a state a publish passes through
                break
            continue
        results = [(directory / LATEST, latest_problems(directory, latest)),
                   (directory / LATEST_MODEL, latest_model_problems(directory, latest))]
        if not (results[0][1] or results[1][1]):  # a publish points latest.* after placing its checkpoint
            break
    return results


def published_versions(directory: Path) -> list[int]:
    return [v for v in checkpoint_versions(directory) if (directory / f"model_v{v:06d}.onnx.sha256").exists()]


RECORD_CORRUPT = "is not a valid checkpoint record"


def record_problem(path: Path) -> str:
    """Why read_record(path) gave None, in a few words."""
    if not os.path.lexists(path):
        return "is missing"
    if newer_record_version(path) is not None:
        return "is of a newer format than this version reads"
    return RECORD_CORRUPT


def latest_problems(directory: Path, latest: dict[str, Any]) -> list[str]:
    """Why latest.json (read as `latest`) does not name a published model whole; [] if it does."""
    try:
        read_named_checkpoint(directory, latest)
    except OSError as e:
        return [f"names {latest['file']}, which cannot be read: {e.strerror or e}"]
    except ValueError as e:
        return [str(e)]
    newest = newest_published_record(directory, latest)
    if newest and newest["version"] > latest["version"]:
        return [f"names {latest['file']}, not {newest['file']}, the newest published checkpoint: nodes load an "
                f"older model until the sidecar points latest.json and latest.onnx at it (when it starts)"]
    if newest and newest["version"] == latest["version"] and newest != latest:
        return [f"holds another {', '.join(differing_fields(latest, newest))} than "
                f"model_v{newest['version']:06d}.json, the record of the checkpoint it names (the sidecar writes it "
                f"from the record again when it starts)"]
    return []


# ---- command line ----

def sample_count(text: str) -> int:
    """argparse type: a number of samples, at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of samples, at least 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmafx-sidecar", description=(__doc__ or "").split("\n\n")[0])  # -OO: none
    commands = parser.add_subparsers(dest="command")
    serve_parser = commands.add_parser(
        "serve", help="run the sidecar (the default)",
        description="Run the sidecar. Each flag overrides its environment variable.")
    for f in dataclasses.fields(Config):
        serve_parser.add_argument(f"--{flag_name(f.name)}", dest=f.name, metavar="VALUE",
                                  help=f"{f.metadata['help']} [{f.metadata['env']}, default {f.default!r}]")
    demo_help = ("train on a synthetic stream through a real server, printing each checkpoint with its held-out "
                 "error; a directory a previous demo left is resumed")
    demo_parser = commands.add_parser("demo", help="train on a synthetic stream through a real server",
                                      description=demo_help)
    demo_parser.add_argument("--dir", default="vmafx-demo", help="checkpoint directory (default ./vmafx-demo)")
    demo_parser.add_argument("--samples", type=sample_count, default=20000, help="samples to stream (default 20000)")
    default_dir = os.environ.get("VMAFX_SIDECAR_CHECKPOINT_DIR", Config.checkpoint_dir)
    for name, help in (("checkpoints", "list the checkpoints with their held-out metrics and gate verdicts"),
                       ("verify", "check every checkpoint's sha256, record and model; exit 1 on any problem")):
        command = commands.add_parser(name, help=help, description=help)
        command.add_argument("dir", nargs="?", default=default_dir, type=Path,
                             help="checkpoint directory (default $VMAFX_SIDECAR_CHECKPOINT_DIR or %(default)s)")
    feedback.add_probe_arguments(commands.add_parser("probe", help=feedback.PROBE_HELP,
                                                     description=feedback.PROBE_HELP))
    send_help = "stream samples from CSV or JSON-lines files to a running sidecar (backfill)"
    send = commands.add_parser("send", help=send_help, description=send_help)
    send.add_argument("files", nargs="+", metavar="FILE", type=feedback.input_file,
                      help=f"{', '.join(feedback.INPUT_SUFFIXES)}; - reads JSON lines from stdin")
    send.add_argument("--score-column", default="true_score", help="CSV column of the true score (default %(default)s)")
    send.add_argument("--feature-columns", type=lambda text: text.split(","), metavar="A,B,...",
                      help="CSV feature columns in request order (default: every column but the score and job_id)")
    send.add_argument("--socket", type=feedback.socket_path,
                      default=os.environ.get(feedback.SOCKET_ENV, DEFAULT_SOCKET),
                      help=f"socket path (default ${feedback.SOCKET_ENV} or %(default)s)")
    send.add_argument("--timeout", type=feedback.wait_seconds, default=feedback.SEND_TIMEOUT_S,
                      help="seconds to wait for each answer, then stop as on a lost connection (default %(default)g)")
    fleet_help = ("train ROOT/fleet/ once on the samples every replica in ROOT logged since the last run (exit 0: "
                  f"trained, {FLEET_NOTHING_NEW}: nothing new, 1: failed)")
    fleet_parser = commands.add_parser("fleet", help=fleet_help, description=fleet_help)
    fleet_parser.add_argument("root", type=Path, help="the directory holding the replicas' checkpoint directories")
    fleet_parser.add_argument("--status", action="store_true",
                              help="print each replica's lag and the samples missing from its log, and train nothing")
    status_help = "print the sidecar's status as a table"
    status = feedback.add_probe_arguments(commands.add_parser("status", help=status_help, description=status_help))
    status.add_argument("--json", action="store_true", help="print the answer to {\"op\": \"status\"} as it came")
    return parser


def log_handler() -> logging.Handler:
    """Log lines to stderr, their times in UTC as the sidecar's records and file names are (a pod's TZ had them
    hours apart, and going back at a change from summer time)."""
    formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    return handler


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):  # a file name, column or path not in UTF-8: escaped, not a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    logging.basicConfig(handlers=[log_handler()])
    try:
        status = run_command(args)
        sys.stdout.flush()  # here, not at exit: a reader gone by then is the same broken pipe
    except BrokenPipeError:
        if not has_lost_its_reader(sys.stdout):  # a socket's, say the demo's server gone: an error of its own
            raise
        # `vmafx-sidecar status | head`: the reader has taken what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's own flush is quiet
        return 1
    return status


def has_lost_its_reader(stream: io.TextIOBase) -> bool:
    """Whether `stream` is a pipe or socket whose reader has gone: poll() reports an error on its descriptor."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
    except (OSError, ValueError):  # no descriptor (a test's capture, a closed stream)
        return False
    return any(events & select.POLLERR for _, events in poller.poll(0))


def run_command(args: argparse.Namespace) -> int:
    if args.command == "demo":
        log.setLevel(logging.INFO)
        return demo(args.dir, args.samples)
    if args.command == "probe":
        return feedback.probe(args.socket, args.timeout)
    if args.command in ("checkpoints", "verify"):
        try:
            return (list_checkpoints if args.command == "checkpoints" else verify_checkpoints)(args.dir)
        except BrokenPipeError:
            raise
        except OSError as e:  # a directory this process may not read, a quarantine/ that is a file
            print(f"vmafx-sidecar {args.command}: {e.filename or args.dir}: {e.strerror or e}", file=sys.stderr)
            return 1
    if args.command == "send":
        return feedback.send_files(args.files, args.socket, args.score_column, args.feature_columns, args.timeout)
    if args.command == "status":
        return feedback.show_status(args.socket, args.timeout, args.json)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                 if getattr(args, f.name, None) is not None}
    try:
        config = Config.load(dict(os.environ), overrides)
    except ConfigError as e:
        print(f"vmafx-sidecar: invalid setting: {e}", file=sys.stderr)
        return 2
    log.setLevel(config.log_level.upper())
    warn_unknown_settings(dict(os.environ))
    warn_of_a_path_nodes_cannot_read(config)
    # As its container's PID 1 the sidecar gets only the signals it handles: a SIGTERM during a start (a journal's
    # replay, an adoption's minute) was dropped, and the pod killed at the end of its grace period.
    training = not (args.command == "fleet" and args.status)  # fleet --status only reads
    handlers = {signum: signal.signal(signum, stop_by_signal) for signum in (signal.SIGTERM, signal.SIGINT)
                if training}
    try:
        if args.command == "fleet":
            if not args.root.is_dir():  # a mistyped ROOT is no fleet with nothing new
                raise StartupError(f"fleet: {args.root} is not a directory")
            return fleet_status(args.root, config.n_features) if args.status else fleet(args.root, config)
        return serve(config)
    except StartupError as e:
        log.error("%s", e)
        return 1
    except Stopped as e:
        log.warning("stopped by %s before %s: the next %s goes on from what is on disk", e,
                    *(("the end of the run", "run") if args.command == "fleet" else ("serving", "start")))
        return 1 if args.command == "fleet" else 0
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
