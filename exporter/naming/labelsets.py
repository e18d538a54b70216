"""The endpoint labels each metric family carries: labels.endpoint or its auto choice, per
family and side as labels.per_metric says, folded by the allowlists."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .. import logs
from ..config import Config
from .endpoints import KUBERNETES_LABELS, EndpointLabels, ExternalNamer
from .namepolicy import Globs, NamePolicy

if TYPE_CHECKING:      # the kubernetes client is imported only when Kubernetes is on
    from ..k8s.metadata import KubernetesMetadata

log = logs.get("main")

ADDRESS_LABELS = ("ip", "ip_type", "port")
KUBERNETES_DEFAULT_LABELS = ("namespace", "workload", "workload_kind", "service", "node",
                             "ip_type", "port")


class EndpointLabelSets:
    """The endpoint labels of each metric family: labels.endpoint (or its auto choice), per
    family and side as labels.per_metric says, with the names folded by the allowlists."""

    def __init__(self, config: Config, kubernetes: KubernetesMetadata | None,
                 external: ExternalNamer | None = None) -> None:
        settings = config.labels
        self.resolver = kubernetes
        self.external = external
        self.policy = self._policy(config)
        self.auto = settings.endpoint is None
        self.default = self._names(settings.endpoint, settings.pod_namespaces)
        self.per_metric = settings.per_metric
        self.handed_out: list[EndpointLabels] = []

    @staticmethod
    def _policy(config: Config) -> NamePolicy:
        settings = config.labels
        return NamePolicy(Globs(settings.namespace_allow, settings.namespace_deny),
                          Globs(settings.workload_allow, settings.workload_deny),
                          Globs(settings.service_allow, settings.service_deny),
                          settings.pod_namespaces)

    def reload(self, config: Config) -> set[str]:
        """New allow/deny globs and pod namespaces for every family, from the next scrape on;
        returns the settings applied. Label names cannot change without a restart: the pod
        namespaces are applied only if they keep the `pod` label (chosen by auto) as it is."""
        applied = {f"labels.{kind}_{way}" for kind in ("namespace", "workload", "service")
                   for way in ("allow", "deny")}
        pods_as_before = self._names(config.labels.endpoint,
                                     config.labels.pod_namespaces) == self.default
        if pods_as_before:
            applied.add("labels.pod_namespaces")
        else:
            config = replace(config, labels=replace(config.labels,
                                                    pod_namespaces=self.policy.pod_namespaces))
        self.policy = self._policy(config)
        for labels in self.handed_out:
            labels.set_policy(self.policy)
        return applied

    def _names(self, names: tuple[str, ...] | None,
               pod_namespaces: tuple[str, ...] = ()) -> tuple[str, ...]:
        if names is None:
            if self.resolver is None:
                return ADDRESS_LABELS
            pods = ("pod",) if pod_namespaces else ()
            return KUBERNETES_DEFAULT_LABELS + pods
        if self.resolver is None and set(names) & set(KUBERNETES_LABELS):
            dropped = sorted(set(names) & set(KUBERNETES_LABELS))
            log.warning("kubernetes labels off: endpoint labels left out",
                        extra={"labels": ",".join(dropped)})
            names = tuple(n for n in names if n not in KUBERNETES_LABELS)
        return names

    def _flow_default(self) -> tuple[str, ...]:
        """The auto labels of the flow metrics: the default, with zone where the nodes carry
        zones, and dns_name with external names."""
        names = self.default
        has_zones = getattr(self.resolver, "has_zones", None)
        if has_zones is not None:
            zones = has_zones()
            if zones is None:
                log.warning("zone labels on without knowing whether nodes carry zones",
                            extra={"labels": "src_zone,dst_zone"})
            if zones is not False:
                names += ("zone",)
        if self.external is not None:
            names += ("dns_name",)
        return names

    def of(self, family: str) -> EndpointLabels:
        sides = self.per_metric.get(family, {})
        default = self._flow_default() if family == "flows" and self.auto else self.default
        src, dst = (self._names(sides[side], self.policy.pod_namespaces)
                    if sides.get(side) is not None else default for side in ("src", "dst"))
        labels = EndpointLabels(src, dst, self.resolver, self.policy, self.external)
        self.handed_out.append(labels)
        return labels
