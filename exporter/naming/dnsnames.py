"""Names of DNS response codes and query types, as the metrics label them."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from cachetools import LRUCache

RCODES = {0: "NoError", 1: "FormErr", 2: "ServFail", 3: "NXDomain", 4: "NotImp", 5: "Refused",
          6: "YXDomain", 7: "YXRRSet", 8: "NXRRSet", 9: "NotAuth", 10: "NotZone",
          11: "DSOTYPENI"}
QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
          33: "SRV", 64: "SVCB", 65: "HTTPS", 255: "ANY"}
TRANSPORTS = {0: "udp", 1: "tcp"}


def rcode_name(code: int) -> str:
    return RCODES.get(int(code), f"unknown:{int(code)}")


def qtype_name(code: int) -> str:
    return QTYPES.get(int(code), "other")


def transport_name(code: int) -> str:
    return TRANSPORTS.get(int(code), "other")


OTHER = "other"


def decode_name(wire: bytes) -> str | None:
    """A question name in wire format (length-prefixed labels, a zero at the end) as
    lower-case dotted text; None when it is cut short or holds a compression pointer."""
    labels, pos = [], 0
    while pos < len(wire):
        length = wire[pos]
        if length == 0:
            return ".".join(labels)
        if length & 0xC0 or pos + 1 + length > len(wire):
            return None
        labels.append(wire[pos + 1:pos + 1 + length].decode("ascii", "replace").lower())
        pos += 1 + length
    return None


class QueryLabel:
    """The opt-in `query` label: the queried name when it matches an allowlisted glob
    (e.g. ``*.svc.cluster.local``), else ``other``. Names longer than the kernel keeps are
    ``other`` too."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = [p.lower().rstrip(".") for p in patterns]
        self._cache: LRUCache[bytes, str] = LRUCache(maxsize=65536)

    def __call__(self, wire: bytes) -> str:
        label = self._cache.get(wire)
        if label is None:
            name = decode_name(wire)
            allowed = name is not None and any(fnmatch.fnmatchcase(name, p)
                                               for p in self.patterns)
            label = self._cache[wire] = name if allowed and name else OTHER
        return label
