"""Kubernetes identity of addresses: watches of the API server (reflectors, watch.py), the
cluster state they keep (cluster.py), and the metadata facade the collectors resolve endpoints
with (metadata.py). This module stays light: it does not import the kubernetes client."""

from __future__ import annotations

from .cluster import ClusterState, Identity

__all__ = ["RBAC_RULES", "ClusterState", "Identity"]

# Every API call the exporter makes, as the ClusterRole must grant it (deploy/ is checked
# against this): cluster-wide list and watch, and with web.kubernetes_auth the two reviews of
# a scraper's token (exporter/serving/kubeauth.py); nothing else.
RBAC_RULES = [
    {"apiGroups": [""], "resources": ["nodes", "pods", "services"], "verbs": ["list", "watch"]},
    {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["list", "watch"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["list", "watch"]},
    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
     "verbs": ["create"]},
    {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"],
     "verbs": ["create"]},
]
