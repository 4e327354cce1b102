{{/* Names and labels, as in the `helm create` scaffold. */}}

{{/* The chart name, or nameOverride. */}}
{{- define "adp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release-qualified name; names of all objects start with it (63 characters at most). */}}
{{- define "adp.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
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
{{- printf "%s-rabbitmq" (include "adp.fullname" .) | trunc 63 | trimSuffix "-" }}
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
{{- end }}
