"""Cgroup ids (bpf_get_current_cgroup_id: the cgroup v2 directory's inode) as paths, and the
Kubernetes pod UID and container id a path carries where the runtime names it so
(kubepods.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope, the cgroupfs
driver's kubepods/burstable/pod<uid>/<id>, docker-<id>.scope, crio-<id>.scope). A process in
the host network still has its container's cgroup, so this names the container of host-network
pods, which the address cannot.

Paths are found by walking the cgroup2 hierarchy, again at most once a second when an id is
not known. Where no cgroup2 file system is mounted in this mount namespace (`ip netns exec`
remounts /sys), one is mounted privately for the walk, at a directory named after the process."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from .. import logs
from .environment import pid_alive

log = logs.get("cgroups")

MOUNT_DIR = Path("/run/ebpf-net-exporter")
RESCAN_SECONDS = 1.0
_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}"
                      r"[-_][0-9a-f]{12})")
_CONTAINER_ID = re.compile(r"(?:^|[-/])([0-9a-f]{64})(?:\.scope)?$")


def parse_path(path: str) -> dict[str, str]:
    """The pod UID and container id in a cgroup path, where it has them."""
    found: dict[str, str] = {}
    pod = _POD_UID.search(path)
    if pod:
        found["pod_uid"] = pod.group(1).replace("_", "-")
    container = _CONTAINER_ID.search(path)
    if container:
        found["container_id"] = container.group(1)
    return found


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path | None:
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            if fields[separator + 1] == "cgroup2":
                return Path(fields[4])
    return None


def _remove_stale_mount_points() -> None:
    """Mount points of processes killed before they could remove theirs (the mount went with
    their mount namespace; the empty directory stays)."""
    for directory in MOUNT_DIR.glob("cgroup2-*"):
        pid = directory.name.removeprefix("cgroup2-")
        if pid.isdigit() and not pid_alive(int(pid)):
            try:
                directory.rmdir()
            except OSError:
                pass


class CgroupNames:
    def __init__(self, root: Path | None = None) -> None:
        self._mounted: Path | None = None
        self.root = root or cgroup2_mount() or self._mount()
        self._paths: dict[int, str] = {}
        self._scanned = 0.0

    def _mount(self) -> Path | None:
        MOUNT_DIR.mkdir(parents=True, exist_ok=True)
        _remove_stale_mount_points()
        target = MOUNT_DIR / f"cgroup2-{os.getpid()}"
        target.mkdir(exist_ok=True)
        result = subprocess.run(["mount", "-t", "cgroup2", "none", str(target)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            target.rmdir()
            log.warning("no cgroup2 hierarchy: processes are shown without their cgroup",
                        extra={"error": result.stderr.strip()})
            return None
        self._mounted = target
        return target

    def path(self, cgroup_id: int) -> str | None:
        if self.root is None or not cgroup_id:
            return None
        if cgroup_id not in self._paths and time.monotonic() - self._scanned >= RESCAN_SECONDS:
            self._scan()
        return self._paths.get(cgroup_id)

    def _scan(self) -> None:
        assert self.root is not None
        self._scanned = time.monotonic()
        paths = {}
        for directory, _, _ in os.walk(self.root):
            try:
                inode = os.stat(directory).st_ino
            except OSError:
                continue        # removed meanwhile
            paths[inode] = "/" + os.path.relpath(directory, self.root).removeprefix(".")
        self._paths = paths

    def describe(self, cgroup_id: int) -> dict[str, str]:
        path = self.path(cgroup_id)
        if path is None:
            return {}
        return {"cgroup": path, **parse_path(path)}

    def close(self) -> None:
        if self._mounted is not None:
            subprocess.run(["umount", str(self._mounted)], capture_output=True)
            self._mounted.rmdir()
            self._mounted = None
