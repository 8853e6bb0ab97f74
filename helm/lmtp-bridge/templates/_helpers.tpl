{{/* The chart name, or nameOverride. */}}
{{- define "lmtp-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name of the release's resources (at most 63 characters). */}}
{{- define "lmtp-bridge.fullname" -}}
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

{{/* name-version for the helm.sh/chart label. */}}
{{- define "lmtp-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels that select the pods: never change them on upgrade. */}}
{{- define "lmtp-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lmtp-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The recommended labels, on every resource. */}}
{{- define "lmtp-bridge.labels" -}}
helm.sh/chart: {{ include "lmtp-bridge.chart" . }}
{{ include "lmtp-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ include "lmtp-bridge.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: lmtp-server
app.kubernetes.io/part-of: lmtp-bridge
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "lmtp-bridge.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* repository:tag, or repository@digest. */}}
{{- define "lmtp-bridge.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "lmtp-bridge.imageTag" .) }}
{{- end }}
{{- end }}

{{- define "lmtp-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lmtp-bridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The name of the Secret the pod mounts: the existing one, or the chart's, or "" for none. */}}
{{- define "lmtp-bridge.secretName" -}}
{{- if .Values.secret.existingSecret }}
{{- .Values.secret.existingSecret }}
{{- else if and .Values.secret.create (or (eq .Values.mode "sidecar") .Values.secret.webhookSecret .Values.secret.webhookHeaders) }}
{{- include "lmtp-bridge.fullname" . }}
{{- end }}
{{- end }}

{{/* The ConfigMap's config.yaml. */}}
{{- define "lmtp-bridge.configFile" -}}
{{- toYaml .Values.config }}
{{- end }}

{{/* terminationGracePeriodSeconds: given (and checked) or shutdown_grace + 15. */}}
{{- define "lmtp-bridge.terminationGrace" -}}
{{- $grace := .Values.config.shutdown_grace | default 25 | float64 }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (ceil $grace | int) 15 }}
{{- else }}
{{- if le (float64 .Values.terminationGracePeriodSeconds) $grace }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be above config.shutdown_grace (%v): Kubernetes would kill deliveries that are still draining" .Values.terminationGracePeriodSeconds $grace) }}
{{- end }}
{{- .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* The bridge container's environment: config file, listen addresses, secrets as files. */}}
{{- define "lmtp-bridge.env" -}}
- name: LMTP_BRIDGE_CONFIG
  value: /etc/lmtp-bridge/config/config.yaml
- name: LMTP_BRIDGE_LISTEN
  value: {{ printf "0.0.0.0:%v" .Values.ports.lmtp | quote }}
- name: LMTP_BRIDGE_METRICS_LISTEN
  value: {{ printf "0.0.0.0:%v" .Values.ports.metrics | quote }}
{{- if include "lmtp-bridge.secretName" . }}
{{- if .Values.secret.keys.webhookSecret }}
{{- if or .Values.secret.existingSecret .Values.secret.webhookSecret }}
- name: LMTP_BRIDGE_WEBHOOK_SECRET_FILE
  value: {{ printf "%s/%s" .Values.secret.mountPath .Values.secret.keys.webhookSecret | quote }}
{{- end }}
{{- end }}
{{- if .Values.secret.keys.webhookHeaders }}
{{- if or .Values.secret.existingSecret .Values.secret.webhookHeaders }}
- name: LMTP_BRIDGE_WEBHOOK_HEADERS_FILE
  value: {{ printf "%s/%s" .Values.secret.mountPath .Values.secret.keys.webhookHeaders | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
