{{- define "vmafx-node.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "vmafx-node.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vmafx-node.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "vmafx-node.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The trainer's socket, on the emptyDir both containers mount at /tmp. */}}
{{- define "vmafx-node.socket" -}}
/tmp/vmafx-sidecar.sock
{{- end -}}

{{/* Where checkpoints go: the value, else the sidecar's own default. */}}
{{- define "vmafx-node.checkpointDir" -}}
{{- .Values.sidecar.trainer.checkpointDir | default "/mnt/vmafx-models/online" -}}
{{- end -}}

{{/* Native sidecar (init container with restartPolicy Always, Kubernetes >= 1.29): "true" or "". */}}
{{- define "vmafx-node.nativeSidecar" -}}
{{- $native := .Values.sidecar.trainer.nativeSidecar -}}
{{- if eq (toString $native) "auto" -}}
{{- $native = semverCompare ">=1.29-0" .Capabilities.KubeVersion.Version -}}
{{- end -}}
{{- if $native }}true{{ end -}}
{{- end -}}

{{/* Each trainer value and the sidecar setting it becomes. */}}
{{- define "vmafx-node.trainerSettings" -}}
baseModelPath: VMAFX_BASE_MODEL_PATH
checkpointDir: VMAFX_SIDECAR_CHECKPOINT_DIR
replayBufferSize: VMAFX_SIDECAR_REPLAY_CAPACITY
batchSize: VMAFX_SIDECAR_BATCH_SIZE
replayMixRatio: VMAFX_SIDECAR_REPLAY_MIX
learningRate: VMAFX_SIDECAR_LR
emaDecay: VMAFX_SIDECAR_EMA_DECAY
checkpointIntervalSeconds: VMAFX_SIDECAR_CKPT_INTERVAL_S
minSamplesPerCheckpoint: VMAFX_SIDECAR_MIN_SAMPLES_CKPT
nFeatures: VMAFX_SIDECAR_N_FEATURES
cuda: VMAFX_SIDECAR_CUDA
{{- end -}}

{{/* The trainer serves Prometheus metrics: "true" or "". */}}
{{- define "vmafx-node.metrics" -}}
{{- if and .Values.sidecar.trainer.enabled .Values.sidecar.trainer.metrics.enabled }}true{{ end -}}
{{- end -}}

{{- define "vmafx-node.metricsName" -}}
{{- printf "%s-metrics" (include "vmafx-node.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The metrics Service's own labels, which the ServiceMonitor selects it by. */}}
{{- define "vmafx-node.metricsSelectorLabels" -}}
{{ include "vmafx-node.selectorLabels" . }}
app.kubernetes.io/component: metrics
{{- end -}}

{{/* The ServiceMonitor is wanted and the cluster has its API: "true" or "". */}}
{{- define "vmafx-node.serviceMonitor" -}}
{{- $wanted := and (include "vmafx-node.metrics" .) .Values.sidecar.trainer.metrics.serviceMonitor.enabled -}}
{{- if and $wanted (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor") }}true{{ end -}}
{{- end -}}

{{- define "vmafx-node.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{- define "vmafx-node.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: models
  mountPath: {{ .Values.persistence.models.mountPath }}
{{- end -}}

{{/* The probe subcommand pings the socket; it answers before numpy and onnx load (~0.05 s of CPU). */}}
{{- define "vmafx-node.probe" -}}
exec:
  command: [/usr/bin/python3, -m, vmafx_sidecar, probe, --socket, {{ include "vmafx-node.socket" . }}, --timeout, "5"]
timeoutSeconds: 10
{{- end -}}

{{- define "vmafx-node.trainer" -}}
{{- $trainer := .Values.sidecar.trainer -}}
name: trainer
image: "{{ $trainer.image.repository }}:{{ $trainer.image.tag | default .Chart.AppVersion }}"
imagePullPolicy: {{ $trainer.image.pullPolicy }}
args: [serve]
env:
  - name: VMAFX_SIDECAR_SOCKET
    value: {{ include "vmafx-node.socket" . }}
  {{- if $trainer.metrics.enabled }}
  - name: VMAFX_SIDECAR_METRICS_ADDR
    value: {{ printf ":%d" (int $trainer.metrics.port) | quote }}
  {{- end }}
  {{- range $key, $name := include "vmafx-node.trainerSettings" . | fromYaml }}
  {{- $value := index $trainer $key }}
  {{- if not (kindIs "invalid" $value) }}
  {{- /* toJson writes numbers exactly (1000000, 0.00001), where quote writes 1e+06. */}}
  - name: {{ $name }}
    value: {{ kindIs "string" $value | ternary $value (toJson $value) | quote }}
  {{- end }}
  {{- end }}
  {{- with $trainer.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if $trainer.metrics.enabled }}
ports:
  - name: metrics
    containerPort: {{ int $trainer.metrics.port }}
    protocol: TCP
{{- end }}
{{- with $trainer.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "vmafx-node.containerSecurityContext" . | nindent 2 }}
volumeMounts:
  {{- include "vmafx-node.volumeMounts" . | nindent 2 }}
{{- /* Until the socket answers: for a native sidecar, vmafx-node starts only after this succeeds.
       Restoring a large replay buffer takes a while, hence up to 5 minutes. */}}
startupProbe:
  {{- include "vmafx-node.probe" . | nindent 2 }}
  periodSeconds: 1
  failureThreshold: 300
readinessProbe:
  {{- include "vmafx-node.probe" . | nindent 2 }}
  periodSeconds: 10
  failureThreshold: 3
livenessProbe:
  {{- include "vmafx-node.probe" . | nindent 2 }}
  periodSeconds: 20
  failureThreshold: 3
{{- end -}}
