"""Part 5's workload: TCP connections opened, answered and closed one after the other on pod
a's loopback, by a C client and server (connection_loop.c). Loopback is not attached to the TC
programs, so what the exporter adds here is its tracepoint programs (sock:inet_sock_set_state,
tcp:tcp_probe, ...), which see every TCP socket on the node.

In C rather than Python: a Python loop's connection took about 100 us here against 65-75 us in
C, the difference interpreter time, so the exporter's share showed diluted (0.982 of the rate
without it where the C loop shows 0.958, in one run of 40 pairs of each, 2026-12-03)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from lab.testnode import TestNode

LOOP_SOURCE = Path(__file__).with_name("connection_loop.c")


class LoopBuildError(Exception):
    """The C loop could not be compiled (gcc missing or failing)."""


def loop_binary(node: TestNode) -> str:
    return f"{node.tmpdir}/connection_loop"


def build_loop(binary: str, source: Path = LOOP_SOURCE) -> None:
    command = ["gcc", "-O2", "-Wall", "-Werror", "-o", binary, str(source)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as error:
        raise LoopBuildError("gcc is not installed (make setup installs it)") from error
    except subprocess.CalledProcessError as error:
        raise LoopBuildError(f"{' '.join(command)} failed:\n{error.stderr}") from error


def prepare(node: TestNode) -> None:
    """Compiles the loop into the node's directory. Pod a keeps no TIME_WAIT sockets: tens of
    thousands of them from earlier runs would make every connect() search longer for a free
    port, so each run would be slower than the one before it, whatever the exporter does."""
    node.run(node.a_ns, ["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000",
                         "net.ipv4.tcp_max_tw_buckets=0"])
    build_loop(loop_binary(node))


def loop_argv(node: TestNode, seconds: float) -> list[str]:
    """The loop as a command for pod a: connections for `seconds`, or until SIGTERM."""
    return [loop_binary(node), f"{seconds:g}"]


def loop(node: TestNode, seconds: float) -> tuple[int, float]:
    """Connections made in about `seconds`, and the seconds they took."""
    result = node.run(node.a_ns, loop_argv(node, seconds), timeout=seconds + 30)
    outcome = json.loads(result.stdout)
    return int(outcome["connections"]), float(outcome["seconds"])
