"""Configuration: the embedded defaults, a YAML file, EBPF_NET_* variables and flags, merged in
that order and validated into a tree of frozen dataclasses.

Every field names its parser in its metadata, so an error names the field and what is wrong:
``series.ttl: expected a duration like 30s, 5m or 1h, got 'soon'``."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "EBPF_NET_"
ENDPOINT_LABELS = ("namespace", "workload", "workload_kind", "service", "pod", "node", "zone",
                   "ip", "ip_type", "dns_name", "port")  # endpoints.ENDPOINT_LABELS, in order
KUBERNETES_MODES = ("auto", "true", "false")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("logfmt", "json")
ATTACH_MODES = ("auto", "tcx", "clsact")
COUNTING_MODES = ("auto", "node")


class ConfigError(Exception):
    """A configuration value is wrong; the message names the field."""


Parser = Callable[[Any], Any]


def _spec(parse: Parser) -> Any:
    return field(metadata={"parse": parse})


def _fail(expected: str, value: Any) -> ConfigError:
    return ConfigError(f"expected {expected}, got {value!r}")


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
        return False
    raise _fail("true or false", value)


def parse_positive_int(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdecimal():
        value = int(value.strip())      # int() strips less than str.strip() (not \x1f)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail("a positive integer", value)
    return value


def parse_port(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdecimal():
        value = int(value.strip())      # int() strips less than str.strip() (not \x1f)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _fail("a port number 1-65535", value)
    return value


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


# Longer than any sensible interval or TTL, and small enough for the kernel's u64 nanoseconds;
# an infinite one (YAML's .inf) would fail only later, at start.
MAX_DURATION = 366 * 24 * 3600.0


def _seconds(value: Any, expected: str) -> float:
    """Seconds from a positive number or a string like 250ms, 30s, 5m, 1h, at most a year;
    `expected` says what was wanted when the value is neither."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        seconds = float(value)
    else:
        match = _DURATION.match(value.strip()) if isinstance(value, str) else None
        if not match or float(match.group(1)) <= 0:
            raise _fail(expected, value)
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not seconds <= MAX_DURATION:
        raise _fail("a duration of at most a year", value)
    return seconds


def parse_duration(value: Any) -> float:
    """Seconds from a number of seconds or a string like 250ms, 30s, 5m, 1h."""
    return _seconds(value, "a duration like 30s, 5m or 1h")


def parse_interval_or_off(value: Any) -> float:
    """A duration, or 0.0 for off: `off` (which YAML also reads as false), `false` or 0."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is False or (is_number and value == 0) or (
            isinstance(value, str) and value.strip().lower() in ("off", "false", "0")):
        return 0.0
    return _seconds(value, "a duration like 1s or 500ms, or off")


def parse_listen_address(value: Any) -> str:
    if not isinstance(value, str) or ":" not in value:
        raise _fail("[host]:port such as :9814 or 127.0.0.1:9814", value)
    port = value.rsplit(":", 1)[1]
    if not port.isdecimal() or not 0 <= int(port) <= 65535:
        raise _fail("[host]:port with a port 0-65535", value)
    return value


RESERVED_PATHS = ("/", "/healthz", "/readyz")
# A hash map this large takes GBs of kernel memory per CPU: past it is surely a typo.
MAX_MAP_CAPACITY = 1 << 24


def parse_path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise _fail("a path starting with /", value)
    if value in RESERVED_PATHS:
        raise ConfigError(f"{value} is served by the exporter itself; choose another path")
    return value


def parse_capacity(value: Any) -> int:
    capacity = parse_positive_int(value)
    if capacity > MAX_MAP_CAPACITY:
        raise _fail(f"at most {MAX_MAP_CAPACITY} entries", value)
    return capacity


def parse_ring_mib(value: Any) -> int:
    mib = parse_positive_int(value)
    if mib & (mib - 1) or mib > 1024:
        raise _fail("a power of two from 1 to 1024 (MiB)", value)
    return mib


def parse_ephemeral_floor(value: Any) -> int | None:
    if value is None or value == "auto":
        return None
    try:
        return parse_port(value)
    except ConfigError:
        raise _fail("auto or a port number 1-65535", value) from None


def split_list(text: str) -> list[str]:
    """A list from an environment variable: YAML flow syntax (``[a, b]``) or comma-separated.
    Commas inside brackets belong to the item, so a regex like ``veth.{1,3}`` stays whole."""
    if text.strip().startswith("["):
        try:
            items = yaml.safe_load(text)
        except yaml.YAMLError as e:     # its str() spans lines: keep the problem only
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"invalid list {text!r}: {problem}") from e
        if not isinstance(items, list):
            raise _fail("a list", text)
        return items
    items, depth, current = [], 0, []
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(depth - 1, 0)
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, str):  # from an environment variable
        return split_list(value)
    if not isinstance(value, list):
        raise _fail("a list", value)
    return value


def list_of(parse: Parser, min_items: int = 0) -> Parser:
    def parse_list(value: Any) -> tuple[Any, ...]:
        items = []
        raw = _as_list(value)
        if len(raw) < min_items:
            raise _fail(f"a list of at least {min_items}", value)
        for index, item in enumerate(raw):
            try:
                items.append(parse(item))
            except ConfigError as e:
                raise ConfigError(f"[{index}]: {e}") from e
        return tuple(items)

    return parse_list


def parse_regex(value: Any) -> str:
    if not isinstance(value, str):
        raise _fail("a regular expression", value)
    try:
        re.compile(value)
    except (re.error, OverflowError, RecursionError) as e:  # a{4300000000}: OverflowError
        raise ConfigError(f"invalid regex {value!r}: {e}") from e
    return value


def parse_glob(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail("a name pattern such as *.svc.cluster.local", value)
    return value.strip()


def parse_file(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail("a file path", value)
    return value.strip()


def parse_optional_file(value: Any) -> str:
    if value is None or value == "":
        return ""
    return parse_file(value)


def parse_network(value: Any) -> str:
    """A network in CIDR notation (10.244.0.0/16, fd00::/64) or one address, normalised."""
    if not isinstance(value, str):
        raise _fail("a network such as 10.244.0.0/16", value)
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError as e:
        raise _fail(f"a network such as 10.244.0.0/16 ({e})", value) from None


def parse_path_prefix(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise _fail("a path prefix starting with /", value)
    return value


def parse_path_length(value: Any) -> int:
    length = parse_positive_int(value)
    if length > 64:     # HTTP_PATH_CAPTURE in bpf/http.h
        raise _fail("at most 64 (the bytes of a path the kernel keeps)", value)
    return length


def one_of(*choices: str) -> Parser:
    def parse_choice(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise _fail("one of " + ", ".join(choices), value)
        return value.lower()

    return parse_choice


def parse_endpoint_labels(value: Any) -> tuple[str, ...] | None:
    """None for auto: Kubernetes names when Kubernetes is on, the address when it is off."""
    if value is None or value == "auto":
        return None
    return list_of(one_of(*ENDPOINT_LABELS))(value)


def parse_kubernetes_mode(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return one_of(*KUBERNETES_MODES)(value)


def parse_text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _fail("a string", value)
    return value.strip()


SIDES = ("src", "dst")


def parse_per_metric(value: Any) -> dict[str, dict[str, tuple[str, ...] | None]]:
    """{family: {src: [...], dst: [...]}}: the endpoint labels each side of a metric family
    carries; a side left out (or auto) carries labels.endpoint."""
    if isinstance(value, str):      # from an environment variable: YAML flow syntax
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:     # its str() spans lines: keep the problem only
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"invalid mapping {value!r}: {problem}") from e
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail("a mapping like {flows: {src: [], dst: [namespace, workload]}}", value)
    families = [f.name for f in dataclasses.fields(CollectorsConfig)]
    parsed: dict[str, dict[str, tuple[str, ...] | None]] = {}
    for family, sides in value.items():
        if family not in families:
            shown = family if isinstance(family, str) and family.isprintable() else repr(family)
            raise ConfigError(f"{shown}: unknown metric family (known: {', '.join(families)})")
        if not isinstance(sides, Mapping) or not set(sides) <= set(SIDES):
            raise ConfigError(f"{family}: expected a mapping with src and/or dst, got {sides!r}")
        parsed[family] = {}
        for side in SIDES:
            try:
                parsed[family][side] = parse_endpoint_labels(sides.get(side, "auto"))
            except ConfigError as e:
                raise ConfigError(f"{family}.{side}: {e}") from e
    return parsed


@dataclass(frozen=True)
class WebConfig:
    listen_address: str = _spec(parse_listen_address)
    telemetry_path: str = _spec(parse_path)
    kubernetes_auth: bool = _spec(parse_bool)
    kubernetes_auth_cache: float = _spec(parse_duration)


@dataclass(frozen=True)
class InterfacesConfig:
    include: tuple[str, ...] = _spec(list_of(parse_regex))
    exclude: tuple[str, ...] = _spec(list_of(parse_regex))
    attach: str = _spec(one_of(*ATTACH_MODES))


@dataclass(frozen=True)
class CollectorsConfig:
    flows: bool = _spec(parse_bool)
    tcp: bool = _spec(parse_bool)
    dns: bool = _spec(parse_bool)
    http: bool = _spec(parse_bool)
    https: bool = _spec(parse_bool)
    drops: bool = _spec(parse_bool)
    bash: bool = _spec(parse_bool)


@dataclass(frozen=True)
class PortsConfig:
    ephemeral_floor: int | None = _spec(parse_ephemeral_floor)
    server: tuple[int, ...] = _spec(list_of(parse_port))


@dataclass(frozen=True)
class LabelsConfig:
    endpoint: tuple[str, ...] | None = _spec(parse_endpoint_labels)
    per_metric: Mapping[str, Mapping[str, tuple[str, ...] | None]] = _spec(parse_per_metric)
    namespace_allow: tuple[str, ...] = _spec(list_of(parse_glob))
    namespace_deny: tuple[str, ...] = _spec(list_of(parse_glob))
    workload_allow: tuple[str, ...] = _spec(list_of(parse_glob))
    workload_deny: tuple[str, ...] = _spec(list_of(parse_glob))
    service_allow: tuple[str, ...] = _spec(list_of(parse_glob))
    service_deny: tuple[str, ...] = _spec(list_of(parse_glob))
    pod_namespaces: tuple[str, ...] = _spec(list_of(parse_glob))
    external_names: tuple[str, ...] = _spec(list_of(parse_glob))


@dataclass(frozen=True)
class KubernetesConfig:
    enabled: str = _spec(parse_kubernetes_mode)
    kubeconfig: str = _spec(parse_text)
    node_name: str = _spec(parse_text)
    pod_name: str = _spec(parse_text)
    pod_namespace: str = _spec(parse_text)
    deleted_pod_grace: float = _spec(parse_duration)


@dataclass(frozen=True)
class ClusterConfig:
    counting: str = _spec(one_of(*COUNTING_MODES))
    cidrs: tuple[str, ...] = _spec(list_of(parse_network))


@dataclass(frozen=True)
class SeriesConfig:
    max_per_metric: int = _spec(parse_positive_int)
    ttl: float = _spec(parse_duration)


@dataclass(frozen=True)
class MapsConfig:
    flow_capacity: int = _spec(parse_capacity)
    tcp_event_capacity: int = _spec(parse_capacity)
    tcp_socket_capacity: int = _spec(parse_capacity)
    dns_pending_capacity: int = _spec(parse_capacity)
    dns_event_capacity: int = _spec(parse_capacity)
    http_conn_capacity: int = _spec(parse_capacity)
    http_event_capacity: int = _spec(parse_capacity)
    http2_conn_capacity: int = _spec(parse_capacity)
    http2_ring_mib: int = _spec(parse_ring_mib)
    dns_answer_ring_mib: int = _spec(parse_ring_mib)
    dns_name_capacity: int = _spec(parse_capacity)
    drop_capacity: int = _spec(parse_capacity)
    cluster_address_capacity: int = _spec(parse_capacity)


@dataclass(frozen=True)
class TcpConfig:
    rtt_sample_interval: float = _spec(parse_interval_or_off)   # 0.0: off
    process_label: bool = _spec(parse_bool)


@dataclass(frozen=True)
class DnsConfig:
    ports: tuple[int, ...] = _spec(list_of(parse_port, min_items=1))
    timeout: float = _spec(parse_duration)
    query_names: tuple[str, ...] = _spec(list_of(parse_glob))
    name_min_ttl: float = _spec(parse_duration)
    name_max_ttl: float = _spec(parse_duration)


@dataclass(frozen=True)
class HttpConfig:
    ports: tuple[int, ...] = _spec(list_of(parse_port))
    idle_timeout: float = _spec(parse_duration)
    paths: tuple[str, ...] = _spec(list_of(parse_path_prefix))
    path_max_length: int = _spec(parse_path_length)
    http2: bool = _spec(parse_bool)
    http2_streams: int = _spec(parse_positive_int)
    grpc_services: tuple[str, ...] = _spec(list_of(parse_glob))


@dataclass(frozen=True)
class HttpsConfig:
    rescan_interval: float = _spec(parse_duration)


@dataclass(frozen=True)
class BashConfig:
    binary: str = _spec(parse_file)
    log_file: str = _spec(parse_optional_file)


@dataclass(frozen=True)
class LogConfig:
    level: str = _spec(one_of(*LOG_LEVELS))
    format: str = _spec(one_of(*LOG_FORMATS))


@dataclass(frozen=True)
class Config:
    web: WebConfig
    interfaces: InterfacesConfig
    collectors: CollectorsConfig
    ports: PortsConfig
    labels: LabelsConfig
    kubernetes: KubernetesConfig
    cluster: ClusterConfig
    series: SeriesConfig
    maps: MapsConfig
    tcp: TcpConfig
    dns: DnsConfig
    http: HttpConfig
    https: HttpsConfig
    bash: BashConfig
    log: LogConfig


@functools.cache
def field_paths(cls: type | None = None, prefix: str = "") -> tuple[str, ...]:
    """Dotted paths of every leaf field, e.g. ``series.ttl``."""
    paths: list[str] = []
    for f in dataclasses.fields(cls or Config):
        if "parse" in f.metadata:
            paths.append(prefix + f.name)
        else:
            paths += field_paths(_section_type(f), f"{prefix}{f.name}.")
    return tuple(paths)


def _section_type(f: dataclasses.Field[Any]) -> type:
    # annotations are strings here (postponed evaluation): sections are defined in this module
    return globals()[f.type] if isinstance(f.type, str) else f.type  # type: ignore[return-value]


def env_name(path: str) -> str:
    return ENV_PREFIX + path.replace(".", "_").upper()


def default_document() -> dict[str, Any]:
    text = resources.files("exporter").joinpath("default-config.yaml").read_text()
    return yaml.safe_load(text)


def read_file(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from e
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path}{where}: invalid YAML: {problem}") from e
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections")
    return document


def flatten(document: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """{"series": {"ttl": "5m"}} -> {"series.ttl": "5m"}; unknown keys are errors."""
    known = set(field_paths())
    sections = {p.split(".")[0] for p in known}
    flat: dict[str, Any] = {}
    for section, body in document.items():
        if section not in sections:
            raise ConfigError(f"{origin}: unknown section {section!r} "
                              f"(known: {', '.join(sorted(sections))})")
        if not isinstance(body, Mapping):
            raise ConfigError(f"{origin}: {section}: expected a mapping, got {body!r}")
        for key, value in body.items():
            path = f"{section}.{key}"
            if path not in known:
                keys = sorted(p.split(".", 1)[1] for p in known if p.startswith(section + "."))
                raise ConfigError(f"{origin}: unknown field {path!r} "
                                  f"(known in {section}: {', '.join(keys)})")
            flat[path] = value
    return flat


# EBPF_NET_* variables that are not configuration keys
OTHER_VARIABLES = ("EBPF_NET_BPF_DIR",)
# variables every Kubernetes tool reads, and the keys they set (EBPF_NET_* ones win)
STANDARD_VARIABLES = {"KUBECONFIG": "kubernetes.kubeconfig", "NODE_NAME": "kubernetes.node_name",
                      "POD_NAME": "kubernetes.pod_name",
                      "POD_NAMESPACE": "kubernetes.pod_namespace"}


def from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Values of EBPF_NET_* variables; a misspelt one is an error, not silently ignored."""
    by_name = {env_name(path): path for path in field_paths()}
    values = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in OTHER_VARIABLES:
            continue
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown environment variable {name}{hint}")
        values[by_name[name]] = value
    return values


def build(flat: Mapping[str, Any], origins: Mapping[str, str] | None = None) -> Config:
    """Validates the merged values into a Config; errors name the field and its origin."""
    origins = origins or {}

    def make(cls: type, prefix: str) -> Any:
        kwargs = {}
        for f in dataclasses.fields(cls):
            path = prefix + f.name
            if "parse" not in f.metadata:
                kwargs[f.name] = make(_section_type(f), path + ".")
                continue
            if path not in flat:
                raise ConfigError(f"{path}: missing")
            try:
                kwargs[f.name] = f.metadata["parse"](flat[path])
            except ConfigError as e:
                origin = origins.get(path)
                where = f" (from {origin})" if origin else ""
                raise ConfigError(f"{path}{where}: {e}") from e
        return cls(**kwargs)

    config = make(Config, "")
    _check_together(config, origins)
    return config


def _check_together(config: Config, origins: Mapping[str, str]) -> None:
    """Fields valid alone but not with each other; the error names the field to change."""

    def fail(path: str, problem: str) -> ConfigError:
        origin = origins.get(path)
        return ConfigError(f"{path}{f' (from {origin})' if origin else ''}: {problem}")

    def changed(first: str, second: str) -> str:
        """The one of two fields that was set (not left at its default), else the first."""
        return second if second in origins and first not in origins else first

    if config.labels.external_names and not config.collectors.dns:
        path = changed("labels.external_names", "collectors.dns")
        raise fail(path, "labels.external_names names come from the DNS answers the dns "
                   "collector parses: turn collectors.dns on or leave labels.external_names "
                   "empty")
    if config.dns.name_min_ttl > config.dns.name_max_ttl:
        raise fail(changed("dns.name_min_ttl", "dns.name_max_ttl"),
                   f"dns.name_min_ttl ({config.dns.name_min_ttl:g}s) is above "
                   f"dns.name_max_ttl ({config.dns.name_max_ttl:g}s)")
    asking = [("labels.endpoint", config.labels.endpoint or ())] + [
        ("labels.per_metric", names or ()) for sides in config.labels.per_metric.values()
        for names in sides.values()]
    for path, names in asking:
        if "dns_name" in names and not config.labels.external_names:
            raise fail(path, "dns_name needs labels.external_names, the globs of names to keep "
                       "(e.g. [\"*.amazonaws.com\"], or [\"*\"] for every name)")


def load(path: str | None, environ: Mapping[str, str], overrides: Mapping[str, Any],
         override_origins: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the file, then EBPF_NET_* variables, then flag overrides.
    override_origins names where each override came from (e.g. the flag)."""
    flat = flatten(default_document(), "embedded defaults")
    origins: dict[str, str] = {}
    if path:
        for key, value in flatten(read_file(path), f"config file {path}").items():
            flat[key], origins[key] = value, f"config file {path}"
    for name, key in STANDARD_VARIABLES.items():
        if environ.get(name):
            flat[key], origins[key] = environ[name], name
    for key, value in from_environment(environ).items():
        flat[key], origins[key] = value, env_name(key)
    for key, value in overrides.items():
        flat[key], origins[key] = value, (override_origins or {}).get(key, "flag")
    return build(flat, origins)
