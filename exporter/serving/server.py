"""The HTTP endpoint: metrics at the telemetry path (prometheus_client's WSGI app, which does
content negotiation and gzip, with the traffic families written by exposition.py), /healthz
(alive), /readyz (programs attached) and a landing page; over TLS and behind basic auth when
a web config (exporter/serving/webconfig.py) asks for it."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry

from .. import logs
from ..kernel import privileges
from .exposition import make_metrics_app
from .kubeauth import ALLOWED, UNAUTHENTICATED, KubernetesAuth
from .webconfig import BasicAuth, WebConfig

log = logs.get("web")

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
# a client that neither finishes its TLS handshake nor its request in this long is dropped, so
# idle connections cannot hold threads forever
CLIENT_TIMEOUT = 30.0
TLS_HANDSHAKE = 0x16        # first byte of a TLS record carrying a ClientHello
PLAIN_HTTP_TO_TLS = (b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\n"
                     b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")


class _QuietHandler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's own thread: the TLS handshake (a slow client delays nobody),
        and Go's answer to plain HTTP sent to a TLS port instead of a cryptic reset."""
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(CLIENT_TIMEOUT)
        first = request.recv(1, socket.MSG_PEEK)
        if not first:
            return
        if first[0] != TLS_HANDSHAKE:
            request.sendall(PLAIN_HTTP_TO_TLS)
            return
        secured = self.tls.wrap_socket(request, server_side=True)
        try:
            super().finish_request(secured, client_address)
        finally:
            self.shutdown_request(secured)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client's failed handshake or dropped connection: no traceback on stderr
        log.debug("connection failed", exc_info=True,
                  extra={"client": client_address[0] if client_address else ""})


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
             ready: Callable[[], bool], web: WebConfig | None = None,
             auth: KubernetesAuth | None = None) -> WsgiApp:
    metrics = make_metrics_app(registry)
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

    if auth:
        app = authorized(app, auth)
    return secured(app, web) if web else app


# what the kubelet's probes read: never behind Kubernetes authentication
OPEN_PATHS = ("/healthz", "/readyz")


def authorized(app: WsgiApp, auth: KubernetesAuth) -> WsgiApp:
    """Every path but the probes' for the bearer tokens the API server allows (kubeauth.py)."""
    def guarded(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if (environ.get("PATH_INFO") or "/") in OPEN_PATHS:
            return app(environ, start_response)
        verdict = auth.decide(environ.get("HTTP_AUTHORIZATION"))
        if verdict.outcome == ALLOWED:
            return app(environ, start_response)
        headers = [("Content-Type", "text/plain")]
        if verdict.outcome == UNAUTHENTICATED:
            headers.append(("WWW-Authenticate", 'Bearer realm="ebpf-net-exporter"'))
        start_response(verdict.status, headers)
        return [f"{verdict.status.split(' ', 1)[1]}: {verdict.reason}\n".encode()]

    return guarded


def secured(app: WsgiApp, web: WebConfig) -> WsgiApp:
    """Basic auth on every path but the excluded ones, and the configured response headers."""
    auth = BasicAuth(web.users) if web.users else None

    def guarded(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        def with_headers(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            return start_response(status, [*headers, *web.headers], *exc)

        path = environ.get("PATH_INFO") or "/"
        if auth and path not in web.excluded_paths and \
                not auth.allows(environ.get("HTTP_AUTHORIZATION")):
            with_headers("401 Unauthorized", [("Content-Type", "text/plain"),
                                              ("WWW-Authenticate", "Basic")])
            return [b"Unauthorized\n"]
        return app(environ, with_headers)

    return guarded


class WebServer:
    def __init__(self, listen_address: str, app: Callable[..., Iterable[bytes]],
                 tls: ssl.SSLContext | None = None) -> None:
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
        self._server.tls = tls
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._serve, name="web", daemon=True)

    def _serve(self) -> None:
        # serving HTTP and reading maps through open descriptors need no capability; every
        # connection's thread starts from this one's (empty) set
        privileges.keep_only(())
        self._server.serve_forever()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
