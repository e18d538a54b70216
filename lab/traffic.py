"""Traffic between namespaces of the lab, with counts the tests check: TCP transfers and
connections, UDP datagrams, refused connections."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from lab.netns import _run, in_netns

SOCKET_TIMEOUT = 10.0
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)



# --------------------------------------------------------------------------
# exact-byte traffic helpers


def _family(addr: str) -> socket.AddressFamily:
    """AF_INET or AF_INET6 for an IP address literal."""
    if ipaddress.ip_address(addr).version == 6:
        return socket.AF_INET6
    return socket.AF_INET


def _socket(ns: str, addr: str, kind: socket.SocketKind) -> socket.socket:
    """A socket of ``addr``'s family created in namespace ``ns``."""
    with in_netns(ns):
        sock = socket.socket(_family(addr), kind)
    sock.settimeout(SOCKET_TIMEOUT)
    return sock


def _listener(ns: str, addr: str, port: int) -> socket.socket:
    """A TCP socket listening on (addr, port) in namespace ``ns``."""
    srv = _socket(ns, addr, socket.SOCK_STREAM)
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((addr, port))
        srv.listen(128)
    except BaseException:
        srv.close()
        raise
    return srv


def _close_listener(srv: socket.socket) -> None:
    """Shut down (waking a blocked accept) and close a listening socket."""
    with contextlib.suppress(OSError):
        srv.shutdown(socket.SHUT_RDWR)
    srv.close()


class _Worker(threading.Thread):
    """Thread running ``fn(*args)``, keeping its result or exception."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        super().__init__(daemon=True)
        self._fn = fn
        self._args = args
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._fn(*self._args)
        except BaseException as exc:  # re-raised in finish()
            self.error = exc

    def finish(self, timeout: float = SOCKET_TIMEOUT + 5) -> Any:
        """Join; re-raise the thread's exception; return its result."""
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError("traffic helper server thread did not finish")
        if self.error is not None:
            raise self.error
        return self.result


def _accept(srv: socket.socket) -> socket.socket:
    conn, _ = srv.accept()
    conn.settimeout(SOCKET_TIMEOUT)
    return conn


class _TransferProgress:
    """How far a :func:`tcp_transfer` got, for the message when it times out."""

    def __init__(self) -> None:
        self.client = "connecting"
        self.server = "accepting"
        self.sent = 0
        self.received = 0


def _count_until_eof(srv: socket.socket, progress: _TransferProgress | None = None) -> int:
    """Accept one connection, read until EOF, close; return bytes read."""
    progress = progress or _TransferProgress()
    conn = _accept(srv)
    progress.server = "reading"
    buf = bytearray(1 << 16)
    with conn:
        while n := conn.recv_into(buf):
            progress.received += n
    progress.server = "closed"
    return progress.received


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def _echo_server(srv: socket.socket, count: int, size: int) -> int:
    """Serve ``count`` connections: echo ``size`` bytes, wait for EOF, close."""
    for _ in range(count):
        conn = _accept(srv)
        with conn:
            conn.sendall(_recv_exact(conn, size))
            if conn.recv(1) != b"":
                raise AssertionError("client sent more than expected")
    return count


def _stall_report(client_ns: str, server_ns: str, port: int,
                  progress: _TransferProgress) -> str:
    """Where a timed-out transfer was, with `ss` of its sockets in both namespaces (state,
    queues, rto, retransmits, windows; not the earlier transfers' TIME_WAIT) and the CPUs'
    backlog drops (softnet_stat's second column), so a stall says whether the sender, the
    receiver or the path held it up."""
    parts = [f"client {progress.client} ({progress.sent} bytes sent), server "
             f"{progress.server} ({progress.received} bytes read)"]
    for role, ns in (("client", client_ns), ("server", server_ns)):
        ss = _run(["ip", "netns", "exec", ns, "ss", "-tinmo", "exclude", "time-wait",
                   f"( sport = :{port} or dport = :{port} )"], check=False, timeout=5)
        parts.append(f"ss in {role} namespace: {' '.join((ss.stdout + ss.stderr).split())}")
    with contextlib.suppress(OSError):
        with open("/proc/net/softnet_stat") as f:
            drops = [int(line.split()[1], 16) for line in f]
        parts.append(f"backlog drops per CPU: {drops}")
    return "; ".join(parts)


def tcp_transfer(client_ns: str, server_ns: str, server_addr: str, port: int, nbytes: int) -> None:
    """Send exactly ``nbytes`` over one TCP connection client_ns -> server_ns.

    The client shuts down its write side after sending, the server reads to
    EOF and closes, then the client closes. Raises AssertionError if the
    server did not receive exactly ``nbytes``.
    """
    progress = _TransferProgress()
    srv = _listener(server_ns, server_addr, port)
    try:
        cli = _socket(client_ns, server_addr, socket.SOCK_STREAM)
        worker = _Worker(_count_until_eof, srv, progress)
        worker.start()
        with cli:
            try:
                cli.connect((server_addr, port))
                progress.client = "sending"
                chunk = memoryview(bytes(min(nbytes, 1 << 16)))
                while progress.sent < nbytes:
                    step = min(nbytes - progress.sent, len(chunk))
                    cli.sendall(chunk[:step])
                    progress.sent += step
                cli.shutdown(socket.SHUT_WR)
                progress.client = "waiting for the server's close"
                if cli.recv(1) != b"":
                    raise AssertionError("server sent data in tcp_transfer")
            except TimeoutError as exc:
                # where each end was, and the sockets as the kernel has them (before the close)
                raise TimeoutError(f"{exc}; {_stall_report(client_ns, server_ns, port, progress)}"
                                   ) from exc
        got = worker.finish()
    finally:
        _close_listener(srv)
    if got != nbytes:
        raise AssertionError(f"server received {got} bytes, expected {nbytes}")


def _tcp_echo_on(srv: socket.socket, client_ns: str, addr: str, port: int, count: int) -> None:
    """Client side of :func:`tcp_connections` against an existing listener."""
    worker = _Worker(_echo_server, srv, count, 4)
    worker.start()
    fam = _family(addr)
    with in_netns(client_ns):
        for i in range(count):
            with socket.socket(fam, socket.SOCK_STREAM) as cli:
                cli.settimeout(SOCKET_TIMEOUT)
                cli.connect((addr, port))
                cli.sendall(b"ping")
                if _recv_exact(cli, 4) != b"ping":
                    raise AssertionError(f"bad echo on connection {i}")
    worker.finish()


def tcp_connections(
    client_ns: str, server_ns: str, server_addr: str, port: int, count: int
) -> None:
    """Make ``count`` sequential TCP connections, each a 4-byte ping/echo.

    The client closes first (so TIME_WAIT lands on the client side).
    """
    srv = _listener(server_ns, server_addr, port)
    try:
        _tcp_echo_on(srv, client_ns, server_addr, port, count)
    finally:
        _close_listener(srv)


def _recv_datagrams(srv: socket.socket, expected: int) -> int:
    """Receive until ``expected`` datagrams or the socket timeout; count."""
    buf = bytearray(1 << 16)
    got = 0
    while got < expected:
        try:
            srv.recv_into(buf)
        except TimeoutError:
            break
        got += 1
    return got


def udp_send(
    client_ns: str,
    server_ns: str,
    server_addr: str,
    port: int,
    payload_sizes: Sequence[int],
    *,
    timeout: float = 2.0,
    source: str | None = None,
) -> int:
    """Send one UDP datagram per size; return how many the server received.

    The receiver gives up after ``timeout`` seconds without a datagram. ``source``
    picks the client's address when its interface has several.
    """
    srv = _socket(server_ns, server_addr, socket.SOCK_DGRAM)
    with srv:
        with contextlib.suppress(OSError):
            srv.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 8 << 20)
        srv.bind((server_addr, port))
        srv.settimeout(timeout)
        worker = _Worker(_recv_datagrams, srv, len(payload_sizes))
        worker.start()
        with _socket(client_ns, server_addr, socket.SOCK_DGRAM) as cli:
            if source:
                cli.bind((source, 0))
            for size in payload_sizes:
                cli.sendto(bytes(size), (server_addr, port))
        return int(worker.finish(timeout + SOCKET_TIMEOUT))


def connect_refused(client_ns: str, addr: str, port: int, count: int) -> None:
    """Make ``count`` TCP connects to a closed port; each must be refused."""
    fam = _family(addr)
    with in_netns(client_ns):
        for i in range(count):
            with socket.socket(fam, socket.SOCK_STREAM) as cli:
                cli.settimeout(SOCKET_TIMEOUT)
                try:
                    cli.connect((addr, port))
                except ConnectionRefusedError:
                    continue
                raise AssertionError(f"connect #{i} to {addr}:{port} succeeded")
