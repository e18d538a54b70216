"""Uprobes and tracepoints as perf events, without bcc: perf_event_open(2) on the kernel's
uprobe PMU or a tracepoint's id, with a loaded program set on the event. The attachment lives
exactly as long as the event's descriptor (a kill -9 of the exporter removes it). A uprobe
sits on the file, so every process that maps the file runs it. Uprobes serve bash's readline
and, on kernels without uprobe_multi links (Linux < 6.6), the HTTPS probes; tracepoints are
attached again here after the benchmarks' switch took them off."""

from __future__ import annotations

import ctypes
import fcntl
import os
from pathlib import Path

from . import bpfsys, environment

PMU_DIR = Path("/sys/bus/event_source/devices/uprobe")
TRACEFS_EVENTS = environment.TRACEFS / "events"
PERF_TYPE_TRACEPOINT = 2
PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408
ATTR_SIZE = 112             # PERF_ATTR_SIZE_VER5: every kernel with the uprobe PMU reads it

class PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr up to PERF_ATTR_SIZE_VER5 (include/uapi/linux/perf_event.h);
    for a uprobe, config1 points at the file's path and config2 is the probe's file offset."""
    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32),
                ("config", ctypes.c_uint64), ("sample_period", ctypes.c_uint64),
                ("sample_type", ctypes.c_uint64), ("read_format", ctypes.c_uint64),
                ("flags", ctypes.c_uint64), ("wakeup_events", ctypes.c_uint32),
                ("bp_type", ctypes.c_uint32), ("config1", ctypes.c_uint64),
                ("config2", ctypes.c_uint64), ("branch_sample_type", ctypes.c_uint64),
                ("sample_regs_user", ctypes.c_uint64), ("sample_stack_user", ctypes.c_uint32),
                ("clockid", ctypes.c_int32), ("sample_regs_intr", ctypes.c_uint64),
                ("aux_watermark", ctypes.c_uint32), ("sample_max_stack", ctypes.c_uint16),
                ("reserved", ctypes.c_uint16)]


def _pmu_type() -> int:
    try:
        return int((PMU_DIR / "type").read_text())
    except OSError as e:
        raise OSError(e.errno, f"no uprobe PMU ({PMU_DIR}): {e.strerror}") from e


def _retprobe_config() -> int:
    """The config bit that makes a uprobe a uretprobe ("config:0" in the PMU's format)."""
    text = (PMU_DIR / "format" / "retprobe").read_text().strip()
    return 1 << int(text.partition(":")[2])


def _open(attr: PerfEventAttr, prog_fd: int, what: str) -> int:
    """The event, enabled, with the program on it."""
    # pid -1, cpu 0: every process (a program on a probe runs on whichever CPU hits it)
    fd = bpfsys.syscall(PERF_EVENT_OPEN, f"perf_event_open {what}", ctypes.byref(attr), -1, 0,
                        -1, PERF_FLAG_FD_CLOEXEC)
    try:
        fcntl.ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError as e:
        os.close(fd)
        raise OSError(e.errno, f"{what}: {e.strerror}") from e
    return fd


def tracepoint(prog_fd: int, category: str, name: str) -> int:
    """The tracepoint category:name running the tracepoint program `prog_fd`: the perf
    event's descriptor, which holds it."""
    what = f"tracepoint {category}:{name}"
    try:
        event_id = int((TRACEFS_EVENTS / category / name / "id").read_text())
    except OSError as e:
        raise OSError(e.errno, f"{what}: {e.strerror}") from e
    attr = PerfEventAttr(type=PERF_TYPE_TRACEPOINT, size=ATTR_SIZE, config=event_id,
                         sample_period=1, wakeup_events=1)
    return _open(attr, prog_fd, what)


def uprobe(prog_fd: int, path: str, offset: int, returns: bool) -> int:
    """A uprobe (a uretprobe with `returns`) at `offset` in the file at `path` that runs the
    kprobe-type program `prog_fd` in every process: the perf event's descriptor, which holds
    it. OSError naming the file and offset when the kernel refuses."""
    name = ctypes.create_string_buffer(path.encode(errors="surrogateescape"))
    attr = PerfEventAttr(type=_pmu_type(), size=ATTR_SIZE, sample_period=1, wakeup_events=1,
                         config=_retprobe_config() if returns else 0,
                         config1=ctypes.addressof(name), config2=offset)
    return _open(attr, prog_fd, f"uprobe {path}+{offset:#x}")
