"""How a live view attaches its own classifier beside the exporter's and other views'.

With tcx links (Linux >= 6.6, interfaces.attach auto or tcx) each view appends its links after
those already on the hook, so the exporter's, placed first, keep running first; the kernel
closes a view's links when it exits, however it exits.

With clsact filters, the exporter's filter has priority 1 and the fixed handle 0xEB0E. Each
live view adds its own at priority LIVE_PRIORITY with a handle and a name made from its PID, so
two views (or a view and the exporter) never replace each other's filter. A view killed before
it could detach leaves its filter behind: the next view removes filters whose PID no longer
runs, in either mode.

Either way the classifier returns TC_ACT_UNSPEC (TCX_NEXT), so every program of a hook sees
every packet."""

from __future__ import annotations

import os
import re

from pyroute2.netlink.exceptions import NetlinkError

from .. import logs
from ..kernel.environment import pid_alive
from ..kernel.interfaces import Link, TcAttacher
from ..kernel.tcx import TcxAttacher

log = logs.get("live")

LIVE_PRIORITY = 2
LIVE_HANDLE_BASE = 0xEB000000      # | the view's PID (pid_max <= 2^22)
LIVE_NAME = re.compile(r"^ebpf_net_live_(\d+)$")
LIVE_OWNER = "live-clsact"


class LiveAttacher(TcAttacher):
    def __init__(self, ingress_fd: int, egress_fd: int, pid: int | None = None) -> None:
        pid = os.getpid() if pid is None else pid
        super().__init__(ingress_fd, egress_fd, LIVE_PRIORITY, LIVE_HANDLE_BASE | pid,
                         f"ebpf_net_live_{pid}", LIVE_OWNER)

    def attach(self, link: Link) -> None:
        self.remove_earlier(link)
        super().attach(link)

    def remove_earlier(self, link: Link) -> None:
        """The filters of views that are gone; never the exporter's nor a running view's."""
        for parent in self._fds:
            try:
                filters = self._ipr.get_filters(index=link.index, parent=parent)
            except NetlinkError:
                return      # no clsact yet
            for f in filters:
                options = f.get_attr("TCA_OPTIONS")
                match = LIVE_NAME.match((options and options.get_attr("TCA_BPF_NAME")) or "")
                if not match or pid_alive(int(match.group(1))):
                    continue
                try:
                    self._ipr.tc("del-filter", "bpf", link.index, handle=f["handle"],
                                 parent=parent, prio=f["info"] >> 16)
                    log.info("removed the filter of a live view that is gone",
                             extra={"interface": link.name, "pid": match.group(1)})
                except NetlinkError:
                    pass


class LiveTcxAttacher(TcxAttacher):
    def __init__(self, ingress_fd: int, egress_fd: int) -> None:
        # after the links already there: the exporter's stay first
        super().__init__(ingress_fd, egress_fd, lambda: LiveAttacher(ingress_fd, egress_fd),
                         placement=0)
