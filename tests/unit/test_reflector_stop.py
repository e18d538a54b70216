"""Stopping the exporter is not a Kubernetes API failure: a call that stop() cuts short counts
no watch error (found by the end-to-end test, where it made EbpfNetKubernetesWatchFailing go
pending on every shutdown)."""

from __future__ import annotations

import threading

from exporter.k8s.cluster import JOBS, ClusterState
from exporter.k8s.health import Health
from exporter.k8s.watch import Reflector


def test_a_call_cut_by_stop_counts_no_error():
    health = Health()
    calling, cut = threading.Event(), threading.Event()

    def list_jobs(**kwargs):
        calling.set()
        cut.wait(5)
        raise ConnectionError("Response ended prematurely")

    reflector = Reflector(JOBS, list_jobs, ClusterState(60), health)
    reflector.start()
    assert calling.wait(5)
    reflector.stop()
    cut.set()
    reflector.join(5)
    assert health.error_counts()[JOBS] == 0


def test_a_call_failing_while_running_still_counts():
    health = Health()
    failed = threading.Event()

    def list_jobs(**kwargs):
        failed.set()
        raise ConnectionError("connection refused")

    reflector = Reflector(JOBS, list_jobs, ClusterState(60), health)
    reflector.start()
    assert failed.wait(5)
    reflector.stop()
    reflector.join(5)
    assert health.error_counts()[JOBS] >= 1
