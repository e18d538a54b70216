"""The kernel programs' needs, in one place for the exporter and the live view: the tracepoints
each one attaches to, the flags bpf/tcp.c is compiled with, and how the classifier goes onto
interfaces. (The classifier's flags are exporter/kernel/classifier.py's, the HTTPS program's
exporter/kernel/tlsprobes.py's, the drops program's exporter/collectors/drops.py's.)"""

from __future__ import annotations

import platform
from collections.abc import Callable

from .. import logs
from ..collectors import tcp as tcp_collector
from ..config import Config
from ..errors import StartupError
from . import bpfsys, environment, sockfields
from .interfaces import Attacher, TcAttacher
from .loader import index_flags
from .tcx import TcxAttacher

log = logs.get("main")

TRACEFS_EVENTS = environment.TRACEFS / "events"
TCP_TRACEPOINTS = ("sock/inet_sock_set_state", "tcp/tcp_retransmit_skb", "tcp/tcp_receive_reset",
                   "tcp/tcp_send_reset", "tcp/tcp_probe")
# where a server socket's process is known (bpf/tcp.c, -DWITH_PROCESS); Linux >= 6.3
PROCESS_TRACEPOINTS = ("sock/sock_send_length", "sock/sock_recv_length")


def choose_attacher(mode: str, ingress_fd: int, egress_fd: int,
                    tcx_attacher: Callable[[int, int], Attacher] = TcxAttacher,
                    clsact_attacher: Callable[[int, int], Attacher] = TcAttacher,
                    ) -> Callable[[], Attacher]:
    """How the classifier goes onto interfaces (interfaces.attach): tcx links where the kernel
    has them (auto, tcx), else clsact filters. The live view passes its own two kinds."""
    tcx = bpfsys.has_tcx(ingress_fd)
    if mode == "tcx" and not tcx:
        raise StartupError(f"interfaces.attach: tcx needs Linux 6.6 or newer (this kernel is "
                           f"{platform.release()}); use auto or clsact")
    if mode == "clsact" or not tcx:
        log.info("attaching with clsact filters", extra={
            "reason": "interfaces.attach: clsact" if tcx else "no tcx before Linux 6.6"})
        return lambda: clsact_attacher(ingress_fd, egress_fd)
    log.info("attaching with tcx links")
    return lambda: tcx_attacher(ingress_fd, egress_fd)


def missing_tracepoints(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if not (TRACEFS_EVENTS / name / "format").is_file()]


MAX_MARK_GROUPS = 1 << 18      # 8 MiB of marks, preallocated: past 1M sockets the hash takes over


def mark_groups(socket_capacity: int) -> int:
    """Groups of bpf/tcp.c's socket_marks (4 marks each, a power of two): twice as many marks as
    tcp_sockets holds entries, rounded up, so that few groups fill before the map would."""
    return min(max(1, 1 << max(socket_capacity - 1, 0).bit_length() >> 1), MAX_MARK_GROUPS)


def tcp_program_flags(config: Config) -> list[str]:
    flags = [f"-DEVENT_CAPACITY={config.maps.tcp_event_capacity}",
             f"-DSOCKET_CAPACITY={config.maps.tcp_socket_capacity}",
             *index_flags("FAILURE", [name for name, _ in tcp_collector.FAILURES])]
    try:
        flags += sockfields.program_flags()
    except sockfields.SockFieldsError as e:
        log.warning("cannot locate the socket fields RTT is read from: no "
                    "ebpf_net_tcp_rtt_seconds (the other TCP metrics are unaffected)",
                    extra={"error": str(e)})
    else:
        if not config.tcp.rtt_sample_interval:
            flags.append(sockfields.CLOSE_ONLY_FLAG)
        if bpfsys.has_atomics():
            flags += ["-DWITH_SOCKET_MARKS",
                      f"-DMARK_GROUPS={mark_groups(config.maps.tcp_socket_capacity)}"]
        else:
            log.info("the kernel's BPF has no compare-and-swap (Linux < 5.12): every TCP socket "
                     "is kept in the socket map, which costs more per connection")
    # kernels >= 6.10 give tcp_send_reset's addresses as sockaddrs of 28 bytes
    reset_format = TRACEFS_EVENTS / "tcp/tcp_send_reset/format"
    if "saddr[28]" in reset_format.read_text():
        flags.append("-DTCP_SEND_RESET_SOCKADDR")
    if config.tcp.process_label:
        flags.append("-DWITH_PROCESS")
    return flags
