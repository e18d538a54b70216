"""Processes and real servers in the lab's namespaces (nginx, dnsmasq, Python's http.server,
iperf3), each ready once its socket is bound, stopped with the topology that started it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from lab.netns import _bound, _run, _tail, _terminate

HTTP_DATA_SIZE = 1 << 20
HTTP_INDEX_BODY = "<html><body>ebpf-net-exporter test node</body></html>\n"
READY_TIMEOUT = 10.0

_HTTP_SERVER_CODE = """\
import functools, http.server, socket, socketserver, sys
addr, port, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)  # no getfqdn()
        self.server_name, self.server_port = addr, port

handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
print(f"Serving HTTP on {addr} port {port} from {root}", flush=True)
Server((addr, port), handler).serve_forever()
"""



def nginx_config(root: str, listens: Sequence[str], locations: Mapping[str, int],
                 prefixes: Mapping[str, int] | None = None, http_extra: str = "",
                 server_extra: str = "") -> str:
    """An nginx.conf with every path (pid, logs, temp dirs) inside ``root``: a server on each
    of ``listens`` ("10.1.2.2:80", "[fd00::2]:80", "10.1.2.2:443 ssl") answering ``return
    CODE`` for each exact location and each location prefix, 404 for everything else.
    http_extra and server_extra: directives for the http and server blocks."""
    returns = "".join(
        f"        location = {path} {{ return {code}; }}\n" for path, code in locations.items()
    ) + "".join(
        f"        location {path} {{ return {code}; }}\n"
        for path, code in (prefixes or {}).items()
    )
    temp = " ".join(
        f"{kind}_temp_path {root}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    servers = "".join(f"        listen {listen};\n" for listen in listens)
    return f"""\
user root;
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{}}
http {{
    access_log off;
    {temp}
    {http_extra}
    server {{
{servers}{returns}        {server_extra}
        location / {{ return 404; }}
    }}
}}
"""



# --------------------------------------------------------------------------
# processes and servers in namespaces (shared by TestNode and TestCluster)


class NetnsProcesses:
    """Start, wait for and stop processes and servers inside network namespaces.

    A mixin: the class using it sets :attr:`tmpdir` (server roots and logs go there)
    and :attr:`_procs` (processes still to stop), and calls :meth:`_stop_processes`
    when it is torn down.
    """

    tmpdir: str
    _procs: list[subprocess.Popen[Any]]

    def _stop_processes(self) -> None:
        """Stop every process still running (each by its PID); never raises."""
        for proc in list(self._procs):
            with contextlib.suppress(Exception):
                self.stop(proc)

    # ---- processes ---------------------------------------------------------

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 30,
        **kw: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in namespace ``ns`` and wait; output captured as text."""
        return _run(["ip", "netns", "exec", ns, *argv], check, timeout, **kw)

    def spawn(self, ns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``ns`` in the background; stopped on close()."""
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **popen_kwargs)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any]) -> None:
        """SIGTERM ``proc`` by PID, wait 5 s, then SIGKILL; forget it."""
        try:
            _terminate(proc)
        finally:
            with contextlib.suppress(ValueError):
                self._procs.remove(proc)

    @contextlib.contextmanager
    def nameserver(self, ns: str, addr: str) -> Iterator[None]:
        """The C library resolver of programs run in ``ns`` asks ``addr`` (``ip netns exec``
        binds /etc/netns/NS/resolv.conf over /etc/resolv.conf) while the block runs."""
        resolv = os.path.join("/etc/netns", ns, "resolv.conf")
        os.makedirs(os.path.dirname(resolv), exist_ok=True)
        with open(resolv, "w") as fh:
            fh.write(f"nameserver {addr}\noptions attempts:1 timeout:2\n")
        try:
            yield
        finally:
            os.unlink(resolv)
            os.rmdir(os.path.dirname(resolv))

    def nft(self, ns: str, ruleset: str) -> None:
        """Load an nftables ruleset (``nft -f -``) into namespace ``ns``."""
        self.run(ns, ["nft", "-f", "-"], input=ruleset)

    # ---- servers -----------------------------------------------------------

    def _spawn_logged(
        self, ns: str, argv: Sequence[str], name: str
    ) -> tuple[subprocess.Popen[Any], str]:
        fd, log = tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=self.tmpdir)
        with os.fdopen(fd, "w") as fh:
            proc = self.spawn(ns, argv, stdout=fh, stderr=subprocess.STDOUT)
        return proc, log

    def _wait_ready(
        self,
        proc: subprocess.Popen[Any],
        ready: Callable[[], bool],
        what: str,
        log: str,
    ) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if proc.poll() is not None:
                self.stop(proc)
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
            if ready():
                return
            if time.monotonic() > deadline:
                self.stop(proc)
                raise RuntimeError(f"{what} not ready after {READY_TIMEOUT}s:\n{_tail(log)}")
            time.sleep(0.01)

    def http_server(self, ns: str, addr: str, port: int) -> subprocess.Popen[Any]:
        """An http.server on addr:port serving a dir with index.html + data.bin.

        It is ``python3 -m http.server`` minus the reverse DNS lookup of the bind
        address (``getfqdn``) that stock HTTPServer does at startup, which would
        send DNS queries out of the namespace towards the host's resolver.
        """
        root = tempfile.mkdtemp(prefix="http-", dir=self.tmpdir)
        with open(os.path.join(root, "data.bin"), "wb") as fh:
            fh.write(bytes(HTTP_DATA_SIZE))
        with open(os.path.join(root, "index.html"), "w") as fh:
            fh.write(HTTP_INDEX_BODY)
        argv = [sys.executable, "-c", _HTTP_SERVER_CODE, addr, str(port), root]
        proc, log = self._spawn_logged(ns, argv, "http")
        self._wait_ready(proc, lambda: _bound(ns, addr, port), f"http.server {addr}:{port}", log)
        return proc

    def dns_server(self, ns: str, addr: str, records: Mapping[str, str]) -> subprocess.Popen[Any]:
        """dnsmasq answering ``records`` (name -> IP) on addr:53 (UDP+TCP) only.

        No upstream servers, no /etc/hosts; queries are logged to a file in
        :attr:`tmpdir`.
        """
        queries = os.path.join(self.tmpdir, f"dnsmasq-{addr.replace(':', '_')}.queries.log")
        argv = [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            f"--listen-address={addr}",
            "--port=53",
            "--pid-file=",
            "--user=root",
            f"--log-facility={queries}",
            "--log-queries",
            *(f"--address=/{name}/{ip}" for name, ip in records.items()),
        ]
        proc, log = self._spawn_logged(ns, argv, "dnsmasq")
        self._wait_ready(
            proc,
            lambda: _bound(ns, addr, 53, udp=True) and _bound(ns, addr, 53),
            f"dnsmasq {addr}",
            log,
        )
        return proc

    def iperf3_server(self, ns: str, addr: str, port: int = 5201) -> subprocess.Popen[Any]:
        """iperf3 -s bound to addr:port."""
        argv = ["iperf3", "-s", "-B", addr, "-p", str(port)]
        proc, log = self._spawn_logged(ns, argv, "iperf3")
        self._wait_ready(proc, lambda: _bound(ns, addr, port), f"iperf3 {addr}:{port}", log)
        return proc

    def nginx(
        self, ns: str, addr: str, port: int, locations: Mapping[str, int]
    ) -> subprocess.Popen[Any]:
        """A real nginx on addr:port answering ``return CODE`` for each exact location
        (path -> status code) and 404 for everything else.

        It runs as root in the foreground with every path (pid, logs, temp dirs) in a
        directory of its own under :attr:`tmpdir`, so it touches nothing of the host's.
        """
        root = tempfile.mkdtemp(prefix="nginx-", dir=self.tmpdir)
        conf = os.path.join(root, "nginx.conf")
        with open(conf, "w") as fh:
            listen = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
            fh.write(nginx_config(root, [listen], locations))
        # -e: the error log before the config is read is ours too, not /var/log/nginx's
        argv = ["nginx", "-c", conf, "-p", root, "-e", os.path.join(root, "error.log")]
        proc, log = self._spawn_logged(ns, argv, "nginx")
        self._wait_ready(proc, lambda: _bound(ns, addr, port), f"nginx {addr}:{port}", log)
        return proc
