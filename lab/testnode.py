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
namespace. :class:`lab.testcluster.TestCluster` draws its prefixes from the
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
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

from lab.netns import (
    FORWARDING_SYSCTLS,
    LAB_NS_SYSCTLS,
    NETNS_DIR,
    SYS_NET_DIR,
    _host_lock,
    _ip,
    _new_prefix,
    _operstate,
    _pick_subnet,
    _state_lock,
    _used_subnets,
    cleanup_stale,
    in_netns,
)
from lab.servers import (
    HTTP_DATA_SIZE,
    HTTP_INDEX_BODY,
    READY_TIMEOUT,
    NetnsProcesses,
    nginx_config,
)
from lab.traffic import (
    _close_listener,
    _listener,
    _tcp_echo_on,
    connect_refused,
    tcp_connections,
    tcp_transfer,
    udp_send,
)

__all__ = [
    "HTTP_DATA_SIZE",
    "HTTP_INDEX_BODY",
    "NETNS_DIR",
    "NetnsProcesses",
    "TestNode",
    "cleanup_stale",
    "connect_refused",
    "in_netns",
    "nginx_config",
    "tcp_connections",
    "tcp_transfer",
    "udp_send",
]




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
        for ns in self.namespaces:
            _ip("netns", "add", ns)
            extra = FORWARDING_SYSCTLS if ns == self.node_ns else ()
            self.run(ns, ["sysctl", "-qw", *LAB_NS_SYSCTLS, *extra])
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
