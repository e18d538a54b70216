/* Parses the L2/L3/L4 headers of a packet seen by the TC classifier into struct packet.
 * Reads headers in the linear area directly (skb->data), and with bpf_skb_load_bytes when they
 * are not there, so they are still parsed. */
#ifndef EBPF_NET_PACKET_H
#define EBPF_NET_PACKET_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#define FAMILY_IPV4 4
#define FAMILY_IPV6 6

/* IPv6 extension headers walked to find the transport header; more is not seen in practice. */
#define MAX_IPV6_EXT_HEADERS 6
#define MAX_VLAN_TAGS 2

/* Interface flags, set by user space in monitored_ifaces. */
#define IFACE_ETHERNET 1    /* frames start with an Ethernet header (else with the IP header) */
#define IFACE_NETWORK 2     /* faces the network (uplink, overlay), not this node's pods */

enum parse_result {
    PARSE_OK = 0,
    PARSE_NOT_IP = 1,       /* ARP, LLDP, ...: not a flow */
    PARSE_MALFORMED = 2,    /* looked like IP but the headers do not hold together */
};

struct packet {
    u8 family;
    u8 protocol;            /* IPPROTO_* of the transport header (after IPv6 extension headers) */
    u8 tcp_flags;
    u8 has_ports;           /* 0 for non-first fragments and protocols without ports */
    u16 sport;              /* host byte order */
    u16 dport;
    u8 saddr[16];           /* IPv4 addresses take the first 4 bytes, the rest is zero */
    u8 daddr[16];
    u32 l3_off;
    u32 l4_off;
    u32 payload_off;
    u32 ip_len;             /* bytes of the IP packet as the headers say (one wire packet) */
    u32 tcp_seq;            /* host byte order */
    u32 hdr_len;            /* L3 + L4 header bytes, repeated in every segment of a GSO skb */
};

/* A packet's direction, (addresses, ports) as they appear in it: a key of maps that follow a
 * TCP stream one way (DNS over TCP, HTTP/2). */
struct packet_direction {
    u8 family;
    u8 pad;
    u16 sport;
    u16 dport;
    u16 pad2;
    u8 saddr[16];
    u8 daddr[16];
};

/* The packet's direction, or with `reverse` the opposite one. */
static __always_inline void direction_of(struct packet_direction *k, const struct packet *pkt,
                                         int reverse)
{
    k->family = pkt->family;
    k->sport = reverse ? pkt->dport : pkt->sport;
    k->dport = reverse ? pkt->sport : pkt->dport;
    __builtin_memcpy(k->saddr, reverse ? pkt->daddr : pkt->saddr, 16);
    __builtin_memcpy(k->daddr, reverse ? pkt->saddr : pkt->daddr, 16);
}

struct vlan_tag {
    __be16 tci;
    __be16 encapsulated_proto;
};

struct ipv6_ext_header {
    u8 nexthdr;
    u8 hdrlen;
    __be16 frag_off;        /* only meaningful for the fragment header */
};

/* Headers start within this many bytes of the frame: past it, always the helper (the bound
 * also lets the verifier accept the variable offset into the packet). */
#define DIRECT_LOAD_MAX_OFF 1024

/* Copies `len` bytes (a constant once inlined) of the packet at `off` into dst: from the
 * linear area when they are all there, a few word loads instead of a helper call; else
 * bpf_skb_load_bytes. Returns < 0 when the packet is too short. Unaligned loads are fine on the
 * architectures bcc runs on (the verifier checks alignment only with strict alignment). */
static __always_inline int load_header(struct __sk_buff *skb, u32 off, void *dst, u32 len)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    if (off > DIRECT_LOAD_MAX_OFF || data + off + len > data_end)
        return bpf_skb_load_bytes(skb, off, dst, len);
    const u8 *src = data + off;
    u8 *to = dst;
    u32 i = 0;
#pragma unroll
    for (int w = 0; w < 8; w++) {
        if (i + 8 <= len) {
            *(u64 *)(to + i) = *(const u64 *)(src + i);
            i += 8;
        }
    }
    if (i + 4 <= len) {
        *(u32 *)(to + i) = *(const u32 *)(src + i);
        i += 4;
    }
    if (i + 2 <= len) {
        *(u16 *)(to + i) = *(const u16 *)(src + i);
        i += 2;
    }
    if (i < len)
        to[i] = src[i];
    return 0;
}

/* A TCP header's ports, flags and sequence number into pkt; its length in bytes (the caller
 * rejects one under sizeof(struct tcphdr)). From a copy or from the packet itself. */
static __always_inline u32 take_tcp(const struct tcphdr *tcp, struct packet *pkt)
{
    pkt->sport = bpf_ntohs(tcp->source);
    pkt->dport = bpf_ntohs(tcp->dest);
    /* byte 13 of the TCP header holds the flags */
    pkt->tcp_flags = ((const u8 *)tcp)[13];
    pkt->tcp_seq = bpf_ntohl(tcp->seq);
    return tcp->doff * 4;
}

static __always_inline void take_udp(const struct udphdr *udp, struct packet *pkt)
{
    pkt->sport = bpf_ntohs(udp->source);
    pkt->dport = bpf_ntohs(udp->dest);
}

static __always_inline int parse_l4(struct __sk_buff *skb, struct packet *pkt)
{
    pkt->hdr_len = pkt->l4_off - pkt->l3_off;
    pkt->payload_off = pkt->l4_off;
    if (!pkt->has_ports)
        return PARSE_OK;
    if (pkt->protocol == IPPROTO_TCP) {
        struct tcphdr tcp;
        if (load_header(skb, pkt->l4_off, &tcp, sizeof(tcp)) < 0)
            return PARSE_MALFORMED;
        u32 doff = take_tcp(&tcp, pkt);
        if (doff < sizeof(tcp))
            return PARSE_MALFORMED;
        pkt->hdr_len += doff;
        pkt->payload_off += doff;
    } else if (pkt->protocol == IPPROTO_UDP) {
        struct udphdr udp;
        if (load_header(skb, pkt->l4_off, &udp, sizeof(udp)) < 0)
            return PARSE_MALFORMED;
        take_udp(&udp, pkt);
        pkt->hdr_len += sizeof(udp);
        pkt->payload_off += sizeof(udp);
    } else {
        pkt->has_ports = 0;
    }
    return PARSE_OK;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct packet *pkt)
{
    struct iphdr ip;
    if (load_header(skb, pkt->l3_off, &ip, sizeof(ip)) < 0)
        return PARSE_MALFORMED;
    u32 ihl = ip.ihl * 4;
    u32 tot_len = bpf_ntohs(ip.tot_len);
    if (ip.version != 4 || ihl < sizeof(ip))
        return PARSE_MALFORMED;
    /* A GSO/GRO aggregate may carry 0 or a stale total length: sized from skb->len later. */
    if (tot_len < ihl && skb->gso_segs <= 1)
        return PARSE_MALFORMED;
    pkt->family = FAMILY_IPV4;
    pkt->protocol = ip.protocol;
    pkt->ip_len = tot_len;
    __builtin_memcpy(pkt->saddr, &ip.saddr, 4);
    __builtin_memcpy(pkt->daddr, &ip.daddr, 4);
    pkt->l4_off = pkt->l3_off + ihl;
    /* Only the first fragment carries the transport header. */
    pkt->has_ports = (bpf_ntohs(ip.frag_off) & 0x1fff) == 0;
    return parse_l4(skb, pkt);
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, struct packet *pkt)
{
    struct ipv6hdr ip6;
    if (load_header(skb, pkt->l3_off, &ip6, sizeof(ip6)) < 0)
        return PARSE_MALFORMED;
    if (ip6.version != 6)
        return PARSE_MALFORMED;
    pkt->family = FAMILY_IPV6;
    pkt->ip_len = bpf_ntohs(ip6.payload_len) + sizeof(ip6);
    __builtin_memcpy(pkt->saddr, &ip6.saddr, 16);
    __builtin_memcpy(pkt->daddr, &ip6.daddr, 16);
    pkt->has_ports = 1;

    u8 next = ip6.nexthdr;
    u32 off = pkt->l3_off + sizeof(ip6);
#pragma unroll
    for (int i = 0; i < MAX_IPV6_EXT_HEADERS; i++) {
        if (next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING && next != IPPROTO_DSTOPTS &&
            next != IPPROTO_FRAGMENT && next != IPPROTO_AH)
            break;
        struct ipv6_ext_header ext;
        if (load_header(skb, off, &ext, sizeof(ext)) < 0)
            return PARSE_MALFORMED;
        if (next == IPPROTO_FRAGMENT) {
            if (bpf_ntohs(ext.frag_off) & 0xfff8)
                pkt->has_ports = 0;
            off += 8;
        } else if (next == IPPROTO_AH) {
            off += ((u32)ext.hdrlen + 2) * 4;
        } else {
            off += ((u32)ext.hdrlen + 1) * 8;
        }
        next = ext.nexthdr;
    }
    pkt->protocol = next;
    pkt->l4_off = off;
    return parse_l4(skb, pkt);
}

/* Copies `len` (<= 128) bytes of the packet at `off` into dst (128 bytes, in a map value): 8
 * bytes at a time, then byte by byte. Fixed-size loads keep the verifier's work small; one load
 * of a variable length made it follow every possible length through the rest of the program. */
static __always_inline void copy_bytes_128(struct __sk_buff *skb, u32 off, u32 len, u8 *dst)
{
    u32 done = 0;
#pragma clang loop unroll(disable)
    for (int i = 0; i < 16; i++) {
        if (done + 8 > len)
            break;
        bpf_skb_load_bytes(skb, off + done, dst + (done & 120), 8);
        done += 8;
    }
#pragma clang loop unroll(disable)
    for (int i = 0; i < 7; i++) {
        if (done >= len)
            break;
        bpf_skb_load_bytes(skb, off + done, dst + (done & 127), 1);
        done += 1;
    }
}

/* The usual frames in one straight read: Ethernet, then IPv4 without options and not a fragment
 * or IPv6 without extension headers, then TCP or UDP, all of it in the linear area. Constant
 * offsets from skb->data: no bounds to follow per header and few branches, where the general
 * parser below reloads the packet's bounds for each header and carries every path's state.
 * Under TCP bulk the classifier runs with its lines out of the cache, and this saved some 30 ns
 * per skb (benchmarks.compare --side-by-side). 1 when pkt is filled, 0 when the frame is
 * anything else: the general parser reads it then, and decides on malformed ones. */
#define FAST_IPV4_L4 (sizeof(struct ethhdr) + sizeof(struct iphdr))
#define FAST_IPV6_L4 (sizeof(struct ethhdr) + sizeof(struct ipv6hdr))

/* The ports (and for TCP the flags and sequence number) of the header at l4; 0 when it is
 * neither TCP nor UDP, or a TCP header says it is shorter than it is. */
static __always_inline int parse_fast_l4(void *l4, u8 protocol, struct packet *pkt, u32 l3_len)
{
    if (protocol == IPPROTO_TCP) {
        struct tcphdr *tcp = l4;
        if (tcp->doff * 4 < sizeof(*tcp))
            return 0;           /* pkt untouched; the general parser calls it malformed */
        pkt->hdr_len = l3_len + take_tcp(tcp, pkt);
    } else if (protocol == IPPROTO_UDP) {
        take_udp(l4, pkt);
        pkt->hdr_len = l3_len + sizeof(struct udphdr);
    } else {
        return 0;
    }
    pkt->protocol = protocol;
    pkt->has_ports = 1;
    pkt->l3_off = sizeof(struct ethhdr);
    pkt->l4_off = sizeof(struct ethhdr) + l3_len;
    pkt->payload_off = sizeof(struct ethhdr) + pkt->hdr_len;
    return 1;
}

static __always_inline int parse_fast(struct __sk_buff *skb, struct packet *pkt)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    /* room for a TCP header without options: enough for UDP too */
    if (data + FAST_IPV4_L4 + sizeof(struct tcphdr) > data_end)
        return 0;
    struct ethhdr *eth = data;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = data + sizeof(*eth);
        if (*(u8 *)ip != 0x45 || (ip->frag_off & bpf_htons(0x3fff)))
            return 0;               /* options, or a fragment */
        u32 tot_len = bpf_ntohs(ip->tot_len);
        if (tot_len < sizeof(*ip))
            return 0;
        if (!parse_fast_l4(data + FAST_IPV4_L4, ip->protocol, pkt, sizeof(*ip)))
            return 0;
        pkt->family = FAMILY_IPV4;
        pkt->ip_len = tot_len;
        __builtin_memcpy(pkt->saddr, &ip->saddr, 4);
        __builtin_memcpy(pkt->daddr, &ip->daddr, 4);
        return 1;
    }
    if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        if (data + FAST_IPV6_L4 + sizeof(struct tcphdr) > data_end)
            return 0;
        struct ipv6hdr *ip6 = data + sizeof(*eth);
        if (ip6->version != 6)
            return 0;
        if (!parse_fast_l4(data + FAST_IPV6_L4, ip6->nexthdr, pkt, sizeof(*ip6)))
            return 0;               /* an extension header, or another protocol */
        pkt->family = FAMILY_IPV6;
        pkt->ip_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
        __builtin_memcpy(pkt->saddr, &ip6->saddr, 16);
        __builtin_memcpy(pkt->daddr, &ip6->daddr, 16);
        return 1;
    }
    return 0;
}

/* Fills pkt from the packet in skb. `iface_flags` says whether frames carry Ethernet headers. */
static __always_inline int parse_packet(struct __sk_buff *skb, u32 iface_flags, struct packet *pkt)
{
    if ((iface_flags & IFACE_ETHERNET) && parse_fast(skb, pkt))
        return PARSE_OK;
    __be16 proto = skb->protocol;
    u32 off = 0;
    if (iface_flags & IFACE_ETHERNET) {
        struct ethhdr eth;
        if (load_header(skb, 0, &eth, sizeof(eth)) < 0)
            return PARSE_NOT_IP;
        proto = eth.h_proto;
        off = sizeof(eth);
#pragma unroll
        for (int i = 0; i < MAX_VLAN_TAGS; i++) {
            if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
                break;
            struct vlan_tag tag;
            if (load_header(skb, off, &tag, sizeof(tag)) < 0)
                return PARSE_MALFORMED;
            proto = tag.encapsulated_proto;
            off += sizeof(tag);
        }
    }
    pkt->l3_off = off;
    if (proto == bpf_htons(ETH_P_IP))
        return parse_ipv4(skb, pkt);
    if (proto == bpf_htons(ETH_P_IPV6))
        return parse_ipv6(skb, pkt);
    return PARSE_NOT_IP;
}

#endif
