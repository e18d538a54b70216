/* HTTP/1.x in the TC classifier: the messages of bpf/http.h read from TCP segments, in both
 * directions.
 *
 * A connection is keyed by its packets' endpoints. When the server closes (FIN) or either end
 * resets, requests still queued are counted with status "none". A retransmitted segment (TCP
 * resends a request after a tail-loss probe, say) is recognised by its sequence number, which
 * lies before the end of the last request (or response) segment seen on the connection, and
 * not counted again. http_starts spares the segments of connections known not to be HTTP. */
#ifndef EBPF_NET_HTTP_PACKETS_H
#define EBPF_NET_HTTP_PACKETS_H

#include "common.h"
#include "packet.h"
#include "http.h"

#define HTTP_TCP_FIN 0x01
#define HTTP_TCP_RST 0x04
#define HTTP_TCP_SYN 0x02

/* HTTP_PORT(p): whether p is one of http.ports (every port when the list is empty) */
#ifndef HTTP_PORT
#define HTTP_PORT(p) (1)
#endif

/* Whether a segment [seq, seq + len) starts before the end of the last one seen (so it is a
 * retransmission); remembers its end otherwise. Compared modulo 2^32, as TCP does. */
static __always_inline int http_retransmitted(u32 *seen, u32 flag, u32 *seq_end, u32 seq,
                                              u32 len)
{
    if ((*seen & flag) && (s32)(seq - *seq_end) < 0)
        return 1;
    *seen |= flag;
    *seq_end = seq + len;
    return 0;
}

static __always_inline void http_conn_key_of(struct http_conn_key *ck, const struct packet *pkt,
                                             int sender_is_client)
{
    ck->family = pkt->family;
    if (sender_is_client) {
        ck->client_port = pkt->sport;
        ck->server_port = pkt->dport;
        __builtin_memcpy(ck->client, pkt->saddr, 16);
        __builtin_memcpy(ck->server, pkt->daddr, 16);
    } else {
        ck->client_port = pkt->dport;
        ck->server_port = pkt->sport;
        __builtin_memcpy(ck->client, pkt->daddr, 16);
        __builtin_memcpy(ck->server, pkt->saddr, 16);
    }
}

static __always_inline void http_request(struct http_scratch *s, const struct packet *pkt,
                                         u8 method, u64 now, u32 len)
{
    http_take_path(s);
    struct http_conn_key ck = {};
    http_conn_key_of(&ck, pkt, 1);
    struct http_conn *conn = http_conns.lookup(&ck);
    if (!conn)
        conn = http_conn_open(s, &ck, method);
    if (!conn)
        return;
    conn->last_seen_ns = now;
    if (http_retransmitted(&conn->seen, HTTP_SEEN_CLIENT, &conn->client_seq_end, pkt->tcp_seq,
                           len))
        return;
    http_enqueue(s, conn, method, now);
}

static __always_inline void http_response(struct http_scratch *s, const struct packet *pkt,
                                          u16 status, u64 now, u32 len)
{
    struct http_conn_key ck = {};
    http_conn_key_of(&ck, pkt, 0);
    if (http_interim(status))
        return;
    struct http_conn *conn = http_conn_find(&ck);
    if (!conn) {
        count_parse_error(PARSE_ERROR_HTTP);    /* a response to no request we saw */
        return;
    }
    /* the server as the client addressed it */
    s->key.server_port = ck.server_port;
    __builtin_memcpy(s->key.server, ck.server, 16);
    conn->last_seen_ns = now;
    if (http_retransmitted(&conn->seen, HTTP_SEEN_SERVER, &conn->server_seq_end, pkt->tcp_seq,
                           len))
        return;
    http_answer(s, &ck, conn, status, now);
}

/* Bytes of TCP payload in this segment (in the aggregate, for a GSO skb). */
static __always_inline u32 http_payload_bytes(struct __sk_buff *skb, const struct packet *pkt)
{
    u32 segment_end = pkt->l3_off + pkt->ip_len;
    if (skb->gso_segs > 1 || segment_end > skb->len)
        segment_end = skb->len;
    return segment_end > pkt->payload_off ? segment_end - pkt->payload_off : 0;
}

static __always_inline int http_upper(u8 c)
{
    return c >= 'A' && c <= 'Z';
}

#define HTTP_LOOK_NONE 0        /* under 8 bytes of payload, or a header that may come before
                                 * the first message (PROXY protocol v2) */
#define HTTP_LOOK_OTHER 1       /* 8 bytes or more that cannot start a request or response */
#define HTTP_LOOK_MESSAGE 2     /* may start one */

/* What the start of the segment's payload is to HTTP. For a TCP skb from a local socket the
 * payload lies in page fragments, so this is a bpf_skb_load_bytes into them: about 90 ns per
 * TCP bulk skb on a slower host (2026-12-02), which http_starts spares for the directions of
 * connections known not to be HTTP. `payload`: http_payload_bytes(). */
static __always_inline int http_look(struct __sk_buff *skb, const struct packet *pkt,
                                     u32 payload)
{
    if (payload < 8)
        return HTTP_LOOK_NONE;
    u8 start[4];
    if (load_header(skb, pkt->payload_off, start, 4) < 0)
        return HTTP_LOOK_NONE;
    if (http_upper(start[0]) && http_upper(start[1]) && http_upper(start[2]))
        return HTTP_LOOK_MESSAGE;
    /* the signature of a PROXY v2 header, which a load balancer puts before the requests */
    if (start[0] == '\r' && start[1] == '\n' && start[2] == '\r' && start[3] == '\n')
        return HTTP_LOOK_NONE;
    return HTTP_LOOK_OTHER;
}

static __always_inline int http_ends(const struct packet *pkt)
{
    return pkt->tcp_flags & (HTTP_TCP_FIN | HTTP_TCP_RST);
}

#ifdef WITH_HTTP2
#include "http2.h"
#endif

/* How each direction of a TCP connection started, so that one known not to be HTTP skips
 * http_look. An HTTP/1.x connection's first payload in each direction is a request or a status
 * line: a SYN or SYN+ACK notes where its sender's first payload will start (pending), and that
 * payload, when it cannot start a message, marks the direction as not HTTP for good. A
 * connection whose handshake was not seen (opened before the exporter) is looked at segment
 * by segment. Entries are indexed by a hash of the direction's endpoints and hold other bits
 * of it as a tag: [63..35] tag (bit 35 always set, so never 0), [34] HTTP/1 (decided: looked
 * at segment by segment), [33] HTTP/2 (its segments go to parse_http2, bpf/http2.h), [32] not
 * HTTP (with [33]: an HTTP/2 server's direction waiting for its client's preface), [31..0] the
 * pending first payload's sequence number. Direct-mapped and shared by the CPUs (the SYN and
 * the data of a connection may be forwarded by different ones): a direction whose entry
 * another connection took is looked at segment by segment again, which costs time, never a
 * count; an HTTP/2 direction that the walk follows takes its entry back (h2_followed). 16384
 * entries (128 KiB) keep the long-lived connections of a busy node; a pending entry lives from
 * a SYN to the first payload, a round trip. */
#define HTTP_START_SLOTS 16384
#define HTTP_START_NOT (1ULL << 32)
#define HTTP_START_H2 (1ULL << 33)
/* both: a server's direction that began with an HTTP/2 SETTINGS frame before its client's
 * preface passed; not HTTP/1, and each of its segments asks whether the preface has come */
#define HTTP_START_H2_CANDIDATE (HTTP_START_H2 | HTTP_START_NOT)
#define HTTP_START_HTTP1 (1ULL << 34)
#define HTTP_START_TAG_BIT (1ULL << 35)
#define HTTP_START_TAG_MASK (~0ULL << 35)
BPF_ARRAY(http_starts, u64, HTTP_START_SLOTS);

/* A hash of a direction's endpoints: the slot in its low bits, the tag in its high ones. */
static __always_inline u64 http_hash_of(u8 family, u16 sport, u16 dport, const u8 *saddr,
                                        const u8 *daddr)
{
    const u64 *src = (const u64 *)saddr;
    const u64 *dst = (const u64 *)daddr;
    u64 h = ((u64)sport | (u64)dport << 16 | (u64)family << 32) * 0x9E3779B97F4A7C15ULL;
    h ^= src[0] * 0xC2B2AE3D27D4EB4FULL;
    h ^= src[1] * 0x165667B19E3779F9ULL;
    h ^= dst[0] * 0xD6E8FEB86659FD93ULL;
    h ^= dst[1] * 0xFF51AFD7ED558CCDULL;
    return h ^ (h >> 29);
}

static __always_inline u64 http_direction_hash(const struct packet *pkt)
{
    return http_hash_of(pkt->family, pkt->sport, pkt->dport, pkt->saddr, pkt->daddr);
}

static __always_inline u64 http_start_tag(u64 h)
{
    return (h & HTTP_START_TAG_MASK) | HTTP_START_TAG_BIT;
}

#define HTTP_WANT_NONE 0
#define HTTP_WANT_HTTP 1        /* for parse_http */
#define HTTP_WANT_HTTP2 2       /* for parse_http2: a segment of an HTTP/2 direction */

/* Which parser can do anything with this TCP segment (HTTP_WANT_*); the classifier asks before
 * it copies the packet to packet_scratch and tail-calls one, which most segments (ACKs,
 * bodies, other protocols) then need not. Something happens only for a segment that ends the
 * connection (FIN, RST), or one of 8 bytes or more starting with three upper-case letters: a
 * method token (3 to 12 letters) or "HTTP/". Every other state (retransmission sequence
 * numbers, the pipelining queue, last_seen_ns for the idle sweep) changes only for those. */
static __always_inline int http_wanted(struct __sk_buff *skb, const struct packet *pkt)
{
    if (!(HTTP_PORT(pkt->sport) || HTTP_PORT(pkt->dport)))
        return HTTP_WANT_NONE;  /* the port check for http_look and http_ends too */
    /* an ACK and no SYN, FIN or RST: nothing to note or look at (half of a bulk transfer's
     * skbs), so no hash and no http_starts line. Payloads of 1 to 7 bytes hold no HTTP/1
     * message line, but may be a piece of an HTTP/2 frame. */
    u32 payload = http_payload_bytes(skb, pkt);
    if (!(pkt->tcp_flags & (HTTP_TCP_SYN | HTTP_TCP_FIN | HTTP_TCP_RST)) && payload == 0)
        return HTTP_WANT_NONE;
    u64 h = http_direction_hash(pkt);
    u32 index = h & (HTTP_START_SLOTS - 1);
    u64 tag = http_start_tag(h);
    u64 *start = http_starts.lookup(&index);
    u64 known = start ? *start : 0;
    if (start && (pkt->tcp_flags & HTTP_TCP_SYN))
        known = *start = tag | (u32)(pkt->tcp_seq + 1);  /* a new connection's first payload */
    else if (known == (tag | HTTP_START_NOT))
        return http_ends(pkt) ? HTTP_WANT_HTTP : HTTP_WANT_NONE;
#ifdef WITH_HTTP2
    else if (known == (tag | HTTP_START_H2))
        return HTTP_WANT_HTTP2;
    else if (known == (tag | HTTP_START_H2_CANDIDATE)) {
        if (payload && h2_adopt_reply(pkt)) {
            *start = tag | HTTP_START_H2;
            return HTTP_WANT_HTTP2;
        }
        return http_ends(pkt) ? HTTP_WANT_HTTP : HTTP_WANT_NONE;
    }
#endif
    int look = http_look(skb, pkt, payload);
    if (start && look != HTTP_LOOK_NONE && known == (tag | pkt->tcp_seq)) {
#ifdef WITH_HTTP2
        if (look == HTTP_LOOK_OTHER && h2_adopt_reply(pkt)) {
            *start = tag | HTTP_START_H2;       /* an HTTP/2 server's, after a DNAT */
            return HTTP_WANT_HTTP2;
        }
        if (look == HTTP_LOOK_OTHER && h2_server_preface(skb, pkt)) {
            /* an HTTP/2 server that spoke before its client's preface passed */
            *start = tag | HTTP_START_H2_CANDIDATE;
            return http_ends(pkt) ? HTTP_WANT_HTTP : HTTP_WANT_NONE;
        }
#endif
        /* the direction's first payload: decided for good */
        *start = tag | (look == HTTP_LOOK_MESSAGE ? HTTP_START_HTTP1 : HTTP_START_NOT);
    }
#ifdef WITH_HTTP2
    /* another connection's SYN took this direction's entry (its tag is not ours): a direction
     * the HTTP/2 walk follows takes it back, or its segments would go unwalked. Only then: a
     * direction whose entry is its own, or empty, costs no lookup here. */
    if (look != HTTP_LOOK_MESSAGE && payload && known &&
        (known & HTTP_START_TAG_MASK) != (tag & HTTP_START_TAG_MASK) && h2_followed(pkt)) {
        if (start)
            *start = tag | HTTP_START_H2;
        return HTTP_WANT_HTTP2;
    }
#endif
    return http_ends(pkt) || look == HTTP_LOOK_MESSAGE ? HTTP_WANT_HTTP : HTTP_WANT_NONE;
}

/* Whether the client of this request or response is an address of another node whose exporter
 * counts the exchange (-DONCE_PER_CLUSTER, bpf/cluster.h); a request is counted as left to it.
 * Such a request never enters http_conns, so its response and the connection's end find
 * nothing there either. */
static __always_inline int http_counted_elsewhere(const struct packet *pkt, int kind)
{
#ifdef ONCE_PER_CLUSTER
    int request = kind == HTTP_REQUEST;
    if (!counted_by_its_node(pkt->family, request ? pkt->saddr : pkt->daddr))
        return 0;
    struct left_counts *left = left_counts();
    if (left && request)
        left->http_requests += 1;
    return 1;
#else
    return 0;
#endif
}

#ifdef WITH_HTTP2
/* Writes `mark` (HTTP_START_H2, HTTP_START_NOT) in the http_starts entry of the packet's
 * direction, or with `reverse` of the opposite one. */
static __always_inline void http_mark_start(const struct packet *pkt, int reverse, u64 mark)
{
    u64 h = reverse ? http_hash_of(pkt->family, pkt->dport, pkt->sport, pkt->daddr, pkt->saddr)
                    : http_direction_hash(pkt);
    u32 index = h & (HTTP_START_SLOTS - 1);
    u64 *start = http_starts.lookup(&index);
    if (start)
        *start = http_start_tag(h) | mark;
}

/* The client's preface, in the segment s->head holds: both directions become HTTP/2 (the
 * server's even when its first payload, a SETTINGS frame, came by first and marked it not
 * HTTP). 1 when the segment should go on to parse_http2. */
static __always_inline int h2_begin(const struct packet *pkt, struct http_scratch *s)
{
#ifdef ONCE_PER_CLUSTER
    if (counted_by_its_node(pkt->family, pkt->saddr)) {
        /* another node's client: its node walks the connection */
        http_mark_start(pkt, 0, HTTP_START_NOT);
        http_mark_start(pkt, 1, HTTP_START_NOT);
        return 0;
    }
#endif
    struct packet_direction k = {};
    struct h2_dir d = {};
    d.last_seen_ns = bpf_ktime_get_ns();
    d.state = H2_DIR_SYNCED;
    d.next_seq = pkt->tcp_seq + H2_PREFACE_BYTES;
    d.server_port = pkt->dport;
    __builtin_memcpy(d.server, pkt->daddr, 16);
    direction_of(&k, pkt, 0);
    h2_dirs.update(&k, &d);
    struct client_end client = {};
    client_end_of(&client, pkt->family, pkt->sport, pkt->saddr);
    struct server_end server = {};
    server_end_of(&server, pkt->dport, pkt->daddr);
    h2_clients.update(&client, &server);
    d.state = H2_DIR_UNSYNCED;
    d.from_server = 1;
    direction_of(&k, pkt, 1);
    h2_dirs.update(&k, &d);
    http_mark_start(pkt, 0, HTTP_START_H2);
    http_mark_start(pkt, 1, HTTP_START_H2);
    return 1;
}

/* A segment of an HTTP/2 direction; 1 when parse_http2 should be tail-called again. */
static __always_inline int http2_segment(struct __sk_buff *skb, const struct packet *pkt)
{
    int res = h2_parse(skb, pkt);
    if (res == H2_NO_STATE)
        http_mark_start(pkt, 0, HTTP_START_NOT);
    if (res == H2_ENDED) {
        http_mark_start(pkt, 0, HTTP_START_NOT);
        http_mark_start(pkt, 1, HTTP_START_NOT);
    }
    return res == H2_MORE;
}
#endif

/* Counts what the segment holds of HTTP/1.x; 1 when it was the client's HTTP/2 preface and
 * the segment should go on to parse_http2. */
static __always_inline int account_http(struct __sk_buff *skb, const struct packet *pkt)
{
    if (!(HTTP_PORT(pkt->sport) || HTTP_PORT(pkt->dport)))
        return 0;
    u32 avail = http_payload_bytes(skb, pkt);
    int ends = pkt->tcp_flags & (HTTP_TCP_FIN | HTTP_TCP_RST);
    if (avail < 8 && !ends)
        return 0;             /* no message line fits in under 8 bytes: nothing to look at */

    u32 zero = 0;
    struct http_scratch *s = http_scratch.lookup(&zero);
    if (!s)
        return 0;
    u32 *gen = http_generation.lookup(&zero);

    if (avail >= 8) {
        /* a cheap look at 8 bytes first: most segments are neither a request nor a response */
        if (bpf_skb_load_bytes(skb, pkt->payload_off, s->head, 8) < 0)
            return 0;
        u8 c0 = s->head[0];
        int maybe = (c0 >= 'A' && c0 <= 'Z') && (s->head[1] >= 'A' && s->head[1] <= 'Z');
        if (maybe) {
            u64 now = bpf_ktime_get_ns();   /* only for a request or response */
            __builtin_memset(s->head, 0, HTTP_SCAN);
            s->avail = avail < HTTP_SCAN ? avail : HTTP_SCAN;
            copy_bytes_128(skb, pkt->payload_off, s->avail, s->head);
            u8 method = 0;
            u16 status = 0;
            int kind = http_classify(s, &method, &status);
#ifdef WITH_HTTP2
            if (kind == HTTP_NOT_HTTP && h2_is_preface(s))
                return h2_begin(pkt, s);
#endif
            if (kind == HTTP_MALFORMED) {
                count_parse_error(PARSE_ERROR_HTTP);
            } else if (kind != HTTP_NOT_HTTP && http_counted_elsewhere(pkt, kind)) {
                /* another node's client: its node counts the exchange */
            } else if (kind != HTTP_NOT_HTTP) {
                struct http_conn_key ck = {};
                http_conn_key_of(&ck, pkt, kind == HTTP_REQUEST);
                http_key_of(&s->key, &ck, gen ? *gen : 0);
                if (kind == HTTP_REQUEST)
                    http_request(s, pkt, method, now, avail);
                else
                    http_response(s, pkt, status, now, avail);
            }
        }
    }

    if (!ends)
        return 0;
    /* the server closing, or either end resetting, ends the exchange */
    struct http_conn_key ck = {};
    http_conn_key_of(&ck, pkt, 0);                 /* the sender as the server */
    if (!http_conn_find(&ck)) {
        if (!(pkt->tcp_flags & HTTP_TCP_RST))
            return 0;                                 /* a client's FIN: responses may follow */
        http_conn_key_of(&ck, pkt, 1);
    }
    http_key_of(&s->key, &ck, gen ? *gen : 0);
    http_flush(s, &ck);
    return 0;
}


#endif
