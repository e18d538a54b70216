/* Counting once per cluster (-DONCE_PER_CLUSTER): every node runs an exporter and users sum
 * over them, so a packet or an exchange that another node's exporter counts is not counted
 * here too.
 *
 * - A packet is counted by the node that sends it into the network: a pod's packet on ingress
 *   of its pod-facing interface, the node's own packet on egress. One that arrives from the
 *   network (ingress of an interface user space marked IFACE_NETWORK: an uplink, an overlay
 *   device; or egress of a pod-facing interface it was forwarded to from an interface not
 *   monitored) is left alone when its source is an address of another node whose exporter
 *   counted it on the way out.
 * - A DNS or HTTP exchange is counted by the client's node; when the client is an address of
 *   another node with an exporter, this node neither counts it nor remembers it in
 *   dns_pending or http_conns.
 *
 * cluster_addresses says whose an address is. User space fills it from the Kubernetes API
 * (every node's addresses and pod CIDRs, every pod's address) or from cluster.cidrs, and keeps
 * it current; an address it does not hold is outside the cluster and counted here. */
#ifndef EBPF_NET_CLUSTER_H
#define EBPF_NET_CLUSTER_H

#include "common.h"
#include "packet.h"

/* values of cluster_addresses (exporter/kernel/clustermap.py) */
#define ADDRESS_LOCAL 1             /* this node's own, or one of its pods' */
#define ADDRESS_COUNTED_ELSEWHERE 2 /* another node's, whose exporter counts what it sends */
#define ADDRESS_NO_EXPORTER 3       /* another node's without an exporter: counted here */

/* IPv4 addresses are keyed as IPv4-mapped IPv6 (::ffff:a.b.c.d), so one trie holds both. */
struct cluster_key {
    u32 prefixlen;
    u8 addr[16];
};
/* Nodes' addresses and pod CIDRs, and pods' addresses (CNIs without pod CIDRs give pods
 * addresses from anywhere): 65536 holds a 5000-node cluster's nodes and some 50000 pods.
 * Entries are allocated as they are added. Overridable (maps.cluster_address_capacity). */
#ifndef CLUSTER_ADDRESS_CAPACITY
#define CLUSTER_ADDRESS_CAPACITY 65536
#endif
BPF_F_TABLE("lpm_trie", struct cluster_key, u8, cluster_addresses, CLUSTER_ADDRESS_CAPACITY,
            BPF_F_NO_PREALLOC);

/* What this node left to the node that counts it: one per-CPU entry, so a packet's two
 * counts take one lookup. */
struct left_counts {
    u64 flow_packets;
    u64 flow_bytes;
    u64 dns_queries;
    u64 http_requests;
};
BPF_PERCPU_ARRAY(counted_elsewhere, struct left_counts, 1);

static __always_inline struct left_counts *left_counts(void)
{
    u32 zero = 0;
    return counted_elsewhere.lookup(&zero);
}

/* Whether `addr` belongs to another node whose exporter counts what that address sends. */
static __always_inline int counted_by_its_node(u8 family, const u8 *addr)
{
    struct cluster_key key = {};
    key.prefixlen = 128;
    if (family == FAMILY_IPV4) {
        key.addr[10] = 0xff;
        key.addr[11] = 0xff;
        __builtin_memcpy(key.addr + 12, addr, 4);
    } else {
        __builtin_memcpy(key.addr, addr, 16);
    }
    u8 *owner = cluster_addresses.lookup(&key);
    return owner && *owner == ADDRESS_COUNTED_ELSEWHERE;
}

#endif
