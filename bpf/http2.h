/* HTTP/2 in clear (h2c) in the TC classifier: the frames of each connection direction are
 * walked in the kernel, and the few that matter are handed to user space, which decodes the
 * header blocks with the connection's HPACK tables (exporter/decoding/http2.py) and pairs streams.
 *
 * A connection is HTTP/2 from the client's preface ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", the
 * first bytes of its first payload, h2_begin): both directions get a walk state in h2_dirs and
 * their http_starts entries the H2 mark, so that every later segment of theirs comes to
 * parse_http2. The client's walk starts after the preface; the server's at the start of its
 * next segment, which must hold a plausible frame header (its preface is a SETTINGS frame).
 *
 * A walk follows TCP sequence numbers: a segment that ends before next_seq (a
 * retransmission) is skipped, one that overlaps is walked from next_seq on, and one that starts
 * past it (bytes the node never saw) loses the direction's place (h2_lose, bpf/http2_walk.h,
 * which walks the frames and hands the ones that matter over). Frames split across segments
 * and many frames in one segment are walked alike.
 *
 * A run walks H2_STEPS frame steps (a frame header, or up to H2_CHUNK bytes of a handed-over
 * payload, or the whole skipped payload in the segment); for more, parse_http2 tail-calls
 * itself with the position in h2_walks. A segment still not walked when the kernel's tail-call
 * limit stops it (some 2000 steps: 700 small frames in one GSO skb) loses the direction's
 * place, counted as a parse error. */
#ifndef EBPF_NET_HTTP2_H
#define EBPF_NET_HTTP2_H

#include "common.h"
#include "packet.h"

#define H2_STEPS 64
#define H2_LOAD(src, off, dst, len) bpf_skb_load_bytes((src)->skb, (src)->base + (off), dst, len)
#include "http2_walk.h"

/* return values of h2_parse */
#define H2_DONE 0
#define H2_MORE 1           /* tail-call parse_http2 again for the rest of the segment */
#define H2_NO_STATE 2       /* the direction has no walk state: stop sending its segments */
#define H2_ENDED 3          /* the connection ended: likewise for both directions */

/* Directions walked at once (two per connection); LRU: a connection that lost its state to
 * newer ones sends H2_RECORD_LOST with its next segment. */
#ifndef H2_DIR_CAPACITY
#define H2_DIR_CAPACITY 16384
#endif


BPF_TABLE("lru_hash", struct packet_direction, struct h2_dir, h2_dirs, H2_DIR_CAPACITY);
/* The server each client end opened an HTTP/2 connection to, as the client addressed it: the
 * replies of a connection to a Service's ClusterIP whose backend is on this node (or whose
 * replies cross a monitored network interface) come from the backend's address, before the
 * DNAT is undone. Their direction is adopted by h2_adopt_reply when its first payload passes. */
BPF_TABLE("lru_hash", struct client_end, struct server_end, h2_clients,
          H2_DIR_CAPACITY / 2);

/* The connection a direction's records name: the client and the server as the client
 * addressed it (d->server, before a DNAT); for a direction with no state, the sender's view. */
static __always_inline void h2_ends_of(struct http_conn_key *e,
                                       const struct packet_direction *k, const struct h2_dir *d)
{
    e->family = k->family;
    if (d->from_server == H2_SIDE_UNKNOWN) {
        e->client_port = k->sport;
        e->server_port = k->dport;
        __builtin_memcpy(e->client, k->saddr, 16);
        __builtin_memcpy(e->server, k->daddr, 16);
        return;
    }
    int server = d->from_server == 1;
    e->client_port = server ? k->dport : k->sport;
    e->server_port = d->server_port;
    __builtin_memcpy(e->client, server ? k->daddr : k->saddr, 16);
    __builtin_memcpy(e->server, d->server, 16);
}

/* Called for a segment of a direction with the H2 mark (and, resumed, by parse_http2's own
 * tail calls); H2_MORE when the segment is not all walked yet (the position is saved in
 * h2_walks). */
static __always_inline int h2_parse(struct __sk_buff *skb, const struct packet *pkt)
{
    u32 zero = 0;
    struct h2_walk *w = h2_walks.lookup(&zero);
    if (!w)
        return H2_DONE;
    int resumed = w->resume;
    w->resume = 0;
    struct packet_direction k = {};
    direction_of(&k, pkt, 0);
    u64 now = bpf_ktime_get_ns();
    u32 payload = http_payload_bytes(skb, pkt);
    struct h2_src src = {.skb = skb, .base = pkt->payload_off};
    struct http_conn_key e = {};
    struct h2_dir *d = h2_dirs.lookup(&k);
    if (!d) {
        /* the state went to newer connections (LRU): user space finds the connection either
         * way round from the sender's view */
        if (payload == 0 && !http_ends(pkt))
            return H2_DONE;
        struct h2_dir gone = {};
        gone.from_server = H2_SIDE_UNKNOWN;
        h2_ends_of(&e, &k, &gone);
        h2_emit(&src, &e, &gone, http_ends(pkt) ? H2_RECORD_END : H2_RECORD_LOST, 0, 0, 0, now);
        return H2_NO_STATE;
    }
    h2_ends_of(&e, &k, d);
    d->last_seen_ns = now;
    if (!resumed && payload > 0) {
        u32 seq = pkt->tcp_seq;
        if (d->state != H2_DIR_SYNCED) {        /* (re)start at this segment's start */
            d->next_seq = seq;
            d->header_have = 0;
        }
        s32 ahead = (s32)(seq - d->next_seq);
        if ((s32)(seq + payload - d->next_seq) <= 0) {
            w->off = payload;                   /* a retransmission: all walked before */
        } else if (ahead > 0) {
            h2_lose(&src, &e, d, now);          /* bytes before it never came by */
            w->off = 0;                         /* ... this one may start a frame */
            d->next_seq = seq + payload;
        } else {
            w->off = (u32)(-ahead);
            d->next_seq = seq + payload;
        }
    } else if (!resumed) {
        w->off = payload;
    }
    h2_walk_steps(&src, &e, d, w, payload, now);
    if (w->off < payload) {
        w->resume = 1;
        return H2_MORE;
    }
    if (!http_ends(pkt))
        return H2_DONE;
    /* the connection ends: END from the direction whose delete succeeds (the other, keyed by
     * other addresses after a DNAT, may still be there: user space takes the first END) */
    struct h2_dir ending = {};
    __builtin_memcpy(&ending, d, sizeof(ending));
    if (h2_dirs.delete(&k) != 0)
        return H2_ENDED;
    struct packet_direction other = {};
    direction_of(&other, pkt, 1);
    h2_dirs.delete(&other);
    h2_emit(&src, &e, &ending, H2_RECORD_END, 0, 0, 0, now);
    return H2_ENDED;
}

/* The segment could not be walked to its end (the tail-call limit): its direction is lost. */
static __always_inline void h2_unwalked(struct __sk_buff *skb, const struct packet *pkt)
{
    u32 zero = 0;
    struct h2_walk *w = h2_walks.lookup(&zero);
    if (w)
        w->resume = 0;
    struct packet_direction k = {};
    direction_of(&k, pkt, 0);
    struct h2_dir *d = h2_dirs.lookup(&k);
    if (!d)
        return;
    struct h2_src src = {.skb = skb, .base = pkt->payload_off};
    struct http_conn_key e = {};
    h2_ends_of(&e, &k, d);
    h2_lose(&src, &e, d, bpf_ktime_get_ns());
}

/* Whether the walk follows the packet's direction. */
static __always_inline int h2_followed(const struct packet *pkt)
{
    struct packet_direction k = {};
    direction_of(&k, pkt, 0);
    return h2_dirs.lookup(&k) != 0;
}

/* The first payload of a direction that cannot be HTTP/1: when it goes to a client end that
 * opened an HTTP/2 connection to another address (a Service's ClusterIP), it is that
 * connection's server, seen before the DNAT is undone: its direction gets a walk state that
 * names the server as the client addressed it. 1 when adopted. */
static __always_inline int h2_adopt_reply(const struct packet *pkt)
{
    struct client_end client = {};
    client_end_of(&client, pkt->family, pkt->dport, pkt->daddr);
    struct server_end *addressed = h2_clients.lookup(&client);
    if (!addressed)
        return 0;
    const u64 *was = (const u64 *)addressed->addr, *is = (const u64 *)pkt->saddr;
    if (addressed->port == pkt->sport && was[0] == is[0] && was[1] == is[1])
        return 0;               /* no DNAT: the preface made this direction's state */
    struct packet_direction k = {};
    k.family = pkt->family;
    k.sport = pkt->dport;
    k.dport = addressed->port;
    __builtin_memcpy(k.saddr, pkt->daddr, 16);
    __builtin_memcpy(k.daddr, addressed->addr, 16);
    if (!h2_dirs.lookup(&k))
        return 0;               /* its client's direction is gone */
    struct h2_dir d = {};
    d.last_seen_ns = bpf_ktime_get_ns();
    d.state = H2_DIR_UNSYNCED;
    d.from_server = 1;
    d.server_port = addressed->port;
    __builtin_memcpy(d.server, addressed->addr, 16);
    direction_of(&k, pkt, 0);
    return h2_dirs.update(&k, &d) == 0;
}

/* Whether the segment starts with what an HTTP/2 server sends first: a SETTINGS frame on
 * stream 0, not an acknowledgement. */
static __always_inline int h2_server_preface(struct __sk_buff *skb, const struct packet *pkt)
{
    u8 h[H2_FRAME_HEADER_BYTES];
    if (bpf_skb_load_bytes(skb, pkt->payload_off, h, H2_FRAME_HEADER_BYTES) < 0)
        return 0;
    u32 len = (u32)h[0] << 16 | (u32)h[1] << 8 | h[2];
    return h[3] == H2_FRAME_SETTINGS && h[4] == 0 && len % 6 == 0 && len <= 6 * 16 &&
           h[5] == 0 && h[6] == 0 && h[7] == 0 && h[8] == 0;
}


#endif
