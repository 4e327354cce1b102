{{/*
Refuse, at upgrade time, what Kubernetes would refuse less clearly (or, for the node names,
not at all): a StatefulSet's volumeClaimTemplates cannot change after it is created, so
persistence size, storageClass, accessModes, enabled and existingClaim are fixed at install;
and a RabbitMQ going from one node to a cluster (or back) would change its node name and
start empty. `lookup` sees the live StatefulSet on `helm upgrade`; it returns nothing in
`helm template` and --dry-run, where nothing is checked.
Call with (dict "ctx" $ "name" <StatefulSet> "what" "consumer"|"rabbitmq" "persistence" <values>).
*/}}
{{- define "adp.claimsUnchanged" -}}
{{- $live := lookup "apps/v1" "StatefulSet" .ctx.Release.Namespace .name }}
{{- if and $live $live.spec }}
{{- $p := .persistence }}
{{- $want := dict }}
{{- if and $p.enabled (not (get $p "existingClaim")) }}
{{- $want = dict "size" (toString $p.size) "storageClass" (default "" $p.storageClass) "accessModes" (toJson $p.accessModes) }}
{{- end }}
{{- $have := dict }}
{{- range (default list $live.spec.volumeClaimTemplates) }}
{{- $have = dict "size" (toString .spec.resources.requests.storage) "storageClass" (default "" .spec.storageClassName) "accessModes" (toJson .spec.accessModes) }}
{{- end }}
{{- $fix := "claims cannot change after install (a StatefulSet's volumeClaimTemplates are immutable): keep the installed values; to resize, expand each PersistentVolumeClaim itself if its StorageClass allows it (kubectl edit pvc), then set the new size and run `kubectl delete statefulset --cascade=orphan` before the upgrade (README, Upgrades)" }}
{{- if ne (empty $want) (empty $have) }}
{{- fail (printf "%s.persistence: switching between claims per pod and %s is not possible on a live release: %s" .what (ternary "an emptyDir or existing claim" "claims per pod" (empty $want)) $fix) }}
{{- end }}
{{- range $key := list "size" "storageClass" "accessModes" }}
{{- if and (not (empty $want)) (ne (index $want $key) (index $have $key)) }}
{{- fail (printf "%s.persistence.%s is %s, the live claims have %s: %s" $.what $key (index $want $key) (index $have $key) $fix) }}
{{- end }}
{{- end }}
{{- if eq .what "rabbitmq" }}
{{- $wasCluster := gt (int (default 1 $live.spec.replicas)) 1 }}
{{- if ne $wasCluster (gt (int .ctx.Values.rabbitmq.replicaCount) 1) }}
{{- fail (printf "rabbitmq.replicaCount cannot go between 1 and several nodes on a live release (now %v replicas): the node names change and the node would start empty. Install a new release beside it and move the load (README, High availability)" $live.spec.replicas) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
