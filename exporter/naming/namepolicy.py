"""Cardinality controls on Kubernetes names: namespace, workload and service allowlists and
denylists (globs), and the namespaces whose endpoints carry a `pod` label. A name that is not
allowed reads `other`; its traffic is kept, only the name is folded."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import replace

from cachetools import LRUCache

from ..k8s.cluster import Identity

OTHER = "other"


class Globs:
    """Allow and deny globs. A glob with a "/" matches "namespace/name", any other the name."""

    def __init__(self, allow: Sequence[str], deny: Sequence[str]) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        self.open = self.allow in ((), ("*",)) and not self.deny

    def allows(self, name: str, namespace: str = "") -> bool:
        if self.open:
            return True
        qualified = f"{namespace}/{name}"

        def matches(pattern: str) -> bool:
            return fnmatch.fnmatchcase(qualified if "/" in pattern else name, pattern)

        allowed = not self.allow or any(matches(p) for p in self.allow)
        return allowed and not any(matches(p) for p in self.deny)


class NamePolicy:
    def __init__(self, namespaces: Globs | None = None, workloads: Globs | None = None,
                 services: Globs | None = None, pod_namespaces: Sequence[str] = ()) -> None:
        self.namespaces = namespaces or Globs((), ())
        self.workloads = workloads or Globs((), ())
        self.services = services or Globs((), ())
        self.pod_namespaces = tuple(pod_namespaces)
        self._applied: LRUCache[Identity, Identity] = LRUCache(maxsize=65536)

    def apply(self, identity: Identity) -> Identity:
        folded = self._applied.get(identity)
        if folded is None:
            folded = self._applied[identity] = self._fold(identity)
        return folded

    def _fold(self, identity: Identity) -> Identity:
        namespace = identity.namespace
        if not namespace:                        # outside the cluster, a node, unknown
            return identity
        if not self.namespaces.allows(namespace):
            return replace(identity, namespace=OTHER, workload=OTHER,
                           service=OTHER if identity.service else "", pod="")
        pod = identity.pod if any(fnmatch.fnmatchcase(namespace, p)
                                  for p in self.pod_namespaces) else ""
        workload = identity.workload
        if not self.workloads.allows(workload, namespace):
            workload, pod = OTHER, ""
        service = identity.service
        if service and not self.services.allows(service, namespace):
            service = OTHER
        return replace(identity, workload=workload, service=service, pod=pod)
