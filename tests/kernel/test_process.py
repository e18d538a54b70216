"""The process label: curl and a Python client in the same network namespace, to the same
server, are told apart in the TCP metrics and in the live view, which also names the cgroup
(and the pod UID and container id a Kubernetes-style cgroup path carries)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.kernel.cgroups import cgroup2_mount
from lab.exporter_process import ExporterProcess, wait_until
from lab.live_process import LiveProcess
from lab.testnode import TestNode

pytestmark = pytest.mark.kernel

PORT = 7701
PYTHON_CLIENT = """
import socket, sys
for _ in range(2):
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
        s.sendall(b"GET /index.html HTTP/1.0\\r\\n\\r\\n")
        while s.recv(65536):
            pass
"""
# the name the kernel gives a process it execs: the file name, cut to 15 characters
PYTHON_COMM = Path(sys.executable).name[:15]


@pytest.fixture(scope="module")
def pod_cgroup(kernel_ready: None) -> Iterator[Path]:
    """A cgroup named like a Kubernetes container's, as the systemd driver names them."""
    root = cgroup2_mount()
    if root is None:
        pytest.skip("no cgroup2 hierarchy mounted")
    pod_uid = str(uuid.uuid4())
    container = uuid.uuid4().hex * 2
    pod = root / f"ebpf-net-test-{os.getpid()}.slice" / \
        f"kubepods-besteffort-pod{pod_uid.replace('-', '_')}.slice"
    path = pod / f"cri-containerd-{container}.scope"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        for directory in (path, pod, pod.parent):
            directory.rmdir()


def test_curl_and_python_are_told_apart(node: TestNode, pod_cgroup: Path):
    node.http_server(node.b_ns, node.b_ip, PORT)
    exporter = ExporterProcess(node, config={"tcp": {"process_label": True}})
    live = None
    try:
        exporter.wait_ready()
        live = LiveProcess(node, ["--tcp", "--port", str(PORT)]).wait_ready()
        # curl runs in the Kubernetes-style cgroup; the Python client where the test runs
        subprocess.run(
            ["sh", "-c", f'echo $$ > {pod_cgroup}/cgroup.procs && exec ip netns exec '
                         f'{node.a_ns} curl -s -o /dev/null http://{node.b_ip}:{PORT}/'],
            check=True, timeout=30)
        node.run(node.a_ns, [sys.executable, "-c", PYTHON_CLIENT, node.b_ip, str(PORT)])

        labels = {"src_ip": node.a_ip, "dst_ip": node.b_ip, "dst_port": str(PORT)}
        opened = "ebpf_net_tcp_connections_opened_total"
        scrape = exporter.wait_for(
            lambda s: s.value("ebpf_net_tcp_connections_closed_total", **labels) >= 6,
            "3 connections closed on both sides")
        assert scrape.value(opened, role="client", process="curl", **labels) == 1
        assert scrape.value(opened, role="client", process=PYTHON_COMM, **labels) == 2
        # the server side: python's http.server, which read each request
        assert scrape.value(opened, role="server", process=PYTHON_COMM, **labels) == 3
        assert scrape.value(opened, **labels) == 6
        assert scrape.value("ebpf_net_tcp_active_connections", **labels) == 0

        wait_until(lambda: len(live.lines) >= 3, 20, "3 flow lines")
        lines = live.matching(lambda x: True)
        assert [line["state"] for line in lines] == ["closed"] * 3
        by_process = sorted(line["process"] for line in lines)
        assert by_process == sorted(["curl", PYTHON_COMM, PYTHON_COMM])
        (curl,) = [line for line in lines if line["process"] == "curl"]
        relative = "/" + str(pod_cgroup.relative_to(cgroup2_mount()))
        assert curl["cgroup"] == relative
        assert curl["pod_uid"] == pod_cgroup.parent.name.removeprefix(
            "kubepods-besteffort-pod").removesuffix(".slice").replace("_", "-")
        assert curl["container_id"] == pod_cgroup.name.removeprefix(
            "cri-containerd-").removesuffix(".scope")
    finally:
        if live is not None:
            assert live.stop() == 0, live.log()
        assert exporter.stop() == 0, exporter.log()
