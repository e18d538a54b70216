"""Shared fixtures. Kernel tests need root and a BPF-capable kernel: they skip with the reason
outside CI and fail in CI (CI set), where they must run."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from types import FrameType

import pytest

KERNEL_TOOLS = ("ip", "tc", "nft", "curl", "dig", "dnsmasq", "iperf3")


def _interrupted(number: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(number).name}")


def pytest_configure(config: pytest.Config) -> None:
    # A SIGTERM (a CI timeout, a kill) would end pytest without tearing down the test nodes:
    # their namespaces, servers and exporters would outlive the run. Pytest runs the fixtures'
    # teardown on KeyboardInterrupt, so SIGTERM becomes one.
    signal.signal(signal.SIGTERM, _interrupted)


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"kernel tests must run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kernel_ready() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root: loads BPF programs and builds network namespaces")
    missing = [tool for tool in KERNEL_TOOLS if shutil.which(tool) is None]
    if missing:
        skip_or_fail(f"missing tools {', '.join(missing)} (make setup installs them)")
    try:
        import bcc  # noqa: F401
    except ImportError:
        skip_or_fail("bcc is not importable (Debian's python3-bpfcc; make setup installs it)")


@pytest.fixture(scope="module")
def node(kernel_ready: None) -> Iterator[object]:
    from lab.testnode import TestNode

    with TestNode() as built:
        yield built


@pytest.fixture(scope="module")
def cluster(kernel_ready: None) -> Iterator[object]:
    """A built two-node TestCluster (lab/testcluster.py), routed mode to start with."""
    from lab.testcluster import TestCluster

    with TestCluster() as built:
        yield built


@pytest.fixture(scope="module")
def exporter(node: object) -> Iterator[object]:
    """One exporter on the module's node, with default settings."""
    from lab.exporter_process import ExporterProcess

    process = ExporterProcess(node)  # type: ignore[arg-type]
    try:
        yield process.wait_ready()
    finally:
        code = process.stop()
        assert code == 0, f"exporter exited with {code}:\n{process.log()}"
