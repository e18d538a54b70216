"""Part 3: what a scrape costs with N distinct flows waiting in the kernel's flows map.

For every round the sprayer sends one packet of each of N distinct flows through the node
(filling the map on the classifier's ordinary path), then one scrape drains, folds and serves
them. Measured around that scrape: its latency seen by the client, the exporter's CPU time, and
afterwards its memory. The scrape's own counters are checked to hold all N packets, so a round
whose flows did not all reach the map is not taken for a fast one."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lab.exporter_process import ExporterProcess
from lab.testnode import TestNode

from . import startup
from .procstat import Memory, cpu_seconds, memory
from .sprayer import Sprayer

FLOW_PACKETS = "ebpf_net_flow_packets_total{"
SPRAYED_SOURCE = 'src_ip="172.'


@dataclass
class ScrapeRun:
    flows: int
    sources: int
    latencies: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    series: int = 0                 # every sample line of the last scrape
    flow_series: int = 0            # ebpf_net_flow_{bytes,packets}_total series
    memory: Memory | None = None
    missing_packets: int = 0        # sprayed but not in the scrape (should stay 0)


def config_for(max_flows: int) -> dict:
    """Map capacities and series caps raised so that nothing overflows."""
    return {"maps": {"flow_capacity": max_flows + max_flows // 4},
            "series": {"max_per_metric": max_flows}}


def _sprayed_packets(body: str) -> int:
    total = 0
    for line in body.splitlines():
        if line.startswith(FLOW_PACKETS) and SPRAYED_SOURCE in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def _scrape(exporter: ExporterProcess) -> tuple[float, float, str]:
    pid = exporter.proc.pid
    cpu = cpu_seconds(pid)
    began = time.perf_counter()
    status, body = exporter.get("/metrics", timeout=120)
    took = time.perf_counter() - began
    if status != 200:
        raise RuntimeError(f"scrape failed with {status}")
    return took, cpu_seconds(pid) - cpu, body


def run(node: TestNode, sizes: list[int], rounds: dict[int, int], ports_per_source: int,
        progress: Callable[[str], None] = print) -> list[ScrapeRun]:
    started = startup.start(node, config=config_for(max(sizes)))
    exporter = started.exporter
    results = []
    try:
        _, _, body = _scrape(exporter)
        counted = _sprayed_packets(body)
        for size in sizes:
            sprayer = Sprayer(node, size, ports_per_source)
            run = ScrapeRun(size, sprayer.sources)
            try:
                for _ in range(rounds[size]):
                    sprayer.spray()
                    took, cpu, body = _scrape(exporter)
                    run.latencies.append(took)
                    run.cpu_seconds.append(cpu)
                    now = _sprayed_packets(body)
                    run.missing_packets += size - (now - counted)
                    counted = now
            finally:
                sprayer.close()
            samples = [line for line in body.splitlines() if line and line[0] != "#"]
            run.series = len(samples)
            run.flow_series = sum(line.startswith("ebpf_net_flow_") for line in samples)
            run.memory = memory(exporter.proc.pid)
            results.append(run)
            progress(f"  {size} flows: scrapes {', '.join(f'{t:.3f}' for t in run.latencies)}"
                     f" s, {run.flow_series} flow series, RSS {run.memory.rss_mib:.0f} MiB")
    finally:
        exporter.stop()
    return results
