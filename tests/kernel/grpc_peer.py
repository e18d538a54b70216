"""A gRPC server or client for the HTTP/2 tests (grpcio, insecure channel), with raw-bytes
generic handlers so no generated code is needed.

    grpc_peer.py serve HOST PORT            serves until killed; prints "ready" once listening
    grpc_peer.py call HOST PORT PLAN...     runs the calls of PLAN on one channel and prints
                                            each call's status code name, one per line
    grpc_peer.py loop HOST PORT FAULT_FILE  a unary OK call every 50 ms until killed, and one
                                            answered UNAVAILABLE beside it while FAULT_FILE
                                            exists

PLAN items: unary:CODE (the server answers with that code, OK returns a message),
stream:N (a server stream of N messages, OK), slow (the server waits SLOW_SECONDS, OK),
deadline (slow, with a deadline of DEADLINE_SECONDS), many:N (N unary OK calls at once on the
channel, so on one connection), pause (until a line comes on stdin)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

SLOW_SECONDS = 0.3
DEADLINE_SECONDS = 0.1
SERVICE = "test.Echo"


def _identity(data: bytes) -> bytes:
    return data


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    code = grpc.StatusCode[request.decode()]
    if code is not grpc.StatusCode.OK:
        context.abort(code, f"asked for {code.name}")
    return b"answer"


def _slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    time.sleep(SLOW_SECONDS)
    return b"late"


def _stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield f"part {i}".encode()


def serve(host: str, port: int) -> None:
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary, _identity, _identity),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow, _identity, _identity),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream, _identity, _identity),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def call(host: str, port: int, plan: list[str]) -> None:
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary", _identity, _identity)
        slow = channel.unary_unary(f"/{SERVICE}/Slow", _identity, _identity)
        stream = channel.unary_stream(f"/{SERVICE}/Stream", _identity, _identity)
        for item in plan:
            kind, _, arg = item.partition(":")
            payload = arg.encode()
            calls: list[Callable[[], object]] = []
            if kind == "unary":
                calls = [lambda p=payload: unary(p, timeout=10)]
            elif kind == "stream":
                calls = [lambda p=payload: list(stream(p, timeout=10))]
            elif kind == "slow":
                calls = [lambda: slow(b"", timeout=10)]
            elif kind == "deadline":
                calls = [lambda: slow(b"", timeout=DEADLINE_SECONDS)]
            elif kind == "pause":          # until a line on stdin
                sys.stdin.readline()
            elif kind == "many":
                pending = [unary.future(b"OK", timeout=10) for _ in range(int(arg))]
                calls = [p.result for p in pending]
            for run in calls:
                try:
                    run()
                    print("OK", flush=True)
                except grpc.RpcError as e:
                    print(e.code().name, flush=True)


def loop(host: str, port: int, fault_file: str) -> None:
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary", _identity, _identity)
        while True:
            for code in ["OK", *(["UNAVAILABLE"] if os.path.exists(fault_file) else [])]:
                try:
                    unary(code.encode(), timeout=10)
                except grpc.RpcError as e:   # the asked-for failure, or a passing one: go on
                    if code == "OK":
                        print(f"grpc_peer loop: {e.code().name}", file=sys.stderr, flush=True)
            time.sleep(0.05)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "loop":
        loop(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        call(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
