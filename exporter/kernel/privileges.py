"""Giving up capabilities once they have served.

Linux keeps capabilities per thread, and a thread starts with its creator's. So each part of
the exporter drops, in its own thread, what it does not need once the programs are loaded and
attached (measured on Linux 6.18; docs/security.md):

- the HTTP server (and every connection thread it starts): nothing at all. Reading BPF maps
  through file descriptors already open needs no capability on kernels >= 6.5, where the
  unprivileged-BPF check moved from every bpf() call to map creation and program loading.
- the interface monitor: CAP_NET_ADMIN only, to attach to interfaces that appear later and
  detach at exit.
- the main thread and the sweepers: nothing.

Only ever lowers: a capability the process lacks is never asked for."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterable

from .. import logs

log = logs.get("privileges")

CAP_DAC_READ_SEARCH = 2
CAP_NET_ADMIN = 12
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
NAMES = {CAP_DAC_READ_SEARCH: "CAP_DAC_READ_SEARCH", CAP_NET_ADMIN: "CAP_NET_ADMIN",
         CAP_SYS_PTRACE: "CAP_SYS_PTRACE", CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
         CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}
EXPORTER_CAPABILITIES = sum(1 << cap for cap in NAMES)    # the ones worth naming in a log
_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _get() -> tuple[int, int, int]:
    header, data = _Header(_VERSION_3, 0), (_Data * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    def both(name: str) -> int:
        return getattr(data[0], name) | getattr(data[1], name) << 32
    return both("effective"), both("permitted"), both("inheritable")


def thread_capabilities() -> int:
    """The calling thread's effective capabilities, as a bit mask."""
    return _get()[0]


def keep_only(keep: Iterable[int] = ()) -> int:
    """Drops every capability of the calling thread but `keep`; returns what it dropped."""
    mask = sum(1 << cap for cap in keep)
    effective, permitted, inheritable = _get()
    new = [effective & mask, permitted & mask, inheritable & mask]
    if new == [effective, permitted, inheritable]:
        return 0
    header, data = _Header(_VERSION_3, 0), (_Data * 2)()
    for index, name in enumerate(("effective", "permitted", "inheritable")):
        setattr(data[0], name, new[index] & 0xFFFFFFFF)
        setattr(data[1], name, new[index] >> 32)
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    return permitted & ~mask


def names(mask: int) -> str:
    held = [NAMES.get(bit, f"cap{bit}") for bit in range(64) if mask >> bit & 1]
    return ",".join(held) or "none"
