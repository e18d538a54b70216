"""Network namespaces for the lab: entering one from a thread, running commands in one, the
names every lab topology draws (``ent<pid>x<ctr>``), the subnets they reserve, a lock for what
touches the root namespace, removing what dead processes left behind, and reading a
namespace's sockets and links (readiness without traffic)."""

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
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from exporter.kernel.environment import pid_alive

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
SYS_NET_DIR = "/sys/class/net"
STOP_TIMEOUT = 5.0
# every lab namespace: IPv6 addresses usable at once, no router solicitations, and Reno
# whatever the host's default: a BBR connection that lived through a test's 20 % packet loss
# can keep a bandwidth estimate of a few packets a second long after the loss has stopped.
# (Reno, since a namespace may only choose from net.ipv4.tcp_allowed_congestion_control,
# which always has it and need not have CUBIC.)
LAB_NS_SYSCTLS = ("net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
                  "net.ipv6.conf.default.router_solicitations=0",
                  "net.ipv4.tcp_congestion_control=reno")
# a namespace that routes between others (a node)
FORWARDING_SYSCTLS = ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")

_PREFIX_RE = r"ent(\d+)x[0-9a-z]{1,2}"
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
# leftovers from a process that no longer exists: its namespaces, root-namespace links, temp dirs
_STALE_NS_RE = re.compile(rf"^{_PREFIX_RE}-(?:node|a|b|n[12]|[12][ab])$")
_STALE_LINK_RE = re.compile(rf"^{_PREFIX_RE}h$")
_STALE_TMP_RE = re.compile(rf"^{_PREFIX_RE}-")
_LOCK_PATH = "/run/ent-testnode.lock"

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


