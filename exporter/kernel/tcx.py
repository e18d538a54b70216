"""Attaches the TC classifier with tcx links (Linux >= 6.6) instead of clsact and cls_bpf.

A tcx link runs the program straight from the interface's hook: no qdisc, no classifier
walk, no per-qdisc statistics. Under TCP bulk through a test node that dispatch through
clsact cost about as much CPU as our programs themselves (benchmarks/notes.md). The link is
placed first on its hook (BPF_F_BEFORE), so no verdict of a program attached earlier (Cilium's,
on kernels where it uses tcx) hides a packet from it, and the classifier returns TC_ACT_UNSPEC,
which tcx reads as TCX_NEXT: the programs after it run as if it were not there.

A link lives as long as its file descriptor: when the exporter exits, however it exits, the
kernel detaches it, and when an interface goes away, its links go with it. Nothing is left
behind and nothing is written to /run. A clsact filter of ours left by an earlier run (a
crashed one, or one of a version that attached through clsact) is removed when the interface
is attached, so that program stops running on every packet for nothing: only where the
interface has a clsact qdisc, so pyroute2 (which removes filters) is not even imported on a
node without one."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from .. import logs
from . import bpfsys
from .interfaces import Link, TcAttacher, list_links
from .rtnetlink import RtNetlink

log = logs.get("interfaces")


class TcxAttacher:
    """Attaches and detaches our programs on links of the current network namespace. Only
    the clean-up of earlier clsact filters and the list of links go through netlink (the
    monitor's thread); linking and unlinking are system calls that any thread may make."""

    def __init__(self, ingress_fd: int, egress_fd: int,
                 clsact: Callable[[], TcAttacher] | None = None,
                 placement: int = bpfsys.F_BEFORE) -> None:
        """clsact: makes the filters whose earlier runs' leftovers are removed at attach (the
        exporter's by default); placement: first on the hook (F_BEFORE) or last (0)."""
        self._fds = {bpfsys.TCX_INGRESS: ingress_fd, bpfsys.TCX_EGRESS: egress_fd}
        self._placement = placement
        self._links: dict[int, list[int]] = {}      # ifindex -> the link fds held
        self._lock = threading.Lock()
        self._make_clsact = clsact or (lambda: TcAttacher(ingress_fd, egress_fd))
        self._clsact: TcAttacher | None = None
        self._rtnl = RtNetlink()

    def attach(self, link: Link) -> None:
        self._remove_clsact_filters(link)
        self.link_programs(link)

    def detach(self, link: Link) -> None:
        self.unlink_programs(link)

    def link_programs(self, link: Link) -> None:
        """Both hooks or neither: OSError (ENODEV if the interface went away meanwhile)."""
        with self._lock:
            if link.index in self._links:
                return
            held: list[int] = []
            try:
                for attach_type, fd in self._fds.items():
                    held.append(bpfsys.tcx_link(fd, link.index, attach_type, self._placement))
            except OSError:
                for link_fd in held:
                    os.close(link_fd)
                raise
            self._links[link.index] = held

    def unlink_programs(self, link: Link) -> None:
        self._unlink(link.index)

    def _unlink(self, index: int) -> None:
        with self._lock:
            for link_fd in self._links.pop(index, []):
                os.close(link_fd)

    def linked(self) -> set[int]:
        with self._lock:
            return set(self._links)

    def _remove_clsact_filters(self, link: Link) -> None:
        try:
            if "clsact" not in self._rtnl.qdisc_kinds().get(link.index, set()):
                return
            if self._clsact is None:
                self._clsact = self._make_clsact()
            self._clsact.remove_earlier(link)
        except OSError as e:
            log.warning("could not remove an earlier run's clsact filter",
                        extra={"interface": link.name, "error": str(e)})

    def links(self) -> list[Link]:
        return list_links(self._rtnl)

    def close(self) -> None:
        for index in self.linked():
            self._unlink(index)
        if self._clsact is not None:
            self._clsact.close()
        self._rtnl.close()
