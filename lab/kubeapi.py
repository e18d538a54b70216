"""A Kubernetes API server for tests: list and watch of pods, services, nodes, replicasets and
jobs over real HTTP, the way the real one serves them (resource versions, paged lists with
continue tokens, chunked watch streams of ADDED/MODIFIED/DELETED, BOOKMARK events, ERROR 410
for a version older than the compacted history), and faults on demand: dropped watch
connections, an outage (the port closed), a 403 for one resource.

The exporter talks to it with the real `kubernetes` client through the kubeconfig this writes.
Built with a network namespace name, it listens on that namespace's loopback, where an exporter
running in a test node reaches it."""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import tempfile
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from lab.testnode import in_netns

PATHS = {
    "/api/v1/pods": ("pods", "PodList"),
    "/api/v1/services": ("services", "ServiceList"),
    "/api/v1/nodes": ("nodes", "NodeList"),
    "/apis/apps/v1/replicasets": ("replicasets", "ReplicaSetList"),
    "/apis/batch/v1/jobs": ("jobs", "JobList"),
}
KINDS = tuple(kind for kind, _ in PATHS.values())
API_VERSIONS = {"pods": "v1", "services": "v1", "nodes": "v1", "replicasets": "apps/v1",
                "jobs": "batch/v1"}
OBJECT_KINDS = {"pods": "Pod", "services": "Service", "nodes": "Node",
                "replicasets": "ReplicaSet", "jobs": "Job"}


def _owner(kind: str, name: str) -> list[dict[str, Any]]:
    return [{"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": f"uid-{name}",
             "controller": True}]


def pod(namespace: str, name: str, ips: list[str], owner: tuple[str, str] | None = None,
        labels: Mapping[str, str] | None = None, node: str = "node-1",
        host_network: bool = False, phase: str = "Running",
        created: str = "2026-11-21T10:00:00Z", ready: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": namespace, "name": name, "labels": dict(labels or {}),
                            "creationTimestamp": created}
    if owner:
        meta["ownerReferences"] = _owner(*owner)
    status: dict[str, Any] = {"phase": phase, "conditions": [
        {"type": "Ready", "status": "True" if ready and phase == "Running" else "False"}]}
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": ip} for ip in ips]
    return {"metadata": meta, "spec": {"nodeName": node, "hostNetwork": host_network},
            "status": status}


def replicaset(namespace: str, name: str, deployment: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": namespace, "name": name}
    if deployment:
        meta["ownerReferences"] = _owner("Deployment", deployment)
    return {"metadata": meta}


def job(namespace: str, name: str, cronjob: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": namespace, "name": name}
    if cronjob:
        meta["ownerReferences"] = _owner("CronJob", cronjob)
    return {"metadata": meta}


def service(namespace: str, name: str, selector: Mapping[str, str],
            cluster_ip: str = "None") -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name},
            "spec": {"selector": dict(selector), "clusterIP": cluster_ip,
                     "clusterIPs": [cluster_ip]}}


def node(name: str, ips: list[str], pod_cidrs: list[str] | None = None,
         zone: str = "") -> dict[str, Any]:
    spec = {"podCIDR": pod_cidrs[0], "podCIDRs": list(pod_cidrs)} if pod_cidrs else {}
    labels = {"topology.kubernetes.io/zone": zone} if zone else {}
    return {"metadata": {"name": name, "labels": labels}, "spec": spec,
            "status": {"addresses": [{"type": "InternalIP", "address": ip} for ip in ips]
                       + [{"type": "Hostname", "address": name}]}}


def _selects(selector: str, obj: dict[str, Any]) -> bool:
    """A label selector of `key` (exists) and `key=value` requirements, comma-separated."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for requirement in selector.split(","):
        key, _, value = requirement.partition("=")
        if key not in labels or (value and labels[key] != value):
            return False
    return True


class KubeAPI:
    """Objects, their history, and an HTTP server over them. Use as a context manager."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.version = 100
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in KINDS}
        self.history: dict[str, list[tuple[int, str, dict[str, Any]]]] = {k: [] for k in KINDS}
        self.compacted = 0                  # versions at or below this are gone (410)
        self.forbidden: set[str] = set()
        self.requests: list[tuple[str, dict[str, list[str]]]] = []  # (kind, query) served
        # TokenReview: token -> the user it authenticates; SubjectAccessReview: the users
        # that may get a non-resource path (path -> users); each review asked, as received
        self.tokens: dict[str, dict[str, Any]] = {}
        self.path_readers: dict[str, set[str]] = {}
        self.reviews: list[tuple[str, dict[str, Any]]] = []
        self._changed = threading.Condition()
        self._drop_generation = 0           # bumped to cut every open watch
        self._bookmarks = 0                 # bumped to send every open watch a BOOKMARK
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self._dir = tempfile.TemporaryDirectory(prefix="kubeapi-")
        self.kubeconfig = Path(self._dir.name) / "kubeconfig"

    # --- lifecycle ---

    def __enter__(self) -> KubeAPI:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._dir.cleanup()

    def start(self) -> None:
        """Listens (again: on the same port after stop()) and serves."""
        with in_netns(self.netns) if self.netns else contextlib.nullcontext():
            server = _Server(("127.0.0.1", self.port), _Handler, bind_and_activate=False)
            server.allow_reuse_address = True
            server.server_bind()
            server.server_activate()
        server.api = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05})
        self._thread.start()
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }))

    def stop(self) -> None:
        """An outage: the port closes and every open watch is cut."""
        if self._server is None:
            return
        self.drop_watches()
        self._server.shutdown()
        self._server.server_close()
        self._server.cut_connections()
        self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- objects ---

    def create(self, kind: str, obj: dict[str, Any]) -> None:
        self._record(kind, "ADDED", obj)

    def update(self, kind: str, obj: dict[str, Any]) -> None:
        self._record(kind, "MODIFIED", obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        obj = self.objects[kind][(namespace, name)]
        self._record(kind, "DELETED", obj)

    def _record(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        with self._changed:
            self.version += 1
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            meta["resourceVersion"] = str(self.version)
            key = (meta.get("namespace", ""), meta["name"])
            if event == "DELETED":
                del self.objects[kind][key]
            else:
                self.objects[kind][key] = obj
            self.history[kind].append((self.version, event, obj))
            self._changed.notify_all()

    # --- faults ---

    def drop_watches(self) -> None:
        """Cuts every open watch mid-stream (no final chunk), as a broken connection does."""
        with self._changed:
            self._drop_generation += 1
            self._changed.notify_all()

    def compact(self) -> None:
        """Forgets the history: a watch from any earlier version gets ERROR 410 Gone."""
        with self._changed:
            self.compacted = self.version
            for events in self.history.values():
                events.clear()

    def bookmark(self) -> None:
        with self._changed:
            self._bookmarks += 1
            self._changed.notify_all()

    def watches_opened(self, kind: str) -> int:
        return sum(1 for k, query in list(self.requests)
                   if k == kind and query.get("watch", [""])[0] in ("true", "1"))

    def lists_served(self, kind: str) -> int:
        return sum(1 for k, query in list(self.requests)
                   if k == kind and query.get("watch", [""])[0] not in ("true", "1"))

    def wait_for(self, condition: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("test API server: condition not met in time")
            time.sleep(0.02)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: KubeAPI

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: set[socket.socket] = set()   # open, kept alive or not
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        """Every open connection closed under its client, as a server that goes away does
        (a kept-alive connection would otherwise go on being served)."""
        with self._connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        """TokenReview and SubjectAccessReview, answered from api.tokens and
        api.path_readers."""
        api = self.server.api
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        spec = body.get("spec") or {}
        path = urlparse(self.path).path
        if path == "/apis/authentication.k8s.io/v1/tokenreviews":
            api.reviews.append(("tokenreview", spec))
            user = api.tokens.get(spec.get("token", ""))
            status: dict[str, Any] = {"authenticated": True, "user": user} if user else \
                {"authenticated": False, "error": "invalid bearer token"}
        elif path == "/apis/authorization.k8s.io/v1/subjectaccessreviews":
            api.reviews.append(("subjectaccessreview", spec))
            attributes = spec.get("nonResourceAttributes") or {}
            allowed = attributes.get("verb") == "get" and spec.get("user") in \
                api.path_readers.get(attributes.get("path", ""), set())
            status = {"allowed": allowed}
        else:
            self._status(404, "NotFound", f"the server could not find {path}")
            return
        kind = "TokenReview" if "tokenreviews" in path else "SubjectAccessReview"
        group = "authentication" if kind == "TokenReview" else "authorization"
        self._json(201, {"kind": kind, "apiVersion": f"{group}.k8s.io/v1", "spec": spec,
                         "status": status})

    def do_GET(self) -> None:
        url = urlparse(self.path)
        api = self.server.api
        if url.path not in PATHS:
            self._status(404, "NotFound", f"the server could not find {url.path}")
            return
        kind, list_kind = PATHS[url.path]
        query = parse_qs(url.query)
        api.requests.append((kind, query))
        watching = query.get("watch", [""])[0] in ("true", "1")
        if kind in api.forbidden:
            verb = "watch" if watching else "list"
            self._status(403, "Forbidden", f'{kind} is forbidden: User "test" cannot {verb} '
                         f'resource "{kind}" at the cluster scope')
            return
        if watching:
            self._watch(api, kind, query)
        else:
            self._list(api, kind, list_kind, query)

    def _list(self, api: KubeAPI, kind: str, list_kind: str, query: dict[str, list[str]]) -> None:
        with api._changed:
            items = [api.objects[kind][key] for key in sorted(api.objects[kind])]
            version = api.version
        selector = query.get("labelSelector", [""])[0]
        if selector:
            items = [item for item in items if _selects(selector, item)]
        start = int(query.get("continue", ["0"])[0] or 0)
        limit = int(query.get("limit", ["0"])[0] or 0) or len(items)
        page = items[start:start + limit]
        metadata: dict[str, Any] = {"resourceVersion": str(version)}
        if start + limit < len(items):
            metadata["continue"] = str(start + limit)
        self._json(200, {"kind": list_kind, "apiVersion": API_VERSIONS[kind],
                         "metadata": metadata, "items": page})

    def _watch(self, api: KubeAPI, kind: str, query: dict[str, list[str]]) -> None:
        since = int(query.get("resourceVersion", ["0"])[0] or 0)
        timeout = float(query.get("timeoutSeconds", ["300"])[0])
        bookmarks = query.get("allowWatchBookmarks", [""])[0] in ("true", "1")
        deadline = time.monotonic() + timeout
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with api._changed:
            drop, marks = api._drop_generation, api._bookmarks
        if since and since < api.compacted:
            self._chunk({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                "reason": "Expired", "message": f"too old resource version: {since} "
                f"({api.compacted})"}})
            self._end()
            return
        while True:
            with api._changed:
                events = [(v, t, o) for v, t, o in api.history[kind] if v > since]
                if not events and api._drop_generation == drop and api._bookmarks == marks:
                    api._changed.wait(min(0.2, max(deadline - time.monotonic(), 0)))
                    events = [(v, t, o) for v, t, o in api.history[kind] if v > since]
                dropped = api._drop_generation != drop
                bookmark = bookmarks and api._bookmarks != marks
                marks = api._bookmarks
                version = api.version
            if dropped:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            for event_version, event, obj in events:
                self._chunk({"type": event, "object": obj})
                since = event_version
            if bookmark:
                self._chunk({"type": "BOOKMARK", "object": {
                    "kind": OBJECT_KINDS[kind], "apiVersion": API_VERSIONS[kind],
                    "metadata": {"resourceVersion": str(version)}}})
                since = max(since, version)
            if time.monotonic() >= deadline:
                self._end()
                return

    def _chunk(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _status(self, code: int, reason: str, message: str) -> None:
        self._json(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "reason": reason, "message": message, "code": code})

    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

