"""Hostile frames for the fuzz test, and the test's own account of what the classifier must make
of each: a flow (its key and bytes), an IP parse error, nothing (not IP), or never seen at all.

Frames start as a pool of scapy-built packets (scapy takes ~1 ms a packet, too slow for 100,000)
and are multiplied by cheap byte-level variations: VLAN and QinQ tags, truncation anywhere,
lying length fields, bad versions, odd TCP flags. The account (`expect`) reads the final bytes
the way docs/metrics.md says the classifier does; it never looks at how a frame was made.

Every frame goes to a MAC address that is not the node's, so the node's IP stack drops it
(PACKET_OTHERHOST) after the TC hook: nothing answers, nothing is forwarded, and no socket sees
it, so the only metrics these frames can move are the classifier's."""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import Counter
from dataclasses import dataclass, field

from scapy.all import (
    AH,
    ARP,
    DNS,
    DNSQR,
    ICMP,
    IP,
    TCP,
    UDP,
    Ether,
    ICMPv6EchoRequest,
    IPOption_NOP,
    IPOption_RR,
    IPOption_Timestamp,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    Raw,
    raw,
)

SRC_MAC, DST_MAC = "02:00:00:00:00:aa", "02:00:00:00:00:bb"   # not the node's: OTHERHOST
SRC4 = [f"198.18.0.{i}" for i in range(1, 5)]
DST4 = [f"198.19.0.{i}" for i in range(1, 5)]
SRC6 = [f"fd00:f022:a::{i}" for i in range(1, 5)]
DST6 = [f"fd00:f022:b::{i}" for i in range(1, 5)]
FUZZ_NETS = [ipaddress.ip_network(n) for n in
             ("198.18.0.0/24", "198.19.0.0/24", "fd00:f022:a::/64", "fd00:f022:b::/64")]
SERVER_PORTS = [80, 443, 1000, 1001, 8080]      # never 53 for TCP: DNS over TCP follows streams
VLAN_TYPES = (0x8100, 0x88A8)
IPV6_EXT = (0, 43, 60, 44, 51)                  # hop-by-hop, routing, dstopts, fragment, AH
DNS_PORT = 53
MTU = 9000


@dataclass(frozen=True)
class Flow:
    family: str
    protocol: int
    sport: int
    dport: int
    src: str
    dst: str


@dataclass
class Outcome:
    kind: str                       # "flow", "ip_error", "not_ip", "unseen"
    flow: Flow | None = None
    bytes: int = 0
    dns: str | None = None          # "query", "response", "error", "ignored"
    dns_key: tuple | None = None
    tcp_flags: int = 0


def _u16(data: bytes, off: int) -> int:
    return struct.unpack_from("!H", data, off)[0]


def _l4(data: bytes, protocol: int, l4: int, has_ports: bool) -> tuple[str, int, int, int]:
    """(result, sport, dport, payload offset)."""
    if not has_ports or protocol not in (6, 17):
        return "ok", 0, 0, l4
    need = 20 if protocol == 6 else 8
    if l4 + need > len(data):
        return "error", 0, 0, 0
    sport, dport = _u16(data, l4), _u16(data, l4 + 2)
    if protocol == 6:
        doff = (data[l4 + 12] >> 4) * 4
        if doff < 20:
            return "error", 0, 0, 0
        return "ok", sport, dport, l4 + doff
    return "ok", sport, dport, l4 + 8


def _dns(data: bytes, off: int, end: int) -> tuple[str, int, int]:
    """(result, id, qr) of the DNS message in [off, end), as the kernel parses its question."""
    if off + 12 > end or off + 12 > len(data):
        return "error", 0, 0
    flags = _u16(data, off + 2)
    if (flags >> 11) & 0xF:
        return "ignored", 0, 0
    if _u16(data, off + 4) != 1:
        return "error", 0, 0
    pos = start = off + 12
    for _ in range(128):
        if pos >= end or pos >= len(data):
            return "error", 0, 0
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length & 0xC0:
            return "error", 0, 0
        pos += 1 + length
        if pos - start > 255:
            return "error", 0, 0
    else:
        return "error", 0, 0
    if pos + 4 > end or pos + 2 > len(data):
        return "error", 0, 0
    return "ok", _u16(data, off), flags >> 15


def expect(frame: bytes) -> Outcome:
    """What the classifier makes of `frame` arriving on a monitored veth."""
    data = frame
    if _u16(data, 12) in VLAN_TYPES:
        # the kernel moves the outer tag out of the packet before TC sees it (skb_vlan_untag),
        # and drops the frame when the tag is cut short
        if len(data) < 20:
            return Outcome("unseen")
        data = data[:12] + data[16:]
    proto, off = _u16(data, 12), 14
    for _ in range(2):
        if proto not in VLAN_TYPES:
            break
        if off + 4 > len(data):
            return Outcome("ip_error")
        proto, off = _u16(data, off + 2), off + 4
    l3 = off
    if proto == 0x0800:
        if l3 + 20 > len(data):
            return Outcome("ip_error")
        version, ihl, total = data[l3] >> 4, (data[l3] & 0xF) * 4, _u16(data, l3 + 2)
        if version != 4 or ihl < 20 or total < ihl:
            return Outcome("ip_error")
        family, protocol, ip_len = "ipv4", data[l3 + 9], total
        src = str(ipaddress.IPv4Address(data[l3 + 12:l3 + 16]))
        dst = str(ipaddress.IPv4Address(data[l3 + 16:l3 + 20]))
        has_ports = (_u16(data, l3 + 6) & 0x1FFF) == 0
        l4 = l3 + ihl
    elif proto == 0x86DD:
        if l3 + 40 > len(data) or data[l3] >> 4 != 6:
            return Outcome("ip_error")
        family, ip_len, has_ports = "ipv6", _u16(data, l3 + 4) + 40, True
        src = str(ipaddress.IPv6Address(data[l3 + 8:l3 + 24]))
        dst = str(ipaddress.IPv6Address(data[l3 + 24:l3 + 40]))
        protocol, l4 = data[l3 + 6], l3 + 40
        for _ in range(6):
            if protocol not in IPV6_EXT:
                break
            if l4 + 4 > len(data):
                return Outcome("ip_error")
            if protocol == 44:
                if _u16(data, l4 + 2) & 0xFFF8:
                    has_ports = False
                step = 8
            elif protocol == 51:
                step = (data[l4 + 1] + 2) * 4
            else:
                step = (data[l4 + 1] + 1) * 8
            protocol, l4 = data[l4], l4 + step
    else:
        return Outcome("not_ip")
    result, sport, dport, payload = _l4(data, protocol, l4, has_ports)
    if result == "error":
        return Outcome("ip_error")
    ports = has_ports and protocol in (6, 17)
    flow = Flow(family, protocol, sport if ports else 0, dport if ports else 0, src, dst)
    outcome = Outcome("flow", flow, min(ip_len, len(data) - l3))
    if ports and protocol == 6:
        outcome.tcp_flags = data[l4 + 13]
    if ports and protocol == 17 and DNS_PORT in (sport, dport):
        end = min(l3 + ip_len, len(data))
        dns, dns_id, qr = _dns(data, payload, end)
        if dns == "ok":
            client = (dst, dport) if qr else (src, sport)
            server = (src, sport) if qr else (dst, dport)
            outcome.dns_key = (family, *client, *server, dns_id)
            dns = "response" if qr else "query"
        outcome.dns = dns
    return outcome


# ---- the pool of base packets (scapy) ----

def _ends(rng: random.Random, family: str) -> tuple[str, str]:
    if family == "ipv4":
        return rng.choice(SRC4), rng.choice(DST4)
    return rng.choice(SRC6), rng.choice(DST6)


def _ip(rng: random.Random, family: str, **fields: object) -> object:
    src, dst = _ends(rng, family)
    if family == "ipv4":
        options = rng.choice([[], [IPOption_NOP()] * rng.randint(1, 3), [IPOption_RR()],
                              [IPOption_Timestamp(flg=0)], [IPOption_NOP(), IPOption_RR()]])
        return IP(src=src, dst=dst, options=options, **fields)
    return IPv6(src=src, dst=dst)


def _ext_chain(rng: random.Random) -> object | None:
    chain = None
    for _ in range(rng.choice([0, 1, 1, 2, 3, 5, 6, 7, 8])):
        header = rng.choice([IPv6ExtHdrHopByHop(), IPv6ExtHdrRouting(), IPv6ExtHdrDestOpt(),
                             IPv6ExtHdrFragment(offset=0, m=1), AH()])
        chain = header if chain is None else chain / header
    return chain


def _payload(rng: random.Random) -> bytes:
    size = rng.choice([0, 0, 1, 7, 100, 512, 1400, rng.randint(0, 1400),
                       rng.randint(1500, MTU - 200)])
    return rng.randbytes(size)


def _client_port(rng: random.Random) -> int:
    return rng.randint(61000, 64999)        # apart from the HTTP connections' 40000-59999


def base_transport(rng: random.Random) -> bytes:
    family = rng.choice(["ipv4", "ipv6"])
    kind = rng.choice(["tcp", "tcp", "udp", "udp", "icmp", "other"])
    if kind == "tcp":
        options = rng.choice([[], [("MSS", 1460)], [("NOP", None)] * 3 + [("WScale", 7)],
                              [("SAckOK", b""), ("Timestamp", (1, 2))]])
        l4 = TCP(sport=_client_port(rng), dport=rng.choice(SERVER_PORTS),
                 flags=rng.randint(0, 255), seq=rng.getrandbits(32), options=options)
    elif kind == "udp":
        l4 = UDP(sport=_client_port(rng), dport=rng.choice(SERVER_PORTS))
    elif kind == "icmp":
        l4 = ICMP() if family == "ipv4" else ICMPv6EchoRequest()
    else:
        l4 = Raw(b"")
    ip = _ip(rng, family)
    if kind == "other":
        if family == "ipv4":
            ip.proto = rng.choice([47, 132, 253, 255])
        else:
            ip.nh = rng.choice([47, 132, 59, 253])
    if family == "ipv6":
        chain = _ext_chain(rng)
        if chain is not None:
            ip = ip / chain
    if family == "ipv4" and rng.random() < 0.2:       # fragments, first or not
        ip.flags, ip.frag = "MF", rng.choice([0, 0, 1, 185])
    if family == "ipv6" and rng.random() < 0.1:
        ip = ip / IPv6ExtHdrFragment(offset=rng.choice([0, 1, 100]), m=1)
    return raw(Ether(src=SRC_MAC, dst=DST_MAC) / ip / l4 / Raw(_payload(rng)))


def _dns_message(rng: random.Random) -> tuple[bytes, bool]:
    """A DNS message, valid or lying (compression loops, wrong counts, cut names, ...)."""
    valid = raw(DNS(id=rng.getrandbits(16), rd=1, qd=DNSQR(qname=rng.choice(
        ["ok.test", "a.b.c.example", "x" * 63 + ".test"]), qtype=rng.choice([1, 28, 16, 33]))))
    variant = rng.choice(["valid", "loop", "counts", "cut", "long", "opcode", "pointer_back"])
    if variant == "valid":
        return valid, False
    header = bytearray(valid[:12])
    if variant == "loop":           # a question whose name points at itself
        return bytes(header) + b"\xc0\x0c" + b"\x00\x01\x00\x01", False
    if variant == "pointer_back":   # a label, then a pointer to the header (loops back)
        return bytes(header) + b"\x03abc\xc0\x00\x00\x01\x00\x01", False
    if variant == "counts":         # qdcount/ancount that lie
        struct.pack_into("!HHHH", header, 4, rng.choice([0, 2, 65535]), 65535, 65535, 65535)
        return bytes(header) + valid[12:], False
    if variant == "cut":
        return valid[:rng.randint(0, len(valid) - 1)], False
    if variant == "long":           # labels running past 255 bytes and past the end
        return bytes(header) + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01", False
    struct.pack_into("!H", header, 2, 0x2800)            # opcode UPDATE: not a query
    return bytes(header) + valid[12:], False


def base_dns(rng: random.Random, query_port: list[int]) -> bytes:
    family = rng.choice(["ipv4", "ipv6"])
    message, _ = _dns_message(rng)
    if rng.random() < 0.7:          # towards a server
        query_port[0] += 1
        udp = UDP(sport=query_port[0], dport=DNS_PORT)
    else:                           # from a server, QR set, to a port no query came from
        flags = bytearray(message)
        if len(flags) >= 3:
            flags[2] |= 0x80
        message = bytes(flags)
        udp = UDP(sport=DNS_PORT, dport=rng.randint(20000, 29999))
    return raw(Ether(src=SRC_MAC, dst=DST_MAC) / _ip(rng, family) / udp / Raw(message))


# each on a connection of its own (so no request ever meets a response: a pairing would be a
# real HTTP exchange, not an invented one), cut anywhere
HTTP_REQUESTS = [b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"POST /api/v1/items?id=7 HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc",
                 b"CONNECT example.org:443 HTTP/1.1\r\n\r\n", b"OPTIONS * HTTP/1.1\r\n\r\n",
                 b"BREW /pot HTTP/1.1\r\n\r\n", b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n\r\n"]
HTTP_RESPONSES = [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.0 404 Not Found\r\n",
                  b"HTTP/1.1 2x0 Bad\r\n\r\n", b"HTTP/1.1 100 Continue\r\n\r\n",
                  b"HTTP/2.0 200 OK\r\n\r\n", b"HTTP/1.1 999\r\n"]


def base_not_ip(rng: random.Random) -> bytes:
    choice = rng.random()
    if choice < 0.4:
        return raw(Ether(src=SRC_MAC, dst=DST_MAC) / ARP(psrc="198.18.0.1", pdst="198.19.0.1"))
    if choice < 0.7:
        return raw(Ether(src=SRC_MAC, dst=DST_MAC, type=rng.choice([0x88CC, 0x8847, 0x9000,
                                                                    0x0600, 0x1234]))
                   / Raw(rng.randbytes(rng.randint(0, 200))))
    # 802.3 frames: a length, not a type
    return raw(Ether(src=SRC_MAC, dst=DST_MAC, type=rng.randint(0, 1500))
               / Raw(rng.randbytes(rng.randint(0, 100))))


# ---- byte-level variations ----

def _l3_offset(frame: bytes) -> int:
    off = 14
    while _u16(frame, off - 2) in VLAN_TYPES and off + 4 <= len(frame):
        off += 4
    return off


def tag(frame: bytes, rng: random.Random) -> bytes:
    """Adds 1 to 3 VLAN (802.1Q) or QinQ (802.1ad) tags after the MAC addresses."""
    # MACs, then (TPID, TCI) per tag, then the original type and payload
    tags = b"".join(struct.pack("!HH", rng.choice(VLAN_TYPES), rng.randint(0, 4095))
                    for _ in range(rng.choice([1, 1, 2, 3])))
    return frame[:12] + tags + frame[12:]


def corrupt(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    l3 = _l3_offset(frame)
    if l3 + 1 > len(data):
        return bytes(data)
    what = rng.choice(["version", "ihl", "total", "total_big", "payload_len", "doff", "frag",
                       "ext_len", "byte"])
    is4 = _u16(frame, l3 - 2) == 0x0800
    if what == "version":
        data[l3] = (rng.choice([0, 4, 5, 6, 7, 15]) << 4) | (data[l3] & 0xF)
    elif what == "ihl" and is4:
        data[l3] = (data[l3] & 0xF0) | rng.randint(0, 15)
    elif what in ("total", "total_big") and is4 and l3 + 4 <= len(data):
        value = rng.randint(0, 40) if what == "total" else rng.randint(len(data), 65535)
        struct.pack_into("!H", data, l3 + 2, value)
    elif what == "payload_len" and not is4 and l3 + 6 <= len(data):
        struct.pack_into("!H", data, l3 + 4, rng.choice([0, 1, 65535, rng.randint(0, 9000)]))
    elif what == "doff":
        for off in range(l3, min(len(data), l3 + 120)):   # a TCP header's data offset, roughly
            if off == l3 + rng.randint(20, 80):
                data[off] = rng.randint(0, 255)
    elif what == "frag" and is4 and l3 + 8 <= len(data):
        struct.pack_into("!H", data, l3 + 6, rng.getrandbits(16))
    elif what == "ext_len" and not is4 and l3 + 42 <= len(data):
        data[l3 + 41] = rng.randint(0, 255)
    else:
        index = rng.randint(l3, len(data) - 1)
        data[index] = rng.randint(0, 255)
    return bytes(data)


def keep_addresses(frame: bytes, variant: bytes) -> bool:
    """A variation may change anything but the ends' addresses and ports (the test's pools of
    addresses, DNS client ports and HTTP connections must stay apart) and TCP flags (a request
    made a FIN or RST would end its connection: a real HTTP request with status "none")."""
    before, after = expect(frame), expect(variant)
    if after.flow is None or before.flow is None:
        return True
    b, a = before.flow, after.flow
    same_ends = (a.src, a.dst) == (b.src, b.dst)
    same_ports = (a.sport, a.dport) in ((b.sport, b.dport), (0, 0)) and \
        (after.tcp_flags == before.tcp_flags or a.protocol != 6)
    no_tcp_dns = not (a.protocol == 6 and DNS_PORT in (a.sport, a.dport))
    return same_ends and same_ports and no_tcp_dns


@dataclass
class Corpus:
    frames: list[bytes] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)

    def add(self, frame: bytes, outcome: Outcome) -> None:
        self.frames.append(frame)
        self.outcomes.append(outcome)
        self.kinds[outcome.kind] += 1


def build(count: int, seed: int, pool_size: int = 1500) -> Corpus:
    rng = random.Random(seed)
    query_port, http_port = [30000], [0]
    pool: list[tuple[str, bytes]] = []
    for _ in range(pool_size):
        roll = rng.random()
        if roll < 0.5:
            pool.append(("transport", base_transport(rng)))
        elif roll < 0.7:
            pool.append(("dns", base_dns(rng, query_port)))
        elif roll < 0.9:
            pool.append(("http", b""))         # made fresh each time: one connection each
        else:
            pool.append(("not_ip", base_not_ip(rng)))
    corpus = Corpus()
    queried: set[tuple] = set()
    while len(corpus.frames) < count:
        kind, frame = rng.choice(pool)
        if kind == "http":
            frame = base_http_fast(rng, http_port)
        elif kind == "dns" and rng.random() < 0.8:
            frame = _renumber_dns(frame, rng)
        variant = frame
        if rng.random() < 0.25:
            variant = tag(variant, rng)
        if rng.random() < 0.35:
            variant = corrupt(variant, rng)
        if rng.random() < 0.2:
            variant = variant[:rng.randint(14, len(variant))]
        if len(variant) < 14 or len(variant) > MTU + 14 or not keep_addresses(frame, variant):
            continue
        outcome = expect(variant)
        if outcome.dns == "response" and outcome.dns_key in queried:
            continue            # would answer a query we sent: a real exchange, not fuzz
        if outcome.dns == "query":
            queried.add(outcome.dns_key)
        corpus.add(variant, outcome)
    return corpus


_HTTP_TEMPLATES: dict[tuple[str, bool], bytes] = {}


def base_http_fast(rng: random.Random, port: list[int]) -> bytes:
    """base_http() without scapy per frame: one scapy template per family and direction, then
    the ports, the cut text and the IP lengths are written into the bytes."""
    family = rng.choice(["ipv4", "ipv6"])
    request = rng.random() < 0.6
    key = (family, request)
    if key not in _HTTP_TEMPLATES:
        src, dst = (SRC4[0], DST4[0]) if family == "ipv4" else (SRC6[0], DST6[0])
        ip = IP(src=src, dst=dst) if family == "ipv4" else IPv6(src=src, dst=dst)
        _HTTP_TEMPLATES[key] = raw(Ether(src=SRC_MAC, dst=DST_MAC) / ip / TCP(flags="PA"))
    data = bytearray(_HTTP_TEMPLATES[key])
    l4 = 14 + (20 if family == "ipv4" else 40)
    port[0] += 1
    client = 40000 + port[0] % 20000
    server = rng.choice([80, 8080])
    struct.pack_into("!HHI", data, l4, *((client, server) if request else (server, client)),
                     rng.getrandbits(32))
    # a connection of its own: the client address varies too once the ports wrap
    src_index = (port[0] // 20000) % 4
    if family == "ipv4":
        data[14 + 15] = 1 + src_index
    else:
        data[14 + 23] = 1 + src_index
    text = rng.choice(HTTP_REQUESTS if request else HTTP_RESPONSES)
    data += text[:rng.randint(0, len(text))]
    if family == "ipv4":
        struct.pack_into("!H", data, 16, len(data) - 14)
    else:
        struct.pack_into("!H", data, 18, len(data) - 54)
    return bytes(data)


def _renumber_dns(frame: bytes, rng: random.Random) -> bytes:
    """A DNS frame of the pool with a fresh DNS id: many queries from one template."""
    outcome = expect(frame)
    if outcome.flow is None or outcome.flow.protocol != 17:
        return frame
    l3 = _l3_offset(frame)
    family4 = _u16(frame, 12) == 0x0800
    l4 = l3 + ((frame[l3] & 0xF) * 4 if family4 else 40)
    if l4 + 10 > len(frame):
        return frame
    data = bytearray(frame)
    struct.pack_into("!H", data, l4 + 8, rng.getrandbits(16))
    return bytes(data)


def in_fuzz_nets(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in FUZZ_NETS)
