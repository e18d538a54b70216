"""The lab: test nodes and clusters built of network namespaces and veth pairs, with real
servers, clients and traffic, an exporter run in them, and a test Kubernetes API server. Used
by the tests, `make demo` and the benchmarks; it never touches the host's own interfaces."""
