/* HTTPS: HTTP/1.x inside TLS, read from the plaintext OpenSSL's callers hand to SSL_write and
 * get from SSL_read (uprobes on each file with OpenSSL the node's processes map: found by
 * exporter/kernel/tlslibs.py, attached by exporter/kernel/tlsprobes.py). The plaintext goes
 * through the classifier's recognition and pairing (bpf/http.h); the counts land in this
 * program's own http_events, which user space labels scheme="https".
 *
 * Which connection. A call's socket is the one its thread sends or receives on during the call
 * (sock:sock_send_length, sock:sock_recv_length): OpenSSL writes and reads its socket inside
 * SSL_do_handshake, SSL_write and SSL_read, through its own socket BIO or an application's BIO
 * (curl's) alike. Over memory buffers (Python's asyncio), the socket the thread received on
 * just before a handshake completed or a read returned data (tls_received). The endpoints read
 * from that socket are kept per SSL object (tls_sockets), so a call that needs no I/O (a read
 * served from OpenSSL's buffer) still knows them. A call whose socket is never seen (TLS over
 * a UNIX socket, say) is counted with no endpoints, in tls_unbound.
 *
 * Counted once. When client and server both run on this node with OpenSSL, both libraries see
 * every exchange. Connections are kept in http_conns by their TCP endpoints as the client
 * addressed them, with the side that counts them (http_conn.seen: TLS_SIDE_*): the client,
 * which claims the connection when it starts to write a request, before any byte of it leaves
 * (so before the server can read it), or the server, when it reads a request on a connection
 * no client on this node claimed. A server behind a Service's DNAT finds the client's claim
 * through http_clients, as the classifier does. The side that counts measures the latency:
 * the client from the start of the request's write to the return of the read that brings the
 * response's first bytes; the server from the return of the read that brings the request to
 * the start of its response's write.
 *
 * Nested calls (TLS inside TLS, through an HTTPS proxy) are told by the stack pointer: the
 * outermost call of a thread is the application's, and only it is followed. */
#include <uapi/linux/ptrace.h>
#include "common.h"

/* The slots of map_update_failures (FAILURE_HTTP_EVENTS, ...) and parse_errors
 * (PARSE_ERROR_HTTP, ...) come from exporter/kernel/tlsprobes.py as -D flags: one list, which also
 * labels what user space reads. */
#if !defined(FAILURE_COUNT) || !defined(PARSE_ERROR_COUNT)
#error "compile with exporter/kernel/tlsprobes.py's flags (program_flags)"
#endif
BPF_PERCPU_ARRAY(map_update_failures, u64, FAILURE_COUNT);
BPF_PERCPU_ARRAY(parse_errors, u64, PARSE_ERROR_COUNT);

#include "counters.h"
#include "sock.h"
#ifdef ONCE_PER_CLUSTER
#include "cluster.h"
#endif
/* the live view's records (-DWITH_EVENTS): its exchanges show as HTTPS */
#ifdef WITH_EVENTS
#include "events.h"
#define HTTP_EVENT_SCHEME 1
#endif
#include "http.h"

#define PROTO_TCP 6

#define TLS_OP_HANDSHAKE 0
#define TLS_OP_READ 1
#define TLS_OP_WRITE 2

/* a write's kind (tls_call.kind) beside enum http_line: HTTP/2's client preface, and the
 * bytes of a connection HTTP/2 follows */
#define TLS_KIND_H2_PREFACE 7
#define TLS_KIND_H2 8

/* which side of a connection counts it (http_conn.seen) */
#define TLS_SIDE_CLIENT HTTP_SEEN_CLIENT
#define TLS_SIDE_SERVER HTTP_SEEN_SERVER

/* Threads inside a followed SSL call at once. */
#ifndef TLS_CALL_CAPACITY
#define TLS_CALL_CAPACITY 16384
#endif
/* SSL objects whose socket is known; LRU, and an entry is deleted by SSL_free. */
#ifndef TLS_SOCKET_CAPACITY
#define TLS_SOCKET_CAPACITY 65536
#endif

/* A thread's SSL call in progress, from its uprobe to its uretprobe. */
struct tls_call {
    u64 ssl;
    u64 buf;
    u64 size_out;           /* SSL_read_ex and SSL_write_ex: where they put the byte count */
    u64 sp;                 /* the stack pointer at entry: a deeper call is nested */
    u64 start_ns;
    u32 op;                 /* TLS_OP_* */
    u32 len;                /* bytes asked to be written */
    u32 bound;              /* the socket was seen during this call */
    /* a write's message, classified at entry (the buffer is unchanged until the return) */
    u8 kind;                /* enum http_line */
    u8 method;
    u16 status;
    u32 skip;               /* a request of a connection another side counts */
#ifdef HTTP_PATHS
    u8 path[HTTP_PATH_CAPTURE];
#endif
};
BPF_TABLE("lru_hash", u64, struct tls_call, tls_calls, TLS_CALL_CAPACITY);
/* a call's first state is built here: with the path label it does not fit the stack */
BPF_PERCPU_ARRAY(tls_call_scratch, struct tls_call, 1);

struct tls_conn_id {
    u64 ssl;
    u32 tgid;
    u32 pad;
};
BPF_TABLE("lru_hash", struct tls_conn_id, struct sock_ends, tls_sockets, TLS_SOCKET_CAPACITY);

/* Processes that made a followed SSL call, and the TCP socket each of their threads last
 * received on since its last SSL call ended. A TLS library over memory buffers (Python's
 * asyncio, say) does no I/O inside its calls: the application receives from the socket, then
 * hands the bytes to SSL_do_handshake or SSL_read. A handshake that completes, or a read that
 * returns data, on an SSL object whose socket is not known takes that socket. */
#ifndef TLS_PROCESS_CAPACITY
#define TLS_PROCESS_CAPACITY 16384
#endif
BPF_TABLE("lru_hash", u32, u8, tls_processes, TLS_PROCESS_CAPACITY);
BPF_TABLE("lru_hash", u64, u64, tls_received, TLS_CALL_CAPACITY);

/* requests counted with no endpoints: their connection's socket was never seen */
BPF_PERCPU_ARRAY(tls_unbound, u64, 1);
/* requests counted, by the side that counted them: [0] the client, [1] the server */
BPF_PERCPU_ARRAY(tls_sides, u64, 2);

/* exec() calls: user space looks for new files with OpenSSL after one
 * (exporter/kernel/tlsprobes.py) */
BPF_PERCPU_ARRAY(execs, u64, 1);

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 zero = 0;
    u64 *count = execs.lookup(&zero);
    if (count)
        *count += 1;
    return 0;
}

static __always_inline struct tls_conn_id tls_conn_id_of(u64 ssl)
{
    struct tls_conn_id id = {};
    id.ssl = ssl;
    id.tgid = bpf_get_current_pid_tgid() >> 32;
    return id;
}

/* A call's start: followed unless the thread is already inside a followed call (nested: a
 * call whose stack pointer lies below the outer call's). A thread that ends inside a call
 * leaves no entry behind (sched:sched_process_exit, below). */
static __always_inline struct tls_call *tls_enter(struct pt_regs *ctx, u32 op, u64 ssl)
{
    u64 thread = bpf_get_current_pid_tgid();
    u64 sp = PT_REGS_SP(ctx);
    struct tls_call *outer = tls_calls.lookup(&thread);
    if (outer && outer->sp > sp)
        return 0;
    u32 tgid = thread >> 32;
    if (!tls_processes.lookup(&tgid)) {
        u8 one = 1;
        tls_processes.update(&tgid, &one);
    }
    u32 zero = 0;
    struct tls_call *call = tls_call_scratch.lookup(&zero);
    if (!call)
        return 0;
    __builtin_memset(call, 0, sizeof(*call));
    call->ssl = ssl;
    call->sp = sp;
    call->op = op;
    call->start_ns = bpf_ktime_get_ns();
    if (tls_calls.update(&thread, call) != 0) {
        count_failure(FAILURE_TLS_CALLS);
        return 0;
    }
    return tls_calls.lookup(&thread);
}

/* The followed call this uretprobe ends, 0 for a nested one (its stack pointer lies below
 * the outer call's entry). */
static __always_inline struct tls_call *tls_returning(struct pt_regs *ctx, u64 *thread)
{
    *thread = bpf_get_current_pid_tgid();
    struct tls_call *call = tls_calls.lookup(thread);
    if (!call || PT_REGS_SP(ctx) <= call->sp)
        return 0;
    return call;
}

/* The SSL object `ssl` of the calling process is a connection of socket `sk`. IPv4 peers of
 * an IPv6 socket (::ffff:a.b.c.d) are kept as IPv4, as the classifier sees them. */
static __always_inline void tls_bind_socket(u64 ssl, u64 thread, u64 sk)
{
#ifdef WITH_SOCK_FIELDS
    struct sock_ends ends = {};
    sock_ends_of(&ends, (const u8 *)sk);
    const u32 *local = (const u32 *)ends.local;
    const u32 *remote = (const u32 *)ends.remote;
    if (ends.family == 6 && local[0] == 0 && local[1] == 0 && local[2] == 0xffff0000 &&
        remote[0] == 0 && remote[1] == 0 && remote[2] == 0xffff0000) {
        ends.family = 4;
        __builtin_memcpy(ends.local, ends.local + 12, 4);
        __builtin_memcpy(ends.remote, ends.remote + 12, 4);
        __builtin_memset(ends.local + 4, 0, 12);
        __builtin_memset(ends.remote + 4, 0, 12);
    }
    struct tls_conn_id id = {};
    id.ssl = ssl;
    id.tgid = thread >> 32;
    tls_sockets.update(&id, &ends);
#endif
}

/* A thread's TCP send or receive: inside a followed call, it names the call's connection;
 * outside, a receive of a process that uses TLS is remembered for the next call. */
static __always_inline void tls_socket_io(void *sk, u16 protocol, int received)
{
    if (protocol != PROTO_TCP)
        return;
    u64 thread = bpf_get_current_pid_tgid();
    struct tls_call *call = tls_calls.lookup(&thread);
    if (!call) {
        u32 tgid = thread >> 32;
        u64 socket = (u64)sk;
        if (received && tls_processes.lookup(&tgid))
            tls_received.update(&thread, &socket);
        return;
    }
    if (call->bound)
        return;
    call->bound = 1;
    tls_bind_socket(call->ssl, thread, (u64)sk);
}

/* A call that consumed bytes from a memory buffer (a completed handshake, a read with data)
 * and saw no socket: its connection is the socket its thread received on just before. */
static __always_inline void tls_bind_received(const struct tls_call *call, u64 thread)
{
    if (call->bound)
        return;
    struct tls_conn_id id = {};
    id.ssl = call->ssl;
    id.tgid = thread >> 32;
    if (tls_sockets.lookup(&id))
        return;
    u64 *sk = tls_received.lookup(&thread);
    if (sk)
        tls_bind_socket(call->ssl, thread, *sk);
}

/* A thread ends (its process exits, or it is killed, inside a call or not): a thread that
 * later gets its id must not find its calls. */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 thread = bpf_get_current_pid_tgid();
    tls_calls.delete(&thread);
    tls_received.delete(&thread);
    return 0;
}

/* A followed call ends: forget it, and what its thread received before it. */
static __always_inline void tls_leave(u64 thread)
{
    tls_calls.delete(&thread);
    tls_received.delete(&thread);
}

TRACEPOINT_PROBE(sock, sock_send_length)
{
    tls_socket_io(args->sk, args->protocol, 0);
    return 0;
}

TRACEPOINT_PROBE(sock, sock_recv_length)
{
    /* a receive that failed or found nothing (-EAGAIN) received nothing */
    if (args->ret > 0)
        tls_socket_io(args->sk, args->protocol, 1);
    return 0;
}

/* The connection key of an SSL object on the side that sends or reads requests. A socket
 * never seen gives a key of its own with family 0 (no endpoints): the SSL object and the
 * process. */
static __always_inline int tls_conn_key(struct http_conn_key *ck, u64 ssl, u32 side)
{
    struct tls_conn_id id = tls_conn_id_of(ssl);
    struct sock_ends *ends = tls_sockets.lookup(&id);
    if (!ends) {
        __builtin_memcpy(ck->client, &id, sizeof(id));
        return 0;
    }
    ck->family = ends->family;
    if (side == TLS_SIDE_CLIENT) {
        ck->client_port = ends->local_port;
        ck->server_port = ends->remote_port;
        __builtin_memcpy(ck->client, ends->local, 16);
        __builtin_memcpy(ck->server, ends->remote, 16);
    } else {
        ck->client_port = ends->remote_port;
        ck->server_port = ends->local_port;
        __builtin_memcpy(ck->client, ends->remote, 16);
        __builtin_memcpy(ck->server, ends->local, 16);
    }
    return 1;
}

/* Copies the first bytes of a plaintext message to s->head and classifies them. */
static __always_inline int tls_classify(struct http_scratch *s, u64 buf, u32 len, u8 *method,
                                        u16 *status)
{
    if (len < 8)
        return HTTP_NOT_HTTP;       /* no message line fits in under 8 bytes */
    s->avail = len < HTTP_SCAN ? len : HTTP_SCAN;
    /* read back from memory and checked by a branch: a bound the verifier follows */
    u32 avail = *(volatile u32 *)&s->avail;
    if (avail > HTTP_SCAN)
        return HTTP_NOT_HTTP;
    __builtin_memset(s->head, 0, HTTP_SCAN);
    if (bpf_probe_read_user(s->head, avail, (const void *)buf) < 0)
        return HTTP_NOT_HTTP;
    int kind = http_classify(s, method, status);
    if (kind == HTTP_MALFORMED)
        count_parse_error(PARSE_ERROR_HTTP);
    return kind;
}

/* Whether the client of a request this node's server read is another node's, whose exporter
 * counts the exchange (bpf/cluster.h). */
static __always_inline int tls_counted_elsewhere(const struct http_conn_key *ck)
{
#ifdef ONCE_PER_CLUSTER
    if (!counted_by_its_node(ck->family, ck->client))
        return 0;
    struct left_counts *left = left_counts();
    if (left)
        left->http_requests += 1;
    return 1;
#else
    return 0;
#endif
}

/* The connection of a request on `side`, claimed for it if no side has yet; 0 when another
 * side counts it (or http_conns is full: the request was then counted "untracked"). */
static __always_inline struct http_conn *tls_claim(struct http_scratch *s,
                                                   struct http_conn_key *ck, u32 side,
                                                   u8 method)
{
    struct http_conn *conn = http_conns.lookup(ck);
    if (!conn && side == TLS_SIDE_SERVER) {
        struct http_conn_key addressed = *ck;
        struct http_conn *client = http_conn_find(&addressed);    /* through a DNAT */
        if (client && (client->seen & TLS_SIDE_CLIENT))
            return 0;
        if (tls_counted_elsewhere(ck))
            return 0;
    }
    if (conn) {
        if (!(conn->seen & side))
            return 0;
        /* a branch, not a mask of the pointer, which the verifier refuses */
        asm volatile("" : "+r"(conn));
        return conn;
    }
    conn = http_conn_open(s, ck, method);
    if (conn)
        conn->seen = side;
    return conn;
}

static __always_inline struct http_scratch *tls_scratch(void)
{
    u32 zero = 0;
    return http_scratch.lookup(&zero);
}

static __always_inline void tls_key(struct http_scratch *s, const struct http_conn_key *ck)
{
    u32 zero = 0;
    u32 *gen = http_generation.lookup(&zero);
    http_key_of(&s->key, ck, gen ? *gen : 0);
}

static __always_inline void tls_count_unbound(void)
{
    u32 zero = 0;
    u64 *count = tls_unbound.lookup(&zero);
    if (count)
        *count += 1;
}

/* A request written (this side is the client) or read (the server), at `at`. */
static __always_inline void tls_request(struct http_scratch *s, u64 ssl, u32 side, u8 method,
                                        u64 at)
{
    struct http_conn_key ck = {};
    if (!tls_conn_key(&ck, ssl, side))
        tls_count_unbound();
    tls_key(s, &ck);
    struct http_conn *conn = tls_claim(s, &ck, side, method);
    if (!conn)
        return;
    conn->last_seen_ns = at;
    http_enqueue(s, conn, method, at);
    u32 index = side == TLS_SIDE_CLIENT ? 0 : 1;
    u64 *count = tls_sides.lookup(&index);
    if (count)
        *count += 1;
}

/* A response read (this side is the client) or written (the server), at `at`. */
static __always_inline void tls_response(struct http_scratch *s, u64 ssl, u32 side, u16 status,
                                         u64 at)
{
    if (http_interim(status))
        return;
    struct http_conn_key ck = {};
    tls_conn_key(&ck, ssl, side);
    struct http_conn *conn = side == TLS_SIDE_SERVER ? http_conn_find(&ck)
                                                     : http_conns.lookup(&ck);
    if (!conn) {
        if (side == TLS_SIDE_SERVER && tls_counted_elsewhere(&ck))
            return;
        count_parse_error(PARSE_ERROR_HTTP);    /* a response to no request we saw */
        return;
    }
    if (!(conn->seen & side))
        return;                                 /* the other side counts this connection */
    tls_key(s, &ck);
    conn->last_seen_ns = at;
    http_answer(s, &ck, conn, status, at);
}

#ifdef WITH_HTTP2
/* HTTP/2 inside TLS: the frames of each SSL object's plaintext, walked as the calls hand it
 * over (bpf/http2_walk.h) and handed to user space as the classifier's are, scheme "https".
 * A call's buffer is one piece of its direction's bytes, in order: no sequence numbers, no
 * retransmissions. A connection is HTTP/2 from the client's preface: written by this process
 * (its client) or read by it (its server). Counted once: the client claims the connection by
 * its end (address and port, the same on both sides of a DNAT) when its preface goes out,
 * before the server can read it; a server on this node then leaves it alone. A call with more
 * frames than one walk takes (H2_STEPS) loses its direction's place until a later call starts
 * with a frame header. */
#define H2_STEPS 32
#define H2_LOAD(src, off, dst, len) \
    bpf_probe_read_user(dst, len, (const void *)((src)->base + (off)))
#include "http2_walk.h"

#ifndef H2_TLS_CAPACITY
#define H2_TLS_CAPACITY 16384
#endif
struct h2_tls_key {
    u64 ssl;
    u32 tgid;
    u32 written;            /* 1: the bytes this process writes; 0: those it reads */
};
BPF_TABLE("lru_hash", struct h2_tls_key, struct h2_dir, h2_tls_dirs, H2_TLS_CAPACITY);
/* the side (TLS_SIDE_*) that follows each HTTP/2 connection, by its client's end */
BPF_TABLE("lru_hash", struct client_end, u32, h2_tls_claims, H2_TLS_CAPACITY);

static __always_inline void h2_tls_key_of(struct h2_tls_key *k, u64 ssl, u32 written)
{
    k->ssl = ssl;
    k->tgid = bpf_get_current_pid_tgid() >> 32;
    k->written = written;
}

/* Whether this process's SSL object has an HTTP/2 direction followed: its written bytes, or
 * its read ones. Its pieces are then not looked at as HTTP/1. */
static __always_inline int h2_tls_followed(u64 ssl, u32 written)
{
    struct h2_tls_key k = {};
    h2_tls_key_of(&k, ssl, written);
    return h2_tls_dirs.lookup(&k) != 0;
}


/* The preface, written (side: the client) or read (the server) by this process: its two
 * directions get walk states unless the other side on this node follows the connection, or
 * (counting once per cluster) its client is another node's. 1 when they did. */
static __always_inline int h2_tls_begin(u64 ssl, u32 side, u64 now)
{
    struct http_conn_key e = {};
    tls_conn_key(&e, ssl, side);
    struct client_end ce = {};
    client_end_of(&ce, e.family, e.client_port, e.client);
    u32 *claim = h2_tls_claims.lookup(&ce);
    if (claim && *claim != side)
        return 0;
#ifdef ONCE_PER_CLUSTER
    if (!claim && side == TLS_SIDE_SERVER && e.family && counted_by_its_node(e.family, e.client))
        return 0;
#endif
    if (!claim)
        h2_tls_claims.update(&ce, &side);
    struct h2_tls_key k = {};
    h2_tls_key_of(&k, ssl, 0);
    struct h2_dir d = {};
    d.last_seen_ns = now;
    /* the client's bytes are walked from the preface on; the server's from the start of the
     * next piece, which must start with a frame (a SETTINGS it sent first may be past) */
    d.state = H2_DIR_SYNCED;
    d.from_server = 0;
    k.written = side == TLS_SIDE_CLIENT;
    h2_tls_dirs.update(&k, &d);
    d.state = H2_DIR_UNSYNCED;
    d.from_server = 1;
    k.written = side != TLS_SIDE_CLIENT;
    h2_tls_dirs.update(&k, &d);
    return 1;
}

/* `len` bytes of plaintext at `buf` that this process wrote (or read), from `skip` on; 0 when
 * HTTP/2 does not follow that direction (the bytes are then HTTP/1's to look at). */
static __always_inline int h2_tls_bytes(u64 ssl, u32 written, u64 buf, u32 len, u32 skip,
                                        u64 now)
{
    struct h2_tls_key k = {};
    h2_tls_key_of(&k, ssl, written);
    struct h2_dir *d = h2_tls_dirs.lookup(&k);
    if (!d)
        return 0;
    u32 zero = 0;
    struct h2_walk *w = h2_walks.lookup(&zero);
    if (!w)
        return 1;
    d->last_seen_ns = now;
    /* this process's side: the client writes the client's bytes */
    u32 side = (d->from_server == 0) == (written == 1) ? TLS_SIDE_CLIENT : TLS_SIDE_SERVER;
    struct http_conn_key e = {};
    tls_conn_key(&e, ssl, side);
    struct h2_src src = {.skb = 0, .base = buf};
    if (d->state != H2_DIR_SYNCED)
        d->header_have = 0;                 /* (re)start at this piece's start */
    w->off = skip;
    h2_walk_steps(&src, &e, d, w, len, now);
    if (w->off < len)
        h2_lose(&src, &e, d, now);          /* more frames than one walk takes */
    return 1;
}

/* SSL_free: the connection's end, sent once, by the side that followed it. */
static __always_inline void h2_tls_free(u64 ssl)
{
    struct h2_tls_key k = {};
    h2_tls_key_of(&k, ssl, 1);
    struct h2_dir *d = h2_tls_dirs.lookup(&k);
    if (!d)
        return;
    struct h2_dir ending = {};
    __builtin_memcpy(&ending, d, sizeof(ending));
    u32 side = ending.from_server == 0 ? TLS_SIDE_CLIENT : TLS_SIDE_SERVER;
    struct http_conn_key e = {};
    tls_conn_key(&e, ssl, side);
    struct h2_src src = {};
    h2_emit(&src, &e, &ending, H2_RECORD_END, 0, 0, 0, bpf_ktime_get_ns());
    h2_tls_dirs.delete(&k);
    k.written = 0;
    h2_tls_dirs.delete(&k);
    struct client_end ce = {};
    client_end_of(&ce, e.family, e.client_port, e.client);
    h2_tls_claims.delete(&ce);
}
#endif

static __always_inline int tls_write_entry(struct pt_regs *ctx, u64 ssl, u64 buf, u32 len,
                                           u64 size_out)
{
    struct tls_call *call = tls_enter(ctx, TLS_OP_WRITE, ssl);
    struct http_scratch *s = tls_scratch();
    if (!call || !s)
        return 0;
    call->buf = buf;
    call->len = len;
    call->size_out = size_out;
    u8 method = 0;
    u16 status = 0;
#ifdef WITH_HTTP2
    if (h2_tls_followed(ssl, 1)) {
        call->kind = TLS_KIND_H2;
        return 0;
    }
#endif
    call->kind = tls_classify(s, buf, len, &method, &status);
    call->method = method;
    call->status = status;
#ifdef WITH_HTTP2
    if (call->kind == HTTP_NOT_HTTP && len >= H2_PREFACE_BYTES && h2_is_preface(s))
        call->kind = TLS_KIND_H2_PREFACE;
#endif
    if (call->kind != HTTP_REQUEST)
        return 0;
    http_take_path(s);
#ifdef HTTP_PATHS
    /* a helper's copy: clang's inline one spills past the 512 bytes of stack here */
    bpf_probe_read_kernel(call->path, HTTP_PATH_CAPTURE, s->key.path);
#endif
    /* claim the connection before the request leaves, when its socket is known already */
    struct http_conn_key ck = {};
    if (!tls_conn_key(&ck, ssl, TLS_SIDE_CLIENT))
        return 0;
    tls_key(s, &ck);
    struct http_conn *conn = tls_claim(s, &ck, TLS_SIDE_CLIENT, method);
    call->skip = conn ? 0 : 1;
    return 0;
}

/* A write's end: `written` bytes went out (0 when it failed and will be retried). */
static __always_inline int tls_write_return(struct pt_regs *ctx, int written)
{
    u64 thread;
    struct tls_call *call = tls_returning(ctx, &thread);
    if (!call)
        return 0;
#ifdef WITH_HTTP2
    if (written > 0 && call->kind == TLS_KIND_H2_PREFACE) {
        if (h2_tls_begin(call->ssl, TLS_SIDE_CLIENT, call->start_ns))
            h2_tls_bytes(call->ssl, 1, call->buf, written, H2_PREFACE_BYTES, call->start_ns);
    } else if (written > 0 && call->kind == TLS_KIND_H2) {
        h2_tls_bytes(call->ssl, 1, call->buf, written, 0, call->start_ns);
    }
#endif
    struct http_scratch *s = tls_scratch();
    if (s && written > 0 && !call->skip) {
        if (call->kind == HTTP_REQUEST) {
#ifdef HTTP_PATHS
            __builtin_memcpy(s->key.path, call->path, HTTP_PATH_CAPTURE);
#endif
            tls_request(s, call->ssl, TLS_SIDE_CLIENT, call->method, call->start_ns);
        } else if (call->kind == HTTP_RESPONSE) {
            tls_response(s, call->ssl, TLS_SIDE_SERVER, call->status, call->start_ns);
        }
    }
    tls_leave(thread);
    return 0;
}

/* A read's end: `got` bytes of plaintext at the call's buffer. */
static __always_inline int tls_read_return(struct pt_regs *ctx, struct tls_call *call, u64 thread,
                                           int got)
{
    struct http_scratch *s = tls_scratch();
    if (s && got > 0) {
        tls_bind_received(call, thread);
        u64 now = bpf_ktime_get_ns();
        u8 method = 0;
        u16 status = 0;
#ifdef WITH_HTTP2
        if (h2_tls_bytes(call->ssl, 0, call->buf, got, 0, now)) {
            tls_leave(thread);
            return 0;
        }
#endif
        int kind = tls_classify(s, call->buf, got, &method, &status);
#ifdef WITH_HTTP2
        if (kind == HTTP_NOT_HTTP && got >= H2_PREFACE_BYTES && h2_is_preface(s) &&
            h2_tls_begin(call->ssl, TLS_SIDE_SERVER, now))
            h2_tls_bytes(call->ssl, 0, call->buf, got, H2_PREFACE_BYTES, now);
#endif
        if (kind == HTTP_REQUEST) {
            http_take_path(s);
            tls_request(s, call->ssl, TLS_SIDE_SERVER, method, now);
        } else if (kind == HTTP_RESPONSE) {
            tls_response(s, call->ssl, TLS_SIDE_CLIENT, status, now);
        }
    }
    tls_leave(thread);
    return 0;
}

/* int SSL_write(SSL *ssl, const void *buf, int num) */
int ssl_write_entry(struct pt_regs *ctx)
{
    return tls_write_entry(ctx, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx), 0);
}

int ssl_write_return(struct pt_regs *ctx)
{
    return tls_write_return(ctx, (int)PT_REGS_RC(ctx));
}

/* int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written): 1 on success */
int ssl_write_ex_entry(struct pt_regs *ctx)
{
    return tls_write_entry(ctx, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx),
                           PT_REGS_PARM4(ctx));
}

int ssl_write_ex_return(struct pt_regs *ctx)
{
    u64 written = 0;
    u64 thread = bpf_get_current_pid_tgid();
    struct tls_call *call = tls_calls.lookup(&thread);
    if ((int)PT_REGS_RC(ctx) == 1 && call && call->size_out)
        bpf_probe_read_user(&written, sizeof(written), (const void *)call->size_out);
    return tls_write_return(ctx, written > 0x7fffffff ? 0x7fffffff : (int)written);
}

/* int SSL_read(SSL *ssl, void *buf, int num) */
int ssl_read_entry(struct pt_regs *ctx)
{
    struct tls_call *call = tls_enter(ctx, TLS_OP_READ, PT_REGS_PARM1(ctx));
    if (call)
        call->buf = PT_REGS_PARM2(ctx);
    return 0;
}

int ssl_read_return(struct pt_regs *ctx)
{
    u64 thread;
    struct tls_call *call = tls_returning(ctx, &thread);
    if (!call)
        return 0;
    return tls_read_return(ctx, call, thread, (int)PT_REGS_RC(ctx));
}

/* int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes): 1 on success */
int ssl_read_ex_entry(struct pt_regs *ctx)
{
    struct tls_call *call = tls_enter(ctx, TLS_OP_READ, PT_REGS_PARM1(ctx));
    if (call) {
        call->buf = PT_REGS_PARM2(ctx);
        call->size_out = PT_REGS_PARM4(ctx);
    }
    return 0;
}

int ssl_read_ex_return(struct pt_regs *ctx)
{
    u64 thread;
    struct tls_call *call = tls_returning(ctx, &thread);
    if (!call)
        return 0;
    u64 got = 0;
    if ((int)PT_REGS_RC(ctx) == 1 && call->size_out)
        bpf_probe_read_user(&got, sizeof(got), (const void *)call->size_out);
    return tls_read_return(ctx, call, thread, got > 0x7fffffff ? 0x7fffffff : (int)got);
}

/* SSL_do_handshake, SSL_connect, SSL_accept (SSL *ssl): the handshake's I/O names the socket
 * before the first request is written. */
int ssl_handshake_entry(struct pt_regs *ctx)
{
    tls_enter(ctx, TLS_OP_HANDSHAKE, PT_REGS_PARM1(ctx));
    return 0;
}

int ssl_handshake_return(struct pt_regs *ctx)
{
    u64 thread;
    struct tls_call *call = tls_returning(ctx, &thread);
    if (!call)
        return 0;
    if ((int)PT_REGS_RC(ctx) == 1)         /* done: the peer's last flight was just read */
        tls_bind_received(call, thread);
    tls_leave(thread);
    return 0;
}

/* void SSL_free(SSL *ssl): the connection is over; requests its counting side still waits
 * on are counted with status "none". */
int ssl_free_entry(struct pt_regs *ctx)
{
    u64 ssl = PT_REGS_PARM1(ctx);
    struct http_scratch *s = tls_scratch();
    if (!s)
        return 0;
    struct http_conn_key ck = {};
    tls_conn_key(&ck, ssl, TLS_SIDE_CLIENT);
    struct http_conn *conn = http_conns.lookup(&ck);
    if (!conn || !(conn->seen & TLS_SIDE_CLIENT)) {
        __builtin_memset(&ck, 0, sizeof(ck));
        tls_conn_key(&ck, ssl, TLS_SIDE_SERVER);
        conn = http_conns.lookup(&ck);
        if (!conn || !(conn->seen & TLS_SIDE_SERVER))
            conn = 0;
    }
    if (conn) {
        tls_key(s, &ck);
        http_flush(s, &ck);
    }
#ifdef WITH_HTTP2
    h2_tls_free(ssl);
#endif
    struct tls_conn_id id = tls_conn_id_of(ssl);
    tls_sockets.delete(&id);
    return 0;
}
