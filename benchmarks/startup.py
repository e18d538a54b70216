"""Part 4: from launching the exporter to `/readyz` answering 200 (programs compiled, loaded and
attached to the test node's veths), and its memory once ready."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.exporter_process import REPO, ExporterProcess
from lab.testnode import TestNode

from .procstat import Memory, memory

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


def start(node: TestNode, config: dict[str, Any] | None = None,
          source: Path = REPO, prefix: Sequence[str] = ()) -> Started:
    """Launches the exporter (every collector on) of the `source` tree in the node's namespace
    (through `prefix`, a command that runs it) and waits until ready; the caller stops it."""
    launched = time.monotonic()
    exporter = ExporterProcess(node, config=config, source=source, prefix=prefix)
    try:
        while exporter.get("/readyz", timeout=2)[0] != 200:
            if exporter.proc.poll() is not None:
                raise RuntimeError(f"exporter exited with {exporter.proc.returncode}:\n"
                                   f"{exporter.log()[-2000:]}")
            if time.monotonic() - launched > READY_TIMEOUT:
                raise RuntimeError(f"exporter not ready after {READY_TIMEOUT:g} s")
            time.sleep(POLL_SECONDS)
        seconds = time.monotonic() - launched
        return Started(exporter, seconds, memory(exporter.proc.pid))
    except BaseException:
        exporter.stop()
        raise
