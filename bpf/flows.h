/* Flow accounting: bytes and packets per (generation, family, protocol, addresses, ports),
 * counted as on the wire: a GSO/GRO aggregate counts as the packets it stands for.
 * The including program provides count_failure() and FAILURE_FLOWS (classifier.c). */
#ifndef EBPF_NET_FLOWS_H
#define EBPF_NET_FLOWS_H

#include "common.h"
#include "packet.h"

struct flow_key {
    u32 generation;
    u8 family;
    u8 protocol;
    u16 sport;
    u16 dport;
    u16 pad;
    u8 saddr[16];
    u8 daddr[16];
};

struct flow_value {
    u64 bytes;
    u64 packets;
    u64 handshake;          /* FLOW_SAW_*: tells user space which end is the server */
};

/* bits of byte 13 of the TCP header */
#define TCPHDR_SYN 0x02
#define TCPHDR_ACK 0x10
#define FLOW_SAW_SYN 1          /* a SYN without ACK: the sender is the client */
#define FLOW_SAW_SYNACK 2       /* a SYN+ACK: the sender is the server */

static __always_inline u64 handshake_bits(u8 tcp_flags)
{
    if (!(tcp_flags & TCPHDR_SYN))
        return 0;
    return (tcp_flags & TCPHDR_ACK) ? FLOW_SAW_SYNACK : FLOW_SAW_SYN;
}

/* Flows seen within one scrape interval (the map is drained every scrape). 65536 flows per
 * interval covers a busy node at a 15 s interval; flows past it are not lost: they are counted
 * in flow_overflow by family and protocol and in map_update_failures. Overridable. */
#ifndef FLOW_CAPACITY
#define FLOW_CAPACITY 65536
#endif
BPF_PERCPU_HASH(flows, struct flow_key, struct flow_value, FLOW_CAPACITY);

/* index = family_index * 4 + protocol_index (tcp, udp, icmp, other) */
BPF_PERCPU_ARRAY(flow_overflow, struct flow_value, 8);

static __always_inline u32 flow_overflow_index(const struct packet *pkt)
{
    u32 proto = 3;
    if (pkt->protocol == IPPROTO_TCP)
        proto = 0;
    else if (pkt->protocol == IPPROTO_UDP)
        proto = 1;
    else if (pkt->protocol == IPPROTO_ICMP || pkt->protocol == IPPROTO_ICMPV6)
        proto = 2;
    return (pkt->family == FAMILY_IPV6 ? 4 : 0) + proto;
}

/* Bytes of the IP packets this skb stands for on the wire. */
static __always_inline u64 wire_ip_bytes(struct __sk_buff *skb, const struct packet *pkt, u32 segs)
{
    u32 in_skb = skb->len > pkt->l3_off ? skb->len - pkt->l3_off : 0;
    if (segs > 1)
        /* headers are repeated in every segment but present once in the aggregate */
        return (u64)in_skb + (u64)(segs - 1) * pkt->hdr_len;
    /* one packet: trust the IP length, but never past the bytes present (link padding) */
    return pkt->ip_len < in_skb ? pkt->ip_len : in_skb;
}

static __always_inline void account_flow(struct __sk_buff *skb, const struct packet *pkt,
                                         u32 generation)
{
    u32 segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
    u64 bytes = wire_ip_bytes(skb, pkt, segs);

    struct flow_key key = {};
    key.generation = generation;
    key.family = pkt->family;
    key.protocol = pkt->protocol;
    key.sport = pkt->sport;
    key.dport = pkt->dport;
    __builtin_memcpy(key.saddr, pkt->saddr, 16);
    __builtin_memcpy(key.daddr, pkt->daddr, 16);

    struct flow_value *value = flows.lookup(&key);
    if (!value) {
        struct flow_value init = {};
        /* fails with EEXIST when another CPU created it meanwhile, E2BIG when full */
        flows.insert(&key, &init);
        value = flows.lookup(&key);
    }
    if (!value) {
        u32 idx = flow_overflow_index(pkt);
        value = flow_overflow.lookup(&idx);
        count_failure(FAILURE_FLOWS);
        if (!value)
            return;
    }
    value->bytes += bytes;
    value->packets += segs;
    value->handshake |= handshake_bits(pkt->tcp_flags);
}

#endif
