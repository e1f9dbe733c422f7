{{/* The image of component `.name` (ferry-replicator, ferry-controller) at the chart's tag. */}}
{{- define "ferry.image" -}}
{{ .root.Values.image.registry }}/{{ .name }}:{{ .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- end -}}

{{/* Labels of component `.name`; the selector uses only app.kubernetes.io/name. */}}
{{- define "ferry.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/part-of: ferry
{{- end -}}
