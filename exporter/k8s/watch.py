"""List-then-watch of one kind of object, the way client-go's reflector does it: list with a
resource version, watch from it (with bookmarks), re-watch from the last version seen when a
watch ends, relist on 410 Gone, and back off on errors. One thread per kind."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from typing import Any

from kubernetes import watch
from kubernetes.client.rest import ApiException

from .. import logs
from .cluster import ClusterState
from .health import Health

log = logs.get("k8s")

LIST_PAGE = 500             # objects per list request (the API server's continue tokens)
WATCH_SECONDS = 300         # the server ends a watch after this; it is then resumed
READ_TIMEOUT = WATCH_SECONDS + 30   # no byte for this long (bookmarks come every minute): dead
CONNECT_TIMEOUT = 5.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0

ListCall = Callable[..., Any]


class Backoff:
    """Exponential with jitter, reset after a success."""

    def __init__(self, first: float = BACKOFF_FIRST, most: float = BACKOFF_MAX) -> None:
        self.first, self.most = first, most
        self.current = first

    def next(self) -> float:
        delay = self.current * random.uniform(0.8, 1.2)
        self.current = min(self.current * 2, self.most)
        return delay

    def reset(self) -> None:
        self.current = self.first


class Reflector:
    """Keeps one kind in `state` up to date with the API server until stopped."""

    def __init__(self, kind: str, call: ListCall, state: ClusterState, health: Health,
                 backoff: Backoff | None = None) -> None:
        self.kind = kind
        self.call = call
        self.state = state
        self.health = health
        self.backoff = backoff or Backoff()
        self.version: str | None = None     # the last resource version seen; None: list
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name=f"k8s-{kind}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            verb = "list" if self.version is None else "watch"
            try:
                if self.version is None:
                    self.version = self._list()
                    self.health.synced(self.kind)
                self._watch_from(self.version)
                self.backoff.reset()
                continue
            except ApiException as e:
                if self._stop.is_set():     # stop() cut the call: not a failure
                    return
                if e.status == 410:     # too old a version (the client raises ERROR events)
                    log.debug("resource version expired, listing again",
                              extra={"kind": self.kind})
                    self.version = None
                    continue
                self.health.failed(self.kind, verb, _api_error(e), status=e.status)
            except Exception as e:   # connection refused, reset, timeout, bad JSON: retry
                if self._stop.is_set():
                    return
                self.health.failed(self.kind, verb, f"{type(e).__name__}: {e}")
            self._stop.wait(self.backoff.next())

    def _list(self) -> str:
        """Lists every page; returns the list's resource version."""
        items: list[Any] = []
        token = None
        while True:
            kwargs: dict[str, Any] = {"limit": LIST_PAGE, "_preload_content": False,
                                      "_request_timeout": (CONNECT_TIMEOUT, READ_TIMEOUT)}
            if token:
                kwargs["_continue"] = token
            response = self.call(**kwargs)
            body = json.loads(response.data)
            items += body.get("items") or []
            metadata = body.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                break
        self.state.replace(self.kind, items)
        self.health.ok(self.kind)
        log.debug("listed", extra={"kind": self.kind, "objects": len(items),
                                   "resource_version": metadata.get("resourceVersion")})
        return str(metadata.get("resourceVersion") or "")

    def _watch_from(self, version: str) -> None:
        """Applies events until the server ends the watch, keeping the last version seen."""
        self._watch = watch.Watch()

        def call(**kwargs: Any) -> Any:     # no docstring: the client hands out plain dicts
            return self.call(**kwargs)

        for event in self._watch.stream(call, resource_version=version,
                                        allow_watch_bookmarks=True,
                                        timeout_seconds=WATCH_SECONDS,
                                        _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)):
            kind, raw = event.get("type"), event.get("raw_object") or {}
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self.state.apply(self.kind, kind, raw)
            self.version = str((raw.get("metadata") or {}).get("resourceVersion") or self.version)
            self.health.ok(self.kind)
            if self._stop.is_set():
                break


def _api_error(e: ApiException) -> str:
    message = e.reason or ""
    try:
        message = json.loads(e.body).get("message") or message
    except (TypeError, ValueError, AttributeError):
        pass
    return f"{e.status} {message}".strip()

