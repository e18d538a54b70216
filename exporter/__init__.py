"""ebpf-net-exporter: per-node Prometheus exporter of network flows, TCP, DNS and HTTP seen with
eBPF."""

__version__ = "0.1.0"
