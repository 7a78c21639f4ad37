"""The protocol against a real Go client: tests/go_node, built with Go's encoding/json and bufio as vmafx-node's
client is, sends what such a node sends (float32 features in Go's shortest form, job_ids Go escapes its own way,
one struct for samples and ops, pipelined and concurrent connections) and decodes every ACK strictly into the
README's fields, the status answer into int64s and pointers, and latest.json. Needs Go (Debian: golang-go)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import Sidecar, system_program

GO_NODE = Path(__file__).parent / "go_node"
SEQUENTIAL, PIPELINED, CONCURRENT = 300, 1000, 8 * 50  # the jobs each part of go_node's run sends


@pytest.fixture(scope="module")
def go_node(tmp_path_factory) -> str:
    go = system_program("go", "golang-go")
    binary = tmp_path_factory.mktemp("go") / "go_node"
    # Offline, with the Go that is installed, and no C compiler needed.
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
    if not any(env.get(name) for name in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = str(tmp_path_factory.mktemp("gocache"))
    built = subprocess.run([go, "build", "-o", str(binary), "."], cwd=GO_NODE, env=env, capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    return str(binary)


@pytest.fixture(scope="module")
def report(go_node, tmp_path_factory) -> dict:
    """One go_node run against a sidecar that checkpoints after 256 samples, every checkpoint published."""
    sidecar = Sidecar(tmp_path_factory.mktemp("sidecar"), {"VMAFX_SIDECAR_MIN_SAMPLES_CKPT": "256",
                                                           "VMAFX_SIDECAR_CKPT_INTERVAL_S": "0",
                                                           "VMAFX_SIDECAR_GATE": "off"}).start()
    try:
        run = subprocess.run([go_node, sidecar.socket], capture_output=True, text=True, timeout=300)
    finally:
        sidecar.cleanup()
    assert run.returncode == 0, f"{run.stderr}\n{sidecar.stderr()}"
    return json.loads(run.stdout)


def test_sequential_jobs_get_one_ack_each_with_the_documented_fields(report):
    facts = report["sequential"]
    assert (facts["sent"], facts["ok"], facts["errors"]) == (SEQUENTIAL, SEQUENTIAL, None)
    assert facts["trained"] == SEQUENTIAL // 16  # a step for every 16 new samples: batch 32, half of it replay
    assert facts["fields_present"], "ok, step, trained and job_id in every ACK: a missing one decodes to 0 or false"
    assert facts["loss_iff_trained"] and facts["steps_in_order"] and facts["job_ids_echoed"]
    assert facts["checkpoints"], "a checkpoint after 256 samples, named in its ACK"


def test_float32_values_in_gos_own_form_are_accepted(report):
    refused = [(v["name"], v["written"], v["error"]) for v in report["values"] if not v["ok"]]
    assert not refused
    assert {v["written"] for v in report["values"]} >= {"3.4028235e+38", "1e-45", "-0"}


def test_job_ids_come_back_as_go_sent_them(report):
    """Go escapes <, >, &, U+2028 and U+2029 and writes other non-ASCII as UTF-8; the sidecar answers in ASCII
    escapes, surrogate pairs included. The longest ACK passes a default bufio.Scanner's 64 KiB."""
    assert all(fact["ok"] and fact["echoed"] for fact in report["job_ids"]), report["job_ids"]
    assert max(fact["length"] for fact in report["job_ids"]) == 65535


def test_a_malformed_sample_gets_an_error_a_go_client_decodes(report):
    rejected = report["rejected"]
    assert (rejected["ok"], rejected["job_id"]) == (False, "short")
    assert rejected["error"] == "features: expected 80 numbers, got 79"


def test_one_struct_for_samples_and_ops(report):
    """An unset Op goes out as "" (a string field) or null (a pointer): each is a sample, not an unknown op."""
    unified = report["unified"]
    assert unified["empty_op"]["ok"] and unified["null_op"]["ok"]
    assert unified["empty_op"]["step"] > 0 and unified["null_op"]["step"] > 0  # ACKs without a job_id have one too
    assert unified["ping"] == {**unified["ping"], "ok": True, "op": "pong"}


def test_pipelined_and_concurrent_connections(report):
    assert report["pipelined"] == {"sent": PIPELINED, "ok": PIPELINED, "in_order": True}
    assert report["concurrent_ok"] == CONCURRENT


def test_status_decodes_into_int64s_and_pointers(report):
    """Counted in the status as the ACKs said: every sample that got ok, and the one malformed line."""
    facts = report["status"]
    status, oks = facts["status"], SEQUENTIAL + len(report["values"]) + len(report["job_ids"]) + 2 + PIPELINED \
        + CONCURRENT  # the 2: the unified samples
    assert (status["samples_accepted"], status["samples_rejected"]) == (oks, 1)
    assert status["checkpoint_version"] == status["gate"]["version"] == report["latest"]["record"]["version"]
    assert status["last_loss"] is not None and status["backend"] == "numpy"
    assert facts["config_not_int64"] is None, "every integer setting is read as an int64"


def test_latest_json_names_the_file_latest_onnx_copies(report):
    latest = report["latest"]
    assert latest["file_matches"] and latest["latest_onnx_matches"], latest
