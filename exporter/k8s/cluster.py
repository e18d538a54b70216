"""What the exporter knows of the cluster: slim copies of the watched objects, an index from
every pod, node and ClusterIP address to its identity, and the identities of deleted pods kept
for a grace period so that late packets still resolve.

Watchers write here from their threads; scrapes read. A scrape never waits on the API server:
it reads whatever the watches have delivered so far."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cachetools import TTLCache

# kinds as the exporter names them (self metrics, logs)
PODS, SERVICES, NODES, REPLICASETS, JOBS = "pods", "services", "nodes", "replicasets", "jobs"
KINDS = (PODS, SERVICES, NODES, REPLICASETS, JOBS)

EXTERNAL = "external"       # an address no cluster object has
UNKNOWN = "unknown"         # an address not resolvable now: the API server is not synced
TERMINAL_PHASES = ("Succeeded", "Failed")
DELETED_POD_MEMORY = 65536  # deleted pods remembered at once (each a few hundred bytes)
# a node's availability zone: the well-known label, then the one deprecated in Kubernetes 1.17
ZONE_LABELS = ("topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone")


@dataclass(frozen=True)
class Identity:
    """The Kubernetes endpoint labels of one address (METRICS.md, "Endpoint labels")."""
    namespace: str = ""
    workload: str = EXTERNAL
    workload_kind: str = ""
    service: str = ""
    pod: str = ""
    node: str = ""
    zone: str = ""            # the availability zone of its node


UNKNOWN_IDENTITY = Identity(workload=UNKNOWN)
EXTERNAL_IDENTITY = Identity()


@dataclass(frozen=True)
class Owner:
    kind: str
    name: str


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    ips: tuple[str, ...]
    host_network: bool
    node: str
    running: bool                     # not Succeeded or Failed: its addresses are its own
    labels: Mapping[str, str] = field(hash=False)
    owner: Owner | None
    created: str                      # RFC 3339: sorts in time order
    ready: bool = False               # its Ready condition is True


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]
    selector: Mapping[str, str] = field(hash=False)


@dataclass(frozen=True)
class Node:
    name: str
    addresses: tuple[str, ...]
    pod_cidrs: tuple[str, ...] = ()
    zone: str = ""


@dataclass(frozen=True)
class Topology:
    """Which node each address belongs to, for counting once per cluster
    (exporter/kernel/clustermap.py): every node's addresses and pod CIDRs, the address of every
    pod that is not on its node's network, and the nodes where a pod of the exporter's own
    DaemonSet is ready."""
    nodes: Mapping[str, Node]
    pod_addresses: Mapping[str, str]        # pod address -> its node
    exporter_nodes: frozenset[str]


def _meta(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    return raw.get("metadata") or {}


def controller_of(raw: Mapping[str, Any]) -> Owner | None:
    refs = _meta(raw).get("ownerReferences") or []
    chosen = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    return Owner(chosen.get("kind", ""), chosen.get("name", "")) if chosen else None


def pod_from(raw: Mapping[str, Any]) -> Pod:
    meta, spec, status = _meta(raw), raw.get("spec") or {}, raw.get("status") or {}
    ips = tuple(entry["ip"] for entry in status.get("podIPs") or [] if entry.get("ip"))
    if not ips and status.get("podIP"):
        ips = (status["podIP"],)
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or [])
    return Pod(meta.get("namespace", ""), meta.get("name", ""), ips,
               bool(spec.get("hostNetwork")), spec.get("nodeName") or "",
               status.get("phase") not in TERMINAL_PHASES, meta.get("labels") or {},
               controller_of(raw), meta.get("creationTimestamp") or "", ready)


def service_from(raw: Mapping[str, Any]) -> Service:
    meta, spec = _meta(raw), raw.get("spec") or {}
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    return Service(meta.get("namespace", ""), meta.get("name", ""),
                   tuple(ip for ip in ips if ip and ip != "None"), spec.get("selector") or {})


def node_from(raw: Mapping[str, Any]) -> Node:
    addresses = (raw.get("status") or {}).get("addresses") or []
    spec = raw.get("spec") or {}
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    labels = _meta(raw).get("labels") or {}
    zone = next((labels[key] for key in ZONE_LABELS if labels.get(key)), "")
    return Node(_meta(raw).get("name", ""),
                tuple(a["address"] for a in addresses
                      if a.get("type") in ("InternalIP", "ExternalIP") and a.get("address")),
                tuple(cidr for cidr in cidrs if cidr), zone)


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def object_key(raw: Mapping[str, Any]) -> tuple[str, str]:
    meta = _meta(raw)
    return meta.get("namespace", ""), meta.get("name", "")


class ClusterState:
    """Objects by kind, and addresses to identities. Thread-safe."""

    def __init__(self, deleted_pod_grace: float) -> None:
        self._lock = threading.RLock()
        self._pods: dict[tuple[str, str], Pod] = {}
        self._services: dict[tuple[str, str], Service] = {}
        # by namespace too: service selection looks only within the pod's namespace
        self._pods_in: dict[str, dict[str, Pod]] = {}
        self._services_in: dict[str, dict[str, Service]] = {}
        self._nodes: dict[str, Node] = {}
        self._replicaset_owners: dict[tuple[str, str], Owner | None] = {}
        self._job_owners: dict[tuple[str, str], Owner | None] = {}
        self._pod_ips: dict[str, set[tuple[str, str]]] = {}
        self._host_ips: dict[str, str] = {}     # node addresses, from Nodes
        self._host_pod_ips: dict[str, str] = {}  # addresses of host-network pods -> node
        self._service_ips: dict[str, tuple[str, str]] = {}
        self._local_ips: dict[str, str] = {}    # this node's own addresses -> its name
        self._deleted: TTLCache[str, Identity] = TTLCache(DELETED_POD_MEMORY, deleted_pod_grace)
        # live objects' identities, forgotten by namespace (or address) as objects change
        self._resolved: dict[str, Identity] = {}
        self._resolved_in: dict[str, set[str]] = {}
        self.version = 0

    # --- writers (watch threads) ---

    def apply(self, kind: str, event: str, raw: Mapping[str, Any]) -> None:
        """One watch event: ADDED, MODIFIED or DELETED."""
        with self._lock:
            self.version += 1
            namespace = object_key(raw)[0]
            self._forget(namespace)
            if kind in (NODES, PODS):       # host-network pods and nodes: namespace ""
                self._forget("")
            if event == "DELETED":
                self._remove(kind, object_key(raw))
            else:
                self._put(kind, raw)

    def replace(self, kind: str, items: Iterable[Mapping[str, Any]]) -> None:
        """A fresh list: what is not in it any more was deleted."""
        with self._lock:
            self._changed()
            seen = set()
            for raw in items:
                seen.add(self._put(kind, raw))
            for key in [k for k in self._keys(kind) if k not in seen]:
                self._remove(kind, key)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {PODS: len(self._pods), SERVICES: len(self._services),
                    NODES: len(self._nodes), REPLICASETS: len(self._replicaset_owners),
                    JOBS: len(self._job_owners)}

    def _changed(self) -> None:
        self.version += 1
        self._resolved.clear()
        self._resolved_in.clear()

    def _forget(self, namespace: str) -> None:
        for ip in self._resolved_in.pop(namespace, ()):
            self._resolved.pop(ip, None)

    def _forget_addresses(self, addresses: Iterable[str]) -> None:
        """An address may have been cached under another namespace (an IP reused)."""
        for ip in addresses:
            self._resolved.pop(ip, None)

    def _keys(self, kind: str) -> list[tuple[str, str]]:
        if kind == NODES:
            return [("", name) for name in self._nodes]
        store = {PODS: self._pods, SERVICES: self._services,
                 REPLICASETS: self._replicaset_owners, JOBS: self._job_owners}[kind]
        return list(store)

    def _put(self, kind: str, raw: Mapping[str, Any]) -> tuple[str, str]:
        key = object_key(raw)
        if kind == PODS:
            self._remove_pod(key, deleted=False)
            pod = pod_from(raw)
            self._forget_addresses(pod.ips)
            self._pods[key] = self._pods_in.setdefault(pod.namespace, {})[pod.name] = pod
            if pod.running:
                for ip in pod.ips:
                    if pod.host_network:
                        self._host_pod_ips[ip] = pod.node
                    else:
                        self._pod_ips.setdefault(ip, set()).add(key)
                        self._deleted.pop(ip, None)     # the address has a new owner
            elif not pod.host_network:
                self._remember_deleted(pod)             # finished: gone but for late packets
        elif kind == SERVICES:
            self._remove_service(key)
            service = service_from(raw)
            self._forget_addresses(service.cluster_ips)
            self._services[key] = service
            self._services_in.setdefault(service.namespace, {})[service.name] = service
            for ip in service.cluster_ips:
                self._service_ips[ip] = key
        elif kind == NODES:
            old = self._nodes.get(key[1])
            self._remove_node(key[1])
            node = node_from(raw)
            self._forget_addresses(node.addresses)
            if node.zone != (old.zone if old else ""):
                self._changed()             # every identity on the node has a new zone
            self._nodes[node.name] = node
            for ip in node.addresses:
                self._host_ips[ip] = node.name
        elif kind == REPLICASETS:
            self._replicaset_owners[key] = controller_of(raw)
        elif kind == JOBS:
            self._job_owners[key] = controller_of(raw)
        return key

    def _remove(self, kind: str, key: tuple[str, str]) -> None:
        if kind == PODS:
            self._remove_pod(key, deleted=True)
        elif kind == SERVICES:
            self._remove_service(key)
        elif kind == NODES:
            if self._nodes.get(key[1], Node("", ())).zone:
                self._changed()             # its pods' identities lose their zone
            self._remove_node(key[1])
        elif kind == REPLICASETS:
            self._replicaset_owners.pop(key, None)
        elif kind == JOBS:
            self._job_owners.pop(key, None)

    def _remove_pod(self, key: tuple[str, str], deleted: bool) -> None:
        pod = self._pods.pop(key, None)
        if pod is None:
            return
        self._pods_in.get(pod.namespace, {}).pop(pod.name, None)
        self._forget_addresses(pod.ips)
        if deleted and pod.running and not pod.host_network:
            self._remember_deleted(pod)
        for ip in pod.ips:
            owners = self._pod_ips.get(ip)
            if owners is not None:
                owners.discard(key)
                if not owners:
                    del self._pod_ips[ip]
            if pod.host_network and self._host_pod_ips.get(ip) == pod.node:
                del self._host_pod_ips[ip]

    def _remember_deleted(self, pod: Pod) -> None:
        identity = self._pod_identity(pod)
        for ip in pod.ips:
            if ip not in self._pod_ips or self._pod_ips[ip] == {(pod.namespace, pod.name)}:
                self._deleted[ip] = identity

    def _remove_service(self, key: tuple[str, str]) -> None:
        service = self._services.pop(key, None)
        if service:
            self._services_in.get(service.namespace, {}).pop(service.name, None)
        for ip in service.cluster_ips if service else ():
            if self._service_ips.get(ip) == key:
                del self._service_ips[ip]

    def _remove_node(self, name: str) -> None:
        node = self._nodes.pop(name, None)
        for ip in node.addresses if node else ():
            if self._host_ips.get(ip) == name:
                del self._host_ips[ip]

    def set_local_node(self, name: str, addresses: Iterable[str]) -> None:
        """This node's own addresses, known without the API server (or RBAC on nodes)."""
        with self._lock:
            self._changed()
            self._local_ips = dict.fromkeys(addresses, name)

    # --- readers (scrapes) ---

    def has_zones(self) -> bool:
        """Whether any node carries a zone label."""
        with self._lock:
            return any(node.zone for node in self._nodes.values())

    def _zone_of(self, node: str) -> str:
        known = self._nodes.get(node)
        return known.zone if known else ""

    def topology(self, exporter_pod: tuple[str, str]) -> Topology:
        """Nodes, pod addresses and the nodes that run the exporter: those with a ready pod of
        the same controller (the DaemonSet) as `exporter_pod` (namespace, name)."""
        with self._lock:
            own = self._pods.get(exporter_pod)
            owner = own.owner if own else None
            exporters = frozenset(
                pod.node for pod in self._pods_in.get(exporter_pod[0], {}).values()
                if owner is not None and pod.owner == owner and pod.running and pod.ready
                and pod.node)
            pod_addresses = {}
            pods = self._pods
            for ip, keys in self._pod_ips.items():
                if len(keys) == 1:          # nearly always: one live pod per address
                    (key,) = keys
                    node = pods[key].node
                else:
                    node = max((pods[key] for key in keys), key=lambda p: p.created).node
                if node:
                    pod_addresses[ip] = node
            return Topology(dict(self._nodes), pod_addresses, exporters)

    def resolve(self, ip: str) -> Identity | None:
        """The identity of an address, or None when no cluster object has it."""
        with self._lock:
            if ip in self._resolved:
                return self._resolved[ip]
            identity = self._lookup(ip)
            if identity is not None:
                self._resolved[ip] = identity
                self._resolved_in.setdefault(identity.namespace, set()).add(ip)
                return identity
            # deleted pods expire by time, not by an event: never cached
            return self._deleted.get(ip)

    def _lookup(self, ip: str) -> Identity | None:
        pods = self._pod_ips.get(ip)
        if pods:
            # two live pods on one address: the old one is terminating; the new one owns it
            newest = max((self._pods[key] for key in pods), key=lambda p: p.created)
            return self._pod_identity(newest)
        node = self._host_ips.get(ip) or self._host_pod_ips.get(ip) or self._local_ips.get(ip)
        if node:
            return Identity(workload=node, workload_kind="Node", node=node,
                            zone=self._zone_of(node))
        service = self._service_ips.get(ip)
        if service:
            return self._service_identity(self._services[service])
        return None

    def _pod_identity(self, pod: Pod) -> Identity:
        kind, name = self._workload(pod)
        return Identity(pod.namespace, name, kind, self._service_of(pod), pod.name,
                        zone=self._zone_of(pod.node))

    def _workload(self, pod: Pod) -> tuple[str, str]:
        owner = pod.owner
        if owner is None:
            return "Pod", pod.name
        if owner.kind == "ReplicaSet":
            key = (pod.namespace, owner.name)
            if key in self._replicaset_owners:
                parent = self._replicaset_owners[key]
                return (parent.kind, parent.name) if parent else ("ReplicaSet", owner.name)
            # not listed (yet): a Deployment's ReplicaSet is named <deployment>-<template hash>
            suffix = "-" + pod.labels.get("pod-template-hash", "\0")
            if owner.name.endswith(suffix):
                return "Deployment", owner.name[:-len(suffix)]
            return "ReplicaSet", owner.name
        if owner.kind == "Job":
            parent = self._job_owners.get((pod.namespace, owner.name))
            if parent is not None and parent.kind == "CronJob":
                return "CronJob", parent.name
            return "Job", owner.name
        return owner.kind, owner.name

    def _service_of(self, pod: Pod) -> str:
        """The first Service by name in the pod's namespace whose selector matches it."""
        names = sorted(s.name for s in self._services_in.get(pod.namespace, {}).values()
                       if s.selector and selects(s.selector, pod.labels))
        return names[0] if names else ""

    def _service_identity(self, service: Service) -> Identity:
        """A ClusterIP: its service, and the workload behind it when there is only one; its
        zone when every backend is in one (which backend a connection reached is known only
        from the backend's own address, which the replies carry)."""
        backends = [pod for pod in self._pods_in.get(service.namespace, {}).values()
                    if pod.running and service.selector and selects(service.selector,
                                                                    pod.labels)]
        workloads = {self._workload(pod) for pod in backends}
        zones = {self._zone_of(pod.node) for pod in backends}
        kind, name = workloads.pop() if len(workloads) == 1 else ("Service", service.name)
        return Identity(service.namespace, name, kind, service.name,
                        zone=zones.pop() if len(zones) == 1 else "")
