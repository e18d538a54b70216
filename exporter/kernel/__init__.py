"""Talking to the kernel: the bpf(2) calls, BTF, compiling and loading programs, maps and ring
buffers, attaching to interfaces, tracepoints and OpenSSL, and the privileges it takes."""
