"""The compiler process (exporter/kernel/compiler.py): the long-lived exporter maps no bcc,
clang or LLVM, holds every program, map and attachment itself, and a kill -9 of it, during
start-up or after, leaves no compiler process and nothing loaded or attached."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from lab.exporter_process import ExporterProcess, children, fd_infos, tcx_links, wait_until
from lab.testnode import TestNode, udp_send

pytestmark = pytest.mark.kernel

# bcc's library and the compiler it links: what start-up needs and the exporter must not keep
COMPILER_LIBRARIES = ("libbcc", "libclang", "libLLVM", "libllvm")
EVERY_PROGRAM = ["--collector.tcp", "--collector.drops", "--collector.bash", "--collector.dns",
                 "--collector.http", "--collector.https", "--collector.flows"]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def mapped_libraries(pid: int) -> set[str]:
    return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if ".so" in line}


def perf_attachments(pid: int) -> list[dict]:
    """bpftool's perf-event attachments (tracepoints, raw tracepoints, uprobes) the process
    holds."""
    out = subprocess.run(["bpftool", "perf", "show", "--json"], capture_output=True, text=True,
                         check=True).stdout
    return [entry for entry in json.loads(out or "[]") if entry["pid"] == pid]


def prog_exists(prog_id: int) -> bool:
    return subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)],
                          capture_output=True).returncode == 0


def held_programs(pid: int) -> set[int]:
    return {int(info["prog_id"]) for info in fd_infos(pid) if "prog_id" in info}


def test_the_running_exporter_maps_no_compiler_and_still_counts_exactly(node: TestNode,
                                                                        tmp_path):
    with ExporterProcess(node, EVERY_PROGRAM,
                         config={"bash": {"log_file": str(tmp_path / "bash.jsonl")}}
                         ) as exporter:
        exporter.wait_ready()
        pid = exporter.proc.pid
        assert not children(pid), "the compiler process is still running after start-up"
        libraries = mapped_libraries(pid)
        assert not [lib for lib in libraries if any(name in lib for name in COMPILER_LIBRARIES)]
        # what bcc attached in the compiler is held here: the TCP, drop and exec tracepoints,
        # and the bash uretprobe attached without bcc
        kinds = {(entry["fd_type"], entry.get("tracepoint", entry.get("filename")))
                 for entry in perf_attachments(pid)}
        assert ("raw_tracepoint", "inet_sock_set_state") in kinds
        assert ("tracepoint", "kfree_skb") in kinds
        assert ("tracepoint", "sched_process_exec") in kinds
        assert [f for kind, f in kinds if kind == "uretprobe" and f.endswith("bash")]
        assert len(tcx_links(pid)) == 4
        # the maps, read and written through their descriptors alone: 37 datagrams, exactly
        sizes = [100] * 37
        assert udp_send(node.a_ns, node.b_ns, node.b_ip, 9911, sizes) == len(sizes)
        labels = {"src_ip": node.a_ip, "dst_ip": node.b_ip, "dst_port": "9911",
                  "protocol": "udp"}
        scrape = exporter.wait_for(
            lambda s: s.select("ebpf_net_flow_packets_total", **labels), "the datagrams")
        assert scrape.value("ebpf_net_flow_packets_total", **labels) == 37
        assert scrape.value("ebpf_net_flow_bytes_total", **labels) == 37 * (100 + 8 + 20)


@pytest.mark.parametrize("when", ["while compiling", "after start-up"])
def test_a_kill_9_leaves_no_compiler_and_nothing_loaded_or_attached(node: TestNode, when: str,
                                                                    tmp_path):
    exporter = ExporterProcess(node, EVERY_PROGRAM,
                               config={"bash": {"log_file": str(tmp_path / "bash.jsonl")}})
    pid = exporter.proc.pid
    compiler: list[int] = []
    programs: set[int] = set()

    def compiling() -> bool:
        compiler[:] = children(pid)
        if compiler:    # programs compiled so far, on either side
            programs.update(held_programs(compiler[0]) | held_programs(pid))
        return bool(compiler) and bool(programs)

    if when == "while compiling":
        wait_until(compiling, 60, "the compiler to have loaded a program", interval=0.02)
    else:
        exporter.wait_ready()
        programs.update(held_programs(pid))
        assert perf_attachments(pid)
    exporter.stop(signal.SIGKILL)
    assert exporter.proc.returncode == -signal.SIGKILL
    if compiler:
        wait_until(lambda: not alive(compiler[0]), 10, "the compiler process to end")
    assert not perf_attachments(pid)
    wait_until(lambda: not any(prog_exists(p) for p in programs), 30,
               "the kernel to unload every program the exporter had")
