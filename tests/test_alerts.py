"""The chart's alert and recording rules (chart/templates/prometheusrule.yaml), checked by Prometheus's own
promtool (Debian package prometheus): they load, and every alert fires on the series that should fire it and
stays silent on healthy ones; each has a runbook; their values reach them."""
from __future__ import annotations

import copy
import dataclasses
import re
import subprocess
from pathlib import Path

import helm_python as helm
import pytest
import yaml

import vmafx_sidecar as vs
from conftest import ROOT, system_program
from test_chart import (KUBE_VERSIONS, PROMETHEUS_RULE_API, VARIANTS, assert_schema_refuses, check_prometheus_rule,
                        merged, render)

RULE_VALUES = merged(VARIANTS["replicas 3, fleet"], **{"sidecar.trainer.metrics.prometheusRule.enabled": True})
FLEET_ALERTS = {"VmafxFleetModelStale", "VmafxFleetSamplesLost"}
# The labels a ServiceMonitor's scrape gives a trainer's series; the rules select them by namespace and job.
NAMESPACE, JOB, POD = "vmafx", "demo-vmafx-node-metrics", "demo-vmafx-node-0"
TRAINER = {"namespace": NAMESPACE, "job": JOB, "pod": POD, "instance": "10.0.0.1:9464"}


def rule_groups(values: dict = RULE_VALUES, release: str = "demo") -> list[dict]:
    return render(values, "1.33", api_versions=(PROMETHEUS_RULE_API,), release=release).one(
        "PrometheusRule")["spec"]["groups"]


def alerts(groups: list[dict]) -> dict[str, dict]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def series(metric: str, labels: dict[str, str] = TRAINER, **more: str) -> str:
    return metric + "{" + ",".join(f'{k}="{v}"' for k, v in {**labels, **more}.items()) + "}"


def node(metric: str, pod: str = POD) -> str:
    """A series of vmafx-node's own, scraped by some other job."""
    return series(metric, {"namespace": NAMESPACE, "job": "vmafx-node", "pod": pod, "container": "vmafx-node"})


@dataclasses.dataclass
class Case:
    """Series (promtool's expanding notation, one value a minute), and at eval_time either the labels of each
    alert expected to fire (besides alertname and severity) or none: the healthy case."""
    alert: str
    name: str
    input: dict[str, str]
    eval_time: str
    fires: list[dict[str, str]]
    value: str = ""  # $value as the description shows it; "" where it shows none


POD_LABELS = {"namespace": NAMESPACE, "pod": POD}
DEPLOYMENT_POD = "demo-vmafx-node-5d8f9c7b4-x2k9p"  # <fullname>-<ReplicaSet hash>-<5 characters>
RELEASE_LABELS = {"namespace": NAMESPACE, "job": JOB}  # the fleet's alert: one per release
CASES = [
    Case("VmafxFeedbackDropped", "rising", {node("vmafx_training_feedback_dropped_total"): "0x10 1+1x20"}, "20m",
         [POD_LABELS]),
    Case("VmafxFeedbackDropped", "flat, another release's rising",
         {node("vmafx_training_feedback_dropped_total"): "0x30",
          node("vmafx_training_feedback_dropped_total", pod="other-vmafx-node-0"): "0+1x30"}, "20m", []),
    # Release demo-vmafx-node-canary's pods begin with this release's fullname, demo-vmafx-node.
    Case("VmafxFeedbackDropped", "flat, release demo-vmafx-node-canary's rising",
         {node("vmafx_training_feedback_dropped_total"): "0x30",
          node("vmafx_training_feedback_dropped_total", pod="demo-vmafx-node-canary-0"): "0+1x30",
          node("vmafx_training_feedback_dropped_total", pod="demo-vmafx-node-canary-5d8f9c7b4-x2k9p"): "0+1x30"},
         "20m", []),
    Case("VmafxFeedbackDropped", "rising in the Deployment's pod", {node(
        "vmafx_training_feedback_dropped_total", pod=DEPLOYMENT_POD): "0x10 1+1x20"}, "20m",
         [{**POD_LABELS, "pod": DEPLOYMENT_POD}]),
    Case("VmafxSidecarDown", "down 10 minutes", {series("up"): "1x10 0x20"}, "20m", [TRAINER]),
    Case("VmafxSidecarDown", "up", {series("up"): "1x30"}, "20m", []),
    Case("VmafxSidecarNotScraped", "only another job", {series("up", job="other"): "1x30"}, "20m",
         [{"namespace": NAMESPACE, "job": JOB}]),
    Case("VmafxSidecarNotScraped", "scraped", {series("up"): "1x30"}, "20m", []),
    Case("VmafxNoCheckpointPublished", "samples, nothing published",
         {series("vmafx_sidecar_samples_total", result="accepted"): "0+90x150",
          series("vmafx_sidecar_samples_total", result="held_out"): "0+10x150",
          series("vmafx_sidecar_checkpoints_total", result="published"): "0x150"}, "130m", [POD_LABELS]),
    Case("VmafxNoCheckpointPublished", "samples, one published every 10 minutes",
         {series("vmafx_sidecar_samples_total", result="accepted"): "0+90x150",
          series("vmafx_sidecar_checkpoints_total", result="published"): "0+0.1x150"}, "130m", []),
    Case("VmafxNoCheckpointPublished", "too few samples for a checkpoint to be due",
         {series("vmafx_sidecar_samples_total", result="accepted"): "0+10x150",
          series("vmafx_sidecar_checkpoints_total", result="published"): "0x150"}, "130m", []),
    # 2400 accepted in the hour, 3600 with the held-out ones, which are never trained on: they do not count.
    Case("VmafxNoCheckpointPublished", "fewer than minSamples accepted, more with the held-out ones",
         {series("vmafx_sidecar_samples_total", result="accepted"): "0+40x150",
          series("vmafx_sidecar_samples_total", result="held_out"): "0+20x150",
          series("vmafx_sidecar_checkpoints_total", result="published"): "0x150"}, "130m", []),
    # A pod younger than the window: 100 a minute would be 6000 in the hour, but it got 2000 so far.
    Case("VmafxNoCheckpointPublished", "a new pod, fewer than minSamples so far",
         {series("vmafx_sidecar_samples_total", result="accepted"): "_x100 0+100x20",
          series("vmafx_sidecar_checkpoints_total", result="published"): "_x100 0x20"}, "120m", []),
    Case("VmafxNoCheckpointPublished", "a new pod past minSamples, nothing published",
         {series("vmafx_sidecar_samples_total", result="accepted"): "_x100 0+100x40",
          series("vmafx_sidecar_checkpoints_total", result="published"): "_x100 0x40"}, "140m", [POD_LABELS]),
    Case("VmafxCheckpointQuarantined", "one", {series("vmafx_sidecar_checkpoints_total", result="quarantined"):
                                               "0x10 1x20"}, "12m", [POD_LABELS]),
    Case("VmafxCheckpointQuarantined", "none", {series("vmafx_sidecar_checkpoints_total", result="quarantined"):
                                                "0x30"}, "20m", []),
    Case("VmafxCheckpointQuarantined", "one, half an hour ago",
         {series("vmafx_sidecar_checkpoints_total", result="quarantined"): "0x10 1x40"}, "45m", []),
    Case("VmafxCheckpointsQuarantinedRepeatedly", "three in 6h",
         {series("vmafx_sidecar_checkpoints_total", result="quarantined"): "0x30 1x60 2x60 3x60"}, "220m",
         [POD_LABELS]),
    Case("VmafxCheckpointsQuarantinedRepeatedly", "two in 6h",
         {series("vmafx_sidecar_checkpoints_total", result="quarantined"): "0x30 1x60 2x120"}, "220m", []),
    Case("VmafxNonFiniteSteps", "one", {series("vmafx_sidecar_nonfinite_steps_total"): "0x10 1x20"}, "12m",
         [POD_LABELS]),
    Case("VmafxNonFiniteSteps", "none", {series("vmafx_sidecar_nonfinite_steps_total"): "0x30"}, "20m", []),
    Case("VmafxWriteFailures", "the journal's, now",
         {series("vmafx_sidecar_write_failures_total", kind="journal"): "0x10 1+1x20",
          series("vmafx_sidecar_write_failures_total", kind="snapshot"): "0x30"}, "15m",
         [{**POD_LABELS, "kind": "journal"}]),
    Case("VmafxWriteFailures", "one, long ago", {series("vmafx_sidecar_write_failures_total", kind="snapshot"):
                                                 "0x5 1x30"}, "30m", []),
    Case("VmafxConnectionsRefused", "two", {series("vmafx_sidecar_connections_refused_total"): "0x10 2x20"}, "12m",
         [POD_LABELS]),
    Case("VmafxConnectionsRefused", "none", {series("vmafx_sidecar_connections_refused_total"): "0x30"}, "20m", []),
    Case("VmafxConnectionsDropped", "one", {series("vmafx_sidecar_connections_dropped_total"): "0x10 1x20"}, "12m",
         [POD_LABELS]),
    Case("VmafxConnectionsDropped", "none", {series("vmafx_sidecar_connections_dropped_total"): "0x30"}, "20m", []),
    Case("VmafxFleetModelStale", "old while samples arrive",
         {series("vmafx_sidecar_fleet_model_age_seconds"): "0+60x200",
          series("vmafx_sidecar_fleet_model_age_seconds", pod="demo-vmafx-node-1"): "0+60x200",
          series("vmafx_sidecar_samples_total", result="accepted"): "0+50x200"}, "150m",
         [RELEASE_LABELS], value="2h 30m 0s"),
    Case("VmafxFleetModelStale", "old, but no samples",
         {series("vmafx_sidecar_fleet_model_age_seconds"): "0+60x200",
          series("vmafx_sidecar_samples_total", result="accepted"): "5000x200"}, "150m", []),
    Case("VmafxFleetModelStale", "fresh", {series("vmafx_sidecar_fleet_model_age_seconds"): "600x200",
                                           series("vmafx_sidecar_samples_total", result="accepted"): "0+50x200"},
         "150m", []),
    # Never published: no age at all. The replicas serve vmafx_sidecar_sample_log_dropped_total while they log
    # samples for the fleet; maxAge (2h) after they started, with samples arriving, the fleet is overdue.
    Case("VmafxFleetModelStale", "never published, samples logged for longer than maxAge",
         {series("vmafx_sidecar_samples_total", result="accepted"): "0+50x200",
          series("vmafx_sidecar_samples_total", pod="demo-vmafx-node-1", result="accepted"): "0+50x200",
          series("vmafx_sidecar_sample_log_dropped_total"): "0x200",
          series("vmafx_sidecar_sample_log_dropped_total", pod="demo-vmafx-node-1"): "0x200"}, "150m",
         [RELEASE_LABELS]),
    Case("VmafxFleetModelStale", "never published, a fresh install within maxAge",
         {series("vmafx_sidecar_samples_total", result="accepted"): "0+50x200",
          series("vmafx_sidecar_sample_log_dropped_total"): "0x200"}, "110m", []),
    Case("VmafxFleetModelStale", "never published, the fleet enabled within maxAge on a busy release",
         {series("vmafx_sidecar_samples_total", result="accepted"): "0+50x200",
          series("vmafx_sidecar_sample_log_dropped_total"): "_x60 0x140"}, "150m", []),
    Case("VmafxFleetModelStale", "never published, no samples",
         {series("vmafx_sidecar_samples_total", result="accepted"): "5000x200",
          series("vmafx_sidecar_sample_log_dropped_total"): "0x200"}, "150m", []),
    Case("VmafxFleetSamplesLost", "some", {series("vmafx_sidecar_sample_log_dropped_total"): "0x10 5+5x20"}, "15m",
         [POD_LABELS]),
    Case("VmafxFleetSamplesLost", "none", {series("vmafx_sidecar_sample_log_dropped_total"): "0x30"}, "15m", []),
    # A pod replaced for a new feature count counts at its start what its log set aside: its new series (a new
    # instance) begins at that count, where increase() sees nothing (the replicas hunt).
    Case("VmafxFleetSamplesLost", "counted at a new pod's start",
         {series("vmafx_sidecar_sample_log_dropped_total"): "0x10 _x20",
          series("vmafx_sidecar_sample_log_dropped_total", instance="10.0.0.2:9464"): "_x10 300x20",
          series("process_start_time_seconds", instance="10.0.0.2:9464"): "_x10 590x20"}, "20m", [POD_LABELS]),
    Case("VmafxFleetSamplesLost", "an old count, unchanged for longer than the window",
         {series("vmafx_sidecar_sample_log_dropped_total"): "300x40",
          series("process_start_time_seconds"): "0x40"}, "30m", []),
    # A series merely new to Prometheus, after a gap in its scrapes, is an old process's (the review).
    Case("VmafxFleetSamplesLost", "an old count, after a gap in the scrapes",
         {series("vmafx_sidecar_sample_log_dropped_total"): "300x60 _x20 300x20",
          series("process_start_time_seconds"): "0x60 _x20 0x20"}, "85m", []),
]


def expanded(template: str, labels: dict[str, str], value: str) -> str:
    """An annotation as Prometheus renders it, for the constructs the rules use: $labels, $value as a duration,
    and `if eq $value 0.0`, whose first branch is taken where the description shows no value."""
    text = re.sub(r"\{\{ if eq \$value 0\.0 \}\}(.*?)\{\{ else \}\}(.*?)\{\{ end \}\}",
                  lambda m: m[2] if value else m[1], template)
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
    text = text.replace("{{ $value | humanizeDuration }}", value)
    assert "{{" not in text, text
    return text


def promtool_test(case: Case, rule: dict) -> dict:
    """The case as one of promtool's rule unit tests."""
    expected = [{"exp_labels": {**labels, "severity": rule["labels"]["severity"]},
                 "exp_annotations": {k: expanded(v, labels, case.value) for k, v in rule["annotations"].items()}}
                for labels in case.fires]
    return {"name": f"{case.alert}: {case.name}", "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in case.input.items()],
            "alert_rule_test": [{"eval_time": case.eval_time, "alertname": case.alert, "exp_alerts": expected}]}


def write_rules(directory: Path, groups: list[dict]) -> Path:
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


# ---- promtool ----

def test_promtool_accepts_every_rule(tmp_path):
    promtool = system_program("promtool", "prometheus")
    groups = rule_groups()
    result = subprocess.run([promtool, "check", "rules", write_rules(tmp_path, groups)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in groups)} rules found" in result.stdout


def promtool_tests(directory: Path, groups: list[dict], cases: list[Case]) -> subprocess.CompletedProcess:
    """`promtool test rules` on `groups` with `cases`, written into `directory`."""
    promtool = system_program("promtool", "prometheus")
    write_rules(directory, groups)
    rules = alerts(groups)
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
             "tests": [promtool_test(case, rules[case.alert]) for case in cases]}
    (directory / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    return subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=directory, capture_output=True, text=True)


def test_every_alert_fires_on_its_series_and_stays_silent_on_healthy_ones(tmp_path):
    groups = rule_groups()
    assert {c.alert for c in CASES if c.fires} == {c.alert for c in CASES if not c.fires} == set(alerts(groups))
    result = promtool_tests(tmp_path, groups, CASES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_alert_is_caught(tmp_path):
    """The cases can fail: a rule that never fires, or one that always does, each fails some of them."""
    cases = [c for c in CASES if c.alert == "VmafxCheckpointQuarantined"]
    for i, broken in enumerate(("vector(0) > 1", "vector(1)")):
        groups = rule_groups()
        for rule in (r for group in groups for r in group["rules"] if r.get("alert") == "VmafxCheckpointQuarantined"):
            rule["expr"] = broken
        directory = tmp_path / str(i)
        directory.mkdir()
        assert promtool_tests(directory, groups, cases).returncode != 0, broken


# Release busy in the same namespace: its own trainers, scraped by its own job.
BUSY_JOB = "busy-vmafx-node-metrics"
BUSY = {**TRAINER, "job": BUSY_JOB, "pod": "busy-vmafx-node-0"}


def test_two_releases_in_one_namespace_each_judge_their_own_fleet(tmp_path):
    """Release demo takes no samples and has an old fleet model; release busy, in the same namespace, takes
    samples. demo's VmafxFleetModelStale stays silent whatever busy's traffic; busy's fires for busy's model
    alone. Both rule files load together: their recordings differ by job, where recordings per namespace
    would be the same series from both (promtool fails on the duplicate samples)."""
    promtool = system_program("promtool", "prometheus")
    releases = {"demo": rule_groups(), "busy": rule_groups(release="busy")}
    for release, groups in releases.items():
        (tmp_path / f"rules-{release}.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    old = "10800+60x240"  # 3 hours old, and older
    idle = {series("vmafx_sidecar_samples_total", result="accepted"): "0x240",
            series("vmafx_sidecar_sample_log_dropped_total"): "0x240",
            series("vmafx_sidecar_fleet_model_age_seconds"): old}
    busy = {series("vmafx_sidecar_samples_total", BUSY, result="accepted"): "0+600x240",
            series("vmafx_sidecar_sample_log_dropped_total", BUSY): "0x240"}
    cases = [
        Case("VmafxFleetModelStale", "demo idle, busy busy with a fresh model",
             {**idle, **busy, series("vmafx_sidecar_fleet_model_age_seconds", BUSY): "600x240"}, "200m", []),
        Case("VmafxFleetModelStale", "demo idle, busy busy with as old a model",
             {**idle, **busy, series("vmafx_sidecar_fleet_model_age_seconds", BUSY): old}, "200m",
             [{"namespace": NAMESPACE, "job": BUSY_JOB}], value="6h 20m 0s"),
    ]
    tests = [promtool_test(case, alerts(releases["busy"])[case.alert]) for case in cases]
    recorded = "namespace_job:vmafx_sidecar_samples_valid:rate5m"
    tests[0]["promql_expr_test"] = [{"expr": recorded, "eval_time": "200m", "exp_samples": [
        {"labels": f'{recorded}{{job="{job}",namespace="{NAMESPACE}"}}', "value": rate}
        for job, rate in ((JOB, 0), (BUSY_JOB, 10))]}]  # 600 a minute
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules-demo.yaml", "rules-busy.yaml"], "evaluation_interval": "1m", "tests": tests},
        sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "busy-vmafx-node-fleet" in alerts(releases["busy"])["VmafxFleetModelStale"]["annotations"]["description"]


def deployment_pods(fullname: str) -> list[str]:
    """Names a Deployment <fullname>'s pods get: its ReplicaSet is <fullname>-<hash of 1 to 10 characters>,
    and a pod's name that plus "-", cut at 58 characters, plus 5 characters (names.SimpleNameGenerator); both
    of the alphabet bcdfghjklmnpqrstvwxz2456789 (k8s.io/apimachinery/pkg/util/rand)."""
    hashes = ["5d8f9c7b4x"[:n] for n in range(1, 11)] + ["7", "bcdfghjklm"]
    return [f"{fullname}-{h}-"[:58] + suffix for h in hashes for suffix in ("x2k9p", "22222")]


def feedback_pods_regex(values: dict, release: str, directory: Path) -> re.Pattern:
    """The alert's pod regex, which promtool takes (RE2's syntax), for Python's re (the same, for this one)."""
    groups = rule_groups(values, release)
    promtool = system_program("promtool", "prometheus")
    result = subprocess.run([promtool, "check", "rules", write_rules(directory, groups)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    expr = alerts(groups)["VmafxFeedbackDropped"]["expr"]
    [pattern] = re.findall(r'pod=~"([^"\\]*)"', expr)  # no escapes: a release's name is letters, digits and "-"
    return re.compile(f"(?:{pattern})")  # PromQL anchors it: fullmatch


@pytest.mark.parametrize("length", [4, 35, 36, 39, 44, 45, 46, 47, 52])  # fullnames of 15 to 63 characters
def test_feedback_dropped_takes_this_releases_pods_and_no_other_releases(length, tmp_path):
    """Its pods, of either kind, whatever the length of their names, and not those of <release>-canary. A
    fullname of 58 characters or more is cut to 58 in a Deployment's pods' names: only those 58 tell releases
    apart."""
    release, other = "r" * length, "r" * length + "-canary"
    values = merged(VARIANTS["issue values"], **{"sidecar.trainer.metrics.prometheusRule.enabled": True})
    fullname = f"{release}-vmafx-node"
    pods = feedback_pods_regex(values, release, tmp_path)
    own = deployment_pods(fullname) + ([f"{fullname}-{i}" for i in (0, 2, 10)] if len(fullname) <= 52 else [])
    assert [pod for pod in own if not pods.fullmatch(pod)] == []
    assert all(len(pod) <= 63 for pod in own)
    if length + 7 <= 53:  # a release name has at most 53 characters
        theirs = deployment_pods(f"{other}-vmafx-node") + [f"{other}-vmafx-node-{i}" for i in (0, 2, 10)]
        assert [pod for pod in theirs if pods.fullmatch(pod)] == []
    assert not pods.fullmatch(f"{fullname}-fleet-29040000-x2k9p")  # the fleet CronJob's pods


# ---- the chart ----

@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_the_rule_is_rendered_where_the_cluster_has_its_api(kube_version):
    rendered = render(RULE_VALUES, kube_version, api_versions=(PROMETHEUS_RULE_API,))
    assert set(alerts(rendered.one("PrometheusRule")["spec"]["groups"])) >= FLEET_ALERTS
    assert "PrometheusRule demo-vmafx-node holds the trainers' alerts" in " ".join(rendered.notes.split())


def test_without_the_api_or_the_value_there_is_no_rule_and_the_notes_say_why():
    rendered = render(RULE_VALUES, "1.33")
    assert "PrometheusRule" not in rendered.kinds
    assert ("WARNING: sidecar.trainer.metrics.prometheusRule.enabled is true, but the cluster has no "
            "monitoring.coreos.com/v1 PrometheusRule API") in " ".join(rendered.notes.split())
    off = merged(RULE_VALUES, **{"sidecar.trainer.metrics.prometheusRule.enabled": False})
    assert "PrometheusRule" not in render(off, "1.33", api_versions=(PROMETHEUS_RULE_API,)).kinds
    no_metrics = merged(RULE_VALUES, **{"sidecar.trainer.metrics.enabled": False})
    assert "PrometheusRule" not in render(no_metrics, "1.33", api_versions=(PROMETHEUS_RULE_API,)).kinds


def test_fleet_alerts_only_with_the_fleet():
    without = merged(VARIANTS["replicas 3"], **{"sidecar.trainer.metrics.prometheusRule.enabled": True})
    assert set(alerts(rule_groups(without))) == set(alerts(rule_groups())) - FLEET_ALERTS


def test_values_reach_every_alert():
    values = merged(RULE_VALUES, **{
        "sidecar.trainer.metrics.prometheusRule.job": "kubernetes-pods",
        "sidecar.trainer.metrics.prometheusRule.runbookUrl": "https://git.example/vmafx/chart/README.md",
        "sidecar.trainer.metrics.prometheusRule.alertLabels": {"team": "video", "severity": "ignored"},
        "sidecar.trainer.metrics.prometheusRule.labels": {"release": "prometheus"},
        "sidecar.trainer.metrics.prometheusRule.alerts.sidecarDown": {"severity": "page", "for": "2m"},
        "sidecar.trainer.metrics.prometheusRule.alerts.noCheckpointPublished":
            {"severity": "warning", "for": "0m", "window": "1d2h", "minSamples": 500},
        # At most minSamples less the batch size: see test_no_checkpoint_alert_*.
        "sidecar.trainer.minSamplesPerCheckpoint": 500 - SIDECAR_BATCH,
        "sidecar.trainer.metrics.prometheusRule.alerts.fleetModelStale":
            {"severity": "warning", "for": "15m", "maxAge": "1h30m"},
    })
    rendered = render(values, "1.33", api_versions=(PROMETHEUS_RULE_API,)).one("PrometheusRule")
    assert rendered["metadata"]["labels"]["release"] == "prometheus"
    rules = alerts(rendered["spec"]["groups"])
    for name, rule in rules.items():
        assert rule["labels"]["team"] == "video" and rule["labels"]["severity"] != "ignored", name
        assert rule["annotations"]["runbook_url"] == f"https://git.example/vmafx/chart/README.md#{name.lower()}"
        if "vmafx_sidecar" in rule["expr"] or "up{" in rule["expr"]:
            assert 'job="kubernetes-pods"' in rule["expr"], name
    assert (rules["VmafxSidecarDown"]["labels"]["severity"], rules["VmafxSidecarDown"]["for"]) == ("page", "2m")
    assert "[1d2h]" in rules["VmafxNoCheckpointPublished"]["expr"]
    assert "[1d2h])) > 500" in rules["VmafxNoCheckpointPublished"]["expr"]
    assert "> 5400" in rules["VmafxFleetModelStale"]["expr"]  # 1h30m in seconds
    assert "offset 1h30m" in rules["VmafxFleetModelStale"]["expr"]


def test_an_alert_for_of_0_is_written_as_the_string_the_custom_resource_takes():
    """The schema takes "0"; written unquoted, the rule held the integer 0, which the PrometheusRule's type
    refuses, and `helm install` failed."""
    values = merged(RULE_VALUES, **{"sidecar.trainer.metrics.prometheusRule.alerts.sidecarDown":
                                    {"severity": "critical", "for": "0"}})
    rule = render(values, "1.33", api_versions=(PROMETHEUS_RULE_API,)).one("PrometheusRule")
    check_prometheus_rule(rule)
    assert alerts(rule["spec"]["groups"])["VmafxSidecarDown"]["for"] == "0"


@pytest.mark.parametrize("dotted, value", [
    ("sidecar.trainer.metrics.prometheusRule.enabled", "true"),
    ("sidecar.trainer.metrics.prometheusRule.labels.release", 1),
    ("sidecar.trainer.metrics.prometheusRule.alerts.sidecarDown.for", "5 minutes"),
    ("sidecar.trainer.metrics.prometheusRule.alerts.sidecarDown.severity", ""),
    ("sidecar.trainer.metrics.prometheusRule.alerts.noCheckpointPublished.window", "1.5h"),
    ("sidecar.trainer.metrics.prometheusRule.alerts.noCheckpointPublished.minSamples", -1),
    ("sidecar.trainer.metrics.prometheusRule.alerts.checkpointsQuarantinedRepeatedly.count", 0),
    ("sidecar.trainer.metrics.prometheusRule.alerts.fleetModelStale.maxAge", "2 hours"),
])
def test_schema_rejects_bad_rule_values_naming_them(dotted, value):
    assert_schema_refuses(merged(RULE_VALUES, **{dotted: value}), dotted)


WINDOWS = [f"sidecar.trainer.metrics.prometheusRule.alerts.{key}" for key in (
    "noCheckpointPublished.window", "checkpointsQuarantinedRepeatedly.window", "fleetModelStale.maxAge")]


@pytest.mark.parametrize("zero", ["0s", "0h", "0d0s", "00m"])
@pytest.mark.parametrize("dotted", WINDOWS)
def test_schema_rejects_a_zero_window_naming_it(dotted, zero):
    """PromQL refuses a range of 0 ("duration must be greater than 0"): the rules would not load."""
    assert_schema_refuses(merged(RULE_VALUES, **{dotted: zero}), dotted)


def test_promtool_accepts_the_shortest_windows(tmp_path):
    promtool = system_program("promtool", "prometheus")
    # Past a checkpoint interval of 0, two 30 s scrapes and a step's 30 s: 91 s (see test_no_checkpoint_alert_*).
    groups = rule_groups(merged(RULE_VALUES, **{dotted: "0d1s" for dotted in WINDOWS[1:]},
                                **{WINDOWS[0]: "1m31s", "sidecar.trainer.checkpointIntervalSeconds": 0}))
    result = subprocess.run([promtool, "check", "rules", write_rules(tmp_path, groups)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # And a zero window is what promtool refuses.
    zero = [{**group, "rules": [{**rule, "expr": rule["expr"].replace("[0d1s]", "[0s]")} for rule in group["rules"]]}
            for group in groups]
    result = subprocess.run([promtool, "check", "rules", write_rules(tmp_path, zero)], capture_output=True,
                            text=True)
    assert result.returncode != 0 and "duration must be greater than 0" in result.stdout + result.stderr


NO_CHECKPOINT = "sidecar.trainer.metrics.prometheusRule.alerts.noCheckpointPublished"
SCRAPE = "sidecar.trainer.metrics.serviceMonitor.interval"
SIDECAR_MIN_SAMPLES, SIDECAR_INTERVAL = vs.Config.min_samples_ckpt, int(vs.Config.ckpt_interval_s)  # unset values
SIDECAR_BATCH = vs.Config.batch_size


def with_no_checkpoint_alert(window: str = "1h", min_samples: int = 3000, **overrides: object) -> dict:
    return merged(RULE_VALUES, **{NO_CHECKPOINT: {"severity": "warning", "for": "0m", "window": window,
                                                  "minSamples": min_samples}}, **overrides)


@pytest.mark.parametrize("values, refusal", [
    (with_no_checkpoint_alert(**{"sidecar.trainer.minSamplesPerCheckpoint": 5000}),
     f"{NO_CHECKPOINT}.minSamples (3000) must be at least sidecar.trainer.minSamplesPerCheckpoint (5000) plus "
     f"sidecar.trainer.batchSize ({SIDECAR_BATCH}, the sidecar's default), {5000 + SIDECAR_BATCH}"),
    (with_no_checkpoint_alert(min_samples=SIDECAR_MIN_SAMPLES + SIDECAR_BATCH - 1),
     f"{NO_CHECKPOINT}.minSamples ({SIDECAR_MIN_SAMPLES + SIDECAR_BATCH - 1}) must be at least "
     f"sidecar.trainer.minSamplesPerCheckpoint ({SIDECAR_MIN_SAMPLES}, the sidecar's default) plus "
     f"sidecar.trainer.batchSize ({SIDECAR_BATCH}, the sidecar's default), {SIDECAR_MIN_SAMPLES + SIDECAR_BATCH}"),
    # One short of the bound: the checkpoint's samples, and a batch more.
    (with_no_checkpoint_alert(min_samples=5000 + 64 - 1, **{"sidecar.trainer.minSamplesPerCheckpoint": 5000,
                                                          "sidecar.trainer.batchSize": 64}),
     f"{NO_CHECKPOINT}.minSamples (5063) must be at least sidecar.trainer.minSamplesPerCheckpoint (5000) plus "
     "sidecar.trainer.batchSize (64), 5064"),
    (with_no_checkpoint_alert(**{"sidecar.trainer.minSamplesPerCheckpoint": 100,
                                 "sidecar.trainer.extraEnv": [{"name": "VMAFX_SIDECAR_MIN_SAMPLES_CKPT",
                                                               "value": "3001"}]}),
     f"{NO_CHECKPOINT}.minSamples (3000) must be at least VMAFX_SIDECAR_MIN_SAMPLES_CKPT in "
     f"sidecar.trainer.extraEnv (3001) plus sidecar.trainer.batchSize ({SIDECAR_BATCH}, the sidecar's default), "
     f"{3001 + SIDECAR_BATCH}"),
    # The batch size the trainer reads: extraEnv's, over the value.
    (with_no_checkpoint_alert(**{"sidecar.trainer.minSamplesPerCheckpoint": 2000, "sidecar.trainer.batchSize": 16,
                                 "sidecar.trainer.replayBufferSize": 2000,
                                 "sidecar.trainer.extraEnv": [{"name": "VMAFX_SIDECAR_BATCH_SIZE", "value": "1001"}]}),
     f"{NO_CHECKPOINT}.minSamples (3000) must be at least sidecar.trainer.minSamplesPerCheckpoint (2000) plus "
     "VMAFX_SIDECAR_BATCH_SIZE in sidecar.trainer.extraEnv (1001), 3001"),
    (with_no_checkpoint_alert(window="10m"),
     f"{NO_CHECKPOINT}.window (10m, 600 s) must be more than sidecar.trainer.checkpointIntervalSeconds "
     f"({SIDECAR_INTERVAL}, the sidecar's default) plus twice {SCRAPE} (30s) and 30 s, {SIDECAR_INTERVAL + 90} s"),
    (with_no_checkpoint_alert(window="11m30s"),  # one second short
     f"{NO_CHECKPOINT}.window (11m30s, 690 s) must be more than sidecar.trainer.checkpointIntervalSeconds "
     f"({SIDECAR_INTERVAL}, the sidecar's default) plus twice {SCRAPE} (30s) and 30 s, {SIDECAR_INTERVAL + 90} s"),
    (with_no_checkpoint_alert(window="20m", **{SCRAPE: "5m"}),
     f"{NO_CHECKPOINT}.window (20m, 1200 s) must be more than sidecar.trainer.checkpointIntervalSeconds "
     f"({SIDECAR_INTERVAL}, the sidecar's default) plus twice {SCRAPE} (5m) and 30 s, {SIDECAR_INTERVAL + 630} s"),
    (with_no_checkpoint_alert(**{"sidecar.trainer.checkpointIntervalSeconds": 3510.5,
                                 "fleet.activeDeadlineSeconds": 7200}),
     f"{NO_CHECKPOINT}.window (1h, 3600 s) must be more than sidecar.trainer.checkpointIntervalSeconds (3510.5) "
     f"plus twice {SCRAPE} (30s) and 30 s, 3600.5 s"),
    (with_no_checkpoint_alert(window="1d", **{"sidecar.trainer.checkpointIntervalSeconds": 60,
                                              "sidecar.trainer.extraEnv": [{"name": "VMAFX_SIDECAR_CKPT_INTERVAL_S",
                                                                            "value": "86400"}],
                                              "fleet.activeDeadlineSeconds": 86401}),
     f"{NO_CHECKPOINT}.window (1d, 86400 s) must be more than VMAFX_SIDECAR_CKPT_INTERVAL_S in "
     f"sidecar.trainer.extraEnv (86400) plus twice {SCRAPE} (30s) and 30 s, 86490 s"),
], ids=["minSamples below the trainer's", "minSamples a batch short of the sidecar's default",
        "minSamples one short of the trainer's plus its batch", "minSamples below extraEnv's",
        "minSamples below the trainer's plus extraEnv's batch",
        "window of the sidecar's default interval", "window within two scrapes and a step of it",
        "window within two slow scrapes and a step of it", "window within the trainer's interval and the margin",
        "window within extraEnv's interval"])
def test_no_checkpoint_alert_a_healthy_trainer_would_fire_is_refused(values, refusal):
    """A checkpoint is due once the trainer trained on MIN_SAMPLES_CKPT samples and CKPT_INTERVAL_S seconds have
    passed since the last. It trains on accepted samples only (held-out ones never count), and only once a
    step's new samples are pending, fewer than BATCH_SIZE: with minSamples below MIN_SAMPLES_CKPT + BATCH_SIZE,
    or a window within two scrapes and a step of the interval, the alert would fire between two checkpoints of a
    healthy trainer (test_the_refused_thresholds_fire_on_a_healthy_trainer,
    test_a_healthy_trainer_at_the_bound_is_silent,
    test_a_healthy_trainer_at_the_window_bound_is_silent_at_every_scrape_phase)."""
    with pytest.raises(helm.HelmRenderError) as refused:
        render(values, "1.33", api_versions=(PROMETHEUS_RULE_API,))
    assert f"{refusal}: a checkpoint is due only" in str(refused.value)
    assert "VmafxNoCheckpointPublished would fire on a healthy trainer" in str(refused.value)
    if ".minSamples" in refusal:
        assert ("held-out samples never count toward it, and a step's new samples wait for a full batch"
                in str(refused.value))
    # Without the PrometheusRule API there is no alert to be wrong.
    assert "PrometheusRule" not in render(values, "1.33").kinds


@pytest.mark.parametrize("values", [
    RULE_VALUES,
    with_no_checkpoint_alert(**{"sidecar.trainer.minSamplesPerCheckpoint": 3000 - SIDECAR_BATCH,
                                "sidecar.trainer.checkpointIntervalSeconds": 3509.5}),
    with_no_checkpoint_alert(min_samples=5000 + 64, **{"sidecar.trainer.minSamplesPerCheckpoint": 5000,
                                                      "sidecar.trainer.batchSize": 64}),
    with_no_checkpoint_alert(**{"sidecar.trainer.minSamplesPerCheckpoint": 5000,
                                "sidecar.trainer.checkpointIntervalSeconds": 7200,
                                "sidecar.trainer.extraEnv": [
                                    {"name": "VMAFX_SIDECAR_MIN_SAMPLES_CKPT", "value": str(3000 - SIDECAR_BATCH)},
                                    {"name": "VMAFX_SIDECAR_CKPT_INTERVAL_S", "value": "600"}]}),
    # The value's batch alone would refuse it (2000 + 1024 > 3000); the trainer reads extraEnv's.
    with_no_checkpoint_alert(**{"sidecar.trainer.minSamplesPerCheckpoint": 2000, "sidecar.trainer.batchSize": 1024,
                                "sidecar.trainer.extraEnv": [{"name": "VMAFX_SIDECAR_BATCH_SIZE", "value": "1000"}]}),
    with_no_checkpoint_alert(window="2h", min_samples=5000 + SIDECAR_BATCH, **{
        "sidecar.trainer.minSamplesPerCheckpoint": 5000, "sidecar.trainer.checkpointIntervalSeconds": 5400,
        "fleet.activeDeadlineSeconds": 7200}),
], ids=["defaults", "at the bounds", "at the trainer's plus its batch", "lower settings in extraEnv",
        "a lower batch in extraEnv", "thresholds raised with the trainer's"])
def test_no_checkpoint_alert_at_or_past_the_trainers_thresholds_is_taken(values):
    rule = alerts(rule_groups(values))["VmafxNoCheckpointPublished"]
    threshold = values["sidecar"]["trainer"]["metrics"]["prometheusRule"].get("alerts", {}).get(
        "noCheckpointPublished", {"window": "1h", "minSamples": 3000})  # values.yaml's
    assert f'result="accepted"}}[{threshold["window"]}])) > {threshold["minSamples"]}' in rule["expr"]


def test_the_refused_thresholds_fire_on_a_healthy_trainer(tmp_path):
    """What the refusal prevents: minSamplesPerCheckpoint 5000 and the alert's default thresholds (more than 3000
    samples in 1h). A trainer getting 67 samples a minute publishes every 75 minutes, as it is told to; the
    alert would fire between two checkpoints."""
    values = merged(RULE_VALUES, **{"sidecar.trainer.minSamplesPerCheckpoint": 5000})
    with pytest.raises(helm.HelmRenderError):
        rule_groups(values)
    healthy = Case("VmafxNoCheckpointPublished", "a checkpoint every 75 minutes",
                   {series("vmafx_sidecar_samples_total", result="accepted"): "0+67x200",
                    series("vmafx_sidecar_checkpoints_total", result="published"): "0x74 1x74 2x50"}, "145m", [])
    assert promtool_tests(tmp_path, rule_groups(), [healthy]).returncode != 0  # the default thresholds fire
    raised = with_no_checkpoint_alert(min_samples=5000 + SIDECAR_BATCH,
                                      **{"sidecar.trainer.minSamplesPerCheckpoint": 5000})
    result = promtool_tests(tmp_path, rule_groups(raised), [healthy])  # minSamples as the trainer's: silent
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_healthy_trainer_at_the_bound_is_silent(tmp_path):
    """minSamples at the bound, minSamplesPerCheckpoint (5000) plus the batch size, in a 2h window. A healthy
    trainer accepts 40 samples a minute and holds 3 more out; it publishes each time its accepted count reaches
    5000, every 125 minutes. No 2h window holds more than 4800 accepted samples, but one between two checkpoints
    holds 5160 valid ones: the alert counting the held-out samples too, which are never trained on and bring no
    checkpoint nearer, would fire. The same trainer stuck, accepting 45 a minute, fires it."""
    values = with_no_checkpoint_alert(window="2h", min_samples=5000 + SIDECAR_BATCH,
                                      **{"sidecar.trainer.minSamplesPerCheckpoint": 5000})
    groups = rule_groups(values)
    samples = {series("vmafx_sidecar_samples_total", result="accepted"): "0+40x300",
               series("vmafx_sidecar_samples_total", result="held_out"): "0+3x300"}
    healthy = Case("VmafxNoCheckpointPublished", "at the bound, a checkpoint every 5000 accepted samples",
                   {**samples, series("vmafx_sidecar_checkpoints_total", result="published"): "0x124 1x124 2x50"},
                   "247m", [])  # its window, from 127m, holds no checkpoint
    result = promtool_tests(tmp_path, groups, [healthy])
    assert result.returncode == 0, result.stdout + result.stderr
    old = copy.deepcopy(groups)  # what the alert counted before: held-out samples too
    for rule in (r for group in old for r in group["rules"] if r.get("alert") == "VmafxNoCheckpointPublished"):
        assert 'result="accepted"}' in rule["expr"] and "held_out" not in rule["expr"]
        rule["expr"] = rule["expr"].replace('result="accepted"}', 'result=~"accepted|held_out"}')
    (tmp_path / "old").mkdir()
    assert promtool_tests(tmp_path / "old", old, [healthy]).returncode != 0
    stuck = Case("VmafxNoCheckpointPublished", "at the bound, 45 accepted a minute, none published since 125m",
                 {series("vmafx_sidecar_samples_total", result="accepted"): "0+45x300",
                  series("vmafx_sidecar_samples_total", result="held_out"): "0+3x300",
                  series("vmafx_sidecar_checkpoints_total", result="published"): "0x124 1x175"}, "260m", [POD_LABELS])
    (tmp_path / "stuck").mkdir()
    result = promtool_tests(tmp_path / "stuck", groups, [stuck])
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_healthy_trainer_at_the_window_bound_is_silent_at_every_scrape_phase(tmp_path):
    """increase() sees only the changes between two scrapes in its window. A trainer publishing every 630 s (the
    default interval, and the step after, 30 s later at most) fired the alert about every half hour with the
    10m20s window the chart took (more than the interval was all it asked), as the scrapes' phase drifted past
    the checkpoints'; at the bound (the interval, two 30 s scrapes and 30 s) it stays silent for 8 hours."""
    promtool = system_program("promtool", "prometheus")
    groups = rule_groups(with_no_checkpoint_alert(window="11m31s", min_samples=SIDECAR_MIN_SAMPLES + SIDECAR_BATCH))
    times = range(0, 8 * 3600 + 1, 30)
    inputs = [{"series": series("vmafx_sidecar_checkpoints_total", result="published"),
               "values": " ".join(str(t // 630) for t in times)},
              {"series": series("vmafx_sidecar_samples_total", result="accepted"),
               "values": " ".join(str(5 * t) for t in times)}]  # 5 a second: 3 150 a checkpoint
    checks = [{"eval_time": f"{t}s", "alertname": "VmafxNoCheckpointPublished", "exp_alerts": []}
              for t in range(3600, 8 * 3600, 30)]
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "30s",
             "tests": [{"interval": "30s", "input_series": inputs, "alert_rule_test": checks}]}
    for window, fires in (("11m31s", False), ("10m20s", True)):
        for rule in (r for group in groups for r in group["rules"] if r.get("alert") == "VmafxNoCheckpointPublished"):
            rule["expr"] = re.sub(r"\[\w+\]", f"[{window}]", rule["expr"])
        write_rules(tmp_path, groups)
        (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
        result = subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True,
                                text=True)
        assert (result.returncode != 0) == fires, (window, result.stdout[-2000:] + result.stderr[-2000:])


@pytest.mark.parametrize("dotted, misspelt", [
    ("sidecar.trainer.metrics.prometheusRule.alerts.sidecarDwn", "sidecarDwn"),
    ("sidecar.trainer.metrics.prometheusRule.alerts.sidecarDown.threshold", "threshold"),
])
def test_schema_rejects_a_misspelt_alert_or_threshold(dotted, misspelt):
    with pytest.raises(helm.HelmValuesError, match=f"additional properties '{misspelt}'"):
        render(merged(RULE_VALUES, **{dotted: 1}), "1.33")


def test_every_alert_has_a_runbook_in_the_chart_readme():
    readme = (ROOT / "chart/README.md").read_text()
    runbooks = re.findall(r"^#### (Vmafx\w+)$", readme.split("### Runbooks", 1)[1], re.M)
    assert runbooks == list(alerts(rule_groups()))  # one each, in the rules' order
