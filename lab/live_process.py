"""Runs the live view (`ebpf-net-exporter flows --json`) inside a test node's namespace and
collects its JSON lines as they come."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lab.exporter_process import EXPORTER, REPO, wait_until
from lab.testnode import TestNode


class LiveProcess:
    def __init__(self, node: TestNode, args: Sequence[str] = (),
                 interfaces: str | None = None, attach: str | None = None) -> None:
        """attach: interfaces.attach (auto, tcx, clsact) through the environment."""
        self.node = node
        self.stderr_path = Path(tempfile.mkstemp(prefix=f"{node.prefix}-live-", suffix=".log")[1])
        self._stderr = open(self.stderr_path, "w")
        argv = [*EXPORTER, "flows", "--json", "--interfaces",
                interfaces or f"{node.prefix}v[ab]", *args]
        self.proc = subprocess.Popen(["ip", "netns", "exec", node.node_ns, *argv],
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     cwd=REPO, env=dict(os.environ, **(
                                         {"EBPF_NET_INTERFACES_ATTACH": attach} if attach
                                         else {})))
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.raw.append(line)
                self.lines.append(json.loads(line))

    def log(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()

    def wait_ready(self, timeout: float = 60) -> LiveProcess:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"live view exited with {self.proc.returncode}:\n"
                                     f"{self.log()}")
            return "msg=ready" in self.log()

        wait_until(ready, timeout, "the live view to be ready", interval=0.1)
        return self

    def matching(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        with self._lock:
            return [line for line in self.lines if predicate(line)]

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], what: str,
                 timeout: float = 20) -> list[dict[str, Any]]:
        return wait_until(lambda: self.matching(predicate), timeout, what)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        self._stderr.close()
        code = self.proc.returncode
        if code == 0:
            self.stderr_path.unlink(missing_ok=True)
        return code
