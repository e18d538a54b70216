"""Attaches the TC classifier to the monitored interfaces and follows them as they come and go.

- Which: names fully matching an `include` regex and no `exclude` regex. Two kinds of stacked
  devices are skipped when one of their lower devices is monitored, because every packet they
  carry is already counted there: bridge/bond masters of a monitored port, and VLAN/macvlan/
  ipvlan devices on a monitored link.
- When: at start, on every netlink link event (a new pod's veth is attached within a few
  hundred milliseconds), and by a full resync every RESYNC_SECONDS in case an event was lost.
- How: on Linux >= 6.6, a tcx link per hook (exporter/kernel/tcx.py). Else (or with
  `interfaces.attach: clsact`) a clsact qdisc (created only if absent) with one cls_bpf filter
  per hook, at a fixed priority and handle and named FILTER_NAME, written with `replace` so a
  filter left by a killed earlier run is replaced, never doubled. The qdiscs this exporter
  created are recorded in a state file under /run, so after a crash the next run still knows
  they are its own.
- Leaving: our links are closed, our filters removed; a clsact qdisc is removed only if this
  exporter created it and no other filter sits on it. Qdiscs and filters of others are never
  touched."""

from __future__ import annotations

import errno
import faulthandler
import json
import os
import queue
import re
import select
import socket
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .. import logs
from . import privileges
from .rtnetlink import RtNetlink

log = logs.get("interfaces")

INGRESS = 0xFFFFFFF2
EGRESS = 0xFFFFFFF3
HOOKS = {"ingress": INGRESS, "egress": EGRESS}
FILTER_PRIORITY = 1         # run before other filters, so no verdict of theirs hides a packet
FILTER_HANDLE = 0xEB0E
FILTER_NAME = "ebpf_net_exporter"
ARPHRD_ETHER = 1
STACKED_ON_LINK = {"vlan", "macvlan", "ipvlan", "macvtap"}
RESYNC_SECONDS = 10.0
RTMGRP_LINK = 1
RTMGRP_ROUTES = 0x40 | 0x400        # RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE
# Detaching takes well under a second for hundreds of interfaces. Past this, something hangs,
# and the process must still end within the orchestrator's grace period (30 s by default in
# Kubernetes; the shipped DaemonSet gives 60) rather than be killed in the middle of its stop.
STOP_SECONDS = 20.0
DEFAULT_STATE_DIR = Path("/run/ebpf-net-exporter")


def state_dir() -> Path:
    """Where the qdisc ownership file lives: systemd's RUNTIME_DIRECTORY when set (a non-root
    exporter cannot write /run), else /run/ebpf-net-exporter."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(runtime) if runtime else DEFAULT_STATE_DIR


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    ethernet: bool
    kind: str | None
    master: int | None      # bridge/bond this link is a port of
    lower: int | None       # IFLA_LINK in the same namespace (vlan, macvlan, ...)

    @classmethod
    def from_message(cls, msg: Any) -> Link:
        same_netns_link = msg.get_attr("IFLA_LINK_NETNSID") is None
        return cls(
            index=msg["index"],
            name=msg.get_attr("IFLA_IFNAME"),
            ethernet=msg["ifi_type"] == ARPHRD_ETHER,
            kind=msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
            master=msg.get_attr("IFLA_MASTER") or None,
            lower=(msg.get_attr("IFLA_LINK") or None) if same_netns_link else None,
        )


class NameFilter:
    def __init__(self, include: Iterable[str], exclude: Iterable[str]) -> None:
        self.include = [re.compile(p) for p in include]
        self.exclude = [re.compile(p) for p in exclude]

    def matches(self, name: str) -> bool:
        return any(p.fullmatch(name) for p in self.include) and \
            not any(p.fullmatch(name) for p in self.exclude)

    def hints(self, names: Iterable[str]) -> list[str]:
        """For each include pattern that matches no name in full but is found inside one (a
        regex written for a search, like '^veth'), what it finds and the pattern that would
        match: patterns match the whole name."""
        names = list(names)
        out = []
        for pattern in self.include:
            if any(pattern.fullmatch(name) for name in names):
                continue
            found = next((name for name in names if pattern.search(name)), None)
            if found is not None:
                anchored = pattern.pattern.removeprefix("^").removesuffix("$")
                out.append(f"{pattern.pattern!r} matches no name in full but is found in "
                           f"{found!r}: patterns match the whole name, try {anchored + '.*'!r}")
        return out


def select_links(links: Iterable[Link], names: NameFilter) -> tuple[dict[int, Link], list[str]]:
    """The links to monitor, and a reason for each matching link skipped as stacked."""
    matching = {link.index: link for link in links if names.matches(link.name)}
    skipped = []
    for link in list(matching.values()):
        ports = [p.name for p in matching.values() if p.master == link.index]
        if ports:
            skipped.append(f"{link.name}: master of monitored {', '.join(sorted(ports))}")
        elif link.kind in STACKED_ON_LINK and link.lower in matching:
            skipped.append(f"{link.name}: {link.kind} on monitored {matching[link.lower].name}")
        else:
            continue
        del matching[link.index]
    return matching, skipped


class QdiscOwnership:
    """Which clsact qdiscs this exporter created, kept in a file so a restart still knows."""

    def __init__(self, owner: str = "clsact") -> None:
        netns = os.stat("/proc/self/ns/net").st_ino
        self.directory = state_dir()
        self.path = self.directory / f"{owner}-netns-{netns}.json"
        self._owned: dict[int, str] = {}
        try:
            self._owned = {int(k): v for k, v in json.loads(self.path.read_text()).items()}
        except (OSError, ValueError):
            pass

    def owns(self, link: Link) -> bool:
        return self._owned.get(link.index) == link.name

    def record(self, link: Link) -> None:
        self._owned[link.index] = link.name
        self._save()

    def forget(self, index: int) -> None:
        if self._owned.pop(index, None) is not None:
            self._save()

    def _save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._owned))
        tmp.replace(self.path)


class Attacher(Protocol):
    """What the interface monitor needs of a way to attach: TcAttacher or tcx.TcxAttacher.
    attach and detach raise OSError; ENODEV when the interface is gone."""

    def attach(self, link: Link) -> None: ...
    def detach(self, link: Link) -> None: ...
    def link_programs(self, link: Link) -> None: ...
    def unlink_programs(self, link: Link) -> None: ...
    def links(self) -> list[Link]: ...
    def close(self) -> None: ...


def list_links(rtnl: RtNetlink) -> list[Link]:
    """The links of the current network namespace."""
    return [Link.from_message(m) for m in rtnl.get_links()]


class TcAttacher:
    """Adds and removes our filters on the links of the current network namespace. The live
    view attaches its own filters beside the exporter's with another priority, handle, name and
    ownership record, so neither ever replaces or removes the other's. Through pyroute2,
    imported here only (exporter/kernel/rtnetlink.py says why)."""

    def __init__(self, ingress_fd: int, egress_fd: int, priority: int = FILTER_PRIORITY,
                 handle: int = FILTER_HANDLE, name: str = FILTER_NAME,
                 owner: str = "clsact") -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        self._fds = {INGRESS: ingress_fd, EGRESS: egress_fd}
        self._ipr = IPRoute()
        self._netlink_error = NetlinkError
        self._rtnl = RtNetlink()
        self.priority = priority
        self.handle = handle
        self.name = name
        self.ownership = QdiscOwnership(owner)

    def _tc(self, *args: Any, **kwargs: Any) -> Any:
        """pyroute2's tc call; its NetlinkError (not an OSError) as an OSError with the same
        errno, so the callers catch one kind of error whichever way an attach goes."""
        try:
            return self._ipr.tc(*args, **kwargs)
        except self._netlink_error as e:
            raise OSError(e.code, f"netlink: {e}") from e

    def attach(self, link: Link) -> None:
        try:
            self._tc("add", "clsact", link.index)
            self.ownership.record(link)
        except OSError as e:
            if e.errno != errno.EEXIST:     # someone's (or a crashed run's) clsact
                raise
        self.link_programs(link)

    def link_programs(self, link: Link) -> None:
        """Our filters on the link's clsact qdisc, which must be there."""
        for parent, fd in self._fds.items():
            self._tc("replace-filter", "bpf", link.index, handle=self.handle, fd=fd,
                     name=self.name, parent=parent, classid=1, direct_action=True,
                     prio=self.priority)

    def unlink_programs(self, link: Link) -> None:
        """Our filters off the link; the qdisc stays."""
        for parent in self._fds:
            try:
                self._tc("del-filter", "bpf", link.index, handle=self.handle,
                         parent=parent, prio=self.priority)
            except OSError as e:
                if e.errno not in (2, 19, 22):    # already gone with the link or qdisc
                    raise

    def detach(self, link: Link) -> None:
        self.unlink_programs(link)
        if self.ownership.owns(link):
            others = self._foreign_filters(link.index)
            if others:
                log.info("leaving clsact qdisc we created: other filters use it",
                         extra={"interface": link.name, "filters": others})
            else:
                try:
                    self._tc("del", "clsact", link.index)
                except OSError as e:
                    if e.errno not in (2, 19, 22):
                        raise
        self.ownership.forget(link.index)

    def _foreign_filters(self, index: int) -> int:
        count = 0
        for parent in self._fds:
            try:
                for f in self._ipr.get_filters(index=index, parent=parent):
                    if f.get_attr("TCA_OPTIONS") is not None:  # skip chain header entries
                        count += 1
            except self._netlink_error:
                pass
        return count

    def remove_earlier(self, link: Link) -> None:
        """Removes what an earlier run of ours left on the link (a crashed one, or one that
        attached through clsact when this one uses tcx links): our filters, and the qdisc if
        the state file says that run added it."""
        self.detach(link)

    def links(self) -> list[Link]:
        return list_links(self._rtnl)

    def close(self) -> None:
        self._ipr.close()
        self._rtnl.close()


def link_event_socket(routes: bool = False) -> socket.socket:
    """A doorbell: readable whenever a link of this namespace changes (and a route, with
    `routes`). Only that it rang matters (each reconcile dumps the links), so nothing is
    parsed."""
    doorbell = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                             socket.NETLINK_ROUTE)
    doorbell.bind((0, RTMGRP_LINK | (RTMGRP_ROUTES if routes else 0)))
    return doorbell


def drain(doorbell: socket.socket) -> int:
    """Reads every pending event; returns how many datagrams (ENOBUFS: events were lost, which
    counts as a change too)."""
    count = 0
    while True:
        try:
            if not doorbell.recv(65536):
                return count
            count += 1
        except BlockingIOError:
            return count
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            count += 1


class InterfaceMonitor:
    """Keeps the classifier attached to exactly the interfaces the filters select.

    One thread owns every netlink socket (none is to be shared between threads): it does the
    first reconcile, follows link events, resyncs, and detaches on stop.
    start() and stop() wait for it."""

    def __init__(self, names: NameFilter, make_attacher: Callable[[], Attacher],
                 on_attach: Callable[[Link], None], on_detach: Callable[[Link], None],
                 before_reconcile: Callable[[dict[int, Link]], None] | None = None) -> None:
        """before_reconcile: runs first in every reconcile, with the attached links; a
        monitor that has one also reconciles on every route change."""
        self.names = names
        self._make_attacher = make_attacher
        self._on_attach = on_attach
        self._on_detach = on_detach
        self._before_reconcile = before_reconcile
        self.attached: dict[int, Link] = {}
        self.programs_linked = True     # set_programs_linked
        self._skipped_logged: set[str] = set()
        self._unattachable: set[int] = set()
        self._warned_empty = False
        self._stop = threading.Event()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._wake_read, self._wake_write = os.pipe()   # stop() wakes the watcher at once
        self._calls: queue.Queue[tuple[Callable[[Attacher], Any], Future[Any]]] = queue.Queue()

    def start(self, timeout: float = 30.0) -> None:
        """Returns once the first reconcile is done (every matching interface attached)."""
        self._thread = threading.Thread(target=self._run, name="interfaces", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError("interface monitor did not start")
        if self._start_error is not None:
            raise self._start_error

    def _run(self) -> None:
        try:
            # attaching and detaching filters is all this thread does: CAP_NET_ADMIN only
            privileges.keep_only((privileges.CAP_NET_ADMIN,))
            # before the first reconcile: no event is missed
            events = link_event_socket(routes=self._before_reconcile is not None)
            attacher = self._make_attacher()
            self._reconcile(attacher)
        except BaseException as e:
            self._start_error = e
            self._started.set()
            return
        self._started.set()
        try:
            self._watch(events, attacher)
        finally:
            for link in list(self.attached.values()):
                self._detach(attacher, link)
            events.close()
            attacher.close()

    def _reconcile(self, attacher: Attacher) -> None:
        if self._before_reconcile:
            self._before_reconcile(self.attached)
        links = attacher.links()
        wanted, skipped = select_links(links, self.names)
        for reason in skipped:
            if reason not in self._skipped_logged:
                self._skipped_logged.add(reason)
                log.info("not attaching to stacked device", extra={"reason": reason})
        for index, link in list(self.attached.items()):
            current = wanted.get(index)
            if current is None or current.name != link.name:
                self._detach(attacher, link)
        for index, link in wanted.items():
            if index not in self.attached:
                self._attach(attacher, link)
        if not self.attached and not self._warned_empty:
            self._warned_empty = True
            hints = self.names.hints(link.name for link in links)
            log.warning("no interface matches; waiting for one to appear",
                        extra={"include": [p.pattern for p in self.names.include],
                               "exclude": [p.pattern for p in self.names.exclude],
                               **({"hint": "; ".join(hints)} if hints else {})})
        elif self.attached:
            self._warned_empty = False

    def _attach(self, attacher: Attacher, link: Link) -> None:
        try:
            self._on_attach(link)       # the program must know the interface before packets
        except Exception as e:          # the program's interface map is full
            if link.index not in self._unattachable:
                self._unattachable.add(link.index)
                log.warning("could not attach", extra={"interface": link.name,
                                                       "error": str(e)})
            return
        try:
            attacher.attach(link)
        except OSError as e:
            self._on_detach(link)
            if e.errno != errno.ENODEV:   # it went away meanwhile
                log.warning("could not attach", extra={"interface": link.name,
                                                       "error": str(e)})
            return
        self.attached[link.index] = link
        log.info("attached", extra={"interface": link.name, "ifindex": link.index})

    def _detach(self, attacher: Attacher, link: Link) -> None:
        try:
            attacher.detach(link)
        except OSError as e:
            log.warning("could not detach", extra={"interface": link.name, "error": str(e)})
        self._on_detach(link)
        self.attached.pop(link.index, None)
        log.info("detached", extra={"interface": link.name, "ifindex": link.index})

    def set_names(self, names: NameFilter) -> None:
        """New include/exclude patterns (a configuration reload): the monitor's thread attaches
        and detaches to match at once; programs and counts are untouched."""
        self.names = names
        self._warned_empty = False
        os.write(self._wake_write, b"r")

    def poke(self) -> None:
        """Reconcile soon (what before_reconcile reads has changed)."""
        try:
            os.write(self._wake_write, b"p")
        except OSError:         # stopped: nothing left to reconcile
            pass

    def set_programs_linked(self, on: bool, timeout: float = 30.0) -> int:
        """Takes the programs off every attached interface (tcx links closed, or filters
        removed; qdiscs, maps and the monitor's record of what it attached stay), or puts them
        back: the switch that benchmarks/switchable.py drives. Done in the monitor's thread,
        which owns the netlink sockets. Returns how many hooks changed (two an interface)."""
        def switch(attacher: Attacher) -> int:
            if on == self.programs_linked:
                return 0
            links = list(self.attached.values())
            for link in links:
                (attacher.link_programs if on else attacher.unlink_programs)(link)
            self.programs_linked = on
            return 2 * len(links)

        done: Future[int] = Future()
        self._calls.put((switch, done))
        os.write(self._wake_write, b"c")
        return done.result(timeout)

    def _run_calls(self, attacher: Attacher) -> None:
        while not self._calls.empty():
            action, done = self._calls.get()
            try:
                done.set_result(action(attacher))
            except Exception as e:
                done.set_exception(e)

    def _watch(self, events: socket.socket, attacher: Attacher) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([events, self._wake_read], [], [], RESYNC_SECONDS)
                if self._stop.is_set():
                    break
                changed = drain(events) if events in ready else 0
                if self._wake_read in ready:        # set_names(), poke(), a call
                    changed += len(os.read(self._wake_read, 64))
                self._run_calls(attacher)
                if changed or not ready:
                    self._reconcile(attacher)
            except Exception as e:  # keep watching: a missed event is caught by the resync
                log.warning("interface watch error", extra={"error": str(e)})
                self._stop.wait(1.0)

    def stop(self, timeout: float = STOP_SECONDS) -> bool:
        """Detaches from every interface (in the monitor's thread); True when done. After
        `timeout` seconds it gives up waiting: it logs the interfaces that may keep a filter
        and every thread's stack (where it hangs), and returns False."""
        self._stop.set()
        os.write(self._wake_write, b"x")
        if self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                # the thread may still use the wake pipe: it stays open, the process is ending
                names = sorted(link.name for link in list(self.attached.values()))
                log.error("interfaces not all detached in time: their filters stay until the "
                          "next start replaces them; thread stacks follow",
                          extra={"seconds": timeout, "interfaces": ",".join(names)})
                faulthandler.dump_traceback(all_threads=True)
                return False
        os.close(self._wake_read)
        os.close(self._wake_write)
        return True
