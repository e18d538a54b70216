"""Who an endpoint is, for the live view: the address and port it always shows and, with
Kubernetes metadata (the exporter's `kubernetes:` settings, --kubeconfig, or the pod's service
account), the endpoint labels of the metrics: namespace, workload, workload_kind, service, pod,
node (empty ones left out). `--namespace` filters on the namespace."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Protocol

from .. import logs
from ..config import Config

if TYPE_CHECKING:      # the kubernetes client is imported only when Kubernetes is on
    from ..k8s.metadata import KubernetesMetadata

log = logs.get("live")


class IdentityError(Exception):
    pass


class Identity(Protocol):
    kubernetes: bool

    def describe(self, ip: str) -> dict[str, str]: ...

    def close(self) -> None: ...


class AddressIdentity:
    """No metadata beyond the address: describe() adds nothing."""

    kubernetes = False

    def describe(self, ip: str) -> dict[str, str]:
        return {}

    def close(self) -> None:
        pass


class KubernetesIdentity:
    kubernetes = True

    def __init__(self, metadata: KubernetesMetadata) -> None:
        self.metadata = metadata

    def describe(self, ip: str) -> dict[str, str]:
        identity = self.metadata.resolve(ip)
        return {name: value for name, value in dataclasses.asdict(identity).items() if value}

    def close(self) -> None:
        self.metadata.stop()


def make_identity(config: Config) -> Identity:
    """Kubernetes names where the configuration reaches an API server, else addresses only."""
    from ..k8s.connection import KubernetesConfigError, open_metadata

    try:
        metadata, source = open_metadata(config.kubernetes)
    except KubernetesConfigError as e:
        raise IdentityError(str(e)) from e
    if metadata is None:
        return AddressIdentity()
    metadata.start()
    log.info("kubernetes names on", extra={"from": source})
    return KubernetesIdentity(metadata)
