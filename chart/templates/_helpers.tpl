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

{{/* Where checkpoints go: the value, else the sidecar's own default; no trailing "/", since pod
     subdirectories are appended to it. */}}
{{- define "vmafx-node.checkpointDir" -}}
{{- .Values.sidecar.trainer.checkpointDir | default "/mnt/vmafx-models/online" | trimSuffix "/" -}}
{{- end -}}

{{/* The models claim: existingClaim, else the one pvc.yaml creates. */}}
{{- define "vmafx-node.claimName" -}}
{{- .Values.persistence.models.existingClaim | default (printf "%s-models" (include "vmafx-node.fullname" .)) -}}
{{- end -}}

{{/* Several trainers on the persistent volume: a StatefulSet, whose pods <fullname>-0, -1, ... keep their
     names, so each trainer has a directory of its own, named after its pod, and resumes it after a
     restart. Otherwise (one pod, no trainer, or an emptyDir per pod) a Deployment. "true" or "". */}}
{{- define "vmafx-node.statefulSet" -}}
{{- if and .Values.sidecar.trainer.enabled .Values.persistence.models.enabled (gt (int .Values.node.replicas) 1) }}true{{ end -}}
{{- end -}}

{{/* The workload, as kubectl names it. */}}
{{- define "vmafx-node.workload" -}}
{{- if include "vmafx-node.statefulSet" . }}statefulset{{ else }}deployment{{ end }}/{{ include "vmafx-node.fullname" . -}}
{{- end -}}

{{/* A regex (RE2, anchored as PromQL's =~ is) of the names of this release's vmafx-node pods, whichever kind
     runs them, and of no other release's: "<fullname>-.*" would match release <name>-canary's too. A
     StatefulSet's pods are <fullname>-<ordinal>; a Deployment's are <fullname>-<ReplicaSet hash>-<5
     characters>, the hash being 1 to 10 and the suffix 5 characters of Kubernetes' alphabet without vowels
     (k8s.io/apimachinery util/rand). Kubernetes cuts "<ReplicaSet name>-" at 58 characters before adding
     the suffix, so a fullname longer than 46 loses some or all of the hash (from 58 characters on, only the
     first 58 of the fullname are left to tell releases apart). */}}
{{- define "vmafx-node.podNames" -}}
{{- $name := include "vmafx-node.fullname" . -}}
{{- $c := "[bcdfghjklmnpqrstvwxz2456789]" -}}
{{- $room := sub 56 (len $name) -}}  {{- /* the longest hash a pod's name keeps whole */}}
{{- $deployment := "" -}}
{{- if ge $room 10 -}}
{{- $deployment = printf "%s-%s{1,10}-%s{5}" (regexQuoteMeta $name) $c $c -}}
{{- else if ge $room 1 -}}
{{- $deployment = printf "%s-(%s{1,%d}-|%s{%d})%s{5}" (regexQuoteMeta $name) $c $room $c (add1 $room) $c -}}
{{- else if eq $room 0 -}}
{{- $deployment = printf "%s-%s%s{5}" (regexQuoteMeta $name) $c $c -}}
{{- else if eq $room -1 -}}
{{- $deployment = printf "%s-%s{5}" (regexQuoteMeta $name) $c -}}
{{- else -}}
{{- $deployment = printf "%s%s{5}" (regexQuoteMeta (trunc 58 $name)) $c -}}
{{- end -}}
{{- printf "%s-[0-9]+|%s" (regexQuoteMeta $name) $deployment -}}
{{- end -}}

{{/* The StatefulSet's governing Service (serviceName). */}}
{{- define "vmafx-node.headlessName" -}}
{{- printf "%s-headless" (include "vmafx-node.fullname" .) -}}
{{- end -}}

{{/* VMAFX_SIDECAR_ADOPT_DIR: where a trainer whose own directory holds no state yet takes it over from.
     A StatefulSet's replica takes the single trainer's (scaling 1 -> N; pod 0 starts first, so it is
     pod 0's); the single trainer takes replica 0's (N -> 1; on a fresh install there is none). With an
     emptyDir there is nothing to take over. */}}
{{- define "vmafx-node.adoptDir" -}}
{{- if include "vmafx-node.statefulSet" . -}}
{{ include "vmafx-node.checkpointDir" . }}
{{- else if .Values.persistence.models.enabled -}}
{{ include "vmafx-node.checkpointDir" . }}/{{ include "vmafx-node.fullname" . }}-0
{{- end -}}
{{- end -}}

{{/* With CUDA on (the trainer value, or VMAFX_SIDECAR_CUDA in extraEnv), CuPy compiles its kernels into
     $HOME/.cupy/kernel_cache, where the read-only root filesystem refuses them and the first step fails: the
     /tmp emptyDir holds them instead. */}}
{{- define "vmafx-node.cupyCacheEnv" -}}
{{- $cuda := include "vmafx-node.settingRead" (dict "ctx" . "key" "cuda" "env" "VMAFX_SIDECAR_CUDA" "default" "0") | fromJson -}}
{{- if ne (trimAll "\"" $cuda.text) "0" -}}
- name: CUPY_CACHE_DIR
  value: /tmp/cupy-kernel-cache
{{- end -}}
{{- end -}}

{{/* The pod's name, for $(POD_NAME) in the variables listed after it. */}}
{{- define "vmafx-node.podNameEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
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

{{/* The trainer values that are set, as their settings' EnvVar entries, in trainerSettings' order.
     .ctx: the root context; .overrides: values that replace the trainer's, by key (null: leave it out). */}}
{{- define "vmafx-node.settingsEnv" -}}
{{- $trainer := .ctx.Values.sidecar.trainer -}}
{{- $overrides := .overrides -}}
{{- range $key, $name := include "vmafx-node.trainerSettings" .ctx | fromYaml }}
{{- $value := hasKey $overrides $key | ternary (index $overrides $key) (index $trainer $key) }}
{{- if not (kindIs "invalid" $value) }}
{{- /* toJson writes numbers exactly (1000000, 0.00001), where quote writes 1e+06. */}}
- name: {{ $name }}
  value: {{ kindIs "string" $value | ternary $value (toJson $value) | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The fleet trainer (fleet.enabled): a CronJob training <checkpointDir>/fleet/ on every replica's
     sample log. "true" or "". */}}
{{- define "vmafx-node.fleet" -}}
{{- if .Values.fleet.enabled }}true{{ end -}}
{{- end -}}

{{- define "vmafx-node.fleetName" -}}
{{- printf "%s-fleet" (include "vmafx-node.fullname" .) -}}
{{- end -}}

{{/* The fleet trainer's root: the directory holding every replica's checkpoint directory. */}}
{{- define "vmafx-node.fleetRoot" -}}
{{ include "vmafx-node.checkpointDir" . }}
{{- end -}}

{{/* Each replica's sample log, which the fleet trainer reads. */}}
{{- define "vmafx-node.sampleLogEnv" -}}
- name: VMAFX_SIDECAR_SAMPLE_LOG
  value: "1"
{{- with .Values.fleet.sampleLogMaxBytes }}
- name: VMAFX_SIDECAR_SAMPLE_LOG_MAX_BYTES
  value: {{ toJson . | quote }}
{{- end }}
{{- end -}}

{{/* The fleet pods' labels: not the selectorLabels, or the Services and the StatefulSet would select them. */}}
{{- define "vmafx-node.fleetSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-fleet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: fleet
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

{{/* The PrometheusRule is wanted and the cluster has its API: "true" or "". */}}
{{- define "vmafx-node.prometheusRule" -}}
{{- $wanted := and (include "vmafx-node.metrics" .) .Values.sidecar.trainer.metrics.prometheusRule.enabled -}}
{{- if and $wanted (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PrometheusRule") }}true{{ end -}}
{{- end -}}

{{/* An alert's for, labels and annotations. .alert: its values; .rule: prometheusRule's; .name, .summary,
     .description: its own. Its runbook is the chart README's section named after it. */}}
{{- define "vmafx-node.alertTail" -}}
for: {{ .alert.for | quote }}
labels:
  {{- merge (dict "severity" .alert.severity) (deepCopy (.rule.alertLabels | default dict)) | toYaml | nindent 2 }}
annotations:
  summary: {{ .summary | quote }}
  description: {{ printf "%s Runbook: chart/README.md, %s." .description .name | quote }}
  {{- with .rule.runbookUrl }}
  runbook_url: {{ printf "%s#%s" . (lower $.name) | quote }}
  {{- end }}
{{- end -}}

{{/* A Prometheus duration (1y2w3d4h5m6s7ms, any part left out) in whole seconds, for PromQL comparisons and
     the chart's checks: its milliseconds, below what they measure, are dropped first ("7ms" is not 7 minutes). */}}
{{- define "vmafx-node.seconds" -}}
{{- $text := regexReplaceAll "[0-9]+ms" . "" -}}
{{- $seconds := 0 -}}
{{- range $unit, $size := dict "y" 31536000 "w" 604800 "d" 86400 "h" 3600 "m" 60 "s" 1 -}}
{{- $seconds = add $seconds (mul (regexFind (printf "[0-9]+%s" $unit) $text | trimSuffix $unit | default "0" | int) $size) -}}
{{- end -}}
{{- $seconds -}}
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
  mountPath: {{ .Values.persistence.models.mountPath | quote }}
{{- end -}}

{{/* The probe subcommand pings the socket; it answers before numpy and onnx load (~0.05 s of CPU). */}}
{{- define "vmafx-node.probe" -}}
exec:
  command: [/usr/bin/python3, -m, vmafx_sidecar, probe, --socket, {{ include "vmafx-node.socket" . }}, --timeout, "5"]
timeoutSeconds: 10
{{- end -}}

{{- define "vmafx-node.trainer" -}}
{{- $trainer := .Values.sidecar.trainer -}}
{{- $statefulSet := include "vmafx-node.statefulSet" . -}}
name: trainer
image: "{{ $trainer.image.repository }}:{{ $trainer.image.tag | default .Chart.AppVersion }}"
imagePullPolicy: {{ $trainer.image.pullPolicy }}
args: [serve]
env:
  {{- if $statefulSet }}
  {{- include "vmafx-node.podNameEnv" . | nindent 2 }}
  {{- end }}
  - name: VMAFX_SIDECAR_SOCKET
    value: {{ include "vmafx-node.socket" . }}
  {{- if $trainer.metrics.enabled }}
  - name: VMAFX_SIDECAR_METRICS_ADDR
    value: {{ printf ":%d" (int $trainer.metrics.port) | quote }}
  {{- end }}
  {{- /* Each replica's own directory; Kubernetes expands $(POD_NAME), listed above. */}}
  {{- $overrides := dict }}
  {{- if $statefulSet }}
  {{- $overrides = dict "checkpointDir" (printf "%s/$(POD_NAME)" (include "vmafx-node.checkpointDir" .)) }}
  {{- end }}
  {{- include "vmafx-node.settingsEnv" (dict "ctx" . "overrides" $overrides) | nindent 2 }}
  {{- with include "vmafx-node.adoptDir" . }}
  - name: VMAFX_SIDECAR_ADOPT_DIR
    value: {{ . | quote }}
  {{- end }}
  {{- if include "vmafx-node.fleet" . }}
  {{- include "vmafx-node.sampleLogEnv" . | nindent 2 }}
  {{- end }}
  {{- with include "vmafx-node.cupyCacheEnv" . }}
  {{- . | nindent 2 }}
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

{{/* Values the schema cannot judge alone. */}}
{{/* What the trainer reads for one of its settings, as JSON {"text", "source", "note"}: a `value` in extraEnv
     (the container's env ends with it, so it is the one the sidecar reads), else the trainer value .key, else the
     sidecar's default .default (noted as such). Numbers as toJson writes them: exactly (1000000, not 1e+06).
     .ctx: the root context; .env: the setting's variable. */}}
{{- define "vmafx-node.settingRead" -}}
{{- $trainer := .ctx.Values.sidecar.trainer -}}
{{- $setting := dict "text" (toJson .default) "source" (printf "sidecar.trainer.%s" .key) "note" ", the sidecar's default" -}}
{{- if hasKey $trainer .key -}}
{{- $setting = dict "text" (toJson (index $trainer .key)) "source" (printf "sidecar.trainer.%s" .key) "note" "" -}}
{{- end -}}
{{- range $trainer.extraEnv -}}
{{- if and (eq .name $.env) (hasKey . "value") -}}
{{- $setting = dict "text" (trim (toString .value)) "source" (printf "%s in sidecar.trainer.extraEnv" $.env) "note" "" -}}
{{- end -}}
{{- end -}}
{{- toJson $setting -}}
{{- end -}}

{{/* The trainer's variables that the chart derives from other values, or fixes, and what to set instead. In
     extraEnv, which comes last, one would win in the trainer alone: the probes and vmafx-node keep the chart's
     socket, the Service and scrape its metrics port, every replica would share one checkpoint directory, or
     one on the read-only root filesystem. The trainer values' other variables (trainerSettings) are only
     passed on, and extraEnv may set them (settingRead reads them there). */}}
{{- define "vmafx-node.chartEnv" -}}
VMAFX_SIDECAR_SOCKET: "remove it: vmafx-node and the probes use the chart's socket, {{ include "vmafx-node.socket" . }}, whatever the trainer's is"
VMAFX_SIDECAR_METRICS_ADDR: "set sidecar.trainer.metrics.port (or metrics.enabled) instead: the container port, the Service and the scrape follow it"
VMAFX_SIDECAR_CHECKPOINT_DIR: "set sidecar.trainer.checkpointDir instead: each replica's directory, the one it takes over and the fleet's root follow it"
VMAFX_SIDECAR_ADOPT_DIR: "it follows sidecar.trainer.checkpointDir and node.replicas: set those instead"
VMAFX_SIDECAR_SAMPLE_LOG: "set fleet.enabled instead: the fleet CronJob reads the logs"
VMAFX_SIDECAR_SAMPLE_LOG_MAX_BYTES: "set fleet.sampleLogMaxBytes instead"
{{- end -}}

{{- define "vmafx-node.checks" -}}
{{- $models := .Values.persistence.models -}}
{{- if .Values.sidecar.trainer.enabled -}}
{{- $chartEnv := include "vmafx-node.chartEnv" . | fromYaml -}}
{{- range .Values.sidecar.trainer.extraEnv -}}
{{- if hasKey $chartEnv .name -}}
{{- fail (printf "sidecar.trainer.extraEnv sets %s, which the chart sets itself; %s" .name (index $chartEnv .name)) -}}
{{- end -}}
{{- end -}}
{{- $dir := include "vmafx-node.checkpointDir" . -}}
{{- $mount := trimSuffix "/" $models.mountPath -}}
{{- if not (or (eq $dir $mount) (hasPrefix (printf "%s/" $mount) $dir)) -}}
{{- fail (printf "sidecar.trainer.checkpointDir (%s) must be under persistence.models.mountPath (%s): the root filesystem is read-only" $dir $models.mountPath) -}}
{{- end -}}
{{- /* The sidecar refuses to start with a replay ring smaller than a batch; a size in extraEnv that is not a
       plain integer is left to it to judge (no leading 0 either: int64 would read "010" as octal). */}}
{{- $replay := include "vmafx-node.settingRead" (dict "ctx" . "key" "replayBufferSize" "env" "VMAFX_SIDECAR_REPLAY_CAPACITY" "default" 10000) | fromJson -}}
{{- $batch := include "vmafx-node.settingRead" (dict "ctx" . "key" "batchSize" "env" "VMAFX_SIDECAR_BATCH_SIZE" "default" 32) | fromJson -}}
{{- if and (regexMatch "^[1-9][0-9]*$" $replay.text) (regexMatch "^[1-9][0-9]*$" $batch.text) -}}
{{- if lt (int64 $replay.text) (int64 $batch.text) -}}
{{- fail (printf "%s (%s%s) must be at least %s (%s%s): the sidecar refuses to start with VMAFX_SIDECAR_REPLAY_CAPACITY below VMAFX_SIDECAR_BATCH_SIZE" $replay.source $replay.text $replay.note $batch.source $batch.text $batch.note) -}}
{{- end -}}
{{- end -}}
{{- /* VmafxNoCheckpointPublished takes more than minSamples accepted samples in its window for a checkpoint
       due in it. One is due once VMAFX_SIDECAR_MIN_SAMPLES_CKPT samples were trained on and
       VMAFX_SIDECAR_CKPT_INTERVAL_S seconds have both passed since the last attempt. Only accepted samples
       are trained on (held-out ones go to the evaluation ring and never count), and only once a step takes
       them: up to a step's new samples less one, fewer than VMAFX_SIDECAR_BATCH_SIZE, wait for the next. With
       minSamples below VMAFX_SIDECAR_MIN_SAMPLES_CKPT + VMAFX_SIDECAR_BATCH_SIZE, or a window no longer than
       the interval, a healthy trainer would fire it between two checkpoints. Settings in extraEnv that are
       not plain integers are left to the sidecar to judge. */}}
{{- if include "vmafx-node.prometheusRule" . -}}
{{- with .Values.sidecar.trainer.metrics.prometheusRule.alerts.noCheckpointPublished -}}
{{- $alert := "sidecar.trainer.metrics.prometheusRule.alerts.noCheckpointPublished" -}}
{{- $min := include "vmafx-node.settingRead" (dict "ctx" $ "key" "minSamplesPerCheckpoint" "env" "VMAFX_SIDECAR_MIN_SAMPLES_CKPT" "default" 1000) | fromJson -}}
{{- if and (regexMatch "^(0|[1-9][0-9]*)$" $min.text) (regexMatch "^[1-9][0-9]*$" $batch.text) -}}
{{- $bound := add (int64 $min.text) (int64 $batch.text) -}}
{{- if lt (int64 .minSamples) $bound -}}
{{- fail (printf "%s.minSamples (%v) must be at least %s (%s%s) plus %s (%s%s), %v: a checkpoint is due only once %s samples were trained on since the last, held-out samples never count toward it, and a step's new samples wait for a full batch, so VmafxNoCheckpointPublished would fire on a healthy trainer" $alert (int64 .minSamples) $min.source $min.text $min.note $batch.source $batch.text $batch.note $bound $min.text) -}}
{{- end -}}
{{- end -}}
{{- $interval := include "vmafx-node.settingRead" (dict "ctx" $ "key" "checkpointIntervalSeconds" "env" "VMAFX_SIDECAR_CKPT_INTERVAL_S" "default" 600) | fromJson -}}
{{- /* increase() sees only the changes between two scrapes in its window: checkpoints an interval apart, each
       taken by the step after it fell due (within 30 s at the rates minSamples asks for), need a window longer
       than that by two scrape intervals. */ -}}
{{- $scrape := $.Values.sidecar.trainer.metrics.serviceMonitor.interval -}}
{{- $bound := addf (float64 $interval.text) (mulf 2 (float64 (include "vmafx-node.seconds" $scrape))) 30 -}}
{{- $window := include "vmafx-node.seconds" .window -}}
{{- if le (float64 $window) $bound -}}
{{- fail (printf "%s.window (%s, %s s) must be more than %s (%s%s) plus twice sidecar.trainer.metrics.serviceMonitor.interval (%s) and 30 s, %v s: a checkpoint is due only that many seconds after the last one, taken by the step after, and increase() sees only the changes between two scrapes in its window, so VmafxNoCheckpointPublished would fire on a healthy trainer" $alert .window $window $interval.source $interval.text $interval.note $scrape $bound) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if include "vmafx-node.statefulSet" . -}}
{{- /* Each pod's controller-revision-hash label is "<name>-<hash of up to 10 characters>", at most 63. */}}
{{- if gt (len (include "vmafx-node.fullname" .)) 52 -}}
{{- fail (printf "node.replicas > 1 runs a StatefulSet named %s, longer than the 52 characters a StatefulSet's name may have: choose a shorter release name" (include "vmafx-node.fullname" .)) -}}
{{- end -}}
{{- /* An existing claim's access modes cannot be seen here; NOTES.txt says so. */}}
{{- if and (not $models.existingClaim) (not (has "ReadWriteMany" $models.accessModes)) -}}
{{- fail (printf "node.replicas > 1 runs a trainer in each pod, all on PersistentVolumeClaim %s, which then needs ReadWriteMany (persistence.models.accessModes is %s): pass --set persistence.models.accessModes={ReadWriteMany}, with a persistence.models.storageClassName whose volumes support it (e.g. NFS, CephFS, EFS, Azure Files); a claim this release made already cannot change its access modes: copy its data to a ReadWriteMany claim and name that in persistence.models.existingClaim (chart/README.md, Several replicas)" (include "vmafx-node.claimName" .) (toJson $models.accessModes)) -}}
{{- end -}}
{{- else if and $models.enabled (not $models.existingClaim) (gt (int .Values.node.replicas) 1) -}}
{{- /* Without the trainer the replicas stay a Deployment, but still all mount the one claim, from whichever
       node each runs on: on a ReadWriteOnce volume those on other nodes than the first never start
       (Multi-Attach). vmafx-node only reads it, so ReadOnlyMany does as well. */}}
{{- if not (or (has "ReadWriteMany" $models.accessModes) (has "ReadOnlyMany" $models.accessModes)) -}}
{{- fail (printf "node.replicas > 1 runs %d pods, all on PersistentVolumeClaim %s, which then needs ReadWriteMany or ReadOnlyMany (persistence.models.accessModes is %s): pass --set persistence.models.accessModes={ReadWriteMany}, with a persistence.models.storageClassName whose volumes support it (e.g. NFS, CephFS, EFS, Azure Files); a claim this release made already cannot change its access modes: copy its data to such a claim and name that in persistence.models.existingClaim (chart/README.md, Several replicas)" (int .Values.node.replicas) (include "vmafx-node.claimName" .) (toJson $models.accessModes)) -}}
{{- end -}}
{{- end -}}
{{- if include "vmafx-node.fleet" . -}}
{{- if not (include "vmafx-node.statefulSet" .) -}}
{{- fail (printf "fleet.enabled trains on the sample logs of several trainers, each in its own directory on the one volume: it needs node.replicas > 1 (is %d), sidecar.trainer.enabled (is %t) and persistence.models.enabled (is %t), with persistence.models.accessModes including ReadWriteMany (or an existingClaim that has it)" (int .Values.node.replicas) .Values.sidecar.trainer.enabled $models.enabled) -}}
{{- end -}}
{{- /* Each Job's name is "<CronJob name>-<11 characters>", at most 63. */}}
{{- if gt (len (include "vmafx-node.fleetName" .)) 52 -}}
{{- fail (printf "fleet.enabled runs a CronJob named %s, longer than the 52 characters a CronJob's name may have: choose a shorter release name" (include "vmafx-node.fleetName" .)) -}}
{{- end -}}
{{- /* A run saves what it trained at each checkpoint: one stopped before its first would be redone whole, every time. */}}
{{- $interval := include "vmafx-node.settingRead" (dict "ctx" . "key" "checkpointIntervalSeconds" "env" "VMAFX_SIDECAR_CKPT_INTERVAL_S" "default" 600) | fromJson -}}
{{- if le (float64 .Values.fleet.activeDeadlineSeconds) (float64 $interval.text) -}}
{{- fail (printf "fleet.activeDeadlineSeconds (%v) must be more than %s (%s): a run saves its progress at each checkpoint, and one stopped before its first would be redone whole, every time" .Values.fleet.activeDeadlineSeconds $interval.source $interval.text) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The pod template, the same for the Deployment and the StatefulSet; only the trainer's environment
     and POD_NAME differ (see vmafx-node.trainer). */}}
{{- define "vmafx-node.podTemplate" -}}
{{- include "vmafx-node.checks" . -}}
{{- $trainer := .Values.sidecar.trainer -}}
{{- $models := .Values.persistence.models -}}
{{- $native := include "vmafx-node.nativeSidecar" . -}}
metadata:
  labels:
    {{- include "vmafx-node.selectorLabels" . | nindent 4 }}
  {{- if include "vmafx-node.metrics" . }}
  annotations:
    prometheus.io/scrape: "true"
    prometheus.io/port: {{ int $trainer.metrics.port | quote }}
    prometheus.io/path: /metrics
  {{- end }}
spec:
  {{- /* No <SERVICE>_HOST/_PORT variables for the namespace's Services: a Service named vmafx-sidecar-...
         would give the trainer VMAFX_SIDECAR_* ones, which it warns of as unknown settings. */}}
  enableServiceLinks: false
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  {{- if and $trainer.enabled $native }}
  initContainers:
    - {{ include "vmafx-node.trainer" . | indent 6 | trim }}
      restartPolicy: Always
  {{- end }}
  containers:
    - name: vmafx-node
      image: "{{ .Values.node.image.repository }}:{{ .Values.node.image.tag }}"
      imagePullPolicy: {{ .Values.node.image.pullPolicy }}
      {{- if or $trainer.enabled .Values.node.env }}
      env:
        {{- /* For $(POD_NAME) in node.env, e.g. the path of this replica's latest.onnx. */}}
        {{- if include "vmafx-node.statefulSet" . }}
        {{- include "vmafx-node.podNameEnv" . | nindent 8 }}
        {{- end }}
        {{- if $trainer.enabled }}
        - name: VMAFX_SIDECAR_SOCKET
          value: {{ include "vmafx-node.socket" . }}
        {{- end }}
        {{- with .Values.node.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      {{- with .Values.node.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "vmafx-node.containerSecurityContext" . | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- /* vmafx-node only reads models and checkpoints. */}}
        - name: models
          mountPath: {{ $models.mountPath | quote }}
          readOnly: true
    {{- if and $trainer.enabled (not $native) }}
    - {{ include "vmafx-node.trainer" . | indent 6 | trim }}
    {{- end }}
  {{- with .Values.node.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.node.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.node.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumes:
    - name: tmp
      emptyDir: {}
    - name: models
      {{- if $models.enabled }}
      persistentVolumeClaim:
        claimName: {{ include "vmafx-node.claimName" . | quote }}
      {{- else }}
      emptyDir: {}
      {{- end }}
{{- end -}}
