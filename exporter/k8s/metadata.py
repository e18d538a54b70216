"""The facade over the watches: resolve an address to its identity without waiting on the API
server, and report the cache and the watch errors as the exporter's own metrics."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from kubernetes import client as kube_client
from kubernetes.client.rest import ApiException
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from .. import logs
from .cluster import (
    EXTERNAL_IDENTITY,
    JOBS,
    KINDS,
    NODES,
    PODS,
    REPLICASETS,
    SERVICES,
    UNKNOWN_IDENTITY,
    ZONE_LABELS,
    ClusterState,
    Identity,
)
from .health import Health
from .watch import CONNECT_TIMEOUT, Backoff, Reflector

log = logs.get("k8s")
ZONE_QUERY_SECONDS = 10.0


class KubernetesMetadata:
    """Resolves addresses to identities from watches that run in the background."""

    def __init__(self, api: kube_client.ApiClient, deleted_pod_grace: float,
                 backoff: Backoff | None = None) -> None:
        self.state = ClusterState(deleted_pod_grace)
        self.health = Health()
        core, apps, batch = kube_client.CoreV1Api(api), kube_client.AppsV1Api(api), \
            kube_client.BatchV1Api(api)
        calls = {PODS: core.list_pod_for_all_namespaces,
                 SERVICES: core.list_service_for_all_namespaces,
                 NODES: core.list_node,
                 REPLICASETS: apps.list_replica_set_for_all_namespaces,
                 JOBS: batch.list_job_for_all_namespaces}
        self._core = core
        self.reflectors = [Reflector(kind, calls[kind], self.state, self.health,
                                     backoff or Backoff()) for kind in KINDS]

    def start(self) -> None:
        for reflector in self.reflectors:
            reflector.start()

    def stop(self) -> None:
        for reflector in self.reflectors:
            reflector.stop()

    def resolve(self, ip: str) -> Identity:
        identity = self.state.resolve(ip)
        if identity is not None:
            return identity
        return EXTERNAL_IDENTITY if self.health.complete() else UNKNOWN_IDENTITY

    def has_zones(self) -> bool | None:
        """Whether any node carries a zone label, asked of the API server before the watches
        start (one node at most per label); None when it cannot be asked within
        ZONE_QUERY_SECONDS (the client's retries of an unanswered connection take longer)."""
        answer: list[bool | None] = [None]
        asking = threading.Thread(target=lambda: answer.__setitem__(0, self._has_zones()),
                                  name="zone-query", daemon=True)
        asking.start()
        asking.join(ZONE_QUERY_SECONDS)
        if asking.is_alive():
            log.warning("no answer from the API server on node zones: zone labels on",
                        extra={"waited_seconds": ZONE_QUERY_SECONDS})
        return answer[0]

    def _has_zones(self) -> bool | None:
        for label in ZONE_LABELS:
            try:
                found = self._core.list_node(label_selector=label, limit=1,
                                             _request_timeout=(CONNECT_TIMEOUT, 10.0))
            except ApiException as e:
                log.warning("cannot list nodes to learn whether they carry zones",
                            extra={"status": e.status, "reason": e.reason})
                return None
            except Exception as e:      # unreachable, timed out, bad JSON
                log.warning("cannot list nodes to learn whether they carry zones",
                            extra={"error": str(e).splitlines()[0] if str(e) else repr(e)})
                return None
            if found.items:
                return True
        return False

    def version(self) -> tuple[int, bool]:
        """Changes whenever resolve() may answer differently (endpoints.Resolver)."""
        return self.state.version, self.health.complete()

    def collect(self) -> Iterable[Metric]:
        objects = GaugeMetricFamily("ebpf_net_exporter_k8s_objects",
                                    "Kubernetes objects in the exporter's cache.", labels=["kind"])
        for kind, count in sorted(self.state.counts().items()):
            objects.add_metric([kind], count)
        yield objects
        errors = CounterMetricFamily(
            "ebpf_net_exporter_k8s_watch_errors",
            "Failed list or watch calls to the Kubernetes API server (each is retried with "
            "back-off).", labels=["kind"])
        for kind, count in sorted(self.health.error_counts().items()):
            errors.add_metric([kind], count)
        yield errors

    def describe(self) -> Iterable[Metric]:
        return self.collect()
