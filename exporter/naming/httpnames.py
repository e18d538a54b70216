"""HTTP method and status labels, and the opt-in path label's templating."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from cachetools import LRUCache

METHODS = {1: "GET", 2: "HEAD", 3: "POST", 4: "PUT", 5: "DELETE", 6: "PATCH", 7: "OPTIONS",
           8: "CONNECT", 9: "TRACE"}
# status values below 100 say what happened to a request without a response (bpf/http.h)
OUTCOMES = {0: "none", 1: "pipelined", 2: "untracked", 3: "unknown"}
# the kernel's method byte carries the protocol version in its high bits (HTTP_VERSION_SHIFT)
VERSION_SHIFT = 4
METHOD_MASK = 15
VERSIONS = {0: "1.x", 1: "1.0", 2: "1.1", 3: "2"}


def method_name(code: int) -> str:
    """The method of a kernel method byte (its low bits)."""
    return METHODS.get(int(code) & METHOD_MASK, "other")


def version_label(code: int) -> str:
    """The protocol version of a kernel method byte: 1.0, 1.1, 2, or 1.x when an HTTP/1
    request's version was not read (its request line ran past the bytes examined and it got no
    response)."""
    return VERSIONS[(int(code) >> VERSION_SHIFT) & 3]


def status_label(code: int) -> str:
    code = int(code)
    return OUTCOMES.get(code, str(code) if 100 <= code <= 599 else "other")


OTHER = "other"
ID = "{id}"
_NUMBER = re.compile(r"^\d+$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_LONG_HEX = re.compile(r"^[0-9a-fA-F]{16,}$")
_TARGET_END = re.compile(rb"[ ?#\r\n\x00]")


def template(path: str) -> str:
    """Ids in a path become {id}: numbers, UUIDs, hex strings of 16 or more characters."""
    return "/".join(ID if _NUMBER.match(p) or _UUID.match(p) or _LONG_HEX.match(p) else p
                    for p in path.split("/"))


class CachedLabel:
    """A label worked out from captured bytes by _label(), each value once."""

    def __init__(self) -> None:
        self._cache: LRUCache[bytes, str] = LRUCache(maxsize=65536)

    def __call__(self, captured: bytes) -> str:
        label = self._cache.get(captured)
        if label is None:
            label = self._cache[captured] = self._label(captured)
        return label

    def _label(self, captured: bytes) -> str:
        raise NotImplementedError


class PathLabel(CachedLabel):
    """The opt-in `path` label: the request target up to its query string, ids templated, cut
    at max_length, kept when it starts with an allowlisted prefix; `other` for the rest."""

    def __init__(self, prefixes: Sequence[str], max_length: int) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)
        self.max_length = max_length

    def _label(self, captured: bytes) -> str:
        end = _TARGET_END.search(captured)
        raw = captured[:end.start()] if end else captured
        try:
            path = raw.decode("ascii")
        except UnicodeDecodeError:
            return OTHER
        if path.startswith(("http://", "https://")):     # absolute form: keep the path part
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        if not path.startswith("/"):
            return OTHER
        path = template(path)[:self.max_length]
        return path if path.startswith(self.prefixes) else OTHER


class GrpcMethodLabel(CachedLabel):
    """The opt-in `grpc_method` label: a call's :path (/package.Service/Method) when its
    service matches one of the globs, `other` for the rest and for paths of another shape."""

    def __init__(self, services: Sequence[str]) -> None:
        super().__init__()
        self._services = re.compile("|".join(fnmatch.translate(s) for s in services))

    def _label(self, path: bytes) -> str:
        try:
            text = path.decode("ascii")
        except UnicodeDecodeError:
            return OTHER
        parts = text.split("/")
        if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
            return OTHER
        return text if self._services.fullmatch(parts[1]) else OTHER
