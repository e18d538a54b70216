"""Serving the metrics: the HTTP endpoint, its TLS and authentication, the series store and the
exposition, and the exporter's own metrics."""
