"""Runs the real exporter inside a test node's namespace and scrapes it from the test.

Used by the kernel tests, `make demo` and the benchmarks: the exporter only ever sees the
interfaces of the node namespace, never the host's."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from exporter.kernel import bpfsys
from lab.testnode import NETNS_DIR, TestNode, in_netns

REPO = Path(__file__).resolve().parent.parent
EXPORTER = [sys.executable, "-m", "exporter"]


def free_port(ns: str) -> int:
    with in_netns(ns):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def wait_until(condition: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05) -> Any:
    """Polls condition() until it returns something truthy; fails naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Scrape:
    """One parsed scrape: samples by name, with label-subset lookups."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[Sample] = [s for family in text_string_to_metric_families(text)
                                      for s in family.samples]

    def select(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name
                and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
        return sum(s.value for s in self.select(name, **labels))


class ExporterHost(Protocol):
    """Where an exporter runs: a TestNode, or one node of a TestCluster."""

    @property
    def node_ns(self) -> str: ...

    @property
    def prefix(self) -> str: ...


class ExporterProcess:
    def __init__(self, node: ExporterHost, args: Sequence[str] = (),
                 config: dict[str, Any] | None = None, interfaces: str | None = None,
                 env: dict[str, str] | None = None, host: str = "127.0.0.1",
                 port: int | None = None, tls_ca: Path | None = None,
                 basic_auth: tuple[str, str] | None = None,
                 prefix: Sequence[str] = (), source: Path = REPO) -> None:
        """tls_ca and basic_auth: how the test's own client reaches an exporter run with
        --web.config.file (the CA that signed its certificate, a user and password).
        prefix: a command that execs the exporter inside the namespace (e.g. setpriv).
        source: the source tree whose exporter runs (benchmarks compare revisions)."""
        self.node = node
        self._tls = ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else None
        self._headers = {"Authorization": "Basic " + base64.b64encode(
            ":".join(basic_auth).encode()).decode()} if basic_auth else {}
        self.host = host
        self.port = port or free_port(node.node_ns)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{node.prefix}-exporter-"))
        self.log_path = self.workdir / "exporter.log"
        argv = [*EXPORTER, "--web.listen-address", f"{host}:{self.port}",
                "--interfaces", interfaces or f"{node.prefix}v[ab]", *args]
        if config:
            path = self.workdir / "config.yaml"
            path.write_text(yaml.safe_dump(config))
            argv += ["--config.file", str(path)]
        self.argv = argv
        self._final_log: str | None = None
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(["ip", "netns", "exec", node.node_ns, *prefix, *argv],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=source,
                                     env={**os.environ, **(env or {})})

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self.host}:{self.port}"

    def get(self, path: str, timeout: float = 30) -> tuple[int, str]:
        request = urllib.request.Request(self.url + path, headers=self._headers)
        with in_netns(self.node.node_ns):
            try:
                with urllib.request.urlopen(request, timeout=timeout,
                                            context=self._tls) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()
            except OSError:
                return 0, ""

    def wait_ready(self, timeout: float = 60) -> ExporterProcess:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"exporter exited with {self.proc.returncode}:\n"
                                     f"{self.log()}")
            return self.get("/readyz", timeout=2)[0] == 200

        wait_until(ready, timeout, "the exporter to be ready", interval=0.1)
        return self

    def scrape(self) -> Scrape:
        status, body = self.get("/metrics")
        assert status == 200, f"scrape failed ({status}): {body}\n{self.log()}"
        return Scrape(body)

    def wait_for(self, condition: Callable[[Scrape], Any], what: str,
                 timeout: float = 20) -> Scrape:
        """Scrapes until condition(scrape) holds; returns that scrape."""
        holder: list[Scrape] = []

        def check() -> bool:
            scrape = self.scrape()
            holder[:] = [scrape]
            return bool(condition(scrape))

        wait_until(check, timeout, what, interval=0.2)
        return holder[0]

    def log(self) -> str:
        if self._final_log is not None:
            return self._final_log
        self._log.flush()
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self._final_log is not None:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # where it is stuck, into the log the failed run keeps (exporter/cli.py)
                self.proc.send_signal(signal.SIGUSR1)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=2)
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self._final_log = self.log_path.read_text()
        if self.proc.returncode == 0:       # a failed run keeps its directory for a post-mortem
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> ExporterProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


TCX_HOOKS = {bpfsys.TCX_INGRESS: "ingress", bpfsys.TCX_EGRESS: "egress"}


def children(pid: int) -> list[int]:
    """The process's children (the exporter's compiler process while it starts); none once
    it is gone."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def fd_info(pid: int, fd: int | str) -> dict[str, str]:
    """The fields of one file descriptor's fdinfo ("prog_id", "run_cnt", "link_type",
    "tp_name", ...); OSError when it is closed."""
    text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
    return {key: value.strip() for key, _, value in
            (line.partition(":") for line in text.splitlines()) if value}


def fd_infos(pid: int) -> list[dict[str, str]]:
    """fd_info of each of the process's file descriptors; none when the process is gone."""
    try:
        fds = [path.name for path in Path(f"/proc/{pid}/fdinfo").iterdir()]
    except OSError:
        return []
    infos = []
    for fd in fds:
        try:
            infos.append(fd_info(pid, fd))
        except OSError:
            continue            # closed meanwhile
    return infos


def _netns_pids(ns: str) -> list[int]:
    """The processes whose network namespace is /run/netns/<ns>."""
    target = os.stat(f"{NETNS_DIR}/{ns}")
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdecimal():
            continue
        try:
            held = os.stat(entry / "ns" / "net")
        except OSError:
            continue            # gone meanwhile
        if (held.st_dev, held.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry.name))
    return pids


def tcx_links(pid: int) -> list[tuple[int, str, int]]:
    """(ifindex, hook, link id) of each tcx link the process holds (none once it is gone: its
    links went with it)."""
    return [(int(info["ifindex"]), TCX_HOOKS[int(info["attach_type"].split()[0])],
             int(info["link_id"])) for info in fd_infos(pid) if info.get("link_type") == "tcx"]


def link_exists(link_id: int) -> bool:
    """Whether the kernel still has the BPF link (any process's, or pinned)."""
    return subprocess.run(["bpftool", "link", "show", "id", str(link_id)],
                          capture_output=True).returncode == 0


def ifindex(node: TestNode, device: str) -> int:
    out = node.run(node.node_ns, ["ip", "-j", "link", "show", "dev", device]).stdout
    return int(json.loads(out)[0]["ifindex"])


def filter_listings(node: TestNode, devices: Iterable[str]) -> dict[str, str]:
    """`tc filter show` of each device and hook of the node, e.g. {"xva ingress": "...", ...}
    (empty where there is no clsact qdisc)."""
    return {f"{device} {hook}": node.run(node.node_ns, ["tc", "filter", "show", "dev", device,
                                                        hook], check=False).stdout
            for device in devices for hook in ("ingress", "egress")}


def filters_on(node: TestNode, devices: Iterable[str]) -> dict[str, int]:
    """Our cls_bpf filters per device and hook (interfaces.attach: clsact, or left by one)."""
    return {hook: out.count("ebpf_net_exporter")
            for hook, out in filter_listings(node, devices).items()}


def is_live_view(pid: int) -> bool:
    """Whether the process is `ebpf-net-exporter flows` (its links are not the exporter's)."""
    try:
        return "flows" in Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return False


def attachments_on(node: TestNode, devices: Iterable[str]) -> dict[str, int]:
    """The exporter's classifier attachments per device and hook, e.g. {"xva ingress": 1, ...}:
    cls_bpf filters named ebpf_net_exporter, and tcx links held by processes of the node
    namespace other than live views."""
    devices = list(devices)
    counts = filters_on(node, devices)
    links = [link for pid in _netns_pids(node.node_ns) if not is_live_view(pid)
             for link in tcx_links(pid)]
    for device in devices:
        index = ifindex(node, device)
        for link_index, hook, _ in links:
            if link_index == index:
                counts[f"{device} {hook}"] += 1
    return counts


def has_clsact(node: TestNode, device: str) -> bool:
    out = node.run(node.node_ns, ["tc", "qdisc", "show", "dev", device], check=False).stdout
    return "clsact" in out


def bpf_map_id(pid: int, name: str) -> int:
    """The id of the process's BPF map `name`."""
    ids = {int(info["map_id"]) for info in fd_infos(pid) if "map_id" in info}
    shown = json.loads(subprocess.run(["bpftool", "map", "show", "--json"], check=True,
                                      capture_output=True, text=True).stdout)
    (map_id,) = [m["id"] for m in shown if m["id"] in ids and m.get("name") == name]
    return int(map_id)


def bpf_map_write(pid: int, name: str, key: bytes, value: bytes) -> None:
    """Writes one entry of the process's BPF map `name` (bpftool map update)."""
    subprocess.run(["bpftool", "map", "update", "id", str(bpf_map_id(pid, name)), "key", "hex",
                    *(f"{b:02x}" for b in key), "value", "hex", *(f"{b:02x}" for b in value)],
                   check=True, capture_output=True, text=True)


def bpf_map_dump(pid: int, name: str) -> list[tuple[bytes, list[bytes]]]:
    """The entries of the process's BPF map `name` as bpftool dumps them: each key with its
    value, or for a per-CPU map its value on every CPU, raw bytes."""
    map_id = bpf_map_id(pid, name)
    dumped = json.loads(subprocess.run(["bpftool", "map", "dump", "id", str(map_id), "--json"],
                                       check=True, capture_output=True, text=True).stdout)

    def raw(hexes: list[str]) -> bytes:
        return bytes(int(b, 16) for b in hexes)

    return [(raw(entry["key"]), [raw(entry["value"])] if "value" in entry
             else [raw(cpu["value"]) for cpu in entry["values"]]) for entry in dumped]
