"""`make bench`: the performance benchmarks of ebpf-net-exporter (issue 8). See
docs/benchmarks.md for the method and the latest results."""
