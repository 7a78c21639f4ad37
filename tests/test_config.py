"""Settings: env vars and flags, their validation, precedence, --help, and startup warnings."""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import vmafx_sidecar
from conftest import ROOT, Client, sample

FIELDS = dataclasses.fields(vmafx_sidecar.Config)
ENV_NAMES = [f.metadata["env"] for f in FIELDS]


@pytest.fixture
def short_dir():
    # AF_UNIX paths are limited to ~107 bytes and parametrized tmp_paths get long.
    d = tempfile.mkdtemp(prefix="vxc")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def clean_env(directory: Path, **variables: str) -> dict[str, str]:
    """PATH, PYTHONPATH and the variables under test. The socket and checkpoint dir point into a
    private directory so that a value wrongly accepted cannot touch the real default paths."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "VMAFX_SIDECAR_SOCKET": str(directory / "s.sock"),
        "VMAFX_SIDECAR_CHECKPOINT_DIR": str(directory / "ckpt"),
        "VMAFX_BASE_MODEL_PATH": "",
        **variables,
    }


def run_serve(directory: Path, args: list[str] = (), **variables: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmafx_sidecar", "serve", *args],
                          env=clean_env(directory, **variables), cwd=directory,
                          capture_output=True, text=True, timeout=20)


def assert_rejected(done: subprocess.CompletedProcess, directory: Path, *names: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    for name in names:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", lines[0]), (name, lines[0])
    assert not (directory / "s.sock").exists()
    assert not (directory / "ckpt").exists()
    return lines[0]


# ---- invalid values: exit 2, one line naming the variable ----

INVALID = [
    # (variables, the variable the message must name, the bad value)
    ({"VMAFX_SIDECAR_BATCH_SIZE": "abc"}, "VMAFX_SIDECAR_BATCH_SIZE", "abc"),
    ({"VMAFX_SIDECAR_LR": "fast"}, "VMAFX_SIDECAR_LR", "fast"),
    ({"VMAFX_SIDECAR_LR": "nan"}, "VMAFX_SIDECAR_LR", "nan"),
    ({"VMAFX_SIDECAR_LR": "inf"}, "VMAFX_SIDECAR_LR", "inf"),
    ({"VMAFX_SIDECAR_BATCH_SIZE": "0"}, "VMAFX_SIDECAR_BATCH_SIZE", "0"),
    ({"VMAFX_SIDECAR_BATCH_SIZE": "-1"}, "VMAFX_SIDECAR_BATCH_SIZE", "-1"),
    ({"VMAFX_SIDECAR_BATCH_SIZE": "1.5"}, "VMAFX_SIDECAR_BATCH_SIZE", "1.5"),
    ({"VMAFX_SIDECAR_REPLAY_MIX": "-0.1"}, "VMAFX_SIDECAR_REPLAY_MIX", "-0.1"),
    ({"VMAFX_SIDECAR_REPLAY_MIX": "1.0"}, "VMAFX_SIDECAR_REPLAY_MIX", "1.0"),
    ({"VMAFX_SIDECAR_REPLAY_CAPACITY": "8", "VMAFX_SIDECAR_BATCH_SIZE": "32"},
     "VMAFX_SIDECAR_REPLAY_CAPACITY", "8"),
    ({"VMAFX_SIDECAR_LR": "0"}, "VMAFX_SIDECAR_LR", "0"),
    ({"VMAFX_SIDECAR_LR": "-1"}, "VMAFX_SIDECAR_LR", "-1"),
    ({"VMAFX_SIDECAR_EMA_DECAY": "1.0"}, "VMAFX_SIDECAR_EMA_DECAY", "1.0"),
    ({"VMAFX_SIDECAR_EMA_DECAY": "-0.5"}, "VMAFX_SIDECAR_EMA_DECAY", "-0.5"),
    ({"VMAFX_SIDECAR_N_FEATURES": "0"}, "VMAFX_SIDECAR_N_FEATURES", "0"),
    ({"VMAFX_SIDECAR_CKPT_INTERVAL_S": "-1"}, "VMAFX_SIDECAR_CKPT_INTERVAL_S", "-1"),
    ({"VMAFX_SIDECAR_MIN_SAMPLES_CKPT": "-5"}, "VMAFX_SIDECAR_MIN_SAMPLES_CKPT", "-5"),
    ({"VMAFX_SIDECAR_HIDDEN": "0"}, "VMAFX_SIDECAR_HIDDEN", "0"),
    ({"VMAFX_SIDECAR_LOG_LEVEL": "loud"}, "VMAFX_SIDECAR_LOG_LEVEL", "loud"),
    ({"VMAFX_SIDECAR_CUDA": "2"}, "VMAFX_SIDECAR_CUDA", "2"),
    ({"VMAFX_SIDECAR_HOLDOUT_FRACTION": "1"}, "VMAFX_SIDECAR_HOLDOUT_FRACTION", "1"),
    ({"VMAFX_SIDECAR_EVAL_CAPACITY": "0"}, "VMAFX_SIDECAR_EVAL_CAPACITY", "0"),
    ({"VMAFX_SIDECAR_GATE": "maybe"}, "VMAFX_SIDECAR_GATE", "maybe"),
    ({"VMAFX_SIDECAR_GATE_MAX_PLCC_DROP": "-0.01"}, "VMAFX_SIDECAR_GATE_MAX_PLCC_DROP", "-0.01"),
    ({"VMAFX_SIDECAR_GATE_MIN_EVAL": "1"}, "VMAFX_SIDECAR_GATE_MIN_EVAL", "1"),
    ({"VMAFX_SIDECAR_GATE_MIN_EVAL": "300", "VMAFX_SIDECAR_EVAL_CAPACITY": "299"},
     "VMAFX_SIDECAR_GATE_MIN_EVAL", "300"),
    ({"VMAFX_SIDECAR_KEEP_CHECKPOINTS": "-1"}, "VMAFX_SIDECAR_KEEP_CHECKPOINTS", "-1"),
    ({"VMAFX_SIDECAR_CHECKPOINT_DIR": ""}, "VMAFX_SIDECAR_CHECKPOINT_DIR", "''"),  # not the working directory
    ({"VMAFX_SIDECAR_SOCKET": " "}, "VMAFX_SIDECAR_SOCKET", "' '"),
    # A YAML block's last newline: checkpoints went to "online\n", and a base model read as missing became a fresh one.
    ({"VMAFX_SIDECAR_CHECKPOINT_DIR": "online\n"}, "VMAFX_SIDECAR_CHECKPOINT_DIR", "'online\\n'"),
    ({"VMAFX_BASE_MODEL_PATH": "base.onnx\n"}, "VMAFX_BASE_MODEL_PATH", "'base.onnx\\n'"),
    ({"VMAFX_SIDECAR_SOCKET": " s.sock"}, "VMAFX_SIDECAR_SOCKET", "' s.sock'"),
    # Past a Unix socket's 107 bytes: it failed only at the bind, after the claims and the journal's replay.
    ({"VMAFX_SIDECAR_SOCKET": "/tmp/" + "s" * 98 + ".sock"}, "VMAFX_SIDECAR_SOCKET", "s" * 98),
    ({"VMAFX_SIDECAR_ADOPT_DIR": "old "}, "VMAFX_SIDECAR_ADOPT_DIR", "'old '"),
    # The status shows every setting, and a Go node reads an integer as an int64.
    ({"VMAFX_SIDECAR_SEED": str(2**64)}, "VMAFX_SIDECAR_SEED", str(2**64)),
]


@pytest.mark.parametrize("variables, name, value", INVALID,
                         ids=["-".join(f"{k.removeprefix('VMAFX_SIDECAR_')}={v}" for k, v in c[0].items())
                              for c in INVALID])
def test_invalid_env_value_exits_2_naming_the_variable(short_dir, variables, name, value):
    line = assert_rejected(run_serve(short_dir, **variables), short_dir, name)
    assert value in line, line


def test_a_socket_path_of_107_bytes_is_the_longest_taken():
    longest = "/tmp/" + "s" * 97 + ".sock"
    assert vmafx_sidecar.Config.load({"VMAFX_SIDECAR_SOCKET": longest}, {}).socket == longest
    with pytest.raises(vmafx_sidecar.ConfigError, match="at most 107 bytes"):
        vmafx_sidecar.Config.load({"VMAFX_SIDECAR_SOCKET": "/tmp/" + "é" * 49 + ".sock"}, {})  # 108 bytes, 59 chars


@pytest.mark.parametrize("flag, value, env, valid_env_value", [
    ("--batch-size", "0", "VMAFX_SIDECAR_BATCH_SIZE", "16"),
    ("--lr", "nan", "VMAFX_SIDECAR_LR", "0.5"),
    ("--replay-mix", "1", "VMAFX_SIDECAR_REPLAY_MIX", "0.25"),
    ("--log-level", "loud", "VMAFX_SIDECAR_LOG_LEVEL", "info"),
])
def test_invalid_flag_value_exits_2_naming_variable_and_flag(short_dir, flag, value, env, valid_env_value):
    # A valid env value must not hide the flag's invalid one.
    done = run_serve(short_dir, [flag, value], **{env: valid_env_value})
    assert_rejected(done, short_dir, env, flag)


@pytest.mark.parametrize("capacity", [10**15, 10**17], ids=["no memory for it", "past numpy's size limit"])
def test_rings_no_machine_holds_stop_the_start_in_one_line(short_dir, capacity):
    done = run_serve(short_dir, VMAFX_SIDECAR_REPLAY_CAPACITY=str(capacity))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot allocate the model and its rings of {capacity} + 2000 samples of 80 features" in done.stderr


@pytest.mark.parametrize("variables, message", [
    ({"VMAFX_SIDECAR_JOURNAL_FSYNC": "weekly"}, "VMAFX_SIDECAR_JOURNAL_FSYNC: must be one of always, everysec, no, "
                                                "got 'weekly'"),
    ({"VMAFX_SIDECAR_LR": "fast"}, "VMAFX_SIDECAR_LR: must be a number > 0, got 'fast'"),
    ({"VMAFX_SIDECAR_BATCH_SIZE": "0"}, "VMAFX_SIDECAR_BATCH_SIZE: must be an integer >= 1, got '0'"),
])
def test_invalid_value_message_reads_as_a_sentence(short_dir, variables, message):
    assert assert_rejected(run_serve(short_dir, **variables), short_dir).endswith(message)


# ---- Config.load in-process: precedence and parsed types ----

def test_a_retired_setting_fails_loudly_naming_what_replaces_it(monkeypatch, capsys):
    monkeypatch.setitem(vmafx_sidecar.RETIRED_SETTINGS, "VMAFX_SIDECAR_OLD_NAME", "set VMAFX_SIDECAR_NEW_NAME instead")
    with pytest.raises(vmafx_sidecar.ConfigError, match="VMAFX_SIDECAR_OLD_NAME: no longer read by this version; set "
                                             "VMAFX_SIDECAR_NEW_NAME instead"):
        vmafx_sidecar.Config.load({"VMAFX_SIDECAR_OLD_NAME": "1"}, {})
    monkeypatch.setenv("VMAFX_SIDECAR_OLD_NAME", "1")
    assert vmafx_sidecar.main(["serve"]) == 2  # before anything is claimed or read
    assert "VMAFX_SIDECAR_NEW_NAME" in capsys.readouterr().err


def test_a_checkpoint_directory_not_in_utf8_is_warned_about(caplog):
    """Go nodes read a checkpoint's path from ACKs and latest.json as JSON, with U+FFFD for bytes not UTF-8."""
    caplog.set_level(logging.WARNING)
    latin1 = vmafx_sidecar.Config.load({"VMAFX_SIDECAR_CHECKPOINT_DIR": os.fsdecode(b"/mnt/models/caf\xe9")}, {})
    vmafx_sidecar.warn_of_a_path_nodes_cannot_read(latin1)
    assert "VMAFX_SIDECAR_CHECKPOINT_DIR '/mnt/models/caf\\udce9' is not UTF-8" in caplog.text
    caplog.clear()
    vmafx_sidecar.warn_of_a_path_nodes_cannot_read(vmafx_sidecar.Config(checkpoint_dir="/mnt/models/café"))
    assert not caplog.text


def test_load_with_nothing_set_gives_the_defaults():
    assert vmafx_sidecar.Config.load({}, {}) == vmafx_sidecar.Config()


def test_load_parses_env_values_to_the_setting_types():
    config = vmafx_sidecar.Config.load({
        "VMAFX_SIDECAR_BATCH_SIZE": "8",
        "VMAFX_SIDECAR_LR": "1",  # an integer literal for a float setting
        "VMAFX_SIDECAR_REPLAY_MIX": "0.25",
        "VMAFX_SIDECAR_LOG_LEVEL": "debug",
        "VMAFX_SIDECAR_SOCKET": "/run/x.sock",
        "UNRELATED": "ignored",
    }, {})
    assert config.batch_size == 8 and type(config.batch_size) is int
    assert config.lr == 1.0 and type(config.lr) is float
    assert config.replay_mix == 0.25 and type(config.replay_mix) is float
    assert config.log_level == "debug"
    assert config.socket == "/run/x.sock"
    assert config.hidden == 64  # untouched settings keep their defaults


@pytest.mark.parametrize("field", FIELDS, ids=[f.name for f in FIELDS])
def test_every_default_written_as_text_parses_back_to_itself(field):
    text = str(field.default)
    from_env = vmafx_sidecar.Config.load({field.metadata["env"]: text}, {})
    from_flag = vmafx_sidecar.Config.load({}, {field.name: text})
    assert getattr(from_env, field.name) == field.default
    assert getattr(from_flag, field.name) == field.default
    assert type(getattr(from_env, field.name)) is type(field.default)


def test_flag_overrides_env():
    config = vmafx_sidecar.Config.load({"VMAFX_SIDECAR_BATCH_SIZE": "16", "VMAFX_SIDECAR_LR": "0.5"},
                                       {"batch_size": "8"})
    assert config.batch_size == 8
    assert config.lr == 0.5


def test_flag_overrides_an_invalid_env_value():
    config = vmafx_sidecar.Config.load({"VMAFX_SIDECAR_BATCH_SIZE": "0"}, {"batch_size": "8"})
    assert config.batch_size == 8


def test_invalid_flag_is_rejected_even_with_a_valid_env_value():
    with pytest.raises(vmafx_sidecar.ConfigError, match=r"VMAFX_SIDECAR_BATCH_SIZE \(--batch-size\)"):
        vmafx_sidecar.Config.load({"VMAFX_SIDECAR_BATCH_SIZE": "16"}, {"batch_size": "0"})


@pytest.mark.parametrize("environ, overrides", [
    ({"VMAFX_SIDECAR_REPLAY_CAPACITY": "8"}, {}),
    ({}, {"replay_capacity": "8"}),
    ({"VMAFX_SIDECAR_REPLAY_CAPACITY": "63"}, {"batch_size": "64"}),
])
def test_replay_capacity_below_batch_size_is_rejected(environ, overrides):
    with pytest.raises(vmafx_sidecar.ConfigError, match="VMAFX_SIDECAR_REPLAY_CAPACITY"):
        vmafx_sidecar.Config.load(environ, overrides)


@pytest.mark.parametrize("n_features, limit, ok", [(80, 188, False), (80, 189, True), (1, 30, False), (1, 31, True),
                                                    (4, 16, False)])
def test_a_line_limit_below_the_shortest_sample_line_is_rejected(n_features, limit, ok):
    """A limit no sample fits in refuses every sample, and the probes' pings below ~15 bytes: a pod never ready."""
    shortest = b'{"features":[' + b",".join([b"0"] * n_features) + b'],"true_score":0}'
    environ = {"VMAFX_SIDECAR_N_FEATURES": str(n_features), "VMAFX_SIDECAR_MAX_LINE_BYTES": str(limit)}
    if ok:
        assert vmafx_sidecar.Config.load(environ, {}).max_line_bytes == limit == len(shortest)
        assert type(vmafx_sidecar.parse_request(shortest, n_features)) is vmafx_sidecar.Sample
    else:
        with pytest.raises(vmafx_sidecar.ConfigError, match=rf"MAX_LINE_BYTES: must be >= {len(shortest)}, the "
                                                            rf"shortest sample line .* got {limit}$"):
            vmafx_sidecar.Config.load(environ, {})


@pytest.mark.parametrize("capacity, ok", [(4, False), (5, True)])
def test_an_eval_capacity_below_the_samples_a_set_is_judged_on_is_rejected_with_the_gate_on(capacity, ok):
    environ = {"VMAFX_SIDECAR_EVAL_CAPACITY": str(capacity), "VMAFX_SIDECAR_GATE_MIN_EVAL": "2"}
    if ok:
        config = vmafx_sidecar.Config.load(environ, {})
        assert vmafx_sidecar.judged_size(config) <= config.eval_capacity
    else:
        with pytest.raises(vmafx_sidecar.ConfigError, match=f"EVAL_CAPACITY: must be >= 5 .* got {capacity}$"):
            vmafx_sidecar.Config.load(environ, {})
    assert vmafx_sidecar.Config.load({**environ, "VMAFX_SIDECAR_GATE": "off"}, {}).eval_capacity == capacity


def test_gate_min_eval_above_eval_capacity_is_accepted_with_the_gate_off():
    config = vmafx_sidecar.Config.load({"VMAFX_SIDECAR_GATE": "off", "VMAFX_SIDECAR_EVAL_CAPACITY": "10"}, {})
    assert config.gate_min_eval > config.eval_capacity


def test_replay_capacity_equal_to_batch_size_is_accepted():
    config = vmafx_sidecar.Config.load({"VMAFX_SIDECAR_REPLAY_CAPACITY": "64"}, {"batch_size": "64"})
    assert config.replay_capacity == config.batch_size == 64


def test_flag_overrides_invalid_env_in_a_real_server(short_dir):
    env = clean_env(short_dir, VMAFX_SIDECAR_BATCH_SIZE="0")
    proc = subprocess.Popen([sys.executable, "-m", "vmafx_sidecar", "serve", "--batch-size", "8"],
                            env=env, cwd=short_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}: {proc.stderr.read().decode()}")
            try:
                client = Client(env["VMAFX_SIDECAR_SOCKET"])
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.02)
        try:
            status = client.request({"op": "status"})
            assert status["config"]["batch_size"] == 8
            # 8 new-or-replay per step, replay_mix 0.5: 4 new samples make a step.
            rng = np.random.default_rng(0)
            acks = [client.request(sample(rng)) for _ in range(4)]
            assert [a["trained"] for a in acks] == [False, False, False, True]
        finally:
            client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()


# ---- --help ----

def test_help_lists_every_variable_and_its_default(short_dir):
    done = subprocess.run([sys.executable, "-m", "vmafx_sidecar", "serve", "--help"],
                          env=clean_env(short_dir), cwd=short_dir, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    # argparse wraps lines, even inside paths at hyphens: compare with all whitespace removed.
    text = re.sub(r"\s+", "", done.stdout)
    for f in FIELDS:
        env, flag = f.metadata["env"], "--" + f.name.replace("_", "-")
        assert re.search(rf"(?<![\w-]){re.escape(flag)} VALUE", done.stdout), flag
        listed = [f"{env},default{f.default!r}", f"{env},default{f.default}"]
        assert any(item.replace(" ", "") in text for item in listed), (env, f.default, done.stdout)


def test_help_names_every_kind_of_base_model_and_demo_has_a_description(short_dir):
    def help_of(command: str) -> str:
        done = subprocess.run([sys.executable, "-m", "vmafx_sidecar", command, "--help"], env=clean_env(short_dir),
                              cwd=short_dir, capture_output=True, text=True, timeout=20)
        assert done.returncode == 0, done.stderr
        return re.sub(r"\s+", " ", done.stdout)

    assert all(kind in help_of("serve") for kind in ("ONNX", ".pt", ".pth", ".npz"))
    assert "printing each checkpoint with its held-out error" in help_of("demo")


def test_the_commands_run_with_docstrings_stripped(short_dir):
    """PYTHONOPTIMIZE=2, an image-wide setting, strips docstrings: every command but the probe crashed building its
    parser from the module's (the container hunt)."""
    done = subprocess.run([sys.executable, "-OO", "-m", "vmafx_sidecar", "checkpoints", str(short_dir)],
                          env=clean_env(short_dir), cwd=short_dir, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("samples", ["0", "-1", "-600", "many"])
def test_demo_refuses_a_sample_count_below_one_in_one_line(short_dir, samples):
    done = subprocess.run([sys.executable, "-m", "vmafx_sidecar", "demo", "--samples", samples],
                          env=clean_env(short_dir), cwd=short_dir, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"argument --samples: {samples!r}: expected a whole number of samples, at least 1" in done.stderr


def test_demo_streams_its_own_feature_count_whatever_the_environment_says(short_dir):
    done = subprocess.run([sys.executable, "-m", "vmafx_sidecar", "demo", "--samples", "50"],
                          env=clean_env(short_dir, VMAFX_SIDECAR_N_FEATURES="10"), cwd=short_dir,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "(50 samples accepted, 0 rejected)" in done.stderr  # its server's last line


def test_demo_stops_with_the_error_of_a_sample_its_server_refuses(short_dir):
    done = subprocess.run([sys.executable, "-m", "vmafx_sidecar", "demo", "--samples", "50"],
                          env=clean_env(short_dir, VMAFX_SIDECAR_MAX_LINE_BYTES="300"), cwd=short_dir,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "the demo server refused a sample: line too long (limit 300 bytes)" in done.stderr


def test_demo_run_twice_says_it_resumes_the_first_runs_state(short_dir):
    def demo() -> str:
        done = subprocess.run([sys.executable, "-m", "vmafx_sidecar", "demo", "--samples", "200"],
                              env=clean_env(short_dir), cwd=short_dir, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "previous run" not in demo()
    again = demo()
    assert "vmafx-demo holds a previous run's state" in again and "delete vmafx-demo to start afresh" in again, again


# ---- warnings at startup ----

def test_unknown_setting_is_warned_about_and_ignored(sidecar_factory):
    s = sidecar_factory(VMAFX_SIDECAR_BATCH_SIZ="8")
    named = [line for line in s.stderr().splitlines() if re.search(r"\bVMAFX_SIDECAR_BATCH_SIZ\b", line)]
    assert len(named) == 1 and "WARNING" in named[0], s.stderr()
    status = s.client().request({"op": "status"})
    assert status["config"]["batch_size"] == 32


def test_known_settings_are_not_warned_about(sidecar_factory):
    s = sidecar_factory(VMAFX_SIDECAR_BATCH_SIZE="8", VMAFX_SIDECAR_LR="0.001")
    assert "WARNING" not in s.stderr(), s.stderr()


def test_cuda_1_starts_on_numpy_with_a_warning(sidecar_factory):
    s = sidecar_factory(VMAFX_SIDECAR_CUDA="1")
    warnings = [line for line in s.stderr().splitlines() if "WARNING" in line and "CuPy cannot run" in line]
    assert len(warnings) == 1, s.stderr()
    status = s.client().request({"op": "status"})
    assert status["backend"] == "numpy"
    assert status["config"]["cuda"] == "1"
