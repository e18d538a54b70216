"""The compiler process: bcc, with LLVM and clang, lives only here, for the exporter's
start-up, so that the long-lived exporter never maps them (they were 140 MiB of its RSS).

The exporter starts it on the first program it wants (`Compiler`), asks it over a Unix
socketpair to compile programs and load their functions, and receives the file descriptors
it made (SCM_RIGHTS): every map, every loaded function, and the tracepoint attachments bcc
made at compile time (perf events and raw tracepoints). Then it tells it to exit. The
exporter holds the only lasting copies of those descriptors: the programs stay loaded and
attached exactly as long as the exporter lives, and a kill -9 of either leaves nothing behind
(the process dies with its parent, PR_SET_PDEATHSIG).

The exporter side of a compiled program, `CompiledProgram`, answers what bcc's BPF object
did: `table(name)` (exporter/kernel/kernelmap.py), the loaded functions' descriptors, and
uretprobes attached as perf events (exporter/kernel/perfevents.py)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from .. import logs
from . import bpfsys, elfsymbols, perfevents
from .btf import Btf, BtfError
from .kernelmap import KernelMap
from .loader import LoadError

log = logs.get("loader")

MAX_MESSAGE = 1 << 20
MAX_FDS = 250                   # SCM_MAX_FD is 253
PR_SET_PDEATHSIG = 1
FUNCTION_KINDS = ("tc", "probe", "uprobe_multi")


# --------------------------------------------------------------------------
# the exporter's side


@dataclass
class LoadedFunction:
    """A function of a compiled program, loaded into the kernel: what bcc's load_func gave."""
    name: str
    fd: int


@dataclass
class Tracepoint:
    """A tracepoint ("category:name") or raw tracepoint ("name") a program is attached to:
    `fd` holds the attachment (None while detached), `prog_fd` the function it runs."""
    name: str
    raw: bool
    prog_fd: int
    fd: int | None

    def attach(self) -> None:
        if self.fd is None:
            category, _, event = self.name.partition(":")
            self.fd = (bpfsys.raw_tracepoint_open(self.name, self.prog_fd) if self.raw
                       else perfevents.tracepoint(self.prog_fd, category, event))

    def detach(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Compiler:
    """The compiler process, started on the first request and ended by close()."""

    def __init__(self, log_level: str = "info", log_format: str = "logfmt") -> None:
        self._log = (log_level, log_format)
        self._sock: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.bcc_version = "unknown"

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "exporter.kernel.compiler", str(theirs.fileno()),
                 str(os.getpid()), *self._log],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        self._sock = ours
        return ours

    def request(self, what: str, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """Its answer and the descriptors that came with it; LoadError naming `what` when
        it failed or the process ended."""
        sock = self._sock or self._start()
        sock.sendall(json.dumps(message).encode())
        data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
        if not data:
            code = self._process.wait() if self._process else None
            self._forget()
            ended = (f"killed by signal {-code}" if code is not None and code < 0
                     else f"exit code {code}")
            raise LoadError(f"{what}: the compiler process ended ({ended}); the log above "
                            "has its output")
        reply = json.loads(data)
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            raise LoadError(reply["error"])
        return reply, fds

    def compile(self, name: str, source_file: str, cflags: list[str]) -> CompiledProgram:
        reply, fds = self.request(f"bpf program {name}", {
            "op": "compile", "name": name, "source": source_file, "cflags": cflags})
        self.bcc_version = reply["bcc_version"]
        count = len(reply["maps"])
        maps = dict(zip(reply["maps"], fds[:count], strict=True))
        # then, per tracepoint, the attachment and the function it runs; then the BTF
        attached = 2 * len(reply["tracepoints"])
        pairs, btf_fds = fds[count:count + attached], fds[count + attached:]
        tracepoints = [Tracepoint(event, raw, pairs[2 * i + 1], pairs[2 * i])
                       for i, (event, raw) in enumerate(reply["tracepoints"])]
        log.debug("bpf program loaded", extra={
            "program": name, "maps": len(maps),
            "tracepoints": ",".join(t.name for t in tracepoints)})
        return CompiledProgram(self, name, reply["handle"], maps, tracepoints,
                               {bpfsys.btf_id(fd): fd for fd in btf_fds})

    def close(self) -> None:
        """Ends the process (what it compiled stays loaded: the exporter holds it)."""
        if self._sock is not None:
            try:
                self._sock.sendall(json.dumps({"op": "exit"}).encode())
            except OSError:
                pass
        if self._process is not None:
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._forget()

    def _forget(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._process = None, None


@dataclass
class CompiledProgram:
    """One program compiled and loaded by the compiler process, held by its descriptors."""
    compiler: Compiler
    name: str
    handle: int
    map_fds: dict[str, int]
    tracepoints: list[Tracepoint]
    btf_fds: dict[int, int]             # BTF id -> the descriptor of the program's BTF
    probes: list[int] = field(default_factory=list)     # uprobes' perf events
    _functions: dict[tuple[str, str], int] = field(default_factory=dict)
    _tables: dict[str, KernelMap] = field(default_factory=dict)
    _btf: dict[int, Btf | None] = field(default_factory=dict)

    def _load(self, function: str, kind: str) -> int:
        if (function, kind) not in self._functions:
            _, fds = self.compiler.request(f"bpf program {self.name}", {
                "op": "load", "handle": self.handle, "function": function, "kind": kind})
            self._functions[(function, kind)] = fds[0]
        return self._functions[(function, kind)]

    def load_tc(self, function: str) -> LoadedFunction:
        return LoadedFunction(function, self._load(function, "tc"))

    def load_probe(self, function: str) -> LoadedFunction:
        """A uprobe (kprobe-type) function, loaded now so that attaching it later needs no
        compiler."""
        return LoadedFunction(function, self._load(function, "probe"))

    def load_uprobe_multi(self, function: str) -> int:
        return self._load(function, "uprobe_multi")

    def attach_uretprobe(self, binary: str, symbol: str, function: str) -> None:
        offset = elfsymbols.function_offsets(binary, [symbol]).get(symbol)
        if offset is None:
            raise LoadError(f"bpf program {self.name}: {binary} has no function {symbol}")
        try:
            fd = perfevents.uprobe(self.load_probe(function).fd, binary, offset, returns=True)
        except OSError as e:
            raise LoadError(f"bpf program {self.name}: {function}: {e}") from e
        self.probes.append(fd)

    def set_tracepoints_attached(self, on: bool) -> int:
        """Takes the program off its tracepoints (its maps and counts stay) or puts it back:
        the benchmarks' switch. Returns how many changed."""
        changed = [t for t in self.tracepoints if (t.fd is not None) != on]
        for tracepoint in changed:
            tracepoint.attach() if on else tracepoint.detach()
        return len(changed)

    def table(self, name: str) -> KernelMap:
        if name not in self._tables:
            fd = self.map_fds.get(name)
            if fd is None:
                raise KeyError(f"bpf program {self.name} has no map {name}")
            self._tables[name] = KernelMap(name, fd, self._btf_of)
        return self._tables[name]

    def _btf_of(self, btf_id: int) -> Btf | None:
        """The BTF object `btf_id` that maps' types are in, read through the descriptor the
        compiler process passed (opening BTF by id would take CAP_SYS_ADMIN)."""
        if btf_id not in self._btf:
            fd = self.btf_fds.get(btf_id)
            try:
                self._btf[btf_id] = Btf(bpfsys.btf_data_of(fd)) if fd is not None else None
            except (OSError, BtfError) as e:
                log.warning("a map's BTF cannot be read: its items are plain bytes",
                            extra={"program": self.name, "error": str(e)})
                self._btf[btf_id] = None
        return self._btf[btf_id]

    def forget_btf(self) -> None:
        """Drops the BTF kept to build the maps' types (the tables made so far keep theirs)."""
        self._btf.clear()

    def close(self) -> None:
        """Detaches its tracepoints and probes and unloads it (with the last descriptor)."""
        self.set_tracepoints_attached(False)
        for fd in [*self.probes, *(t.prog_fd for t in self.tracepoints),
                   *self._functions.values(), *self.map_fds.values(), *self.btf_fds.values()]:
            os.close(fd)
        self.tracepoints, self.probes, self._functions, self.map_fds = [], [], {}, {}
        self.btf_fds = {}
        self._tables.clear()


# --------------------------------------------------------------------------
# the compiler process's side


def _table_names(bpf: Any) -> list[str]:
    from bcc.libbcc import lib

    lib.bpf_num_tables.restype = ctypes.c_size_t
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return [lib.bpf_table_name(bpf.module, i).decode()
            for i in range(lib.bpf_num_tables(bpf.module))]


def _btf_fds(map_fds: list[int]) -> list[int]:
    """The descriptors of the BTF objects the maps' types are in: bcc keeps each program's
    open, without saying which descriptor it is, so they are found among this process's."""
    wanted = {int(bpfsys.map_info(fd).btf_id) for fd in map_fds} - {0}
    found = []
    for entry in os.scandir("/proc/self/fd"):
        try:
            if os.readlink(entry.path) != "anon_inode:btf":
                continue
            fd = int(entry.name)
            btf_id = bpfsys.btf_id(fd)
            if btf_id in wanted:
                wanted.discard(btf_id)
                found.append(fd)
        except OSError:
            continue        # the descriptor scandir itself used, closed by now
    return found


class _Server:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.programs: list[Any] = []

    def compile(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        import bcc
        from bcc.libbcc import lib

        from .loader import Program

        program = Program(request["name"], request["source"], request["cflags"])
        self.programs.append(program)
        bpf = program.bpf
        names = _table_names(bpf)
        fds = [lib.bpf_table_fd(bpf.module, name.encode()) for name in names]
        # bcc attached its TRACEPOINT_PROBEs and RAW_TRACEPOINT_PROBEs as it compiled, each
        # from a function named after its tracepoint
        tracepoints = []
        for name, fd in bpf.tracepoint_fds.items():
            function = b"tracepoint__" + name.replace(b":", b"__")
            tracepoints.append((name.decode(), False, fd, bpf.funcs[function].fd))
        for name, fd in bpf.raw_tracepoint_fds.items():
            tracepoints.append((name.decode(), True, fd, bpf.funcs[b"raw_tracepoint__" + name].fd))
        return ({"handle": len(self.programs) - 1, "maps": names,
                 "bcc_version": str(getattr(bcc, "__version__", "unknown")),
                 "tracepoints": [(name, raw) for name, raw, _, _ in tracepoints]},
                [*fds, *(fd for _, _, attached, function in tracepoints
                         for fd in (attached, function)), *_btf_fds(fds)])

    def load(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        program = self.programs[request["handle"]]
        function, kind = request["function"], request["kind"]
        if kind == "tc":
            return {}, [program.load_tc(function).fd]
        if kind == "probe":
            return {}, [program.load_probe(function).fd]
        if kind == "uprobe_multi":
            return {}, [program.load_uprobe_multi(function)]
        raise LoadError(f"bpf program {program.name}: no kind of function {kind!r}")

    def serve(self) -> None:
        while True:
            data = self.sock.recv(MAX_MESSAGE)
            if not data:
                return                      # the exporter is gone
            request = json.loads(data)
            if request["op"] == "exit":
                return
            try:
                reply, fds = (self.compile(request) if request["op"] == "compile"
                              else self.load(request))
            except LoadError as e:
                reply, fds = {"error": str(e)}, []
            except Exception as e:      # what bcc raises past the loader: one line, no trace
                reply, fds = {"error": f"bpf program: {type(e).__name__}: {e}"}, []
            socket.send_fds(self.sock, [json.dumps(reply).encode()], fds)


def main(argv: list[str]) -> None:
    fd, parent, level, fmt = int(argv[0]), int(argv[1]), argv[2], argv[3]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # a Ctrl-C or a SIGHUP meant for the exporter reaches its whole process group: the
    # exporter decides, and its closing the socket ends this process
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if os.getppid() != parent:
        os._exit(1)                 # the exporter ended before the line above
    logs.setup(level, fmt)
    server = _Server(socket.socket(fileno=fd))
    server.serve()
    # no bcc clean-up at exit: it would disable the perf events the exporter now holds
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
