"""SIGHUP reloads the configuration: interfaces and allowlists change without reloading the
programs or losing a count; a bad file leaves the running configuration in place."""

from __future__ import annotations

import signal

import pytest
import yaml

from lab.exporter_process import ExporterProcess, attachments_on, wait_until
from lab.testnode import TestNode, udp_send

pytestmark = pytest.mark.kernel


def attached(node: TestNode, device: str) -> bool:
    return attachments_on(node, [device]) == {f"{device} ingress": 1, f"{device} egress": 1}


def packets(scrape, node: TestNode, port: int) -> float:
    return scrape.value("ebpf_net_flow_packets_total", src_ip=node.a_ip, dst_ip=node.b_ip,
                        dst_port=str(port), protocol="udp")


def test_sighup_changes_interfaces_without_losing_counts_or_reloading_programs(node: TestNode):
    config = {"interfaces": {"exclude": ["lo", node.veth_b]},
              "dns": {"query_names": ["*.one.test"]}}
    with ExporterProcess(node, config=config) as exporter:
        exporter.wait_ready()
        path = exporter.workdir / "config.yaml"
        assert attached(node, node.veth_a) and not attached(node, node.veth_b)
        assert udp_send(node.a_ns, node.b_ns, node.b_ip, 7501, [64] * 30) == 30
        exporter.wait_for(lambda s: packets(s, node, 7501) == 30, "30 datagrams")
        compiles = exporter.log().count("compile")

        # a bad file: one error line, nothing changes, still running
        path.write_text("interfaces:\n  exclude: ['(']\n")
        exporter.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload failed" in exporter.log(), 10, "the failed reload")
        failed = [line for line in exporter.log().splitlines() if "reload failed" in line]
        assert len(failed) == 1 and "interfaces.exclude" in failed[0], failed
        assert exporter.proc.poll() is None
        assert not attached(node, node.veth_b)

        # a good one: veth_b is attached now, a restart-only change is named
        config["interfaces"]["exclude"] = ["lo"]
        config["dns"]["query_names"] = ["*.two.test"]
        config["series"] = {"max_per_metric": 500}
        path.write_text(yaml.safe_dump(config))
        exporter.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: attached(node, node.veth_b), 5, "veth_b to be attached")
        wait_until(lambda: "take effect after a restart" in exporter.log(), 5, "the warning")
        warning = [line for line in exporter.log().splitlines() if "after a restart" in line]
        assert "settings=series.max_per_metric" in warning[0], warning

        # counts kept, programs not reloaded, traffic still counted once (now seen on both
        # veths: in on veth_a, out on veth_b)
        assert udp_send(node.a_ns, node.b_ns, node.b_ip, 7501, [64] * 20) == 20
        scrape = exporter.wait_for(lambda s: packets(s, node, 7501) >= 50, "20 more")
        assert packets(scrape, node, 7501) == 50
        assert scrape.value("ebpf_net_exporter_attached_interfaces") == 2
        assert exporter.log().count("compile") == compiles
        assert exporter.stop() == 0
