/* The TC classifier of ebpf-net-exporter, attached to clsact ingress and egress of every
 * monitored interface. It never changes a packet's fate (always TC_ACT_UNSPEC).
 *
 * Counting once per node: a packet forwarded between two monitored interfaces
 * (pod A -> veth A -> routing/bridge -> veth B -> pod B) is seen on ingress of veth A and on
 * egress of veth B. It is counted on ingress; on egress, a packet whose ingress_ifindex is a
 * monitored interface was already counted and is skipped.
 *
 * Protocol parsers run as tail calls (parse_dns, parse_http), each a program of its own that the
 * verifier checks on its own: in one program the paths of flows, DNS and HTTP multiply past
 * the verifier's limit. The classifier leaves the parsed headers in packet_scratch for them. */
#include <uapi/linux/pkt_cls.h>
#include "common.h"

/* The slots of map_update_failures (FAILURE_FLOWS, ...), of parse_errors (PARSE_ERROR_IP, ...)
 * and of the parsers array (PARSER_DNS, ...), and FLOW_HANDSHAKE_SHIFT, come from
 * exporter/kernel/classifier.py as -D flags: one list, which also labels what user space reads. */
#if !defined(FAILURE_COUNT) || !defined(PARSE_ERROR_COUNT) || !defined(PARSER_COUNT)
#error "compile with exporter/kernel/classifier.py's flags (constant_flags)"
#endif
BPF_PERCPU_ARRAY(map_update_failures, u64, FAILURE_COUNT);
BPF_PERCPU_ARRAY(parse_errors, u64, PARSE_ERROR_COUNT);

/* Each collector drains its own maps under its own generation (see common.h): one that two
 * collectors flipped in turn would leave the second reading the generation still written. */
BPF_ARRAY(flow_generation, u32, 1);

#include "counters.h"

struct iface_info {
    u32 flags;              /* IFACE_* */
};
/* Interfaces this exporter monitors, written by user space on attach/detach
 * (exporter/kernel/iface_slots.py). Looked up on every packet (twice for a forwarded one on
 * egress), so first in a direct-mapped array indexed by the ifindex's low bits, a hit only when
 * the slot holds that very ifindex: an array lookup is an index, a hash lookup hashes and compares
 * the key. Two monitored interfaces with the same low bits: the second goes to the hash
 * monitored_ifaces, and the slot's `collided` says the hash is worth a look. 16384 covers the
 * densest nodes (one veth per pod); an interface past it is not attached and the exporter logs
 * it. IFACE_SLOTS must be a power of two; user space reads it as the array's size. */
#ifndef IFACE_SLOTS
#define IFACE_SLOTS 4096
#endif
struct iface_slot {
    u32 ifindex;            /* 0: empty (no interface has ifindex 0) */
    u16 flags;              /* IFACE_* */
    u16 collided;           /* another ifindex with these low bits is in monitored_ifaces */
};
BPF_ARRAY(iface_slots, struct iface_slot, IFACE_SLOTS);
BPF_HASH(monitored_ifaces, u32, struct iface_info, 16384);

/* 1 and the interface's flags when `ifindex` is monitored, else 0. */
static __always_inline int monitored(u32 ifindex, u32 *flags)
{
    u32 slot = ifindex & (IFACE_SLOTS - 1);
    struct iface_slot *entry = iface_slots.lookup(&slot);
    if (!entry)
        return 0;
    if (entry->ifindex == ifindex) {
        *flags = entry->flags;
        return 1;
    }
    if (!entry->collided)
        return 0;
    struct iface_info *info = monitored_ifaces.lookup(&ifindex);
    if (!info)
        return 0;
    *flags = info->flags;
    return 1;
}

#include "packet.h"
#ifdef ONCE_PER_CLUSTER
#include "cluster.h"
#endif
/* the live view's records (-DWITH_EVENTS); never in the exporter's programs */
#ifdef WITH_EVENTS
#include "events.h"
#endif
/* each part is compiled in only when its collector is on: -DWITH_FLOWS, -DWITH_DNS, -DWITH_HTTP
 * (and -DWITH_HTTP2 with it unless http.http2 is off) */
#ifdef WITH_FLOWS
#include "flows.h"
#endif
#ifdef WITH_DNS
#include "dns.h"
#endif
#ifdef WITH_HTTP
#include "http_packets.h"
#endif

/* filled by user space with the parse_* programs, at PARSER_DNS, PARSER_HTTP, PARSER_HTTP2 */
BPF_PROG_ARRAY(parsers, PARSER_COUNT);
BPF_PERCPU_ARRAY(packet_scratch, struct packet, 1);

static __always_inline int classify(struct __sk_buff *skb, int egress)
{
    /* a forwarded packet first: one lookup instead of two on the node's busiest path */
    u32 flags = 0;
    if (egress && skb->ingress_ifindex && monitored(skb->ingress_ifindex, &flags))
        return TC_ACT_UNSPEC;   /* counted when it came in */
    if (!monitored(skb->ifindex, &flags))
        return TC_ACT_UNSPEC;   /* a filter left behind on an interface no longer monitored */

    struct packet pkt = {};
    int res = parse_packet(skb, flags, &pkt);
    if (res == PARSE_NOT_IP)
        return TC_ACT_UNSPEC;
    if (res == PARSE_MALFORMED) {
        count_parse_error(PARSE_ERROR_IP);
        return TC_ACT_UNSPEC;
    }

    u32 zero = 0;
#ifdef WITH_FLOWS
#ifdef WITH_ANSWERING_SERVERS
    /* before the once-per-cluster skip: the SYN+ACK of this node's client is sent by the
     * server's node, and arrives here from the network */
    if (pkt.protocol == IPPROTO_TCP &&
        (pkt.tcp_flags & (TCPHDR_SYN | TCPHDR_ACK)) == (TCPHDR_SYN | TCPHDR_ACK))
        remember_answering_server(&pkt);
#endif
#ifdef ONCE_PER_CLUSTER
    /* arrived from the network (on ingress of an interface facing it, or forwarded to this
     * egress from an interface not monitored, such as an uplink left out of
     * interfaces.include), sent by a node that counted it on the way out: only the parsers
     * below still look at it (the exchange may be this node's client's) */
    int from_network = egress ? skb->ingress_ifindex != 0 : (flags & IFACE_NETWORK) != 0;
    if (from_network && counted_by_its_node(pkt.family, pkt.saddr)) {
        struct left_counts *left = left_counts();
        if (left) {
            u32 segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
            left->flow_packets += segs;
            left->flow_bytes += wire_ip_bytes(skb, &pkt, segs);
        }
    } else
#endif
    {
        u32 *gen = flow_generation.lookup(&zero);
        account_flow(skb, &pkt, gen ? *gen : 0);
    }
#endif
    if (!pkt.has_ports)
        return TC_ACT_UNSPEC;
    /* the packet is handed to a parser through packet_scratch, filled only when a parser
     * runs: most UDP packets go to none. A tail call does not return when it happens; when it
     * does not (no such parser), the next line runs */
    int parser = -1;
#ifdef WITH_DNS
    if (DNS_PORT(pkt.sport) || DNS_PORT(pkt.dport))
        parser = PARSER_DNS;
#endif
#ifdef WITH_HTTP
    /* only a segment that can matter to HTTP: most TCP segments are not copied and tail-called */
    if (parser < 0 && pkt.protocol == IPPROTO_TCP) {
        int want = http_wanted(skb, &pkt);
        if (want == HTTP_WANT_HTTP)
            parser = PARSER_HTTP;
        else if (want == HTTP_WANT_HTTP2)
            parser = PARSER_HTTP2;
    }
#endif
    if (parser < 0)
        return TC_ACT_UNSPEC;
    struct packet *shared = packet_scratch.lookup(&zero);
    if (!shared)
        return TC_ACT_UNSPEC;
    __builtin_memcpy(shared, &pkt, sizeof(pkt));
    parsers.call(skb, parser);
    return TC_ACT_UNSPEC;
}

int classify_ingress(struct __sk_buff *skb)
{
    return classify(skb, 0);
}

int classify_egress(struct __sk_buff *skb)
{
    return classify(skb, 1);
}

#ifdef WITH_DNS
int parse_dns(struct __sk_buff *skb)
{
    u32 zero = 0;
    struct packet *pkt = packet_scratch.lookup(&zero);
    if (pkt)
        account_dns(skb, pkt);
    return TC_ACT_UNSPEC;
}
#endif

#ifdef WITH_HTTP
int parse_http(struct __sk_buff *skb)
{
    u32 zero = 0;
    struct packet *pkt = packet_scratch.lookup(&zero);
    if (pkt && account_http(skb, pkt))
        parsers.call(skb, PARSER_HTTP2);    /* an HTTP/2 preface: walk the frames after it */
    return TC_ACT_UNSPEC;
}
#endif

#ifdef WITH_HTTP2
/* The frames of an HTTP/2 segment (bpf/http2.h); tail-calls itself while the segment has more
 * than one run walks. */
int parse_http2(struct __sk_buff *skb)
{
    u32 zero = 0;
    struct packet *pkt = packet_scratch.lookup(&zero);
    if (!pkt || !http2_segment(skb, pkt))
        return TC_ACT_UNSPEC;
    parsers.call(skb, PARSER_HTTP2);
    h2_unwalked(skb, pkt);      /* the tail-call limit: the rest of the segment is not walked */
    return TC_ACT_UNSPEC;
}
#endif
