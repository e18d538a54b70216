"""Part 6's workload: HTTPS requests on one keep-alive connection to an nginx with TLS on pod a's
loopback, by a C client on the host's libssl (tls_loop.c). Loopback is not attached to the TC
programs, so what the exporter adds here is the HTTPS program (a uprobe and a uretprobe on each
SSL_write and SSL_read, the socket tracepoints) and the TCP program's per-segment tracepoint."""

from __future__ import annotations

import subprocess
from pathlib import Path

from lab.certs import make_certs
from lab.exporter_process import wait_until
from lab.testnode import TestNode, nginx_config

from .connections import LoopBuildError

LOOP_SOURCE = Path(__file__).with_name("tls_loop.c")
PORT = 8443


def _counter_file(node: TestNode) -> Path:
    return Path(node.tmpdir) / "tls_requests"


def _binary(node: TestNode) -> str:
    return f"{node.tmpdir}/tls_loop"


def prepare(node: TestNode) -> None:
    """Builds the loop and starts nginx with TLS on pod a's 127.0.0.1:PORT (stopped with the
    node). nginx keeps the connection for every request of a run."""
    command = ["gcc", "-O2", "-Wall", "-Werror", "-o", _binary(node), str(LOOP_SOURCE),
               "-lssl", "-lcrypto"]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.CalledProcessError) as error:
        raise LoopBuildError(f"{' '.join(command)} failed (make setup installs gcc and "
                             f"libssl-dev): {getattr(error, 'stderr', error)}") from error
    root = Path(node.tmpdir) / "tls-nginx"
    root.mkdir(exist_ok=True)
    certs = make_certs(root / "certs")
    conf = root / "nginx.conf"
    conf.write_text(nginx_config(
        str(root), [f"127.0.0.1:{PORT} ssl"], {"/ok": 200},
        http_extra=f"ssl_certificate {certs.server_cert}; ssl_certificate_key "
                   f"{certs.server_key}; keepalive_requests 1000000000; keepalive_timeout 1h;"))
    node.spawn(node.a_ns, ["nginx", "-c", str(conf), "-p", str(root)])
    wait_until(lambda: node.run(node.a_ns, ["curl", "-sk", "-o", "/dev/null", "-w",
                                            "%{http_code}", f"https://127.0.0.1:{PORT}/ok"],
                                check=False).stdout == "200", 10, "nginx with TLS on pod a")


def loop_argv(node: TestNode, seconds: float) -> list[str]:
    return [_binary(node), str(PORT), str(_counter_file(node)), f"{seconds:g}"]


def requests_done(node: TestNode) -> int:
    """What the running loop has done so far (its counter file's first 8 bytes)."""
    try:
        return int.from_bytes(_counter_file(node).read_bytes()[:8], "little")
    except FileNotFoundError:
        return 0
