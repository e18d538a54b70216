"""Who an endpoint is, for the live view. Today: the address and port it always shows. The hook
for Kubernetes names: a resolver with `kubernetes = True` whose describe(ip) returns the
endpoint labels of the metrics (namespace, workload, workload_kind, service, pod, node) is
passed to the view instead of AddressIdentity; `--namespace` then filters on its namespace."""

from __future__ import annotations

from typing import Protocol


class Identity(Protocol):
    kubernetes: bool

    def describe(self, ip: str) -> dict[str, str]: ...


class AddressIdentity:
    """No metadata beyond the address: describe() adds nothing."""

    kubernetes = False

    def describe(self, ip: str) -> dict[str, str]:
        return {}


def make_identity() -> Identity:
    # the Kubernetes resolver (exporter/k8s.py, issue 5) plugs in here when configured
    return AddressIdentity()
