"""TC filters of live views: one per view process, beside the exporter's and each other's.

The exporter's filter has priority 1 and the fixed handle 0xEB0E. Each live view adds its own at
priority LIVE_PRIORITY with a handle and a name made from its PID, so two views (or a view and
the exporter) never replace each other's filter; the classifier returns TC_ACT_UNSPEC, so every
filter of a hook sees every packet. A view killed before it could detach leaves its filter
behind: the next view removes filters whose PID no longer runs."""

from __future__ import annotations

import os
import re

from pyroute2.netlink.exceptions import NetlinkError

from .. import logs
from ..environment import pid_alive
from ..interfaces import Link, TcAttacher

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
        self._remove_stale(link)
        super().attach(link)

    def _remove_stale(self, link: Link) -> None:
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
