"""The answers of a DNS response: which addresses the question's name led to, through which
CNAMEs, and for how long (RFC 1035, section 4.1; AAAA from RFC 3596).

The kernel hands over the message as it was on the wire, perhaps cut at the bytes it keeps.
Every loop here is bounded: names by their 255 bytes and by compression pointers that may only
point backwards (so a pointer loop cannot be written), records by MAX_RECORDS, CNAME chains by
MAX_CHAIN."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

HEADER = struct.Struct(">HHHHHH")
RECORD = struct.Struct(">HHIH")       # type, class, TTL, rdata length
TYPE_A, TYPE_CNAME, TYPE_AAAA = 1, 5, 28
CLASS_IN = 1
MAX_NAME = 255
MAX_RECORDS = 64        # answers read from one response; past them the rest is ignored
MAX_CHAIN = 16          # CNAMEs followed from the question's name


class DnsAnswerError(ValueError):
    """The message is not a well-formed response: a parse error."""


@dataclass(frozen=True)
class Answer:
    """An address the question led to: `names` from the question's name through each CNAME
    to the name the address record is for; `ttl` the least TTL along that chain."""
    address: str
    family: int
    ttl: int
    names: tuple[str, ...]


@dataclass(frozen=True)
class Response:
    question: str
    answers: tuple[Answer, ...]
    cut: bool = False           # records were lost at the end of the bytes kept


def read_name(message: bytes, pos: int) -> tuple[str, int]:
    """The name at `pos` as lower-case dotted text, and the position after it (after its
    first pointer, if it has one). A pointer must point before the label it stands in."""
    labels: list[str] = []
    length = 0
    after = -1
    limit = pos                 # a pointer's target must be below where this part began
    while True:
        if pos >= len(message):
            raise DnsAnswerError("a name runs past the end of the message")
        byte = message[pos]
        if byte & 0xC0 == 0xC0:
            if pos + 1 >= len(message):
                raise DnsAnswerError("a compression pointer runs past the end")
            target = (byte & 0x3F) << 8 | message[pos + 1]
            if target >= limit:
                raise DnsAnswerError("a compression pointer that does not point backwards")
            if after < 0:
                after = pos + 2
            pos = limit = target
            continue
        if byte & 0xC0:
            raise DnsAnswerError(f"a label of reserved type {byte >> 6:#x}")
        if byte == 0:
            return ".".join(labels), (after if after >= 0 else pos + 1)
        length += byte + 1
        if length + 1 > MAX_NAME:
            raise DnsAnswerError("a name longer than 255 bytes")
        end = pos + 1 + byte
        if end > len(message):
            raise DnsAnswerError("a label runs past the end of the message")
        labels.append(message[pos + 1:end].decode("ascii", "replace").lower())
        pos = end


def parse_response(message: bytes, cut: bool = False) -> Response:
    """The answers of `message`. With `cut` (the message is longer than `message` holds),
    a record that runs past the end ends the reading; without it, that is an error."""
    if len(message) < HEADER.size:
        raise DnsAnswerError("shorter than a DNS header")
    _, flags, qdcount, ancount, _, _ = HEADER.unpack_from(message)
    if not flags & 0x8000:
        raise DnsAnswerError("not a response")
    if qdcount != 1:
        raise DnsAnswerError(f"{qdcount} questions")
    question, pos = read_name(message, HEADER.size)
    pos += 4                            # type and class
    if pos > len(message):
        raise DnsAnswerError("the question runs past the end of the message")
    cnames: dict[str, tuple[str, int]] = {}         # owner -> (target, TTL)
    addresses: dict[str, list[tuple[str, int, int]]] = {}   # owner -> (address, family, TTL)
    lost = False
    for _ in range(min(ancount, MAX_RECORDS)):
        try:
            owner, pos = read_name(message, pos)
            if pos + RECORD.size > len(message):
                raise DnsAnswerError("a record runs past the end of the message")
            rtype, rclass, ttl, rdlength = RECORD.unpack_from(message, pos)
            pos += RECORD.size
            rdata_end = pos + rdlength
            if rdata_end > len(message):
                raise DnsAnswerError("a record's data runs past the end of the message")
        except DnsAnswerError:
            if cut:
                lost = True
                break
            raise
        if rclass == CLASS_IN:
            ttl = min(ttl, 0x7FFFFFFF)      # RFC 2181: a TTL with the top bit set means 0
            if ttl & 0x80000000:
                ttl = 0
            if rtype == TYPE_CNAME:
                target, _ = read_name(message[:rdata_end], pos)
                cnames.setdefault(owner, (target, ttl))
            elif rtype in (TYPE_A, TYPE_AAAA):
                size = 4 if rtype == TYPE_A else 16
                if rdlength != size:
                    raise DnsAnswerError(f"an address record of {rdlength} bytes")
                address = str(ipaddress.ip_address(message[pos:rdata_end]))
                addresses.setdefault(owner, []).append((address, 4 if size == 4 else 6, ttl))
        pos = rdata_end
    answers: list[Answer] = []
    chain, ttl, name = [question], None, question
    for _ in range(MAX_CHAIN + 1):
        for address, family, record_ttl in addresses.get(name, ()):
            least = record_ttl if ttl is None else min(ttl, record_ttl)
            answers.append(Answer(address, family, least, tuple(chain)))
        if name not in cnames:
            break
        name, cname_ttl = cnames[name]
        if name in chain:
            break                   # a CNAME loop: what was found so far stands
        ttl = cname_ttl if ttl is None else min(ttl, cname_ttl)
        chain.append(name)
    return Response(question, tuple(answers), lost)
