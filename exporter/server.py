"""The HTTP endpoint: metrics at the telemetry path (prometheus_client's WSGI app, which does
content negotiation and gzip), /healthz (alive), /readyz (programs attached) and a landing page."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from . import logs

log = logs.get("web")

StartResponse = Callable[..., Any]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        # ":port" means every address: accept IPv4 on the IPv6 socket too
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def split_listen_address(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def make_app(registry: CollectorRegistry, telemetry_path: str,
             ready: Callable[[], bool]) -> Callable[[dict[str, Any], StartResponse],
                                                    Iterable[bytes]]:
    metrics = make_wsgi_app(registry)
    landing = (f'<html><head><title>ebpf-net-exporter</title></head><body>'
               f'<h1>ebpf-net-exporter</h1><p><a href="{telemetry_path}">Metrics</a></p>'
               f'</body></html>').encode()

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == telemetry_path:
            return metrics(environ, start_response)
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            if ready():
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ready\n"]
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"not ready: programs not attached yet\n"]
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/html")])
            return [landing]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app


class WebServer:
    def __init__(self, listen_address: str, app: Callable[..., Iterable[bytes]]) -> None:
        host, port = split_listen_address(listen_address)
        try:
            if host in ("", "::") and socket.has_ipv6:
                try:
                    self._server = make_server("::", port, app, _ThreadingServer6,
                                               handler_class=_QuietHandler)
                except OSError:     # IPv6 disabled here: every IPv4 address then
                    self._server = make_server("0.0.0.0", port, app, _ThreadingServer,
                                               handler_class=_QuietHandler)
            else:
                family = _ThreadingServer6 if ":" in host else _ThreadingServer
                self._server = make_server(host, port, app, family,
                                           handler_class=_QuietHandler)
        except OSError as e:
            raise OSError(f"web.listen_address {listen_address}: {e.strerror}") from e
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="web",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
