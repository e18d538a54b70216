"""The bpf(2) system call for what the exporter does without bcc (which it loads only in the
short-lived compiler process, exporter/kernel/compiler.py): map lookups, updates, deletes and
batch reads, BPF_PROG_TEST_RUN, BPF_ENABLE_STATS, BPF_LINK_CREATE for tcx and uprobe_multi
links, perf-event uprobes, a map's BTF; and probes of the kernel's BPF atomics and tcx links."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from typing import Any

SYSCALL_NUMBER = {"x86_64": 321, "aarch64": 280}
PROG_LOAD = 5
PROG_TEST_RUN = 10
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_LOOKUP_BATCH = 24
MAP_LOOKUP_AND_DELETE_BATCH = 25
MAP_DELETE_BATCH = 27
RAW_TRACEPOINT_OPEN = 17
OBJ_GET_INFO_BY_FD = 15
BTF_GET_FD_BY_ID = 19
LINK_CREATE = 28
ENABLE_STATS = 32
PROG_TYPE_SOCKET_FILTER = 1
PROG_TYPE_KPROBE = 2
TCX_INGRESS = 46            # enum bpf_attach_type, Linux >= 6.6
TCX_EGRESS = 47
TRACE_UPROBE_MULTI = 48     # Linux >= 6.6
F_BEFORE = 1 << 3           # BPF_F_BEFORE: with no relative program, first of all
F_UPROBE_MULTI_RETURN = 1   # BPF_F_UPROBE_MULTI_RETURN: uretprobes

_libc = ctypes.CDLL(None, use_errno=True)


def syscall(numbers: dict[str, int], what: str, *args: Any) -> int:
    """A system call by its number on this machine (`numbers`, by platform.machine()): its
    result; OSError naming `what` when it fails."""
    number = numbers.get(platform.machine())
    if number is None:
        raise OSError(f"{what}: no system call number known for {platform.machine()}")
    result = _libc.syscall(number, *args)
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")
    return int(result)


def bpf(command: int, attr: ctypes.Structure | ctypes.c_uint32, what: str) -> int:
    """The call's result; OSError naming `what` when it fails."""
    return syscall(SYSCALL_NUMBER, what, command, ctypes.byref(attr), ctypes.sizeof(attr))


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


class TcxLinkAttr(ctypes.Structure):
    """union bpf_attr, as BPF_LINK_CREATE reads it for a tcx link (include/uapi/linux/bpf.h)."""
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_ifindex", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("relative_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("expected_revision", ctypes.c_uint64)]


def tcx_link(prog_fd: int, ifindex: int, attach_type: int, flags: int = F_BEFORE) -> int:
    """A tcx link of a TC program on an interface's ingress or egress: the file descriptor that
    holds it (the program runs until it is closed, or the interface goes away). The kernel
    looks `ifindex` up in the calling thread's network namespace."""
    attr = TcxLinkAttr(prog_fd=prog_fd, target_ifindex=ifindex, attach_type=attach_type,
                       flags=flags)
    return bpf(LINK_CREATE, attr, "BPF_LINK_CREATE")


def has_tcx(prog_fd: int) -> bool:
    """Whether the kernel attaches TC programs with tcx links (Linux >= 6.6). Asked with a TC
    program and interface index 0, which no interface has: a kernel with tcx looks for the
    interface (ENODEV), one without rejects the attach type itself (EINVAL)."""
    try:
        os.close(tcx_link(prog_fd, 0, TCX_INGRESS))     # cannot happen; never keep it
    except OSError as e:
        return e.errno in (errno.ENODEV, errno.ENXIO)
    return True


class UprobeMultiLinkAttr(ctypes.Structure):
    """union bpf_attr, as BPF_LINK_CREATE reads it for an uprobe_multi link."""
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("path", ctypes.c_uint64), ("offsets", ctypes.c_uint64),
                ("ref_ctr_offsets", ctypes.c_uint64), ("cookies", ctypes.c_uint64),
                ("cnt", ctypes.c_uint32), ("multi_flags", ctypes.c_uint32),
                ("pid", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


def uprobe_multi_link(prog_fd: int, path: str, offsets: list[int], returns: bool) -> int:
    """One link that runs a program (loaded with expected attach type TRACE_UPROBE_MULTI) at
    each of `offsets` in the file at `path`, in every process that maps it; at their returns
    with `returns`. The file descriptor that holds it: closing it removes every probe at once,
    where a perf event per probe waits for an RCU grace period each."""
    name = ctypes.create_string_buffer(path.encode(errors="surrogateescape"))
    places = (ctypes.c_uint64 * len(offsets))(*offsets)
    attr = UprobeMultiLinkAttr(prog_fd=prog_fd, attach_type=TRACE_UPROBE_MULTI,
                               path=ctypes.addressof(name), offsets=ctypes.addressof(places),
                               cnt=len(offsets),
                               multi_flags=F_UPROBE_MULTI_RETURN if returns else 0)
    return bpf(LINK_CREATE, attr, "BPF_LINK_CREATE uprobe_multi")


class RawTracepointAttr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    """BPF_RAW_TRACEPOINT_OPEN: the raw tracepoint `name` running `prog_fd`; the descriptor
    that holds it."""
    encoded = ctypes.create_string_buffer(name.encode())
    return bpf(RAW_TRACEPOINT_OPEN, RawTracepointAttr(ctypes.addressof(encoded), prog_fd),
               f"raw tracepoint {name}")


class Insn(ctypes.Structure):
    """struct bpf_insn."""
    _fields_ = [("code", ctypes.c_uint8), ("regs", ctypes.c_uint8), ("off", ctypes.c_int16),
                ("imm", ctypes.c_int32)]


class ProgLoadAttr(ctypes.Structure):
    """The head of union bpf_attr as BPF_PROG_LOAD reads it; the kernel takes the rest as 0."""
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16),
                ("prog_ifindex", ctypes.c_uint32), ("expected_attach_type", ctypes.c_uint32)]


def load_uprobe_multi_program(insns: int, insn_bytes: int, license: bytes, name: str) -> int:
    """Loads a kprobe-type program for uprobe_multi links (bcc's loader cannot set the expected
    attach type): `insns` points at the instructions bcc compiled, map descriptors already in
    them. OSError with the verifier's last words when the kernel refuses it."""
    licensed = ctypes.create_string_buffer(license)
    attr = ProgLoadAttr(prog_type=PROG_TYPE_KPROBE, insn_cnt=insn_bytes // ctypes.sizeof(Insn),
                        insns=insns, license=ctypes.addressof(licensed),
                        prog_name=name.encode()[:15], expected_attach_type=TRACE_UPROBE_MULTI)
    try:
        return bpf(PROG_LOAD, attr, f"BPF_PROG_LOAD {name}")
    except OSError as error:
        log = ctypes.create_string_buffer(1 << 20)
        attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ctypes.addressof(log)
        try:
            return bpf(PROG_LOAD, attr, f"BPF_PROG_LOAD {name}")
        except OSError:
            last = [line for line in log.value.decode(errors="replace").splitlines() if line]
            raise OSError(error.errno, f"{error.strerror}: {' / '.join(last[-2:])}") from None


def has_uprobe_multi() -> bool:
    """Whether the kernel has uprobe_multi links (Linux >= 6.6): a two-instruction program is
    linked to "/", which a kernel with them refuses as no regular file (EBADF), and one
    without as an unknown attach type (EINVAL)."""
    program = (Insn * 2)(_insn(0xB7, dst=0), _insn(0x95))     # r0 = 0; exit
    try:
        fd = load_uprobe_multi_program(ctypes.addressof(program), ctypes.sizeof(program),
                                       b"GPL", "uprobe_probe")
    except OSError:
        return False
    try:
        os.close(uprobe_multi_link(fd, "/", [0], False))      # cannot happen; never keep it
    except OSError as e:
        return e.errno == errno.EBADF
    finally:
        os.close(fd)
    return True


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> Insn:
    return Insn(code, dst | src << 4, off, imm)


# *(u64 *)(r10 - 8) = 0; r0 = 0; r1 = 1; r0 = cmpxchg((u64 *)(r10 - 8), r0, r1); r0 = 0; exit
CMPXCHG_PROGRAM = (
    _insn(0x7A, dst=10, off=-8),                    # BPF_ST | BPF_MEM | BPF_DW
    _insn(0xB7, dst=0),                             # BPF_ALU64 | BPF_MOV | BPF_K
    _insn(0xB7, dst=1, imm=1),
    _insn(0xDB, dst=10, src=1, off=-8, imm=0xF1),   # BPF_STX | BPF_ATOMIC | BPF_DW, BPF_CMPXCHG
    _insn(0xB7, dst=0),
    _insn(0x95),                                    # BPF_JMP | BPF_EXIT
)


def has_atomics() -> bool:
    """Whether the kernel's verifier takes BPF_CMPXCHG and the other atomics of Linux 5.12
    (bpf/tcp.c's socket marks need them): a six-instruction program is loaded and closed."""
    insns = (Insn * len(CMPXCHG_PROGRAM))(*CMPXCHG_PROGRAM)
    license = ctypes.create_string_buffer(b"GPL")
    attr = ProgLoadAttr(prog_type=PROG_TYPE_SOCKET_FILTER, insn_cnt=len(CMPXCHG_PROGRAM),
                        insns=ctypes.addressof(insns), license=ctypes.addressof(license))
    try:
        fd = bpf(PROG_LOAD, attr, "BPF_PROG_LOAD")
    except OSError:
        return False
    os.close(fd)
    return True


class InfoByFdAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class MapInfo(ctypes.Structure):
    """struct bpf_map_info, up to the BTF type ids."""
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
                ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
                ("btf_id", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32)]


class BtfInfo(ctypes.Structure):
    """struct bpf_btf_info."""
    _fields_ = [("btf", ctypes.c_uint64), ("btf_size", ctypes.c_uint32),
                ("id", ctypes.c_uint32), ("name", ctypes.c_uint64),
                ("name_len", ctypes.c_uint32), ("kernel_btf", ctypes.c_uint32)]


def _info(fd: int, info: ctypes.Structure, what: str) -> None:
    attr = InfoByFdAttr(fd, ctypes.sizeof(info), ctypes.addressof(info))
    bpf(OBJ_GET_INFO_BY_FD, attr, what)


def map_info(map_fd: int) -> MapInfo:
    info = MapInfo()
    _info(map_fd, info, "map info")
    return info


def btf_id(btf_fd: int) -> int:
    """The id of the BTF object open as `btf_fd`."""
    info = BtfInfo()
    _info(btf_fd, info, "BTF info")
    return int(info.id)


def btf_data_of(btf_fd: int) -> bytes:
    """The raw BTF (header, types, strings) of the BTF object open as `btf_fd`: a program's
    own, which its maps' key and value type ids refer to. Needs no capability: the
    descriptor is the right to read it."""
    info = BtfInfo()
    _info(btf_fd, info, "BTF info")          # the size first
    data = ctypes.create_string_buffer(info.btf_size)
    info = BtfInfo(btf=ctypes.addressof(data), btf_size=len(data))
    _info(btf_fd, info, "BTF info")
    return data.raw[:info.btf_size]


def btf_data(btf_id: int) -> bytes:
    """btf_data_of the kernel's BTF object `btf_id` (opening one by id takes CAP_SYS_ADMIN)."""
    fd = bpf(BTF_GET_FD_BY_ID, ctypes.c_uint32(btf_id), "open BTF by id")
    try:
        return btf_data_of(fd)
    finally:
        os.close(fd)


class MapElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]


class MapBatchAttr(ctypes.Structure):
    """The `batch` member of union bpf_attr (BPF_MAP_*_BATCH)."""
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64),
                ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def map_batch(command: int, map_fd: int, in_batch: int, out_batch: int, keys: int,
              values: int, count: int) -> tuple[int, int]:
    """One BPF_MAP_LOOKUP_BATCH, LOOKUP_AND_DELETE_BATCH or DELETE_BATCH call (in_batch 0:
    from the start; the other arguments are addresses): how many entries it did, and 0 or the
    errno it failed with (ENOENT: it reached the end of the map, after those entries)."""
    attr = MapBatchAttr(in_batch=in_batch, out_batch=out_batch, keys=keys, values=values,
                        count=count, map_fd=map_fd)
    try:
        bpf(command, attr, "map batch")
    except OSError as e:
        return attr.count, e.errno or errno.EIO
    return attr.count, 0


def map_lookup(map_fd: int, key: bytes, value_bytes: int) -> bytes | None:
    """BPF_MAP_LOOKUP_ELEM: the value (for a per-CPU map, every possible CPU's, each padded
    to 8 bytes), or None when the key is not there."""
    key_buffer = ctypes.create_string_buffer(key, len(key))
    value = ctypes.create_string_buffer(value_bytes)
    try:
        bpf(MAP_LOOKUP_ELEM, MapElemAttr(map_fd=map_fd, key=ctypes.addressof(key_buffer),
                                         value=ctypes.addressof(value)), "map lookup")
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return value.raw


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    """BPF_MAP_UPDATE_ELEM (BPF_ANY); OSError when the kernel refuses (E2BIG: the map is
    full)."""
    key_buffer = ctypes.create_string_buffer(key, len(key))
    value_buffer = ctypes.create_string_buffer(value, len(value))
    bpf(MAP_UPDATE_ELEM, MapElemAttr(map_fd=map_fd, key=ctypes.addressof(key_buffer),
                                     value=ctypes.addressof(value_buffer)), "map update")


def map_delete(map_fd: int, key: bytes) -> bool:
    """BPF_MAP_DELETE_ELEM: whether the key was there and is gone now."""
    buffer = ctypes.create_string_buffer(key, len(key))
    try:
        bpf(MAP_DELETE_ELEM, MapElemAttr(map_fd=map_fd, key=ctypes.addressof(buffer)),
            "map delete")
    except OSError:
        return False
    return True


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """CPUs the kernel may ever bring up (a per-CPU map has a value for each): the count of
    a list of ranges such as 0-3,8-11."""
    with open(path) as f:
        total = 0
        for part in f.read().strip().split(","):
            first, _, last = part.partition("-")
            total += int(last or first) - int(first) + 1
        return total
