{{/*
Named templates of the sendable-keys chart. Every define is prefixed "sendable-keys." so it
cannot clash with a parent or sub chart.

Ports are fixed: the chart tells the server to listen on 0.0.0.0:50051 (gRPC) and
0.0.0.0:9090 (admin HTTP), and every probe, NetworkPolicy and Service refers to these.
*/}}

{{- define "sendable-keys.grpcPort" -}}50051{{- end }}
{{- define "sendable-keys.adminPort" -}}9090{{- end }}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "sendable-keys.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the prefix of every resource. Truncated to 52 characters so that the longest
suffix the chart appends ("-test-health", 12 characters) still gives a valid 63-character
DNS label.
*/}}
{{- define "sendable-keys.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name and version for the helm.sh/chart label. */}}
{{- define "sendable-keys.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels. Called with (dict "ctx" $ "component" "server"). The component keeps the
server pods, the development Redis and the helm test pod apart: without it the Service would
also select the test pod.
*/}}
{{- define "sendable-keys.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sendable-keys.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Standard labels for every resource. Called with (dict "ctx" $ "component" "..."). */}}
{{- define "sendable-keys.labels" -}}
helm.sh/chart: {{ include "sendable-keys.chart" .ctx }}
{{ include "sendable-keys.selectorLabels" . }}
app.kubernetes.io/version: {{ include "sendable-keys.imageTag" .ctx | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: sendable
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* ServiceAccount name. */}}
{{- define "sendable-keys.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sendable-keys.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image tag: image.tag or the chart's appVersion. */}}
{{- define "sendable-keys.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/* Image reference: repository@digest when a digest is given, else repository:tag. */}}
{{- define "sendable-keys.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "sendable-keys.imageTag" .) }}
{{- end }}
{{- end }}

{{/* Name of the development Redis Deployment and Service. */}}
{{- define "sendable-keys.redisDevName" -}}
{{- printf "%s-redis" (include "sendable-keys.fullname" .) }}
{{- end }}

{{/*
Booleans below render "true" or nothing, so callers test them with `if include ...`.
*/}}

{{/* The server uses Redis (external or the development one), so it needs REDIS_URL and a pepper. */}}
{{- define "sendable-keys.usesRedis" -}}
{{- if ne .Values.redis.mode "memory" }}true{{ end }}
{{- end }}

{{/* Caller credentials are mounted. */}}
{{- define "sendable-keys.hasCredentials" -}}
{{- if .Values.secrets.existingSecret }}
{{- if .Values.secrets.existingSecretKeys.credentials }}true{{ end }}
{{- else if .Values.auth.callers }}true{{ end }}
{{- end }}

{{/* The chart renders its own Secret: no existingSecret, and something to put in it. */}}
{{- define "sendable-keys.chartSecret" -}}
{{- if and (not .Values.secrets.existingSecret) (or (include "sendable-keys.usesRedis" .) .Values.auth.callers) }}true{{ end }}
{{- end }}

{{/* Name of the Secret the pods read: the existing one or the chart's. */}}
{{- define "sendable-keys.secretName" -}}
{{- default (include "sendable-keys.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* Key of the Redis URL(s) in the Secret the pods read. */}}
{{- define "sendable-keys.redisUrlKey" -}}
{{- if .Values.secrets.existingSecret }}{{ .Values.secrets.existingSecretKeys.redisUrl }}{{ else }}redis-url{{ end }}
{{- end }}

{{/*
The pepper for the chart's Secret. Precedence: secrets.pepper; for the development Redis only,
the pepper already stored in this release's Secret (lookup; empty under `helm template`), else a
fresh random one. External Redis never gets a generated pepper: a GitOps tool rendering with
`helm template` would change it on every sync and invalidate every key.
*/}}
{{- define "sendable-keys.pepper" -}}
{{- if .Values.secrets.pepper }}
{{- .Values.secrets.pepper }}
{{- else if eq .Values.redis.mode "dev" }}
{{- $previous := lookup "v1" "Secret" .Release.Namespace (include "sendable-keys.fullname" .) }}
{{- /* Nested, not `and`: Go templates before 1.18 evaluate every operand of `and`. */}}
{{- $data := dict }}
{{- if $previous }}{{ $data = default (dict) $previous.data }}{{ end }}
{{- if hasKey $data "pepper" }}
{{- index $data "pepper" | b64dec }}
{{- else }}
{{- randAlphaNum 48 }}
{{- end }}
{{- else }}
{{- fail "redis.mode=external needs a pepper: set secrets.existingSecret, or pass secrets.pepper (at least 32 bytes) at install time with --set-file secrets.pepper=./pepper" }}
{{- end }}
{{- end }}

{{/* REDIS_URL for the chart's Secret. */}}
{{- define "sendable-keys.redisUrl" -}}
{{- if eq .Values.redis.mode "dev" }}
{{- printf "redis://%s.%s.svc:6379" (include "sendable-keys.redisDevName" .) .Release.Namespace }}
{{- else }}
{{- if not .Values.redis.external.urls }}
{{- fail "redis.mode=external needs redis.external.urls (or secrets.existingSecret with the key secrets.existingSecretKeys.redisUrl)" }}
{{- end }}
{{- join "," .Values.redis.external.urls }}
{{- end }}
{{- end }}

{{/* credentials.toml from auth.callers. Names and roles are schema-checked; toJson quotes them as TOML basic strings. */}}
{{- define "sendable-keys.credentialsToml" -}}
# Callers of sendable-keys, rendered by the Helm chart from auth.callers.
{{- range .Values.auth.callers }}

[[caller]]
name = {{ .name | toJson }}
role = {{ .role | toJson }}
token_sha256 = {{ .tokenSha256 | lower | toJson }}
{{- end }}
{{ end }}

{{/* A TOML float: YAML 3.0 arrives as the number 3, which must still be written 3.0. */}}
{{- define "sendable-keys.tomlFloat" -}}
{{- $s := toString . }}
{{- if regexMatch "[.eE]" $s }}{{ $s }}{{ else }}{{ $s }}.0{{ end }}
{{- end }}

{{/* A duration (500ms, 2s, 5m, 1h) in milliseconds. */}}
{{- define "sendable-keys.durationMs" -}}
{{- $n := int64 (regexReplaceAll "^([0-9]+)(ms|s|m|h)$" . "${1}") }}
{{- $unit := regexReplaceAll "^([0-9]+)(ms|s|m|h)$" . "${2}" }}
{{- $factor := dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000 }}
{{- mul $n (index $factor $unit) }}
{{- end }}

{{/*
Checks that values.schema.json cannot express. Included by the Deployment, so a bad
combination fails `helm template`, `helm lint` and `helm install` with a clear message.
*/}}
{{- define "sendable-keys.validate" -}}
{{- $v := .Values }}
{{- if eq $v.redis.mode "memory" }}
{{- if gt (int $v.replicaCount) 1 }}
{{- fail (printf "replicaCount=%d with redis.mode=memory: each replica would have its own keys and rate limits. Use redis.mode=external (or dev), or replicaCount=1." (int $v.replicaCount)) }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- fail "autoscaling.enabled with redis.mode=memory: replicas would not share keys or rate limits. Use redis.mode=external (or dev)." }}
{{- end }}
{{- end }}
{{- if and (eq $v.redis.mode "dev") $v.secrets.existingSecret }}
{{- fail "redis.mode=dev keeps its URL and pepper in the chart's Secret; it cannot be combined with secrets.existingSecret (use redis.mode=external with your Secret)" }}
{{- end }}
{{- if and (eq $v.redis.mode "dev") $v.redis.cluster }}
{{- fail "redis.cluster=true with redis.mode=dev: the development Redis is a single standalone server" }}
{{- end }}
{{- if and (eq $v.redis.mode "external") $v.secrets.existingSecret (not $v.secrets.existingSecretKeys.redisUrl) }}
{{- fail "redis.mode=external with secrets.existingSecret needs secrets.existingSecretKeys.redisUrl" }}
{{- end }}
{{- if and (include "sendable-keys.usesRedis" .) $v.secrets.existingSecret (not $v.secrets.existingSecretKeys.pepper) }}
{{- fail "Redis with secrets.existingSecret needs secrets.existingSecretKeys.pepper" }}
{{- end }}
{{- if and (not $v.secrets.existingSecret) $v.secrets.pepper (lt (len $v.secrets.pepper) 32) }}
{{- fail "secrets.pepper must be at least 32 bytes" }}
{{- end }}
{{- if include "sendable-keys.chartSecret" . }}
{{- /* Fails now, with the message, rather than inside the Secret template. */}}
{{- if include "sendable-keys.usesRedis" . }}
{{- $_ := include "sendable-keys.pepper" . }}
{{- $_ := include "sendable-keys.redisUrl" . }}
{{- end }}
{{- end }}
{{- range $v.extraEnv }}
{{- if and (has .name (list "REDIS_URL" "SENDABLE_KEYS_PEPPER")) (hasKey . "value") }}
{{- fail (printf "extraEnv: %s holds a secret; give it with valueFrom.secretKeyRef, never as a plain value" .name) }}
{{- end }}
{{- end }}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret (a Secret with the certificate and key)" }}
{{- end }}
{{- if and $v.tls.mtls (not $v.tls.enabled) }}
{{- fail "tls.mtls needs tls.enabled" }}
{{- end }}
{{- $drainMs := int64 (include "sendable-keys.durationMs" $v.config.drainTimeout) }}
{{- $graceMs := mul (int64 $v.terminationGracePeriodSeconds) 1000 }}
{{- if gt (add $drainMs 2000) $graceMs }}
{{- fail (printf "config.drainTimeout (%s) must be at least 2s shorter than terminationGracePeriodSeconds (%ds), or Kubernetes kills the pod mid-drain" $v.config.drainTimeout (int $v.terminationGracePeriodSeconds)) }}
{{- end }}
{{- /* The server refuses to start unless 0 < resolve < fire; say so at install time. */}}
{{- range $name, $levels := $v.config.alerts }}
{{- if ge (float64 $levels.resolve) (float64 $levels.fire) }}
{{- fail (printf "config.alerts.%s: resolve (%v) must be below fire (%v), or the alert could never clear" $name $levels.resolve $levels.fire) }}
{{- end }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and $v.podDisruptionBudget.enabled (not (include "sendable-keys.pdbMinAvailableSet" .)) (or (kindIs "invalid" $v.podDisruptionBudget.maxUnavailable) (eq (toString $v.podDisruptionBudget.maxUnavailable) "")) }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable" }}
{{- end }}
{{- end }}

{{/* podDisruptionBudget.minAvailable is set (neither null nor ""). */}}
{{- define "sendable-keys.pdbMinAvailableSet" -}}
{{- $min := .Values.podDisruptionBudget.minAvailable }}
{{- if not (or (kindIs "invalid" $min) (eq (toString $min) "")) }}true{{ end }}
{{- end }}

{{/*
Probe targets. Native gRPC probes (grpc.health.v1) when the gRPC port is plaintext; HTTP on the
admin port when TLS is on, since kubelet's gRPC probes cannot do TLS.
*/}}
{{- define "sendable-keys.readinessTarget" -}}
{{- if .Values.tls.enabled }}
httpGet:
  path: /readyz
  port: metrics
  scheme: HTTP
{{- else }}
grpc:
  port: {{ include "sendable-keys.grpcPort" . }}
{{- end }}
{{- end }}

{{- define "sendable-keys.livenessTarget" -}}
{{- if .Values.tls.enabled }}
httpGet:
  path: /livez
  port: metrics
  scheme: HTTP
{{- else }}
grpc:
  port: {{ include "sendable-keys.grpcPort" . }}
  service: liveness
{{- end }}
{{- end }}
