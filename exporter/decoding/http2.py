"""HTTP/2 and gRPC from the frames the classifier hands over (bpf/http2.h): header blocks
decoded with each connection direction's HPACK table, streams paired into requests.

Rules (docs/metrics.md says them to users):
- A client HEADERS opens a request (its :method, :path, and whether its content-type is
  application/grpc). Past `max_streams` awaiting a response on a connection, a request is
  counted at once with status "untracked".
- The first final (non-1xx) server HEADERS of the stream answers it: the HTTP request is
  counted with its :status, and its latency is time to first byte (request HEADERS to response
  HEADERS, both stamped in the kernel).
- A gRPC call ends with the server's HEADERS carrying END_STREAM (trailers, or a trailers-only
  response): counted with its grpc-status and the whole call's latency (request HEADERS to
  trailers). Trailers without grpc-status count "none".
- A stream reset (RST_STREAM from either side), left unprocessed by a GOAWAY, or open when the
  connection ends or idles out counts status_code "none" (and grpc_status "none"); but when no
  record of the server's direction came at all (it was not followed), "unknown".
- A block that cannot be decoded (a record lost, a frame past the kernel's capture, an HPACK
  error) leaves the connection's tables unknown: the connection's open and later requests count
  "unknown" (grpc_status "unparsed") and one parse error each, never a guessed value. A server
  HEADERS on a stream with no request seen is a parse error too.

Decoding is the cost: hpack takes some 13 us for a 9-header gRPC block. Repeated blocks are
decoded once and then taken from caches keyed by their bytes (BlockDecoder)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
from hpack import Decoder
from hpack.exceptions import HPACKError
from hpack.table import HeaderTable

from .. import logs
from ..serving import histogram

log = logs.get("http2")

CHUNK = 128                         # H2_CHUNK in bpf/http2.h
RECORD = np.dtype({
    "names": ["time_ns", "kind", "family", "from_server", "frame_type", "frame_flags",
              "lost_before", "chunk_len", "client_port", "server_port", "stream", "frame_len",
              "chunk_offset", "capture_len", "client", "server", "data"],
    "formats": ["<u8", "u1", "u1", "u1", "u1", "u1", "u1", "<u2", "<u2", "<u2", "<u4", "<u4",
                "<u4", "<u4", ("u1", 16), ("u1", 16), ("u1", CHUNK)],
    "offsets": [0, 8, 9, 10, 11, 12, 13, 14, 16, 18, 20, 24, 28, 32, 40, 56, 72],
    "itemsize": 72 + CHUNK,
})
RECORD_FRAME, RECORD_LOST, RECORD_END = 1, 2, 3
_COLUMNS = ("kind", "family", "from_server", "frame_type", "frame_flags", "lost_before",
            "chunk_len", "client_port", "server_port", "stream", "frame_len", "chunk_offset",
            "capture_len", "time_ns")
SIDE_UNKNOWN = 2

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
GOAWAY, CONTINUATION = 7, 9
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE = 1
# flags a HEADERS frame may carry to take the fast path: END_HEADERS alone, END_STREAM aside
_WHOLE_MASK = END_HEADERS | PADDED | PRIORITY_FLAG

# the kernel's method codes (bpf/http.h) with HTTP_VERSION_2 in the high bits
VERSION_2 = 3 << 4
METHOD_CODES = {b"GET": 1, b"HEAD": 2, b"POST": 3, b"PUT": 4, b"DELETE": 5, b"PATCH": 6,
                b"OPTIONS": 7, b"CONNECT": 8, b"TRACE": 9}
METHOD_OTHER = 10
# status values below 100 (bpf/http.h, exporter/naming/httpnames.py)
STATUS_NONE, STATUS_UNTRACKED, STATUS_UNKNOWN = 0, 2, 3

GRPC_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
              "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
              "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
              "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
GRPC_NONE = "none"              # the call ended without a grpc-status
GRPC_UNPARSED = "unparsed"      # its headers could not be decoded
GRPC_UNTRACKED = "untracked"    # past the streams tracked per connection
GRPC_OTHER = "other"            # a grpc-status outside the codes above

REQUEST, LATENCY = 0, 1         # kinds, as in the kernel's HTTP keys
CACHE_ENTRIES = 256

# (family, client, client_port, server, server_port)
ConnKey = tuple[int, bytes, int, bytes, int]
# (family, client, server, server_port, kind, method, status, variant, path)
HttpKey = tuple[int, bytes, bytes, int, int, int, int, int, bytes]
# (family, client, server, server_port, kind, grpc_status, variant, path: with grpc_methods)
GrpcKey = tuple[int, bytes, bytes, int, int, str, int, bytes]


def grpc_status_name(value: bytes | None) -> str:
    if value is None:
        return GRPC_NONE
    try:
        code = int(value)
    except ValueError:
        return GRPC_OTHER
    return GRPC_CODES[code] if 0 <= code < len(GRPC_CODES) else GRPC_OTHER


class CountingTable(HeaderTable):
    """hpack's dynamic table, with a version that changes whenever its contents may have, a
    log of the changes a decode makes, and whether the decode read a dynamic entry."""

    STATIC_ENTRIES = len(HeaderTable.STATIC_TABLE)

    def __init__(self) -> None:
        self.version = 0
        self.changes: list[tuple[bytes | None, bytes | int]] | None = None
        self.read_dynamic = False
        super().__init__()

    def add(self, name: bytes, value: bytes) -> None:
        self.version += 1
        if self.changes is not None:
            self.changes.append((name, value))
        super().add(name, value)

    @HeaderTable.maxsize.setter  # type: ignore[attr-defined,untyped-decorator]
    def maxsize(self, newmax: int) -> None:
        self.version += 1
        if self.changes is not None:
            self.changes.append((None, newmax))
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]

    def get_by_index(self, index: int) -> tuple[bytes, bytes]:
        if index > self.STATIC_ENTRIES:
            self.read_dynamic = True
        return super().get_by_index(index)


# A decoded block: its headers, and the changes it made to its direction's table (an entry
# added: (name, value); the size updated: (None, size)).
Decoded = tuple[dict[bytes, bytes], list[tuple[bytes | None, bytes | int]]]


class BlockDecoder:
    """One direction's HPACK decoder, with two caches keyed by a block's bytes.

    A block that read no dynamic entry (static references and literals only) decodes to the
    same headers whatever the table holds, and changes it the same way: it is decoded once,
    and later copies replay its changes (servers that add every response header to the table
    and never refer to it, as nginx does, send only such blocks). A block that read dynamic
    entries and changed nothing (a steady client's requests, all references) is kept for as
    long as the table stays as it was."""

    def __init__(self) -> None:
        self.decoder = Decoder()
        self.table = CountingTable()
        self.decoder.header_table = self.table
        self._independent: dict[bytes, Decoded] = {}
        self._cache: dict[bytes, dict[bytes, bytes]] = {}
        self._cached_version = 0

    def decode(self, block: bytes) -> dict[bytes, bytes]:
        """The block's headers (the last value of a repeated name); raises HPACKError."""
        known = self._independent.get(block)
        if known is not None:
            headers, changes = known
            for name, value in changes:
                if name is None:
                    self.decoder.header_table_size = value  # type: ignore[assignment]
                else:
                    self.table.add(name, value)  # type: ignore[arg-type]
            return headers
        version = self.table.version
        if version != self._cached_version:
            self._cache.clear()
            self._cached_version = version
        headers = self._cache.get(block)
        if headers is not None:
            return headers
        table = self.table
        table.changes, table.read_dynamic = [], False
        try:
            headers = dict(self.decoder.decode(block, raw=True))  # type: ignore[arg-type]
            changes = table.changes
        finally:
            table.changes = None
        if not table.read_dynamic:
            if len(self._independent) >= CACHE_ENTRIES:
                self._independent.clear()
            self._independent[block] = (headers, changes)
        elif table.version == version:
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[block] = headers
        return headers


@dataclass
class Exchange:
    """An answered HTTP/2 request (kind "http2", status the :status) or a finished gRPC call
    (kind "grpc", status the grpc_status name), for the live view."""
    kind: str
    key: ConnKey
    method: int
    status: int | str
    path: bytes
    latency_ns: int


@dataclass
class Stream:
    method: int
    started_ns: int | None      # None: its request was not seen (lost with its records)
    grpc: bool
    path: bytes
    answered: bool = False


@dataclass
class Frame:
    """A handed-over frame being put together from its records."""
    type: int
    flags: int
    stream: int
    length: int
    captured: int
    payload: bytearray = field(default_factory=bytearray)


@dataclass
class Block:
    """A header block being put together from HEADERS (or PUSH_PROMISE) and CONTINUATION."""
    type: int
    flags: int
    stream: int
    time_ns: int
    fragment: bytearray


class Connection:
    def __init__(self, key: ConnKey) -> None:
        self.key = key
        self.decoders = (BlockDecoder(), BlockDecoder())    # client's, server's
        self.frames: list[Frame | None] = [None, None]
        self.blocks: list[Block | None] = [None, None]
        self.streams: dict[int, Stream] = {}
        # per direction: its HPACK table can no longer be followed (records lost, a block
        # past the capture, an HPACK error); its frames are still counted, undecoded
        self.lost = [False, False]
        self.grpc = False           # a request carried application/grpc
        self.server_seen = False    # a record from the server's direction came
        self.last_ns = 0


class Http2Tracker:
    """Follows HTTP/2 connections through their records; counts accumulate until drained."""

    def __init__(self, max_streams: int, idle_ns: int, paths: bool = False,
                 grpc_methods: bool = False) -> None:
        self.max_streams = max_streams
        self.idle_ns = idle_ns
        self.paths = paths                  # keep :path for the HTTP metrics' path label
        self.grpc_methods = grpc_methods    # ... and for gRPC's grpc_method label
        self.conns: dict[ConnKey, Connection] = {}
        # the live view's: each answered request and finished gRPC call, when set to a list
        self.exchanges: list[Exchange] | None = None
        self.http: dict[HttpKey, int] = {}
        self.grpc: dict[GrpcKey, int] = {}
        self.parse_errors = 0

    # -- records ---------------------------------------------------------------------------

    def feed(self, records: np.ndarray) -> None:
        # columns as Python lists first: a field of a numpy record costs more to read than
        # the rest of a record's handling
        columns = [records[name].tolist() for name in _COLUMNS]
        conns = self.conns
        clients, servers = records["client"].tobytes(), records["server"].tobytes()
        data = records["data"].tobytes()
        for row, (kind, family, side, ftype, flags, lost_before, chunk_len, client_port,
                  server_port, stream, frame_len, chunk_offset, capture_len,
                  time_ns) in enumerate(zip(*columns, strict=True)):
            at = row * 16
            key: ConnKey = (family, clients[at:at + 16], client_port, servers[at:at + 16],
                            server_port)
            start = row * CHUNK
            conn = conns.get(key)
            if (conn is not None and kind == RECORD_FRAME and not lost_before
                    and side != SIDE_UNKNOWN and not conn.lost[side] and ftype == HEADERS
                    and chunk_offset == 0 and chunk_len == frame_len
                    and (flags & _WHOLE_MASK) == END_HEADERS and conn.frames[side] is None):
                # the common record: a whole HEADERS frame, one block, not padded
                conn.last_ns = time_ns
                conn.server_seen |= side == 1
                try:
                    headers = conn.decoders[side].decode(data[start:start + chunk_len])
                except (HPACKError, ValueError, IndexError) as e:
                    log.debug("undecodable header block", extra={"error": str(e)})
                    self._lose(conn, side)
                    continue
                (self._response if side else self._request)(conn, stream, flags, time_ns,
                                                            headers)
                continue
            conn = self._connection(key, kind, side, time_ns, lost_before)
            if conn is None:
                continue
            header = Frame(ftype, flags, stream, frame_len, capture_len)
            piece = data[start:start + chunk_len]
            if conn.lost[side]:
                self._undecoded(conn, side, header, chunk_offset, piece, time_ns)
            else:
                self._chunk(conn, side, header, chunk_offset, piece, time_ns)

    def _connection(self, key: ConnKey, kind: int, side: int, time_ns: int,
                    lost_before: int) -> Connection | None:
        """The connection a frame record goes on with; None when the record is done with."""
        if side == SIDE_UNKNOWN:        # the kernel's state was gone: either way round
            flipped = (key[0], key[3], key[4], key[1], key[2])
            conn = self.conns.get(key) or self.conns.get(flipped)
            if conn is not None:
                self._end(conn, lost=kind == RECORD_LOST)
            return None
        conn = self.conns.get(key)
        if conn is None:
            if kind != RECORD_FRAME:
                return None
            conn = self.conns[key] = Connection(key)
        conn.last_ns = time_ns
        conn.server_seen |= side == 1
        if kind == RECORD_END:
            self._end(conn, lost=False)
            return None
        if kind == RECORD_LOST:         # bytes the kernel could not walk
            self._lose(conn, side)
            return None
        if lost_before:                 # records that found the ring full
            self._lose(conn, side)
        return conn

    def _chunk(self, conn: Connection, side: int, header: Frame, offset: int, piece: bytes,
               time_ns: int) -> None:
        """A piece of a frame's payload; `header` describes its frame."""
        frame = conn.frames[side]
        if offset == 0:
            frame = conn.frames[side] = header
        elif frame is None or offset != len(frame.payload):
            self._lose(conn, side)      # a piece missing in between
            return
        frame.payload += piece
        if len(frame.payload) >= frame.captured:
            conn.frames[side] = None
            self._frame(conn, side, frame, time_ns)

    def _frame(self, conn: Connection, side: int, frame: Frame, now: int) -> None:
        if frame.type in (HEADERS, PUSH_PROMISE, CONTINUATION):
            if frame.captured < frame.length:       # past the kernel's capture: undecodable
                self._undecoded(conn, side, frame, 0, b"", now)
                self._lose(conn, side)
                return
            self._block_frame(conn, side, frame, now)
        elif frame.type == SETTINGS:
            self._settings(conn, side, bytes(frame.payload))
        elif frame.type == RST_STREAM:
            self._reset(conn, frame.stream)
        elif frame.type == GOAWAY and side == 1 and len(frame.payload) >= 4:
            self._goaway(conn, bytes(frame.payload))

    def _goaway(self, conn: Connection, payload: bytes) -> None:
        """The server's streams past the GOAWAY's last one were never processed."""
        last = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
        for stream_id in [s for s in conn.streams if s > last]:
            self._reset(conn, stream_id)

    def _settings(self, conn: Connection, side: int, payload: bytes) -> None:
        # a side's HEADER_TABLE_SIZE bounds the table of the blocks sent to it
        for at in range(0, len(payload) - 5, 6):
            ident, value = struct.unpack_from(">HI", payload, at)
            if ident == SETTINGS_HEADER_TABLE_SIZE:
                conn.decoders[1 - side].decoder.max_allowed_table_size = value

    def _block_frame(self, conn: Connection, side: int, frame: Frame, now: int) -> None:
        payload = frame.payload
        if frame.type == CONTINUATION:
            block = conn.blocks[side]
            if block is None or block.stream != frame.stream:
                self._lose(conn, side)
                return
            block.fragment += payload
        else:
            start, pad = 0, 0
            if frame.flags & PADDED:
                pad = payload[0] if payload else 0
                start = 1
            if frame.type == HEADERS and frame.flags & PRIORITY_FLAG:
                start += 5
            if frame.type == PUSH_PROMISE:
                start += 4
            if start + pad > len(payload):
                self._lose(conn, side)      # malformed: no request or answer in it
                return
            block = conn.blocks[side] = Block(frame.type, frame.flags, frame.stream, now,
                                              payload[start:len(payload) - pad])
        if frame.flags & END_HEADERS:
            conn.blocks[side] = None
            try:
                headers = conn.decoders[side].decode(bytes(block.fragment))
            except (HPACKError, ValueError, IndexError) as e:
                # malformed: no request or answer in it, and the table is unknown after it
                log.debug("undecodable header block", extra={"error": str(e)})
                self._lose(conn, side)
                return
            if block.type == HEADERS:
                (self._response if side else self._request)(conn, block.stream, block.flags,
                                                            block.time_ns, headers)

    def _undecoded(self, conn: Connection, side: int, header: Frame, offset: int,
                   piece: bytes, now: int) -> None:
        """A record of a direction whose table is lost: its frames still open, answer, end
        and reset streams, without the headers' values."""
        if offset != 0:
            return
        if header.type == HEADERS:
            (self._response if side else self._request)(conn, header.stream, header.flags, now,
                                                        None)
        elif header.type == RST_STREAM:
            self._reset(conn, header.stream)
        elif header.type == GOAWAY and side == 1 and len(piece) >= 4:
            self._goaway(conn, piece)

    # -- pairing ---------------------------------------------------------------------------

    def _request(self, conn: Connection, stream_id: int, flags: int, time_ns: int,
                 headers: dict[bytes, bytes] | None) -> None:
        """A client HEADERS; headers None when its direction's table is lost: the method reads
        other, and the call is gRPC when the connection carried gRPC before."""
        if stream_id in conn.streams:
            return                      # the request's trailers
        if headers is None:
            method, grpc, path = METHOD_OTHER | VERSION_2, conn.grpc, b""
        else:
            method = METHOD_CODES.get(headers.get(b":method", b""), METHOD_OTHER) | VERSION_2
            grpc = headers.get(b"content-type", b"").startswith(b"application/grpc")
            path = headers.get(b":path", b"")
            conn.grpc |= grpc
        if len(conn.streams) >= self.max_streams:
            self._count_http(conn, method, STATUS_UNTRACKED, None, path)
            if grpc:
                self._count_grpc(conn, GRPC_UNTRACKED, None, path)
            return
        conn.streams[stream_id] = Stream(method, time_ns, grpc, path)

    def _response(self, conn: Connection, stream_id: int, flags: int, time_ns: int,
                  headers: dict[bytes, bytes] | None) -> None:
        """A server HEADERS: the response's, or a gRPC call's trailers; headers None when the
        server's table is lost (status unknown, grpc_status unparsed)."""
        stream = conn.streams.get(stream_id)
        if stream is None:
            if stream_id % 2 == 0 or conn.lost[1]:
                return                  # a pushed stream; one counted when the server's went
            if not conn.lost[0]:
                self.parse_errors += 1  # a response to no request seen
                return
            # its request went with the client's lost records: counted now, method unknown
            stream = conn.streams[stream_id] = Stream(METHOD_OTHER | VERSION_2, None,
                                                      conn.grpc, b"")
        since = None if stream.started_ns is None else time_ns - stream.started_ns
        if not stream.answered:
            code = STATUS_UNKNOWN
            status = headers.get(b":status") if headers is not None else None
            if status is not None:
                code = int(status) if status.isdigit() else 0
                if 100 <= code < 200 and code != 101:
                    return              # interim: the final one follows
                if not 100 <= code <= 599:
                    self.parse_errors += 1
                    code = STATUS_UNKNOWN
            elif headers is not None and not flags & END_STREAM:
                self.parse_errors += 1  # response headers without :status
                return
            stream.answered = True
            self._count_http(conn, stream.method, code, since, stream.path)
            if self.exchanges is not None and since is not None:
                self.exchanges.append(Exchange("http2", conn.key, stream.method, code,
                                               stream.path, since))
        if not stream.grpc:
            del conn.streams[stream_id]
        elif flags & END_STREAM:
            del conn.streams[stream_id]
            grpc_status = GRPC_UNPARSED if headers is None else \
                grpc_status_name(headers.get(b"grpc-status"))
            self._count_grpc(conn, grpc_status, since, stream.path)
            if self.exchanges is not None and since is not None:
                self.exchanges.append(Exchange("grpc", conn.key, stream.method, grpc_status,
                                               stream.path, since))

    def _reset(self, conn: Connection, stream_id: int) -> None:
        stream = conn.streams.pop(stream_id, None)
        if stream is not None:
            self._unfinished(conn, stream, STATUS_NONE, GRPC_NONE)

    def _unfinished(self, conn: Connection, stream: Stream, status: int, grpc: str) -> None:
        if not stream.answered:
            self._count_http(conn, stream.method, status, None, stream.path)
        if stream.grpc:
            self._count_grpc(conn, grpc, None, stream.path)

    def _lose(self, conn: Connection, side: int) -> None:
        """A direction's HPACK table can no longer be followed (or records of it are gone):
        one parse error each time. Requests waiting for a response when the server's
        records went count unknown now (their answers may have been among them); the
        client's lost requests show as responses to streams not seen."""
        self.parse_errors += 1
        conn.lost[side] = True
        conn.frames[side] = conn.blocks[side] = None
        if side == 1:
            for stream in conn.streams.values():
                self._unfinished(conn, stream, STATUS_UNKNOWN, GRPC_UNPARSED)
            conn.streams.clear()

    def _end(self, conn: Connection, lost: bool) -> None:
        if lost or (conn.streams and not conn.server_seen):
            # the kernel's state went (LRU) with answers unseen; or the server's direction
            # was never followed (a server always speaks first, its SETTINGS): what it
            # answered is unknown
            self._lose(conn, 1)
        elif not any(conn.lost) and (any(conn.frames) or any(conn.blocks)):
            self.parse_errors += 1      # a frame or header block cut short by the end
        for stream in conn.streams.values():
            self._unfinished(conn, stream, STATUS_NONE, GRPC_NONE)
        del self.conns[conn.key]

    def sweep(self, now_ns: int) -> None:
        """Ends the connections idle for idle_ns (their last record's time)."""
        for conn in [c for c in self.conns.values() if now_ns - c.last_ns > self.idle_ns]:
            self._end(conn, lost=False)

    # -- counts ----------------------------------------------------------------------------

    def _count_http(self, conn: Connection, method: int, status: int, latency_ns: int | None,
                    path: bytes) -> None:
        family, client, _, server, port = conn.key
        kept = path[:64] if self.paths else b""
        counts = self.http
        key = (family, client, server, port, REQUEST, method, status, 0, kept)
        counts[key] = counts.get(key, 0) + 1
        if latency_ns is not None:
            micros = max(latency_ns, 0) // 1000
            key = (family, client, server, port, LATENCY, method, status,
                   histogram.slot_of(micros), kept)
            counts[key] = counts.get(key, 0) + 1
            key = (family, client, server, port, LATENCY, method, status, histogram.SUM_SLOT,
                   kept)
            counts[key] = counts.get(key, 0) + micros

    def _count_grpc(self, conn: Connection, status: str, latency_ns: int | None,
                    path: bytes) -> None:
        family, client, _, server, port = conn.key
        kept = path if self.grpc_methods else b""
        counts = self.grpc
        key = (family, client, server, port, REQUEST, status, 0, kept)
        counts[key] = counts.get(key, 0) + 1
        if latency_ns is not None:
            # a latency as the kernel files one: its log2 slot, and its microseconds in the sum
            micros = max(latency_ns, 0) // 1000
            key = (family, client, server, port, LATENCY, status, histogram.slot_of(micros),
                   kept)
            counts[key] = counts.get(key, 0) + 1
            key = (family, client, server, port, LATENCY, status, histogram.SUM_SLOT, kept)
            counts[key] = counts.get(key, 0) + micros

    def take_http(self) -> dict[HttpKey, int]:
        http, self.http = self.http, {}
        return http

    def take_grpc(self) -> dict[GrpcKey, int]:
        grpc, self.grpc = self.grpc, {}
        return grpc

    def take_parse_errors(self) -> int:
        errors, self.parse_errors = self.parse_errors, 0
        return errors
