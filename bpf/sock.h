/* A TCP socket's endpoints, read from the socket itself (-DWITH_SOCK_FIELDS: member offsets
 * from the running kernel's BTF, exporter/kernel/sockfields.py, as CO-RE relocations would
 * give). */
#ifndef EBPF_NET_SOCK_H
#define EBPF_NET_SOCK_H

#include "common.h"

#define SOCK_AF_INET6 10

#ifdef WITH_SOCK_FIELDS
static __always_inline u32 sock_u32(const u8 *sk, u32 offset)
{
    u32 value = 0;
    bpf_probe_read_kernel(&value, sizeof(value), sk + offset);
    return value;
}

static __always_inline u16 sock_u16(const u8 *sk, u32 offset)
{
    u16 value = 0;
    bpf_probe_read_kernel(&value, sizeof(value), sk + offset);
    return value;
}

/* family 4 or 6; an IPv4 address takes the first 4 bytes of its 16; ports in host order */
struct sock_ends {
    u8 family;
    u8 pad;
    u16 local_port;
    u16 remote_port;
    u16 pad2;
    u8 local[16];
    u8 remote[16];
};

/* The endpoints of `sk`: one read of the socket's head, and two more for IPv6 addresses. */
static __always_inline void sock_ends_of(struct sock_ends *ends, const u8 *sk)
{
    u64 words[(SK_HEAD_BYTES + 7) / 8];
    const u8 *head = (const u8 *)words;
    bpf_probe_read_kernel(words, SK_HEAD_BYTES, sk);
    if (*(const u16 *)(head + SK_FAMILY) == SOCK_AF_INET6) {
        ends->family = 6;
        bpf_probe_read_kernel(ends->local, 16, sk + SK_LOCAL_ADDR6);
        bpf_probe_read_kernel(ends->remote, 16, sk + SK_REMOTE_ADDR6);
    } else {
        ends->family = 4;
        __builtin_memcpy(ends->local, head + SK_LOCAL_ADDR, 4);
        __builtin_memcpy(ends->remote, head + SK_REMOTE_ADDR, 4);
    }
    ends->local_port = *(const u16 *)(head + SK_LOCAL_PORT);
    ends->remote_port = bpf_ntohs(*(const u16 *)(head + SK_REMOTE_PORT));
}
#endif

#endif
