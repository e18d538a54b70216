/* HTTP/1.0 and 1.1, recognised by content in the TC classifier, in both directions.
 *
 * A data segment is a request when it starts with a request line: a method token, a space, a
 * target (/..., *, an absolute URI, or an authority for CONNECT), and, when the line ends within
 * the first HTTP_SCAN bytes of the segment, " HTTP/1.0" or " HTTP/1.1" before its CR LF. It is a
 * response when it starts with a status line "HTTP/1.x NNN". Other segments (bodies, header
 * continuations, other protocols) are not looked at further.
 *
 * Each connection keeps a queue of up to HTTP_PIPELINE requests awaiting a response, with their
 * method and the time their first byte passed; responses pop it in order, so keep-alive and
 * pipelined requests pair right. A request that finds the queue full is counted at once with
 * status "pipelined", and so is every later one until the responses owed to them have passed,
 * which keeps the pairing in order. When the server closes (FIN) or either end resets, requests
 * still queued are counted with status "none". Connections whose end is never seen are swept by
 * user space after http.idle_timeout.
 *
 * A retransmitted segment (TCP resends a request after a tail-loss probe, say) is recognised by
 * its sequence number, which lies before the end of the last request (or response) segment seen
 * on the connection, and not counted again.
 *
 * Segments that start like HTTP but do not hold together (a request line cut before its end, an
 * unknown version, a bad status code) and responses with no request queued are counted in
 * parse_errors[PARSE_ERROR_HTTP]. */
#ifndef EBPF_NET_HTTP_H
#define EBPF_NET_HTTP_H

#include "common.h"
#include "packet.h"

#define HTTP_PIPELINE 8             /* requests awaiting a response per connection; power of 2 */
/* With the opt-in `path` label (-DHTTP_PATHS) the first bytes of each request target are kept
 * with the request; user space cuts, templates and allowlists them. */
#define HTTP_PATH_CAPTURE 64
#define HTTP_SCAN 128               /* bytes of a segment examined (copy_bytes_128) */

#define HTTP_METHOD_GET 1
#define HTTP_METHOD_HEAD 2
#define HTTP_METHOD_POST 3
#define HTTP_METHOD_PUT 4
#define HTTP_METHOD_DELETE 5
#define HTTP_METHOD_PATCH 6
#define HTTP_METHOD_OPTIONS 7
#define HTTP_METHOD_CONNECT 8
#define HTTP_METHOD_TRACE 9
#define HTTP_METHOD_OTHER 10

/* status values below 100 are not HTTP codes but what happened to the request */
#define HTTP_STATUS_NONE 0          /* the connection ended before a response */
#define HTTP_STATUS_PIPELINED 1     /* beyond HTTP_PIPELINE outstanding requests */
#define HTTP_STATUS_UNTRACKED 2     /* http_conns was full: its response cannot be paired */

#define HTTP_KIND_REQUEST 0
#define HTTP_KIND_LATENCY 1

#define HTTP_TCP_FIN 0x01
#define HTTP_TCP_RST 0x04
#define HTTP_TCP_SYN 0x02

/* HTTP_PORT(p): whether p is one of http.ports (every port when the list is empty) */
#ifndef HTTP_PORT
#define HTTP_PORT(p) (1)
#endif
/* Connections with an HTTP request seen, at once. Allocated on demand; a connection that does
 * not fit is counted in map_update_failures and its requests with status "untracked". */
#ifndef HTTP_CONN_CAPACITY
#define HTTP_CONN_CAPACITY 65536
#endif
/* Distinct (kind, method, status, client, server, port) per scrape interval. */
#ifndef HTTP_EVENT_CAPACITY
#define HTTP_EVENT_CAPACITY 16384
#endif

struct http_conn_key {
    u8 family;
    u8 pad;
    u16 client_port;
    u16 server_port;
    u16 pad2;
    u8 client[16];
    u8 server[16];
};

struct http_conn {
    u64 requested_ns[HTTP_PIPELINE];    /* when each queued request's first byte passed */
    u8 method[HTTP_PIPELINE];
    u32 requested;                      /* requests queued so far (slot: requested % PIPELINE) */
    u32 answered;                       /* of them, answered so far */
    u32 pipelined;                      /* responses still owed to requests counted pipelined */
    u32 seen;                           /* HTTP_SEEN_*: which *_seq_end below are set */
    u32 client_seq_end;                 /* sequence number after the last request segment */
    u32 server_seq_end;                 /* ... and after the last response segment */
    u64 last_seen_ns;
#ifdef HTTP_PATHS
    /* each queued request's target at slot * HTTP_PATH_CAPTURE (one dimension: bcc's Python
     * type for a two-dimensional array has the wrong size) */
    u8 path[HTTP_PIPELINE * HTTP_PATH_CAPTURE];
#endif
};

#define HTTP_SEEN_CLIENT 1
#define HTTP_SEEN_SERVER 2

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

struct http_key {
    u32 generation;
    u8 kind;                /* HTTP_KIND_* */
    u8 method;
    u16 status;
    u16 variant;            /* histogram slot for HTTP_KIND_LATENCY */
    u8 family;
    u8 pad;
    u16 server_port;
    u16 pad2;
    u8 client[16];
    u8 server[16];
#ifdef HTTP_PATHS
    u8 path[HTTP_PATH_CAPTURE];
#endif
};

struct http_scratch {
    u8 head[HTTP_SCAN];     /* the segment's first bytes */
    /* kept in the map and read back volatile: the verifier then need not follow each value
     * the scanning loops can end with through the rest of the program */
    u32 avail;              /* how many of the first bytes the segment has */
    u32 space;              /* where the request line's first space is */
    u32 cr;                 /* where its CR is, 0 when not within the bytes examined */
    u32 pad;
    struct http_key key;
    struct http_conn conn;
};

BPF_ARRAY(http_generation, u32, 1);
BPF_F_TABLE("hash", struct http_conn_key, struct http_conn, http_conns, HTTP_CONN_CAPACITY,
            BPF_F_NO_PREALLOC);
BPF_PERCPU_HASH(http_events, struct http_key, u64, HTTP_EVENT_CAPACITY);

/* The server each client end last opened an HTTP connection to, as the client addressed it.
 * A request to a Service's ClusterIP or a NodePort is rewritten (DNAT) to a backend after the
 * classifier saw it, and the response reaches the classifier from the backend before the
 * rewrite is undone: its connection is found through its client's end here. Only a response
 * that finds no connection of its own looks here, so a client port that two connections to
 * different servers share (Linux reuses ports across destinations) pairs wrongly only when one
 * of them went through a DNAT and the other was opened later. LRU: an entry needs no delete
 * when its connection ends; as many as http_conns. */
struct http_client_end {
    u8 family;
    u8 pad;
    u16 port;
    u8 addr[16];
};
struct http_server_end {
    u16 port;
    u16 pad;
    u8 addr[16];
};
BPF_TABLE("lru_hash", struct http_client_end, struct http_server_end, http_clients,
          HTTP_CONN_CAPACITY);
/* requests that found http_events full, by method */
BPF_PERCPU_ARRAY(http_overflow, u64, 16);
/* built here, not on the stack: 512 bytes of BPF stack do not hold them beside the parser */
BPF_PERCPU_ARRAY(http_scratch, struct http_scratch, 1);

static __always_inline void http_count(struct http_key *key, u64 val)
{
    u64 *count = http_events.lookup(key);
    if (count) {
        *count += val;
        return;
    }
    /* fails with EEXIST when another CPU created it meanwhile, E2BIG when full */
    if (http_events.insert(key, &val) == 0)
        return;
    count = http_events.lookup(key);
    if (count) {
        *count += val;
        return;
    }
    count_failure(FAILURE_HTTP_EVENTS);
    if (key->kind != HTTP_KIND_REQUEST)
        return;             /* the request is counted in overflow; its latency is not */
    u32 idx = key->method & 15;
    count = http_overflow.lookup(&idx);
    if (count)
        *count += val;
}

static __always_inline void http_count_request(struct http_key *key, u8 method, u16 status)
{
    key->kind = HTTP_KIND_REQUEST;
    key->method = method;
    key->status = status;
    key->variant = 0;
    http_count(key, 1);
}

/* The method of the request line in s->head, and where its space is; 0 when none. */
static __always_inline u8 http_method(struct http_scratch *s, volatile u32 *space)
{
    const u8 *head = s->head;
    u8 c0 = head[0], c1 = head[1], c2 = head[2], c3 = head[3], c4 = head[4];
    if (c0 == 'G' && c1 == 'E' && c2 == 'T' && c3 == ' ') { *space = 3; return HTTP_METHOD_GET; }
    if (c0 == 'P' && c1 == 'U' && c2 == 'T' && c3 == ' ') { *space = 3; return HTTP_METHOD_PUT; }
    if (c0 == 'H' && c1 == 'E' && c2 == 'A' && c3 == 'D' && c4 == ' ') {
        *space = 4;
        return HTTP_METHOD_HEAD;
    }
    if (c0 == 'P' && c1 == 'O' && c2 == 'S' && c3 == 'T' && c4 == ' ') {
        *space = 4;
        return HTTP_METHOD_POST;
    }
    u8 c5 = head[5], c6 = head[6], c7 = head[7];
    if (c0 == 'P' && c1 == 'A' && c2 == 'T' && c3 == 'C' && c4 == 'H' && c5 == ' ') {
        *space = 5;
        return HTTP_METHOD_PATCH;
    }
    if (c0 == 'T' && c1 == 'R' && c2 == 'A' && c3 == 'C' && c4 == 'E' && c5 == ' ') {
        *space = 5;
        return HTTP_METHOD_TRACE;
    }
    if (c0 == 'D' && c1 == 'E' && c2 == 'L' && c3 == 'E' && c4 == 'T' && c5 == 'E' && c6 == ' ') {
        *space = 6;
        return HTTP_METHOD_DELETE;
    }
    if (c0 == 'O' && c1 == 'P' && c2 == 'T' && c3 == 'I' && c4 == 'O' && c5 == 'N' && c6 == 'S' &&
        c7 == ' ') {
        *space = 7;
        return HTTP_METHOD_OPTIONS;
    }
    if (c0 == 'C' && c1 == 'O' && c2 == 'N' && c3 == 'N' && c4 == 'E' && c5 == 'C' && c6 == 'T' &&
        c7 == ' ') {
        *space = 7;
        return HTTP_METHOD_CONNECT;
    }
    /* another token: 3 to 12 upper-case letters (PROPFIND, MKCOL, ...) */
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < 13; i++) {
        u8 c = head[i & (HTTP_SCAN - 1)];
        if (c == ' ' && i >= 3) {
            *space = i;
            return HTTP_METHOD_OTHER;
        }
        if (c < 'A' || c > 'Z')
            return 0;
    }
    return 0;
}

enum http_line {
    HTTP_NOT_HTTP = 0,      /* not the start of an HTTP message: not looked at further */
    HTTP_REQUEST = 1,
    HTTP_RESPONSE = 2,
    HTTP_MALFORMED = 3,     /* starts like HTTP but does not hold together */
};

static __always_inline int http_is_digit(u8 c)
{
    return c >= '0' && c <= '9';
}

/* Classifies the segment from its first s->avail bytes (in s->head); sets method or status. */
static __always_inline int http_classify(struct http_scratch *s, u8 *method, u16 *status)
{
    const u8 *head = s->head;
    u32 avail = *(volatile u32 *)&s->avail;
    if (head[0] == 'H' && head[1] == 'T' && head[2] == 'T' && head[3] == 'P' && head[4] == '/') {
        if (avail < 13 || head[5] != '1' || head[6] != '.' ||
            (head[7] != '0' && head[7] != '1') || head[8] != ' ' ||
            !http_is_digit(head[9]) || !http_is_digit(head[10]) || !http_is_digit(head[11]) ||
            (head[12] != ' ' && head[12] != '\r'))
            return HTTP_MALFORMED;
        *status = (head[9] - '0') * 100 + (head[10] - '0') * 10 + (head[11] - '0');
        if (*status < 100 || *status > 599)
            return HTTP_MALFORMED;
        return HTTP_RESPONSE;
    }

    u8 m = http_method(s, &s->space);
    if (!m)
        return HTTP_NOT_HTTP;
    u32 space = *(volatile u32 *)&s->space;
    u8 target = head[(space + 1) & (HTTP_SCAN - 1)];
    int plausible = target == '/' || target == '*' || target == 'h' ||
                    (m == HTTP_METHOD_CONNECT && target > ' ');
    if (!plausible)
        return m == HTTP_METHOD_OTHER ? HTTP_NOT_HTTP : HTTP_MALFORMED;
    *method = m;

    /* the line's end: " HTTP/1.x" CR. Not within the bytes examined: a line cut short (the
     * segment ends first) is malformed, a line longer than HTTP_SCAN is taken as it is. */
    s->cr = 0;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < HTTP_SCAN; i++) {
        if (i >= avail)
            break;
        if (head[i] == '\r') {
            *(volatile u32 *)&s->cr = i;
            break;
        }
    }
    u32 cr = *(volatile u32 *)&s->cr;
    if (cr == 0)
        return avail < HTTP_SCAN ? HTTP_MALFORMED : HTTP_REQUEST;
    if (cr < space + 11)                /* " / HTTP/1.x" at the least */
        return HTTP_MALFORMED;
    u32 v = (cr - 9) & (HTTP_SCAN - 1);
    if (head[v] != ' ' || head[(v + 1) & 127] != 'H' || head[(v + 2) & 127] != 'T' ||
        head[(v + 3) & 127] != 'T' || head[(v + 4) & 127] != 'P' || head[(v + 5) & 127] != '/' ||
        head[(v + 6) & 127] != '1' || head[(v + 7) & 127] != '.' ||
        (head[(v + 8) & 127] != '0' && head[(v + 8) & 127] != '1'))
        return HTTP_MALFORMED;
    return HTTP_REQUEST;
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

static __always_inline void http_key_of(struct http_key *key, const struct http_conn_key *ck,
                                        u32 generation)
{
    key->generation = generation;
    key->family = ck->family;
    key->server_port = ck->server_port;
    __builtin_memcpy(key->client, ck->client, 16);
    __builtin_memcpy(key->server, ck->server, 16);
}

/* The connection of `ck`; when there is none, the connection its client end last opened, with
 * ck's server made that one's (the address the client used, before a DNAT). */
static __always_inline struct http_conn *http_conn_find(struct http_conn_key *ck)
{
    struct http_conn *conn = http_conns.lookup(ck);
    if (conn)
        return conn;
    struct http_client_end client = {};
    client.family = ck->family;
    client.port = ck->client_port;
    __builtin_memcpy(client.addr, ck->client, 16);
    struct http_server_end *server = http_clients.lookup(&client);
    if (!server)
        return 0;
    ck->server_port = server->port;
    __builtin_memcpy(ck->server, server->addr, 16);
    return http_conns.lookup(ck);
}

/* The connection ended: its queued requests will get no response. */
static __always_inline void http_flush(struct http_scratch *s, struct http_conn_key *ck)
{
    struct http_conn *conn = http_conns.lookup(ck);
    if (!conn)
        return;
    /* copied before the delete: a freed element may be reused by another CPU at once */
    __builtin_memcpy(&s->conn, conn, sizeof(s->conn));
    if (http_conns.delete(ck) != 0)
        return;             /* the idle sweep took it and counted it */
    u32 answered = s->conn.answered;
#pragma unroll
    for (int i = 0; i < HTTP_PIPELINE; i++) {
        if (answered + i < s->conn.requested) {
            u32 slot = (answered + i) & (HTTP_PIPELINE - 1);
#ifdef HTTP_PATHS
            __builtin_memcpy(s->key.path, s->conn.path + slot * HTTP_PATH_CAPTURE,
                             HTTP_PATH_CAPTURE);
#endif
            http_count_request(&s->key, s->conn.method[slot], HTTP_STATUS_NONE);
        }
    }
}

static __always_inline void http_request(struct http_scratch *s, const struct packet *pkt,
                                         u8 method, u64 now, u32 len)
{
#ifdef HTTP_PATHS
    /* the target follows the method's space (a method token is at most 12 bytes) */
    u32 target = (*(volatile u32 *)&s->space + 1) & (HTTP_SCAN - HTTP_PATH_CAPTURE - 1);
    __builtin_memcpy(s->key.path, s->head + target, HTTP_PATH_CAPTURE);
#endif
    struct http_conn_key ck = {};
    http_conn_key_of(&ck, pkt, 1);
    struct http_conn *conn = http_conns.lookup(&ck);
    if (!conn) {
        __builtin_memset(&s->conn, 0, sizeof(s->conn));
        http_conns.insert(&ck, &s->conn);   /* EEXIST: created meanwhile; E2BIG: full */
        conn = http_conns.lookup(&ck);
        if (!conn) {
            count_failure(FAILURE_HTTP_CONNS);
            http_count_request(&s->key, method, HTTP_STATUS_UNTRACKED);
            return;
        }
        struct http_client_end client = {};
        client.family = ck.family;
        client.port = ck.client_port;
        __builtin_memcpy(client.addr, ck.client, 16);
        struct http_server_end server = {};
        server.port = ck.server_port;
        __builtin_memcpy(server.addr, ck.server, 16);
        http_clients.update(&client, &server);
    }
    conn->last_seen_ns = now;
    if (http_retransmitted(&conn->seen, HTTP_SEEN_CLIENT, &conn->client_seq_end, pkt->tcp_seq,
                           len))
        return;
    if (conn->pipelined || conn->requested - conn->answered >= HTTP_PIPELINE) {
        conn->pipelined += 1;
        http_count_request(&s->key, method, HTTP_STATUS_PIPELINED);
        return;
    }
    u32 slot = conn->requested & (HTTP_PIPELINE - 1);
    conn->requested_ns[slot] = now;
    conn->method[slot] = method;
#ifdef HTTP_PATHS
    __builtin_memcpy(conn->path + slot * HTTP_PATH_CAPTURE, s->key.path, HTTP_PATH_CAPTURE);
#endif
    conn->requested += 1;
}

#ifdef WITH_EVENTS
/* For the live view: one record per answered request (bpf/events.h). */
static __always_inline void http_emit(const struct http_conn_key *ck, u8 method, u16 status,
                                      u64 latency_us, const struct http_scratch *s)
{
    struct live_event *ev = live_events.ringbuf_reserve(sizeof(struct live_event));
    if (!ev)
        return;
    __builtin_memset(ev, 0, sizeof(*ev));
    ev->kind = LIVE_HTTP;
    ev->family = ck->family;
    ev->client_port = ck->client_port;
    ev->server_port = ck->server_port;
    __builtin_memcpy(ev->client, ck->client, 16);
    __builtin_memcpy(ev->server, ck->server, 16);
    ev->latency_us = latency_us;
    ev->code = status;
    ev->what = method;
#ifdef HTTP_PATHS
    __builtin_memcpy(ev->name, s->key.path, HTTP_PATH_CAPTURE);
#endif
    live_events.ringbuf_submit(ev, 0);
}
#endif

static __always_inline void http_response(struct http_scratch *s, const struct packet *pkt,
                                          u16 status, u64 now, u32 len)
{
    struct http_conn_key ck = {};
    http_conn_key_of(&ck, pkt, 0);
    if (status < 200 && status != 101)
        return;             /* interim (100 Continue, 103 Early Hints): the final one follows */
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
    if (conn->answered == conn->requested) {
        if (conn->pipelined)
            conn->pipelined -= 1;               /* its request was counted as pipelined */
        else
            count_parse_error(PARSE_ERROR_HTTP);
        return;
    }
    u32 slot = conn->answered & (HTTP_PIPELINE - 1);
    u8 method = conn->method[slot];
#ifdef HTTP_PATHS
    __builtin_memcpy(s->key.path, conn->path + slot * HTTP_PATH_CAPTURE, HTTP_PATH_CAPTURE);
#endif
    u64 latency_us = (now - conn->requested_ns[slot]) / 1000;
    conn->answered += 1;
#ifdef WITH_EVENTS
    http_emit(&ck, method, status, latency_us, s);
#endif

    struct http_key *key = &s->key;
    http_count_request(key, method, status);
    key->kind = HTTP_KIND_LATENCY;
    key->variant = log2_slot(latency_us);
    http_count(key, 1);
    key->variant = HIST_SUM_SLOT;
    http_count(key, latency_us);
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

/* How each direction of a TCP connection started, so that one known not to be HTTP skips
 * http_look. An HTTP/1.x connection's first payload in each direction is a request or a status
 * line: a SYN or SYN+ACK notes where its sender's first payload will start (pending), and that
 * payload, when it cannot start a message, marks the direction as not HTTP for good. A
 * connection whose handshake was not seen (opened before the exporter) is looked at segment
 * by segment. Entries are indexed by a hash of the direction's endpoints and hold other bits
 * of it as a tag: [63..33] tag (never 0), [32] not HTTP, [31..0] the pending first payload's
 * sequence number. Direct-mapped and shared by the CPUs (the SYN and the data of a connection
 * may be forwarded by different ones): a direction whose entry another connection took is
 * looked at segment by segment again, which costs time, never a count. 16384 entries (128 KiB)
 * keep the long-lived connections of a busy node; a pending entry lives from a SYN to the first
 * payload, a round trip. */
#define HTTP_START_SLOTS 16384
#define HTTP_START_NOT (1ULL << 32)
#define HTTP_START_TAG_MASK (~0ULL << 33)
BPF_ARRAY(http_starts, u64, HTTP_START_SLOTS);

/* A hash of a direction's endpoints: the slot in its low bits, the tag in its high ones. */
static __always_inline u64 http_direction_hash(const struct packet *pkt)
{
    const u64 *src = (const u64 *)pkt->saddr;
    const u64 *dst = (const u64 *)pkt->daddr;
    u64 h = ((u64)pkt->sport | (u64)pkt->dport << 16 | (u64)pkt->family << 32) *
        0x9E3779B97F4A7C15ULL;
    h ^= src[0] * 0xC2B2AE3D27D4EB4FULL;
    h ^= src[1] * 0x165667B19E3779F9ULL;
    h ^= dst[0] * 0xD6E8FEB86659FD93ULL;
    h ^= dst[1] * 0xFF51AFD7ED558CCDULL;
    return h ^ (h >> 29);
}

/* Whether account_http() can do anything with this TCP segment; the classifier asks before it
 * copies the packet to packet_scratch and tail-calls parse_http, which most segments (ACKs,
 * bodies, other protocols) then need not. Something happens only for a segment that ends the
 * connection (FIN, RST), or one of 8 bytes or more starting with three upper-case letters: a
 * method token (3 to 12 letters) or "HTTP/". Every other state (retransmission sequence
 * numbers, the pipelining queue, last_seen_ns for the idle sweep) changes only for those. */
static __always_inline int http_wanted(struct __sk_buff *skb, const struct packet *pkt)
{
    if (!(HTTP_PORT(pkt->sport) || HTTP_PORT(pkt->dport)))
        return 0;               /* the port check for http_look and http_ends too */
    /* an ACK, or a payload too short for a message line, and no SYN, FIN or RST: nothing to
     * note or look at (half of a bulk transfer's skbs), so no hash and no http_starts line */
    u32 payload = http_payload_bytes(skb, pkt);
    if (!(pkt->tcp_flags & (HTTP_TCP_SYN | HTTP_TCP_FIN | HTTP_TCP_RST)) && payload < 8)
        return 0;
    u64 h = http_direction_hash(pkt);
    u32 index = h & (HTTP_START_SLOTS - 1);
    u64 tag = (h & HTTP_START_TAG_MASK) | (1ULL << 33);
    u64 *start = http_starts.lookup(&index);
    u64 known = start ? *start : 0;
    if (start && (pkt->tcp_flags & HTTP_TCP_SYN))
        known = *start = tag | (u32)(pkt->tcp_seq + 1);  /* a new connection's first payload */
    else if (known == (tag | HTTP_START_NOT))
        return http_ends(pkt);
    int look = http_look(skb, pkt, payload);
    if (start && look != HTTP_LOOK_NONE && known == (tag | pkt->tcp_seq))
        /* the direction's first payload: decided for good */
        *start = look == HTTP_LOOK_MESSAGE ? 0 : tag | HTTP_START_NOT;
    return http_ends(pkt) || look == HTTP_LOOK_MESSAGE;
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

static __always_inline void account_http(struct __sk_buff *skb, const struct packet *pkt)
{
    if (!(HTTP_PORT(pkt->sport) || HTTP_PORT(pkt->dport)))
        return;
    u32 avail = http_payload_bytes(skb, pkt);
    int ends = pkt->tcp_flags & (HTTP_TCP_FIN | HTTP_TCP_RST);
    if (avail < 8 && !ends)
        return;             /* no message line fits in under 8 bytes: nothing to look at */

    u32 zero = 0;
    struct http_scratch *s = http_scratch.lookup(&zero);
    if (!s)
        return;
    u32 *gen = http_generation.lookup(&zero);

    if (avail >= 8) {
        /* a cheap look at 8 bytes first: most segments are neither a request nor a response */
        if (bpf_skb_load_bytes(skb, pkt->payload_off, s->head, 8) < 0)
            return;
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
        return;
    /* the server closing, or either end resetting, ends the exchange */
    struct http_conn_key ck = {};
    http_conn_key_of(&ck, pkt, 0);                 /* the sender as the server */
    if (!http_conn_find(&ck)) {
        if (!(pkt->tcp_flags & HTTP_TCP_RST))
            return;                                 /* a client's FIN: responses may follow */
        http_conn_key_of(&ck, pkt, 1);
    }
    http_key_of(&s->key, &ck, gen ? *gen : 0);
    http_flush(s, &ck);
}

#endif
