"""The reader thread of the ring buffers (exporter/kernel/ringbuf.py, PollThread)."""

from __future__ import annotations

import logging
import threading

import pytest

from exporter.kernel.ringbuf import PollThread, RingError


def test_a_failed_batch_is_logged_and_reading_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls, done = [], threading.Event()

    def poll() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a bad batch")
        if len(calls) == 3:
            done.set()

    reader = PollThread("test-reader", "test records", poll, 0.001)
    with caplog.at_level(logging.WARNING, logger="ebpf_net_exporter.ringbuf"):
        reader.start()
        assert done.wait(5)
        reader.stop()
    assert [r.getMessage() for r in caplog.records] == ["test records: a batch failed"]


def test_a_layout_mismatch_ends_the_reader_with_one_error(
        caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def poll() -> None:
        calls.append(1)
        raise RingError("a record of 12 bytes, expected 16")

    reader = PollThread("test-reader", "test records", poll, 0.001)
    with caplog.at_level(logging.ERROR, logger="ebpf_net_exporter.ringbuf"):
        reader.start()
        assert reader._thread is not None
        reader._thread.join(5)
        assert not reader._thread.is_alive()
    assert calls == [1]
    assert [r.getMessage() for r in caplog.records] == ["test records cannot be read"]
