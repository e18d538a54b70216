"""Least privilege: the exporter runs as an unprivileged user holding only the capabilities
docs/security.md lists, counts real traffic, and each of its threads gives up what it no longer
needs once the programs are attached."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exporter.kernel import privileges, tlsprobes
from lab.exporter_process import ExporterProcess, attachments_on, wait_until
from lab.testnode import TestNode, tcp_connections, udp_send

pytestmark = pytest.mark.kernel

NOBODY = 65534
# CAP_DAC_READ_SEARCH: tracefs is mode 0700 root (bcc reads tracepoint formats and ids there)
MINIMAL = ("bpf", "perfmon", "net_admin", "dac_read_search")
NET_ADMIN = 1 << privileges.CAP_NET_ADMIN
SCAN = sum(1 << cap for cap in tlsprobes.SCAN_CAPABILITIES)
ALL = (1 << 64) - 1


def setpriv(caps: tuple[str, ...]) -> list[str]:
    listed = ",".join(f"+{cap}" for cap in caps)
    # `ip netns exec` gives the command a fresh /sys without tracefs: mount it there first
    # (as root), as a host's tracefs is in a real node's or pod's view
    return ["sh", "-c", 'mount -t tracefs nodev /sys/kernel/tracing && exec "$@"', "sh",
            "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            f"--inh-caps=-all,{listed}", f"--ambient-caps=-all,{listed}",
            f"--bounding-set=-all,{listed}"]


def thread_capabilities(pid: int) -> dict[int, int]:
    """CapEff of each thread of `pid`."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        # a thread that ended meanwhile (a served request's): gone from the directory, or its
        # entry still listed and reading it ESRCH
        except (FileNotFoundError, ProcessLookupError):
            continue
        found[int(tid)] = int(status.split("CapEff:")[1].split()[0], 16)
    return found


def assert_dropped_after_start(process: ExporterProcess, held: int = ALL) -> None:
    """Only two threads keep anything: the interface monitor CAP_NET_ADMIN, and the HTTPS
    scan what it needs of `held` to read processes' maps and attach uprobes."""
    caps = thread_capabilities(process.proc.pid)
    scan = SCAN & held
    assert caps[process.proc.pid] == 0, caps                    # the main thread
    assert sorted(caps.values()).count(NET_ADMIN) == 1, caps    # the interface monitor
    assert sorted(caps.values()).count(scan) == 1, caps         # the HTTPS scan
    assert set(caps.values()) == {0, NET_ADMIN, scan}, caps     # web, sweepers, ...


@pytest.fixture()
def runtime_dir(node: TestNode):
    """RUNTIME_DIRECTORY as systemd would make it: the user's own, for the qdisc state file."""
    os.chmod(node.tmpdir, 0o755)
    directory = Path(node.tmpdir) / "run"
    directory.mkdir(exist_ok=True)
    os.chown(directory, NOBODY, NOBODY)
    return directory


def test_an_unprivileged_user_with_the_minimal_capabilities_counts_real_traffic(
        node: TestNode, runtime_dir: Path):
    process = ExporterProcess(node, prefix=setpriv(MINIMAL), interfaces=f"{node.prefix}v.*",
                              env={"RUNTIME_DIRECTORY": str(runtime_dir)})
    try:
        process.wait_ready()
        assert Path(f"/proc/{process.proc.pid}/status").stat().st_uid == NOBODY
        sizes = [100, 1000] * 50
        assert udp_send(node.a_ns, node.b_ns, node.b_ip, 7301, sizes) == len(sizes)
        tcp_connections(node.a_ns, node.b_ns, node.b_ip, 7302, 5)
        labels = {"src_ip": node.a_ip, "dst_ip": node.b_ip}

        def counted(s) -> bool:
            return (s.value("ebpf_net_flow_packets_total", dst_port="7301", **labels)
                    >= len(sizes) and s.value("ebpf_net_tcp_connections_closed_total",
                                              role="client", dst_port="7302", **labels) >= 5
                    and s.value("ebpf_net_tcp_rtt_seconds_count", dst_port="7302",
                                **labels) >= 10)

        scrape = process.wait_for(counted, "UDP flows and TCP connections")
        assert scrape.value("ebpf_net_flow_packets_total", dst_port="7301", **labels) == 100
        assert scrape.value("ebpf_net_flow_bytes_total", dst_port="7301", **labels) == \
            sum(sizes) + len(sizes) * 28
        assert scrape.value("ebpf_net_tcp_connections_opened_total", role="client",
                            dst_port="7302", **labels) == 5
        # the socket fields and the tick rate without root: BTF is world-readable, and the
        # rate comes from a test run of the program loaded with CAP_BPF
        assert scrape.value("ebpf_net_tcp_rtt_seconds_count", dst_port="7302", **labels) == 10
        assert "RTT sampling window" in process.log()
        assert_dropped_after_start(process, held=sum(
            1 << getattr(privileges, f"CAP_{cap.upper()}") for cap in MINIMAL))
        # CAP_NET_ADMIN kept where it is needed: an interface appearing now is attached
        new = f"{node.prefix}vc"
        node.run(node.node_ns, ["ip", "link", "add", new, "type", "veth", "peer", "name",
                                f"{node.prefix}xc"])
        try:
            wait_until(lambda: attachments_on(node, [new]) == {f"{new} ingress": 1,
                                                           f"{new} egress": 1},
                       5, f"{new} to be attached by the unprivileged exporter")
        finally:
            node.run(node.node_ns, ["ip", "link", "del", new], check=False)
        assert process.stop() == 0, process.log()
        assert set(attachments_on(node, [node.veth_a, node.veth_b]).values()) == {0}
        assert "could not" not in process.log()
    finally:
        process.stop()


def test_without_dac_read_search_it_says_tracefs_is_unreadable(node: TestNode,
                                                               runtime_dir: Path):
    caps = tuple(c for c in MINIMAL if c != "dac_read_search")
    process = ExporterProcess(node, prefix=setpriv(caps),
                              env={"RUNTIME_DIRECTORY": str(runtime_dir)})
    assert process.proc.wait(timeout=60) == 1
    process.stop()
    errors = [line for line in process.log().splitlines() if "level=error" in line]
    assert len(errors) == 1, process.log()
    assert "tracefs at /sys/kernel/tracing is not readable by uid 65534: grant " \
           "CAP_DAC_READ_SEARCH" in errors[0]


def test_as_root_every_thread_but_the_interface_monitor_drops_everything(node: TestNode):
    with ExporterProcess(node) as process:
        process.wait_ready()
        assert process.scrape().value("ebpf_net_exporter_attached_interfaces") == 2
        assert_dropped_after_start(process)
        assert "capabilities dropped" in process.log()
        assert process.stop() == 0


def test_kubernetes_watches_hold_no_capability(node: TestNode):
    from lab import kubeapi
    from lab.kubeapi import KubeAPI

    with KubeAPI(netns=node.node_ns) as api:
        api.create("pods", kubeapi.pod("shop", "web-0", [node.a_ip], owner=None))
        with ExporterProcess(node, ["--kubeconfig", str(api.kubeconfig),
                                    "--node-name", "node-1"]) as process:
            process.wait_ready()
            process.wait_for(lambda s: s.value("ebpf_net_exporter_k8s_objects",
                                               kind="pods") == 1, "the watches to list")
            # the watch threads (and the client's) started after the drop: they hold none
            assert len(thread_capabilities(process.proc.pid)) > 6
            assert_dropped_after_start(process)
            assert process.stop() == 0
