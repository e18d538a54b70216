"""Naming endpoints: addresses to label values (Kubernetes names, zones, external names, ports),
and which labels each metric family carries."""
