"""How the watches are doing: synced kinds, failing kinds, error counts. Logs once per outage
(not once per retry) and once per missing permission, naming the verb and the resource."""

from __future__ import annotations

import threading
import time

from .. import logs
from .cluster import JOBS, NODES, PODS, REPLICASETS, SERVICES

log = logs.get("k8s")

API_GROUPS = {PODS: "", SERVICES: "", NODES: "", REPLICASETS: "apps", JOBS: "batch"}
# without these an address cannot be told apart from one outside the cluster
ESSENTIAL = (PODS, NODES)


class Health:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.errors: dict[str, float] = {kind: 0.0 for kind in API_GROUPS}
        self._synced: set[str] = set()
        self._failing: set[str] = set()
        self._forbidden: set[tuple[str, str]] = set()
        self._outage_started: float | None = None

    def synced(self, kind: str) -> None:
        with self._lock:
            self._synced.add(kind)

    def ok(self, kind: str) -> None:
        with self._lock:
            if kind not in self._failing:
                return
            self._failing.discard(kind)
            if not self._failing and self._outage_started is not None:
                log.info("kubernetes API reachable again", extra={
                    "outage_seconds": round(time.monotonic() - self._outage_started, 1)})
                self._outage_started = None

    def failed(self, kind: str, verb: str, error: str, status: int | None = None) -> None:
        with self._lock:
            self.errors[kind] += 1
            self._failing.add(kind)
            if status == 403:
                if (kind, verb) not in self._forbidden:
                    self._forbidden.add((kind, verb))
                    group = API_GROUPS[kind]
                    resource = f"{kind}.{group}" if group else kind
                    log.error("kubernetes API forbids a call the exporter needs: grant it in "
                              "the ClusterRole", extra={"verb": verb, "resource": resource,
                                                        "scope": "cluster", "error": error})
                return
            if self._outage_started is None:
                self._outage_started = time.monotonic()
                log.warning("kubernetes API unreachable; serving cached identities, "
                            "unresolved addresses read workload=unknown, retrying",
                            extra={"kind": kind, "verb": verb, "error": error})

    def complete(self) -> bool:
        """Whether an address that resolves to nothing is really outside the cluster."""
        with self._lock:
            return all(k in self._synced and k not in self._failing for k in ESSENTIAL)

    def error_counts(self) -> dict[str, float]:
        with self._lock:
            return dict(self.errors)
