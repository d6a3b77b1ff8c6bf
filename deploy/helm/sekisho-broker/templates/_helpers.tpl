{{/* Names, labels and the checks every template relies on. */}}

{{/* The chart name, or nameOverride. */}}
{{- define "sekisho-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Object name prefix: fullnameOverride, or RELEASE-CHART (RELEASE alone when it already
contains the chart name). At most 55 characters, so that "-N" ordinals still fit. */}}
{{- define "sekisho-broker.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 55 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 55 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 55 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sekisho-broker.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "sekisho-broker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "sekisho-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sekisho-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sekisho-broker.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Broker N's registry name prefix. */}}
{{- define "sekisho-broker.namePrefix" -}}
{{- default (printf "%s-" (include "sekisho-broker.fullname" .)) .Values.broker.namePrefix -}}
{{- end -}}

{{/* Fails the rendering with a clear message when required values are missing. */}}
{{- define "sekisho-broker.validate" -}}
{{- if ne (len .Values.broker.publicHosts) (int .Values.replicaCount) -}}
{{- fail (printf "broker.publicHosts must list one public host per broker: replicaCount is %d, broker.publicHosts has %d" (int .Values.replicaCount) (len .Values.broker.publicHosts)) -}}
{{- end -}}
{{- if not .Values.broker.apiUrl -}}
{{- fail "broker.apiUrl is required: the control API's URL as devices and connectors reach it, like https://sekisho.example.net:8443" -}}
{{- end -}}
{{- if not (hasPrefix "https://" .Values.broker.apiUrl) -}}
{{- fail "broker.apiUrl must start with https://" -}}
{{- end -}}
{{- if not .Values.database.existingSecret -}}
{{- fail "database.existingSecret is required: a Secret with the PostgreSQL URL" -}}
{{- end -}}
{{- if not .Values.pki.existingSecret -}}
{{- fail "pki.existingSecret is required: a Secret with ca.pem, ca.key, broker.pem, broker.key" -}}
{{- end -}}
{{- end -}}
