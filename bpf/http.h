/* HTTP/1.0 and 1.1: how a message is recognised and how requests pair with responses, shared
 * by the classifier, which reads them from packets (bpf/http_packets.h), and the HTTPS
 * program, which reads them from the plaintext handed to OpenSSL (bpf/tls.c). Each program has
 * its own maps.
 *
 * A message is a request when it starts with a request line: a method token, a space, a
 * target (/..., *, an absolute URI, or an authority for CONNECT), and, when the line ends within
 * the first HTTP_SCAN bytes, " HTTP/1.0" or " HTTP/1.1" before its CR LF. It is a response when
 * it starts with a status line "HTTP/1.x NNN". Anything else (bodies, header continuations,
 * other protocols, HTTP/2's preface) is not looked at further.
 *
 * Each connection keeps a queue of up to HTTP_PIPELINE requests awaiting a response, with their
 * method and the time their first byte was seen; responses pop it in order, so keep-alive and
 * pipelined requests pair right. A request that finds the queue full is counted at once with
 * status "pipelined", and so is every later one until the responses owed to them have passed,
 * which keeps the pairing in order. When the connection ends (http_flush), requests still
 * queued are counted with status "none"; connections whose end is never seen are swept by user
 * space after http.idle_timeout.
 *
 * Messages that start like HTTP but do not hold together (a request line cut before its end, an
 * unknown version, a bad status code) and responses with no request queued are counted in
 * parse_errors[PARSE_ERROR_HTTP]. The including program provides count_failure(),
 * count_parse_error() and their indexes (bpf/counters.h). */
#ifndef EBPF_NET_HTTP_H
#define EBPF_NET_HTTP_H

#include "common.h"

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

/* The protocol version travels with the method, in its high bits (method | version <<
 * HTTP_VERSION_SHIFT), through the request queue and into the counters' keys: the version of
 * the request line, or, when that line ran past HTTP_SCAN bytes, of the response's status line
 * (HTTP_VERSION_1X when neither was read). A response's version travels the same way in its
 * status (status | version << HTTP_STATUS_VERSION_SHIFT) as far as http_answer. */
#define HTTP_VERSION_SHIFT 4
#define HTTP_METHOD_MASK 15
#define HTTP_VERSION_1X 0           /* HTTP/1, minor version not read */
#define HTTP_VERSION_10 1
#define HTTP_VERSION_11 2
#define HTTP_VERSION_2 3
#define HTTP_STATUS_VERSION_SHIFT 12
#define HTTP_STATUS_MASK 0xfff

/* status values below 100 are not HTTP codes but what happened to the request */
#define HTTP_STATUS_NONE 0          /* the connection ended before a response */
#define HTTP_STATUS_PIPELINED 1     /* beyond HTTP_PIPELINE outstanding requests */
#define HTTP_STATUS_UNTRACKED 2     /* http_conns was full: its response cannot be paired */

#define HTTP_KIND_REQUEST 0
#define HTTP_KIND_LATENCY 1

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
    u32 seen;                           /* HTTP_SEEN_*: which *_seq_end below are set (HTTPS:
                                         * which side counts the connection, bpf/tls.c) */
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
BPF_TABLE("lru_hash", struct client_end, struct server_end, http_clients,
          HTTP_CONN_CAPACITY);
/* requests that found http_events full, by method and version */
BPF_PERCPU_ARRAY(http_overflow, u64, 64);
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
    u32 idx = key->method & 63;
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
        u16 code = (head[9] - '0') * 100 + (head[10] - '0') * 10 + (head[11] - '0');
        if (code < 100 || code > 599)
            return HTTP_MALFORMED;
        u16 version = head[7] == '0' ? HTTP_VERSION_10 : HTTP_VERSION_11;
        *status = code | version << HTTP_STATUS_VERSION_SHIFT;
        return HTTP_RESPONSE;
    }

    /* HTTP/2's connection preface ("PRI * HTTP/2.0"): not HTTP/1.x, and not malformed */
    if (head[0] == 'P' && head[1] == 'R' && head[2] == 'I' && head[3] == ' ' && head[4] == '*')
        return HTTP_NOT_HTTP;
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
    if (cr == 0)    /* the version is then the response's */
        return avail < HTTP_SCAN ? HTTP_MALFORMED : HTTP_REQUEST;
    if (cr < space + 11)                /* " / HTTP/1.x" at the least */
        return HTTP_MALFORMED;
    u32 v = (cr - 9) & (HTTP_SCAN - 1);
    if (head[v] != ' ' || head[(v + 1) & 127] != 'H' || head[(v + 2) & 127] != 'T' ||
        head[(v + 3) & 127] != 'T' || head[(v + 4) & 127] != 'P' || head[(v + 5) & 127] != '/' ||
        head[(v + 6) & 127] != '1' || head[(v + 7) & 127] != '.' ||
        (head[(v + 8) & 127] != '0' && head[(v + 8) & 127] != '1'))
        return HTTP_MALFORMED;
    u8 version = head[(v + 8) & 127] == '0' ? HTTP_VERSION_10 : HTTP_VERSION_11;
    *method = m | version << HTTP_VERSION_SHIFT;
    return HTTP_REQUEST;
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
    struct client_end client = {};
    client_end_of(&client, ck->family, ck->client_port, ck->client);
    struct server_end *server = http_clients.lookup(&client);
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

/* With the path label: the request target's first bytes, from s->head, into s->key.path. */
static __always_inline void http_take_path(struct http_scratch *s)
{
#ifdef HTTP_PATHS
    /* the target follows the method's space (a method token is at most 12 bytes) */
    u32 target = (*(volatile u32 *)&s->space + 1) & (HTTP_SCAN - HTTP_PATH_CAPTURE - 1);
    __builtin_memcpy(s->key.path, s->head + target, HTTP_PATH_CAPTURE);
#endif
}

/* A new connection for the request of `ck`, whose client end then remembers its server
 * (http_clients); 0 when http_conns is full, and the request is counted "untracked". */
static __always_inline struct http_conn *http_conn_open(struct http_scratch *s,
                                                        const struct http_conn_key *ck,
                                                        u8 method)
{
    __builtin_memset(&s->conn, 0, sizeof(s->conn));
    http_conns.insert(ck, &s->conn);        /* EEXIST: created meanwhile; E2BIG: full */
    struct http_conn *conn = http_conns.lookup(ck);
    if (!conn) {
        count_failure(FAILURE_HTTP_CONNS);
        http_count_request(&s->key, method, HTTP_STATUS_UNTRACKED);
        return 0;
    }
    struct client_end client = {};
    client_end_of(&client, ck->family, ck->client_port, ck->client);
    struct server_end server = {};
    server_end_of(&server, ck->server_port, ck->server);
    http_clients.update(&client, &server);
    return conn;
}

/* Queues a request on its connection, or counts it "pipelined" past the queue's depth. */
static __always_inline void http_enqueue(struct http_scratch *s, struct http_conn *conn,
                                         u8 method, u64 now)
{
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
/* the scheme the live view shows: 0 http, 1 https (bpf/tls.c) */
#ifndef HTTP_EVENT_SCHEME
#define HTTP_EVENT_SCHEME 0
#endif
/* For the live view: one record per answered request (bpf/events.h). */
static __always_inline void http_emit(const struct http_conn_key *ck, u8 method, u16 status,
                                      u64 latency_us, const struct http_scratch *s)
{
    struct live_event *ev = live_events.ringbuf_reserve(sizeof(struct live_event));
    if (!ev)
        return;
    __builtin_memset(ev, 0, sizeof(*ev));
    ev->kind = LIVE_HTTP;
    ev->transport = HTTP_EVENT_SCHEME;
    ev->family = ck->family;
    ev->client_port = ck->client_port;
    ev->server_port = ck->server_port;
    __builtin_memcpy(ev->client, ck->client, 16);
    __builtin_memcpy(ev->server, ck->server, 16);
    ev->latency_us = latency_us;
    ev->code = status;
    ev->what = method & HTTP_METHOD_MASK;
#ifdef HTTP_PATHS
    __builtin_memcpy(ev->name, s->key.path, HTTP_PATH_CAPTURE);
#endif
    live_events.ringbuf_submit(ev, 0);
}
#endif

/* Pairs a final response with its connection's oldest queued request and counts the
 * exchange; a response with none queued is owed to a request counted "pipelined", or is a
 * parse error. s->key holds the endpoints; `ck` is for the live view. */
static __always_inline void http_answer(struct http_scratch *s, const struct http_conn_key *ck,
                                        struct http_conn *conn, u16 status, u64 now)
{
    if (conn->answered == conn->requested) {
        if (conn->pipelined)
            conn->pipelined -= 1;               /* its request was counted as pipelined */
        else
            count_parse_error(PARSE_ERROR_HTTP);
        return;
    }
    u32 slot = conn->answered & (HTTP_PIPELINE - 1);
    u8 method = conn->method[slot];
    if (!(method >> HTTP_VERSION_SHIFT))            /* the request line's was not read */
        method |= (status >> HTTP_STATUS_VERSION_SHIFT) << HTTP_VERSION_SHIFT;
    status &= HTTP_STATUS_MASK;
#ifdef HTTP_PATHS
    __builtin_memcpy(s->key.path, conn->path + slot * HTTP_PATH_CAPTURE, HTTP_PATH_CAPTURE);
#endif
    u64 latency_us = (now - conn->requested_ns[slot]) / 1000;
    conn->answered += 1;
#ifdef WITH_EVENTS
    http_emit(ck, method, status, latency_us, s);
#endif

    struct http_key *key = &s->key;
    http_count_request(key, method, status);
    key->kind = HTTP_KIND_LATENCY;
    key->variant = log2_slot(latency_us);
    http_count(key, 1);
    key->variant = HIST_SUM_SLOT;
    http_count(key, latency_us);
}

/* Whether a response's status is an interim one (100 Continue, 103 Early Hints), which the
 * final one follows; 101 Switching Protocols is final. */
static __always_inline int http_interim(u16 status)
{
    status &= HTTP_STATUS_MASK;
    return status < 200 && status != 101;
}

#endif
