"""An exporter whose programs can be switched off and on while it runs, for parts 2 and 5:
`python switchable.py SOCKET python -m exporter ARGS...` (the `prefix` of an ExporterProcess),
and `Switch(SOCKET)` on the benchmark's side.

"off" takes every program of the exporter off the kernel's paths: its tcx links (closed) or
TC filters (deleted from the interfaces it attached), its tracepoints and raw tracepoints
(CompiledProgram.detach_tracepoints), and with "off uprobes" its uprobes too (closed); "on"
attaches the same loaded programs again, with new links or filters of the same priority,
handle and name. The uprobes are switched for the HTTPS stream only, which runs OpenSSL (no
other stream does).
With uprobe_multi links (Linux >= 6.6) that adds little; a perf event per probe takes some
100 ms to close (an RCU grace period), 1.6 s for a file's 15. With clsact, the qdiscs stay:
with no filter left on one, the kernel's hook finds no classifier to run (its mini-qdisc
pointer is empty) and the packet goes on: a check, not a program run.
Maps, threads and counts stay as they are, so a workload run with the exporter switched off
and one with it on, a second apart, differ by the programs' cost alone, without the minutes of
start-ups (and the host's slowdown after each compile, benchmarks/startup.py) that a fresh
exporter per round costs. The bash collector's uretprobe, which runs only when an interactive
bash reads a line, is switched with the uprobes.

The switch listens in a thread started before the exporter, so it keeps the capabilities that
the exporter's own threads give up once attached (exporter/kernel/privileges.py)."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
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


@dataclass
class _Attachments:
    """What the exporter attached, recorded as it attaches."""
    programs: list[Any] = field(default_factory=list)     # the CompiledPrograms
    # a uprobe_multi link's or a uprobe perf event's descriptor -> (how it was made, with
    # what): made again from the resolved offsets (resolving a symbol again reads the file)
    links: dict[int, tuple[Callable[..., int], tuple[Any, ...]]] = field(default_factory=dict)
    tc_fds: dict[int, int] = field(default_factory=dict)     # parent -> program fd
    tc_filter: dict[str, Any] = field(default_factory=dict)  # priority, handle, name
    tcx: list[Any] = field(default_factory=list)             # the exporter's TcxAttachers
    monitors: list[Any] = field(default_factory=list)
    on: bool = True
    uprobes_on: bool = True


def _record(attachments: _Attachments) -> None:
    from exporter.kernel import bpfsys, compiler, interfaces, perfevents, tcx

    compile_program = compiler.Compiler.compile

    def recording_compile(self: Any, *args: Any) -> Any:
        program = compile_program(self, *args)
        attachments.programs.append(program)
        return program

    compiler.Compiler.compile = recording_compile    # type: ignore[method-assign]

    def recording(make: Callable[..., int]) -> Callable[..., int]:
        def attach(*args: Any) -> int:
            fd = make(*args)
            attachments.links[fd] = (make, args)
            return fd
        return attach

    bpfsys.uprobe_multi_link = recording(bpfsys.uprobe_multi_link)
    perfevents.uprobe = recording(perfevents.uprobe)

    attacher_init = interfaces.TcAttacher.__init__
    tcx_init = tcx.TcxAttacher.__init__
    monitor_init = interfaces.InterfaceMonitor.__init__

    def attacher(self: Any, ingress_fd: int, egress_fd: int, *args: Any, **kwargs: Any) -> None:
        attacher_init(self, ingress_fd, egress_fd, *args, **kwargs)
        attachments.tc_fds = {interfaces.INGRESS: ingress_fd, interfaces.EGRESS: egress_fd}
        attachments.tc_filter = {"prio": self.priority, "handle": self.handle, "name": self.name}

    def tcx_attacher(self: Any, *args: Any, **kwargs: Any) -> None:
        tcx_init(self, *args, **kwargs)
        attachments.tcx.append(self)

    def monitor(self: Any, *args: Any, **kwargs: Any) -> None:
        monitor_init(self, *args, **kwargs)
        attachments.monitors.append(self)

    interfaces.TcAttacher.__init__ = attacher
    tcx.TcxAttacher.__init__ = tcx_attacher
    interfaces.InterfaceMonitor.__init__ = monitor


def _run_side_by_side(actions: list[Callable[[], Any]]) -> int:
    """Runs the attaches or detaches at once; returns how many. Closing a tracepoint's or a
    uprobe's perf event waits for an RCU grace period (60-110 ms each on Linux 6.18), and
    closes made side by side wait partly together."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(actions) or 1) as pool:
        for done in [pool.submit(action) for action in actions]:
            done.result()
    return len(actions)


def _relink(fd: int, made_as: tuple[Callable[..., int], tuple[Any, ...]], on: bool) -> None:
    make, args = made_as
    replacement = make(*args) if on else os.open(os.devnull, os.O_RDONLY)
    os.dup2(replacement, fd)
    os.close(replacement)


def _switch(attachments: _Attachments, on: bool, uprobes: bool = False) -> int:
    from pyroute2 import IPRoute

    actions: list[Callable[[], Any]] = []
    if uprobes and on != attachments.uprobes_on:
        # a link's or event's descriptor stays the exporter's: off puts /dev/null in its
        # place (which closes the link or event), on a new one of the same probes
        for fd, made_as in list(attachments.links.items()):
            actions.append(functools.partial(_relink, fd, made_as, on))
        attachments.uprobes_on = on
    if on == attachments.on:
        return _run_side_by_side(actions)
    for program in attachments.programs:
        for tracepoint in program.tracepoints:
            actions.append(tracepoint.attach if on else tracepoint.detach)
    changed = _run_side_by_side(actions)
    links = [link for m in attachments.monitors for link in list(m.attached.values())]
    if attachments.tcx:     # the TcAttacher inside a TcxAttacher removes old filters only
        for attacher in attachments.tcx:
            for link in links:
                (attacher.link_programs if on else attacher.unlink_programs)(link)
                changed += 2
        attachments.on = on
        return changed
    with IPRoute() as ipr:
        for link in links:
            for parent, fd in attachments.tc_fds.items():
                if on:
                    ipr.tc("replace-filter", "bpf", link.index, fd=fd, parent=parent,
                           classid=1, direct_action=True, **attachments.tc_filter)
                else:
                    ipr.tc("del-filter", "bpf", link.index, parent=parent,
                           prio=attachments.tc_filter["prio"],
                           handle=attachments.tc_filter["handle"])
                changed += 1
    attachments.on = on
    return changed


def _serve(listener: socket.socket, attachments: _Attachments) -> None:
    while True:
        connection, _ = listener.accept()
        with connection, connection.makefile("rw") as stream:
            for line in stream:
                command = line.strip()
                try:
                    state, _, what = command.partition(" ")
                    if state not in ("on", "off") or what not in ("", "uprobes"):
                        raise ValueError(f"unknown command {command!r}")
                    changed = _switch(attachments, state == "on", what == "uprobes")
                    stream.write(f"ok {changed}\n")
                except Exception as e:  # the benchmark shows it; the exporter keeps running
                    stream.write(f"error {type(e).__name__}: {e}\n")
                stream.flush()


def main() -> None:
    from wrapping import exporter_arguments, run_exporter

    path = Path(sys.argv[1])
    arguments = exporter_arguments("switchable.py", sys.argv[2:])
    attachments = _Attachments()
    _record(attachments)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    threading.Thread(target=_serve, args=(listener, attachments), name="switch",
                     daemon=True).start()
    run_exporter(arguments)


if __name__ == "__main__":
    main()
