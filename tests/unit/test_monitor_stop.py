"""Stopping the interface monitor is bounded: a detach that hangs (a netlink call that never
answers) must not hold the process past its grace period, and the log must say where it hung
and which interfaces may keep their filters."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from exporter.kernel.interfaces import InterfaceMonitor, Link, NameFilter

POD_VETH = Link(index=7, name="vethpod1", ethernet=True, kind="veth", master=None, lower=None)


class HangingAttacher:
    """Attaches at once; its detach waits until released, as a stuck netlink call would."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release
        self.detaching = threading.Event()

    def links(self) -> list[Link]:
        return [POD_VETH]

    def attach(self, link: Link) -> None:
        pass

    def hanging_in_detach(self) -> None:
        self.detaching.set()
        self.release.wait(30)

    def detach(self, link: Link) -> None:
        self.hanging_in_detach()

    def close(self) -> None:
        pass


@pytest.fixture
def release():
    event = threading.Event()
    yield event
    event.set()         # lets the monitor's thread finish after the test


def test_a_hanging_detach_ends_the_stop_in_time_with_the_stacks_and_the_interfaces(
        release, capfd, caplog):
    attacher = HangingAttacher(release)
    detached: list[str] = []
    monitor = InterfaceMonitor(NameFilter(["veth.*"], []), lambda: attacher,
                               lambda link: None, lambda link: detached.append(link.name))
    monitor.start(timeout=5)
    assert list(monitor.attached) == [POD_VETH.index]

    began = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="ebpf_net_exporter.interfaces"):
        assert monitor.stop(timeout=0.5) is False
    took = time.monotonic() - began

    assert attacher.detaching.is_set()
    assert 0.5 <= took < 5
    assert detached == []
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "interfaces not all detached in time: their filters stay until the next start "
        "replaces them; thread stacks follow"]
    assert errors[0].interfaces == "vethpod1"
    # faulthandler writes to the process's stderr: the stuck thread's frames are there
    assert "hanging_in_detach" in capfd.readouterr().err


def test_a_stop_that_detaches_in_time_says_so(release):
    release.set()
    attacher = HangingAttacher(release)
    detached: list[str] = []
    monitor = InterfaceMonitor(NameFilter(["veth.*"], []), lambda: attacher,
                               lambda link: None, lambda link: detached.append(link.name))
    monitor.start(timeout=5)
    assert monitor.stop(timeout=5) is True
    assert detached == ["vethpod1"]
    assert monitor.attached == {}
