"""exporter/tcx.py and bpfsys's tcx calls against the real kernel: the probe both ways, links
that run the program on a test node's veth, and what a missing interface gives."""

from __future__ import annotations

import errno
import os

import pytest

from benchmarks.kernel_cost import FLOOR_FUNCTION, FLOOR_SOURCE, run_time_statistics
from exporter import bpfsys
from exporter.interfaces import Link
from exporter.tcx import TcxAttacher
from tests.exporter_process import ifindex, tcx_links
from tests.testnode import TestNode, in_netns, udp_send

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def floor(kernel_ready):
    """A TC program that returns TC_ACT_UNSPEC at once, with run-count accounting to read."""
    import bcc

    bpf = bcc.BPF(src_file=str(FLOOR_SOURCE).encode())
    yield bpf.load_func(FLOOR_FUNCTION.encode(), bcc.BPF.SCHED_CLS)
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
    """How often the program ran, from its fdinfo."""
    with open(f"/proc/self/fdinfo/{prog_fd}") as f:
        for line in f:
            if line.startswith("run_cnt:"):
                return int(line.split()[1])
    raise AssertionError("no run_cnt in the program's fdinfo")
