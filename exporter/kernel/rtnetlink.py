"""Dumps of the current network namespace's links, addresses, routes and qdiscs over a
NETLINK_ROUTE socket: what the exporter reads of the network on every node.

pyroute2 does this and far more, and importing it cost the long-lived exporter 11.6 MiB of
RSS and 220 modules (its package imports every socket family it has). It is imported only
where its tc support is needed: clsact filters (kernels before tcx links, or
`interfaces.attach: clsact`) and the removal of an earlier run's filters where an interface
has a clsact qdisc. The messages read here answer as pyroute2's do (`msg["index"]`,
`msg.get_attr("IFLA_IFNAME")`, `msg.get_nested(...)`), so their readers work with either, and
tests/kernel/test_rtnetlink.py checks these dumps against pyroute2's."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTM_GETLINK, RTM_GETADDR, RTM_GETROUTE, RTM_GETQDISC = 18, 22, 26, 38
NLA_TYPE_MASK = 0x3FFF          # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
RECEIVE_BYTES = 1 << 16

_NLMSGHDR = struct.Struct("=IHHII")
_RTATTR = struct.Struct("=HH")
_RTNEXTHOP = struct.Struct("=HBBi")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")


def _align(n: int) -> int:
    return (n + 3) & ~3


def _string(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode(errors="surrogateescape")


def _address(data: bytes) -> str:
    return str(ipaddress.ip_address(data))


def _via(data: bytes) -> str:
    """struct rtvia: a family, then the gateway's address."""
    return _address(data[2:])


def _u32(data: bytes) -> int:
    return _U32.unpack_from(data)[0]


def _i32(data: bytes) -> int:
    return _I32.unpack_from(data)[0]


class Message:
    """One message: its fixed header's fields by name, its attributes by pyroute2's names."""

    def __init__(self, fields: dict[str, int], attrs: dict[str, Any]) -> None:
        self.fields = fields
        self.attrs = attrs

    def __getitem__(self, name: str) -> int:
        return self.fields[name]

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)

    def get_nested(self, *names: str) -> Any:
        found: Any = self
        for name in names:
            if not isinstance(found, Message):
                return None
            found = found.get_attr(name)
        return found

    def __repr__(self) -> str:
        return f"Message({self.fields}, {self.attrs})"


Decoders = dict[int, tuple[str, Callable[[bytes], Any]]]


def _attrs(data: bytes, decoders: Decoders) -> dict[str, Any]:
    """The attributes that `decoders` names; the others are skipped."""
    found: dict[str, Any] = {}
    at = 0
    while at + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, at)
        if length < _RTATTR.size:
            break
        known = decoders.get(kind & NLA_TYPE_MASK)
        if known is not None:
            name, decode = known
            found[name] = decode(data[at + _RTATTR.size:at + length])
        at += _align(length)
    return found


def _nested(decoders: Decoders) -> Callable[[bytes], Message]:
    return lambda data: Message({}, _attrs(data, decoders))


_LINK_INFO: Decoders = {1: ("IFLA_INFO_KIND", _string)}
_LINK: Decoders = {3: ("IFLA_IFNAME", _string), 5: ("IFLA_LINK", _u32),
                   10: ("IFLA_MASTER", _u32), 18: ("IFLA_LINKINFO", _nested(_LINK_INFO)),
                   37: ("IFLA_LINK_NETNSID", _i32)}
_ADDR: Decoders = {1: ("IFA_ADDRESS", _address), 2: ("IFA_LOCAL", _address)}
_HOP: Decoders = {5: ("RTA_GATEWAY", _address), 18: ("RTA_VIA", _via)}


def _multipath(data: bytes) -> list[Message]:
    """struct rtnexthop after rtnexthop, each with its own attributes."""
    hops, at = [], 0
    while at + _RTNEXTHOP.size <= len(data):
        length, flags, _hops, ifindex = _RTNEXTHOP.unpack_from(data, at)
        if length < _RTNEXTHOP.size:
            break
        hops.append(Message({"oif": ifindex, "flags": flags},
                            _attrs(data[at + _RTNEXTHOP.size:at + length], _HOP)))
        at += _align(length)
    return hops


_ROUTE: Decoders = {1: ("RTA_DST", _address), 4: ("RTA_OIF", _u32), 5: ("RTA_GATEWAY", _address),
                    9: ("RTA_MULTIPATH", _multipath), 15: ("RTA_TABLE", _u32),
                    18: ("RTA_VIA", _via)}
_QDISC: Decoders = {1: ("TCA_KIND", _string)}

# message type -> (its fixed header, the header's field names, the attributes read)
_KINDS: dict[int, tuple[struct.Struct, tuple[str, ...], Decoders]] = {
    RTM_GETLINK: (struct.Struct("=BxHiII"), ("family", "ifi_type", "index", "flags", "change"),
                  _LINK),
    RTM_GETADDR: (struct.Struct("=BBBBI"), ("family", "prefixlen", "flags", "scope", "index"),
                  _ADDR),
    RTM_GETROUTE: (struct.Struct("=BBBBBBBBI"), ("family", "dst_len", "src_len", "tos", "table",
                                                 "proto", "scope", "type", "flags"), _ROUTE),
    RTM_GETQDISC: (struct.Struct("=BxxxiIII"), ("family", "index", "handle", "parent", "info"),
                   _QDISC),
}


class RtNetlink:
    """A NETLINK_ROUTE socket for dumps, used by one thread at a time."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0
        self._buffer = bytearray(RECEIVE_BYTES)

    def _dump(self, request: int, family: int = socket.AF_UNSPEC) -> Iterator[Message]:
        header, names, decoders = _KINDS[request]
        self._seq += 1
        body = header.pack(*([family] + [0] * (len(names) - 1)))
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), request,
                                       NLM_F_REQUEST | NLM_F_DUMP, self._seq, 0) + body)
        while True:
            size = self._sock.recv_into(self._buffer)
            data = bytes(memoryview(self._buffer)[:size])
            at = 0
            while at + _NLMSGHDR.size <= size:
                length, kind, _, seq, _ = _NLMSGHDR.unpack_from(data, at)
                if length < _NLMSGHDR.size:
                    raise OSError(errno.EPROTO, "netlink: a message shorter than its header")
                payload = data[at + _NLMSGHDR.size:at + length]
                at += _align(length)
                if seq != self._seq:
                    continue            # an answer to an earlier, abandoned request
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = -_i32(payload)
                    if code:
                        raise OSError(code, f"netlink dump: {os.strerror(code)}")
                    continue
                fields = dict(zip(names, header.unpack_from(payload), strict=True))
                yield Message(fields, _attrs(payload[header.size:], decoders))

    def get_links(self) -> list[Message]:
        return list(self._dump(RTM_GETLINK))

    def get_addr(self) -> list[Message]:
        return list(self._dump(RTM_GETADDR))

    def get_routes(self, family: int = socket.AF_UNSPEC) -> list[Message]:
        """Every table's routes of the family; readers pick the table they want."""
        return list(self._dump(RTM_GETROUTE, family))

    def qdisc_kinds(self) -> dict[int, set[str]]:
        """ifindex -> the kinds of its qdiscs ("clsact", "noqueue", ...)."""
        kinds: dict[int, set[str]] = {}
        for msg in self._dump(RTM_GETQDISC):
            kinds.setdefault(msg["index"], set()).add(msg.get_attr("TCA_KIND") or "")
        return kinds

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RtNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
