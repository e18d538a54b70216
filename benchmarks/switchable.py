"""An exporter whose programs can be switched off and on while it runs, for parts 2 and 5:
`python switchable.py SOCKET python -m exporter ARGS...` (the `prefix` of an ExporterProcess),
and `Switch(SOCKET)` on the benchmark's side.

It runs the tree's exporter through `exporter.cli.main(..., started=...)` and drives its
`Exporter.set_attached`: "off" takes every program off the kernel's paths (its tcx links
closed or TC filters deleted, its tracepoints and raw tracepoints detached) and with
"off uprobes" its HTTPS uprobes on OpenSSL too; "on" attaches the same loaded programs again.
The uprobes are switched for the HTTPS stream only, which runs OpenSSL (no other stream does).
With uprobe_multi links (Linux >= 6.6) that adds little; a perf event per probe takes some
100 ms to close (an RCU grace period), 1.6 s for a file's 15. With clsact, the qdiscs stay:
with no filter left on one, the kernel's hook finds no classifier to run (its mini-qdisc
pointer is empty) and the packet goes on: a check, not a program run.
Maps, threads and counts stay as they are, so a workload run with the exporter switched off
and one with it on, a second apart, differ by the programs' cost alone, without the minutes of
start-ups (and the host's slowdown after each compile, benchmarks/startup.py) that a fresh
exporter per round costs. Left on throughout: the bash collector's uretprobe, which runs only
when an interactive bash reads a line.

The switch listens in a thread started before the exporter, so it keeps the capabilities that
the exporter's own threads give up once attached (exporter/kernel/privileges.py)."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path
from typing import Any

SWITCH_TIMEOUT = 30.0


class SwitchError(Exception):
    """The exporter could not switch its programs, or did not answer."""


class Switch:
    """The benchmark's end: one connection to the exporter's switch."""

    def __init__(self, path: Path, timeout: float = SWITCH_TIMEOUT) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.settimeout(timeout)
        self._socket.connect(str(path))
        self._replies = self._socket.makefile("r")

    def set(self, on: bool, uprobes: bool = False) -> int:
        """Switches the programs on or off, and with `uprobes` the HTTPS program's uprobes on
        OpenSSL too; returns how many attachments changed."""
        command = ("on" if on else "off") + (" uprobes" if uprobes else "")
        self._socket.sendall(f"{command}\n".encode())
        reply = self._replies.readline().strip()
        status, _, detail = reply.partition(" ")
        if status != "ok":
            raise SwitchError(f"exporter's switch: {reply or 'no answer'}")
        return int(detail)

    def close(self) -> None:
        self._replies.close()
        self._socket.close()


def _serve(listener: socket.socket, exporters: list[Any]) -> None:
    while True:
        connection, _ = listener.accept()
        with connection, connection.makefile("rw") as stream:
            for line in stream:
                command = line.strip()
                try:
                    state, _, what = command.partition(" ")
                    if state not in ("on", "off") or what not in ("", "uprobes"):
                        raise ValueError(f"unknown command {command!r}")
                    if not exporters:
                        raise RuntimeError("the exporter has not started yet")
                    changed = exporters[0].set_attached(state == "on", what == "uprobes")
                    stream.write(f"ok {changed}\n")
                except Exception as e:  # the benchmark shows it; the exporter keeps running
                    stream.write(f"error {type(e).__name__}: {e}\n")
                stream.flush()


def main() -> None:
    from wrapping import exporter_arguments

    path = Path(sys.argv[1])
    arguments = exporter_arguments("switchable.py", sys.argv[2:])
    exporters: list[Any] = []
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    threading.Thread(target=_serve, args=(listener, exporters), name="switch",
                     daemon=True).start()
    from exporter import cli

    cli.main(arguments, started=exporters.append)


if __name__ == "__main__":
    main()
