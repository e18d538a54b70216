"""The bash audit: interactive bash shells driven through tmux (a pseudo-terminal each), one as
root and one as nobody, type known command lines; exactly those records appear, in order, with
the right user, and ebpf_net_bash_commands_total counts them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.exporter_process import ExporterProcess, wait_until
from lab.testnode import TestNode
from tests.conftest import skip_or_fail

pytestmark = pytest.mark.kernel

SHELL = ["env", "-i", "HOME=/tmp", "HISTFILE=/dev/null", "PS1=$ ", "TERM=xterm",
         "/bin/bash", "--norc", "--noprofile", "-i"]
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


class Tmux:
    """A tmux server of this test's own (its own socket), killed at the end."""

    def __init__(self) -> None:
        self.socket = f"ebpf-net-test-{os.getpid()}"

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True,
                              capture_output=True, text=True, timeout=10).stdout

    def shell(self, name: str, argv: list[str]) -> int:
        """Starts a session running argv; returns the pid of its process."""
        self.run("new-session", "-d", "-s", name, "-x", "200", "-y", "50", *argv)
        return int(self.run("display-message", "-p", "-t", name, "#{pane_pid}").strip())

    def type(self, name: str, line: str) -> None:
        self.run("send-keys", "-t", name, "-l", line)
        self.run("send-keys", "-t", name, "Enter")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=10)


@pytest.fixture
def tmux(kernel_ready: None) -> Iterator[Tmux]:
    if shutil.which("tmux") is None or shutil.which("setpriv") is None:
        skip_or_fail("tmux and setpriv are needed (make setup installs them)")
    session = Tmux()
    try:
        yield session
    finally:
        session.close()


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_exactly_the_typed_commands_are_recorded_with_their_user(node: TestNode, tmux: Tmux,
                                                                  tmp_path: Path):
    log_file = tmp_path / "bash.jsonl"
    exporter = ExporterProcess(node, ["--collector.bash", "--no-collector.flows",
                                      "--no-collector.dns", "--no-collector.http",
                                      "--no-collector.tcp"],
                               config={"bash": {"log_file": str(log_file)}})
    try:
        exporter.wait_ready()
        root_pid = tmux.shell("root", SHELL)
        nobody_pid = tmux.shell("nobody", [*AS_NOBODY, *SHELL])
        root_lines = ["echo ebpf-audit-1", "true   # ebpf-audit 2 'quoted' \"too\"",
                      "for i in 1 2; do echo $i; done"]
        for line in root_lines:
            tmux.type("root", line)
        tmux.type("root", "")                       # an empty line is not a command
        tmux.type("nobody", "id -un")
        tmux.type("root", "exit")
        tmux.type("nobody", "exit")

        def ours() -> list[dict]:
            return [r for r in records(log_file) if r["pid"] in (root_pid, nobody_pid)]

        wait_until(lambda: len(ours()) >= len(root_lines) + 3, 20, "the typed commands")
        got = ours()
        by_root = [r["command"] for r in got if r["pid"] == root_pid]
        by_nobody = [r["command"] for r in got if r["pid"] == nobody_pid]
        assert by_root == [*root_lines, "exit"]
        assert by_nobody == ["id -un", "exit"]
        assert {(r["user"], r["uid"]) for r in got if r["pid"] == root_pid} == {("root", 0)}
        assert {(r["user"], r["uid"]) for r in got if r["pid"] == nobody_pid} == \
            {("nobody", 65534)}
        assert all(r["type"] == "bash_command" and not r["truncated"] for r in got)

        scrape = exporter.scrape()
        assert scrape.value("ebpf_net_bash_commands_total", user="nobody") == 2

        # root: as many as the root records (this machine may have other root shells)
        def root_counted() -> bool:
            counted = exporter.scrape().value("ebpf_net_bash_commands_total", user="root")
            return counted == sum(1 for r in records(log_file) if r["user"] == "root")

        wait_until(root_counted, 10, "the root count to match the root records")
    finally:
        assert exporter.stop() == 0, exporter.log()
