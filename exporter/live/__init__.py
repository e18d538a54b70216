"""The live view, `ebpf-net-exporter flows`: what the node sees right now, one line per flow,
DNS exchange and HTTP exchange as they complete. It loads its own copies of the programs (with
-DWITH_EVENTS) and its own maps, so it never disturbs a running exporter's counts."""
