"""The bash audit (opt-in): one structured record per command line an interactive bash reads,
from bpf/bash.c's uretprobe on readline, written as a JSON line to stdout or a file; and
ebpf_net_bash_commands_total{user}.

What is recorded: the time, the bash process's pid, the uid and its user name (from this
host's user database), and the line as typed, cut at 511 bytes: secrets typed on a command
line are recorded too."""

from __future__ import annotations

import json
import pwd
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
from prometheus_client.core import CounterMetricFamily

from ..kernel.maps import CounterArray
from ..kernel.ringbuf import FixedRecordRing, PollThread
from ..serving.cardinality import SeriesStore
from ..serving.selfmetrics import KernelStats

LINE_BYTES = 512            # BASH_LINE_BYTES in bpf/bash.c
BASH_COMMAND = np.dtype({
    "names": ["time_ns", "pid", "uid", "length", "line"],
    "formats": ["<u8", "<u4", "<u4", "<i4", ("S", LINE_BYTES)],
    "offsets": [0, 8, 12, 16, 24],
    "itemsize": 24 + LINE_BYTES,
})
POLL_MILLISECONDS = 100


@dataclass(frozen=True)
class Command:
    wall: float
    pid: int
    uid: int
    user: str
    line: str
    truncated: bool

    def record(self) -> dict[str, Any]:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.wall))
        return {"time": f"{seconds}.{int(self.wall % 1 * 1e6):06d}Z", "type": "bash_command",
                "pid": self.pid, "uid": self.uid, "user": self.user, "command": self.line,
                "truncated": self.truncated}


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)     # a uid without an entry in this host's user database


def decode(raw: bytes, monotonic_to_wall: float,
           names: Callable[[int], str] = user_name) -> Command | None:
    if len(raw) < BASH_COMMAND.itemsize:
        return None
    record = np.frombuffer(raw[:BASH_COMMAND.itemsize], dtype=BASH_COMMAND)[0]
    length = int(record["length"])
    text = bytes(record["line"]).split(b"\0", 1)[0].decode(errors="replace")
    if not text.strip():
        return None         # blank: not a command
    uid = int(record["uid"])
    return Command(int(record["time_ns"]) / 1e9 + monotonic_to_wall, int(record["pid"]), uid,
                   names(uid), text, length >= LINE_BYTES)


class CommandLog:
    """Where the records go: a JSON line each, to stdout or appended to a file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._out: TextIO = open(path, "a") if path else sys.stdout
        self._lock = threading.Lock()

    def write(self, command: Command) -> None:
        with self._lock:
            self._out.write(json.dumps(command.record()) + "\n")
            self._out.flush()

    def close(self) -> None:
        if self.path:
            self._out.close()


class KernelBashSource:
    """bpf/bash.c's ring buffer of command records and its count of records lost."""

    def __init__(self, program: Any) -> None:
        self.program = program
        self._lost = CounterArray("map_update_failures", program.table("map_update_failures"))
        self._ring: FixedRecordRing | None = None
        self._on_record: Callable[[bytes], None] = lambda _: None

    def open(self, on_record: Callable[[bytes], None]) -> None:
        self._ring = FixedRecordRing.of(self.program, "bash_commands", BASH_COMMAND)
        self._on_record = on_record

    def consume(self) -> None:
        """Hands over every record in the ring now."""
        if self._ring is None:
            return
        for record in self._ring.read():
            self._on_record(record.tobytes())

    def lost(self) -> int:
        return int(self._lost.read_deltas()[0])


class BashCollector:
    name = "bash"

    def __init__(self, source: KernelBashSource | Any, output: CommandLog, stats: KernelStats,
                 max_series: int, ttl_seconds: float) -> None:
        self.source = source
        self.output = output
        self.stats = stats
        self._commands = SeriesStore("ebpf_net_bash_commands_total", ["user"], [],
                                     max_series, ttl_seconds)
        self._lock = threading.Lock()
        self._reader = PollThread("bash-audit", "bash commands", source.consume,
                                  POLL_MILLISECONDS / 1000)
        # CLOCK_MONOTONIC (the kernel's timestamps) to wall time
        self._offset = time.time() - time.monotonic()
        source.open(self.on_record)

    def on_record(self, raw: bytes) -> None:
        command = decode(raw, self._offset)
        if command is None:
            return
        self.output.write(command)
        with self._lock:
            self._commands.add((command.user,), (1.0,))

    def start(self) -> None:
        self._reader.start()

    def stop(self) -> None:
        self._reader.stop()
        self.source.consume()      # what was typed before the stop
        self.output.close()

    def stores(self) -> Sequence[SeriesStore]:
        return (self._commands,)

    def describe(self) -> Iterable[CounterMetricFamily]:
        return self._families()

    def collect(self) -> Iterable[CounterMetricFamily]:
        self.stats.add_failures("bash_commands", float(self.source.lost()))
        with self._lock:
            self._commands.expire()
            return self._families()

    def _families(self) -> list[CounterMetricFamily]:
        family = CounterMetricFamily(
            "ebpf_net_bash_commands", "Command lines read by interactive bash shells "
            "(readline), by the user running the shell.", labels=["user"])
        for labels, (value,) in self._commands.items():
            family.add_metric(labels, value)
        return [family]
