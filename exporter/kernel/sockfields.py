"""What bpf/tcp.c reads of a TCP socket beyond its tracepoints' arguments, located in the
running kernel: member offsets from its BTF (the headers bcc compiles with may be another
kernel's), given to the program as -D flags as CO-RE relocations would be; and its tick rate,
written to the loaded program's rtt_window_jiffies.

With them the program samples RTT from the socket itself and tells why a connect failed at its
close (see bpf/tcp.c, WITH_SOCK_FIELDS); without BTF there is no RTT histogram, and the other TCP
metrics are unchanged."""

from __future__ import annotations

from typing import Any

from .. import logs
from . import btf, jiffies

log = logs.get("tcp")

# the -D flag that turns on the programs' socket reads (bpf/tcp.c)
ENABLED_FLAG = "-DWITH_SOCK_FIELDS"
CLOSE_ONLY_FLAG = "-DNO_RTT_IN_FLIGHT"   # tcp.rtt_sample_interval: off (bpf/tcp.c: no tcp_probe)
# flag: (struct, member path, bytes the program reads)
FIELDS = {
    "SK_PROTOCOL": ("sock", "sk_protocol", 2),                   # a bitfield before 5.6
    "SK_FAMILY": ("sock", "__sk_common.skc_family", 2),
    "SK_LOCAL_PORT": ("sock", "__sk_common.skc_num", 2),         # host order
    "SK_REMOTE_PORT": ("sock", "__sk_common.skc_dport", 2),      # network order
    "SK_LOCAL_ADDR": ("sock", "__sk_common.skc_rcv_saddr", 4),
    "SK_REMOTE_ADDR": ("sock", "__sk_common.skc_daddr", 4),
    "SK_LOCAL_ADDR6": ("sock", "__sk_common.skc_v6_rcv_saddr", 16),
    "SK_REMOTE_ADDR6": ("sock", "__sk_common.skc_v6_daddr", 16),
    "SK_ERR": ("sock", "sk_err", 4),                             # set before the close
    # network order; unlike skc_num, still the local port when the close is traced
    "INET_SOURCE_PORT": ("inet_sock", "inet_sport", 2),
    "TCP_TOTAL_RETRANS": ("tcp_sock", "total_retrans", 4),       # SYNs too
    "TCP_SRTT_US": ("tcp_sock", "srtt_us", 4),                   # srtt << 3, microseconds
    "TCP_RCV_TSTAMP": ("tcp_sock", "rcv_tstamp", 4),             # jiffies of the last ACK in
    "TCP_DATA_RCV_TSTAMP": ("tcp_sock", "inet_conn.icsk_ack.lrcvtime", 4),  # of the last data
}


class SockFieldsError(Exception):
    pass


def offsets(table: btf.Btf) -> dict[str, int]:
    found = {}
    for flag, (struct_name, path, size) in FIELDS.items():
        offset, actual = table.member(struct_name, path)
        if actual != size:
            raise btf.BtfError(f"struct {struct_name}.{path} is {actual} bytes, not {size}")
        found[flag] = offset
    return found


# read together in one bpf_probe_read_kernel from the start of the socket (bpf/tcp.c)
HEAD_FIELDS = ("SK_FAMILY", "SK_LOCAL_PORT", "SK_REMOTE_PORT", "SK_LOCAL_ADDR", "SK_REMOTE_ADDR")
HEAD_LIMIT = 64


def head_bytes(located: dict[str, int]) -> int:
    """Bytes from the start of the socket that hold HEAD_FIELDS."""
    end = max(located[flag] + FIELDS[flag][2] for flag in HEAD_FIELDS)
    if end > HEAD_LIMIT:
        raise btf.BtfError(f"the socket's endpoints span {end} bytes, more than {HEAD_LIMIT}")
    return end


def program_flags() -> list[str]:
    """-D flags that let bpf/tcp.c read the socket (RTT, connect failures) through raw
    tracepoints; SockFieldsError says why they cannot be had."""
    try:
        located = offsets(btf.kernel_btf())
        head = head_bytes(located)
    except btf.BtfError as e:
        raise SockFieldsError(str(e)) from e
    return [ENABLED_FLAG, f"-DSK_HEAD_BYTES={head}",
            *(f"-D{flag}={offset}" for flag, offset in located.items())]


def window_jiffies(interval_seconds: float, hz: int) -> int:
    """At least a tick; at most 2^31 ticks, so that windows of the 32-bit jiffies still turn."""
    return min(max(1, round(interval_seconds * hz)), 1 << 31)


def start_rtt_sampling(program: Any, interval_seconds: float) -> int:
    """Measures the tick rate with the loaded program and gives it its sampling window, which
    turns on in-flight RTT samples; the window in jiffies. JiffiesError when the rate cannot
    be measured (then RTT is sampled at close only)."""
    hz = jiffies.kernel_hz(program)
    window = window_jiffies(interval_seconds, hz)
    table = program.table("rtt_window_jiffies")
    table[table.Key(0)] = table.Leaf(window)
    log.info("RTT sampling window", extra={"hz": hz, "jiffies": window})
    return window
