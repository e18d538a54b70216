"""Part 7: what HTTP/2 and gRPC cost the exporter's user space, under a gRPC-shaped load.

h2load (nghttp2's load generator, C) sends unary "gRPC" calls on a few multiplexed h2c
connections from pod a to an nginx on pod b that answers each like a gRPC server: response
HEADERS, a DATA frame, and trailers with grpc-status 0. On the wire and to the exporter each
call is what a real unary gRPC call is (a request HEADERS, response HEADERS, trailers: three
records), at a rate no Python gRPC stack reaches on two cores. The exporter's CPU time (user and
system: its own threads, not the BPF programs, which run in the senders' context) over the
load, divided by the calls its metrics counted, is the user-space cost per call; the target is
20,000 calls a second within half a core. Its counts are checked too: every call counted
once, with grpc_status OK.

    python -m benchmarks.grpc_load [--calls N] [--repetitions K]   alone, on a node of its own"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab.exporter_process import ExporterProcess, Scrape, wait_until
from lab.testnode import TestNode, nginx_config

from .procstat import cpu_seconds

PORT = 8092
LOST = "ebpf_net_exporter_bpf_map_update_failures_total"
METHOD = "/bench.Echo/Unary"
TARGET_CALLS_PER_SECOND = 20_000
TARGET_CORES = 0.5
# h2load: connections, and streams in flight on each (grpc-go's default allows 100)
CONNECTIONS, STREAMS = 4, 32
# a 5-byte gRPC message: the length-prefixed frame of an empty protobuf (nginx answers with
# five bytes too; what they hold is nothing to the exporter, which steps over DATA)
GRPC_MESSAGE = b"\x00\x00\x00\x00\x00"


@dataclass(frozen=True)
class GrpcLoad:
    calls: int                  # h2load's, succeeded
    counted: float              # the exporter's ebpf_net_grpc_requests_total{grpc_status="OK"}
    other_statuses: float       # anything else the exporter counted for them
    seconds: float              # the load's wall time
    cpu_seconds: float          # the exporter's, over the load and until it counted them all
    rate: int | None = TARGET_CALLS_PER_SECOND     # asked of h2load; None: unpaced
    records_lost: float = 0     # ebpf_net_exporter_bpf_map_update_failures_total{http2_records}

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds

    @property
    def us_per_call(self) -> float:
        return self.cpu_seconds / max(self.counted, 1) * 1e6

    @property
    def cores_at_target(self) -> float:
        return self.us_per_call * 1e-6 * TARGET_CALLS_PER_SECOND

    @property
    def cores(self) -> float:
        """The exporter's CPU over the load, in cores."""
        return self.cpu_seconds / self.seconds

    @property
    def met(self) -> bool:
        return self.cores_at_target < TARGET_CORES and self.counted == self.calls


def prepare(node: TestNode) -> None:
    """nginx answering every call like a gRPC server, on pod b (stopped with the node)."""
    root = Path(node.tmpdir) / "grpc-nginx"
    root.mkdir(exist_ok=True)
    (root / "message").write_bytes(GRPC_MESSAGE)
    conf = root / "nginx.conf"
    conf.write_text(nginx_config(
        str(root), [f"{node.b_ip}:{PORT} http2"], {},
        http_extra="keepalive_requests 1000000000; "
                   "http2_max_concurrent_streams 128;",
        server_extra=f"location = {METHOD} {{ default_type application/grpc; "
                     f"add_trailer grpc-status 0; return 200 \"12345\"; }}"))
    node.spawn(node.b_ns, ["nginx", "-c", str(conf), "-p", str(root)])
    wait_until(lambda: _h2load(node, 1, 1, 1).returncode == 0, 10, "nginx answering h2c")


def _h2load(node: TestNode, calls: int, connections: int, streams: int,
            rate: int | None = None) -> subprocess.CompletedProcess[str]:
    """`calls` calls, at `rate` a second in all when given (each connection's share)."""
    data = Path(node.tmpdir) / "grpc-nginx" / "message"
    paced = ["--rps", str(max(rate // connections, 1))] if rate else []
    return node.run(node.a_ns, [
        "h2load", "-n", str(calls), "-c", str(connections), "-m", str(streams), *paced,
        "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(data),
        f"http://{node.b_ip}:{PORT}{METHOD}"], check=False, timeout=600)


def _succeeded(output: str) -> int:
    for line in output.splitlines():
        if line.startswith("requests:"):
            # requests: N total, N started, N done, N succeeded, N failed, ...
            return int(line.split(",")[3].split()[0])
    raise RuntimeError(f"h2load printed no summary:\n{output[-2000:]}")


def _ok(scrape: Scrape, node: TestNode) -> float:
    return scrape.value("ebpf_net_grpc_requests_total", dst_port=str(PORT), grpc_status="OK")


def _all(scrape: Scrape) -> float:
    return scrape.value("ebpf_net_grpc_requests_total", dst_port=str(PORT))


def run(node: TestNode, calls: int, rate: int | None = TARGET_CALLS_PER_SECOND) -> GrpcLoad:
    """One exporter, `calls` calls at `rate` a second (None: as fast as h2load goes)."""
    exporter = ExporterProcess(node)
    try:
        exporter.wait_ready()
        before = exporter.scrape()
        cpu_before = cpu_seconds(exporter.proc.pid)
        started = time.monotonic()
        result = _h2load(node, calls, CONNECTIONS, STREAMS, rate)
        seconds = time.monotonic() - started
        if result.returncode != 0:
            raise RuntimeError(f"h2load failed:\n{result.stdout[-2000:]}{result.stderr}")
        succeeded = _succeeded(result.stdout)
        after = _settled(exporter, before, succeeded)
        cpu = cpu_seconds(exporter.proc.pid) - cpu_before
        counted = _ok(after, node) - _ok(before, node)
        lost = (after.value(LOST, map="http2_records") - before.value(LOST, map="http2_records"))
        return GrpcLoad(succeeded, counted, _all(after) - _all(before) - counted, seconds, cpu,
                        rate, lost)
    finally:
        exporter.stop()


def _settled(exporter: ExporterProcess, before: Scrape, calls: int) -> Scrape:
    """The scrape once every call is counted, or once the count stops growing (records were
    lost past what user space kept up with)."""
    last = [-1.0]

    def done(scrape: Scrape) -> bool:
        counted = _all(scrape) - _all(before)
        if counted >= calls or counted == last[0]:
            return True
        last[0] = counted
        return False

    return exporter.wait_for(done, f"the exporter to count {calls} calls", timeout=120)


def runs(node: TestNode, repetitions: int, calls: int, say: Callable[[str], None]
         ) -> list[GrpcLoad]:
    """`repetitions` runs at the target rate, then one as fast as h2load goes."""
    prepare(node)
    out = []
    for rate in [TARGET_CALLS_PER_SECOND] * repetitions + [None]:
        out.append(run(node, calls, rate))
        say(f"  {describe(out[-1])}")
    return out


def describe(load: GrpcLoad) -> str:
    paced = f"at {load.rate:,}/s" if load.rate else "unpaced"
    return (f"{paced}: {load.calls} calls in {load.seconds:.1f} s "
            f"({load.calls_per_second:,.0f}/s); counted {load.counted:.0f} OK, "
            f"{load.other_statuses:.0f} other, {load.records_lost:.0f} records lost; exporter "
            f"CPU {load.cpu_seconds:.2f} s ({load.cores:.2f} cores): "
            f"{load.us_per_call:.1f} us per call")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grpc_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args(argv)
    with TestNode() as node:
        runs(node, args.repetitions, args.calls, lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
