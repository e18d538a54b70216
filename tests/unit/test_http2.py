"""The HTTP/2 tracker (exporter/decoding/http2.py) on records as the kernel writes them: pairing,
gRPC status, HPACK table state, losses and the bounds."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hpack import Encoder

from exporter.decoding.http2 import (
    CHUNK,
    CONTINUATION,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    LATENCY,
    METHOD_OTHER,
    PADDED,
    RECORD,
    RECORD_END,
    RECORD_FRAME,
    RECORD_LOST,
    REQUEST,
    RST_STREAM,
    SETTINGS,
    SIDE_UNKNOWN,
    STATUS_NONE,
    STATUS_UNKNOWN,
    STATUS_UNTRACKED,
    VERSION_2,
    Http2Tracker,
    grpc_status_name,
)
from exporter.naming.httpnames import GrpcMethodLabel
from exporter.serving import histogram

CLIENT, SERVER = bytes([10, 0, 0, 1]) + bytes(12), bytes([10, 0, 0, 2]) + bytes(12)
GET, POST = 1 | VERSION_2, 3 | VERSION_2
MS = 1_000_000


class Peer:
    """Writes one connection's records, with each side's own HPACK encoder."""

    def __init__(self, client_port: int = 40000) -> None:
        self.encoders = (Encoder(), Encoder())
        self.client_port = client_port

    def record(self, kind: int, side: int = 0, time_ns: int = 0, **fields: int) -> np.ndarray:
        r = np.zeros(1, dtype=RECORD)
        r["kind"], r["family"], r["from_server"], r["time_ns"] = kind, 4, side, time_ns
        r["client_port"], r["server_port"] = self.client_port, 50051
        r["client"] = np.frombuffer(CLIENT, dtype=np.uint8)
        r["server"] = np.frombuffer(SERVER, dtype=np.uint8)
        for name, value in fields.items():
            r[name] = value
        return r

    def frame(self, side: int, ftype: int, flags: int, stream: int, payload: bytes,
              time_ns: int = 0, capture: int | None = None) -> np.ndarray:
        """The frame's records: its payload in pieces of CHUNK bytes, as the kernel hands
        them over (an empty payload in one record)."""
        captured = payload[:capture] if capture is not None else payload
        pieces = [captured[i:i + CHUNK] for i in range(0, len(captured), CHUNK)] or [b""]
        records = []
        for n, piece in enumerate(pieces):
            r = self.record(RECORD_FRAME, side, time_ns, frame_type=ftype, frame_flags=flags,
                            stream=stream, frame_len=len(payload), chunk_offset=n * CHUNK,
                            capture_len=len(captured), chunk_len=len(piece))
            r["data"][0, :len(piece)] = np.frombuffer(piece, dtype=np.uint8)
            records.append(r)
        return np.concatenate(records)

    def headers(self, side: int, stream: int, headers: list[tuple[str, str]],
                end_stream: bool = False, time_ns: int = 0) -> np.ndarray:
        block = self.encoders[side].encode(headers)
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        return self.frame(side, HEADERS, flags, stream, block, time_ns)


def request(peer: Peer, stream: int, time_ns: int = 0, grpc: bool = False,
            method: str = "GET", path: str = "/ok") -> np.ndarray:
    headers = [(":method", "POST" if grpc else method), (":scheme", "http"),
               (":path", "/test.Echo/Unary" if grpc else path), (":authority", "b")]
    if grpc:
        headers += [("content-type", "application/grpc"), ("te", "trailers")]
    return peer.headers(0, stream, headers, time_ns=time_ns)


def response(peer: Peer, stream: int, status: str = "200", time_ns: int = 0,
             end_stream: bool = False, grpc: bool = False) -> np.ndarray:
    headers = [(":status", status)]
    if grpc:
        headers.append(("content-type", "application/grpc"))
    return peer.headers(1, stream, headers, end_stream, time_ns)


def trailers(peer: Peer, stream: int, code: int | None, time_ns: int = 0) -> np.ndarray:
    headers = [("grpc-status", str(code))] if code is not None else [("grpc-message", "x")]
    return peer.headers(1, stream, headers, True, time_ns)


def requests(tracker: Http2Tracker) -> dict[tuple[int, int], int]:
    """(method, status) -> requests counted."""
    out: dict[tuple[int, int], int] = {}
    for key, value in tracker.take_http().items():
        if key[4] == REQUEST:
            out[(key[5], key[6])] = out.get((key[5], key[6]), 0) + value
    return out


def calls(tracker: Http2Tracker) -> dict[str, int]:
    return {key[5]: value for key, value in tracker.take_grpc().items() if key[4] == REQUEST}


def tracker(**kwargs: int) -> Http2Tracker:
    return Http2Tracker(max_streams=kwargs.get("max_streams", 100), idle_ns=10 * 1_000 * MS)


def test_requests_pair_with_their_responses_by_stream_in_any_order():
    t, peer = tracker(), Peer()
    t.feed(np.concatenate([request(peer, 1), request(peer, 3, method="POST"),
                           response(peer, 3, "201"), response(peer, 1, "404", end_stream=True)]))
    assert requests(t) == {(GET, 404): 1, (POST, 201): 1}
    assert t.take_parse_errors() == 0


def test_latency_is_request_headers_to_response_headers():
    t, peer = tracker(), Peer()
    t.feed(np.concatenate([request(peer, 1, time_ns=5 * MS),
                           response(peer, 1, time_ns=305 * MS)]))
    latency = {key[7]: value for key, value in t.take_http().items() if key[4] == LATENCY}
    assert latency == {histogram.slot_of(300_000): 1, histogram.SUM_SLOT: 300_000}


def test_interim_responses_wait_for_the_final_one():
    t, peer = tracker(), Peer()
    t.feed(np.concatenate([request(peer, 1), response(peer, 1, "100"),
                           response(peer, 1, "200")]))
    assert requests(t) == {(GET, 200): 1}


def test_grpc_status_comes_from_the_trailers_and_latency_is_the_whole_call():
    t, peer = tracker(), Peer()
    t.feed(np.concatenate([request(peer, 1, 0, grpc=True),
                           response(peer, 1, time_ns=1 * MS, grpc=True),
                           trailers(peer, 1, 5, time_ns=40 * MS)]))
    assert requests(t) == {(POST, 200): 1}
    grpc = t.take_grpc()
    assert {k[5]: v for k, v in grpc.items() if k[4] == REQUEST} == {"NOT_FOUND": 1}
    assert {k[6]: v for k, v in grpc.items() if k[4] == LATENCY} == {
        histogram.slot_of(40_000): 1, histogram.SUM_SLOT: 40_000}


def test_a_trailers_only_response_and_trailers_without_a_status():
    t, peer = tracker(), Peer()
    only = peer.headers(1, 1, [(":status", "200"), ("grpc-status", "14")], end_stream=True)
    t.feed(np.concatenate([request(peer, 1, grpc=True), only,
                           request(peer, 3, grpc=True), response(peer, 3, grpc=True),
                           trailers(peer, 3, None)]))
    assert calls(t) == {"UNAVAILABLE": 1, "none": 1}


@pytest.mark.parametrize("value, name", [(b"0", "OK"), (b"16", "UNAUTHENTICATED"),
                                         (b"17", "other"), (b"x", "other"), (None, "none")])
def test_grpc_status_names(value: bytes | None, name: str):
    assert grpc_status_name(value) == name


def test_reset_streams_goaway_and_the_end_count_none():
    t, peer = tracker(), Peer()
    t.feed(peer.frame(1, SETTINGS, 0, 0, b""))
    rst = peer.frame(0, RST_STREAM, 0, 1, struct.pack(">I", 8))
    goaway = peer.frame(1, GOAWAY, 0, 0, struct.pack(">II", 3, 0))
    t.feed(np.concatenate([request(peer, 1), rst, request(peer, 3), request(peer, 5, grpc=True),
                           goaway, request(peer, 7), peer.record(RECORD_END)]))
    assert requests(t) == {(GET, STATUS_NONE): 3, (POST, STATUS_NONE): 1}
    assert calls(t) == {"none": 1}
    assert t.conns == {}


def test_a_block_in_pieces_and_continuation_frames_decode_as_one():
    t, peer = tracker(), Peer()
    long_headers = [(":method", "GET"), (":scheme", "http"), (":path", "/ok"),
                    (":authority", "b"), ("x-filler", "y" * 700)]
    block = peer.encoders[0].encode(long_headers)
    first, rest = block[:300], block[300:]
    t.feed(np.concatenate([peer.frame(0, HEADERS, 0, 1, first),
                           peer.frame(0, CONTINUATION, END_HEADERS, 1, rest),
                           response(peer, 1)]))
    assert requests(t) == {(GET, 200): 1}


def test_padding_is_stripped():
    t, peer = tracker(), Peer()
    block = peer.encoders[0].encode([(":method", "GET"), (":path", "/")])
    padded = bytes([4]) + block + bytes(4)
    t.feed(np.concatenate([peer.frame(0, HEADERS, END_HEADERS | PADDED, 1, padded),
                           response(peer, 1)]))
    assert requests(t) == {(GET, 200): 1}


def test_the_dynamic_table_carries_across_requests_and_the_cache_keeps_it_exact():
    """The same request headers again are table references; a new value is added to the
    table, and blocks that reference it decode to it, cached or not."""
    t, peer = tracker(), Peer()
    stream = 1
    for path, method in [("/a", "GET"), ("/a", "GET"), ("/b", "DELETE"), ("/b", "DELETE"),
                         ("/a", "GET")] * 20:
        t.feed(np.concatenate([request(peer, stream, method=method, path=path),
                               response(peer, stream, "204" if method == "DELETE" else "200")]))
        stream += 2
    assert requests(t) == {(GET, 200): 60, (5 | VERSION_2, 204): 40}


def test_lost_client_records_stop_decoding_requests_but_not_counting_them():
    """Records of the client's direction found the ring full: its table is unknown from then
    on. Its later requests still count, method other, and on a connection that carried gRPC
    as gRPC calls; the server's direction still decodes their answers."""
    t, peer = tracker(), Peer()
    t.feed(np.concatenate([peer.frame(1, SETTINGS, 0, 0, b""), request(peer, 1),
                           request(peer, 3, grpc=True)]))
    later = request(peer, 5, grpc=True)
    later["lost_before"] = 1
    t.feed(np.concatenate([later, response(peer, 1), response(peer, 5, grpc=True),
                           trailers(peer, 5, 14), response(peer, 7, "503", end_stream=True),
                           peer.record(RECORD_END)]))
    other = METHOD_OTHER | VERSION_2
    # 1: decoded both ways; 3: never answered; 5: its request undecoded, its answer decoded;
    # 7: its request lost with the records, its answer seen
    assert requests(t) == {(GET, 200): 1, (POST, STATUS_NONE): 1, (other, 200): 1,
                           (other, 503): 1}
    # 7 is a gRPC call too (the connection carries gRPC), ended without a grpc-status
    assert calls(t) == {"none": 2, "UNAVAILABLE": 1}
    assert t.take_parse_errors() == 1


def test_lost_server_records_make_waiting_and_later_answers_unknown():
    t, peer = tracker(), Peer()
    t.feed(np.concatenate([peer.frame(1, SETTINGS, 0, 0, b""), request(peer, 1, grpc=True),
                           request(peer, 3)]))
    gap = peer.record(RECORD_LOST, 1)
    t.feed(np.concatenate([gap, request(peer, 5, grpc=True), response(peer, 5, grpc=True),
                           trailers(peer, 5, 0, time_ns=2 * MS), peer.record(RECORD_END)]))
    # 1 and 3 were waiting when the server's records went: unknown; 5 was answered, how is
    # unknown, but when is known
    assert requests(t) == {(POST, STATUS_UNKNOWN): 2, (GET, STATUS_UNKNOWN): 1}
    assert calls(t) == {"unparsed": 2}
    assert t.take_parse_errors() == 1


def test_a_block_past_the_kernels_capture_stops_decoding_its_direction():
    t, peer = tracker(), Peer()
    block = peer.encoders[0].encode([(":method", "GET"), ("x-big", "z" * 2000)])
    t.feed(peer.frame(1, SETTINGS, 0, 0, b""))
    t.feed(peer.frame(0, HEADERS, END_HEADERS, 1, block, capture=1024))
    t.feed(np.concatenate([request(peer, 3), response(peer, 1, "204"), response(peer, 3),
                           peer.record(RECORD_END)]))
    other = METHOD_OTHER | VERSION_2
    assert requests(t) == {(other, 204): 1, (other, 200): 1}
    assert t.take_parse_errors() == 1


def test_an_undecodable_block_is_a_parse_error():
    t, peer = tracker(), Peer()
    t.feed(request(peer, 1))
    t.feed(peer.frame(1, HEADERS, END_HEADERS, 1, bytes([0xBF, 0xFF, 0xFF, 0x7F])))
    assert requests(t) == {(GET, STATUS_UNKNOWN): 1}
    assert t.take_parse_errors() == 1


def test_a_response_to_no_request_is_a_parse_error():
    t, peer = tracker(), Peer()
    t.feed(response(peer, 9))
    assert requests(t) == {}
    assert t.take_parse_errors() == 1


def test_the_kernel_lost_its_state_either_way_round():
    t, peer = tracker(), Peer()
    t.feed(request(peer, 1))
    gone = peer.record(RECORD_LOST, SIDE_UNKNOWN)
    # the sender's view: the server's segment, so its addresses come swapped
    gone["client"], gone["server"] = gone["server"].copy(), gone["client"].copy()
    gone["client_port"], gone["server_port"] = 50051, peer.client_port
    t.feed(gone)
    assert requests(t) == {(GET, STATUS_UNKNOWN): 1}
    assert t.conns == {}


def test_streams_past_the_bound_count_untracked():
    t, peer = Http2Tracker(max_streams=2, idle_ns=10**12), Peer()
    t.feed(np.concatenate([request(peer, 1), request(peer, 3), request(peer, 5, grpc=True),
                           response(peer, 1)]))
    assert requests(t) == {(GET, 200): 1, (POST, STATUS_UNTRACKED): 1}
    assert calls(t) == {"untracked": 1}


def test_idle_connections_are_swept():
    t, peer = Http2Tracker(max_streams=10, idle_ns=5 * MS), Peer()
    t.feed(np.concatenate([peer.frame(1, SETTINGS, 0, 0, b"", time_ns=1 * MS),
                           request(peer, 1, time_ns=1 * MS)]))
    t.sweep(4 * MS)
    assert requests(t) == {}
    t.sweep(7 * MS)
    assert requests(t) == {(GET, STATUS_NONE): 1}
    assert t.conns == {}


def test_a_larger_table_size_setting_is_followed():
    """The server allows a larger table: the client's encoder may then send a size update
    past hpack's default bound of 4096."""
    t, peer = tracker(), Peer()
    t.feed(peer.frame(1, SETTINGS, 0, 0, struct.pack(">HI", 1, 65536)))
    peer.encoders[0].header_table_size = 65536
    t.feed(np.concatenate([request(peer, 1), response(peer, 1)]))
    assert requests(t) == {(GET, 200): 1}
    assert t.take_parse_errors() == 0


def test_a_header_block_cut_short_by_the_end_is_a_parse_error():
    t, peer = tracker(), Peer()
    block = peer.encoders[0].encode([(":method", "GET"), (":path", "/")])
    t.feed(np.concatenate([peer.frame(0, HEADERS, 0, 1, block), peer.record(RECORD_END)]))
    assert requests(t) == {}
    assert t.take_parse_errors() == 1


@pytest.mark.parametrize("path, label", [
    (b"/shop.v1.Cart/Add", "/shop.v1.Cart/Add"), (b"/grpc.health.v1.Health/Check", "other"),
    (b"/shop.v1.Cart", "other"), (b"/shop.v1.Cart/Add/x", "other"), (b"/\xff/x", "other"),
    (b"", "other")])
def test_the_grpc_method_label_names_allowlisted_services(path: bytes, label: str):
    assert GrpcMethodLabel(["shop.*", "billing.Invoices"])(path) == label


def test_grpc_counts_keep_the_path_only_with_the_method_label():
    peer = Peer()
    for methods, kept in [(False, b""), (True, b"/test.Echo/Unary")]:
        t = Http2Tracker(max_streams=10, idle_ns=10**12, grpc_methods=methods)
        t.feed(np.concatenate([request(peer, 1, grpc=True), response(peer, 1, grpc=True),
                               trailers(peer, 1, 0)]))
        assert {key[7] for key in t.take_grpc()} == {kept}
        peer = Peer()


def test_requests_of_a_connection_whose_server_never_spoke_are_unknown():
    """The server's direction was not followed (its replies came from an address the kernel
    could not tie to the connection): its answers are unknown, not none."""
    t, peer = tracker(), Peer()
    t.feed(np.concatenate([request(peer, 1), peer.record(RECORD_END)]))
    assert requests(t) == {(GET, STATUS_UNKNOWN): 1}
    assert t.take_parse_errors() == 1


def test_blocks_that_read_no_dynamic_entry_replay_their_table_changes():
    """A server that adds each response header to its table and never refers to it (nginx):
    the same block again is taken from the cache, and its additions still reach the table, so
    a block that refers to them decodes right."""
    t, peer = tracker(), Peer()
    # :status 200 (static), then content-type: application/grpc as a literal with incremental
    # indexing, its name by static index 31, its value a plain string
    value = b"application/grpc"
    literal = bytes([0x88, 0x40 | 31, len(value)]) + value
    for stream in (1, 3, 5):
        t.feed(np.concatenate([request(peer, stream), peer.frame(1, HEADERS, END_HEADERS,
                                                                  stream, literal)]))
    assert requests(t) == {(GET, 200): 3}
    decoder = next(iter(t.conns.values())).decoders[1]
    assert list(decoder._independent) == [literal]          # decoded once
    assert len(decoder.table.dynamic_entries) == 3          # added three times
    # index 62, the newest entry, and 64, the oldest: both content-type
    assert decoder.decode(bytes([0x88, 0x80 | 62, 0x80 | 64])) == {
        b":status": b"200", b"content-type": value}
    assert t.take_parse_errors() == 0
