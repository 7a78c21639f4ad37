"""The Helm chart in chart/: rendered by the real Helm engine (helm-python-sdk) for a given Kubernetes
version, every manifest validated against that version's API schemas (kubernetes-validate, strict)."""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tomllib

import helm_python as helm
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from helm_python import _native

import vmafx_sidecar as vs
from conftest import ROOT

CHART = ROOT / "chart"
SOCKET = "/tmp/vmafx-sidecar.sock"
PROBE = ["/usr/bin/python3", "-m", "vmafx_sidecar", "probe", "--socket", SOCKET]
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's: parses the manifests ~10x faster
# kubernetes-validate reads a version's whole _definitions.json again for every object it validates (it
# only reads the schemas, never changes them): read each file once.
kubernetes_validate.utils.schema_contents = functools.cache(kubernetes_validate.utils.schema_contents)
KUBE_VERSIONS = ["1.28", "1.29", "1.33"]

# The values of issue #6, as users pass them to `helm install`.
ISSUE_VALUES = yaml.safe_load("""
sidecar:
  trainer:
    enabled: true
    image:
      repository: ghcr.io/vmafx/vmafx-sidecar
      tag: latest
    baseModelPath: /mnt/vmafx-models/base/fr_regressor_v3.onnx
    checkpointDir: /mnt/vmafx-models/online
    nFeatures: 80
    resources:
      requests: {cpu: "0.5", memory: "512Mi"}
      limits: {cpu: "2", memory: "1Gi"}
persistence:
  models:
    enabled: true
    mountPath: /mnt/vmafx-models
""")

# Each trainer value and the sidecar setting it must set (issue #6).
TRAINER_ENV = {
    "baseModelPath": "VMAFX_BASE_MODEL_PATH",
    "checkpointDir": "VMAFX_SIDECAR_CHECKPOINT_DIR",
    "replayBufferSize": "VMAFX_SIDECAR_REPLAY_CAPACITY",
    "batchSize": "VMAFX_SIDECAR_BATCH_SIZE",
    "replayMixRatio": "VMAFX_SIDECAR_REPLAY_MIX",
    "learningRate": "VMAFX_SIDECAR_LR",
    "emaDecay": "VMAFX_SIDECAR_EMA_DECAY",
    "checkpointIntervalSeconds": "VMAFX_SIDECAR_CKPT_INTERVAL_S",
    "minSamplesPerCheckpoint": "VMAFX_SIDECAR_MIN_SAMPLES_CKPT",
    "nFeatures": "VMAFX_SIDECAR_N_FEATURES",
    "cuda": "VMAFX_SIDECAR_CUDA",
}

METRICS_ENV = {"name": "VMAFX_SIDECAR_METRICS_ADDR", "value": ":9464"}  # the chart's default (issue #7)
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
PROMETHEUS_RULE_API = "monitoring.coreos.com/v1/PrometheusRule"
# The Prometheus operator's Duration, as its CRDs validate it.
PROMETHEUS_DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


@dataclasses.dataclass
class Rendered:
    objects: dict[tuple[str, str], dict]  # by kind and name
    notes: str

    @property
    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.objects]

    def one(self, kind: str) -> dict:
        """The object of that kind, which must be the only one."""
        [found] = [obj for (k, _), obj in self.objects.items() if k == kind]
        return found

    @property
    def workload(self) -> dict:
        """The Deployment or the StatefulSet: the chart renders exactly one of them."""
        [found] = [obj for (kind, _), obj in self.objects.items() if kind in ("Deployment", "StatefulSet")]
        return found

    @property
    def pod(self) -> dict:
        return self.workload["spec"]["template"]["spec"]

    def container(self, name: str) -> dict:
        [found] = [c for c in self.pod["containers"] + self.pod.get("initContainers", []) if c["name"] == name]
        return found


def render(values: dict, kube_version: str, api_versions: tuple[str, ...] = (), release: str = "demo") -> Rendered:
    """`helm template --kube-version [--api-versions ...]`, plus strict schema validation of every
    manifest for that version.

    Chart.render has neither kube_version nor api_versions, but the native call under it has both:
    this is the one place that uses them. Its options are decoded strictly (an unknown key is an
    error); the 1.28 placement test fails if the version were ever ignored (Helm's default is newer),
    and the ServiceMonitor tests if the API versions were (like `helm template --api-versions`, they
    add to Helm's built-in set, which has no monitoring.coreos.com)."""
    with helm.Chart.load(CHART) as chart:
        options = {"name": release, "namespace": "vmafx", "is_install": True, "kube_version": f"v{kube_version}.0",
                   "api_versions": list(api_versions)}
        files = json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(options)))
    objects, notes = {}, ""
    for name, text in files.items():
        if name.endswith("NOTES.txt"):
            notes = text
            continue
        for obj in yaml.load_all(text, Loader=SAFE_LOADER):
            if obj:
                if obj["kind"] in CUSTOM_RESOURCE_CHECKS:  # CRDs: kubernetes-validate has no schema for them
                    CUSTOM_RESOURCE_CHECKS[obj["kind"]](obj)
                else:
                    kubernetes_validate.validate(obj, kube_version, strict=True)
                key = obj["kind"], obj["metadata"]["name"]
                assert key not in objects, key
                objects[key] = obj
    return Rendered(objects, notes)


def check_service_monitor(obj: dict) -> None:
    """The part of the monitoring.coreos.com/v1 ServiceMonitor schema the chart uses, checked strictly."""
    assert obj.keys() == {"apiVersion", "kind", "metadata", "spec"}, obj.keys()
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["metadata"].keys() == {"name", "labels"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", obj["metadata"]["name"])
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in obj["metadata"]["labels"].items())
    spec = obj["spec"]
    assert spec.keys() == {"selector", "namespaceSelector", "endpoints"}, spec.keys()
    assert spec["selector"].keys() == {"matchLabels"}
    assert all(isinstance(v, str) for v in spec["selector"]["matchLabels"].values())
    assert spec["namespaceSelector"].keys() == {"matchNames"}
    assert all(isinstance(n, str) for n in spec["namespaceSelector"]["matchNames"])
    assert spec["endpoints"], spec
    for endpoint in spec["endpoints"]:
        assert endpoint.keys() == {"port", "path", "interval"}, endpoint.keys()
        assert isinstance(endpoint["port"], str) and endpoint["path"].startswith("/")
        assert isinstance(endpoint["interval"], str) and PROMETHEUS_DURATION.match(endpoint["interval"])


def check_prometheus_rule(obj: dict) -> None:
    """The part of the monitoring.coreos.com/v1 PrometheusRule schema the chart uses, checked strictly (what
    the rules mean, promtool checks: tests/test_alerts.py)."""
    assert obj.keys() == {"apiVersion", "kind", "metadata", "spec"}, obj.keys()
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["metadata"].keys() == {"name", "labels"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", obj["metadata"]["name"])
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in obj["metadata"]["labels"].items())
    assert obj["spec"].keys() == {"groups"}
    for group in obj["spec"]["groups"]:
        assert group.keys() == {"name", "rules"} and isinstance(group["name"], str) and group["rules"], group
        for rule in group["rules"]:
            assert isinstance(rule["expr"], str)
            if "record" in rule:
                assert rule.keys() == {"record", "expr"}, rule.keys()
            else:
                assert rule.keys() <= {"alert", "expr", "for", "labels", "annotations"}, rule.keys()
                assert PROMETHEUS_DURATION.match(rule["for"])
                for mapping in (rule["labels"], rule["annotations"]):
                    assert all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()), mapping


CUSTOM_RESOURCE_CHECKS = {"ServiceMonitor": check_service_monitor, "PrometheusRule": check_prometheus_rule}


def merged(base: dict, **overrides: object) -> dict:
    """Copy of `base` with dotted keys set: merged(v, **{"persistence.models.enabled": False})."""
    values = copy.deepcopy(base)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = values
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return values


def env_of(container: dict) -> dict[str, object]:
    """Each variable's value, or its valueFrom."""
    return {e["name"]: e["value"] if "value" in e else e["valueFrom"] for e in container.get("env", [])}


def resolved_env(container: dict, pod_name: str) -> dict[str, str]:
    """The environment the kubelet gives this container in pod `pod_name`: metadata.name from the downward
    API, and each $(VAR) in a value replaced by an earlier entry's value (a later or unknown one is left as
    written, as Kubernetes does)."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "valueFrom" in entry:
            assert entry["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, entry
            env[entry["name"]] = pod_name
        else:
            env[entry["name"]] = re.sub(r"\$\(([^)]+)\)", lambda m: env.get(m[1], m[0]), entry["value"])
    return env


# Issue #13: several pods, each with a trainer of its own on the one ReadWriteMany claim.
SCALE_OUT = {"node.replicas": 3, "persistence.models.accessModes": ["ReadWriteMany"]}

VARIANTS = {
    "issue values": ISSUE_VALUES,
    "chart defaults": {},
    "trainer disabled": merged(ISSUE_VALUES, **{"sidecar.trainer.enabled": False}),
    "persistence off": merged(ISSUE_VALUES, **{"persistence.models.enabled": False}),
    "existingClaim": merged(ISSUE_VALUES, **{"persistence.models.existingClaim": "vmafx-models"}),
    "native sidecar forced": merged(ISSUE_VALUES, **{"sidecar.trainer.nativeSidecar": True}),
    "native sidecar off": merged(ISSUE_VALUES, **{"sidecar.trainer.nativeSidecar": False}),
    "metrics off": merged(ISSUE_VALUES, **{"sidecar.trainer.metrics.enabled": False}),
    "serviceMonitor": merged(ISSUE_VALUES, **{"sidecar.trainer.metrics.serviceMonitor": {
        "enabled": True, "interval": "15s", "labels": {"release": "prometheus"}}}),
    "replicas 3": merged(ISSUE_VALUES, **SCALE_OUT),
    "replicas 3, existingClaim": merged(ISSUE_VALUES, **{"node.replicas": 3,
                                                         "persistence.models.existingClaim": "vmafx-models"}),
    "replicas 3, persistence off": merged(ISSUE_VALUES, **{"node.replicas": 3, "persistence.models.enabled": False}),
    "replicas 3, fleet": merged(ISSUE_VALUES, **SCALE_OUT, **{"fleet.enabled": True}),  # issue #17
}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_renders_valid_manifests(variant, kube_version):
    rendered = render(VARIANTS[variant], kube_version)
    assert rendered.workload and rendered.notes


@pytest.mark.parametrize("kube_version, native", [("1.28", False), ("1.29", True), ("1.33", True)])
def test_trainer_is_a_native_sidecar_from_kubernetes_1_29(kube_version, native):
    pod = render(ISSUE_VALUES, kube_version).pod
    assert [c["name"] for c in pod["containers"]] == ["vmafx-node"] + ([] if native else ["trainer"])
    if native:
        [trainer] = pod["initContainers"]
        assert trainer["name"] == "trainer" and trainer["restartPolicy"] == "Always"
    else:
        assert "initContainers" not in pod
        assert "restartPolicy" not in pod["containers"][1]


@pytest.mark.parametrize("forced, kube_version", [(True, "1.28"), (False, "1.33")])
def test_native_sidecar_can_be_forced(forced, kube_version):
    pod = render(merged(ISSUE_VALUES, **{"sidecar.trainer.nativeSidecar": forced}), kube_version).pod
    in_init = [c["name"] for c in pod.get("initContainers", [])] == ["trainer"]
    in_containers = "trainer" in [c["name"] for c in pod["containers"]]
    assert (in_init, in_containers) == (forced, not forced)


@pytest.mark.parametrize("kube_version", ["1.28", "1.33"])
def test_trainer_probes_ping_the_socket_both_containers_use(kube_version):
    rendered = render(ISSUE_VALUES, kube_version)
    trainer = rendered.container("trainer")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert trainer[kind]["exec"]["command"][:len(PROBE)] == PROBE, kind
    assert env_of(trainer)["VMAFX_SIDECAR_SOCKET"] == SOCKET
    assert env_of(rendered.container("vmafx-node"))["VMAFX_SIDECAR_SOCKET"] == SOCKET
    assert "livenessProbe" not in rendered.container("vmafx-node")


def test_trainer_image_defaults_to_the_app_version_which_is_the_project_version():
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert app_version == project["version"]
    trainer = render({}, "1.33").container("trainer")
    assert trainer["image"] == f"ghcr.io/vmafx/vmafx-sidecar:{app_version}"
    assert trainer["args"] == ["serve"]
    assert render(ISSUE_VALUES, "1.33").container("trainer")["image"] == "ghcr.io/vmafx/vmafx-sidecar:latest"


ALL_SETTINGS = {
    "baseModelPath": "/mnt/vmafx-models/base/fr_regressor_v3.onnx",
    "checkpointDir": "/mnt/vmafx-models/online/run-7",
    "replayBufferSize": 1000000,
    "batchSize": 64,
    "replayMixRatio": 0.25,
    "learningRate": 0.0001,
    "emaDecay": 0.9995,
    "checkpointIntervalSeconds": 30.5,
    "minSamplesPerCheckpoint": 200000,
    "nFeatures": 120,
    "cuda": 1,
}
BOUNDARIES = {"baseModelPath": "", "replayMixRatio": 0, "emaDecay": 0, "checkpointIntervalSeconds": 0,
              "minSamplesPerCheckpoint": 0, "batchSize": 1, "replayBufferSize": 1, "nFeatures": 1, "cuda": "0"}


@pytest.mark.parametrize("settings", [
    ALL_SETTINGS,
    {**ALL_SETTINGS, "learningRate": 1e-05, "cuda": "1"},
    {**ALL_SETTINGS, "cuda": "require"},
    {**ALL_SETTINGS, "learningRate": 1e-7, "replayBufferSize": 123456789},
    {**ALL_SETTINGS, **BOUNDARIES},
], ids=["all", "lr 1e-05", "cuda require", "lr 1e-7", "boundaries"])
def test_every_trainer_value_becomes_its_setting_exactly(settings):
    assert set(settings) == set(TRAINER_ENV)
    values = merged(ISSUE_VALUES, **{f"sidecar.trainer.{key}": value for key, value in settings.items()})
    trainer = render(values, "1.33").container("trainer")
    env = env_of(trainer)
    assert [e["name"] for e in trainer["env"]][:2] == ["VMAFX_SIDECAR_SOCKET", "VMAFX_SIDECAR_METRICS_ADDR"]
    assert set(env) == {"VMAFX_SIDECAR_SOCKET", "VMAFX_SIDECAR_METRICS_ADDR", *TRAINER_ENV.values(),
                        "VMAFX_SIDECAR_ADOPT_DIR",  # set by the chart (issue #13)
                        *(["CUPY_CACHE_DIR"] if str(settings["cuda"]) != "0" else [])}
    assert all("e+" not in text for text in env.values()), env  # quote's 1e+06 would not parse as an integer
    # What the sidecar itself reads from that environment is exactly what was set.
    config = vs.Config.load(env, {})
    by_env = {f.metadata["env"]: f.name for f in dataclasses.fields(vs.Config)}
    for key, value in settings.items():
        assert getattr(config, by_env[TRAINER_ENV[key]]) == (str(value) if key == "cuda" else value), key
    assert config.adopt_dir == f"{settings['checkpointDir']}/demo-vmafx-node-0"


@pytest.mark.parametrize("cuda", [{"sidecar.trainer.cuda": 1}, {"sidecar.trainer.cuda": "require"},
                                  {"sidecar.trainer.extraEnv": [{"name": "VMAFX_SIDECAR_CUDA", "value": "1"}]},
                                  {"sidecar.trainer.cuda": "0"}, {}],
                         ids=["cuda 1", "cuda require", "in extraEnv", "cuda 0", "unset"])
def test_with_cuda_on_cupy_compiles_its_kernels_on_the_writable_tmp(cuda):
    """CuPy's default, $HOME/.cupy/kernel_cache, is on the read-only root filesystem: the first kernel it
    compiles, in the first step, would fail there."""
    rendered = render(merged(VARIANTS["replicas 3, fleet"], **cuda), "1.33")
    fleet = rendered.one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    on = cuda.get("sidecar.trainer.cuda", "1" if cuda else "0") != "0"
    for container in (rendered.container("trainer"), fleet["containers"][0]):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        cache = env_of(container).get("CUPY_CACHE_DIR")
        assert cache == ("/tmp/cupy-kernel-cache" if on else None), container["name"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/tmp"] == "tmp"
    assert {v["name"]: v for v in fleet["volumes"]}["tmp"]["emptyDir"] == {}
    assert {v["name"]: v for v in rendered.pod["volumes"]}["tmp"]["emptyDir"] == {}


@pytest.mark.parametrize("metrics", [True, False], ids=["metrics on", "metrics off"])
def test_unset_trainer_values_keep_the_sidecar_defaults_and_extra_env_comes_last(metrics):
    extra = [{"name": "VMAFX_SIDECAR_LOG_LEVEL", "value": "debug"}]
    values = {"sidecar": {"trainer": {"extraEnv": extra, "metrics": {"enabled": metrics}}}}
    trainer = render(values, "1.33").container("trainer")
    assert trainer["env"] == [{"name": "VMAFX_SIDECAR_SOCKET", "value": SOCKET}] + [METRICS_ENV] * metrics + extra


@pytest.mark.parametrize("variant, claim", [
    ("issue values", "demo-vmafx-node-models"), ("existingClaim", "vmafx-models"), ("persistence off", None),
    ("replicas 3", "demo-vmafx-node-models"), ("replicas 3, existingClaim", "vmafx-models")])
def test_both_containers_mount_the_socket_dir_and_the_models_volume(variant, claim):
    rendered = render(VARIANTS[variant], "1.33")
    volumes = {v["name"]: v for v in rendered.pod["volumes"]}
    assert volumes["tmp"]["emptyDir"] == {}
    if claim:
        assert volumes["models"]["persistentVolumeClaim"] == {"claimName": claim}
    else:  # the read-only root filesystem leaves the trainer nowhere else to write
        assert volumes["models"]["emptyDir"] == {}
        assert "checkpoints are lost with the pod" in rendered.notes
    pvc = rendered.one("PersistentVolumeClaim") if "PersistentVolumeClaim" in rendered.kinds else None
    assert (pvc["metadata"]["name"] if pvc else None) == (None if "existingClaim" in variant else claim)
    if pvc:  # checkpoints and state must survive `helm uninstall`
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for name, read_only in [("trainer", False), ("vmafx-node", True)]:
        mounts = {m["mountPath"]: m for m in rendered.container(name)["volumeMounts"]}
        assert mounts["/tmp"]["name"] == "tmp"
        assert mounts["/mnt/vmafx-models"]["name"] == "models"
        assert mounts["/mnt/vmafx-models"].get("readOnly", False) == read_only


def test_checkpoints_are_announced_where_the_trainer_writes_them():
    notes = render({"persistence": {"models": {"enabled": True}}}, "1.33").notes
    assert f"{vs.Config.checkpoint_dir}/latest.json" in notes  # unset: the sidecar's default
    assert f"{vs.Config.checkpoint_dir}/{vs.LATEST_MODEL} and {vs.LATEST_MODEL}.sha256" in notes
    assert "/mnt/x/ckpt/latest.json" in render(merged(
        ISSUE_VALUES, **{"persistence.models.mountPath": "/mnt/x", "sidecar.trainer.checkpointDir": "/mnt/x/ckpt"}),
        "1.33").notes


def test_without_the_trainer_only_vmafx_node_runs():
    rendered = render(VARIANTS["trainer disabled"], "1.33")
    assert [c["name"] for c in rendered.pod["containers"]] == ["vmafx-node"]
    assert "initContainers" not in rendered.pod
    assert "VMAFX_SIDECAR_SOCKET" not in env_of(rendered.container("vmafx-node"))


@pytest.mark.parametrize("kube_version", ["1.28", "1.33"])
def test_both_containers_run_locked_down_as_one_non_root_user(kube_version):
    pod = render(ISSUE_VALUES, kube_version).pod
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                      "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
    for container in pod["containers"] + pod.get("initContainers", []):
        # No per-container user: the pod's, the same for both, so vmafx-node may open the 0600 socket.
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                "capabilities": {"drop": ["ALL"]}}, container["name"]


def test_node_values_configure_the_vmafx_node_container_and_pod():
    node = {"image": {"repository": "registry.example/vmafx-node", "tag": "2.3.1", "pullPolicy": "Always"},
            "replicas": 3, "env": [{"name": "VMAFX_NODE_WORKERS", "value": "8"}],
            "resources": {"limits": {"cpu": "4", "memory": "8Gi"}},
            "nodeSelector": {"vmafx.io/pool": "encode"},
            "tolerations": [{"key": "encode", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}}}
    rendered = render({"node": node}, "1.33")
    container = rendered.container("vmafx-node")
    assert rendered.one("Deployment")["spec"]["replicas"] == 3
    assert (container["image"], container["imagePullPolicy"]) == ("registry.example/vmafx-node:2.3.1", "Always")
    assert container["env"] == [{"name": "VMAFX_SIDECAR_SOCKET", "value": SOCKET}] + node["env"]
    assert container["resources"] == node["resources"]
    assert {k: rendered.pod[k] for k in ("nodeSelector", "tolerations", "affinity")} == \
        {k: node[k] for k in ("nodeSelector", "tolerations", "affinity")}
    assert render(ISSUE_VALUES, "1.33").container("trainer")["resources"] == ISSUE_VALUES["sidecar"]["trainer"]["resources"]


@pytest.mark.parametrize("release", ["demo", "vmafx-sidecar"])
def test_no_pod_gets_variables_for_the_namespaces_services(release):
    """Kubernetes would give each container <SERVICE>_HOST and _PORT... variables for every Service of the
    namespace; those of a Service named vmafx-sidecar-... start VMAFX_SIDECAR_, which the trainer warns of as
    unknown settings at every start. The chart's own metrics Service is one, with the release vmafx-sidecar."""
    for values in (ISSUE_VALUES, FLEET):
        rendered = render(values, "1.33", release=release)
        pods = [rendered.pod] + ([fleet_pod(rendered)] if "CronJob" in rendered.kinds else [])
        assert [pod["enableServiceLinks"] for pod in pods] == [False] * len(pods)
    service = rendered.objects["Service", f"{release}-vmafx-node-metrics"]
    link = service["metadata"]["name"].upper().replace("-", "_") + "_SERVICE_HOST"
    known = {f.metadata["env"] for f in dataclasses.fields(vs.Config)}
    assert link.startswith(vs.ENV_PREFIX) == (release == "vmafx-sidecar") and link not in known


@pytest.mark.parametrize("mount_path", ["/m #x", "/m: x", "/mnt/vmafx-models"])
def test_paths_and_names_are_rendered_as_written(mount_path):
    """Unquoted, YAML would cut "/m #x" at its comment, refuse "/m: x", and read a class named 123 as a number."""
    values = merged(FLEET, **{"persistence.models.mountPath": mount_path,
                              "sidecar.trainer.checkpointDir": f"{mount_path}/online",
                              "persistence.models.storageClassName": "123"})
    rendered = render(values, "1.33")
    [fleet] = fleet_pod(rendered)["containers"]
    for container in (rendered.container("trainer"), rendered.container("vmafx-node"), fleet):
        assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["models"] == mount_path, container["name"]
    assert rendered.one("PersistentVolumeClaim")["spec"]["storageClassName"] == "123"
    claimed = render(merged(values, **{"persistence.models.existingClaim": "123"}), "1.33")
    for pod in (claimed.pod, fleet_pod(claimed)):
        assert {v["name"]: v for v in pod["volumes"]}["models"]["persistentVolumeClaim"] == {"claimName": "123"}


def test_one_trainer_at_a_time_owns_a_persistent_checkpoint_dir():
    # A rolling update would start the new pod's trainer beside the old one's, on the same directory.
    assert render(ISSUE_VALUES, "1.33").one("Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    # Each pod has its own emptyDir: nothing to share.
    spec = render(merged(VARIANTS["persistence off"], **{"node.replicas": 2}), "1.33").one("Deployment")["spec"]
    assert spec["replicas"] == 2 and "strategy" not in spec


def test_checkpoint_dir_outside_the_writable_volume_is_refused():
    with pytest.raises(helm.HelmRenderError, match="must be under persistence.models.mountPath"):
        render(merged(ISSUE_VALUES, **{"persistence.models.mountPath": "/data"}), "1.33")


def extra_env(**settings: str) -> dict:
    return {"sidecar.trainer.extraEnv": [{"name": name, "value": value} for name, value in settings.items()]}


DEFAULT_REPLAY, DEFAULT_BATCH = vs.Config.replay_capacity, vs.Config.batch_size  # what an unset value leaves


@pytest.mark.parametrize("overrides, replay, batch, refusal", [
    ({"sidecar.trainer.replayBufferSize": 16}, 16, DEFAULT_BATCH,
     f"sidecar.trainer.replayBufferSize (16) must be at least sidecar.trainer.batchSize ({DEFAULT_BATCH}, "
     "the sidecar's default)"),
    ({"sidecar.trainer.replayBufferSize": 63, "sidecar.trainer.batchSize": 64}, 63, 64,
     "sidecar.trainer.replayBufferSize (63) must be at least sidecar.trainer.batchSize (64)"),
    ({"sidecar.trainer.batchSize": DEFAULT_REPLAY + 1}, DEFAULT_REPLAY, DEFAULT_REPLAY + 1,
     f"sidecar.trainer.replayBufferSize ({DEFAULT_REPLAY}, the sidecar's default) must be at least "
     f"sidecar.trainer.batchSize ({DEFAULT_REPLAY + 1})"),
    ({"sidecar.trainer.replayBufferSize": 10**12, "sidecar.trainer.batchSize": 2 * 10**12}, 10**12, 2 * 10**12,
     "sidecar.trainer.replayBufferSize (1000000000000) must be at least sidecar.trainer.batchSize (2000000000000)"),
    # extraEnv comes last in the env: its value is the one the sidecar reads.
    ({"sidecar.trainer.replayBufferSize": 100, **extra_env(VMAFX_SIDECAR_BATCH_SIZE="128")}, 100, 128,
     "sidecar.trainer.replayBufferSize (100) must be at least VMAFX_SIDECAR_BATCH_SIZE in sidecar.trainer.extraEnv "
     "(128)"),
    ({"sidecar.trainer.replayBufferSize": 1000, **extra_env(VMAFX_SIDECAR_REPLAY_CAPACITY="10")}, 10, DEFAULT_BATCH,
     f"VMAFX_SIDECAR_REPLAY_CAPACITY in sidecar.trainer.extraEnv (10) must be at least sidecar.trainer.batchSize "
     f"({DEFAULT_BATCH}, the sidecar's default)"),
], ids=["below the default batch", "below the batch", "the default ring below the batch", "large",
        "below a batch in extraEnv", "a ring in extraEnv below the default batch"])
def test_a_replay_ring_smaller_than_a_batch_is_refused_naming_both(overrides, replay, batch, refusal):
    # The sidecar would exit at start-up with these sizes...
    with pytest.raises(vs.ConfigError, match="VMAFX_SIDECAR_REPLAY_CAPACITY: must be >= VMAFX_SIDECAR_BATCH_SIZE"):
        vs.Config.load({"VMAFX_SIDECAR_REPLAY_CAPACITY": str(replay), "VMAFX_SIDECAR_BATCH_SIZE": str(batch)}, {})
    # ...so the chart refuses them, the fleet's CronJob included.
    for values in (ISSUE_VALUES, FLEET):
        with pytest.raises(helm.HelmRenderError) as refused:
            render(merged(values, **overrides), "1.33")
        assert f"{refusal}: the sidecar refuses to start" in str(refused.value)


@pytest.mark.parametrize("overrides", [
    {"sidecar.trainer.replayBufferSize": DEFAULT_BATCH},
    {"sidecar.trainer.replayBufferSize": 64, "sidecar.trainer.batchSize": 64},
    {"sidecar.trainer.replayBufferSize": 16, **extra_env(VMAFX_SIDECAR_REPLAY_CAPACITY="100")},
    {"sidecar.trainer.replayBufferSize": 16, "sidecar.trainer.batchSize": 64,
     **extra_env(VMAFX_SIDECAR_BATCH_SIZE="16")},
    {"sidecar.trainer.replayBufferSize": 16, "sidecar.trainer.enabled": False},
], ids=["equal to the default batch", "equal", "a larger ring in extraEnv", "a smaller batch in extraEnv",
        "no trainer"])
def test_a_replay_ring_at_least_a_batch_is_taken_as_the_sidecar_takes_it(overrides):
    rendered = render(merged(ISSUE_VALUES, **overrides), "1.33")
    if overrides.get("sidecar.trainer.enabled", True):
        config = vs.Config.load(resolved_env(rendered.container("trainer"), f"{FULLNAME}-0"), {})
        assert config.replay_capacity >= config.batch_size


# The trainer's variables the chart derives from other values, and the value that sets each instead.
CHART_ENV = {
    "VMAFX_SIDECAR_SOCKET": "remove it: vmafx-node and the probes use the chart's socket, /tmp/vmafx-sidecar.sock",
    "VMAFX_SIDECAR_METRICS_ADDR": "set sidecar.trainer.metrics.port (or metrics.enabled) instead",
    "VMAFX_SIDECAR_CHECKPOINT_DIR": "set sidecar.trainer.checkpointDir instead",
    "VMAFX_SIDECAR_ADOPT_DIR": "it follows sidecar.trainer.checkpointDir and node.replicas: set those instead",
    "VMAFX_SIDECAR_SAMPLE_LOG": "set fleet.enabled instead",
    "VMAFX_SIDECAR_SAMPLE_LOG_MAX_BYTES": "set fleet.sampleLogMaxBytes instead",
}


def test_the_chart_derives_exactly_those_variables():
    """Every variable the chart sets on the trainer, but the trainer values' own, which are only passed on
    (extraEnv may set them: the checks read them there), and POD_NAME, which the sidecar does not read (the
    chart's $(POD_NAME) is expanded with the chart's entry, before any in extraEnv). checkpointDir's variable
    is derived: each replica's directory, the one it takes over, the fleet's root."""
    values = merged(VARIANTS["replicas 3, fleet"], **{"fleet.sampleLogMaxBytes": 10**9})
    chart_set = set(env_of(render(values, "1.33").container("trainer")))
    assert chart_set - set(TRAINER_ENV.values()) - {"POD_NAME"} | {"VMAFX_SIDECAR_CHECKPOINT_DIR"} == set(CHART_ENV)


@pytest.mark.parametrize("name", CHART_ENV)
@pytest.mark.parametrize("variant", ["chart defaults", "issue values", "replicas 3, fleet"])
def test_extra_env_setting_a_variable_the_chart_derives_is_refused_naming_the_value_instead(variant, name):
    """Last in the env, it would win in the trainer alone: the probes and vmafx-node would keep the chart's socket,
    the Service and scrape its metrics port; every replica would have the same directory, its adoption directory
    too (the sidecar exits 2), or one on the read-only root filesystem."""
    for entry in ({"name": name, "value": "/mnt/vmafx-models/online"},
                  {"name": name, "valueFrom": {"configMapKeyRef": {"name": "vmafx", "key": "dir"}}}):
        with pytest.raises(helm.HelmRenderError) as refused:
            render(merged(VARIANTS[variant], **{"sidecar.trainer.extraEnv": [entry]}), "1.33")
        assert f"sidecar.trainer.extraEnv sets {name}, which the chart sets itself; {CHART_ENV[name]}" in str(
            refused.value)


def test_extra_env_setting_other_variables_is_taken():
    extra = [{"name": "VMAFX_SIDECAR_LOG_LEVEL", "value": "debug"}, {"name": "VMAFX_SIDECAR_LR", "value": "0.001"},
             {"name": "VMAFX_SIDECAR_KEEP_CHECKPOINTS", "value": "200"}]
    for variant in ("chart defaults", "issue values", "replicas 3, fleet"):
        trainer = render(merged(VARIANTS[variant], **{"sidecar.trainer.extraEnv": extra}), "1.33").container("trainer")
        assert trainer["env"][-len(extra):] == extra
    # Without the trainer extraEnv is nobody's.
    assert render(merged(VARIANTS["trainer disabled"], **{"sidecar.trainer.extraEnv": [
        {"name": "VMAFX_SIDECAR_SOCKET", "value": "/tmp/x.sock"}]}), "1.33").workload


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", ["chart defaults", "issue values", "metrics off", "serviceMonitor", "replicas 3"])
def test_helm_lint_strict_is_clean(variant, kube_version):
    report = helm.lint(CHART, VARIANTS[variant], strict=True, kube_version=f"v{kube_version}.0")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


def assert_schema_refuses(values: dict, dotted: str) -> None:
    """Rendering `values` fails on the schema, at the value `dotted` names (a.b.c)."""
    location = "/" + dotted.replace(".", "/")
    with pytest.raises(helm.HelmValuesError, match=f"at '{location}'"):
        render(values, "1.33")


@pytest.mark.parametrize("dotted, value", [
    ("sidecar.trainer.replayMixRatio", 1), ("sidecar.trainer.replayMixRatio", -0.1),
    ("sidecar.trainer.batchSize", 0), ("sidecar.trainer.batchSize", 2.5), ("sidecar.trainer.batchSize", "32"),
    ("sidecar.trainer.replayBufferSize", 0), ("sidecar.trainer.learningRate", 0),
    ("sidecar.trainer.emaDecay", 1), ("sidecar.trainer.checkpointIntervalSeconds", -1),
    ("sidecar.trainer.minSamplesPerCheckpoint", -1), ("sidecar.trainer.nFeatures", 0),
    ("sidecar.trainer.cuda", 2), ("sidecar.trainer.cuda", True), ("sidecar.trainer.checkpointDir", "online"),
    # A YAML block's last newline, or a space: the sidecar refuses them, and the pod would crash-loop.
    ("sidecar.trainer.checkpointDir", "/mnt/vmafx-models/online "), ("sidecar.trainer.baseModelPath", "/mnt/b.onnx\n"),
    ("sidecar.trainer.baseModelPath", " /mnt/b.onnx"), ("sidecar.trainer.checkpointDir", "/mnt/online\u00a0"),
    ("sidecar.trainer.baseModelPath", "\u3000/mnt/b.onnx"), ("sidecar.trainer.checkpointDir", "/mnt/online\x0b"),
    ("sidecar.trainer.nativeSidecar", "yes"), ("sidecar.trainer.enabled", "true"),
    ("node.replicas", -1), ("persistence.models.mountPath", "/"),
    ("sidecar.trainer.metrics.port", 0), ("sidecar.trainer.metrics.port", 70000),
    ("sidecar.trainer.metrics.port", "9464"), ("sidecar.trainer.metrics.enabled", "true"),
    ("sidecar.trainer.metrics.serviceMonitor.interval", 5), ("sidecar.trainer.metrics.serviceMonitor.interval", "5"),
    ("sidecar.trainer.metrics.serviceMonitor.labels.release", 1),
])
def test_schema_rejects_bad_values_naming_them(dotted, value):
    assert_schema_refuses(merged(ISSUE_VALUES, **{dotted: value}), dotted)


@pytest.mark.parametrize("dotted, value", [
    ("sidecar.trainer.checkpointDir", "/mnt/vmafx-models/on line/café"), ("sidecar.trainer.baseModelPath", ""),
    ("sidecar.trainer.baseModelPath", "/mnt/vmafx-models/base/my model.onnx")])
def test_schema_takes_a_path_with_spaces_inside_or_outside_ascii(dotted, value):
    render(merged(ISSUE_VALUES, **{dotted: value}), "1.33")


def test_schema_rejects_a_misspelt_trainer_value():
    # Accepted, it would silently leave the setting at the sidecar's default.
    with pytest.raises(helm.HelmValuesError, match="at '/sidecar/trainer': additional properties 'learningrate'"):
        render(merged(ISSUE_VALUES, **{"sidecar.trainer.learningrate": 0.001}), "1.33")


def test_schema_rejects_a_misspelt_metrics_value():
    with pytest.raises(helm.HelmValuesError, match="at '/sidecar/trainer/metrics': additional properties 'Port'"):
        render(merged(ISSUE_VALUES, **{"sidecar.trainer.metrics.Port": 9100}), "1.33")
    with pytest.raises(helm.HelmValuesError,
                       match="at '/sidecar/trainer/metrics/serviceMonitor': additional properties 'label'"):
        render(merged(ISSUE_VALUES, **{"sidecar.trainer.metrics.serviceMonitor.label": {}}), "1.33")



def test_the_runbooks_commands_run_in_the_trainer_container_with_the_images_interpreter():
    """The image is distroless with pip's console scripts removed: no shell and no vmafx-sidecar script. A
    command on-call runs in a pod is `kubectl exec <pod> -c <container> -- <command>`, into a container the pod
    has, with the interpreter the probes run, and one the sidecar's parser takes."""
    readme = (CHART / "README.md").read_text()
    rendered = render(VARIANTS["replicas 3, fleet"], "1.33")
    containers = [c["name"] for c in rendered.pod["containers"] + rendered.pod.get("initContainers", [])]
    commands = re.findall(r"`kubectl exec <pod> -c (\S+) -- ([^`]+)`", " ".join(readme.split()))
    assert {command.split()[3] for _, command in commands} >= {"checkpoints", "verify", "fleet"}, commands
    for container, command in commands:
        words = command.split()
        assert container in containers and words[:3] == PROBE[:3], command
        args = [re.sub(r"^<\w+>$", vs.Config.checkpoint_dir, word) for word in words[3:]]
        assert vs.build_parser().parse_args(args).command == args[0], command
    # No command of the image's lacking: `vmafx-sidecar ...` as a command.
    assert re.findall(r"`vmafx-sidecar [a-z]", readme) == []


# ---- several trainers, each in its own directory (issue #13) ----

SCALED = VARIANTS["replicas 3"]
FULLNAME = "demo-vmafx-node"  # the release "demo"'s: the StatefulSet's pods are demo-vmafx-node-0, -1, -2
POD_NAME = {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
# The environment entries in which the StatefulSet's pod differs from the Deployment's.
PER_POD_ENV = {"POD_NAME", "VMAFX_SIDECAR_CHECKPOINT_DIR", "VMAFX_SIDECAR_ADOPT_DIR"}
CHECKPOINT_DIRS = pytest.mark.parametrize("checkpoint_dir", [None, "/mnt/vmafx-models/online/run-7",
                                                             "/mnt/vmafx-models/online/run-7/"],
                                          ids=["default", "set", "trailing slash"])


def with_checkpoint_dir(values: dict, checkpoint_dir: str | None) -> dict:
    """`values` with sidecar.trainer.checkpointDir set, or unset (the sidecar's default) for None."""
    values = merged(values, **{"sidecar.trainer.checkpointDir": checkpoint_dir})
    if checkpoint_dir is None:
        del values["sidecar"]["trainer"]["checkpointDir"]
    return values


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_several_trainers_on_the_volume_run_as_a_stateful_set(kube_version):
    rendered = render(SCALED, kube_version)  # strictly validated: 1.28 and 1.29 require a serviceName
    assert "Deployment" not in rendered.kinds
    stateful_set = rendered.one("StatefulSet")
    spec = stateful_set["spec"]
    # Named like the Deployment, so its pods are demo-vmafx-node-0, -1, -2: stable names, stable directories.
    assert (stateful_set["apiVersion"], stateful_set["metadata"]["name"], spec["replicas"]) == ("apps/v1", FULLNAME, 3)
    # Pod 0 starts first (it takes over the single trainer's state); an update deletes a pod before it
    # starts the pod's successor, so no two trainers ever share a directory. Recreate is a Deployment's.
    assert spec["podManagementPolicy"] == "OrderedReady" and spec["updateStrategy"] == {"type": "RollingUpdate"}
    assert "strategy" not in spec
    # All pods mount the one claim the chart creates, ReadWriteMany: no claim per pod.
    assert "volumeClaimTemplates" not in spec
    assert {v["name"]: v for v in rendered.pod["volumes"]}["models"]["persistentVolumeClaim"] == {
        "claimName": f"{FULLNAME}-models"}
    assert rendered.one("PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    # Its governing Service is headless and selects exactly its pods.
    headless = rendered.objects["Service", spec["serviceName"]]
    assert headless["spec"] == {"clusterIP": "None", "selector": spec["selector"]["matchLabels"]}
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert "statefulset/demo-vmafx-node" in rendered.notes


def test_the_service_monitor_scrapes_the_metrics_service_not_the_headless_one():
    values = merged(VARIANTS["serviceMonitor"], **SCALE_OUT)
    rendered = render(values, "1.33", api_versions=(SERVICE_MONITOR_API,))
    selector = rendered.one("ServiceMonitor")["spec"]["selector"]["matchLabels"]
    services = {name: obj for (kind, name), obj in rendered.objects.items() if kind == "Service"}
    assert [name for name, obj in services.items() if selector.items() <= obj["metadata"]["labels"].items()] == [
        "demo-vmafx-node-metrics"]


@CHECKPOINT_DIRS
def test_each_replica_trains_in_a_directory_named_after_its_pod(checkpoint_dir):
    base = (checkpoint_dir or vs.Config.checkpoint_dir).rstrip("/")
    trainer = render(with_checkpoint_dir(SCALED, checkpoint_dir), "1.33").container("trainer")
    assert trainer["env"][0] == POD_NAME  # before every variable that may use it
    env = env_of(trainer)
    assert env["VMAFX_SIDECAR_CHECKPOINT_DIR"] == f"{base}/$(POD_NAME)"
    assert env["VMAFX_SIDECAR_ADOPT_DIR"] == base
    for pod in (f"{FULLNAME}-0", f"{FULLNAME}-2"):
        # What the sidecar in that pod reads, after Kubernetes expanded $(POD_NAME); it accepts it.
        config = vs.Config.load(resolved_env(trainer, pod), {})
        assert (config.checkpoint_dir, config.adopt_dir) == (f"{base}/{pod}", base)


@CHECKPOINT_DIRS
def test_scaling_hands_the_state_between_the_single_trainer_and_replica_0(checkpoint_dir):
    """1 -> N: replica 0 (the first to start) takes over the single trainer's directory; N -> 1: the single
    trainer takes over replica 0's. The other replicas' directories are nobody else's."""
    def config(values: dict, pod: str) -> vs.Config:
        return vs.Config.load(resolved_env(render(values, "1.33").container("trainer"), pod), {})

    single = config(with_checkpoint_dir(ISSUE_VALUES, checkpoint_dir), f"{FULLNAME}-5d8f9c7b4-x2k9p")
    replicas = [config(with_checkpoint_dir(SCALED, checkpoint_dir), f"{FULLNAME}-{i}") for i in range(3)]
    same = lambda a, b: os.path.normpath(a) == os.path.normpath(b)  # noqa: E731
    assert same(replicas[0].adopt_dir, single.checkpoint_dir)
    assert same(single.adopt_dir, replicas[0].checkpoint_dir)
    directories = {os.path.normpath(c.checkpoint_dir) for c in [single, *replicas]}
    assert len(directories) == 4


def test_pod_name_is_there_for_node_env_values():
    model = {"name": "VMAFX_NODE_MODEL_PATH", "value": "/mnt/vmafx-models/online/$(POD_NAME)/latest.onnx"}
    rendered = render(merged(SCALED, **{"node.env": [model]}), "1.33")
    node = rendered.container("vmafx-node")
    assert node["env"] == [POD_NAME, {"name": "VMAFX_SIDECAR_SOCKET", "value": SOCKET}, model]
    # Each vmafx-node loads what its own pod's trainer publishes.
    pod = f"{FULLNAME}-2"
    trainer_dir = resolved_env(rendered.container("trainer"), pod)["VMAFX_SIDECAR_CHECKPOINT_DIR"]
    assert resolved_env(node, pod)["VMAFX_NODE_MODEL_PATH"] == f"{trainer_dir}/{vs.LATEST_MODEL}"


@pytest.mark.parametrize("access_modes", [None, ["ReadWriteOnce"], ["ReadWriteOncePod"], ["ReadOnlyMany"]])
def test_several_trainers_on_a_claim_without_read_write_many_are_refused(access_modes):
    values = merged(ISSUE_VALUES, **{"node.replicas": 2})
    if access_modes:  # None: the chart's default, ReadWriteOnce
        values["persistence"]["models"]["accessModes"] = access_modes
    with pytest.raises(helm.HelmRenderError) as refused:
        render(values, "1.33")
    message = str(refused.value)
    assert "PersistentVolumeClaim demo-vmafx-node-models, which then needs ReadWriteMany" in message
    assert "--set persistence.models.accessModes={ReadWriteMany}" in message and "NFS" in message
    # An upgrade's claim exists: its access modes cannot change (chart/README.md), and the message says what can.
    assert ("a claim this release made already cannot change its access modes: copy its data to a ReadWriteMany "
            "claim and name that in persistence.models.existingClaim") in message


@pytest.mark.parametrize("access_modes", [None, ["ReadWriteOnce"], ["ReadWriteOncePod"]])
def test_several_node_only_pods_on_a_claim_without_many_nodes_access_are_refused(access_modes):
    """Without the trainer the pods stay a Deployment, but all mount the one claim: on a ReadWriteOnce volume
    those on other nodes than the first never start (Multi-Attach)."""
    values = merged(VARIANTS["trainer disabled"], **{"node.replicas": 2})
    if access_modes:  # None: the chart's default, ReadWriteOnce
        values["persistence"]["models"]["accessModes"] = access_modes
    with pytest.raises(helm.HelmRenderError) as refused:
        render(values, "1.33")
    message = str(refused.value)
    assert ("node.replicas > 1 runs 2 pods, all on PersistentVolumeClaim demo-vmafx-node-models, which then needs "
            "ReadWriteMany or ReadOnlyMany") in message
    assert "--set persistence.models.accessModes={ReadWriteMany}" in message


@pytest.mark.parametrize("overrides", [
    {"persistence.models.accessModes": ["ReadWriteMany"]}, {"persistence.models.accessModes": ["ReadOnlyMany"]},
    {"persistence.models.existingClaim": "vmafx-models"}, {"node.replicas": 1}, {"persistence.models.enabled": False},
], ids=["ReadWriteMany", "ReadOnlyMany (vmafx-node only reads)", "existingClaim", "one pod", "persistence off"])
def test_node_only_pods_on_a_claim_they_can_all_mount_are_accepted(overrides):
    values = merged(VARIANTS["trainer disabled"], **{"node.replicas": 2, **overrides})
    rendered = render(values, "1.33")
    assert rendered.one("Deployment")["spec"]["replicas"] == overrides.get("node.replicas", 2)
    # The chart cannot see an existing claim's access modes: the notes say what it needs.
    assert ("pods mount this existing claim, whose access modes the chart cannot see: it needs ReadWriteMany or "
            "ReadOnlyMany" in " ".join(rendered.notes.split())) == ("persistence.models.existingClaim" in overrides)


@pytest.mark.parametrize("access_modes", [["ReadWriteMany"], ["ReadWriteOnce", "ReadWriteMany"]])
def test_several_trainers_on_a_read_write_many_claim_are_accepted(access_modes):
    rendered = render(merged(ISSUE_VALUES, **{"node.replicas": 2, "persistence.models.accessModes": access_modes}),
                      "1.33")
    assert rendered.one("StatefulSet")["spec"]["replicas"] == 2
    assert rendered.one("PersistentVolumeClaim")["spec"]["accessModes"] == access_modes
    assert "access modes" not in rendered.notes


def test_an_existing_claim_is_used_whatever_its_access_modes_and_the_notes_say_so():
    rendered = render(VARIANTS["replicas 3, existingClaim"], "1.33")  # ReadWriteOnce in values: not the claim's
    assert "PersistentVolumeClaim" not in rendered.kinds
    assert {v["name"]: v for v in rendered.pod["volumes"]}["models"]["persistentVolumeClaim"] == {
        "claimName": "vmafx-models"}
    notes = " ".join(rendered.notes.split())
    assert "all 3 pods mount this existing claim, whose access modes the chart cannot see: it needs ReadWriteMany" \
        in notes
    assert "Each trainer still locks its own directory" in notes
    assert "access modes" not in render(VARIANTS["existingClaim"], "1.33").notes  # one pod


def test_one_replica_keeps_the_deployment_which_would_take_over_replica_0s_state():
    """Exactly what the chart rendered before issue #13, plus VMAFX_SIDECAR_ADOPT_DIR."""
    rendered = render(ISSUE_VALUES, "1.33")
    assert sorted(rendered.kinds) == ["Deployment", "PersistentVolumeClaim", "Service"]
    deployment = rendered.one("Deployment")
    assert deployment["metadata"]["name"] == FULLNAME
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert rendered.container("trainer")["env"] == [
        {"name": "VMAFX_SIDECAR_SOCKET", "value": SOCKET}, METRICS_ENV,
        {"name": "VMAFX_BASE_MODEL_PATH", "value": "/mnt/vmafx-models/base/fr_regressor_v3.onnx"},
        {"name": "VMAFX_SIDECAR_CHECKPOINT_DIR", "value": "/mnt/vmafx-models/online"},  # no pod subdirectory
        {"name": "VMAFX_SIDECAR_N_FEATURES", "value": "80"},
        {"name": "VMAFX_SIDECAR_ADOPT_DIR", "value": f"/mnt/vmafx-models/online/{FULLNAME}-0"}]
    assert rendered.container("vmafx-node")["env"] == [{"name": "VMAFX_SIDECAR_SOCKET", "value": SOCKET}]
    assert "statefulset" not in rendered.notes


@pytest.mark.parametrize("variant, access_modes", [("replicas 3, persistence off", None),
                                                   ("trainer disabled", ["ReadOnlyMany"])])
def test_replicas_without_a_trainer_on_the_volume_stay_a_deployment(variant, access_modes):
    # Each pod's trainer has its own emptyDir, or there is no trainer (vmafx-node only reads the claim, which
    # every pod still mounts: see test_several_node_only_pods_on_a_claim_without_many_nodes_access_are_refused).
    values = merged(VARIANTS[variant], **{"node.replicas": 3})
    if access_modes:
        values = merged(values, **{"persistence.models.accessModes": access_modes})
    rendered = render(values, "1.33")
    spec = rendered.one("Deployment")["spec"]
    assert spec["replicas"] == 3 and "strategy" not in spec
    assert "StatefulSet" not in rendered.kinds and rendered.kinds.count("Service") <= 1  # no headless one
    for container in rendered.pod["containers"] + rendered.pod.get("initContainers", []):
        env = env_of(container)
        assert "POD_NAME" not in env and "VMAFX_SIDECAR_ADOPT_DIR" not in env, container["name"]
        assert env.get("VMAFX_SIDECAR_CHECKPOINT_DIR", "/mnt/vmafx-models/online") == "/mnt/vmafx-models/online"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", ["issue values", "chart defaults", "existingClaim", "native sidecar off",
                                     "metrics off"])
def test_both_kinds_run_the_same_pod_but_for_the_trainers_directories(variant, kube_version):
    one = merged(VARIANTS[variant], **{"persistence.models.enabled": True,
                                       "persistence.models.accessModes": ["ReadWriteMany"]})
    deployment = render(one, kube_version).one("Deployment")
    stateful_set = render(merged(one, **{"node.replicas": 3}), kube_version).one("StatefulSet")

    def without_per_pod_env(template: dict) -> dict:
        template = copy.deepcopy(template)
        pod = template["spec"]
        for container in pod["containers"] + pod.get("initContainers", []):
            if "env" in container:
                container["env"] = [e for e in container["env"] if e["name"] not in PER_POD_ENV]
        return template

    assert without_per_pod_env(stateful_set["spec"]["template"]) == without_per_pod_env(deployment["spec"]["template"])
    assert stateful_set["metadata"] == deployment["metadata"]
    assert stateful_set["spec"]["selector"] == deployment["spec"]["selector"]


def test_notes_say_where_each_replica_writes_and_how_scaling_hands_over():
    notes = " ".join(render(SCALED, "1.33").notes.split())
    assert "statefulset/demo-vmafx-node in namespace vmafx: pods demo-vmafx-node-0 to demo-vmafx-node-2" in notes
    assert "/mnt/vmafx-models/online/demo-vmafx-node-<i>/ for i = 0 to 2" in notes
    assert f"{vs.LATEST_MODEL} and {vs.LATEST_MODEL}.sha256" in notes and "latest.json" in notes
    assert "{name: VMAFX_NODE_MODEL_PATH, value: /mnt/vmafx-models/online/$(POD_NAME)/latest.onnx}" in notes
    assert "kubectl logs -n vmafx pod/demo-vmafx-node-0 -c trainer" in notes
    assert ("kubectl logs -n vmafx -l app.kubernetes.io/instance=demo,app.kubernetes.io/name=vmafx-node "
            "-c trainer --prefix") in notes
    assert "replica 0 takes over the single trainer's state in /mnt/vmafx-models/online" in notes
    assert "back to 1, the single trainer takes over replica 0's" in notes
    assert "The other replicas' directories are left as they are, and resume when you scale up again" in notes


def test_a_stateful_set_name_too_long_for_its_pods_labels_is_refused():
    # A pod's controller-revision-hash label is "<StatefulSet name>-<hash>": at most 63 characters.
    release = "r" * 42  # fullname: 53 characters
    with pytest.raises(helm.HelmRenderError, match="longer than the 52 characters"):
        render(SCALED, "1.33", release=release)
    assert render(ISSUE_VALUES, "1.33", release=release).one("Deployment")
    assert render(SCALED, "1.33", release="r" * 41).one("StatefulSet")

# ---- metrics (issue #7) ----

@pytest.mark.parametrize("kube_version, port", [("1.28", 9464), ("1.33", 9464), ("1.33", 9100)])
def test_trainer_serves_metrics_by_default_on_its_port(kube_version, port):
    values = ISSUE_VALUES if port == 9464 else merged(ISSUE_VALUES, **{"sidecar.trainer.metrics.port": port})
    rendered = render(values, kube_version, api_versions=(SERVICE_MONITOR_API,))
    trainer = rendered.container("trainer")
    # A string, exactly: the sidecar parses [host]:port.
    assert trainer["env"][1] == {"name": "VMAFX_SIDECAR_METRICS_ADDR", "value": f":{port}"}
    assert trainer["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    template = rendered.one("Deployment")["spec"]["template"]
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}
    node = rendered.container("vmafx-node")
    assert "ports" not in node and "VMAFX_SIDECAR_METRICS_ADDR" not in env_of(node)
    # The Service reaches the trainer's metrics port on this release's pods, under the name "metrics".
    service = rendered.one("Service")
    assert service["metadata"]["name"] == "demo-vmafx-node-metrics"
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == rendered.one("Deployment")["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    # By number: before Kubernetes 1.32 a Service does not resolve a native sidecar's named port.
    assert service["spec"]["ports"] == [{"name": "metrics", "port": port, "targetPort": port, "protocol": "TCP"}]
    assert "ServiceMonitor" not in rendered.kinds  # off by default, even where the cluster has the API
    assert f":{port}/metrics" in rendered.notes and "ServiceMonitor" not in rendered.notes


@pytest.mark.parametrize("case", ["metrics off", "trainer disabled"])
def test_without_metrics_nothing_of_them_is_rendered(case):
    values = merged(VARIANTS["serviceMonitor"], **{
        "sidecar.trainer.metrics.enabled" if case == "metrics off" else "sidecar.trainer.enabled": False})
    # Even with the ServiceMonitor asked for and its API present.
    rendered = render(values, "1.33", api_versions=(SERVICE_MONITOR_API,))
    assert "Service" not in rendered.kinds and "ServiceMonitor" not in rendered.kinds
    assert "annotations" not in rendered.one("Deployment")["spec"]["template"]["metadata"]
    for container in rendered.pod["containers"] + rendered.pod.get("initContainers", []):
        assert "ports" not in container and "VMAFX_SIDECAR_METRICS_ADDR" not in env_of(container), container["name"]
    assert "metrics" not in rendered.notes and "ServiceMonitor" not in rendered.notes


@pytest.mark.parametrize("kube_version", ["1.28", "1.33"])
def test_service_monitor_selects_the_metrics_service_where_the_cluster_has_the_api(kube_version):
    rendered = render(VARIANTS["serviceMonitor"], kube_version, api_versions=(SERVICE_MONITOR_API,))
    monitor, service = rendered.one("ServiceMonitor"), rendered.one("Service")
    assert (monitor["apiVersion"], monitor["metadata"]["name"]) == ("monitoring.coreos.com/v1", "demo-vmafx-node-metrics")
    labels = monitor["metadata"]["labels"]
    assert labels["release"] == "prometheus"  # the extra labels, for the operator's serviceMonitorSelector
    assert labels["app.kubernetes.io/instance"] == "demo" and labels["app.kubernetes.io/managed-by"] == "Helm"
    # It selects the Service by the Service's own labels, in the release's namespace...
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert selector["app.kubernetes.io/component"] == "metrics"  # ...and no other Service of the release
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["vmafx"]}
    # ...and scrapes the Service's port by its name.
    [endpoint] = monitor["spec"]["endpoints"]
    [port] = service["spec"]["ports"]
    assert endpoint == {"port": port["name"], "path": "/metrics", "interval": "15s"}
    assert rendered.container("trainer")["ports"][0]["containerPort"] == port["targetPort"]
    assert "ServiceMonitor demo-vmafx-node-metrics" in rendered.notes and "WARNING: sidecar" not in rendered.notes


def test_service_monitor_defaults_and_label_precedence():
    values = {"sidecar": {"trainer": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {
        "release": "kube-prometheus-stack", "app.kubernetes.io/name": "vmafx"}}}}}}
    monitor = render(values, "1.33", api_versions=(SERVICE_MONITOR_API,)).one("ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["interval"] == "30s"
    assert monitor["metadata"]["labels"]["app.kubernetes.io/name"] == "vmafx"  # an extra label wins
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # The selector is the chart's own, whatever the extra labels say.
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "vmafx-node"


def test_service_monitor_without_the_api_is_left_out_and_the_notes_say_why():
    rendered = render(VARIANTS["serviceMonitor"], "1.33")
    assert "ServiceMonitor" not in rendered.kinds
    assert "Service" in rendered.kinds  # the Service still exposes the metrics
    notes = " ".join(rendered.notes.split())
    assert ("WARNING: sidecar.trainer.metrics.serviceMonitor.enabled is true, but the cluster has no "
            "monitoring.coreos.com/v1 ServiceMonitor API") in notes
    assert "--api-versions monitoring.coreos.com/v1/ServiceMonitor" in notes
    # The group/version alone is not the kind: Helm's Has() needs the exact string.
    assert "ServiceMonitor" not in render(VARIANTS["serviceMonitor"], "1.33",
                                          api_versions=("monitoring.coreos.com/v1",)).kinds


def test_only_the_service_monitor_skips_kubernetes_validate():
    """kubernetes-validate has no schema for a CRD; check_service_monitor stands in for it, strictly."""
    monitor = render(VARIANTS["serviceMonitor"], "1.33", api_versions=(SERVICE_MONITOR_API,)).one("ServiceMonitor")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(monitor, "1.33", strict=True)
    for broken in ({**monitor, "spec": {**monitor["spec"], "endpoint": []}},
                   {**monitor, "spec": {**monitor["spec"], "endpoints": [{"port": 9464, "path": "/metrics",
                                                                         "interval": "30s"}]}},
                   {**monitor, "spec": {**monitor["spec"], "endpoints": [{"port": "metrics", "path": "/metrics",
                                                                         "interval": "30 s"}]}}):
        with pytest.raises(AssertionError):
            check_service_monitor(broken)


# ---- the fleet trainer (issue #17) ----

FLEET = merged(SCALED, **{"fleet.enabled": True})
FLEET_NAME = f"{FULLNAME}-fleet"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_the_fleet_trainer_is_a_cron_job_beside_the_stateful_set(kube_version):
    rendered = render(FLEET, kube_version)  # strictly validated, podFailurePolicy included
    cron_job = rendered.one("CronJob")
    assert (cron_job["apiVersion"], cron_job["metadata"]["name"]) == ("batch/v1", FLEET_NAME)
    assert cron_job["spec"]["schedule"] == "*/10 * * * *"
    assert cron_job["spec"]["concurrencyPolicy"] == "Forbid"  # a run holds <root>/fleet/'s lock
    assert (cron_job["spec"]["successfulJobsHistoryLimit"], cron_job["spec"]["failedJobsHistoryLimit"]) == (3, 1)
    job = cron_job["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 2
    assert job["activeDeadlineSeconds"] == 3600  # a hung run does not hold off the next ones for ever
    # An evicted or preempted run is replaced without counting as a failure.
    assert job["podFailurePolicy"] == {"rules": [{"action": "Ignore", "onPodConditions": [
        {"type": "DisruptionTarget", "status": "True"}]}]}
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    [container] = pod["containers"]
    trainer = rendered.container("trainer")
    assert container["name"] == "fleet"
    assert (container["image"], container["imagePullPolicy"]) == (trainer["image"], trainer["imagePullPolicy"])
    # The same locked-down user as the replicas, so it can read their logs and they its cursors.
    assert pod["securityContext"] == rendered.pod["securityContext"]
    assert container["securityContext"] == trainer["securityContext"]
    # The replicas' volume, read-write, where their trainers have it, and a writable /tmp.
    assert pod["volumes"] == rendered.pod["volumes"]
    assert container["volumeMounts"] == trainer["volumeMounts"]
    assert "resources" not in container
    # The fleet's pods are no vmafx-node pods: neither the StatefulSet nor any Service selects them.
    labels = job["template"]["metadata"]["labels"]
    selectors = [rendered.one("StatefulSet")["spec"]["selector"]["matchLabels"]] + [
        obj["spec"]["selector"] for (kind, _), obj in rendered.objects.items() if kind == "Service"]
    assert all(not selector.items() <= labels.items() for selector in selectors)


@pytest.mark.parametrize("checkpoint_dir", [None, "/mnt/vmafx-models/online/run-7/"], ids=["default", "set"])
def test_the_fleet_runs_the_sidecars_fleet_command_on_the_replicas_parent_directory(checkpoint_dir):
    rendered = render(with_checkpoint_dir(FLEET, checkpoint_dir), "1.33")
    container = rendered.one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    root = (checkpoint_dir or vs.Config.checkpoint_dir).rstrip("/")
    assert container["command"][:2] == ["/usr/bin/python3", "-c"]  # the image's interpreter, as the probes
    assert container["args"] == ["fleet", root]
    # The root is where every replica's directory is: <root>/<pod name>.
    trainer_dir = resolved_env(rendered.container("trainer"), f"{FULLNAME}-1")["VMAFX_SIDECAR_CHECKPOINT_DIR"]
    assert os.path.dirname(trainer_dir) == root
    assert f"{root}/fleet/latest.onnx" in rendered.notes


def run_fleet_command(container: dict, root, env: dict[str, str]) -> int:
    """The CronJob's command, here: this interpreter for the image's, with this checkout importable."""
    command = [sys.executable, *container["command"][1:], container["args"][0], str(root)]
    return subprocess.run(command, env={**env, "PYTHONPATH": str(ROOT)}, timeout=120).returncode


def test_the_fleet_command_exits_0_when_nothing_is_new_and_fails_otherwise(tmp_path):
    """Exit 3 (no new sample) would mark the Job failed: no podFailurePolicy action counts an exit as a
    success and the distroless image has no shell, so the command maps 3 to 0 with the image's Python."""
    values = merged(FLEET, **{"sidecar.trainer.baseModelPath": "", "sidecar.trainer.nFeatures": 4})
    container = render(values, "1.33").one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"][
        "containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    (tmp_path / f"{FULLNAME}-0").mkdir()  # a replica that has logged nothing yet
    assert run_fleet_command(container, tmp_path, env) == 0
    assert (tmp_path / vs.FLEET_DIR).is_dir()
    assert run_fleet_command(container, tmp_path, {**env, "VMAFX_SIDECAR_N_FEATURES": "0"}) == 2  # bad setting


def test_the_fleet_gets_the_trainers_settings_but_not_the_per_replica_ones():
    extra = [{"name": "VMAFX_SIDECAR_LOG_LEVEL", "value": "debug"}]
    values = merged(FLEET, **{f"sidecar.trainer.{key}": value for key, value in ALL_SETTINGS.items()},
                    **{"sidecar.trainer.extraEnv": extra})
    rendered = render(values, "1.33")
    container = rendered.one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    trainer_env = [e for e in rendered.container("trainer")["env"] if e["name"] not in {
        *PER_POD_ENV, "VMAFX_SIDECAR_SOCKET", "VMAFX_SIDECAR_METRICS_ADDR", "VMAFX_SIDECAR_SAMPLE_LOG"}]
    assert container["env"] == trainer_env and container["env"][-1] == extra[0]
    # It trains in <root>/fleet/ whatever VMAFX_SIDECAR_CHECKPOINT_DIR says: none is set.
    config = vs.Config.load(env_of(container), {})
    assert (config.n_features, config.lr, config.replay_capacity) == (120, 0.0001, 1000000)


def test_fleet_values_configure_the_cron_job():
    fleet = {"enabled": True, "schedule": "@hourly", "resources": {"limits": {"cpu": "4", "memory": "4Gi"}},
             "successfulJobsHistoryLimit": 0, "failedJobsHistoryLimit": 5, "backoffLimit": 0,
             "activeDeadlineSeconds": 601}
    spec = render(merged(SCALED, fleet=fleet), "1.33").one("CronJob")["spec"]
    assert (spec["schedule"], spec["successfulJobsHistoryLimit"], spec["failedJobsHistoryLimit"]) == ("@hourly", 0, 5)
    assert (spec["jobTemplate"]["spec"]["backoffLimit"], spec["jobTemplate"]["spec"]["activeDeadlineSeconds"]) == (0, 601)
    assert spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["resources"] == fleet["resources"]


def fleet_pod(rendered: Rendered) -> dict:
    return rendered.one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_the_fleet_pod_is_scheduled_where_the_replicas_are():
    """It mounts their claim: on a ReadWriteOnce one it must run on the node they are pinned to, and on a tainted
    pool it schedules only with their tolerations. Their pod (anti-)affinity is not its own: those terms select
    vmafx-node pods, which it is not, and an anti-affinity to them would keep it off their node."""
    node_affinity = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "vmafx.io/pool", "operator": "In", "values": ["encode"]}]}]}}
    spread = {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "kubernetes.io/hostname",
              "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "vmafx-node"}}}]}
    values = merged(FLEET, **{"node.nodeSelector": {"kubernetes.io/hostname": "encode-1"},
                              "node.tolerations": [{"key": "encode", "operator": "Exists", "effect": "NoSchedule"}],
                              "node.affinity": {"nodeAffinity": node_affinity, "podAntiAffinity": spread}})
    rendered = render(values, "1.33")
    pod = fleet_pod(rendered)
    assert pod["nodeSelector"] == rendered.pod["nodeSelector"] == {"kubernetes.io/hostname": "encode-1"}
    assert pod["tolerations"] == rendered.pod["tolerations"] == values["node"]["tolerations"]
    assert rendered.pod["affinity"] == values["node"]["affinity"]
    assert pod["affinity"] == {"nodeAffinity": node_affinity}
    # Only pod affinity: nothing for the fleet's pod; nothing set: nothing anywhere.
    only_pods = render(merged(FLEET, **{"node.affinity": {"podAntiAffinity": spread}}), "1.33")
    assert "affinity" in only_pods.pod and "affinity" not in fleet_pod(only_pods)
    plain = render(FLEET, "1.33")
    assert not {"nodeSelector", "tolerations", "affinity"} & (plain.pod.keys() | fleet_pod(plain).keys())


@pytest.mark.parametrize("fleet", [False, True], ids=["fleet off", "fleet on"])
def test_the_replicas_log_their_samples_only_for_the_fleet(fleet):
    rendered = render(merged(SCALED, **{"fleet.enabled": fleet}), "1.33")
    env = env_of(rendered.container("trainer"))
    assert ("VMAFX_SIDECAR_SAMPLE_LOG" in env) == fleet and "VMAFX_SIDECAR_SAMPLE_LOG_MAX_BYTES" not in env
    assert ("CronJob" in rendered.kinds) == fleet and ("fleet" in rendered.notes) == fleet
    assert "VMAFX_SIDECAR_SAMPLE_LOG" not in env_of(rendered.container("vmafx-node"))
    if fleet:
        assert env["VMAFX_SIDECAR_SAMPLE_LOG"] == "1"
        config = vs.Config.load(resolved_env(rendered.container("trainer"), f"{FULLNAME}-0"), {})
        assert config.sample_log == "1" and config.sample_log_max_bytes == 1 << 30  # the sidecar's default


def test_the_sample_log_bound_becomes_its_setting_exactly():
    trainer = render(merged(FLEET, **{"fleet.sampleLogMaxBytes": 10**10}), "1.33").container("trainer")
    env = env_of(trainer)
    assert env["VMAFX_SIDECAR_SAMPLE_LOG_MAX_BYTES"] == "10000000000"
    assert vs.Config.load(resolved_env(trainer, f"{FULLNAME}-0"), {}).sample_log_max_bytes == 10**10


@pytest.mark.parametrize("overrides, state", [
    ({"node.replicas": 1}, "node.replicas > 1 (is 1), sidecar.trainer.enabled (is true) and "
                           "persistence.models.enabled (is true)"),
    ({"sidecar.trainer.enabled": False}, "(is 3), sidecar.trainer.enabled (is false)"),
    ({"persistence.models.enabled": False}, "persistence.models.enabled (is false)"),
], ids=["one replica", "trainer disabled", "persistence off"])
def test_the_fleet_without_several_trainers_on_the_volume_is_refused(overrides, state):
    with pytest.raises(helm.HelmRenderError) as refused:
        render(merged(FLEET, **overrides), "1.33")
    message = str(refused.value)
    assert "fleet.enabled trains on the sample logs of several trainers" in message and state in message
    assert "ReadWriteMany" in message


def test_the_fleet_on_a_claim_without_read_write_many_is_refused_as_the_replicas_are():
    with pytest.raises(helm.HelmRenderError, match="which then needs ReadWriteMany"):
        render(merged(FLEET, **{"persistence.models.accessModes": ["ReadWriteOnce"]}), "1.33")


SIDECAR_CKPT_INTERVAL_S = int(vs.Config.ckpt_interval_s)  # what the chart takes when the value is unset


@pytest.mark.parametrize("deadline, interval", [(SIDECAR_CKPT_INTERVAL_S, None), (3600, 3600), (3600, 7200.5)],
                         ids=["the sidecar's default interval", "equal", "a longer interval"])
def test_a_fleet_deadline_within_a_checkpoint_interval_is_refused(deadline, interval):
    values = merged(FLEET, **{"fleet.activeDeadlineSeconds": deadline})
    if interval is not None:
        values = merged(values, **{"sidecar.trainer.checkpointIntervalSeconds": interval})
    with pytest.raises(helm.HelmRenderError) as refused:
        render(values, "1.33")
    assert (f"fleet.activeDeadlineSeconds ({deadline}) must be more than sidecar.trainer.checkpointIntervalSeconds "
            f"({SIDECAR_CKPT_INTERVAL_S if interval is None else interval})") in str(refused.value)


def test_a_fleet_deadline_past_the_checkpoint_interval_is_taken():
    values = merged(FLEET, **{"fleet.activeDeadlineSeconds": 2, "sidecar.trainer.checkpointIntervalSeconds": 1.5})
    assert render(values, "1.33").one("CronJob")["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] == 2


def interval_in_extra_env(seconds: str) -> dict:
    return {"sidecar.trainer.extraEnv": [{"name": "VMAFX_SIDECAR_CKPT_INTERVAL_S", "value": seconds}]}


def test_a_checkpoint_interval_set_in_extra_env_is_the_one_the_deadline_is_judged_by():
    # extraEnv comes after the chart's settings in the container's env: its value is the one the sidecar reads.
    values = merged(FLEET, **{"fleet.activeDeadlineSeconds": 3600, "sidecar.trainer.checkpointIntervalSeconds": 60},
                    **interval_in_extra_env("3600"))
    with pytest.raises(helm.HelmRenderError) as refused:
        render(values, "1.33")
    assert ("fleet.activeDeadlineSeconds (3600) must be more than VMAFX_SIDECAR_CKPT_INTERVAL_S in "
            "sidecar.trainer.extraEnv (3600)") in str(refused.value)
    values = merged(FLEET, **{"fleet.activeDeadlineSeconds": 3600, "sidecar.trainer.checkpointIntervalSeconds": 7200},
                    **interval_in_extra_env("60"))
    rendered = render(values, "1.33")
    assert rendered.one("CronJob")["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] == 3600
    assert vs.Config.load(resolved_env(rendered.container("trainer"), f"{FULLNAME}-0"), {}).ckpt_interval_s == 60


def test_a_cron_job_name_too_long_for_its_jobs_is_refused():
    # Each Job is named "<CronJob name>-<up to 11 characters>", at most 63.
    with pytest.raises(helm.HelmRenderError, match=f"CronJob named {'r' * 36}-vmafx-node-fleet, longer than the 52"):
        render(FLEET, "1.33", release="r" * 36)  # fullname: 47 characters
    assert render(FLEET, "1.33", release="r" * 35).one("CronJob")["metadata"]["name"] == f"{'r' * 35}-vmafx-node-fleet"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_helm_lint_strict_is_clean_with_the_fleet(kube_version):
    report = helm.lint(CHART, FLEET, strict=True, kube_version=f"v{kube_version}.0")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("dotted, value", [
    ("fleet.enabled", "true"), ("fleet.schedule", ""), ("fleet.schedule", 10), ("fleet.sampleLogMaxBytes", 0),
    ("fleet.sampleLogMaxBytes", "1Gi"), ("fleet.successfulJobsHistoryLimit", -1),
    ("fleet.failedJobsHistoryLimit", 1.5), ("fleet.backoffLimit", -1), ("fleet.resources", []),
    ("fleet.activeDeadlineSeconds", 0), ("fleet.activeDeadlineSeconds", "1h"),
])
def test_schema_rejects_bad_fleet_values_naming_them(dotted, value):
    assert_schema_refuses(merged(FLEET, **{dotted: value}), dotted)


def test_schema_rejects_a_misspelt_fleet_value():
    with pytest.raises(helm.HelmValuesError, match="at '/fleet': additional properties 'Schedule'"):
        render(merged(FLEET, **{"fleet.Schedule": "@daily"}), "1.33")
