"""A reader of a BPF ring buffer of fixed-size records, straight from its memory mapping.

bcc's reader calls back into Python once per record through ctypes; this one takes every
record committed since the last read as one numpy array, which costs the same for one record
as for thousands. It needs no bcc, only the map's file descriptor.

The kernel's layout (kernel/bpf/ringbuf.c): at offset 0 of the map's file a page holding the
consumer position, which the reader writes; at offset one page, read-only, a page holding the
producer position followed by the data area, which the kernel offers twice in a row so that a
record wrapping around the end reads as one run of bytes. This reader maps it once (the
second copy would count in the process's RSS again) and joins a wrapped run itself. Each
record starts with an 8-byte header, its length in the low 30 bits of the first word (bit 31:
still being written; bit 30: discarded), and takes its length plus the header rounded up to 8
bytes. Positions only grow; a record's place is its position modulo the data size."""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import logs

log = logs.get("ringbuf")

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_BYTES = 8


class RingError(Exception):
    """A record of an unexpected size: the reader and the program disagree on the layout."""


class FixedRecordRing:
    """Reads a ring buffer whose program reserves only records of `record` (a numpy dtype)."""

    def __init__(self, map_fd: int, data_bytes: int, record: np.dtype) -> None:
        page = mmap.PAGESIZE
        self.data_bytes = data_bytes
        self.record = record
        self.stride = (record.itemsize + HEADER_BYTES + 7) & ~7
        self.framed = np.dtype({"names": ["header", "record"], "formats": ["<u4", record],
                                "offsets": [0, HEADER_BYTES], "itemsize": self.stride})
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(map_fd, page + data_bytes, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=page)
        self._data = memoryview(self._producer)[page:]
        # the positions as one aligned 8-byte word each, read and written with one load or
        # store: struct packs and unpacks byte by byte, and the kernel reading a consumer
        # position half written (a 16 MiB boundary crossed, its high byte still old) saw
        # the ring full and dropped a record
        self._consumer_pos = np.frombuffer(self._consumer, dtype=np.uint64, count=1)
        self._producer_pos = np.frombuffer(self._producer, dtype=np.uint64, count=1)
        self.discarded = 0
        self.capacity = data_bytes // self.stride   # records it holds
        self.pending = 0                            # records waiting at the last read

    @classmethod
    def of(cls, program: Any, name: str, record: np.dtype) -> FixedRecordRing:
        """The ring buffer map `name` of a loaded program (its size is its max_entries)."""
        ring = program.table(name)
        return cls(ring.get_fd(), int(ring.max_entries), record)

    def read(self) -> np.ndarray:
        """Every record committed since the last read, oldest first (a copy)."""
        consumer = int(self._consumer_pos[0])
        producer = int(self._producer_pos[0])
        count = (producer - consumer) // self.stride
        self.pending = count
        if count == 0:
            return np.empty(0, dtype=self.record)
        start, size = consumer % self.data_bytes, count * self.stride
        if start + size <= self.data_bytes:
            raw = self._data[start:start + size].tobytes()
        else:                           # wrapped around the end
            raw = self._data[start:].tobytes() + self._data[:start + size - self.data_bytes]
        framed = np.frombuffer(raw, dtype=self.framed)
        headers = framed["header"]
        busy = np.flatnonzero(headers & BUSY_BIT)
        if busy.size:                   # reserved, not yet committed: read from there next time
            framed, headers = framed[:busy[0]], headers[:busy[0]]
        lengths = headers & ~np.uint32(BUSY_BIT | DISCARD_BIT)
        if np.any(lengths != self.record.itemsize):
            raise RingError(f"a record of {int(lengths[lengths != self.record.itemsize][0])} "
                            f"bytes, expected {self.record.itemsize}")
        kept = (headers & DISCARD_BIT) == 0
        self.discarded += int(len(framed) - np.count_nonzero(kept))
        self._consumer_pos[0] = consumer + len(framed) * self.stride
        return framed["record"][kept]

    def close(self) -> None:
        del self._consumer_pos, self._producer_pos
        self._data.release()
        self._producer.close()
        self._consumer.close()


class PollThread:
    """Calls `poll` every `seconds` in a thread of its own until stopped: the reader of a ring
    buffer the kernel writes without waking anyone. A RingError (the reader and the program
    disagree on the layout: every later read would fail too) ends it with one error line;
    any other failure is logged with its batch, and the next poll goes on. `what` names the
    records in those lines."""

    def __init__(self, name: str, what: str, poll: Callable[[], None], seconds: float) -> None:
        self.name, self.what, self.poll, self.seconds = name, what, poll, seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            try:
                self.poll()
            except RingError as e:
                log.error(f"{self.what} cannot be read", extra={"error": str(e)})
                return
            except Exception as e:
                log.warning(f"{self.what}: a batch failed", extra={"error": str(e)},
                            exc_info=True)
