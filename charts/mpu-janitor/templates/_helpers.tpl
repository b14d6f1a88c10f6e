{{/*
Expand the name of the chart.
*/}}
{{- define "mpu-janitor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the resources: the release name, then the chart name unless it is already in
it; at most 63 characters (some Kubernetes name fields are limited to that, by the DNS spec).
*/}}
{{- define "mpu-janitor.fullname" -}}
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

{{/*
The namespace of the release's namespaced objects: namespaceOverride, or the release namespace.
*/}}
{{- define "mpu-janitor.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride }}
{{- end }}

{{/*
Chart name and version, as used by the chart label.
*/}}
{{- define "mpu-janitor.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "mpu-janitor.labels" -}}
helm.sh/chart: {{ include "mpu-janitor.chart" . }}
{{ include "mpu-janitor.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mpu-janitor
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "mpu-janitor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mpu-janitor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The name of the ServiceAccount to use.
*/}}
{{- define "mpu-janitor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mpu-janitor.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: the digest wins over the tag; the tag defaults to the appVersion.
*/}}
{{- define "mpu-janitor.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The Kopf peering object's name.
*/}}
{{- define "mpu-janitor.peeringName" -}}
{{- default (include "mpu-janitor.fullname" .) .Values.peering.name }}
{{- end }}

{{/*
The rules on namespaced resources, shared by the ClusterRole (all namespaces) and the Roles
(a list of namespaces).
*/}}
{{- define "mpu-janitor.namespacedRules" -}}
# Policies: Kopf lists and watches them into its index; the sweep scheduler reads them.
- apiGroups: ["mpu-janitor.dev"]
  resources: ["uploadlifecyclepolicies"]
  verbs: ["get", "list", "watch"]
# Policy status: the Ready condition, the last sweep's counts, totals, the next sweep time.
- apiGroups: ["mpu-janitor.dev"]
  resources: ["uploadlifecyclepolicies/status"]
  verbs: ["get", "patch", "update"]
# Events: one Event per sweep on the policy (core v1 Events, as Kopf posts them).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
# Events: the same through events.k8s.io/v1, for clients that use the newer API.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Store credentials: the Secret named by spec.store.credentialsSecretRef, read by name in the
# policy's own namespace (never listed or watched).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- $accounts := .Values.credentials.workloadIdentityServiceAccounts }}
{{- if or (kindIs "invalid" $accounts) (not (empty $accounts)) }}
# Workload identity: a short-lived token for the ServiceAccount named by
# spec.store.serviceAccountRef, in the policy's own namespace (TokenRequest), exchanged with STS.
# Only create on the token subresource: no get, list or use of ServiceAccounts or their Secrets;
# only the names in credentials.workloadIdentityServiceAccounts when it lists them.
- apiGroups: [""]
  resources: ["serviceaccounts/token"]
  verbs: ["create"]
  {{- if not (kindIs "invalid" $accounts) }}
  resourceNames: {{ toJson $accounts }}
  {{- end }}
{{- end }}
{{- end }}
