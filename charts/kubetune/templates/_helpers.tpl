{{/* Names, labels and the derived settings every template shares. */}}

{{- define "kubetune.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name: the release name when it already says kubetune. */}}
{{- define "kubetune.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: set it when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kubetune.trainerImage" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) -}}
{{- end -}}

{{/* "true" when the replicas peer through kopf. */}}
{{- define "kubetune.peering" -}}
{{- if .Values.peering.enabled -}}true{{- end -}}
{{- end -}}

{{/* Where the replicas meet: the peering name and the scope kopf peers in (a
ClusterKopfPeering cluster-wide, a KopfPeering per watched namespace). Replicas that differ
in it never see each other. */}}
{{- define "kubetune.peeringScope" -}}
{{- if include "kubetune.peering" . -}}
{{- include "kubetune.peeringName" . }}@{{ join "," .Values.watchNamespaces | default "*" -}}
{{- else -}}
standalone
{{- end -}}
{{- end -}}

{{/* Recreate (never two operators at once) unless the replicas peer: then a rolling update
is safe, except from a live Deployment whose pods peer elsewhere or not at all (they would
not see the new ones). A fresh install or `helm template` finds no live Deployment. */}}
{{- define "kubetune.strategy" -}}
{{- $live := lookup "apps/v1" "Deployment" .Release.Namespace (include "kubetune.fullname" .) -}}
{{- $liveScope := "" -}}
{{- if $live -}}
{{- $liveScope = index ($live.metadata.annotations | default dict) "kubetune.io/peering-scope" | default "" -}}
{{- end -}}
{{- $samePeers := or (not $live) (eq $liveScope (include "kubetune.peeringScope" .)) -}}
{{- if and (include "kubetune.peering" .) $samePeers (gt (int .Values.replicaCount) 1) -}}
RollingUpdate
{{- else -}}
Recreate
{{- end -}}
{{- end -}}

{{- define "kubetune.peeringName" -}}
{{- default (include "kubetune.fullname" .) .Values.peering.name -}}
{{- end -}}

{{/* The operator's rules, generated from kubetune.controller.rbac (files/rbac-rules.yaml). */}}
{{- define "kubetune.rules" -}}
{{- .Files.Get "files/rbac-rules.yaml" | fromYaml | toJson -}}
{{- end -}}

{{/* Refuse combinations that cannot work, naming the values to change. */}}
{{- define "kubetune.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.peering.enabled) -}}
{{- fail "replicaCount > 1 needs peering.enabled: without peering every replica would work on the same FineTuneJobs" -}}
{{- else if eq (int .Values.operator.metricsPort) (int .Values.operator.healthPort) -}}
{{- fail (printf "operator.metricsPort and operator.healthPort must differ (both %d)" (int .Values.operator.metricsPort)) -}}
{{- else if and .Values.podDisruptionBudget.enabled (lt (int .Values.replicaCount) 2) -}}
{{- fail "podDisruptionBudget.enabled needs replicaCount >= 2: with one replica a PodDisruptionBudget blocks every node drain" -}}
{{- else if and .Values.podDisruptionBudget.enabled (ge (int .Values.podDisruptionBudget.minAvailable) (int .Values.replicaCount)) -}}
{{- fail (printf "podDisruptionBudget.minAvailable (%d) must be below replicaCount (%d), or no voluntary disruption is ever allowed" (int .Values.podDisruptionBudget.minAvailable) (int .Values.replicaCount)) -}}
{{- end -}}
{{- end -}}
