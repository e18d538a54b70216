"""DNS helpers for tests: a scriptable upstream server (ServFail, delayed answers) for dnsmasq
to forward to, and a builder for DNS messages, well-formed or not."""

from __future__ import annotations

import socket
import struct
import threading
import time

from lab.testnode import in_netns

QTYPE_A, QTYPE_AAAA = 1, 28


def encode_name(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"


def message(qid: int, name: str, qtype: int = QTYPE_A, response: bool = False, rcode: int = 0,
            qdcount: int = 1, raw_name: bytes | None = None) -> bytes:
    flags = (0x8000 if response else 0) | 0x0100 | (0x0080 if response else 0) | rcode
    header = struct.pack("!HHHHHH", qid, flags, qdcount, 0, 0, 0)
    return header + (raw_name if raw_name is not None else encode_name(name)) + \
        struct.pack("!HH", qtype, 1)


def record(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    """A resource record of class IN; `owner` in wire format (a name or a pointer)."""
    return owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def response(qid: int, name: str, answers: list[bytes], qtype: int = QTYPE_A) -> bytes:
    """A NoError response to `name` with the given answer records."""
    header = struct.pack("!HHHHHH", qid, 0x8180, 1, len(answers), 0, 0)
    return header + encode_name(name) + struct.pack("!HH", qtype, 1) + b"".join(answers)


def question(query: bytes) -> tuple[int, bytes]:
    """(id, question section) of a query."""
    qid = struct.unpack("!H", query[:2])[0]
    end = 12
    while query[end]:
        end += query[end] + 1
    return qid, query[12:end + 5]


class Upstream:
    """A UDP DNS server in a namespace answering every query with `rcode` after `delay`
    seconds, with one A record when the rcode is NoError."""

    def __init__(self, ns: str, addr: str, port: int, rcode: int = 0, delay: float = 0.0,
                 answer: str = "192.0.2.1", answers: tuple[int, bytes] | None = None) -> None:
        """answers: (ancount, the answer section as bytes) in place of the one A record."""
        self.rcode, self.delay, self.answer = rcode, delay, socket.inet_aton(answer)
        self.answers = answers
        with in_netns(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((addr, port))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _reply(self, query: bytes, peer: tuple) -> None:
        time.sleep(self.delay)
        qid, section = question(query)
        answers = 1 if self.rcode == 0 else 0
        body = section
        if self.answers is not None:
            answers, raw = self.answers
            body += raw
        elif answers:
            body += b"\xc0\x0c" + struct.pack("!HHIH", QTYPE_A, 1, 60, 4) + self.answer
        header = struct.pack("!HHHHHH", qid, 0x8180 | self.rcode, 1, answers, 0, 0)
        self.sock.sendto(header + body, peer)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self.sock.recvfrom(4096)
            except OSError:
                continue
            threading.Thread(target=self._reply, args=(query, peer), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
