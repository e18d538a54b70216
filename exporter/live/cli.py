"""`ebpf-net-exporter flows`: the live view's command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from .. import config, logs
from ..cliparse import EXIT_RUNTIME, EXIT_USAGE, OneLineParser
from .filters import FilterError, LineFilter, parse_host
from .identity import Identity, IdentityError, make_identity
from .output import Formatter

EPILOG = """examples:
  # everything the node sees, as it completes
  sudo .venv/bin/ebpf-net-exporter flows

  # DNS and HTTP exchanges of one pod, as JSON lines
  sudo .venv/bin/ebpf-net-exporter flows --dns --http --host 10.244.1.17 --json

  # TCP flows to port 5432 on the pods' veths only
  sudo .venv/bin/ebpf-net-exporter flows --tcp --port 5432 --interfaces 'veth.*'

A flow is printed when it ends (its TCP sockets on this node closed, or no packet for --idle),
and every --interval while it lasts (state "active"); figures are totals since it was first
seen. It runs beside a running exporter without changing its counts.
"""

KINDS = ("tcp", "udp", "dns", "http")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ebpf-net-exporter flows",
        description="Print flows, DNS, HTTP and HTTPS exchanges as the node sees them, like "
                    "tcpdump for flows.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    for kind in KINDS:
        what = {"tcp": "TCP flows", "udp": "UDP flows", "dns": "DNS exchanges",
                "http": "HTTP, HTTPS, HTTP/2 and gRPC exchanges"}[kind]
        parser.add_argument(f"--{kind}", action="store_true",
                            help=f"show {what} (without any of --tcp --udp --dns --http: "
                                 "everything)")
    parser.add_argument("--host", action="append", default=[], metavar="ADDR[/LEN]",
                        help="only lines with an end in this address or network (repeatable)")
    parser.add_argument("--port", action="append", default=[], type=int, metavar="PORT",
                        help="only lines with an end on this port (repeatable)")
    parser.add_argument("--namespace", action="append", default=[], metavar="NAME",
                        help="only lines with an end in this Kubernetes namespace (repeatable)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--interfaces", metavar="REGEX",
                        help="attach to interfaces whose name fully matches REGEX "
                             "(default: interfaces.include of the configuration)")
    parser.add_argument("--idle", default="2s", metavar="DURATION",
                        help="a flow without packets this long has ended (default 2s)")
    parser.add_argument("--interval", default="10s", metavar="DURATION",
                        help="print flows still going this often (default 10s)")
    parser.add_argument("--kubeconfig", metavar="PATH",
                        help="Kubernetes names from this kubeconfig (in a pod: its service "
                             "account)")
    parser.add_argument("--node-name", dest="node_name", metavar="NAME",
                        help="this node's name, for its own addresses")
    parser.add_argument("--config.file", dest="config_file", metavar="PATH",
                        help="the exporter's configuration file (interfaces, DNS and HTTP "
                             "ports)")
    parser.add_argument("--log.level", dest="log_level", default="info", metavar="LEVEL",
                        help="debug, info, warning or error (on stderr)")
    return parser


def _fail(message: str) -> None:
    print(f"ebpf-net-exporter flows: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def load_config(args: argparse.Namespace) -> config.Config:
    overrides: dict[str, Any] = {
        "collectors.flows": True, "collectors.dns": True, "collectors.http": True,
        "collectors.https": True,
        # the view shows every name and target: capture them in the kernel
        "dns.query_names": ["*"], "http.paths": ["/"], "log.level": args.log_level,
    }
    origins = {"interfaces.include": "--interfaces", "log.level": "--log.level"}
    if args.interfaces:
        overrides["interfaces.include"] = [args.interfaces]
    for dest, path in (("kubeconfig", "kubernetes.kubeconfig"),
                       ("node_name", "kubernetes.node_name")):
        if getattr(args, dest):
            overrides[path] = getattr(args, dest)
            origins[path] = f"--{dest.replace('_', '-')}"
    return config.load(args.config_file, os.environ, overrides, origins)


def main(argv: Sequence[str]) -> None:
    args = build_parser().parse_args(argv)
    identity: Identity | None = None
    try:
        cfg = load_config(args)
        idle = config.parse_duration(args.idle)
        interval = config.parse_duration(args.interval)
        if any(not 0 < port < 65536 for port in args.port):
            raise FilterError("--port: expected a port number 1-65535")
        hosts = [parse_host(h) for h in args.host]
        logs.setup(cfg.log.level, cfg.log.format)
        identity = make_identity(cfg)
        line_filter = LineFilter(frozenset(k for k in KINDS if getattr(args, k)), hosts,
                                 args.port, args.namespace, identity)
    except (config.ConfigError, FilterError, IdentityError) as e:
        if identity is not None:
            identity.close()
        _fail(str(e))
    try:
        code = run(cfg, line_filter, Formatter(identity, args.json), idle, interval)
    finally:
        identity.close()
    sys.exit(code)


def _writer() -> Any:
    def write(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    return write


def run(cfg: config.Config, line_filter: LineFilter, formatter: Formatter, idle: float,
        interval: float) -> int:
    from ..errors import StartupError
    from ..kernel.environment import EnvironmentProblem
    from ..kernel.loader import LoadError
    from .view import LiveView

    log = logs.get("live")
    stop = threading.Event()

    def on_signal(_number: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    view = LiveView(cfg, line_filter, formatter, _writer(), idle, interval)
    try:
        view.start()
        view.run(stop)
        return 0
    except BrokenPipeError:     # the reader went away (| head): a normal end
        # no second error when Python flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (EnvironmentProblem, StartupError, LoadError, OSError) as e:
        log.error(str(e))
        return EXIT_RUNTIME
    except Exception as e:
        log.debug("traceback", exc_info=True)
        log.error(f"internal error: {type(e).__name__}: {e} "
                  "(run with --log.level debug for the traceback)")
        return EXIT_RUNTIME
    finally:
        view.stop()
