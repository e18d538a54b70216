"""Which files on this node hold OpenSSL, found in the memory maps of its processes, host and
containers alike: every shared libssl (libssl.so.1.1, libssl.so.3, ...) and every executable
that carries the SSL_* functions itself (OpenSSL linked in statically, as Node.js does).

A file is known by its device and inode, as the maps give them, so a library that a thousand
processes map, or that two containers reach by different paths, is one file; it is reached
through /proc/PID/root, the mapping process's own view of the file system. A file deleted
since it was mapped (a package upgraded under a running process) is reached through
/proc/PID/map_files, which opens the mapped file itself."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import logs

log = logs.get("https")

# an executable mapping of a file: "start-end perms offset dev inode path"
_MAPS_LINE = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) r-xp [0-9a-f]+ ([0-9a-f]+):([0-9a-f]+) "
                        rb"(\d+) +(/.*)$", re.MULTILINE)
_LIBSSL = re.compile(rb"/libssl\.so[.0-9]*$")
DELETED = b" (deleted)"

FileId = tuple[int, int, int]       # device major, minor, inode


@dataclass(frozen=True)
class MappedFile:
    """A file some process maps executable, and a path that reaches it now."""
    file: FileId
    path: str                       # as the process sees it
    reach: str                      # from this process: /proc/PID/root/... or map_files
    pid: int
    shared_library: bool            # a libssl; else an executable to look into for SSL_*


def mapped_files(pid: int, maps: bytes, executable: bytes | None) -> list[MappedFile]:
    """The libssl files and the executable that process `pid` maps, from its maps text."""
    found = {}
    for match in _MAPS_LINE.finditer(maps):
        start, end, major, minor, inode, path = match.groups()
        deleted = path.endswith(DELETED)
        name = path[:-len(DELETED)] if deleted else path
        library = bool(_LIBSSL.search(name))
        if not library and name != executable:
            continue
        file = (int(major, 16), int(minor, 16), int(inode))
        if file in found or file[2] == 0:
            continue
        text = name.decode(errors="surrogateescape")
        reach = (f"/proc/{pid}/map_files/{start.decode()}-{end.decode()}" if deleted
                 else f"/proc/{pid}/root{text}")
        found[file] = MappedFile(file, text, reach, pid, library)
    return list(found.values())


def read_process(proc: Path, pid: int) -> list[MappedFile]:
    """What one process maps; nothing when it is gone (or a kernel thread, which maps
    nothing). PermissionError when this thread may not read it (another user's process,
    without CAP_SYS_PTRACE)."""
    try:
        maps = (proc / str(pid) / "maps").read_bytes()
        executable = os.readlink(proc / str(pid) / "exe").encode(errors="surrogateescape")
    except PermissionError:
        raise
    except OSError:
        return []
    return mapped_files(pid, maps, executable.removesuffix(DELETED))


def process_ids(proc: Path) -> set[int]:
    return {int(name) for name in os.listdir(proc) if name.isdigit()}


class FileScan:
    """The files with OpenSSL that this node's processes map, kept current by scans: a full one
    over every process, or one over the processes started since the last."""

    def __init__(self, has_openssl: Callable[[str], bool], proc: Path = Path("/proc"),
                 own_pid: int | None = None) -> None:
        self.proc = proc
        self._has_openssl = has_openssl
        self._own_pid = own_pid if own_pid is not None else os.getpid()
        self._seen_pids: set[int] = set()
        # executables looked into, with what was found; libraries need no look
        self._executables: dict[FileId, bool] = {}
        self.files: dict[FileId, MappedFile] = {}
        self.denied = 0                 # processes the last scan was not allowed to read

    def scan(self, full: bool) -> dict[FileId, MappedFile]:
        """Scans every process (full) or only those not seen before; returns the files with
        OpenSSL mapped now. After a partial scan, files whose processes ended are kept until
        the next full one."""
        pids = process_ids(self.proc) - {self._own_pid}
        todo = pids if full else pids - self._seen_pids
        found = {} if full else dict(self.files)
        self.denied = 0
        for pid in sorted(todo):
            try:
                mapped_now = read_process(self.proc, pid)
            except PermissionError:
                self.denied += 1
                continue
            for mapped in mapped_now:
                if mapped.file in found or not self._wanted(mapped):
                    continue
                found[mapped.file] = mapped
        self._seen_pids = pids if full else self._seen_pids | todo
        self.files = found
        return found

    def _wanted(self, mapped: MappedFile) -> bool:
        if mapped.shared_library:
            return True
        known = self._executables.get(mapped.file)
        if known is None:
            known = self._executables[mapped.file] = self._has_openssl(mapped.reach)
        return known


def describe(files: Iterable[MappedFile]) -> list[str]:
    return sorted(f"{f.path} (pid {f.pid})" for f in files)
