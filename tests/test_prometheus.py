"""End to end with a real Prometheus (Debian package prometheus): it scrapes a real sidecar and a producer's
counters on loopback, loads the chart's rules, and through its HTTP API every metric the dashboard and the
rules use exists with the labels they select by, and a quarantined candidate's alert is pending or firing."""
from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

import vmafx_feedback
from conftest import ROOT, sample, system_program
from test_alerts import JOB, NAMESPACE, POD, rule_groups
from test_dashboard import dashboard_queries, metric_names
from test_faults import wait_for
from test_metrics import free_port

N_FEATURES = 8
SETTINGS = dict(VMAFX_SIDECAR_N_FEATURES=str(N_FEATURES), VMAFX_SIDECAR_HIDDEN="8", VMAFX_SIDECAR_BATCH_SIZE="8",
                VMAFX_SIDECAR_CKPT_INTERVAL_S="0", VMAFX_SIDECAR_MIN_SAMPLES_CKPT="40",
                VMAFX_SIDECAR_HOLDOUT_FRACTION="0.25", VMAFX_SIDECAR_SAMPLE_LOG="1")
# The labels the rules and the dashboard select by, as a ServiceMonitor's scrape would attach them.
TARGET_LABELS = {"namespace": NAMESPACE, "pod": POD}
# Labelled families and the label values the stream below must have produced, at least.
EXPECTED_LABELS = {
    "vmafx_sidecar_samples_total": ("result", {"accepted", "held_out", "rejected"}),
    "vmafx_sidecar_rejected_total": ("reason", {"invalid_json", "features"}),
    "vmafx_sidecar_checkpoints_total": ("result", {"published", "quarantined", "failed"}),
    "vmafx_sidecar_write_failures_total": ("kind", {"journal", "snapshot", "sample_log", "checkpoint"}),
    "vmafx_sidecar_window_plcc": ("model", {"candidate", "incumbent", "champion"}),
    "vmafx_sidecar_gate_plcc": ("set", {"window", "history"}),
}
SCRAPE_S = 1


class ProducerCounters(http.server.BaseHTTPRequestHandler):
    """A producer's /metrics (vmafx_feedback's counters, as vmafx-node exports its own)."""
    client: vmafx_feedback.FeedbackClient

    def do_GET(self) -> None:
        body = self.client.metrics_text().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def api(port: int, path: str, **params: str) -> object:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer["data"]


def prepare_published_state(sidecar_factory, root: Path) -> None:
    """A replica directory with a published checkpoint and a fleet model beside it, so that the families that
    only exist once something is published have series too. The gate is off here: random samples never pass."""
    s = sidecar_factory(root, VMAFX_SIDECAR_GATE="off", **SETTINGS)
    client, rng = s.client(), np.random.default_rng(1)
    acks = [client.request(sample(rng, N_FEATURES, job_id=f"p-{i}")) for i in range(80)]
    assert any("checkpoint" in a for a in acks), acks
    assert s.stop() == 0
    env = {"PATH": "", "PYTHONPATH": str(ROOT), "VMAFX_SIDECAR_GATE": "off", **SETTINGS}
    fleet = subprocess.run([sys.executable, "-m", "vmafx_sidecar", "fleet", str(root)], env=env, capture_output=True,
                           text=True, timeout=60)
    assert fleet.returncode == 0 and (root / "fleet" / "latest.json").exists(), fleet.stderr


def start_prometheus(tmp_path: Path, sidecar_port: int, producer_port: int) -> tuple[subprocess.Popen, int]:
    prometheus = system_program("prometheus", "prometheus")
    port = free_port()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [
            {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{sidecar_port}"], "labels": TARGET_LABELS}]},
            {"job_name": "vmafx-node",
             "static_configs": [{"targets": [f"127.0.0.1:{producer_port}"], "labels": TARGET_LABELS}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=log, stderr=log, cwd=tmp_path)
    return proc, port


def scraped(port: int, job: str) -> bool:
    """Both scrapes of `job` so far succeeded at least twice: counters have a sample before the stream."""
    try:
        result = api(port, "query", query=f'count_over_time(up{{job="{job}"}}[1m])')
    except OSError:  # not listening yet
        return False
    return bool(result["result"]) and float(result["result"][0]["value"][1]) >= 2


@pytest.fixture
def producer():
    """A FeedbackClient's counters served over HTTP, as the node's are; the client is set by the test."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ProducerCounters)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_real_prometheus_sees_every_metric_the_rules_and_dashboard_use_and_the_quarantine_alert(
        sidecar_factory, producer, tmp_path):
    system_program("prometheus", "prometheus")
    root = tmp_path / "models"
    root.mkdir()
    prepare_published_state(sidecar_factory, root)
    metrics_port = free_port()
    # The gate on, with the default evidence bar: the next candidate, judged on a few dozen samples, is
    # quarantined for too little evidence, as a first checkpoint after a restart would be.
    s = sidecar_factory(root, VMAFX_SIDECAR_METRICS_ADDR=f"127.0.0.1:{metrics_port}", **SETTINGS)
    client = vmafx_feedback.FeedbackClient(s.socket)
    ProducerCounters.client = client
    proc, port = start_prometheus(tmp_path, metrics_port, producer.server_address[1])
    try:
        for job in (JOB, "vmafx-node"):
            assert wait_for(lambda: scraped(port, job), 60, interval=0.25), f"no two scrapes of {job}"
        rng = np.random.default_rng(2)
        for i in range(60):
            assert client.send(sample(rng, N_FEATURES)["features"], 50.0 + i % 7, job_id=f"e-{i}")
        raw = s.client()
        for line in (b"not json", b'{"features": [1], "true_score": 1}'):
            assert raw.request(line)["ok"] is False
        client.close(timeout=30)
        assert raw.request({"op": "status"})["gate"]["gate"] == "quarantined"

        alert = wait_for(lambda: [a for a in api(port, "alerts")["alerts"]
                                  if a["labels"]["alertname"] == "VmafxCheckpointQuarantined"], 60, interval=0.25)
        assert alert, "no quarantine alert"
        assert alert[0]["state"] in ("pending", "firing") and alert[0]["labels"]["pod"] == POD, alert

        rules = [rule["expr"] for group in rule_groups() for rule in group["rules"]]
        names = set().union(*map(metric_names, dashboard_queries() + rules))
        assert "up" in names and "vmafx_training_feedback_dropped_total" in names
        mislabelled = {}
        for name in sorted(names):
            found = wait_for(lambda: api(port, "series", **{"match[]": name}), 30, interval=0.25)
            assert found, f"no series of {name}"
            # A release-level recording rule has summed the pods away, keeping the job; everything else keeps the pod.
            expected = {"namespace": NAMESPACE, "job": JOB} if name.startswith("namespace_job:") else TARGET_LABELS
            wrong = [s for s in found if {k: s.get(k) for k in expected} != expected]
            if wrong:
                mislabelled[name] = wrong
            if name in EXPECTED_LABELS:
                label, values = EXPECTED_LABELS[name]
                assert values <= {s.get(label) for s in found}, (name, found)
        assert not mislabelled, mislabelled
    finally:
        proc.terminate()
        proc.wait(10)
        client.close(timeout=1)
