"""Kernel tests of the lab's test node (lab/testnode.py, lab/netns.py, lab/servers.py,
lab/traffic.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.kernel.environment import pid_alive
from lab import traffic
from lab.testnode import (
    HTTP_DATA_SIZE,
    HTTP_INDEX_BODY,
    TestNode,
    cleanup_stale,
    connect_refused,
    in_netns,
    tcp_connections,
    tcp_transfer,
    udp_send,
)

pytestmark = pytest.mark.kernel

@pytest.fixture(scope="module", autouse=True)
def _requirements(kernel_ready: None) -> None:
    """Root and tools, checked once for every kernel test (tests/conftest.py)."""


@pytest.fixture(scope="module")
def node() -> Iterator[TestNode]:
    with TestNode(host_link=True) as tn:
        yield tn


def _ns_names() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _root_links() -> str:
    return subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout


def _netns_ino() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def test_topology(node: TestNode) -> None:
    assert len(node.veth_a) <= 15 and len(node.veth_b) <= 15 and len(node.host_if) <= 15
    assert node.node_ns == f"{node.prefix}-node"
    names = _ns_names()
    for ns in (node.node_ns, node.a_ns, node.b_ns):
        assert ns in names
    node_links = node.run(node.node_ns, ["ip", "-br", "link"]).stdout
    assert node.veth_a in node_links and node.veth_b in node_links
    fwd = node.run(
        node.node_ns, ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]
    ).stdout.split()
    assert fwd == ["1", "1"]
    pod_addrs = node.run(node.a_ns, ["ip", "-br", "addr", "show", "dev", "eth0"]).stdout
    assert f"{node.a_ip}/24" in pod_addrs and f"{node.a_ip6}/64" in pod_addrs
    assert "UP" in pod_addrs.split()[1]
    routes6 = node.run(node.b_ns, ["ip", "-6", "route", "show", "default"]).stdout
    assert node.node_ip6_b in routes6


def test_in_netns_switches_and_restores(node: TestNode) -> None:
    before = _netns_ino()
    with in_netns(node.node_ns):
        inside = _netns_ino()
        with open("/proc/thread-self/net/if_inet6") as fh:
            assert node.veth_a in fh.read()
    assert inside != before
    assert _netns_ino() == before


def test_connectivity_v4_v6(node: TestNode) -> None:
    tcp_connections(node.a_ns, node.b_ns, node.b_ip, 7001, 3)
    tcp_connections(node.a_ns, node.b_ns, node.b_ip6, 7001, 3)
    tcp_connections(node.b_ns, node.a_ns, node.a_ip, 7002, 1)


def test_tcp_transfer(node: TestNode) -> None:
    tcp_transfer(node.a_ns, node.b_ns, node.b_ip, 7003, 1_000_000)
    tcp_transfer(node.a_ns, node.b_ns, node.b_ip6, 7003, 1_000_000)
    tcp_transfer(node.a_ns, node.node_ns, node.node_ip_a, 7004, 0)


def test_stalled_tcp_transfer_says_where(node: TestNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transfer whose data the path drops (its handshake passes) times out with where each
    end was and what `ss` showed, not a bare "timed out"."""
    monkeypatch.setattr(traffic, "SOCKET_TIMEOUT", 1.0)
    node.nft(node.node_ns, "table inet entstall {\n"
             "  chain forward_data { type filter hook forward priority 0; policy accept;\n"
             "    tcp dport 7006 ip length > 100 drop; }\n"
             "}\n")
    try:
        with pytest.raises(TimeoutError) as raised:
            tcp_transfer(node.a_ns, node.b_ns, node.b_ip, 7006, 64 << 20)
    finally:
        node.run(node.node_ns, ["nft", "delete", "table", "inet", "entstall"])
    message = str(raised.value)
    assert "client sending" in message
    assert "server reading (0 bytes read)" in message
    # the client's socket, still open and retransmitting, as ss saw it
    client_ss = message.split("ss in client namespace:")[1].split(";")[0]
    assert f"{node.b_ip}:7006" in client_ss and "bytes_retrans" in client_ss


def test_udp_send(node: TestNode) -> None:
    sizes = [0, 1, 100, 1400, 3000]
    assert udp_send(node.a_ns, node.b_ns, node.b_ip, 7005, sizes) == len(sizes)
    assert udp_send(node.a_ns, node.b_ns, node.b_ip6, 7005, sizes) == len(sizes)


def test_connect_refused(node: TestNode) -> None:
    connect_refused(node.a_ns, node.b_ip, 7006, 3)
    connect_refused(node.a_ns, node.b_ip6, 7006, 1)


def test_connect_refused_detects_listener(node: TestNode) -> None:
    with in_netns(node.b_ns):
        srv = socket.create_server((node.b_ip, 7007))
    with srv, pytest.raises(AssertionError):
        connect_refused(node.a_ns, node.b_ip, 7007, 1)


def test_http_server(node: TestNode) -> None:
    proc = node.http_server(node.b_ns, node.b_ip, 8080)
    url = f"http://{node.b_ip}:8080"
    assert node.run(node.a_ns, ["curl", "-sf", f"{url}/index.html"]).stdout == HTTP_INDEX_BODY
    size = node.run(
        node.a_ns, ["curl", "-sf", "-o", "/dev/null", "-w", "%{size_download}", f"{url}/data.bin"]
    ).stdout
    assert int(size) == HTTP_DATA_SIZE
    # urllib from this process, inside the pod namespace
    with in_netns(node.a_ns), urllib.request.urlopen(f"{url}/", timeout=5) as resp:
        assert resp.read().decode() == HTTP_INDEX_BODY
    node.stop(proc)
    assert proc.returncode is not None


def test_http_server_v6(node: TestNode) -> None:
    proc = node.http_server(node.b_ns, node.b_ip6, 8081)
    body = node.run(node.a_ns, ["curl", "-sf", f"http://[{node.b_ip6}]:8081/"]).stdout
    assert body == HTTP_INDEX_BODY
    node.stop(proc)


def test_dns_server(node: TestNode) -> None:
    node.dns_server(node.node_ns, node.node_ip_a, {"web.test": node.b_ip, "v6.test": node.b_ip6})
    dig = ["dig", f"@{node.node_ip_a}", "+short", "+time=2", "+tries=1"]
    assert node.run(node.a_ns, [*dig, "web.test"]).stdout.strip() == node.b_ip
    assert node.run(node.a_ns, [*dig, "AAAA", "v6.test"]).stdout.strip() == node.b_ip6


def test_host_link(node: TestNode) -> None:
    node.http_server(node.node_ns, node.node_host_ip, 8082)
    # plain urllib from the root namespace over the connected /30
    with urllib.request.urlopen(f"http://{node.node_host_ip}:8082/", timeout=5) as resp:
        assert resp.read().decode() == HTTP_INDEX_BODY


def test_iperf3_server(node: TestNode) -> None:
    proc = node.iperf3_server(node.b_ns, node.b_ip, 5201)
    out = node.run(node.a_ns, ["iperf3", "-c", node.b_ip, "-n", "1M", "-J"]).stdout
    assert json.loads(out)["end"]["sum_sent"]["bytes"] >= 1 << 20
    node.stop(proc)


def test_nft(node: TestNode) -> None:
    node.nft(
        node.node_ns,
        "table inet enttest {\n"
        "  chain filt { type filter hook forward priority 0; policy accept; }\n"
        "}\n",
    )
    assert "enttest" in node.run(node.node_ns, ["nft", "list", "tables"]).stdout
    # nothing leaks into the root namespace
    root = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert "enttest" not in root


def test_close_removes_everything() -> None:
    tn = TestNode(host_link=True)
    with tn:
        proc = tn.spawn(tn.node_ns, ["sleep", "60"])
        assert tn.prefix in _ns_names() and tn.host_if in _root_links()
    assert proc.returncode is not None
    assert tn.prefix not in _ns_names()
    assert tn.prefix not in _root_links()
    tn.close()  # idempotent


def test_a_terminated_test_run_still_tears_its_node_down(tmp_path) -> None:
    """SIGTERM to pytest (a CI timeout, a kill) runs the fixtures' teardown (tests/conftest.py),
    so a node's namespaces and processes do not outlive the run."""
    ready = tmp_path / "ready"
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/kernel/sigterm_target.py"], cwd=repo, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, env={**os.environ, "SIGTERM_TARGET_READY": str(ready)})
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert run.poll() is None, run.communicate()[0]
            assert time.monotonic() < deadline, "the target's node did not come up"
            time.sleep(0.1)
        prefix = ready.read_text()
        assert prefix in _ns_names()
        run.send_signal(signal.SIGTERM)
        output = run.communicate(timeout=60)[0].decode()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert "KeyboardInterrupt: signal SIGTERM" in output
    assert prefix not in _ns_names()
    assert prefix not in _root_links()


def test_partial_build_is_cleaned_up(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: TestNode) -> None:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(TestNode, "_verify_connectivity", boom)
    tn = TestNode(host_link=True)
    with pytest.raises(RuntimeError, match="injected"):
        tn.build()
    assert tn.prefix not in _ns_names()
    assert tn.prefix not in _root_links()


def test_cleanup_stale() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert not pid_alive(dead.pid)
    stale_ns = f"ent{dead.pid}x0-a"
    mine = f"ent{os.getpid()}xzz-a"
    subprocess.run(["ip", "netns", "add", stale_ns], check=True)
    try:
        subprocess.run(["ip", "netns", "add", mine], check=True)
        removed = cleanup_stale()
        assert stale_ns in removed and mine not in removed
        names = _ns_names()
        assert stale_ns not in names and mine in names
    finally:
        for ns in (stale_ns, mine):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
