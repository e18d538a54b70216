"""An exporter whose programs can be switched off and on while it runs, for parts 2 and 5:
`python switchable.py SOCKET python -m exporter ARGS...` (the `prefix` of an ExporterProcess),
and `Switch(SOCKET)` on the benchmark's side.

"off" takes every program of the exporter off the kernel's paths: its tcx links (closed) or
TC filters (deleted from the interfaces it attached), its tracepoints and raw tracepoints, and
its uprobes on OpenSSL (closed, as bcc's detach does); "on" attaches the same loaded programs
again, with new links or filters of the same priority, handle and name. With clsact, the qdiscs
stay: with no filter left on one, the kernel's hook finds no classifier to run (its mini-qdisc
pointer is empty) and the packet goes on: a check, not a program run.
Maps, threads and counts stay as they are, so a workload run with the exporter switched off
and one with it on, a second apart, differ by the programs' cost alone, without the minutes of
start-ups (and the host's slowdown after each compile, benchmarks/startup.py) that a fresh
exporter per round costs. Left on throughout: the bash collector's uretprobe, which runs only
when an interactive bash reads a line.

The switch listens in a thread started before the exporter, so it keeps the capabilities that
the exporter's own threads give up once attached (exporter/privileges.py)."""

from __future__ import annotations

import socket
import sys
import threading
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

    def set(self, on: bool) -> int:
        """Switches the programs on or off; returns how many attachments changed."""
        self._socket.sendall(b"on\n" if on else b"off\n")
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
    # (bcc object's id, "tracepoint" or "raw", tracepoint) -> (bcc object, function name);
    # keyed, so that attaching again (through the same recording method) adds nothing
    tracepoints: dict[tuple[int, str, bytes], tuple[Any, bytes]] = field(default_factory=dict)
    # event name -> (bcc object, uretprobe?, keyword arguments of the attach): the HTTPS
    # program's uprobes on OpenSSL
    uprobes: dict[bytes, tuple[Any, bool, dict[str, Any]]] = field(default_factory=dict)
    tc_fds: dict[int, int] = field(default_factory=dict)     # parent -> program fd
    tc_filter: dict[str, Any] = field(default_factory=dict)  # priority, handle, name
    attach_uprobe: dict[bool, Any] = field(default_factory=dict)  # bcc's own, by uretprobe?
    tcx: list[Any] = field(default_factory=list)             # the exporter's TcxAttachers
    monitors: list[Any] = field(default_factory=list)
    on: bool = True


def _record(attachments: _Attachments) -> None:
    import bcc

    from exporter import interfaces, tcx

    def recording(kind: str, original: Any) -> Any:
        def attach(bpf: Any, tp: Any = b"", fn_name: Any = b"") -> Any:
            result = original(bpf, tp=tp, fn_name=fn_name)
            attachments.tracepoints[(id(bpf), kind, bcc._assert_is_bytes(tp))] = (
                bpf, bcc._assert_is_bytes(fn_name))
            return result
        return attach

    bcc.BPF.attach_tracepoint = recording("tracepoint", bcc.BPF.attach_tracepoint)
    bcc.BPF.attach_raw_tracepoint = recording("raw", bcc.BPF.attach_raw_tracepoint)

    def recording_uprobe(uretprobe: bool, original: Any) -> Any:
        def attach(bpf: Any, **kwargs: Any) -> Any:
            before = set(bpf.uprobe_fds)
            result = original(bpf, **kwargs)
            for event in set(bpf.uprobe_fds) - before:
                attachments.uprobes[event] = (bpf, uretprobe, kwargs)
            return result
        return attach

    attachments.attach_uprobe = {False: bcc.BPF.attach_uprobe, True: bcc.BPF.attach_uretprobe}
    bcc.BPF.attach_uprobe = recording_uprobe(False, bcc.BPF.attach_uprobe)
    bcc.BPF.attach_uretprobe = recording_uprobe(True, bcc.BPF.attach_uretprobe)

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


def _switch(attachments: _Attachments, on: bool) -> int:
    from pyroute2 import IPRoute

    if on == attachments.on:
        return 0
    changed = 0
    for (_, kind, tp), (bpf, fn_name) in list(attachments.tracepoints.items()):
        if kind == "tracepoint" and on:
            bpf.attach_tracepoint(tp=tp, fn_name=fn_name)
        elif kind == "tracepoint":
            bpf.detach_tracepoint(tp)
        elif on:
            bpf.attach_raw_tracepoint(tp=tp, fn_name=fn_name)
        else:
            bpf.detach_raw_tracepoint(tp)
        changed += 1
    for event, (bpf, uretprobe, kwargs) in list(attachments.uprobes.items()):
        if on:      # bcc's own attach: the event gets the same name again
            attachments.attach_uprobe[uretprobe](bpf, **kwargs)
        else:
            bpf.detach_uprobe_event(event)
        changed += 1
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
                    if command not in ("on", "off"):
                        raise ValueError(f"unknown command {command!r}")
                    stream.write(f"ok {_switch(attachments, command == 'on')}\n")
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
