"""A simulated two-node Kubernetes-like cluster out of network namespaces.

Topology of one :class:`TestCluster` (N is a per-instance subnet octet, <p> a
:mod:`lab.testnode` prefix ``ent<pid>x<ctr>``, k = 1, 2 the node number)::

    pod netns <p>-ka                node netns <p>-nk                 (other node)
    eth0 10.N.k.2/32  ----------  <p>ka 10.N.k.1/32
    pod netns <p>-kb                <p>kb 10.N.k.1/32
    eth0 10.N.k.3/32  ----------  <p>uk 10.N.0.k/24  ---------------  <p>uj 10.N.0.j/24
                                  <p>xk 10.N.k.0/32  (VXLAN 42 over <p>uk, to 10.N.0.j)

Pods are wired Calico style: a /32 on the pod's eth0, a link-scope route to the
node-side address and a default route via it; the node has a /32 host route per
pod on the pod's veth. Node k's pod CIDR is 10.N.k.0/24; 10.N.0.k is its
InternalIP. The route to the other node's pod CIDR goes either straight over the
uplink (``routed``) or through the VXLAN device (``vxlan``, flannel style);
:meth:`TestCluster.route_via` switches between them at run time.

Services are nftables DNAT rules in every node namespace, like kube-proxy's:
ClusterIPs (from 10.N.100.0/24, on no interface) are DNATed in prerouting for pod
traffic and in output for node-local traffic; NodePorts are DNATed on their
node's InternalIP. Conntrack un-NATs the replies. Node-local traffic to a
ClusterIP needs some route for the first lookup before the output hook rewrites
the destination, so 10.N.100.0/24 points at the uplink (a real node's default
route plays that part).

The uplink veths have MTU 1550, so the VXLAN devices (50 bytes of
encapsulation less) get the pods' 1500 and both routing modes carry full-size
segments without path MTU discovery.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

from lab.netns import FORWARDING_SYSCTLS, LAB_NS_SYSCTLS, _ip, _new_prefix, _operstate
from lab.servers import READY_TIMEOUT
from lab.testnode import NetnsLab
from lab.traffic import _close_listener, _listener, _tcp_echo_on

__all__ = ["MODES", "SERVICE_TABLE", "ClusterNode", "ClusterPod", "TestCluster"]

MODES = ("routed", "vxlan")
SERVICE_TABLE = "ent_svc"
VXLAN_ID = 42
VXLAN_PORT = 4789
UPLINK_MTU = 1550  # the VXLAN device gets 1500, the pods' MTU
_NODES = (1, 2)
_POD_LETTERS = ("a", "b")


@dataclass
class ClusterPod:
    """One pod: its namespace (eth0 inside), address and node-side veth."""

    name: str  # "pod-1a"
    ns: str
    ip: str
    veth: str  # node-side end, in the node's namespace
    node: str  # "node-1"
    ip6: str = ""


@dataclass
class ClusterNode:
    """One node: its namespace, InternalIP, pod CIDR, devices and pods."""

    name: str  # "node-1"
    ns: str
    internal_ip: str
    pod_cidr: str
    uplink: str
    vxlan: str
    pods: list[ClusterPod] = field(default_factory=list)
    internal_ip6: str = ""
    pod_cidr6: str = ""

    # what lab.exporter_process.ExporterProcess runs an exporter in and names its files by
    @property
    def node_ns(self) -> str:
        return self.ns

    @property
    def prefix(self) -> str:
        return self.ns


class TestCluster(NetnsLab):
    """Two node namespaces with two pod namespaces each (see module doc).

    Node indexes (``node_index``) are positions in :attr:`nodes`: 0 is node-1,
    1 is node-2.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, overlay: str = "routed") -> None:
        """Name everything; nothing is created until :meth:`build`."""
        if overlay not in MODES:
            raise ValueError(f"overlay must be one of {MODES}, not {overlay!r}")
        self.overlay = overlay
        self.prefix = _new_prefix()
        self.n = 0
        self.mode = ""  # set by route_via(): the routing mode now in effect
        self.nodes: list[ClusterNode] = []
        self.tmpdir = ""
        self._procs = []
        self._subnet_reserved = False
        self._built = False

    def __repr__(self) -> str:
        return f"TestCluster(prefix={self.prefix!r}, n={self.n}, mode={self.mode!r})"

    # ---- naming ------------------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of the cluster, nodes first (known before build)."""
        p = self.prefix
        nodes = [f"{p}-n{k}" for k in _NODES]
        return nodes + [f"{p}-{k}{x}" for k in _NODES for x in _POD_LETTERS]

    @property
    def pods(self) -> list[ClusterPod]:
        """All pods, node by node."""
        return [pod for node in self.nodes for pod in node.pods]

    @property
    def service_cidr(self) -> str:
        """Where ClusterIPs come from."""
        return f"10.{self.n}.100.0/24"

    def service_ip(self, host: int) -> str:
        """ClusterIP number ``host`` (1..254) of the service CIDR."""
        return f"10.{self.n}.100.{host}"

    def pod(self, name: str) -> ClusterPod:
        """The pod called ``name`` ("pod-1a", "pod-1b", "pod-2a", "pod-2b")."""
        for pod in self.pods:
            if pod.name == name:
                return pod
        raise KeyError(f"{self!r} has no pod {name!r}: {[p.name for p in self.pods]}")

    def interfaces_regex(self, node_index: int) -> str:
        """A regex fully matching the node's pod veths, uplink and VXLAN device only."""
        node = self.nodes[node_index]
        names = [pod.veth for pod in node.pods] + [node.uplink, node.vxlan]
        return "|".join(re.escape(name) for name in names)

    def _set_subnet(self, n: int) -> None:
        p = self.prefix
        self.nodes = [
            ClusterNode(
                name=f"node-{k}",
                ns=f"{p}-n{k}",
                internal_ip=f"10.{n}.0.{k}",
                pod_cidr=f"10.{n}.{k}.0/24",
                uplink=f"{p}u{k}",
                vxlan=f"{p}x{k}",
                pods=[
                    ClusterPod(
                        name=f"pod-{k}{x}",
                        ns=f"{p}-{k}{x}",
                        ip=f"10.{n}.{k}.{host}",
                        veth=f"{p}{k}{x}",
                        node=f"node-{k}",
                        ip6=f"fd00:{n}:{k}::{host}",
                    )
                    for host, x in enumerate(_POD_LETTERS, start=2)
                ],
                internal_ip6=f"fd00:{n}::{k}",
                pod_cidr6=f"fd00:{n}:{k}::/64",
            )
            for k in _NODES
        ]

    def _gateway(self, k: int) -> str:
        """Node k's address on its pod veths (the pods' default gateway)."""
        return f"10.{self.n}.{k}.1"

    def _gateway6(self, k: int) -> str:
        return f"fd00:{self.n}:{k}::1"

    def _vxlan_ip(self, k: int) -> str:
        return f"10.{self.n}.{k}.0"

    # ---- lifecycle ---------------------------------------------------------

    def _create(self) -> None:
        """Namespaces, links, routes and the service table; apply the overlay routing mode;
        verify pod-to-pod connectivity within and across nodes."""
        self._set_subnet(self._reserve_subnet())
        self._build_links()
        self._configure_pods()
        self._configure_nodes()
        self._wait_links_up()
        for node in self.nodes:
            self.nft(node.ns, self._service_table())
        self.route_via(self.overlay)
        for node in self.nodes:
            self._verify_echo(node.pods[0], node.pods[1])

    def _build_links(self) -> None:
        """Namespaces, sysctls and every link (all still down on the node side)."""
        for ns in self.namespaces:
            _ip("netns", "add", ns)
        node1, node2 = self.nodes
        for node in self.nodes:
            cmds = ["link set lo up"]
            cmds += [
                f"link add {pod.veth} type veth peer name eth0 netns {pod.ns}"
                for pod in node.pods
            ]
            if node is node1:
                cmds.append(
                    f"link add {node1.uplink} mtu {UPLINK_MTU} type veth"
                    f" peer name {node2.uplink} mtu {UPLINK_MTU} netns {node2.ns}"
                )
            _ip("-n", node.ns, "-batch", "-", stdin="".join(f"{c}\n" for c in cmds))
        for node, other in ((node1, node2), (node2, node1)):
            vxlan = (
                f"id {VXLAN_ID} dstport {VXLAN_PORT} local {node.internal_ip}"
                f" remote {other.internal_ip} dev {node.uplink}"
            )
            _ip("-n", node.ns, "link", "add", node.vxlan, "type", "vxlan", *vxlan.split())
            # no IPv6 on the VXLAN device: no MLD or router solicitation ever goes through
            # it, so its packet counters count the pods' traffic only
            no_v6 = f"net.ipv6.conf.{node.vxlan}.disable_ipv6=1"
            self.run(node.ns, ["sysctl", "-qw", *LAB_NS_SYSCTLS, *FORWARDING_SYSCTLS, no_v6])
        for pod in self.pods:
            self.run(pod.ns, ["sysctl", "-qw", *LAB_NS_SYSCTLS])

    def _configure_pods(self) -> None:
        """Pod ends first, so the node-side ups later make every carrier change in one go."""
        for node_number, node in zip(_NODES, self.nodes, strict=True):
            gateway, gateway6 = self._gateway(node_number), self._gateway6(node_number)
            for pod in node.pods:
                _ip(
                    "-n",
                    pod.ns,
                    "-batch",
                    "-",
                    stdin=(
                        "link set lo up\n"
                        f"addr add {pod.ip}/32 dev eth0\n"
                        f"addr add {pod.ip6}/128 dev eth0 nodad\n"
                        "link set eth0 up\n"
                        f"route add {gateway} dev eth0 scope link\n"
                        f"route add default via {gateway} dev eth0\n"
                        f"route add {gateway6} dev eth0\n"
                        f"route add ::/0 via {gateway6} dev eth0\n"
                    ),
                )

    def _configure_nodes(self) -> None:
        for node_number, node in zip(_NODES, self.nodes, strict=True):
            gateway, gateway6 = self._gateway(node_number), self._gateway6(node_number)
            links = [pod.veth for pod in node.pods] + [node.uplink, node.vxlan]
            cmds = [f"addr add {gateway}/32 dev {pod.veth}" for pod in node.pods]
            cmds += [f"addr add {gateway6}/128 dev {pod.veth} nodad" for pod in node.pods]
            cmds += [
                f"addr add {node.internal_ip}/24 dev {node.uplink}",
                f"addr add {node.internal_ip6}/64 dev {node.uplink} nodad",
                f"addr add {self._vxlan_ip(node_number)}/32 dev {node.vxlan}",
            ]
            cmds += [f"link set {dev} up" for dev in links]
            # routes need their devices up
            cmds += [f"route add {pod.ip} dev {pod.veth} scope link" for pod in node.pods]
            cmds += [f"route add {pod.ip6} dev {pod.veth}" for pod in node.pods]
            cmds.append(f"route add {self.service_cidr} dev {node.uplink}")
            _ip("-n", node.ns, "-batch", "-", stdin="".join(f"{c}\n" for c in cmds))

    def _wait_links_up(self) -> None:
        # a VXLAN device has no carrier of its own: its operstate stays UNKNOWN once up
        up, vxlan_up = ("UP",), ("UNKNOWN", "UP")
        want = [(pod.ns, "eth0", up) for pod in self.pods]
        for node in self.nodes:
            want += [(node.ns, pod.veth, up) for pod in node.pods]
            want += [(node.ns, node.uplink, up), (node.ns, node.vxlan, vxlan_up)]
        deadline = time.monotonic() + READY_TIMEOUT
        while want:
            want = [(ns, dev, ok) for ns, dev, ok in want if _operstate(ns, dev) not in ok]
            if want and time.monotonic() > deadline:
                raise RuntimeError(f"{self!r}: links not up after {READY_TIMEOUT}s: {want}")
            if want:
                time.sleep(0.02)

    # ---- routing -----------------------------------------------------------

    def route_via(self, mode: str) -> None:
        """Route each node's traffic to the other node's pod CIDR over the uplink
        ("routed") or through the VXLAN devices ("vxlan"), then verify it with a TCP
        echo from pod-1a to pod-2a (in vxlan mode: one that both VXLAN devices sent)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        node1, node2 = self.nodes
        for node, other, j in ((node1, node2, 2), (node2, node1, 1)):
            if mode == "routed":
                via = f"via {other.internal_ip} dev {node.uplink}"
            else:
                via = f"via {self._vxlan_ip(j)} dev {node.vxlan} onlink"
            # IPv6 is natively routed in both modes (the VXLAN devices carry IPv4 only)
            _ip("-n", node.ns, "-batch", "-", stdin=(
                f"route replace {other.pod_cidr} {via}\n"
                f"route replace {other.pod_cidr6} via {other.internal_ip6} dev {node.uplink}\n"))
        self.mode = mode
        before = [self.link_packets(node.ns, node.vxlan)["tx"] for node in self.nodes]
        self._verify_echo(node1.pods[0], node2.pods[0])
        if mode == "vxlan":
            after = [self.link_packets(node.ns, node.vxlan)["tx"] for node in self.nodes]
            if not all(b > a for a, b in zip(before, after, strict=True)):
                raise RuntimeError(
                    f"{self!r}: the echo in vxlan mode did not go through the VXLAN devices"
                    f" (tx_packets {before} -> {after})\n{self._state()}"
                )

    def link_packets(self, ns: str, dev: str) -> dict[str, int]:
        """{"rx": packets, "tx": packets} of ``dev`` in namespace ``ns``."""
        out = self.run(ns, ["ip", "-j", "-s", "link", "show", "dev", dev]).stdout
        stats = json.loads(out)[0]["stats64"]
        return {"rx": int(stats["rx"]["packets"]), "tx": int(stats["tx"]["packets"])}

    def _verify_echo(self, client: ClusterPod, server: ClusterPod) -> None:
        """One ping/echo TCP connection client -> server, else RuntimeError."""
        srv = _listener(server.ns, server.ip, 0)
        try:
            _tcp_echo_on(srv, client.ns, server.ip, srv.getsockname()[1], 1)
        except Exception as exc:
            raise RuntimeError(
                f"{self!r}: no TCP connectivity {client.name} -> {server.name} ({server.ip}):"
                f" {exc!r}\n{self._state()}"
            ) from exc
        finally:
            _close_listener(srv)

    def _state(self) -> str:
        """Addresses and routes of every namespace, for error messages."""
        return "\n".join(
            f"{ns}:\n"
            + self.run(ns, ["ip", "-br", "addr"], check=False).stdout
            + self.run(ns, ["ip", "route"], check=False).stdout
            for ns in self.namespaces
        )

    # ---- services ----------------------------------------------------------

    @staticmethod
    def _service_table() -> str:
        # -100 is dstnat's value; this nft takes the keyword in prerouting only
        return (
            f"table ip {SERVICE_TABLE} {{\n"
            "  chain prerouting { type nat hook prerouting priority dstnat; policy accept; }\n"
            "  chain output { type nat hook output priority -100; policy accept; }\n"
            "}\n"
        )

    @staticmethod
    def _dnat_rules(daddr: str, port: int, backend_ip: str, backend_port: int,
                    proto: str) -> str:
        if proto not in ("tcp", "udp"):
            raise ValueError(f"proto must be tcp or udp, not {proto!r}")
        match = f"ip daddr {daddr} {proto} dport {port} dnat to {backend_ip}:{backend_port}"
        return "".join(
            f"add rule ip {SERVICE_TABLE} {chain} {match}\n" for chain in ("prerouting", "output")
        )

    def add_cluster_ip(
        self, vip: str, port: int, backend_ip: str, backend_port: int, proto: str = "tcp"
    ) -> None:
        """DNAT vip:port to backend_ip:backend_port in both nodes (pod and node traffic)."""
        rules = self._dnat_rules(vip, port, backend_ip, backend_port, proto)
        for node in self.nodes:
            self.nft(node.ns, rules)

    def add_node_port(
        self, node_index: int, port: int, backend_ip: str, backend_port: int,
        proto: str = "tcp",
    ) -> None:
        """DNAT the InternalIP:port of ``nodes[node_index]`` to backend_ip:backend_port."""
        node = self.nodes[node_index]
        self.nft(node.ns, self._dnat_rules(node.internal_ip, port, backend_ip, backend_port,
                                           proto))
