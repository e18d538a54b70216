"""Part 5's workload: TCP connections opened, answered and closed one after the other on pod
a's loopback. Loopback is not attached to the TC programs, so what the exporter adds here is
its tracepoint programs (sock:inet_sock_set_state, tcp:tcp_probe, ...), which see every TCP
socket on the node."""

from __future__ import annotations

import json
import sys

from tests.testnode import TestNode

# The server answers each connection with one byte and closes after the client; the client
# waits for that byte, so the loop runs one connection at a time and never overruns the accept
# queue.
_LOOP = """\
import json, os, signal, socket, sys, time
seconds = float(sys.argv[1])
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 0))
server.listen(128)
address = server.getsockname()
child = os.fork()
if child == 0:
    while True:
        conn, _ = server.accept()
        conn.sendall(b"x")
        conn.recv(1)
        conn.close()
server.close()
stopping = []   # SIGTERM ends the loop early, and the server with it (part 2's streams)
signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
count = 0
start = time.perf_counter()
deadline = start + seconds
while time.perf_counter() < deadline and not stopping:
    client = socket.create_connection(address)
    client.recv(1)
    client.close()
    count += 1
elapsed = time.perf_counter() - start
os.kill(child, 9)
os.waitpid(child, 0)
print(json.dumps({"connections": count, "seconds": elapsed}))
"""


def prepare(node: TestNode) -> None:
    """Pod a keeps no TIME_WAIT sockets: tens of thousands of them from earlier runs would make
    every connect() search longer for a free port, so each run would be slower than the one
    before it, whatever the exporter does (and B always follows A)."""
    node.run(node.a_ns, ["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000",
                         "net.ipv4.tcp_max_tw_buckets=0"])


def loop_argv(seconds: float) -> list[str]:
    """The loop as a command for pod a: connections for `seconds`, or until SIGTERM."""
    return [sys.executable, "-c", _LOOP, f"{seconds:g}"]


def loop(node: TestNode, seconds: float) -> tuple[int, float]:
    """Connections made in about `seconds`, and the seconds they took."""
    result = node.run(node.a_ns, loop_argv(seconds), timeout=seconds + 30)
    outcome = json.loads(result.stdout)
    return int(outcome["connections"]), float(outcome["seconds"])
