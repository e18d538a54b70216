"""Faults a node agent meets: a second copy of itself, interfaces that vanish and come back
under traffic, a crash and restart, and nowhere to write its logs. (Stopping, kill -9 and
restart, and interfaces coming and going without traffic are in test_lifecycle.py.)"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from lab.exporter_process import (
    EXPORTER,
    REPO,
    ExporterProcess,
    Scrape,
    attachments_on,
    free_port,
    wait_until,
)
from lab.testnode import TestNode, in_netns, udp_send

pytestmark = pytest.mark.kernel


def test_a_second_exporter_in_the_same_netns_refuses_and_the_first_keeps_counting(
        node: TestNode):
    with ExporterProcess(node) as first:
        first.wait_ready()
        second = ExporterProcess(node)
        assert second.proc.wait(timeout=120) == 1
        second.stop()
        errors = [line for line in second.log().splitlines() if "level=error" in line]
        assert len(errors) == 1, second.log()
        assert f"another ebpf-net-exporter (pid {first.proc.pid}) already monitors this " \
               "network namespace" in errors[0]
        assert "Traceback" not in second.log()
        # the first one's filters are untouched and it still counts every packet
        assert set(attachments_on(node, [node.veth_a, node.veth_b]).values()) == {1}
        assert udp_send(node.a_ns, node.b_ns, node.b_ip, 7401, [64] * 20) == 20
        scrape = first.wait_for(lambda s: s.value("ebpf_net_flow_packets_total",
                                                  dst_port="7401") >= 20, "20 datagrams")
        assert scrape.value("ebpf_net_flow_packets_total", dst_port="7401") == 20
        assert first.stop() == 0


def recreate_pod_a_link(node: TestNode) -> None:
    """Deletes the veth pair of pod a (both ends go) and builds it again as TestNode does."""
    node.run(node.node_ns, ["ip", "link", "del", node.veth_a])
    node.run(node.node_ns, ["ip", "link", "add", node.veth_a, "type", "veth", "peer", "name",
                            "eth0", "netns", node.a_ns])
    node.run(node.node_ns, ["ip", "addr", "add", f"{node.node_ip_a}/24", "dev", node.veth_a])
    node.run(node.node_ns, ["ip", "link", "set", node.veth_a, "up"])
    node.run(node.a_ns, ["ip", "addr", "add", f"{node.a_ip}/24", "dev", "eth0"])
    node.run(node.a_ns, ["ip", "link", "set", "eth0", "up"])
    node.run(node.a_ns, ["ip", "route", "add", "default", "via", node.node_ip_a])


class Sender(threading.Thread):
    """UDP datagrams from pod a to pod b every millisecond until stopped; errors while the link
    is gone are expected and skipped."""

    def __init__(self, node: TestNode, port: int) -> None:
        super().__init__(daemon=True)
        self.node, self.port = node, port
        self.stopped = threading.Event()
        self.sent = 0

    def run(self) -> None:
        with in_netns(self.node.a_ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            while not self.stopped.wait(0.001):
                try:
                    sock.sendto(b"x" * 64, (self.node.b_ip, self.port))
                    self.sent += 1
                except OSError:
                    pass


def udp_flow(scrape, node: TestNode, port: int) -> float:
    return scrape.value("ebpf_net_flow_packets_total", src_ip=node.a_ip, dst_ip=node.b_ip,
                        dst_port=str(port), protocol="udp")


def test_an_interface_deleted_and_recreated_under_traffic_is_reattached_and_keeps_counting(
        node: TestNode):
    before_port, churn_port, after_port = 7411, 7412, 7413
    with ExporterProcess(node) as exporter:
        exporter.wait_ready()
        assert udp_send(node.a_ns, node.b_ns, node.b_ip, before_port, [64] * 50) == 50
        exporter.wait_for(lambda s: udp_flow(s, node, before_port) == 50, "50 datagrams")
        old_index = int(node.run(node.node_ns, ["cat", f"/sys/class/net/{node.veth_a}/ifindex"])
                        .stdout)
        sender = Sender(node, churn_port)
        sender.start()
        try:
            wait_until(lambda: sender.sent > 100, 10, "traffic to flow")
            recreate_pod_a_link(node)
            new_index = int(node.run(node.node_ns,
                                     ["cat", f"/sys/class/net/{node.veth_a}/ifindex"]).stdout)
            assert new_index != old_index
            wait_until(lambda: attachments_on(node, [node.veth_a]) ==
                       {f"{node.veth_a} ingress": 1, f"{node.veth_a} egress": 1}, 5,
                       "the new link to be attached")
            churn_before = sender.sent
            wait_until(lambda: sender.sent > churn_before + 200, 10, "traffic on the new link")
        finally:
            sender.stopped.set()
            sender.join()
        # traffic during the churn: counted while attached, never more than was sent
        scrape = exporter.wait_for(lambda s: udp_flow(s, node, churn_port) > 0, "churn traffic")
        assert 0 < udp_flow(scrape, node, churn_port) <= sender.sent
        # on the new link every datagram is counted again, exactly once
        assert udp_send(node.a_ns, node.b_ns, node.b_ip, after_port, [64] * 50) == 50
        scrape = exporter.wait_for(lambda s: udp_flow(s, node, after_port) >= 50, "50 more")
        assert udp_flow(scrape, node, after_port) == 50
        # and the counts from before the link went away are still there (no reset)
        assert udp_flow(scrape, node, before_port) == 50
        assert scrape.value("ebpf_net_exporter_attached_interfaces") == 2
        assert "level=error" not in exporter.log()
        assert exporter.stop() == 0


@pytest.mark.parametrize("attach", ["tcx", "clsact"])
def test_after_kill_9_a_restart_counts_each_packet_once(node: TestNode, attach: str):
    devices = [node.veth_a, node.veth_b]
    config = {"interfaces": {"attach": attach}}
    crashed = ExporterProcess(node, config=config).wait_ready()
    assert crashed.stop(signal.SIGKILL) == -signal.SIGKILL
    shutil.rmtree(crashed.workdir, ignore_errors=True)
    # clsact: the crashed run's filters are still there, still running its orphaned program;
    # tcx: its links went with its file descriptors
    left = {1} if attach == "clsact" else {0}
    assert set(attachments_on(node, devices).values()) == left
    with ExporterProcess(node, config=config) as restarted:
        restarted.wait_ready()
        assert set(attachments_on(node, devices).values()) == {1}     # replaced, not doubled
        assert udp_send(node.a_ns, node.b_ns, node.b_ip, 7421, [64] * 40) == 40
        scrape = restarted.wait_for(lambda s: udp_flow(s, node, 7421) >= 40, "40 datagrams")
        assert udp_flow(scrape, node, 7421) == 40
        assert restarted.stop() == 0
    assert set(attachments_on(node, devices).values()) == {0}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_dead_log_reader_neither_stops_nor_spins_the_exporter(node: TestNode):
    """stderr is a pipe whose reader goes away (a log shipper that died): writes fail with
    EPIPE. The exporter keeps serving, counts the lines it lost, does not busy-loop, and still
    stops cleanly."""
    port = free_port(node.node_ns)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", node.node_ns, *EXPORTER, "--web.listen-address",
         f"127.0.0.1:{port}", "--interfaces", f"{node.prefix}v.*"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "msg=ready" in line:
                break
        proc.stderr.close()                             # the log reader dies

        def scrape() -> Scrape:
            with in_netns(node.node_ns), urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                return Scrape(response.read().decode())

        # something to log: an interface comes and goes
        new = f"{node.prefix}vd"
        node.run(node.node_ns, ["ip", "link", "add", new, "type", "veth", "peer", "name",
                                f"{node.prefix}xd"])
        wait_until(lambda: scrape().value("ebpf_net_exporter_attached_interfaces") == 3, 10,
                   "the new interface")
        node.run(node.node_ns, ["ip", "link", "del", new])
        wait_until(lambda: scrape().value("ebpf_net_exporter_log_write_failures_total") >= 2,
                   10, "the lost log lines to be counted")
        busy = cpu_seconds(proc.pid)
        time.sleep(2)       # measuring idleness: no condition to poll
        assert cpu_seconds(proc.pid) - busy < 0.5
        assert udp_send(node.a_ns, node.b_ns, node.b_ip, 7431, [64] * 30) == 30
        wait_until(lambda: udp_flow(scrape(), node, 7431) == 30, 10, "30 datagrams")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert set(attachments_on(node, [node.veth_a, node.veth_b]).values()) == {0}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
