"""One exporter per network namespace.

Two exporters on one node would each attach to the same interfaces; the second one's filters
replace the first one's (same handle and priority), so the first silently stops counting and
nothing says so. The second one therefore refuses to start, naming the first.

The claim is an abstract Unix socket: its name lives in the network namespace (so exporters in
different namespaces, like the test nodes, do not see each other), it needs no writable
directory and no privilege, and the kernel releases it when its holder dies, even by SIGKILL:
no stale lock to clean up."""

from __future__ import annotations

import errno
import socket
import struct

CLAIM_NAME = b"\0ebpf-net-exporter"


class AlreadyRunning(Exception):
    """Another exporter holds this network namespace; the message names its PID."""


def claim_netns(name: bytes = CLAIM_NAME) -> socket.socket:
    """Holds the claim for as long as the returned socket stays open."""
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        claim.bind(name)
    except OSError as e:
        claim.close()
        if e.errno != errno.EADDRINUSE:
            raise
        holder = _holder(name)
        who = f" (pid {holder})" if holder else ""
        raise AlreadyRunning(
            f"another ebpf-net-exporter{who} already monitors this network namespace: two "
            "would replace each other's filters; stop it first") from None
    claim.listen(1)     # lets a second exporter ask who holds it (SO_PEERCRED)
    return claim


def _holder(name: bytes) -> int | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(name)
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                     struct.calcsize("3i"))
        except OSError:
            return None
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid or None
