"""Network-namespace "test node" for kernel tests, the demo and benchmarks.

Topology of one :class:`TestNode` (N is a per-instance subnet octet)::

    pod a netns          node netns                          pod b netns
    eth0 10.N.1.2  ---  <p>va 10.N.1.1    <p>vb 10.N.2.1  ---  eth0 10.N.2.2
    fd00:N:1::2         fd00:N:1::1       fd00:N:2::1          fd00:N:2::2
                        <p>vh 10.N.0.2  ---  <p>h 10.N.0.1  (root netns, only
                                                             with host_link)

Naming scheme: every instance gets the prefix ``ent<pid>x<ctr>``, where <pid>
is the full decimal PID of the creating process and <ctr> a one or two
character base-36 per-process counter. PIDs have at most 7 digits
(pid_max <= 4194304), so the longest interface name (``ent4194304xzzvh``) is
15 characters. Namespaces are ``<p>-node``, ``<p>-a`` and ``<p>-b``; node-side
veths ``<p>va``, ``<p>vb`` and ``<p>vh``; pod-side veths are ``eth0`` inside
each pod; the optional root-namespace link is ``<p>h``. Pod veths are created
directly inside the namespaces, so only ``<p>h`` ever exists in the root
namespace. :class:`tests.testcluster.TestCluster` draws its prefixes from the
same scheme (namespaces ``<p>-n1``, ``<p>-n2``, ``<p>-1a`` ... ``<p>-2b``, all
links inside them). :func:`cleanup_stale` parses <pid> back out of these names and
removes leftovers of processes that no longer exist.

Process and server helpers (``run``, ``spawn``, ``http_server``, ``nginx``, ...)
live in the :class:`NetnsProcesses` mixin, shared with TestCluster.

Servers are considered ready once their socket shows up in the namespace's
``/proc/net/{tcp,udp}[6]`` tables, so readiness checks send no traffic.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from exporter.environment import pid_alive

__all__ = [
    "HTTP_DATA_SIZE",
    "HTTP_INDEX_BODY",
    "NetnsProcesses",
    "TestNode",
    "cleanup_stale",
    "connect_refused",
    "in_netns",
    "tcp_connections",
    "tcp_transfer",
    "udp_send",
]

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
SYS_NET_DIR = "/sys/class/net"
HTTP_DATA_SIZE = 1 << 20
HTTP_INDEX_BODY = "<html><body>ebpf-net-exporter test node</body></html>\n"
SOCKET_TIMEOUT = 10.0
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

_PREFIX_RE = r"ent(\d+)x[0-9a-z]{1,2}"
# TestNode's <p>-node/-a/-b and TestCluster's <p>-n1/-n2 (nodes) and <p>-1a ... <p>-2b (pods)
_STALE_NS_RE = re.compile(rf"^{_PREFIX_RE}-(?:node|a|b|n[12]|[12][ab])$")
_STALE_LINK_RE = re.compile(rf"^{_PREFIX_RE}h$")
_STALE_TMP_RE = re.compile(rf"^{_PREFIX_RE}-")
_LOCK_PATH = "/run/ent-testnode.lock"
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

_HTTP_SERVER_CODE = """\
import functools, http.server, socket, socketserver, sys
addr, port, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)  # no getfqdn()
        self.server_name, self.server_port = addr, port

handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
print(f"Serving HTTP on {addr} port {port} from {root}", flush=True)
Server((addr, port), handler).serve_forever()
"""



def nginx_config(root: str, listens: Sequence[str], locations: Mapping[str, int],
                 prefixes: Mapping[str, int] | None = None, http_extra: str = "",
                 server_extra: str = "") -> str:
    """An nginx.conf with every path (pid, logs, temp dirs) inside ``root``: a server on each
    of ``listens`` ("10.1.2.2:80", "[fd00::2]:80", "10.1.2.2:443 ssl") answering ``return
    CODE`` for each exact location and each location prefix, 404 for everything else.
    http_extra and server_extra: directives for the http and server blocks."""
    returns = "".join(
        f"        location = {path} {{ return {code}; }}\n" for path, code in locations.items()
    ) + "".join(
        f"        location {path} {{ return {code}; }}\n"
        for path, code in (prefixes or {}).items()
    )
    temp = " ".join(
        f"{kind}_temp_path {root}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    servers = "".join(f"        listen {listen};\n" for listen in listens)
    return f"""\
user root;
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{}}
http {{
    access_log off;
    {temp}
    {http_extra}
    server {{
{servers}{returns}        {server_extra}
        location / {{ return 404; }}
    }}
}}
"""


_counter = itertools.count()
_state_lock = threading.Lock()
_used_subnets: set[int] = set()

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


# --------------------------------------------------------------------------
# namespace switching


def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace open as ``fd``."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with the calling thread in netns ``/run/netns/<name>``.

    The thread's original namespace is restored on exit. Sockets created
    inside the block stay in ``name`` afterwards.
    """
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(orig)
    finally:
        os.close(orig)


# --------------------------------------------------------------------------
# subprocess helpers


def _run(
    cmd: Sequence[str], check: bool = True, timeout: float = 30, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """subprocess.run with text output captured and stderr attached to errors."""
    kw.setdefault("text", True)
    if not {"stdout", "stderr", "capture_output"} & kw.keys():
        kw["capture_output"] = True
    if "input" not in kw:
        kw.setdefault("stdin", subprocess.DEVNULL)
    try:
        return subprocess.run(list(cmd), check=check, timeout=timeout, **kw)
    except subprocess.CalledProcessError as exc:
        exc.add_note(f"stderr: {(exc.stderr or '').strip()}")
        raise


def _ip(*args: str, check: bool = True, stdin: str | None = None) -> None:
    """Run ``ip ARGS`` in the root namespace (or ``ip -n NS`` via args)."""
    if stdin is None:
        _run(["ip", *args], check=check)
    else:
        _run(["ip", *args], check=check, input=stdin)


def _terminate(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM ``proc`` by PID, wait ``timeout`` s, then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout)


# --------------------------------------------------------------------------
# naming, subnets, stale cleanup


def _b36(n: int) -> str:
    """Base-36 digits of a non-negative integer."""
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _B36[r] + out
        if n == 0:
            return out


def _new_prefix() -> str:
    """A prefix ``ent<pid>x<ctr>`` not used by any live namespace or link."""
    pid = os.getpid()
    with _state_lock:
        for _ in range(36 * 36):
            prefix = f"ent{pid}x{_b36(next(_counter) % (36 * 36))}"
            if not (
                os.path.exists(os.path.join(NETNS_DIR, f"{prefix}-node"))
                or os.path.exists(os.path.join(NETNS_DIR, f"{prefix}-n1"))
                or os.path.exists(os.path.join(SYS_NET_DIR, f"{prefix}h"))
            ):
                return prefix
    raise RuntimeError("no free test node prefix left in this process")


def _root_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Destinations of all routes (all tables, v4 and v6) in the root netns."""
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for fam in ("-4", "-6"):
        out = _run(["ip", "-j", fam, "route", "show", "table", "all"]).stdout
        for route in json.loads(out or "[]"):
            dst = route.get("dst", "default")
            if dst == "default":
                continue
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.ip_network(dst, strict=False))
    return nets


def _pick_subnet() -> int:
    """Pick N so 10.N.0.0/16 and fd00:N::/32 overlap no root route or instance."""
    nets = _root_networks()
    start = 200 + os.getpid() % 50
    candidates = [*range(start, 250), *range(200, start), *range(100, 200)]
    with _state_lock:
        for n in candidates:
            if n in _used_subnets:
                continue
            v4 = ipaddress.ip_network(f"10.{n}.0.0/16")
            v6 = ipaddress.ip_network(f"fd00:{n}::/32")
            if any(net.overlaps(v4) for net in nets if net.version == 4) or any(
                net.overlaps(v6) for net in nets if net.version == 6
            ):
                continue
            _used_subnets.add(n)
            return n
    raise RuntimeError("no free 10.N.0.0/16 subnet for a test node")


@contextlib.contextmanager
def _host_lock() -> Iterator[None]:
    """Cross-process lock held while choosing N and creating the host link."""
    with open(_LOCK_PATH, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cleanup_stale() -> list[str]:
    """Delete namespaces/links/temp dirs left by dead processes; return their names.

    Only names matching this module's scheme whose encoded PID is not alive
    are touched. Processes still running inside such a namespace (servers
    orphaned by a killed run) are SIGKILLed by PID first.
    """
    removed: list[str] = []
    if os.path.isdir(SYS_NET_DIR):
        for name in sorted(os.listdir(SYS_NET_DIR)):
            m = _STALE_LINK_RE.match(name)
            if m and not pid_alive(int(m[1])):
                _ip("link", "del", name, check=False)
                removed.append(name)
    if os.path.isdir(NETNS_DIR):
        for name in sorted(os.listdir(NETNS_DIR)):
            m = _STALE_NS_RE.match(name)
            if not m or pid_alive(int(m[1])):
                continue
            pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    tmp = tempfile.gettempdir()
    for name in sorted(os.listdir(tmp)):
        m = _STALE_TMP_RE.match(name)
        path = os.path.join(tmp, name)
        if m and os.path.isdir(path) and not pid_alive(int(m[1])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


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


# --------------------------------------------------------------------------
# readiness checks


def _proc_addr(hexaddr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Decode an address from /proc/net/{tcp,udp}[6] (32-bit words, host order)."""
    raw = bytes.fromhex(hexaddr)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def _bound(ns: str, addr: str, port: int, udp: bool = False) -> bool:
    """True if a TCP listener (or bound UDP socket) on addr:port exists in ns."""
    want = ipaddress.ip_address(addr)
    table = ("udp" if udp else "tcp") + ("6" if want.version == 6 else "")
    state = "07" if udp else "0A"
    with in_netns(ns), open(f"/proc/thread-self/net/{table}") as fh:
        lines = fh.read().splitlines()[1:]
    for line in lines:
        fields = line.split()
        local_addr, _, local_port = fields[1].partition(":")
        if fields[3] != state or int(local_port, 16) != port:
            continue
        have = _proc_addr(local_addr)
        if have == want or have.is_unspecified:
            return True
    return False


def _operstate(ns: str, dev: str) -> str:
    """Operstate of ``dev`` in ``ns`` ("" = root namespace), e.g. "UP"."""
    where = ["-n", ns] if ns else []
    out = _run(["ip", "-j", *where, "link", "show", "dev", dev], check=False).stdout
    try:
        return str(json.loads(out)[0]["operstate"])
    except (ValueError, LookupError):
        return ""


def _tail(path: str, limit: int = 2000) -> str:
    """The last ``limit`` characters of a log file (or "")."""
    try:
        with open(path, errors="replace") as fh:
            return fh.read()[-limit:]
    except OSError:
        return ""


# --------------------------------------------------------------------------
# processes and servers in namespaces (shared by TestNode and TestCluster)


class NetnsProcesses:
    """Start, wait for and stop processes and servers inside network namespaces.

    A mixin: the class using it sets :attr:`tmpdir` (server roots and logs go there)
    and :attr:`_procs` (processes still to stop), and calls :meth:`_stop_processes`
    when it is torn down.
    """

    tmpdir: str
    _procs: list[subprocess.Popen[Any]]

    def _stop_processes(self) -> None:
        """Stop every process still running (each by its PID); never raises."""
        for proc in list(self._procs):
            with contextlib.suppress(Exception):
                self.stop(proc)

    # ---- processes ---------------------------------------------------------

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 30,
        **kw: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in namespace ``ns`` and wait; output captured as text."""
        return _run(["ip", "netns", "exec", ns, *argv], check, timeout, **kw)

    def spawn(self, ns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``ns`` in the background; stopped on close()."""
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **popen_kwargs)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any]) -> None:
        """SIGTERM ``proc`` by PID, wait 5 s, then SIGKILL; forget it."""
        try:
            _terminate(proc)
        finally:
            with contextlib.suppress(ValueError):
                self._procs.remove(proc)

    @contextlib.contextmanager
    def nameserver(self, ns: str, addr: str) -> Iterator[None]:
        """The C library resolver of programs run in ``ns`` asks ``addr`` (``ip netns exec``
        binds /etc/netns/NS/resolv.conf over /etc/resolv.conf) while the block runs."""
        resolv = os.path.join("/etc/netns", ns, "resolv.conf")
        os.makedirs(os.path.dirname(resolv), exist_ok=True)
        with open(resolv, "w") as fh:
            fh.write(f"nameserver {addr}\noptions attempts:1 timeout:2\n")
        try:
            yield
        finally:
            os.unlink(resolv)
            os.rmdir(os.path.dirname(resolv))

    def nft(self, ns: str, ruleset: str) -> None:
        """Load an nftables ruleset (``nft -f -``) into namespace ``ns``."""
        self.run(ns, ["nft", "-f", "-"], input=ruleset)

    # ---- servers -----------------------------------------------------------

    def _spawn_logged(
        self, ns: str, argv: Sequence[str], name: str
    ) -> tuple[subprocess.Popen[Any], str]:
        fd, log = tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=self.tmpdir)
        with os.fdopen(fd, "w") as fh:
            proc = self.spawn(ns, argv, stdout=fh, stderr=subprocess.STDOUT)
        return proc, log

    def _wait_ready(
        self,
        proc: subprocess.Popen[Any],
        ready: Callable[[], bool],
        what: str,
        log: str,
    ) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if proc.poll() is not None:
                self.stop(proc)
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
            if ready():
                return
            if time.monotonic() > deadline:
                self.stop(proc)
                raise RuntimeError(f"{what} not ready after {READY_TIMEOUT}s:\n{_tail(log)}")
            time.sleep(0.01)

    def http_server(self, ns: str, addr: str, port: int) -> subprocess.Popen[Any]:
        """An http.server on addr:port serving a dir with index.html + data.bin.

        It is ``python3 -m http.server`` minus the reverse DNS lookup of the bind
        address (``getfqdn``) that stock HTTPServer does at startup, which would
        send DNS queries out of the namespace towards the host's resolver.
        """
        root = tempfile.mkdtemp(prefix="http-", dir=self.tmpdir)
        with open(os.path.join(root, "data.bin"), "wb") as fh:
            fh.write(bytes(HTTP_DATA_SIZE))
        with open(os.path.join(root, "index.html"), "w") as fh:
            fh.write(HTTP_INDEX_BODY)
        argv = [sys.executable, "-c", _HTTP_SERVER_CODE, addr, str(port), root]
        proc, log = self._spawn_logged(ns, argv, "http")
        self._wait_ready(proc, lambda: _bound(ns, addr, port), f"http.server {addr}:{port}", log)
        return proc

    def dns_server(self, ns: str, addr: str, records: Mapping[str, str]) -> subprocess.Popen[Any]:
        """dnsmasq answering ``records`` (name -> IP) on addr:53 (UDP+TCP) only.

        No upstream servers, no /etc/hosts; queries are logged to a file in
        :attr:`tmpdir`.
        """
        queries = os.path.join(self.tmpdir, f"dnsmasq-{addr.replace(':', '_')}.queries.log")
        argv = [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            f"--listen-address={addr}",
            "--port=53",
            "--pid-file=",
            "--user=root",
            f"--log-facility={queries}",
            "--log-queries",
            *(f"--address=/{name}/{ip}" for name, ip in records.items()),
        ]
        proc, log = self._spawn_logged(ns, argv, "dnsmasq")
        self._wait_ready(
            proc,
            lambda: _bound(ns, addr, 53, udp=True) and _bound(ns, addr, 53),
            f"dnsmasq {addr}",
            log,
        )
        return proc

    def iperf3_server(self, ns: str, addr: str, port: int = 5201) -> subprocess.Popen[Any]:
        """iperf3 -s bound to addr:port."""
        argv = ["iperf3", "-s", "-B", addr, "-p", str(port)]
        proc, log = self._spawn_logged(ns, argv, "iperf3")
        self._wait_ready(proc, lambda: _bound(ns, addr, port), f"iperf3 {addr}:{port}", log)
        return proc

    def nginx(
        self, ns: str, addr: str, port: int, locations: Mapping[str, int]
    ) -> subprocess.Popen[Any]:
        """A real nginx on addr:port answering ``return CODE`` for each exact location
        (path -> status code) and 404 for everything else.

        It runs as root in the foreground with every path (pid, logs, temp dirs) in a
        directory of its own under :attr:`tmpdir`, so it touches nothing of the host's.
        """
        root = tempfile.mkdtemp(prefix="nginx-", dir=self.tmpdir)
        conf = os.path.join(root, "nginx.conf")
        with open(conf, "w") as fh:
            listen = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
            fh.write(nginx_config(root, [listen], locations))
        # -e: the error log before the config is read is ours too, not /var/log/nginx's
        argv = ["nginx", "-c", conf, "-p", root, "-e", os.path.join(root, "error.log")]
        proc, log = self._spawn_logged(ns, argv, "nginx")
        self._wait_ready(proc, lambda: _bound(ns, addr, port), f"nginx {addr}:{port}", log)
        return proc


# --------------------------------------------------------------------------
# the test node


class NetnsLab(NetnsProcesses):
    """A topology of network namespaces built once and torn down once, whatever happens in
    between: TestNode and TestCluster. A subclass names everything in its constructor
    (:attr:`prefix`, and the :attr:`namespaces` it will make), creates it all in
    :meth:`_create` after a subnet is reserved with :meth:`_reserve_subnet`, and may remove
    what lives outside its namespaces in :meth:`_remove_outside`."""

    prefix: str
    n: int
    _built: bool
    _subnet_reserved: bool

    @property
    def namespaces(self) -> Sequence[str]:
        raise NotImplementedError

    def _create(self) -> None:
        raise NotImplementedError

    def _remove_outside(self) -> None:
        """What close() removes besides the namespaces (nothing by default)."""

    def __enter__(self) -> Self:
        return self.build()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def build(self) -> Self:
        """Create everything (:meth:`_create`); on any failure, tear down what was made."""
        if self._built:
            raise RuntimeError(f"{self!r} was already built")
        self._built = True
        try:
            with contextlib.suppress(Exception):
                cleanup_stale()
            self.tmpdir = tempfile.mkdtemp(prefix=f"{self.prefix}-")
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def _reserve_subnet(self) -> int:
        """A subnet octet no other topology of this process or a live one uses."""
        n = _pick_subnet()
        self.n = n
        self._subnet_reserved = True
        return n

    def close(self) -> None:
        """Tear everything down; idempotent and safe after a partial build. Namespaces go
        in reverse order (pods before their node)."""
        try:
            self._stop_processes()
        finally:
            self._remove_outside()
            for ns in reversed(self.namespaces):
                if os.path.exists(os.path.join(NETNS_DIR, ns)):
                    _ip("netns", "del", ns, check=False)
            if self.tmpdir:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = ""
            if self._subnet_reserved:
                with _state_lock:
                    _used_subnets.discard(self.n)
                self._subnet_reserved = False


class TestNode(NetnsLab):
    """Node + two pod network namespaces joined by veth pairs (see module doc)."""

    __test__ = False  # not a pytest test class

    # exported as methods too, for convenience
    tcp_transfer = staticmethod(tcp_transfer)
    tcp_connections = staticmethod(tcp_connections)
    udp_send = staticmethod(udp_send)
    connect_refused = staticmethod(connect_refused)

    def __init__(self, host_link: bool = False) -> None:
        """Name everything; nothing is created until :meth:`build`."""
        self.host_link = host_link
        self.prefix = _new_prefix()
        self.node_ns = f"{self.prefix}-node"
        self.a_ns = f"{self.prefix}-a"
        self.b_ns = f"{self.prefix}-b"
        self.veth_a = f"{self.prefix}va"
        self.veth_b = f"{self.prefix}vb"
        self.veth_h = f"{self.prefix}vh"
        self.host_if = f"{self.prefix}h"
        self.n = 0
        self._subnet_reserved = False
        self.a_ip = self.b_ip = self.a_ip6 = self.b_ip6 = ""
        self.node_ip_a = self.node_ip_b = self.node_ip6_a = self.node_ip6_b = ""
        self.host_ip = self.node_host_ip = ""
        self.tmpdir = ""
        self._procs: list[subprocess.Popen[Any]] = []
        self._built = False

    def __repr__(self) -> str:
        return f"TestNode(prefix={self.prefix!r}, n={self.n})"

    # ---- lifecycle ---------------------------------------------------------

    @property
    def namespaces(self) -> tuple[str, str, str]:
        """(node_ns, a_ns, b_ns)."""
        return (self.node_ns, self.a_ns, self.b_ns)

    def _create(self) -> None:
        """Namespaces, veths, addresses, routes; verify a->b (v4+v6)."""
        lock = _host_lock() if self.host_link else contextlib.nullcontext()
        with lock:
            self._set_subnet(self._reserve_subnet())
            self._build_namespaces()
            if self.host_link:
                self._build_host_link()
            self._bring_up()
        self._verify_connectivity()

    def _remove_outside(self) -> None:
        """The root namespace's end of the host link (with host_link)."""
        if os.path.exists(os.path.join(SYS_NET_DIR, self.host_if)):
            _ip("link", "del", self.host_if, check=False)

    def _set_subnet(self, n: int) -> None:
        self.node_ip_a, self.a_ip = f"10.{n}.1.1", f"10.{n}.1.2"
        self.node_ip_b, self.b_ip = f"10.{n}.2.1", f"10.{n}.2.2"
        self.node_ip6_a, self.a_ip6 = f"fd00:{n}:1::1", f"fd00:{n}:1::2"
        self.node_ip6_b, self.b_ip6 = f"fd00:{n}:2::1", f"fd00:{n}:2::2"
        self.host_ip, self.node_host_ip = f"10.{n}.0.1", f"10.{n}.0.2"

    def _build_namespaces(self) -> None:
        no_dad = [
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.default.router_solicitations=0",
        ]
        forwarding = ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]
        for ns in self.namespaces:
            _ip("netns", "add", ns)
            extra = forwarding if ns == self.node_ns else []
            self.run(ns, ["sysctl", "-qw", *no_dad, *extra])
        va, vb = self.veth_a, self.veth_b
        _ip(
            "-n",
            self.node_ns,
            "-batch",
            "-",
            stdin=(
                "link set lo up\n"
                f"link add {va} type veth peer name eth0 netns {self.a_ns}\n"
                f"link add {vb} type veth peer name eth0 netns {self.b_ns}\n"
                f"addr add {self.node_ip_a}/24 dev {va}\n"
                f"addr add {self.node_ip_b}/24 dev {vb}\n"
                f"addr add {self.node_ip6_a}/64 dev {va} nodad\n"
                f"addr add {self.node_ip6_b}/64 dev {vb} nodad\n"
            ),
        )
        pods = (
            (self.a_ns, self.a_ip, self.a_ip6, self.node_ip_a, self.node_ip6_a),
            (self.b_ns, self.b_ip, self.b_ip6, self.node_ip_b, self.node_ip6_b),
        )
        for ns, ip4, ip6, gw4, gw6 in pods:
            _ip(
                "-n",
                ns,
                "-batch",
                "-",
                stdin=(
                    "link set lo up\n"
                    f"addr add {ip4}/24 dev eth0\n"
                    f"addr add {ip6}/64 dev eth0 nodad\n"
                    "link set eth0 up\n"
                    f"route add default via {gw4}\n"
                    f"route add ::/0 via {gw6}\n"
                ),
            )

    def _build_host_link(self) -> None:
        peer = ["peer", "name", self.veth_h, "netns", self.node_ns]
        _ip("link", "add", self.host_if, "type", "veth", *peer)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.node_ns, "addr", "add", f"{self.node_host_ip}/30", "dev", self.veth_h)

    def _node_links(self) -> list[str]:
        links = [self.veth_a, self.veth_b]
        return [*links, self.veth_h] if self.host_link else links

    def _bring_up(self) -> None:
        """Bring the node-side veths up in one burst, then wait for operstate UP.

        Pod ends are already up, so all carrier changes happen within
        microseconds and are usually handled by a single linkwatch run (which
        the kernel rate-limits to one per second).
        """
        _ip(
            "-n",
            self.node_ns,
            "-batch",
            "-",
            stdin="".join(f"link set {dev} up\n" for dev in self._node_links()),
        )
        want = [(ns, "eth0") for ns in (self.a_ns, self.b_ns)]
        want += [(self.node_ns, dev) for dev in self._node_links()]
        if self.host_link:
            want.append(("", self.host_if))
        deadline = time.monotonic() + READY_TIMEOUT
        while want:
            want = [(ns, dev) for ns, dev in want if _operstate(ns, dev) != "UP"]
            if want and time.monotonic() > deadline:
                raise RuntimeError(f"{self!r}: links not UP after {READY_TIMEOUT}s: {want}")
            if want:
                time.sleep(0.02)

    def _verify_connectivity(self) -> None:
        """One ping/echo TCP connection a->b over v4 and v6, else RuntimeError."""
        for addr in (self.b_ip, self.b_ip6):
            srv = _listener(self.b_ns, addr, 0)
            try:
                port = srv.getsockname()[1]
                _tcp_echo_on(srv, self.a_ns, addr, port, 1)
            except Exception as exc:
                state = "\n".join(
                    self.run(ns, ["ip", "-br", "addr"], check=False).stdout
                    for ns in self.namespaces
                )
                raise RuntimeError(
                    f"{self!r}: no TCP connectivity {self.a_ns} -> {addr}: {exc!r}\n{state}"
                ) from exc
            finally:
                _close_listener(srv)
