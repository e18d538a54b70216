"""Kernel tests of the two-node cluster harness (lab/testcluster.py): its topology, both
routing modes, services by DNAT, its servers, and its teardown."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
from collections.abc import Iterator

import pytest

from exporter.kernel.environment import pid_alive
from lab.testcluster import SERVICE_TABLE, TestCluster
from lab.testnode import (
    HTTP_INDEX_BODY,
    cleanup_stale,
    connect_refused,
    in_netns,
    tcp_connections,
    tcp_transfer,
)

pytestmark = pytest.mark.kernel

ECHOES = 10  # connections per traffic check: enough packets to tell the paths apart


def _ns_names() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@contextlib.contextmanager
def _mode(cluster: TestCluster, mode: str) -> Iterator[None]:
    """Route via ``mode`` for the block, then back to the mode before it (the cluster
    fixture is shared by the module)."""
    before = cluster.mode
    cluster.route_via(mode)
    try:
        yield
    finally:
        cluster.route_via(before)


def _curl(cluster: TestCluster, ns: str, url: str) -> str:
    return cluster.run(ns, ["curl", "-sf", "--max-time", "5", url]).stdout


def _status(cluster: TestCluster, ns: str, url: str) -> int:
    out = cluster.run(
        ns, ["curl", "-s", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", url]
    ).stdout
    return int(out)


def _route(cluster: TestCluster, ns: str, dst: str) -> str:
    return cluster.run(ns, ["ip", "route", "show", dst]).stdout.strip()


def test_topology(cluster: TestCluster) -> None:
    p, n = cluster.prefix, cluster.n
    assert re.fullmatch(r"ent\d+x[0-9a-z]{1,2}", p)
    assert [node.name for node in cluster.nodes] == ["node-1", "node-2"]
    names = _ns_names()
    for k, node in enumerate(cluster.nodes, start=1):
        assert node.ns == f"{p}-n{k}" and node.ns in names
        assert node.internal_ip == f"10.{n}.0.{k}"
        assert node.pod_cidr == f"10.{n}.{k}.0/24"
        assert (node.uplink, node.vxlan) == (f"{p}u{k}", f"{p}x{k}")
        fwd = cluster.run(
            node.ns, ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]
        ).stdout.split()
        assert fwd == ["1", "1"]
        links = cluster.run(node.ns, ["ip", "-br", "link"]).stdout
        for dev in [node.uplink, node.vxlan, *(pod.veth for pod in node.pods)]:
            assert len(dev) <= 15 and dev in links
        assert f"{node.internal_ip}/24" in cluster.run(
            node.ns, ["ip", "-br", "addr", "show", "dev", node.uplink]).stdout
        vxlan = cluster.run(node.ns, ["ip", "-d", "addr", "show", "dev", node.vxlan]).stdout
        other = cluster.nodes[2 - k]
        assert f"vxlan id 42 remote {other.internal_ip} local {node.internal_ip}" in vxlan
        assert f"dev {node.uplink}" in vxlan and "dstport 4789" in vxlan
        assert f"inet 10.{n}.{k}.0/32" in vxlan
        assert [pod.name for pod in node.pods] == [f"pod-{k}a", f"pod-{k}b"]
        for pod, host in zip(node.pods, (2, 3), strict=True):
            assert cluster.pod(pod.name) is pod
            assert (pod.ns, pod.ip, pod.veth, pod.node) == (
                f"{p}-{pod.name[4:]}", f"10.{n}.{k}.{host}", f"{p}{pod.name[4:]}", node.name)
            assert pod.ns in names
            # Calico style: /32s at both ends, a host route per pod on its veth
            assert f"10.{n}.{k}.1/32" in cluster.run(
                node.ns, ["ip", "-br", "addr", "show", "dev", pod.veth]).stdout
            assert _route(cluster, node.ns, pod.ip) == f"{pod.ip} dev {pod.veth} scope link"
            assert f"{pod.ip}/32" in cluster.run(
                pod.ns, ["ip", "-br", "addr", "show", "dev", "eth0"]).stdout
            routes = [r.strip() for r in cluster.run(pod.ns, ["ip", "route"]).stdout.splitlines()]
            assert f"default via 10.{n}.{k}.1 dev eth0" in routes
            assert f"10.{n}.{k}.1 dev eth0 scope link" in routes
        tables = cluster.run(node.ns, ["nft", "list", "tables"]).stdout
        assert f"table ip {SERVICE_TABLE}" in tables
    with pytest.raises(KeyError):
        cluster.pod("pod-3a")


def test_interfaces_regex(cluster: TestCluster) -> None:
    for index, node in enumerate(cluster.nodes):
        regex = re.compile(cluster.interfaces_regex(index))
        mine = [node.uplink, node.vxlan, *(pod.veth for pod in node.pods)]
        other = cluster.nodes[1 - index]
        theirs = [other.uplink, other.vxlan, *(pod.veth for pod in other.pods)]
        assert all(regex.fullmatch(dev) for dev in mine)
        assert not any(regex.fullmatch(dev) for dev in [*theirs, "lo", "eth0"])
        # every link of the node but lo is one to attach to
        links = cluster.run(node.ns, ["ip", "-o", "link"]).stdout.splitlines()
        names = {line.split(": ")[1].split("@")[0] for line in links}
        assert {dev for dev in names if regex.fullmatch(dev)} == names - {"lo"}


def test_pod_to_pod_within_a_node(cluster: TestCluster) -> None:
    for node in cluster.nodes:
        a, b = node.pods
        tcp_connections(a.ns, b.ns, b.ip, 7101, 3)
        tcp_connections(b.ns, a.ns, a.ip, 7102, 1)
        # and pod to its own node
        tcp_connections(a.ns, node.ns, node.internal_ip, 7103, 1)


@pytest.mark.parametrize("modes", [("vxlan", "routed"), ("routed", "vxlan", "routed")])
def test_across_nodes_in_both_modes(cluster: TestCluster, modes: tuple[str, ...]) -> None:
    n1, n2 = cluster.nodes
    start = cluster.mode
    try:
        for mode in modes:
            cluster.route_via(mode)
            assert cluster.mode == mode
            if mode == "routed":
                want1 = f"{n2.pod_cidr} via {n2.internal_ip} dev {n1.uplink}"
                want2 = f"{n1.pod_cidr} via {n1.internal_ip} dev {n2.uplink}"
            else:
                want1 = f"{n2.pod_cidr} via 10.{cluster.n}.2.0 dev {n1.vxlan} onlink"
                want2 = f"{n1.pod_cidr} via 10.{cluster.n}.1.0 dev {n2.vxlan} onlink"
            assert _route(cluster, n1.ns, n2.pod_cidr) == want1
            assert _route(cluster, n2.ns, n1.pod_cidr) == want2
            for client in n1.pods:
                for server in n2.pods:
                    tcp_connections(client.ns, server.ns, server.ip, 7110, 2)
                    tcp_connections(server.ns, client.ns, client.ip, 7111, 1)
            # a pod reaches the other node's InternalIP too (its uplink is connected)
            tcp_connections(n1.pods[0].ns, n2.ns, n2.internal_ip, 7112, 1)
    finally:
        cluster.route_via(start)
    assert cluster.mode == start


def test_traffic_goes_through_the_vxlan_device_in_vxlan_mode_only(cluster: TestCluster) -> None:
    n1, n2 = cluster.nodes
    a1, a2 = n1.pods[0], n2.pods[0]

    def deltas() -> dict[str, int]:
        """Packets n1's VXLAN device and uplink sent and n2's VXLAN device got during
        ECHOES connections a1 -> a2."""
        devs = {"x1 tx": (n1.ns, n1.vxlan, "tx"), "u1 tx": (n1.ns, n1.uplink, "tx"),
                "x2 rx": (n2.ns, n2.vxlan, "rx")}
        before = {k: cluster.link_packets(ns, dev)[d] for k, (ns, dev, d) in devs.items()}
        tcp_connections(a1.ns, a2.ns, a2.ip, 7120, ECHOES)
        return {k: cluster.link_packets(ns, dev)[d] - before[k]
                for k, (ns, dev, d) in devs.items()}

    # each connection sends at least SYN, ping and FIN from a1's side
    least = 3 * ECHOES
    with _mode(cluster, "vxlan"):
        vxlan = deltas()
    assert vxlan["x1 tx"] >= least and vxlan["x2 rx"] >= least, vxlan
    assert vxlan["u1 tx"] >= vxlan["x1 tx"], vxlan  # encapsulated on the uplink
    with _mode(cluster, "routed"):
        routed = deltas()
    assert routed["u1 tx"] >= least, routed
    # not 0: a neighbour probe for the VXLAN gateway may still leave after the switch
    assert routed["x1 tx"] <= 2 and routed["x2 rx"] <= 2, routed


def test_full_size_segments_in_both_modes(cluster: TestCluster) -> None:
    """1 MB each way: the VXLAN device's MTU fits the pods' 1500-byte packets."""
    a1, a2 = cluster.pod("pod-1a"), cluster.pod("pod-2a")
    for mode in ("vxlan", "routed"):
        with _mode(cluster, mode):
            tcp_transfer(a1.ns, a2.ns, a2.ip, 7130, 1_000_000)
            tcp_transfer(a2.ns, a1.ns, a1.ip, 7131, 1_000_000)


def test_cluster_ip_tcp(cluster: TestCluster) -> None:
    backend = cluster.pod("pod-2a")
    vip = cluster.service_ip(10)
    server = cluster.http_server(backend.ns, backend.ip, 8080)
    cluster.add_cluster_ip(vip, 80, backend.ip, 8080)
    try:
        for mode in ("routed", "vxlan"):
            with _mode(cluster, mode):
                # from pods of both nodes (prerouting) and from both nodes (output)
                for ns in (cluster.pod("pod-1a").ns, cluster.pod("pod-2b").ns,
                           *(node.ns for node in cluster.nodes)):
                    assert _curl(cluster, ns, f"http://{vip}/index.html") == HTTP_INDEX_BODY
    finally:
        cluster.stop(server)
    rules = cluster.run(cluster.nodes[0].ns, ["nft", "list", "table", "ip", SERVICE_TABLE])
    assert rules.stdout.count(f"ip daddr {vip} tcp dport 80 dnat to {backend.ip}:8080") == 2


def test_cluster_ip_translates_only_the_destination(cluster: TestCluster) -> None:
    """The backend sees the client pod's own address, the client sees only the ClusterIP:
    conntrack un-NATs the replies, nothing is SNATed."""
    client, backend = cluster.pod("pod-1b"), cluster.pod("pod-2b")
    vip = cluster.service_ip(11)
    cluster.add_cluster_ip(vip, 81, backend.ip, 8081)
    with in_netns(backend.ns):
        srv = socket.create_server((backend.ip, 8081))
    with in_netns(client.ns):
        cli = socket.socket()
    with srv, cli:
        srv.settimeout(5)
        cli.settimeout(5)
        cli.connect((vip, 81))
        conn, peer = srv.accept()
        with conn:
            assert peer[0] == client.ip
            assert conn.getsockname() == (backend.ip, 8081)
            assert cli.getpeername() == (vip, 81)
            cli.sendall(b"ping")
            conn.sendall(conn.recv(4))
            assert cli.recv(4) == b"ping"


def test_cluster_ip_udp_dns(cluster: TestCluster) -> None:
    backend = cluster.pod("pod-2b")
    vip = cluster.service_ip(53)
    server = cluster.dns_server(backend.ns, backend.ip, {"web.cluster.test": "10.1.2.3"})
    cluster.add_cluster_ip(vip, 53, backend.ip, 53, proto="udp")
    # dig takes only replies from the address it asked (else "reply from unexpected source")
    dig = ["dig", f"@{vip}", "+short", "+time=2", "+tries=1", "web.cluster.test"]
    try:
        for mode in ("routed", "vxlan"):
            with _mode(cluster, mode):
                for ns in (cluster.pod("pod-1a").ns, cluster.nodes[0].ns):
                    assert cluster.run(ns, dig).stdout.strip() == "10.1.2.3"
    finally:
        cluster.stop(server)
    with pytest.raises(ValueError, match="tcp or udp"):
        cluster.add_cluster_ip(vip, 53, backend.ip, 53, proto="sctp")


def test_node_port(cluster: TestCluster) -> None:
    backend = cluster.pod("pod-2a")
    n1, n2 = cluster.nodes
    server = cluster.http_server(backend.ns, backend.ip, 8082)
    cluster.add_node_port(1, 30080, backend.ip, 8082)
    url = f"http://{n2.internal_ip}:30080/index.html"
    try:
        for mode in ("routed", "vxlan"):
            with _mode(cluster, mode):
                # a pod of the other node, a pod of the same node, the node itself (output)
                for ns in (cluster.pod("pod-1b").ns, cluster.pod("pod-2b").ns, n2.ns):
                    assert _curl(cluster, ns, url) == HTTP_INDEX_BODY
        # only node 2 has the NodePort: node 1 refuses (nothing listens there)
        connect_refused(cluster.pod("pod-1b").ns, n1.internal_ip, 30080, 1)
    finally:
        cluster.stop(server)


def test_nginx_status_codes(cluster: TestCluster) -> None:
    pod = cluster.pod("pod-2b")
    locations = {"/ok": 200, "/created": 201, "/moved": 301, "/error": 500,
                 "/unavailable": 503}
    server = cluster.nginx(pod.ns, pod.ip, 8090, locations)
    client = cluster.pod("pod-1a").ns
    try:
        for path, code in locations.items():
            assert _status(cluster, client, f"http://{pod.ip}:8090{path}") == code
        for path in ("/", "/missing", "/ok/deeper"):
            assert _status(cluster, client, f"http://{pod.ip}:8090{path}") == 404
    finally:
        cluster.stop(server)
    assert server.returncode is not None


def test_bad_modes_are_refused(cluster: TestCluster) -> None:
    with pytest.raises(ValueError, match="overlay"):
        TestCluster(overlay="geneve")
    mode = cluster.mode
    with pytest.raises(ValueError, match="mode"):
        cluster.route_via("ipip")
    assert cluster.mode == mode


def test_vxlan_build_and_close_removes_everything() -> None:
    tc = TestCluster(overlay="vxlan")
    with tc:
        assert tc.mode == "vxlan"
        n1 = tc.nodes[0]
        assert f"dev {n1.vxlan}" in _route(tc, n1.ns, tc.nodes[1].pod_cidr)
        procs = [tc.spawn(ns, ["sleep", "60"]) for ns in tc.namespaces]
        server = tc.http_server(tc.pod("pod-2b").ns, tc.pod("pod-2b").ip, 8080)
        tmpdir = tc.tmpdir
        assert os.path.isdir(tmpdir)
        names = _ns_names()
        assert all(ns in names for ns in tc.namespaces) and len(tc.namespaces) == 6
    assert all(proc.returncode is not None for proc in [*procs, server])
    assert tc.prefix not in _ns_names()
    assert not os.path.exists(tmpdir)
    tc.close()  # idempotent
    assert tc.prefix not in _ns_names()


def test_partial_build_is_cleaned_up(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: TestCluster, mode: str) -> None:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(TestCluster, "route_via", boom)
    tc = TestCluster()
    with pytest.raises(RuntimeError, match="injected"):
        tc.build()
    assert tc.prefix not in _ns_names()
    with pytest.raises(RuntimeError, match="already built"):
        tc.build()


def test_cleanup_stale_knows_cluster_namespaces() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert not pid_alive(dead.pid)
    stale = [f"ent{dead.pid}x0-n1", f"ent{dead.pid}x0-2b"]
    mine = f"ent{os.getpid()}xzz-n2"
    try:
        for ns in [*stale, mine]:
            subprocess.run(["ip", "netns", "add", ns], check=True)
        removed = cleanup_stale()
        assert set(stale) <= set(removed) and mine not in removed
        names = _ns_names()
        assert not any(ns in names for ns in stale) and mine in names
    finally:
        for ns in [*stale, mine]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
