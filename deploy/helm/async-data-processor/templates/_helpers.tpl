{{/* Names and labels, as in the `helm create` scaffold. */}}

{{/* The chart name, or nameOverride. */}}
{{- define "adp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release-qualified name; names of all objects start with it. 43 characters at most,
so that every name built on it fits: the StatefulSets (`-consumer`, `-rabbitmq`: 52 at most,
or their pods' controller-revision-hash label passes 63 and no pod is created), the headless
Service (`-rabbitmq-headless`) and the hooks' and test pod's names (63 at most, DNS labels). */}}
{{- define "adp.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 43 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 43 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 43 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "adp.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "adp.labels" -}}
helm.sh/chart: {{ include "adp.chart" . }}
{{ include "adp.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ include "adp.name" . }}
{{- end }}

{{/* Labels that select the release's pods (never change them: selectors are immutable). */}}
{{- define "adp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "adp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Per-component labels: call with (dict "ctx" $ "component" "api"). */}}
{{- define "adp.componentLabels" -}}
{{ include "adp.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "adp.componentSelectorLabels" -}}
{{ include "adp.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "adp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "adp.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image: call with (dict "image" .Values.api.image "ctx" $). */}}
{{- define "adp.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{- define "adp.rabbitmq.fullname" -}}
{{- printf "%s-rabbitmq" (include "adp.fullname" .) }}
{{- end }}

{{- define "adp.rabbitmq.headless" -}}
{{- printf "%s-rabbitmq-headless" (include "adp.fullname" .) }}
{{- end }}

{{/* More than one RabbitMQ node: a cluster (peer discovery, quorum queues, PDB, preStop). */}}
{{- define "adp.rabbitmq.clustered" -}}
{{- if gt (int .Values.rabbitmq.replicaCount) 1 }}true{{ end }}
{{- end }}

{{/* The stable DNS name of RabbitMQ pod N, through the headless Service: call with
(dict "ctx" $ "ordinal" N). */}}
{{- define "adp.rabbitmq.host" -}}
{{- printf "%s-%d.%s.%s.svc.%s" (include "adp.rabbitmq.fullname" .ctx) (int .ordinal) (include "adp.rabbitmq.headless" .ctx) .ctx.Release.Namespace .ctx.Values.rabbitmq.clusterDomain }}
{{- end }}

{{/* A Kubernetes memory quantity (e.g. 1Gi, 1500M, 1073741824) in bytes, as an integer. */}}
{{- define "adp.bytes" -}}
{{- $quantity := toString . }}
{{- $units := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 }}
{{- $number := regexFind `^[0-9]+(\.[0-9]+)?` $quantity }}
{{- $suffix := trimPrefix $number $quantity }}
{{- if or (not $number) (not (hasKey $units $suffix)) }}
{{- fail (printf "%q is not a memory quantity in bytes (e.g. 1Gi, 1500M)" $quantity) }}
{{- end }}
{{- printf "%d" (mulf (float64 $number) (index $units $suffix) | floor | int64) }}
{{- end }}

{{/* The Secret and key holding RABBITMQ_URL. */}}
{{- define "adp.brokerSecretName" -}}
{{- if .Values.rabbitmq.enabled }}
{{- default (include "adp.rabbitmq.fullname" .) .Values.rabbitmq.auth.existingSecret }}
{{- else }}
{{- required "rabbitmq.enabled=false needs externalBroker.existingSecret: a Secret holding the broker URL" .Values.externalBroker.existingSecret }}
{{- end }}
{{- end }}

{{- define "adp.brokerSecretKey" -}}
{{- if .Values.rabbitmq.enabled }}rabbitmq-url{{ else }}{{ .Values.externalBroker.existingSecretKey }}{{ end }}
{{- end }}

{{/* Environment both services share: the broker URL, only ever from a Secret. */}}
{{- define "adp.brokerEnv" -}}
- name: RABBITMQ_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "adp.brokerSecretName" . }}
      key: {{ include "adp.brokerSecretKey" . }}
{{- end }}

{{/* A probe on an HTTP path of the named port: call with (dict "path" "/healthz" "timings" .Values.api.livenessProbe). */}}
{{- define "adp.httpProbe" -}}
httpGet:
  path: {{ .path }}
  port: http
{{ toYaml .timings }}
{{- end }}

{{/* Fail early on values the schema cannot express. */}}
{{- define "adp.validate" -}}
{{- $drain := add (ceil .Values.config.shutdownTimeoutSeconds) 3 }}
{{- if le (int .Values.consumer.terminationGracePeriodSeconds) (int $drain) }}
{{- fail (printf "consumer.terminationGracePeriodSeconds (%v) must exceed config.shutdownTimeoutSeconds + 3 (%v): the drain would be cut off" .Values.consumer.terminationGracePeriodSeconds $drain) }}
{{- end }}
{{- if le (int .Values.api.terminationGracePeriodSeconds) (int $drain) }}
{{- fail (printf "api.terminationGracePeriodSeconds (%v) must exceed config.shutdownTimeoutSeconds + 3 (%v)" .Values.api.terminationGracePeriodSeconds $drain) }}
{{- end }}
{{- if gt (int .Values.config.workersMin) (int .Values.config.workersMax) }}
{{- fail "config.workersMin must not exceed config.workersMax" }}
{{- end }}
{{- if ge (int .Values.config.scaleDownBacklog) (int .Values.config.scaleUpBacklog) }}
{{- fail "config.scaleDownBacklog must be below config.scaleUpBacklog" }}
{{- end }}
{{- if and .Values.rabbitmq.enabled (include "adp.rabbitmq.clustered" .) }}
{{- if ne .Values.config.queueType "quorum" }}
{{- fail (printf "rabbitmq.replicaCount=%v needs config.queueType=quorum: a classic queue lives on one node and goes with it (queues created as classic must be migrated: see README, High availability)" .Values.rabbitmq.replicaCount) }}
{{- end }}
{{- if lt (int .Values.rabbitmq.terminationGracePeriodSeconds) 120 }}
{{- fail (printf "rabbitmq.terminationGracePeriodSeconds (%v) must be 120 or more with several nodes: the preStop waits for the quorum queues' other members, then drains the node" .Values.rabbitmq.terminationGracePeriodSeconds) }}
{{- end }}
{{- end }}
{{- if and .Values.rabbitmq.enabled (not .Values.rabbitmq.resources.limits.memory) }}
{{- fail "rabbitmq.resources.limits.memory is required: RabbitMQ's memory alarm is derived from it" }}
{{- end }}
{{- end }}
