"""Where the API server is and how to reach it: the in-cluster service account when running in
a pod, else a kubeconfig named by --kubeconfig / KUBECONFIG. Neither: Kubernetes is off."""

from __future__ import annotations

import logging
import os

import yaml
from kubernetes import client, config

IN_CLUSTER_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


class KubernetesConfigError(Exception):
    """A kubeconfig or in-cluster configuration that cannot be used; one line for the user."""


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(IN_CLUSTER_TOKEN)


def connect(kubeconfig: str) -> tuple[client.ApiClient | None, str]:
    """An API client and where its configuration came from, or None and why not."""
    configuration = client.Configuration()
    if kubeconfig:
        try:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration,
                                    persist_config=False)
        except (config.ConfigException, OSError, ValueError, TypeError, yaml.YAMLError) as e:
            reason = " ".join(str(e).split())        # YAML errors span several lines
            raise KubernetesConfigError(f"kubeconfig {kubeconfig}: {reason}") from e
        source = f"kubeconfig {kubeconfig}"
    elif in_cluster():
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException as e:
            raise KubernetesConfigError(f"in-cluster configuration: {' '.join(str(e).split())}") \
                from e
        source = "in-cluster service account"
    else:
        return None, "no in-cluster service account and no kubeconfig"
    # the reflectors retry with back-off and count failures; urllib3 must not retry (and warn)
    # behind their back
    configuration.retries = False
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    return client.ApiClient(configuration), source
