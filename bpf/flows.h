/* Flow accounting: bytes and packets per (family, protocol, addresses, ports), counted as on
 * the wire: a GSO/GRO aggregate counts as the packets it stands for.
 * The including program provides count_failure() and FAILURE_FLOWS (classifier.c). */
#ifndef EBPF_NET_FLOWS_H
#define EBPF_NET_FLOWS_H

#include "common.h"
#include "packet.h"

struct flow_key {
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
    /* packets in the low 62 bits, FLOW_SAW_* in the top two (they tell user space which end
     * is the server): 16 bytes per entry and CPU, not 24 */
    u64 packets_handshake;
};

/* bits of byte 13 of the TCP header */
#define TCPHDR_SYN 0x02
#define TCPHDR_ACK 0x10
/* FLOW_HANDSHAKE_SHIFT: where FLOW_SAW_* sit in packets_handshake, from
 * exporter/kernel/classifier.py (HANDSHAKE_SHIFT of exporter/collectors/flows.py, which reads
 * them) */
#ifndef FLOW_HANDSHAKE_SHIFT
#error "compile with exporter/kernel/classifier.py's flags (constant_flags)"
#endif
/* a SYN without ACK: the sender is the client; a SYN+ACK: the sender is the server */
#define FLOW_SAW_SYN (1ULL << FLOW_HANDSHAKE_SHIFT)
#define FLOW_SAW_SYNACK (2ULL << FLOW_HANDSHAKE_SHIFT)

static __always_inline u64 handshake_bits(u8 tcp_flags)
{
    if (!(tcp_flags & TCPHDR_SYN))
        return 0;
    return (tcp_flags & TCPHDR_ACK) ? FLOW_SAW_SYNACK : FLOW_SAW_SYN;
}

/* Flows seen within one scrape interval, in two maps: programs write the one flow_generation
 * names, user space drains the other (exporter/kernel/maps.py). A map no program writes any
 * more can be emptied with BPF_MAP_LOOKUP_AND_DELETE_BATCH, one pass over it, where a
 * generation in the key needed a read and then a delete of every key: half the drain's time.
 * Per-CPU values: shared ones with atomic adds cost 15-40 ns more per packet (measured). Two maps
 * of 16-byte values take 2 x 16 bytes per entry and possible CPU, one of 24-byte values took 24.
 * 65536 flows per interval covers a busy node at a 15 s interval; flows past it are not lost:
 * they are counted in flow_overflow by family and protocol and in map_update_failures.
 * Overridable. */
#ifndef FLOW_CAPACITY
#define FLOW_CAPACITY 65536
#endif
BPF_PERCPU_HASH(flows_0, struct flow_key, struct flow_value, FLOW_CAPACITY);
BPF_PERCPU_HASH(flows_1, struct flow_key, struct flow_value, FLOW_CAPACITY);

#ifdef WITH_ANSWERING_SERVERS
/* The server that answered each client's SYN, by the client's end: a connection to a
 * Service's ClusterIP is counted as the client addressed it (the node's DNAT comes after TC),
 * and its SYN+ACK, seen here before the DNAT is undone, names the backend it reached. User space
 * reads it for the zone of such connections (exporter/collectors/flows.py). LRU: the oldest
 * connections go first; 65536 covers the connections a busy node opens in a scrape interval. */
BPF_TABLE("lru_hash", struct client_end, struct server_end, answering_servers, 65536);

static __always_inline void remember_answering_server(const struct packet *pkt)
{
    struct client_end client = {};
    client_end_of(&client, pkt->family, pkt->dport, pkt->daddr);
    struct server_end server = {};
    server_end_of(&server, pkt->sport, pkt->saddr);
    answering_servers.update(&client, &server);
}
#endif

/* index = family_index * 4 + protocol_index (tcp, udp, icmp, other); handshake bits ignored */
BPF_PERCPU_ARRAY(flow_overflow, struct flow_value, 8);

/* The two flows a CPU counted last, with what it counted since: consecutive packets of a CPU
 * are mostly one flow's (a GSO train, a bulk transfer, a burst of datagrams) or alternate
 * between a flow's two directions (data and its ACKs, a request and its response, which the
 * forwarding of one softirq handles on one CPU). Adding to one of these cache lines costs a
 * key compare where the flows map costs a hash of the 40-byte key and a bucket walk (about
 * half of the classifier's time, profiled under TCP bulk). A flow is looked for first in the
 * way its ends prefer (preferred_way), where a connection's two directions prefer different
 * ones, so each packet of such a pair reads one line; then in the other. A flow in neither
 * takes its preferred way, or the other one when that is free; a packet of a third flow
 * moves the counts of the flow in its preferred way into the flows map first. Measured side by
 * side against a least-recently-used pair that read and wrote both lines for every packet:
 * TCP -13 ns per skb, UDP -3 ns per packet (4 pairs).
 * Two slots ("ways") per generation parity, at index parity * 2 + way, each stamped with the
 * full generation (which counts up): a drain takes the flows map and the slots of the
 * generation it flipped away from, which no program writes once the flip's grace period is
 * over, and a program that finds a slot stamped with an older generation takes it as empty,
 * since that drain took its counts. */
struct recent_flow {
    struct flow_key key;
    struct flow_value value;
    u32 generation;
    u32 pad;
};
BPF_PERCPU_ARRAY(recent_flows, struct recent_flow, 4);

static __always_inline u32 flow_overflow_index(const struct flow_key *key)
{
    u32 proto = 3;
    if (key->protocol == IPPROTO_TCP)
        proto = 0;
    else if (key->protocol == IPPROTO_UDP)
        proto = 1;
    else if (key->protocol == IPPROTO_ICMP || key->protocol == IPPROTO_ICMPV6)
        proto = 2;
    return (key->family == FAMILY_IPV6 ? 4 : 0) + proto;
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

#define FLOW_PACKETS_MASK ((1ULL << FLOW_HANDSHAKE_SHIFT) - 1)

/* Adds `counts` (a recent_flows slot's) to the flows map of `generation`: a new flow is inserted
 * with them; insert fails with EEXIST when another CPU created it meanwhile (then the lookup
 * finds it), E2BIG when the map is full (then flow_overflow takes them). */
static __always_inline void store_flow(const struct flow_key *key, const struct flow_value *counts,
                                       u32 generation)
{
    struct flow_value *value;
    if (generation & 1) {
        value = flows_1.lookup((struct flow_key *)key);
        if (!value) {
            if (flows_1.insert((struct flow_key *)key, (struct flow_value *)counts) == 0)
                return;
            value = flows_1.lookup((struct flow_key *)key);
        }
    } else {
        value = flows_0.lookup((struct flow_key *)key);
        if (!value) {
            if (flows_0.insert((struct flow_key *)key, (struct flow_value *)counts) == 0)
                return;
            value = flows_0.lookup((struct flow_key *)key);
        }
    }
    if (!value) {
        u32 idx = flow_overflow_index(key);
        value = flow_overflow.lookup(&idx);
        count_failure(FAILURE_FLOWS);
        if (!value)
            return;
    }
    value->bytes += counts->bytes;
    /* packets never reach bit 62 in one scrape interval: the add leaves the bits alone */
    value->packets_handshake = (value->packets_handshake + (counts->packets_handshake &
                                FLOW_PACKETS_MASK)) | (counts->packets_handshake &
                                ~FLOW_PACKETS_MASK);
}

static __always_inline int same_flow(const struct flow_key *a, const struct flow_key *b)
{
    const u64 *x = (const u64 *)a;
    const u64 *y = (const u64 *)b;
    return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) | (x[4] ^ y[4])) == 0;
}

/* Which way of its pair a flow is looked for in first: a function of its two ends that swaps
 * with them, so a connection's two directions (data and its ACKs, a request and its response,
 * which alternate on one CPU) prefer different ways and each packet finds its flow in the
 * first line it looks at. */
static __always_inline u32 preferred_way(const struct flow_key *key)
{
    const u64 *w = (const u64 *)key;
    u64 src = w[1] ^ w[2] ^ key->sport;
    u64 dst = w[3] ^ w[4] ^ key->dport;
    return src < dst ? 0 : 1;
}

static __always_inline void account_flow(struct __sk_buff *skb, const struct packet *pkt,
                                         u32 generation)
{
    u32 segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
    u64 bytes = wire_ip_bytes(skb, pkt, segs);
    u64 handshake = handshake_bits(pkt->tcp_flags);

    struct flow_key key = {};
    key.family = pkt->family;
    key.protocol = pkt->protocol;
    key.sport = pkt->sport;
    key.dport = pkt->dport;
    __builtin_memcpy(key.saddr, pkt->saddr, 16);
    __builtin_memcpy(key.daddr, pkt->daddr, 16);
    struct flow_value counts = {bytes, segs | handshake};

    /* what goes to the flows map, if anything: this packet's counts when no slot is found (an
     * array lookup does not fail, but the verifier wants the path), or a slot's evicted flow */
    const struct flow_key *moved_key = &key;
    const struct flow_value *moved = &counts;
    struct recent_flow evicted;
    u32 base = (generation & 1) * 2, way = preferred_way(&key);
    u32 first = base + way, second = base + (way ^ 1);
    struct recent_flow *a = recent_flows.lookup(&first);
    if (!a)
        goto move;
    int a_live = a->generation == generation && a->value.packets_handshake;
    if (a_live && same_flow(&a->key, &key)) {
        a->value.bytes += bytes;
        a->value.packets_handshake = (a->value.packets_handshake + segs) | handshake;
        return;
    }
    struct recent_flow *b = recent_flows.lookup(&second);
    if (!b)
        goto move;
    int b_live = b->generation == generation && b->value.packets_handshake;
    if (b_live && same_flow(&b->key, &key)) {
        b->value.bytes += bytes;
        b->value.packets_handshake = (b->value.packets_handshake + segs) | handshake;
        return;
    }
    /* a flow in neither: the preferred way, unless it holds a flow and the other is free */
    struct recent_flow *slot = a_live && !b_live ? b : a;
    int evicting = a_live && b_live;
    if (evicting)
        __builtin_memcpy(&evicted, slot, sizeof(evicted));
    slot->key = key;
    slot->value = counts;
    slot->generation = generation;
    if (!evicting)
        return;
    moved_key = &evicted.key;
    moved = &evicted.value;
move:
    store_flow(moved_key, moved, generation);
}

#endif
