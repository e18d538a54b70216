"""Start-up, attach, detach and failure modes of the real exporter process."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.exporter_process import (
    REPO,
    ExporterProcess,
    Scrape,
    attachments_on,
    filters_on,
    has_clsact,
    link_exists,
    tcx_links,
    wait_until,
)
from lab.testnode import TestNode, in_netns, udp_send

pytestmark = pytest.mark.kernel


CLSACT = {"interfaces": {"attach": "clsact"}}


def attached(node: TestNode, device: str) -> bool:
    return attachments_on(node, [device]) == {f"{device} ingress": 1, f"{device} egress": 1}


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("attach", ["tcx", "clsact"])
def test_stopping_removes_every_qdisc_filter_and_link_it_added(node: TestNode, attach: str,
                                                                stop_signal: int):
    devices = [node.veth_a, node.veth_b]
    process = ExporterProcess(node, config={"interfaces": {"attach": attach}}).wait_ready()
    assert all(attached(node, d) for d in devices)
    # tcx: links only, never a qdisc or a filter; clsact: filters, no link
    assert len(tcx_links(process.proc.pid)) == (4 if attach == "tcx" else 0)
    assert all(has_clsact(node, d) for d in devices) == (attach == "clsact")
    assert process.scrape().value("ebpf_net_exporter_attached_interfaces") == 2
    assert process.stop(stop_signal) == 0
    assert set(attachments_on(node, devices).values()) == {0}
    assert not any(has_clsact(node, d) for d in devices)


def test_a_kill_9_leaves_no_tcx_link_behind(node: TestNode):
    devices = [node.veth_a, node.veth_b]
    process = ExporterProcess(node).wait_ready()
    link_ids = [link_id for _, _, link_id in tcx_links(process.proc.pid)]
    assert len(link_ids) == 4
    assert process.stop(signal.SIGKILL) == -signal.SIGKILL
    shutil.rmtree(process.workdir)
    # the kernel detached them with the process's last file descriptors
    assert set(attachments_on(node, devices).values()) == {0}
    assert not any(link_exists(link_id) for link_id in link_ids)


def test_restart_after_kill_9_replaces_the_left_filters_and_cleans_up_after(node: TestNode):
    devices = [node.veth_a, node.veth_b]
    first = ExporterProcess(node, config=CLSACT).wait_ready()
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    shutil.rmtree(first.workdir)
    assert all(attached(node, d) for d in devices)          # left behind by the crash
    second = ExporterProcess(node, config=CLSACT).wait_ready()
    assert all(attached(node, d) for d in devices)          # replaced, not doubled
    udp_flows = second.scrape()
    assert udp_flows.value("ebpf_net_exporter_attached_interfaces") == 2
    assert second.stop() == 0
    # the crashed run created the clsact qdiscs; the state file lets this run remove them
    assert set(attachments_on(node, devices).values()) == {0}
    assert not any(has_clsact(node, d) for d in devices)


def test_a_tcx_start_removes_the_filters_and_qdiscs_a_crashed_clsact_run_left(node: TestNode):
    devices = [node.veth_a, node.veth_b]
    crashed = ExporterProcess(node, config=CLSACT).wait_ready()
    assert crashed.stop(signal.SIGKILL) == -signal.SIGKILL
    shutil.rmtree(crashed.workdir)
    assert set(filters_on(node, devices).values()) == {1}
    process = ExporterProcess(node).wait_ready()
    # gone at attach, not only at stop: the old program no longer runs on every packet
    assert set(filters_on(node, devices).values()) == {0}
    assert not any(has_clsact(node, d) for d in devices)
    assert all(attached(node, d) for d in devices)
    assert udp_send(node.a_ns, node.b_ns, node.b_ip, 7400, [32] * 10) == 10
    packets = process.wait_for(
        lambda s: s.value("ebpf_net_flow_packets_total", dst_port="7400") >= 10,
        "the datagrams counted, through the tcx links")
    assert packets.value("ebpf_net_flow_packets_total", dst_port="7400") == 10   # once each
    assert process.stop() == 0


@pytest.mark.parametrize("attach", ["tcx", "clsact"])
def test_a_qdisc_someone_else_created_is_left_in_place(node: TestNode, attach: str):
    node.run(node.node_ns, ["tc", "qdisc", "add", "dev", node.veth_a, "clsact"])
    try:
        process = ExporterProcess(node, config={"interfaces": {"attach": attach}}).wait_ready()
        assert attached(node, node.veth_a)
        assert process.stop() == 0
        assert attachments_on(node, [node.veth_a])[f"{node.veth_a} ingress"] == 0
        assert has_clsact(node, node.veth_a)
        assert not has_clsact(node, node.veth_b)
    finally:
        node.run(node.node_ns, ["tc", "qdisc", "del", "dev", node.veth_a, "clsact"], check=False)


def test_interfaces_that_appear_are_attached_within_two_seconds_and_forgotten_when_gone(
        node: TestNode):
    new, peer = f"{node.prefix}vc", f"{node.prefix}xc"
    with ExporterProcess(node, interfaces=f"{node.prefix}v.*") as process:
        process.wait_ready()
        started = time.monotonic()
        node.run(node.node_ns, ["ip", "link", "add", new, "type", "veth", "peer", "name", peer])
        try:
            wait_until(lambda: attached(node, new), 2.0, f"{new} to be attached")
            took = time.monotonic() - started
            assert took < 2.0
            assert not attached(node, peer)             # does not match the regex
            process.wait_for(lambda s: s.value("ebpf_net_exporter_attached_interfaces") == 3,
                             "3 attached interfaces")
        finally:
            node.run(node.node_ns, ["ip", "link", "del", new], check=False)
        process.wait_for(lambda s: s.value("ebpf_net_exporter_attached_interfaces") == 2,
                         "the deleted interface to be forgotten", timeout=5)
        assert process.stop() == 0


def test_a_regex_matching_nothing_warns_then_attaches_when_one_appears(node: TestNode):
    name = f"{node.prefix}late"
    with ExporterProcess(node, interfaces=f"{node.prefix}late") as process:
        process.wait_ready()
        assert "no interface matches; waiting for one to appear" in process.log()
        assert process.scrape().value("ebpf_net_exporter_attached_interfaces") == 0
        node.run(node.node_ns, ["ip", "link", "add", name, "type", "veth", "peer", "name",
                                f"{node.prefix}xl"])   # no dummy module on these kernels
        try:
            wait_until(lambda: attached(node, name), 2.0, f"{name} to be attached")
        finally:
            node.run(node.node_ns, ["ip", "link", "del", name], check=False)
        assert process.stop() == 0


def test_a_regex_written_for_a_search_says_how_to_match_the_whole_name(node: TestNode):
    with ExporterProcess(node, interfaces=f"^{node.prefix}v") as process:
        process.wait_ready()
        log = process.log()
        assert "no interface matches; waiting for one to appear" in log
        assert f"patterns match the whole name, try '{node.prefix}v.*'" in log
        assert process.stop() == 0


def test_counters_stay_monotonic_and_exact_while_flows_churn_past_the_map(node: TestNode):
    """A 128-entry flow map, 300 new flows per scrape interval for 20 scrapes: the map fills
    every interval, yet no count is lost (the excess goes to the overflow series) and no
    counter ever goes down."""
    port, per_round, rounds = 7501, 300, 20
    config = {"maps": {"flow_capacity": 128}}
    with in_netns(node.b_ns):
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind((node.b_ip, port))
    try:
        with ExporterProcess(node, config=config) as process:
            process.wait_ready()
            seen: dict[tuple, float] = {}
            scrape: Scrape | None = None
            for _ in range(rounds):
                with in_netns(node.a_ns):
                    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                               for _ in range(per_round)]
                for sender in senders:          # each socket: its own source port, one flow
                    sender.sendto(b"x" * 32, (node.b_ip, port))
                    sender.close()
                scrape = process.scrape()
                for sample in scrape.samples:
                    if sample.name.endswith("_total"):
                        key = (sample.name, tuple(sorted(sample.labels.items())))
                        assert sample.value >= seen.get(key, 0), f"{key} went down"
                        seen[key] = sample.value
            assert scrape is not None
            sent = per_round * rounds
            counted = scrape.value("ebpf_net_flow_packets_total", src_ip=node.a_ip,
                                   dst_ip=node.b_ip, dst_port=str(port), protocol="udp")
            overflowed = scrape.value("ebpf_net_flow_packets_total", src_ip="overflow",
                                      protocol="udp", family="ipv4")
            assert counted + overflowed == sent
            assert overflowed > 0
            assert scrape.value("ebpf_net_exporter_bpf_map_update_failures_total",
                                map="flows") > 0
            assert scrape.value("ebpf_net_exporter_bpf_map_capacity", map="flows") == 128
            assert process.stop() == 0
    finally:
        sink.close()


def run_exporter(node: TestNode, *args: str, prefix: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    argv = ["ip", "netns", "exec", node.node_ns, *prefix, sys.executable, "-m", "exporter",
            "--web.listen-address", "127.0.0.1:0", "--interfaces", f"{node.prefix}v[ab]", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, **(env or {})})


def assert_one_line_failure(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if "level=error" in line]
    assert len(errors) == 1, result.stderr
    assert expected in errors[0]
    assert "Traceback" not in result.stderr


def test_without_privileges_it_says_which_capabilities_are_missing(node: TestNode):
    result = run_exporter(node, prefix=("setpriv", "--reuid=65534", "--regid=65534",
                                        "--clear-groups"))
    assert_one_line_failure(result, "missing capabilities CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN")
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_kernel_headers_are_one_line(node: TestNode):
    result = run_exporter(node, env={"BCC_KERNEL_SOURCE": "/nonexistent/headers"})
    assert_one_line_failure(result, "BCC_KERNEL_SOURCE=/nonexistent/headers holds no kernel "
                                    "headers")


def test_a_verifier_rejection_is_one_line_with_the_log_at_debug_level(node: TestNode, tmp_path):
    bad = tmp_path / "bpf"
    shutil.copytree(REPO / "bpf", bad)
    source = (bad / "classifier.c").read_text()
    source = source.replace(
        "    struct packet pkt = {};",
        "    if (*(u32 *)(long)skb->data == 7) return 1;   /* unchecked packet read */\n"
        "    struct packet pkt = {};")
    (bad / "classifier.c").write_text(source)
    result = run_exporter(node, "--no-collector.tcp", env={"EBPF_NET_BPF_DIR": str(bad)})
    assert_one_line_failure(result, "bpf program classifier: rejected by the kernel verifier")
    verbose = run_exporter(node, "--no-collector.tcp", "--log.level", "debug",
                           env={"EBPF_NET_BPF_DIR": str(bad)})
    assert "processed" in verbose.stderr          # the verifier's own log, at debug level
    assert set(attachments_on(node, [node.veth_a]).values()) == {0}


def test_a_port_in_use_is_one_line(node: TestNode):
    with in_netns(node.node_ns):
        taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        argv = ["--web.listen-address", f"127.0.0.1:{port}"]
        result = run_exporter(node, *argv)
        assert_one_line_failure(result, f"web.listen_address 127.0.0.1:{port}: "
                                        "Address already in use")
    finally:
        taken.close()


def test_a_compiler_abort_leaves_its_reason_on_disk(node: TestNode, tmp_path):
    """LLVM exits the process from C++ on some errors (here: over the BPF stack limit); no
    Python runs after, so the captured compiler output must already be a named file."""
    bad = tmp_path / "bpf"
    shutil.copytree(REPO / "bpf", bad)
    source = (bad / "classifier.c").read_text().replace(
        "    struct packet pkt = {};",
        "    volatile u8 huge[600] = {};\n    huge[skb->len & 511] = 1;\n"
        "    if (huge[skb->mark & 511]) return 1;\n    struct packet pkt = {};")
    (bad / "classifier.c").write_text(source)
    result = run_exporter(node, "--no-collector.tcp", env={"EBPF_NET_BPF_DIR": str(bad)})
    assert result.returncode != 0
    announced = re.findall(r"compiler_output=(\S+)", result.stderr)
    assert announced, result.stderr
    kept = Path(announced[-1])
    try:
        assert "stack limit" in kept.read_text()
    finally:
        kept.unlink(missing_ok=True)
