/* Packet drops from the skb:kfree_skb tracepoint: every skb the kernel frees as dropped, with
 * the reason it gives (enum skb_drop_reason; kernels >= 5.17). Freed-as-consumed skbs go to
 * skb:consume_skb instead and are not seen here.
 *
 * The tracepoint gives the skb's address, its ethertype (`protocol`) and the reason. The
 * endpoints come from the packet's IP header, read at skb->head + skb->network_header. Those
 * two sk_buff members are read with the offsets of the running kernel, taken by user space
 * from its BTF (/sys/kernel/btf/vmlinux) and passed as SKB_HEAD_OFFSET and
 * SKB_NETWORK_HEADER_OFFSET, never from the headers bcc compiles with (which may be another
 * kernel's). Without them (no BTF) drops are counted by reason and protocol only.
 *
 * Counted once per drop, in whichever network namespace it happens: the tracepoint sees the
 * whole node. */

/* The tracepoint types `reason` as enum skb_drop_reason, which the uapi headers included here
 * lack (and other headers may define differently). It is 4 bytes either way; give bcc's
 * generated struct a tag we define. */
#define skb_drop_reason ebpf_net_skb_drop_reason
enum ebpf_net_skb_drop_reason { EBPF_NET_SKB_DROP_REASON_ANY };

#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include "common.h"

#define ETHERTYPE_IP 0x0800
#define ETHERTYPE_IPV6 0x86DD
#define NETWORK_HEADER_UNSET 0xffff
#define DROP_PROTOCOL_NON_IP 255    /* `protocol` of frames that are not IP (ARP, LLDP, ...) */

/* Distinct (reason, addresses, ports, protocol) per scrape interval. Drops are rare on a
 * healthy node; 16384 covers a port scan's spread at a 15 s interval. Drops past it are counted
 * in drop_overflow by reason, so totals stay exact. Overridable. */
#ifndef DROP_CAPACITY
#define DROP_CAPACITY 16384
#endif
/* drop_overflow index: the reason, with every reason from DROP_OVERFLOW_OTHER up (subsystem
 * reasons carry their subsystem in the high bits) on the last index */
#define DROP_OVERFLOW_OTHER 255

struct drop_key {
    u32 generation;
    u32 reason;
    u8 family;              /* 4, 6, or 0 when the addresses are not known */
    u8 protocol;            /* IPPROTO_* (family 4 or 6), DROP_PROTOCOL_NON_IP (family 0) */
    u16 sport;
    u16 dport;
    u16 pad;
    u8 saddr[16];
    u8 daddr[16];
};

BPF_ARRAY(generation, u32, 1);
BPF_PERCPU_HASH(drops, struct drop_key, u64, DROP_CAPACITY);
BPF_PERCPU_ARRAY(drop_overflow, u64, DROP_OVERFLOW_OTHER + 1);
BPF_PERCPU_ARRAY(map_update_failures, u64, 1);

static __always_inline void count_drop(struct drop_key *key)
{
    u64 one = 1;
    u64 *count = drops.lookup(key);
    if (count) {
        *count += 1;
        return;
    }
    /* fails with EEXIST when another CPU created it meanwhile, E2BIG when full */
    if (drops.insert(key, &one) == 0)
        return;
    count = drops.lookup(key);
    if (count) {
        *count += 1;
        return;
    }
    u32 zero = 0;
    count = map_update_failures.lookup(&zero);
    if (count)
        *count += 1;
    u32 idx = key->reason < DROP_OVERFLOW_OTHER ? key->reason : DROP_OVERFLOW_OTHER;
    count = drop_overflow.lookup(&idx);
    if (count)
        *count += 1;
}

static __always_inline void read_ports(struct drop_key *key, const u8 *l4)
{
    if (key->protocol != IPPROTO_TCP && key->protocol != IPPROTO_UDP)
        return;
    __be16 ports[2];
    if (bpf_probe_read_kernel(ports, sizeof(ports), l4) == 0) {
        key->sport = bpf_ntohs(ports[0]);
        key->dport = bpf_ntohs(ports[1]);
    }
}

static __always_inline void read_endpoints(struct drop_key *key, const void *skb, u16 ethertype)
{
#ifdef SKB_HEAD_OFFSET
    const u8 *head = 0;
    u16 network = NETWORK_HEADER_UNSET;
    if (bpf_probe_read_kernel(&head, sizeof(head), (const u8 *)skb + SKB_HEAD_OFFSET) || !head)
        return;
    if (bpf_probe_read_kernel(&network, sizeof(network),
                              (const u8 *)skb + SKB_NETWORK_HEADER_OFFSET) ||
        network == NETWORK_HEADER_UNSET)
        return;
    const u8 *l3 = head + network;
    if (ethertype == ETHERTYPE_IP) {
        struct iphdr ip;
        if (bpf_probe_read_kernel(&ip, sizeof(ip), l3) || ip.version != 4 || ip.ihl < 5)
            return;
        key->family = 4;
        key->protocol = ip.protocol;
        __builtin_memcpy(key->saddr, &ip.saddr, 4);
        __builtin_memcpy(key->daddr, &ip.daddr, 4);
        if ((bpf_ntohs(ip.frag_off) & 0x1fff) == 0)    /* only a first fragment has ports */
            read_ports(key, l3 + ip.ihl * 4);
    } else {
        struct ipv6hdr ip6;
        if (bpf_probe_read_kernel(&ip6, sizeof(ip6), l3) || ip6.version != 6)
            return;
        key->family = 6;
        key->protocol = ip6.nexthdr;    /* extension headers are not walked: ports stay 0 */
        __builtin_memcpy(key->saddr, &ip6.saddr, 16);
        __builtin_memcpy(key->daddr, &ip6.daddr, 16);
        read_ports(key, l3 + sizeof(ip6));
    }
#endif
}

TRACEPOINT_PROBE(skb, kfree_skb)
{
    u32 reason = args->reason;
#ifdef NOT_A_DROP
    if (NOT_A_DROP(reason))
        return 0;           /* older kernels also passed consumed skbs through here */
#endif
    u32 zero = 0;
    u32 *gen = generation.lookup(&zero);
    struct drop_key key = {};
    key.generation = gen ? *gen : 0;
    key.reason = reason;
    u16 ethertype = args->protocol;    /* the tracepoint gives it in host byte order */
    if (ethertype == ETHERTYPE_IP || ethertype == ETHERTYPE_IPV6) {
        read_endpoints(&key, args->skbaddr, ethertype);   /* family stays 0 if unreadable */
    } else {
        key.protocol = DROP_PROTOCOL_NON_IP;
    }
    count_drop(&key);
    return 0;
}
