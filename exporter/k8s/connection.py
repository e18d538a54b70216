"""Where the API server is and how to reach it: the in-cluster service account when running in
a pod, else a kubeconfig named by --kubeconfig / KUBECONFIG. Neither: Kubernetes is off."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from kubernetes import client

    from ..config import KubernetesConfig
    from .metadata import KubernetesMetadata

IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class KubernetesConfigError(Exception):
    """A kubeconfig or in-cluster configuration that cannot be used; one line for the user."""


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(IN_CLUSTER_TOKEN)


def connect(kubeconfig: str) -> tuple[client.ApiClient | None, str]:
    """An API client and where its configuration came from, or None and why not."""
    if not kubeconfig and not in_cluster():
        return None, "no in-cluster service account and no kubeconfig"
    # the kubernetes client costs some 190 ms and 20 MiB to import: only when it will be used
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig:
        try:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration,
                                    persist_config=False)
        except (config.ConfigException, OSError, ValueError, TypeError, yaml.YAMLError) as e:
            reason = " ".join(str(e).split())        # YAML errors span several lines
            raise KubernetesConfigError(f"kubeconfig {kubeconfig}: {reason}") from e
        source = f"kubeconfig {kubeconfig}"
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException as e:
            raise KubernetesConfigError(f"in-cluster configuration: {' '.join(str(e).split())}") \
                from e
        source = "in-cluster service account"
    # the reflectors retry with back-off and count failures; urllib3 must not retry (and warn)
    # behind their back
    configuration.retries = False
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    return client.ApiClient(configuration), source


def open_metadata(settings: KubernetesConfig) -> tuple[KubernetesMetadata | None, str]:
    """The cluster cache (not started yet) that `settings` ask for, and where its configuration
    came from; or None and why Kubernetes is off. KubernetesConfigError when it cannot be had
    although asked for. The exporter and the live view both start from here."""
    if settings.enabled == "false":
        return None, "kubernetes.enabled=false"
    api, source = connect(settings.kubeconfig)
    if api is None:
        if settings.enabled == "true":
            raise KubernetesConfigError(f"kubernetes.enabled is true but there is {source}: "
                                        "give --kubeconfig or run in a pod")
        return None, source
    from .metadata import KubernetesMetadata  # imports the kubernetes client's API classes

    metadata = KubernetesMetadata(api, settings.deleted_pod_grace)
    if settings.node_name:
        metadata.state.set_local_node(settings.node_name, local_addresses())
    return metadata, source


def local_addresses() -> list[str]:
    """This host's own addresses (its network namespace's), but loopback."""
    from ..kernel.netroles import read_addresses
    from ..kernel.rtnetlink import RtNetlink

    with RtNetlink() as ipr:
        return [str(net.network_address) for net in read_addresses(ipr)
                if not net.network_address.is_loopback]
