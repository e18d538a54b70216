"""Command line: flags by Prometheus exporter convention, over EBPF_NET_* variables, over the
config file, over the embedded defaults. User mistakes exit non-zero with one line."""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from . import __version__, config, logs
from .cliparse import EXIT_RUNTIME, EXIT_USAGE, OneLineParser
from .kernel.loader import LoadError, bpf_dir, expand_source
from .serving import webconfig

if TYPE_CHECKING:       # the exporter is imported when it runs, not for --help
    from .app import Exporter

EPILOG = """examples:
  # every interface but lo, on :9814
  sudo .venv/bin/ebpf-net-exporter

  # only the pods' veths, with a config file
  sudo .venv/bin/ebpf-net-exporter --interfaces 'veth.*|cali.*' --config.file exporter.yaml

  # TCP metrics only, on localhost, JSON logs
  sudo .venv/bin/ebpf-net-exporter --no-collector.flows --web.listen-address 127.0.0.1:9814 \\
      --log.format json

  # TLS and basic auth on the endpoint (exporter-toolkit's file format)
  sudo .venv/bin/ebpf-net-exporter --web.config.file web-config.yml

  # outside a pod: Kubernetes labels from a kubeconfig, pod names in two namespaces
  sudo .venv/bin/ebpf-net-exporter --kubeconfig ~/.kube/config --node-name worker-1 \\
      --labels.pod-namespaces 'shop,payments'

  # check a config file and print the effective configuration
  .venv/bin/ebpf-net-exporter --config.file exporter.yaml --config.check

  # the live view: flows, DNS and HTTP exchanges as they complete (see flows --help)
  sudo .venv/bin/ebpf-net-exporter flows --json

every setting can also come from an environment variable EBPF_NET_<SECTION>_<KEY>,
e.g. EBPF_NET_SERIES_TTL=10m; see docs/configuration.md
"""

COLLECTORS = ("flows", "tcp", "dns", "http", "https", "drops", "bash")
# flag destination -> (config path, flag)
FLAG_FIELDS = {
    "web_listen_address": ("web.listen_address", "--web.listen-address"),
    "web_telemetry_path": ("web.telemetry_path", "--web.telemetry-path"),
    "web_kubernetes_auth": ("web.kubernetes_auth", "--web.kubernetes-auth"),
    "interfaces": ("interfaces.include", "--interfaces"),
    "interfaces_attach": ("interfaces.attach", "--interfaces.attach"),
    "log_level": ("log.level", "--log.level"),
    "log_format": ("log.format", "--log.format"),
    "series_max": ("series.max_per_metric", "--series.max-per-metric"),
    "series_ttl": ("series.ttl", "--series.ttl"),
    "kubernetes": ("kubernetes.enabled", "--kubernetes"),
    "kubeconfig": ("kubernetes.kubeconfig", "--kubeconfig"),
    "node_name": ("kubernetes.node_name", "--node-name"),
    "cluster_counting": ("cluster.counting", "--cluster.counting"),
    "cluster_cidrs": ("cluster.cidrs", "--cluster.cidrs"),
    "namespace_allow": ("labels.namespace_allow", "--labels.namespace-allow"),
    "namespace_deny": ("labels.namespace_deny", "--labels.namespace-deny"),
    "pod_namespaces": ("labels.pod_namespaces", "--labels.pod-namespaces"),
    "endpoint_labels": ("labels.endpoint", "--labels.endpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ebpf-net-exporter",
        description="Prometheus exporter of TCP/UDP flows and TCP health seen with eBPF.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config.file", dest="config_file", metavar="PATH",
                        help="YAML configuration file (default: the embedded defaults)")
    parser.add_argument("--config.check", dest="config_check", action="store_true",
                        help="validate the configuration, print it and exit")
    parser.add_argument("--web.listen-address", dest="web_listen_address", metavar="ADDR",
                        help="[host]:port to serve on (default :9814)")
    parser.add_argument("--web.config.file", dest="web_config_file", metavar="PATH",
                        help="TLS and basic auth of the endpoint, in Prometheus "
                             "exporter-toolkit's format (see docs/security.md)")
    parser.add_argument("--web.kubernetes-auth", dest="web_kubernetes_auth",
                        action="store_const", const=True,
                        help="let only bearer tokens the Kubernetes API server allows to get "
                             "the telemetry path read it (TLS on, see docs/security.md)")
    parser.add_argument("--web.telemetry-path", dest="web_telemetry_path", metavar="PATH",
                        help="path of the metrics (default /metrics)")
    parser.add_argument("--interfaces", metavar="REGEX",
                        help="attach to interfaces whose name fully matches REGEX "
                             "(replaces interfaces.include; interfaces.exclude still applies)")
    parser.add_argument("--interfaces.attach", dest="interfaces_attach", metavar="MODE",
                        help="auto (tcx links on Linux >= 6.6, else clsact), tcx or clsact")
    parser.add_argument("--log.level", dest="log_level", metavar="LEVEL",
                        help="debug, info, warning or error")
    parser.add_argument("--log.format", dest="log_format", metavar="FORMAT",
                        help="logfmt or json")
    parser.add_argument("--series.max-per-metric", dest="series_max", metavar="N",
                        help="series cap per metric")
    parser.add_argument("--series.ttl", dest="series_ttl", metavar="DURATION",
                        help="drop series idle this long, e.g. 5m")
    parser.add_argument("--kubernetes", metavar="MODE",
                        help="auto (on in a pod or with a kubeconfig), true or false")
    parser.add_argument("--kubeconfig", metavar="PATH",
                        help="kubeconfig to reach the API server outside a pod "
                             "(default: $KUBECONFIG; in a pod: the service account)")
    parser.add_argument("--node-name", dest="node_name", metavar="NAME",
                        help="this node's name (default: $NODE_NAME)")
    parser.add_argument("--cluster.counting", dest="cluster_counting", metavar="MODE",
                        help="auto (once per cluster where the cluster's addresses are known) "
                             "or node (once per node)")
    parser.add_argument("--cluster.cidrs", dest="cluster_cidrs", metavar="CIDRS",
                        help="without Kubernetes: comma-separated networks whose nodes and "
                             "pods run the exporter (turns on once-per-cluster counting)")
    parser.add_argument("--labels.endpoint", dest="endpoint_labels", metavar="NAMES",
                        help="endpoint labels, comma-separated, or auto")
    parser.add_argument("--labels.namespace-allow", dest="namespace_allow", metavar="GLOBS",
                        help="namespaces whose names are kept, comma-separated globs; "
                             "others read `other`")
    parser.add_argument("--labels.namespace-deny", dest="namespace_deny", metavar="GLOBS",
                        help="namespaces whose names read `other`")
    parser.add_argument("--labels.pod-namespaces", dest="pod_namespaces", metavar="GLOBS",
                        help="namespaces whose endpoints carry a pod label")
    for name in COLLECTORS:
        parser.add_argument(f"--collector.{name}", dest=f"collector_{name}",
                            action="store_const", const=True,
                            help=f"enable the {name} collector")
        parser.add_argument(f"--no-collector.{name}", dest=f"collector_{name}",
                            action="store_const", const=False,
                            help=f"disable the {name} collector")
    parser.add_argument("--ebpf.print-source", dest="print_source", metavar="FILE",
                        help=argparse.SUPPRESS)   # bcc-tools style: show the C bcc compiles
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def overrides_from(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """Config values given as flags, and which flag gave each."""
    overrides: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for dest, (path, flag) in FLAG_FIELDS.items():
        value = getattr(args, dest)
        if value is not None:
            overrides[path] = [value] if path == "interfaces.include" else value
            origins[path] = flag
    for name in COLLECTORS:
        value = getattr(args, f"collector_{name}")
        if value is not None:
            overrides[f"collectors.{name}"] = value
            origins[f"collectors.{name}"] = f"--{'' if value else 'no-'}collector.{name}"
    return overrides, origins


def _fail(message: str, code: int) -> NoReturn:
    print(f"ebpf-net-exporter: {message}", file=sys.stderr)
    sys.exit(code)


def effective_yaml(cfg: config.Config) -> str:
    def plain(value: Any) -> Any:
        if value is None:           # every optional setting means "work it out": auto
            return "auto"
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return yaml.safe_dump(plain(dataclasses.asdict(cfg)), sort_keys=False)


def main(argv: Sequence[str] | None = None,
         started: Callable[[Exporter], None] | None = None) -> None:
    """The command line. `started`, for a program that runs the exporter in its own process
    (benchmarks/switchable.py), is called with the exporter once it has started."""
    # numpy (imported later, by the collectors) would start an OpenBLAS thread per core: idle
    # here (no linear algebra), yet each would keep every capability the process started with
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["flows"]:        # the live view: a command of its own
        from .live import cli as live_cli

        live_cli.main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    if args.print_source:
        try:
            print(expand_source(bpf_dir() / args.print_source))
        except (OSError, LoadError) as e:
            _fail(f"--ebpf.print-source: {e}", EXIT_USAGE)
        return
    try:
        cfg = config.load(args.config_file, os.environ, *overrides_from(args))
    except config.ConfigError as e:
        _fail(str(e), EXIT_USAGE)
    web = None
    if args.web_config_file:
        try:
            web = webconfig.load(args.web_config_file)
        except webconfig.WebConfigError as e:
            _fail(f"--web.config.file: {e}", EXIT_USAGE)
    if args.config_check:
        print(effective_yaml(cfg), end="")
        return
    logs.setup(cfg.log.level, cfg.log.format)

    def reread() -> config.Config:
        return config.load(args.config_file, os.environ, *overrides_from(args))

    sys.exit(run(cfg, web, reread, started))


def run(cfg: config.Config, web: webconfig.WebConfig | None = None,
        reread: Callable[[], config.Config] | None = None,
        started: Callable[[Exporter], None] | None = None) -> int:
    from .app import Exporter
    from .errors import StartupError
    from .kernel.environment import EnvironmentProblem

    log = logs.get("main")
    # What the handlers saw, in plain lists: a handler runs in the main thread between two of
    # its bytecodes, so one that took a lock (Event.set, a log line) could deadlock against the
    # main thread holding it (Event.wait holds its condition's lock around its own wait: a
    # SIGTERM there hung a test's exporter for 30 s). The main loop acts on them.
    stop_signals: list[int] = []
    hangups: list[int] = []

    def on_signal(number: int, _frame: Any) -> None:
        stop_signals.append(number)

    def on_hangup(number: int, _frame: Any) -> None:
        hangups.append(number)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    # `kill -USR1 <pid>`: every thread's stack on stderr, and the exporter carries on; for an
    # exporter that seems stuck (a stop that does not finish, a scrape that does not answer)
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    exporter = Exporter(cfg, web)
    try:
        exporter.start()
        if started is not None:
            started(exporter)
        while not stop_signals:
            time.sleep(0.2)     # a signal's handler runs within it; the sleep then goes on
            if hangups:
                hangups.clear()
                reload(exporter, reread)
        log.info("stopping", extra={"signal": signal.Signals(stop_signals[0]).name})
        return 0
    except (EnvironmentProblem, StartupError, LoadError, OSError) as e:
        log.error(str(e))
        return EXIT_RUNTIME
    except Exception as e:  # a bug: one line for the user, the traceback at debug level
        log.debug("traceback", exc_info=True)
        log.error(f"internal error: {type(e).__name__}: {e} "
                  "(run with --log.level debug for the traceback)")
        return EXIT_RUNTIME
    finally:
        exporter.stop()


def reload(exporter: Any, reread: Callable[[], config.Config] | None) -> None:
    """SIGHUP: re-read the file and the environment; a bad configuration is one error line and
    the running one stays."""
    log = logs.get("main")
    if reread is None:
        return
    try:
        new = reread()
    except config.ConfigError as e:
        log.error(f"reload failed, configuration unchanged: {e}")
        return
    restart = exporter.reload(new)
    log.info("configuration reloaded", extra={"interfaces": ",".join(new.interfaces.include)})
    if restart:
        log.warning("changed settings take effect after a restart",
                    extra={"settings": ",".join(restart)})


if __name__ == "__main__":
    main()
