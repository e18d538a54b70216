"""Part 4: from launching the exporter to `/readyz` answering 200 (programs compiled, loaded and
attached to the test node's veths), its memory once ready, and the peak of start-up: the
exporter's and its compiler process's (exporter/kernel/compiler.py) peak RSS added up, which
is what a container's memory limit has to hold (an upper bound: the two peaks need not
coincide)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.exporter_process import REPO, ExporterProcess, children
from lab.testnode import TestNode

from .procstat import Memory, memory, peak_rss_mib

READY_TIMEOUT = 120.0
# Measuring starts this long after /readyz: right after the start-up's 3.5 CPU-seconds of
# compiling, these VMs ran the workloads some 8% slower for a few seconds with nothing running
# inside (benchmarks/notes.md, part 2): the host's doing, not the exporter's cost once it runs.
SETTLE_SECONDS = 3.0
POLL_SECONDS = 0.02


@dataclass(frozen=True)
class Started:
    exporter: ExporterProcess
    seconds: float          # launch to ready
    memory: Memory          # right after ready
    peak_mib: float         # the exporter's peak RSS plus its compiler's


def start(node: TestNode, config: dict[str, Any] | None = None,
          source: Path = REPO, prefix: Sequence[str] = ()) -> Started:
    """Launches the exporter (every collector on) of the `source` tree in the node's namespace
    (through `prefix`, a command that runs it) and waits until ready; the caller stops it."""
    launched = time.monotonic()
    exporter = ExporterProcess(node, config=config, source=source, prefix=prefix)
    compiler_peaks: dict[int, float] = {}
    try:
        while exporter.get("/readyz", timeout=2)[0] != 200:
            for child in children(exporter.proc.pid):
                try:
                    peak = peak_rss_mib(child)
                except OSError:
                    continue        # it ended meanwhile
                compiler_peaks[child] = max(peak, compiler_peaks.get(child, 0.0))
            if exporter.proc.poll() is not None:
                raise RuntimeError(f"exporter exited with {exporter.proc.returncode}:\n"
                                   f"{exporter.log()[-2000:]}")
            if time.monotonic() - launched > READY_TIMEOUT:
                raise RuntimeError(f"exporter not ready after {READY_TIMEOUT:g} s")
            time.sleep(POLL_SECONDS)
        seconds = time.monotonic() - launched
        ready = memory(exporter.proc.pid)
        return Started(exporter, seconds, ready,
                       ready.peak_rss_mib + max(compiler_peaks.values(), default=0.0))
    except BaseException:
        exporter.stop()
        raise
