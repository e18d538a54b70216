"""Compiles and loads the C programs in bpf/ with bcc.

bcc rewrites map calls (``flows.lookup(...)``) only in the main source text, not in included
files, so local ``#include "x.h"`` lines are expanded here into one text, with ``#line`` markers
so compiler messages still name the right file and line.

bcc prints compiler and verifier output straight to file descriptor 2; it is captured here, so
a failure becomes one line for the user and the full log goes to the debug log. LLVM ends the
process from C++ on some errors (a program over the 512-byte BPF stack, say), where no Python
code runs again: the capture is a named file, announced before compiling and removed only after,
so what the compiler said survives such an exit."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from .. import logs

log = logs.get("loader")

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


class LoadError(Exception):
    """A BPF program did not compile or the kernel refused it."""


def index_flags(prefix: str, names: Sequence[str]) -> list[str]:
    """-D flags numbering `names` for C: PREFIX_NAME=i for each, and PREFIX_COUNT. The lists
    that name the slots of an array map (failures, parse errors, tail calls) are written once,
    in Python, which labels the counts it reads by them."""
    return [*(f"-D{prefix}_{name}={index}" for index, name in enumerate(names)),
            f"-D{prefix}_COUNT={len(names)}"]


def bpf_dir() -> Path:
    """Where the C sources are: EBPF_NET_BPF_DIR, else bpf/ next to the package."""
    override = os.environ.get("EBPF_NET_BPF_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "bpf"


def expand_source(path: Path, seen: set[Path] | None = None) -> str:
    """The file's text with its local includes inlined (each once, like include guards)."""
    seen = set() if seen is None else seen
    seen.add(path)
    lines = [f'#line 1 "{path.name}"']
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = _LOCAL_INCLUDE.match(line)
        if not match:
            lines.append(line)
            continue
        included = path.parent / match.group(1)
        if not included.is_file():
            raise LoadError(f"{path.name}:{number}: included file {match.group(1)} not found")
        if included not in seen:
            lines.append(expand_source(included, seen))
        lines.append(f'#line {number + 1} "{path.name}"')
    return "\n".join(lines)


@contextlib.contextmanager
def _captured_stderr(program: str, step: str) -> Iterator[list[str]]:
    """Collects what C code writes to fd 2 while inside; the text lands in the yielded list."""
    captured: list[str] = []
    sink = tempfile.NamedTemporaryFile(
        mode="w+b", prefix=f"ebpf-net-exporter-{program}-", suffix=".log", delete=False)
    log.info(f"bpf program {program}: {step}", extra={"compiler_output": sink.name})
    saved = os.dup(2)
    os.dup2(sink.fileno(), 2)
    try:
        yield captured
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        sink.seek(0)
        captured.append(sink.read().decode(errors="replace"))
        sink.close()
        os.unlink(sink.name)


def _summary(output: str, error: Exception) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    compile_errors = [line for line in lines if " error: " in line or line.startswith("error:")]
    if compile_errors:
        return f"compile error: {compile_errors[0]}"
    if "Failed to load" in str(error) or "processed" in output:
        # the verifier's reason is the line before "processed N insns"
        for i, line in enumerate(lines):
            if line.startswith("processed ") and i > 0:
                return f"rejected by the kernel verifier: {lines[i - 1]}"
        return f"rejected by the kernel: {error}"
    return str(error)


class LoadedProgram(Protocol):
    """What the kernel modules use of a loaded program: the exporter's (compiler.
    CompiledProgram, handed over by the compiler process) and the live view's (Program,
    compiled in its own process) alike."""
    name: str

    def load_tc(self, function: str) -> Any: ...
    def load_probe(self, function: str) -> Any: ...
    def load_uprobe_multi(self, function: str) -> int: ...
    def table(self, name: str) -> Any: ...


class Program:
    """One compiled C program: bcc's BPF object plus the name the logs use."""

    def __init__(self, name: str, source_file: str, cflags: Sequence[str] = ()) -> None:
        self.name = name
        self.source_file = source_file
        self.cflags = list(cflags)
        self.text = expand_source(bpf_dir() / source_file)
        self._own_fds: list[int] = []       # programs loaded outside bcc
        self.bpf: Any = self._run("compile", self._compile)

    def _compile(self) -> Any:
        import bcc

        return bcc.BPF(text=self.text.encode(), cflags=self.cflags)

    def _run(self, what: str, action: Any, *args: Any) -> Any:
        with _captured_stderr(self.name, what) as output:
            try:
                result = action(*args)
                error = None
            except Exception as e:  # bcc raises bare Exception
                error = e
        text = output[0] if output else ""
        if text.strip():
            log.debug("bcc output", extra={"program": self.name, "step": what, "output": text})
        if error is not None:
            raise LoadError(f"bpf program {self.name}: {_summary(text, error)}") from error
        return result

    def load_tc(self, function: str) -> Any:
        import bcc

        return self._run(f"load {function}", self.bpf.load_func, function.encode(),
                         bcc.BPF.SCHED_CLS)

    def load_uprobe_multi(self, function: str) -> int:
        """The function loaded for uprobe_multi links (bcc's loader cannot set the expected
        attach type they need): its descriptor, closed with the program."""
        import bcc

        from . import bpfsys

        module, name = self.bpf.module, function.encode()
        start = bcc.lib.bpf_function_start(module, name)
        if not start:
            raise LoadError(f"bpf program {self.name}: no function {function}")
        try:
            fd = bpfsys.load_uprobe_multi_program(start, bcc.lib.bpf_function_size(module, name),
                                                  bcc.lib.bpf_module_license(module), function)
        except OSError as e:
            raise LoadError(f"bpf program {self.name}: {function}: {e}") from e
        self._own_fds.append(fd)
        return fd

    def load_probe(self, function: str) -> Any:
        """Loads a uprobe (or kprobe-type) function, so that attaching it later loads nothing."""
        import bcc

        return self._run(f"load {function}", self.bpf.load_func, function.encode(),
                         bcc.BPF.KPROBE)

    def attach_uretprobe(self, binary: str, symbol: str, function: str) -> None:
        def attach() -> None:
            self.bpf.attach_uretprobe(name=binary.encode(), sym=symbol.encode(),
                                      fn_name=function.encode())

        self._run(f"attach {function} to {binary}:{symbol}", attach)

    def table(self, name: str) -> Any:
        return self.bpf[name.encode()]

    def close(self) -> None:
        self.bpf.cleanup()
        for fd in self._own_fds:
            os.close(fd)
        self._own_fds = []
