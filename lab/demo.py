"""`make demo`: a small test node with real servers and a traffic loop, and the exporter
attached to it, never to the host's own interfaces.

    pod a (client) --veth-- node (router; the exporter runs here) --veth-- pod b (servers)
                               |
                             host link: the metrics URL, reachable from the host

Ctrl-C (or SIGTERM) stops the exporter and removes every namespace and link it made."""

from __future__ import annotations

import signal
import sys
import threading

from lab.exporter_process import ExporterProcess
from lab.testnode import TestNode

PORT = 9814

TRAFFIC = """
while true; do
    curl -s -o /dev/null http://{b}:8080/index.html            # HTTP
    curl -s -o /dev/null http://{b}:8080/data.bin              # 1 MiB transfer
    dig +short +time=1 +tries=1 @{b} shop.demo.test >/dev/null # DNS over UDP
    dig +short +tcp +time=1 +tries=1 @{b} nope.demo.test >/dev/null  # DNS over TCP
    curl -s -o /dev/null --max-time 1 http://{b}:8081/         # refused
    curl -s -o /dev/null "http://[{b6}]:8080/index.html"       # IPv6
    sleep 1
done
"""


def main() -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with TestNode(host_link=True) as node:
        node.http_server(node.b_ns, node.b_ip, 8080)
        node.http_server(node.b_ns, node.b_ip6, 8080)
        node.dns_server(node.b_ns, node.b_ip, {"shop.demo.test": node.b_ip})
        node.spawn(node.a_ns, ["sh", "-c", TRAFFIC.format(b=node.b_ip, b6=node.b_ip6)])
        exporter = ExporterProcess(node, host=node.node_host_ip, port=PORT)
        try:
            exporter.wait_ready()
            print(f"""
ebpf-net-exporter is running in the test node {node.node_ns}, attached to {node.veth_a}
and {node.veth_b}, with HTTP, DNS and refused connections flowing between two pods.

    curl -s http://{node.node_host_ip}:{PORT}/metrics | grep ^ebpf_net_

exporter log: {exporter.log_path}
Ctrl-C to stop and remove everything.""", flush=True)
            while not stop.wait(1.0):
                if exporter.proc.poll() is not None:
                    print(f"the exporter exited:\n{exporter.log()}", file=sys.stderr)
                    return 1
        finally:
            code = exporter.stop()
        print(f"stopped (exporter exit code {code}); test node removed.")
        return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
