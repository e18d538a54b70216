"""The socket fields bpf/tcp.c reads (BTF member paths and sizes), the flags they become, and
the tick rate."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest

from exporter import config
from exporter.kernel import bpfsys, btf, jiffies, programs, sockfields
from tests.btftools import BtfWriter


def _btf_bytes() -> bytes:
    """struct inet_connection_sock { u32 pad; struct { u32 pad; u32 lrcvtime; } icsk_ack; };
    struct tcp_sock { struct inet_connection_sock inet_conn; const __u16 port;
    u32 srtt_us; u32 flag:1; }; with __u16 a typedef of u16 (the bitfield starts on a byte, so
    only its size in BTF tells it is one)."""
    w = BtfWriter([b"u16", b"u32", b"__u16", b"inet_connection_sock", b"icsk_ack", b"lrcvtime",
                   b"pad", b"tcp_sock", b"inet_conn", b"port", b"srtt_us", b"flag"])
    w.add(btf.KIND_INT, 0, 2, b"u16", struct.pack("<I", 16))                          # 1
    w.add(btf.KIND_INT, 0, 4, b"u32", struct.pack("<I", 32))                          # 2
    w.add(btf.KIND_TYPEDEF, 0, 1, b"__u16")                                           # 3
    w.add(btf.KIND_CONST, 0, 3)                                                       # 4
    w.add(btf.KIND_STRUCT, 2, 8, items=w.member(b"pad", 2, 0) + w.member(b"lrcvtime", 2, 32))
    w.add(btf.KIND_STRUCT, 2, 12, b"inet_connection_sock",                            # 6
          w.member(b"pad", 2, 0) + w.member(b"icsk_ack", 5, 32))
    w.add(btf.KIND_STRUCT, 4, 24, b"tcp_sock",                                        # 7
          w.member(b"inet_conn", 6, 0) + w.member(b"port", 4, 96)
          + w.member(b"srtt_us", 2, 128) + w.member(b"flag", 2, (1 << 24) | 160), kind_flag=1)
    return w.blob()


def test_member_paths_give_offsets_and_sizes_through_nested_and_qualified_types():
    table = btf.Btf(_btf_bytes())
    assert table.member("tcp_sock", "inet_conn.icsk_ack.lrcvtime") == (8, 4)
    assert table.member("tcp_sock", "srtt_us") == (16, 4)
    assert table.member("tcp_sock", "port") == (12, 2)          # const typedef of u16
    assert table.member("tcp_sock", "inet_conn") == (0, 12)
    with pytest.raises(btf.BtfError, match="has no member nope"):
        table.member("tcp_sock", "inet_conn.icsk_ack.nope")
    with pytest.raises(btf.BtfError, match="not a struct or union"):
        table.member("tcp_sock", "srtt_us.low")
    with pytest.raises(btf.BtfError, match="bitfield"):
        table.member("tcp_sock", "flag")


def test_the_running_kernels_socket_fields_have_the_sizes_the_program_reads():
    if not btf.VMLINUX.exists():
        pytest.skip("no kernel BTF on this machine")
    located = sockfields.offsets(btf.kernel_btf())
    assert set(located) == set(sockfields.FIELDS)
    assert located["SK_REMOTE_ADDR"] + 4 == located["SK_LOCAL_ADDR"]    # skc_addrpair


def test_a_field_of_another_size_is_refused(monkeypatch: pytest.MonkeyPatch):
    table = btf.Btf(_btf_bytes())
    monkeypatch.setattr(sockfields, "FIELDS", {"TCP_SRTT_US": ("tcp_sock", "srtt_us", 8)})
    with pytest.raises(btf.BtfError, match="is 4 bytes, not 8"):
        sockfields.offsets(table)


@pytest.mark.parametrize(("ticks", "hz"), [(25, 250), (26, 250), (30, 300), (100, 1000),
                                           (10, 100), (24, 250), (48, 480)])
def test_ticks_over_a_tenth_of_a_second_snap_to_a_configurable_rate(ticks: int, hz: int):
    assert jiffies.rate((0, 1000), (100_000_000, 1000 + ticks)) == hz


def test_clocks_that_did_not_advance_are_an_error():
    with pytest.raises(jiffies.JiffiesError, match="did not advance"):
        jiffies.rate((5, 7), (5, 7))


@pytest.mark.parametrize(("seconds", "hz", "window"), [(1.0, 250, 250), (2.0, 1000, 2000),
                                                       (0.001, 250, 1), (1e9, 1000, 1 << 31)])
def test_the_sampling_window_is_a_whole_number_of_ticks_within_bounds(seconds: float, hz: int,
                                                                       window: int):
    assert sockfields.window_jiffies(seconds, hz) == window


def _tcp_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, interval: str) -> list[str]:
    reset = tmp_path / "tcp" / "tcp_send_reset"
    reset.mkdir(parents=True)
    (reset / "format").write_text("\tfield:__u8 saddr[28];\n")
    monkeypatch.setattr(programs, "TRACEFS_EVENTS", tmp_path)
    return programs.tcp_program_flags(config.load(None, {}, {"tcp.rtt_sample_interval":
                                                              interval}))


def _kernel_with_srtt(monkeypatch: pytest.MonkeyPatch, atomics: bool) -> None:
    """A kernel whose BTF locates tcp_sock.srtt_us (at 16), whose socket head is 18 bytes,
    and whose BPF has compare-and-swap or not."""
    monkeypatch.setattr(btf, "kernel_btf", lambda: btf.Btf(_btf_bytes()))
    monkeypatch.setattr(sockfields, "FIELDS", {"TCP_SRTT_US": ("tcp_sock", "srtt_us", 4)})
    monkeypatch.setattr(sockfields, "head_bytes", lambda located: 18)
    monkeypatch.setattr(bpfsys, "has_atomics", lambda: atomics)


def test_the_located_fields_are_compiled_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    _kernel_with_srtt(monkeypatch, atomics=True)
    flags = _tcp_flags(monkeypatch, tmp_path, "2s")
    start = flags.index(sockfields.ENABLED_FLAG)
    assert flags[start:start + 3] == [
        "-DWITH_SOCK_FIELDS", "-DSK_HEAD_BYTES=18", "-DTCP_SRTT_US=16"]
    assert "-DTCP_SEND_RESET_SOCKADDR" in flags
    assert "-DMARK_GROUPS=65536" in flags       # tcp_sockets' default 131072, two marks each


def test_a_kernel_without_bpf_atomics_keeps_every_socket_in_the_map(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    _kernel_with_srtt(monkeypatch, atomics=False)
    flags = _tcp_flags(monkeypatch, tmp_path, "2s")
    assert sockfields.ENABLED_FLAG in flags
    assert not [f for f in flags if "MARK" in f]


def test_rtt_sampling_off_leaves_tcp_probe_out_and_keeps_the_socket_fields(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    _kernel_with_srtt(monkeypatch, atomics=True)
    assert sockfields.CLOSE_ONLY_FLAG not in _tcp_flags(monkeypatch, tmp_path / "on", "1s")
    flags = _tcp_flags(monkeypatch, tmp_path / "off", "off")
    assert sockfields.CLOSE_ONLY_FLAG in flags
    assert sockfields.ENABLED_FLAG in flags     # the RTT at close still reads the socket


def test_socket_marks_are_twice_the_sockets_in_groups_of_four_within_a_bound():
    assert [programs.mark_groups(c) for c in (1, 2, 3, 8, 9, 131072, 131073)] == [
        1, 1, 2, 4, 8, 65536, 131072]
    assert programs.mark_groups(16777216) == programs.MAX_MARK_GROUPS == 1 << 18


def test_the_endpoints_read_in_one_go_must_lie_near_the_start_of_the_socket():
    located = {"SK_FAMILY": 16, "SK_LOCAL_PORT": 14, "SK_REMOTE_PORT": 12, "SK_LOCAL_ADDR": 4,
               "SK_REMOTE_ADDR": 0}
    assert sockfields.head_bytes(located) == 18
    with pytest.raises(btf.BtfError, match="span 74 bytes"):
        sockfields.head_bytes({**located, "SK_FAMILY": 72})


def test_without_btf_the_tcp_program_has_no_rtt_and_the_log_says_why(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    def no_btf() -> btf.Btf:
        raise btf.BtfError("/sys/kernel/btf/vmlinux: No such file or directory")

    monkeypatch.setattr(btf, "kernel_btf", no_btf)
    caplog.set_level(logging.WARNING, logger="ebpf_net_exporter.main")
    flags = _tcp_flags(monkeypatch, tmp_path, "1s")
    assert not [f for f in flags if "RTT" in f]
    assert flags[:2] == ["-DEVENT_CAPACITY=65536", "-DSOCKET_CAPACITY=131072"]
    [record] = [r for r in caplog.records if "ebpf_net_tcp_rtt_seconds" in r.getMessage()]
    assert "vmlinux: No such file" in record.__dict__["error"]
