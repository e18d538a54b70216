"""HTTP helpers for tests: a keep-alive server that waits before each answer, and a raw TCP
server that answers every connection with fixed bytes (or nothing)."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time

from lab.testnode import in_netns


class SlowServer:
    """HTTP/1.1 with keep-alive in a namespace: each request answered `delay` seconds after it
    is read, one after the other (so pipelined requests wait their turn). With `tls`, HTTPS
    (Python's ssl: OpenSSL)."""

    def __init__(self, ns: str, addr: str, port: int, delay: float,
                 tls: ssl.SSLContext | None = None) -> None:
        wait = delay

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                time.sleep(wait)
                body = b"slow\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

            def server_bind(self) -> None:   # no reverse DNS lookup of its own name
                socket.socket.bind(self.socket, self.server_address)  # type: ignore[arg-type]
                self.server_name, self.server_port = addr, port

        with in_netns(ns):
            self.server = Server((addr, port), Handler)
        if tls:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RawServer:
    """Accepts connections; to each sends `reply` once something arrived (None: nothing), then
    reads until the peer closes."""

    def __init__(self, ns: str, addr: str, port: int, reply: bytes | None) -> None:
        with in_netns(ns):
            self.sock = socket.create_server((addr, port))
        self.sock.settimeout(0.2)
        self.reply = reply
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            first = conn.recv(65536)
            if first and self.reply is not None:
                conn.sendall(self.reply)
            while conn.recv(65536):
                pass
        except OSError:
            pass
        finally:
            conn.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self.thread.join()
        self.sock.close()
