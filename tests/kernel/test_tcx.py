"""exporter/kernel/tcx.py and bpfsys's tcx calls against the real kernel: the probe both ways, links
that run the program on a test node's veth, the order of the exporter's links and a live
view's, and what a missing interface gives."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from benchmarks.kernel_cost import FLOOR_FUNCTION, FLOOR_SOURCE, run_time_statistics
from exporter.kernel import bpfsys
from exporter.kernel.interfaces import Link, TcAttacher
from exporter.kernel.tcx import TcxAttacher
from exporter.live.attach import LiveTcxAttacher
from lab.exporter_process import fd_info, filters_on, ifindex, tcx_links
from lab.testnode import TestNode, in_netns, udp_send

pytestmark = pytest.mark.kernel


def _floor_program():
    """A TC program that returns TC_ACT_UNSPEC at once, with run-count accounting to read."""
    import bcc

    bpf = bcc.BPF(src_file=str(FLOOR_SOURCE).encode())
    return bpf, bpf.load_func(FLOOR_FUNCTION.encode(), bcc.BPF.SCHED_CLS)


@pytest.fixture(scope="module")
def floor(kernel_ready):
    bpf, program = _floor_program()
    yield program
    bpf.cleanup()


@pytest.fixture(scope="module")
def second_floor(kernel_ready):
    """Another copy of the floor: the same code under another program id."""
    bpf, program = _floor_program()
    yield program
    bpf.cleanup()


def test_the_probe_finds_tcx_here_and_not_where_the_attach_type_is_unknown(floor, monkeypatch):
    assert bpfsys.has_tcx(floor.fd)             # Linux 6.18
    # what a kernel before 6.6 answers for BPF_TCX_INGRESS: an attach type it does not know
    monkeypatch.setattr(bpfsys, "TCX_INGRESS", 99)
    assert not bpfsys.has_tcx(floor.fd)


def test_links_run_the_program_on_both_hooks_until_unlinked(floor, node: TestNode):
    index = ifindex(node, node.veth_a)
    link = Link(index, node.veth_a, True, "veth", None, None)
    with in_netns(node.node_ns):                # the index is the node namespace's
        attacher = TcxAttacher(floor.fd, floor.fd)
    try:
        with in_netns(node.node_ns):
            attacher.attach(link)
            attacher.attach(link)               # already linked: not doubled
        held = sorted((i, hook) for i, hook, _ in tcx_links(os.getpid()))
        assert held == [(index, "egress"), (index, "ingress")]
        assert attacher.linked() == {index}
        with run_time_statistics():             # the kernel counts runs only with these on
            before = _run_count(floor.fd)
            assert udp_send(node.a_ns, node.b_ns, node.b_ip, 7440, [64] * 20) == 20
            ran = _run_count(floor.fd) - before
        # ingress of veth_a: the 20 datagrams at least (and whatever neighbour traffic)
        assert ran >= 20
        attacher.detach(link)
        assert tcx_links(os.getpid()) == []
        assert attacher.linked() == set()
    finally:
        attacher.close()


def test_a_live_views_links_go_after_the_exporters_and_leave_its_clsact_filter(
        floor, second_floor, node: TestNode):
    """The exporter's programs run first whichever started first, and a live view on tcx
    beside an exporter on clsact removes nothing of it (only dead views' filters)."""
    index = ifindex(node, node.veth_a)
    link = Link(index, node.veth_a, True, "veth", None, None)
    with in_netns(node.node_ns):
        exporter_clsact = TcAttacher(floor.fd, floor.fd)
        exporter_tcx = TcxAttacher(floor.fd, floor.fd)
        live = LiveTcxAttacher(second_floor.fd, second_floor.fd)
    try:
        with in_netns(node.node_ns):
            exporter_clsact.attach(link)
            live.attach(link)
        assert filters_on(node, [node.veth_a]) == {f"{node.veth_a} ingress": 1,
                                                   f"{node.veth_a} egress": 1}
        with in_netns(node.node_ns):
            exporter_tcx.link_programs(link)     # after the view: placed first all the same
            order = {hook: _tcx_program_ids(index, hook)
                     for hook in (bpfsys.TCX_INGRESS, bpfsys.TCX_EGRESS)}
        ids = _program_id(floor.fd), _program_id(second_floor.fd)
        assert order == {bpfsys.TCX_INGRESS: list(ids), bpfsys.TCX_EGRESS: list(ids)}
    finally:
        live.close()
        exporter_tcx.close()
        with in_netns(node.node_ns):
            exporter_clsact.detach(link)
        exporter_clsact.close()
    assert tcx_links(os.getpid()) == []
    assert set(filters_on(node, [node.veth_a]).values()) == {0}


def test_an_interface_that_is_gone_is_enodev_and_leaves_nothing_linked(floor, node: TestNode):
    with in_netns(node.node_ns):
        attacher = TcxAttacher(floor.fd, floor.fd)
        gone = Link(10_000, "gone", True, "veth", None, None)
        try:
            with pytest.raises(OSError) as raised:
                attacher.link_programs(gone)
        finally:
            attacher.close()
    assert raised.value.errno == errno.ENODEV
    assert attacher.linked() == set() and tcx_links(os.getpid()) == []


def _run_count(prog_fd: int) -> int:
    """How often the program ran."""
    return int(fd_info(os.getpid(), prog_fd)["run_cnt"])


def _program_id(prog_fd: int) -> int:
    return int(fd_info(os.getpid(), prog_fd)["prog_id"])


PROG_QUERY = 16


class _TcxQueryAttr(ctypes.Structure):
    """union bpf_attr as BPF_PROG_QUERY reads it for a tcx hook (include/uapi/linux/bpf.h)."""
    _fields_ = [("target_ifindex", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("count", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32), ("prog_attach_flags", ctypes.c_uint64),
                ("link_ids", ctypes.c_uint64), ("link_attach_flags", ctypes.c_uint64),
                ("revision", ctypes.c_uint64)]


def _tcx_program_ids(index: int, attach_type: int) -> list[int]:
    """The programs on an interface's tcx hook, in the order they run (this thread's netns)."""
    ids = (ctypes.c_uint32 * 16)()
    attr = _TcxQueryAttr(target_ifindex=index, attach_type=attach_type,
                         prog_ids=ctypes.addressof(ids), count=len(ids))
    bpfsys.bpf(PROG_QUERY, attr, "BPF_PROG_QUERY")
    return list(ids[:attr.count])
