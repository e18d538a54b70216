"""--web.config.file: TLS and basic authentication of the HTTP endpoint, in the file format of
Prometheus' exporter-toolkit (docs/web-configuration.md there), so the files users already
have for node_exporter work here.

Supported: tls_server_config (cert_file, key_file, client_ca_file, client_auth_type,
min_version, max_version), basic_auth_users (bcrypt hashes), auth_excluded_paths and
http_server_config.headers. Keys of the format this exporter cannot honour with Python's ssl
module (cipher_suites, curve_preferences, client_allowed_sans, inline cert/key, rate_limit, ...)
are refused with a line saying so, never ignored: a setting meant to lock the endpoint down that
silently does nothing is worse than an error.

Like the toolkit, authentication covers every path, /healthz and /readyz included; list paths in
auth_excluded_paths to let probes without credentials through (basic auth only: a client
certificate demanded by the TLS handshake cannot be waived per path)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml


class WebConfigError(Exception):
    """The web configuration file is wrong; the message names the key."""


# exporter-toolkit's names (Go's tls.ClientAuthType) -> what Python's ssl can do
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Go accepts these, but they take a certificate without verifying it: ssl cannot, and they
# protect nothing anyway
UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
TLS_KEYS = ("cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version",
            "max_version")
UNSUPPORTED_TLS_KEYS = ("cert", "key", "client_ca", "cipher_suites", "curve_preferences",
                        "prefer_server_cipher_suites", "client_allowed_sans")
TOP_KEYS = ("tls_server_config", "basic_auth_users", "auth_excluded_paths", "http_server_config")
UNSUPPORTED_TOP_KEYS = ("rate_limit",)
# the toolkit's own list: only these headers, and for two of them only these values
HEADERS: dict[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
_BCRYPT_HASH = re.compile(r"^\$2[abxy]?\$\d\d\$[./A-Za-z0-9]{53}$")
# compared against when the user is unknown, so a wrong name costs as long as a wrong password
_DUMMY_HASH = bcrypt.hashpw(b"not a password", bcrypt.gensalt(10))
_CACHE_LIMIT = 1024


@dataclass(frozen=True)
class WebConfig:
    tls: ssl.SSLContext | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)
    excluded_paths: frozenset[str] = frozenset()
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise WebConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def _known(body: Mapping[str, Any], where: str, known: tuple[str, ...],
           unsupported: tuple[str, ...]) -> None:
    for key in body:
        if key in unsupported:
            raise WebConfigError(f"{where}{key}: not supported by ebpf-net-exporter "
                                 "(see docs/security.md)")
        if key not in known:
            raise WebConfigError(f"{where}{key}: unknown key (known: {', '.join(known)})")


def _readable(path: Any, key: str, base: Path) -> Path:
    if not isinstance(path, str) or not path:
        raise WebConfigError(f"tls_server_config.{key}: expected a file name, got {path!r}")
    full = base / path          # relative names are relative to the web config file
    if not full.is_file():
        raise WebConfigError(f"tls_server_config.{key}: {full}: no such file")
    return full


def _tls_context(body: Mapping[str, Any], base: Path) -> ssl.SSLContext:
    where = "tls_server_config."
    _known(body, where, TLS_KEYS, UNSUPPORTED_TLS_KEYS)
    if "cert_file" not in body or "key_file" not in body:
        raise WebConfigError("tls_server_config: cert_file and key_file are both required")
    cert = _readable(body["cert_file"], "cert_file", base)
    key = _readable(body["key_file"], "key_file", base)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise WebConfigError(f"tls_server_config: cert_file {cert} and key_file {key}: "
                             f"{getattr(e, 'reason', None) or e}") from e
    for name in ("min_version", "max_version"):
        version = body.get(name, "TLS12" if name == "min_version" else "TLS13")
        if version not in TLS_VERSIONS:
            raise WebConfigError(f"{where}{name}: expected one of {', '.join(TLS_VERSIONS)}, "
                                 f"got {version!r}")
        setattr(context, name, TLS_VERSIONS[version])
    auth = body.get("client_auth_type", "NoClientCert")
    if auth in UNVERIFIED_CLIENT_AUTH:
        raise WebConfigError(f"{where}client_auth_type: {auth} accepts certificates without "
                             "verifying them; use RequireAndVerifyClientCert")
    if auth not in CLIENT_AUTH:
        raise WebConfigError(f"{where}client_auth_type: expected one of "
                             f"{', '.join(CLIENT_AUTH)}, got {auth!r}")
    context.verify_mode = CLIENT_AUTH[auth]
    if "client_ca_file" in body:
        ca = _readable(body["client_ca_file"], "client_ca_file", base)
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as e:
            raise WebConfigError(f"{where}client_ca_file: {ca}: "
                                 f"{getattr(e, 'reason', None) or e}") from e
    elif auth != "NoClientCert":
        raise WebConfigError(f"{where}client_auth_type: {auth} needs client_ca_file")
    return context


def _users(body: Mapping[str, Any]) -> dict[str, bytes]:
    users = {}
    for name, hashed in body.items():
        if not isinstance(name, str) or not name or ":" in name:
            raise WebConfigError(f"basic_auth_users: invalid user name {name!r}")
        if not isinstance(hashed, str) or not _BCRYPT_HASH.match(hashed):
            raise WebConfigError(f"basic_auth_users.{name}: expected a bcrypt hash like "
                                 "$2y$10$..., (htpasswd -nBC 10 \"\" | tr -d ':\\n')")
        users[name] = hashed.encode()
    return users


def _headers(body: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    _known(body, "http_server_config.", ("headers",), ("http2",))
    headers = _mapping(body.get("headers"), "http_server_config.headers")
    for name, value in headers.items():
        if name not in HEADERS:
            raise WebConfigError(f"http_server_config.headers: {name!r} cannot be set "
                                 f"(allowed: {', '.join(HEADERS)})")
        allowed = HEADERS[name]
        if not isinstance(value, str) or (allowed and value not in allowed):
            raise WebConfigError(f"http_server_config.headers.{name}: expected "
                                 f"{' or '.join(allowed) or 'a string'}, got {value!r}")
    return tuple(headers.items())


def parse(document: Any, base: Path) -> WebConfig:
    top = _mapping(document, "web config")
    _known(top, "", TOP_KEYS, UNSUPPORTED_TOP_KEYS)
    tls_body = _mapping(top.get("tls_server_config"), "tls_server_config")
    tls = _tls_context(tls_body, base) if tls_body else None
    users = _users(_mapping(top.get("basic_auth_users"), "basic_auth_users"))
    excluded = top.get("auth_excluded_paths") or []
    if not isinstance(excluded, list) or not all(
            isinstance(p, str) and p.startswith("/") for p in excluded):
        raise WebConfigError(f"auth_excluded_paths: expected a list of paths starting with /, "
                             f"got {excluded!r}")
    headers = _headers(_mapping(top.get("http_server_config"), "http_server_config"))
    return WebConfig(tls, users, frozenset(excluded), headers)


def load(path: str | Path) -> WebConfig:
    """The web config file as a WebConfig; WebConfigError with one line when it is wrong."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise WebConfigError(f"web config file {path}: {e.strerror}") from e
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise WebConfigError(f"web config file {path}{where}: invalid YAML: "
                             f"{getattr(e, 'problem', None) or e}") from e
    try:
        return parse(document, path.parent)
    except WebConfigError as e:
        raise WebConfigError(f"web config file {path}: {e}") from e


class BasicAuth:
    """Checks Authorization headers against bcrypt hashes. A bcrypt check costs ~70 ms at cost
    10, too much for every scrape: results are cached by a digest of (user, hash, password), as
    the toolkit does, and checks run one at a time so a flood of guesses cannot eat every
    core."""

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self.users = dict(users)
        self._cache: dict[bytes, bool] = {}
        self._lock = threading.Lock()

    def allows(self, authorization: str | None) -> bool:
        credentials = _basic_credentials(authorization)
        if credentials is None:
            return False
        user, password = credentials
        known = user in self.users
        hashed = self.users.get(user, _DUMMY_HASH)
        key = hashlib.sha256(b"\0".join((user.encode(), hashed, password))).digest()
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        with self._lock:
            try:
                ok = bcrypt.checkpw(password, hashed) and known
            except ValueError:      # longer than bcrypt's 72 bytes: never a match
                ok = False
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = ok
        return ok


def _basic_credentials(authorization: str | None) -> tuple[str, bytes] | None:
    if not authorization:
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    try:
        return user.decode(), password
    except UnicodeDecodeError:
        return None
