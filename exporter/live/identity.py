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
    settings = config.kubernetes
    if settings.enabled == "false":
        return AddressIdentity()
    from ..app import local_addresses
    from ..k8s.connection import KubernetesConfigError, connect
    from ..k8s.metadata import KubernetesMetadata

    try:
        api, source = connect(settings.kubeconfig)
    except KubernetesConfigError as e:
        raise IdentityError(str(e)) from e
    if api is None:
        if settings.enabled == "true":
            raise IdentityError(f"kubernetes.enabled is true but there is {source}: give "
                                "--kubeconfig or run in a pod")
        return AddressIdentity()
    metadata = KubernetesMetadata(api, settings.deleted_pod_grace)
    if settings.node_name:
        metadata.state.set_local_node(settings.node_name, local_addresses())
    metadata.start()
    log.info("kubernetes names on", extra={"from": source})
    return KubernetesIdentity(metadata)
