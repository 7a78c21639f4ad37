"""The Grafana dashboard in chart/dashboards/ (issue #18): the chart ships it as a ConfigMap that the Grafana
sidecar of kube-prometheus-stack loads; it is a well-formed dashboard; Prometheus parses every query, once
Grafana's variables are put in; and the metrics it queries are the sidecar's."""
from __future__ import annotations

import itertools
import json
import re
import subprocess

import helm_python as helm
import pytest
import yaml

from conftest import system_program
from test_chart import CHART, ISSUE_VALUES, KUBE_VERSIONS, assert_schema_refuses, merged, render
from test_metrics import free_port, http

DASHBOARD_FILE = CHART / "dashboards" / "vmafx-sidecar.json"
DASHBOARD = json.loads(DASHBOARD_FILE.read_text())
CONFIG_MAP = "ConfigMap", "demo-vmafx-node-dashboard"
ENABLED = merged(ISSUE_VALUES, **{"sidecar.trainer.metrics.dashboard.enabled": True})
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ROWS = ["Ingest", "Training", "Gate", "Checkpoints & storage", "Fleet"]

# What Grafana puts in for the variables it defines itself, with values of the kind it sends.
GRAFANA_VARIABLES = {"__interval": "30s", "__interval_ms": "30000", "__rate_interval": "2m", "__range": "6h",
                     "__range_s": "21600", "__range_ms": "21600000"}
# Values the dashboard's own variables could take: pod as Grafana formats a multi-value for a regex matcher.
EXAMPLE_VALUES = {"namespace": "vmafx", "pod": "(demo-vmafx-node-0|demo-vmafx-node-1)"}
# $name, ${name}, ${name:format} and the deprecated [[name]] and [[name:format]].
GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::[^\]]*)?\]\]")

# PromQL, as far as it matters for finding vector selectors: strings, label matchers (which may hold strings
# with braces), ranges and subqueries, and words, a word being a name not inside a number (1e3).
PROMQL_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|\{(?:"(?:[^"\\]|\\.)*"|[^}"])*\}|\[[^\]]*\]'
                          r'|(?<![\w:.])[a-zA-Z_:][\w:]*')
# A grouping's or a vector matching's label list, which is no selector.
LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "atan2",
            "offset", "inf", "nan"}


# ---- reading the dashboard (also for tests that run its queries against a real Prometheus) ----

def panels() -> list[dict]:
    """Every panel, rows included; a collapsed row's own panels follow it."""
    return [p for top in DASHBOARD["panels"] for p in [top, *top.get("panels", [])]]


def rows() -> dict[str, list[dict]]:
    """The panels under each row, by its title: a collapsed row's own, else those up to the next row."""
    found: dict[str, list[dict]] = {}
    for panel in panels():
        if panel["type"] == "row":
            found[panel["title"]] = []
        else:
            found[list(found)[-1]].append(panel)
    return found


def variable_names(text: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in GRAFANA_VARIABLE.finditer(text)}


def substituted(expr: str) -> str:
    """The query as Grafana sends it, given example values of the variables; an unknown variable is left as
    written, for the test of the variables to name."""
    values = GRAFANA_VARIABLES | EXAMPLE_VALUES
    return GRAFANA_VARIABLE.sub(lambda m: values.get(next(g for g in m.groups() if g), m[0]), expr)


def panel_queries() -> dict[str, str]:
    """Each panel query, as written, by a recording rule name that says where it is: panel_<id>_<refId>."""
    return {f"panel_{panel['id']}_{target['refId']}": target["expr"]
            for panel in panels() for target in panel.get("targets", [])}


def dashboard_queries() -> list[str]:
    """Every panel query as Grafana sends it to Prometheus, with example values of the variables."""
    return [substituted(expr) for expr in panel_queries().values()]


def variable_selectors() -> dict[str, str]:
    """The series selector of each query variable's label_values(selector, label), by the variable's name."""
    return {v["name"]: re.fullmatch(r"label_values\((.+), *(\w+)\)", v["query"])[1]
            for v in DASHBOARD["templating"]["list"] if v["type"] == "query"}


def selectors(expr: str) -> list[tuple[str, str]]:
    """Each vector selector of a PromQL expression: its metric name and its label matchers as written ("" for
    none). Enough of PromQL for the dashboard's queries: a function or an aggregation is a word followed by
    "(", and a selector without a metric name ({__name__=...}) is not one it looks for."""
    text = LABEL_LIST.sub("", expr)
    found: list[tuple[str, str]] = []
    name_end = -1  # where the last metric name ended: matchers right after it are its own
    for token in PROMQL_TOKEN.finditer(text):
        word = token[0]
        if word.startswith("{"):
            if name_end >= 0 and not text[name_end:token.start()].strip():
                found[-1] = found[-1][0], word
        elif re.match(r"[a-zA-Z_:]", word) and word not in KEYWORDS and not text[token.end():].lstrip().startswith("("):
            found.append((word, ""))
            name_end = token.end()
            continue
        name_end = -1
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a histogram's as its _bucket, _sum or _count series)."""
    return {name for name, _ in selectors(expr)}


# ---- the ConfigMap ----

@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_the_chart_ships_the_dashboard_in_a_config_map_the_grafana_sidecar_loads(kube_version):
    rendered = render(ENABLED, kube_version)
    config_map = rendered.objects[CONFIG_MAP]
    # The chart's own labels, as on the workload, and the one the Grafana sidecar selects by default.
    assert config_map["metadata"]["labels"] == {**rendered.workload["metadata"]["labels"], "grafana_dashboard": "1"}
    assert "annotations" not in config_map["metadata"]
    # The file, byte for byte but for its final newline (which the |- block drops).
    assert config_map["data"] == {"vmafx-sidecar.json": DASHBOARD_FILE.read_text().removesuffix("\n")}
    assert json.loads(config_map["data"]["vmafx-sidecar.json"]) == DASHBOARD
    assert "ConfigMap demo-vmafx-node-dashboard" in rendered.notes


def test_no_dashboard_by_default():
    for values in ({}, ISSUE_VALUES):
        rendered = render(values, "1.33")
        assert "ConfigMap" not in rendered.kinds and "dashboard" not in rendered.notes


@pytest.mark.parametrize("switch", ["sidecar.trainer.enabled", "sidecar.trainer.metrics.enabled"])
def test_no_dashboard_without_the_metrics_it_shows(switch):
    rendered = render(merged(ENABLED, **{switch: False}), "1.33")
    assert "ConfigMap" not in rendered.kinds and "dashboard" not in rendered.notes


@pytest.mark.parametrize("labels, expected", [
    ({"team": "video"}, {"grafana_dashboard": "1", "team": "video"}),
    ({"grafana_dashboard": "vmafx"}, {"grafana_dashboard": "vmafx"}),  # a sidecar's labelValue
    ({"grafana_dashboard": None, "dashboards": "vmafx"}, {"dashboards": "vmafx"}),  # a sidecar's own label
    ({"app.kubernetes.io/name": "vmafx-dashboards"}, {"grafana_dashboard": "1",
                                                      "app.kubernetes.io/name": "vmafx-dashboards"}),
], ids=["extra", "value", "key", "over the chart's"])
def test_extra_labels_and_annotations_go_on_the_config_map(labels, expected):
    values = merged(ENABLED, **{"sidecar.trainer.metrics.dashboard.labels": labels,
                                "sidecar.trainer.metrics.dashboard.annotations": {"grafana_folder": "Video"}})
    rendered = render(values, "1.33")
    metadata = rendered.objects[CONFIG_MAP]["metadata"]
    assert metadata["labels"] == {**rendered.workload["metadata"]["labels"], **expected}
    assert metadata["annotations"] == {"grafana_folder": "Video"}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_helm_lint_strict_is_clean_with_the_dashboard(kube_version):
    report = helm.lint(CHART, ENABLED, strict=True, kube_version=f"v{kube_version}.0")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("dotted, value", [
    ("sidecar.trainer.metrics.dashboard.enabled", "true"), ("sidecar.trainer.metrics.dashboard.labels.team", 1),
    ("sidecar.trainer.metrics.dashboard.annotations.grafana_folder", True),
    ("sidecar.trainer.metrics.dashboard.labels", ["grafana_dashboard"]),
])
def test_schema_rejects_bad_dashboard_values_naming_them(dotted, value):
    assert_schema_refuses(merged(ENABLED, **{dotted: value}), dotted)


def test_schema_rejects_a_misspelt_dashboard_value():
    with pytest.raises(helm.HelmValuesError,
                       match="at '/sidecar/trainer/metrics/dashboard': additional properties 'label'"):
        render(merged(ENABLED, **{"sidecar.trainer.metrics.dashboard.label": {}}), "1.33")


# ---- the dashboard ----

def test_it_is_one_stable_dashboard_in_the_rows_of_the_issue():
    assert DASHBOARD["uid"] == "vmafx-sidecar"  # links and bookmarks outlive upgrades
    assert DASHBOARD["schemaVersion"] >= 39 and "id" not in DASHBOARD  # Grafana assigns ids
    assert list(rows()) == ROWS and all(rows().values())


def test_panel_ids_are_unique_and_titles_unique_within_each_row():
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), ids
    for row, members in rows().items():
        titles = [p["title"] for p in members]
        assert len(titles) == len(set(titles)), (row, titles)


def test_panels_fit_the_grid_without_overlapping():
    taken: dict[tuple[int, int], str] = {}
    for panel in DASHBOARD["panels"]:
        box = panel["gridPos"]
        assert box["x"] >= 0 and box["w"] > 0 and box["x"] + box["w"] <= 24, panel["title"]  # Grafana's 24 columns
        for cell in itertools.product(range(box["x"], box["x"] + box["w"]), range(box["y"], box["y"] + box["h"])):
            assert cell not in taken, f"{panel['title']} overlaps {taken[cell]}"
            taken[cell] = panel["title"]


def test_every_panel_queries_the_datasource_variable_and_sets_its_unit():
    for panel in panels():
        if panel["type"] == "row":
            assert "targets" not in panel
            continue
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert all(t["datasource"] == DATASOURCE for t in panel["targets"]), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        if panel["type"] != "table":
            assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]


def test_variables_pick_the_datasource_then_the_namespace_then_the_pods():
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "pod"]
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert variable_selectors() == {"namespace": "vmafx_sidecar_build_info",
                                    "pod": 'vmafx_sidecar_build_info{namespace="$namespace"}'}
    for name in ("namespace", "pod"):
        assert variables[name]["query"].endswith(f", {name})")
        assert variables[name]["datasource"] == DATASOURCE
    assert variables["pod"]["multi"] and variables["pod"]["includeAll"]
    assert not variables["namespace"]["multi"]


def test_every_variable_used_is_defined():
    defined = {v["name"] for v in DASHBOARD["templating"]["list"]} | set(GRAFANA_VARIABLES)
    used = set().union(*map(variable_names, [*panel_queries().values(), *variable_selectors().values()]),
                       variable_names(json.dumps([p.get("datasource") for p in panels()])))
    assert used <= defined, used - defined
    assert set(EXAMPLE_VALUES) == defined - set(GRAFANA_VARIABLES) - {"datasource"}


def test_every_series_is_the_selected_pods_and_rates_use_the_rate_interval():
    for name, expr in panel_queries().items():
        for metric, matchers in selectors(expr):
            assert 'namespace="$namespace"' in matchers and 'pod=~"$pod"' in matchers, (name, metric)
        windows = set(re.findall(r"\[([^\]]*)\]", expr))
        assert windows <= {"$__rate_interval", "$__range"}, (name, windows)


def test_metric_names_finds_the_selectors_and_nothing_else():
    expr = ('histogram_quantile(0.99, sum by (pod, le) (rate(a_seconds_bucket{job="x{y}", le!="1e3"}[5m])))'
            ' / on (pod) group_left (version) b_info offset 1m > bool 1e3 and c:recorded or time() - d')
    assert selectors(expr) == [("a_seconds_bucket", '{job="x{y}", le!="1e3"}'), ("b_info", ""), ("c:recorded", ""),
                               ("d", "")]
    assert metric_names("sum without (instance) (up) unless absent(nan_total{})") == {"up", "nan_total"}


def test_substitution_leaves_no_variable():
    queries = dashboard_queries()
    assert len(queries) == len(panel_queries()) > 20
    assert not any("$" in q or "[[" in q for q in queries)


# ---- Prometheus parses every query ----

def promtool_check(tmp_path, rules: dict[str, str]) -> subprocess.CompletedProcess:
    """`promtool check rules` on a file with each query as a recording rule, by name."""
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
        {"record": name, "expr": expr} for name, expr in rules.items()]}]}))
    promtool = system_program("promtool", "prometheus")
    return subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


def test_prometheus_parses_every_dashboard_query(tmp_path):
    rules = {name: substituted(expr) for name, expr in panel_queries().items()}
    checked = promtool_check(tmp_path, rules)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout


def test_promtool_refuses_a_query_with_a_typo(tmp_path):
    # The check above is worth something only if promtool parses the expressions, not just the YAML.
    broken = substituted('sum by (pod) (rate(vmafx_sidecar_train_steps_total{pod=~"$pod"}[$__rate_interval])')
    checked = promtool_check(tmp_path, {"panel_0_A": broken})
    assert checked.returncode != 0 and "panel_0_A" in checked.stdout + checked.stderr


# ---- the sidecar exports every metric the dashboard queries ----

def exported_names(exposition: str) -> set[str]:
    """The names a /metrics page's families give their series, from its # TYPE lines."""
    names = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
        names |= {family + suffix for suffix in ("_bucket", "_sum", "_count")} if kind == "histogram" else {family}
    return names


def test_every_metric_the_dashboard_queries_is_one_the_sidecar_exports(sidecar_factory):
    port = free_port()
    sidecar_factory(VMAFX_SIDECAR_METRICS_ADDR=f"127.0.0.1:{port}")
    status, _, body = http(port, b"GET /metrics HTTP/1.1\r\nHost: sidecar\r\n\r\n")
    assert status == 200
    exported = exported_names(body.decode())
    used = set().union(*map(metric_names, [*dashboard_queries(), *variable_selectors().values()]))
    missing = sorted(used - exported)
    assert not missing, f"the dashboard queries metrics the sidecar does not export: {missing}"
