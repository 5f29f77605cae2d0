{{/* Names are fixed, not release-prefixed: sidecars find the control plane at
     ringfence.<ns>.svc and ringfence-budget.<ns>.svc, so one release serves a cluster. */}}

{{- define "ringfence.labels" -}}
app.kubernetes.io/name: ringfence
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "ringfence.selector" -}}
app.kubernetes.io/name: ringfence
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ringfence.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "ringfence.sidecarImage" -}}
{{ .Values.sidecarImage.repository }}:{{ .Values.sidecarImage.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Namespaces the injection webhooks never see. */}}
{{- define "ringfence.excludedNamespaces" -}}
{{- $ns := list "kube-system" "kube-public" "kube-node-lease" .Release.Namespace -}}
{{- concat $ns .Values.webhook.excludeNamespaces | uniq | toJson -}}
{{- end -}}

{{- define "ringfence.usesPostgres" -}}
{{- if or .Values.budget.database.existingSecret .Values.budget.database.postgres.host -}}true{{- end -}}
{{- end -}}
