"""The bpf(2) system call for the few commands bcc's Python bindings do not wrap
(BPF_PROG_TEST_RUN, BPF_ENABLE_STATS)."""

from __future__ import annotations

import ctypes
import os
import platform

SYSCALL_NUMBER = {"x86_64": 321, "aarch64": 280}
PROG_TEST_RUN = 10
ENABLE_STATS = 32

_libc = ctypes.CDLL(None, use_errno=True)


def bpf(command: int, attr: ctypes.Structure | ctypes.c_uint32, what: str) -> int:
    """The call's result; OSError naming `what` when it fails."""
    number = SYSCALL_NUMBER.get(platform.machine())
    if number is None:
        raise OSError(f"{what}: no bpf syscall number known for {platform.machine()}")
    result = _libc.syscall(number, command, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")
    return int(result)


class TestRunAttr(ctypes.Structure):
    """union bpf_attr, as BPF_PROG_TEST_RUN reads it (include/uapi/linux/bpf.h)."""
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


def test_run(prog_fd: int, frame_bytes: int = 64) -> int:
    """Runs a TC program once on a zeroed frame; its return value."""
    frame = (ctypes.c_char * frame_bytes)()
    out = (ctypes.c_char * frame_bytes)()
    attr = TestRunAttr(prog_fd=prog_fd, data_size_in=frame_bytes, data_size_out=frame_bytes,
                       data_in=ctypes.addressof(frame), data_out=ctypes.addressof(out), repeat=1)
    bpf(PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    return int(attr.retval)
