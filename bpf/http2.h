/* HTTP/2 in clear (h2c) in the TC classifier: the frames of each connection direction are
 * walked in the kernel, and the few that matter are handed to user space, which decodes the
 * header blocks with the connection's HPACK tables (exporter/http2.py) and pairs streams.
 *
 * A connection is HTTP/2 from the client's preface ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", the
 * first bytes of its first payload, h2_begin): both directions get a walk state in h2_dirs and
 * their http_starts entries the H2 mark, so that every later segment of theirs comes to
 * parse_http2. The client's walk starts after the preface; the server's at the start of its
 * next segment, which must hold a plausible frame header (its preface is a SETTINGS frame).
 *
 * A walk follows TCP sequence numbers: a segment that ends before next_seq (a
 * retransmission) is skipped, one that overlaps is walked from next_seq on, and one that starts
 * past it (bytes the node never saw) loses the direction's place (h2_lose): an H2_RECORD_LOST
 * goes to user space, which stops decoding that direction (its HPACK table can no longer be
 * followed) but still counts its streams, and the walk starts again at a later segment that
 * begins with a plausible frame header. Frames split across segments and many frames in one segment are
 * walked alike: a frame header cut by a segment's end is kept byte by byte in the state, a
 * payload's remainder in frame_left.
 *
 * Handed over (struct h2_record of 200 bytes, one per H2_CHUNK bytes of payload at most, so
 * that a steady connection's blocks, mostly table references, take one each): HEADERS,
 * CONTINUATION and PUSH_PROMISE payloads up to H2_BLOCK_CAPTURE bytes per frame (a block past
 * it cannot be decoded and user space says so), SETTINGS (for the HPACK table size),
 * RST_STREAM's error code and GOAWAY's last stream id. DATA, PING, WINDOW_UPDATE and PRIORITY
 * are stepped over. The ring buffer is read by user space on a timer (no wake-ups); a record
 * that finds it full is counted in map_update_failures and the direction's next record says
 * records were lost before it.
 *
 * A run walks H2_STEPS frame steps (a frame header, or up to H2_CHUNK bytes of a handed-over
 * payload, or the whole skipped payload in the segment); for more, parse_http2 tail-calls
 * itself with the position in h2_walks. A segment still not walked when the kernel's tail-call
 * limit stops it (some 2000 steps: 700 small frames in one GSO skb) loses the direction's
 * place, counted as a parse error. The including program provides count_failure(),
 * count_parse_error(), FAILURE_H2_RECORDS and PARSE_ERROR_HTTP2. */
#ifndef EBPF_NET_HTTP2_H
#define EBPF_NET_HTTP2_H

#include "common.h"
#include "packet.h"

/* return values of h2_parse */
#define H2_DONE 0
#define H2_MORE 1           /* tail-call parse_http2 again for the rest of the segment */
#define H2_NO_STATE 2       /* the direction has no walk state: stop sending its segments */
#define H2_ENDED 3          /* the connection ended: likewise for both directions */

#define H2_PREFACE_BYTES 24
#define H2_FRAME_HEADER_BYTES 9
#define H2_CHUNK 128
#define H2_BLOCK_CAPTURE 16384
#define H2_STEPS 64

#define H2_FRAME_HEADERS 1
#define H2_FRAME_RST_STREAM 3
#define H2_FRAME_SETTINGS 4
#define H2_FRAME_PUSH_PROMISE 5
#define H2_FRAME_GOAWAY 7
#define H2_FRAME_CONTINUATION 9
#define H2_FRAME_TYPES 10       /* types 0..9 (RFC 9113); others are stepped over */
#define H2_FLAG_ACK 0x1

#define H2_RECORD_FRAME 1
#define H2_RECORD_LOST 2        /* the direction's bytes can no longer be followed */
#define H2_RECORD_END 3         /* the connection ended (FIN or RST) */

#define H2_DIR_UNSYNCED 0       /* the server's: waiting for its first segment */
#define H2_DIR_SYNCED 1
#define H2_DIR_LOST 2           /* lost its place: each segment's start is tried again */

#define H2_SIDE_UNKNOWN 2       /* from_server of a record whose direction had no state */

/* Directions walked at once (two per connection); LRU: a connection that lost its state to
 * newer ones sends H2_RECORD_LOST with its next segment. */
#ifndef H2_DIR_CAPACITY
#define H2_DIR_CAPACITY 16384
#endif
/* pages of 4 KiB for h2_records (a power of two; maps.http2_ring_mib) */
#ifndef H2_RING_PAGES
#define H2_RING_PAGES 2048
#endif

/* a direction, as its segments' sender sees it */
struct h2_dir_key {
    u8 family;
    u8 pad;
    u16 sport;
    u16 dport;
    u16 pad2;
    u8 saddr[16];
    u8 daddr[16];
};

struct h2_dir {
    u64 last_seen_ns;
    u32 next_seq;           /* sequence number of the next byte to walk */
    u32 frame_left;         /* payload bytes of the current frame still to come */
    u32 capture_left;       /* of them, bytes still to hand over */
    u32 frame_len;
    u32 stream;
    u8 frame_type;
    u8 frame_flags;
    u8 header_have;         /* bytes of a frame header cut by a segment's end, in header */
    u8 state;               /* H2_DIR_* */
    u8 from_server;
    u8 records_lost;        /* a record could not be reserved since the last one sent */
    u8 pad;
    u16 server_port;        /* the server as the client addressed it (before a DNAT) */
    u8 server[16];
    u8 header[16];          /* H2_FRAME_HEADER_BYTES used */
};

/* Field order and offsets are mirrored in exporter/http2.py (RECORD). */
struct h2_record {
    u64 time_ns;
    u8 kind;                /* H2_RECORD_* */
    u8 family;
    u8 from_server;         /* 0 client, 1 server, H2_SIDE_UNKNOWN */
    u8 frame_type;
    u8 frame_flags;
    u8 lost_before;         /* records of this direction were lost before this one */
    u16 chunk_len;
    u16 client_port;        /* H2_SIDE_UNKNOWN: the sender's */
    u16 server_port;
    u32 stream;
    u32 frame_len;
    u32 chunk_offset;       /* where data starts in the frame's payload */
    u32 capture_len;        /* bytes of the frame's payload handed over in all */
    u32 pad;
    u8 client[16];
    u8 server[16];
    u8 data[H2_CHUNK];
};

/* where a walk goes on when parse_http2 tail-calls itself */
struct h2_walk {
    u32 off;                /* into the segment's payload */
    u32 resume;             /* set before the tail call, cleared by the run it starts */
};

BPF_TABLE("lru_hash", struct h2_dir_key, struct h2_dir, h2_dirs, H2_DIR_CAPACITY);
/* The server each client end opened an HTTP/2 connection to, as the client addressed it: the
 * replies of a connection to a Service's ClusterIP whose backend is on this node (or whose
 * replies cross a monitored network interface) come from the backend's address, before the
 * DNAT is undone. Their direction is adopted by h2_adopt_reply when its first payload passes. */
BPF_TABLE("lru_hash", struct http_client_end, struct http_server_end, h2_clients,
          H2_DIR_CAPACITY / 2);
BPF_PERCPU_ARRAY(h2_walks, struct h2_walk, 1);
BPF_RINGBUF_OUTPUT(h2_records, H2_RING_PAGES);

static __always_inline void h2_key_of(struct h2_dir_key *k, const struct packet *pkt, int reverse)
{
    k->family = pkt->family;
    k->sport = reverse ? pkt->dport : pkt->sport;
    k->dport = reverse ? pkt->sport : pkt->dport;
    __builtin_memcpy(k->saddr, reverse ? pkt->daddr : pkt->saddr, 16);
    __builtin_memcpy(k->daddr, reverse ? pkt->saddr : pkt->daddr, 16);
}

/* v & mask, with the mask kept: the verifier wants bounds in the register that indexes or
 * sizes a copy, and the compiler drops a mask whose bounds it has proved already */
static __always_inline u32 h2_masked(u32 v, u32 mask)
{
    asm volatile("" : "+r"(v));
    return v & mask;
}

/* Sends a record of `kind` for the direction; for a frame, `len` bytes of the packet at `at`
 * (at most H2_CHUNK) that start `chunk_offset` bytes into the current frame's payload. */
static __always_inline int h2_emit(struct __sk_buff *skb, const struct h2_dir_key *k,
                                   struct h2_dir *d, u8 kind, u32 at, u32 len,
                                   u32 chunk_offset, u64 now)
{
    struct h2_record *r = h2_records.ringbuf_reserve(sizeof(struct h2_record));
    if (!r) {
        d->records_lost = 1;
        count_failure(FAILURE_H2_RECORDS);
        return -1;
    }
    __builtin_memset(r, 0, __builtin_offsetof(struct h2_record, data));
    r->time_ns = now;
    r->kind = kind;
    r->family = k->family;
    r->from_server = d->from_server;
    r->frame_type = d->frame_type;
    r->frame_flags = d->frame_flags;
    r->stream = d->stream;
    r->frame_len = d->frame_len;
    r->chunk_offset = chunk_offset;
    r->capture_len = chunk_offset + d->capture_left;
    if (d->from_server == H2_SIDE_UNKNOWN) {     /* the sender's view */
        r->client_port = k->sport;
        r->server_port = k->dport;
        __builtin_memcpy(r->client, k->saddr, 16);
        __builtin_memcpy(r->server, k->daddr, 16);
    } else {
        int server = d->from_server == 1;
        r->client_port = server ? k->dport : k->sport;
        r->server_port = d->server_port;
        __builtin_memcpy(r->client, server ? k->daddr : k->saddr, 16);
        __builtin_memcpy(r->server, d->server, 16);
    }
    if (len > 0 && len <= H2_CHUNK) {
        u32 n = h2_masked(len - 1, H2_CHUNK - 1) + 1;      /* 1 to H2_CHUNK */
        if (bpf_skb_load_bytes(skb, at, r->data, n) < 0) {
            h2_records.ringbuf_discard(r, BPF_RB_NO_WAKEUP);
            return -1;
        }
        r->chunk_len = len;
    }
    r->lost_before = d->records_lost;
    d->records_lost = 0;
    h2_records.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    return 0;
}

/* The direction lost its place in the bytes (a gap, a segment not walked to its end, a
 * server's first segment that did not start with a frame): user space is told, and the walk
 * starts again at the start of a later segment that holds a plausible frame header (senders
 * write whole frames, so most segments start with one). */
static __always_inline void h2_lose(struct __sk_buff *skb, const struct h2_dir_key *k,
                                    struct h2_dir *d, u64 now)
{
    d->state = H2_DIR_LOST;
    d->frame_left = 0;
    d->capture_left = 0;
    d->header_have = 0;
    count_parse_error(PARSE_ERROR_HTTP2);
    h2_emit(skb, k, d, H2_RECORD_LOST, 0, 0, 0, now);
}

/* Whether 9 bytes can be a frame header where a walk (re)starts: a known type with its own
 * flags, stream and length rules (RFC 9113 6), within the default maximum frame size. Random
 * bytes pass about once in 10^7. A CONTINUATION cannot start a walk: its HEADERS came before. */
static __always_inline int h2_plausible(u32 len, u8 type, u8 flags, u32 stream, u8 reserved)
{
    if (type >= H2_FRAME_CONTINUATION || len > (1 << 14) || (reserved & 0x80))
        return 0;
    switch (type) {
    case 0:                                     /* DATA: END_STREAM, PADDED */
        return stream != 0 && !(flags & ~0x09);
    case H2_FRAME_HEADERS:                      /* END_STREAM, END_HEADERS, PADDED, PRIORITY */
        return stream != 0 && !(flags & ~0x2d);
    case H2_FRAME_PUSH_PROMISE:                 /* END_HEADERS, PADDED */
        return stream != 0 && !(flags & ~0x0c);
    case H2_FRAME_SETTINGS:
        return stream == 0 && len % 6 == 0 && !(flags & ~H2_FLAG_ACK) &&
               (!(flags & H2_FLAG_ACK) || len == 0);
    case 6:                                     /* PING */
        return stream == 0 && len == 8 && !(flags & ~H2_FLAG_ACK);
    case H2_FRAME_GOAWAY:
        return stream == 0 && len >= 8 && flags == 0;
    case 8:                                     /* WINDOW_UPDATE */
        return len == 4 && flags == 0;
    case H2_FRAME_RST_STREAM:
        return stream != 0 && len == 4 && flags == 0;
    default:                                    /* PRIORITY */
        return stream != 0 && len == 5 && flags == 0;
    }
}

/* Bytes of the current frame's payload to hand over. */
static __always_inline u32 h2_capture_of(u8 type, u8 flags, u32 len)
{
    u32 cap = 0;
    if (type == H2_FRAME_HEADERS || type == H2_FRAME_CONTINUATION ||
        type == H2_FRAME_PUSH_PROMISE)
        cap = H2_BLOCK_CAPTURE;
    else if (type == H2_FRAME_SETTINGS && !(flags & H2_FLAG_ACK))
        cap = H2_CHUNK;
    else if (type == H2_FRAME_RST_STREAM)
        cap = 4;
    else if (type == H2_FRAME_GOAWAY)
        cap = 8;
    else
        return 0;
    return len < cap ? len : cap;
}

static __always_inline int h2_handed_over(u8 type, u8 flags)
{
    return type == H2_FRAME_HEADERS || type == H2_FRAME_CONTINUATION ||
           type == H2_FRAME_PUSH_PROMISE || type == H2_FRAME_RST_STREAM ||
           type == H2_FRAME_GOAWAY || (type == H2_FRAME_SETTINGS && !(flags & H2_FLAG_ACK));
}

/* Takes the frame header in d->header as the current frame's; 0 when the walk stops here (a
 * direction not in step whose segment does not start with a plausible header). */
static __always_inline int h2_take_header(struct __sk_buff *skb, const struct h2_dir_key *k,
                                          struct h2_dir *d, u64 now)
{
    const u8 *h = d->header;
    u32 len = (u32)h[0] << 16 | (u32)h[1] << 8 | h[2];
    u8 type = h[3], flags = h[4];
    u32 stream = ((u32)h[5] & 0x7f) << 24 | (u32)h[6] << 16 | (u32)h[7] << 8 | h[8];
    if (d->state != H2_DIR_SYNCED) {
        if (!h2_plausible(len, type, flags, stream, h[5])) {
            if (d->state == H2_DIR_UNSYNCED)
                h2_lose(skb, k, d, now);        /* the server's first segment: said once */
            return 0;
        }
        d->state = H2_DIR_SYNCED;
    }
    d->frame_len = len;
    d->frame_left = len;
    d->frame_type = type;
    d->frame_flags = flags;
    d->stream = stream;
    d->capture_left = h2_capture_of(type, flags, len);
    if (d->capture_left == 0 && h2_handed_over(type, flags))
        h2_emit(skb, k, d, H2_RECORD_FRAME, 0, 0, 0, now);        /* an empty payload */
    return 1;
}

/* Copies bytes of the packet at [off, end) into d->header after the header_have held, up to a
 * whole header; returns the new offset. */
static __always_inline u32 h2_gather_header(struct __sk_buff *skb, const struct packet *pkt,
                                            struct h2_dir *d, u32 off, u32 end)
{
    u32 have = d->header_have;
#pragma clang loop unroll(disable)
    for (int j = 0; j < H2_FRAME_HEADER_BYTES; j++) {
        if (have >= H2_FRAME_HEADER_BYTES || off >= end)
            break;
        bpf_skb_load_bytes(skb, pkt->payload_off + off, d->header + h2_masked(have, 15), 1);
        have += 1;
        off += 1;
    }
    d->header_have = have;
    return off;
}

/* Walks the segment's payload [w->off, end) for up to H2_STEPS steps; leaves w->off where it
 * stopped. A frame header the last segment cut is finished first, and one this segment cuts
 * is kept last: byte by byte, outside the loop, whose every step the verifier follows. */
static __always_inline void h2_walk_steps(struct __sk_buff *skb, const struct packet *pkt,
                                          const struct h2_dir_key *k, struct h2_dir *d,
                                          struct h2_walk *w, u32 end, u64 now)
{
    u32 off = w->off;
    if (d->header_have && off < end) {
        off = h2_gather_header(skb, pkt, d, off, end);
        if (d->header_have < H2_FRAME_HEADER_BYTES) {
            w->off = off;
            return;
        }
        d->header_have = 0;
        if (!h2_take_header(skb, k, d, now)) {
            w->off = end;
            return;
        }
    }
    /* the position lives in w->off, read back each step: in a register, each path through a
     * step would leave it with other bounds, and the verifier would follow every combination */
    w->off = off;
#pragma clang loop unroll(disable)
    for (int i = 0; i < H2_STEPS; i++) {
        u32 at = *(volatile u32 *)&w->off;
        if (at >= end)
            break;
        u32 avail = end - at;
        u32 left = d->frame_left;
        if (left) {
            u32 take = left < avail ? left : avail;
            u32 capture = d->capture_left;
            if (capture) {
                take = take < capture ? take : capture;
                take = take < H2_CHUNK ? take : H2_CHUNK;
                h2_emit(skb, k, d, H2_RECORD_FRAME, pkt->payload_off + at, take,
                        d->frame_len - left, now);
                d->capture_left = capture - take;
            }
            d->frame_left = left - take;
            *(volatile u32 *)&w->off = at + take;
            continue;
        }
        if (avail < H2_FRAME_HEADER_BYTES)
            break;
        if (bpf_skb_load_bytes(skb, pkt->payload_off + at, d->header,
                               H2_FRAME_HEADER_BYTES) < 0)
            break;
        *(volatile u32 *)&w->off = at + H2_FRAME_HEADER_BYTES;
        if (!h2_take_header(skb, k, d, now)) {
            *(volatile u32 *)&w->off = end;     /* not in step: the next segment, maybe */
            break;
        }
    }
    off = *(volatile u32 *)&w->off;
    if (off < end && end - off < H2_FRAME_HEADER_BYTES && !d->frame_left &&
        d->state == H2_DIR_SYNCED)
        off = h2_gather_header(skb, pkt, d, off, end);     /* a header cut by the end */
    w->off = off;
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
    struct h2_dir_key k = {};
    h2_key_of(&k, pkt, 0);
    u64 now = bpf_ktime_get_ns();
    u32 payload = http_payload_bytes(skb, pkt);
    struct h2_dir *d = h2_dirs.lookup(&k);
    if (!d) {
        /* the state went to newer connections (LRU): user space finds the connection either
         * way round from the sender's view */
        if (payload == 0 && !http_ends(pkt))
            return H2_DONE;
        struct h2_dir gone = {};
        gone.from_server = H2_SIDE_UNKNOWN;
        h2_emit(skb, &k, &gone, http_ends(pkt) ? H2_RECORD_END : H2_RECORD_LOST, 0, 0, 0, now);
        return H2_NO_STATE;
    }
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
            h2_lose(skb, &k, d, now);           /* bytes before it never came by */
            w->off = 0;                         /* ... this one may start a frame */
            d->next_seq = seq + payload;
        } else {
            w->off = (u32)(-ahead);
            d->next_seq = seq + payload;
        }
    } else if (!resumed) {
        w->off = payload;
    }
    h2_walk_steps(skb, pkt, &k, d, w, payload, now);
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
    struct h2_dir_key other = {};
    h2_key_of(&other, pkt, 1);
    h2_dirs.delete(&other);
    h2_emit(skb, &k, &ending, H2_RECORD_END, 0, 0, 0, now);
    return H2_ENDED;
}

/* The segment could not be walked to its end (the tail-call limit): its direction is lost. */
static __always_inline void h2_unwalked(struct __sk_buff *skb, const struct packet *pkt)
{
    u32 zero = 0;
    struct h2_walk *w = h2_walks.lookup(&zero);
    if (w)
        w->resume = 0;
    struct h2_dir_key k = {};
    h2_key_of(&k, pkt, 0);
    struct h2_dir *d = h2_dirs.lookup(&k);
    if (d)
        h2_lose(skb, &k, d, bpf_ktime_get_ns());
}

/* The first payload of a direction that cannot be HTTP/1: when it goes to a client end that
 * opened an HTTP/2 connection to another address (a Service's ClusterIP), it is that
 * connection's server, seen before the DNAT is undone: its direction gets a walk state that
 * names the server as the client addressed it. 1 when adopted. */
static __always_inline int h2_adopt_reply(const struct packet *pkt)
{
    struct http_client_end client = {};
    client.family = pkt->family;
    client.port = pkt->dport;
    __builtin_memcpy(client.addr, pkt->daddr, 16);
    struct http_server_end *addressed = h2_clients.lookup(&client);
    if (!addressed)
        return 0;
    const u64 *was = (const u64 *)addressed->addr, *is = (const u64 *)pkt->saddr;
    if (addressed->port == pkt->sport && was[0] == is[0] && was[1] == is[1])
        return 0;               /* no DNAT: the preface made this direction's state */
    struct h2_dir_key k = {};
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
    h2_key_of(&k, pkt, 0);
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

/* Whether s->head (s->avail bytes) starts with the client's connection preface. */
static __always_inline int h2_is_preface(const struct http_scratch *s)
{
    const u8 *h = s->head;
    u32 avail = *(volatile u32 *)&s->avail;
    return avail >= H2_PREFACE_BYTES && h[0] == 'P' && h[1] == 'R' && h[2] == 'I' &&
           h[3] == ' ' && h[4] == '*' && h[5] == ' ' && h[6] == 'H' && h[7] == 'T' &&
           h[8] == 'T' && h[9] == 'P' && h[10] == '/' && h[11] == '2' && h[12] == '.' &&
           h[13] == '0' && h[14] == '\r' && h[15] == '\n' && h[16] == '\r' &&
           h[17] == '\n' && h[18] == 'S' && h[19] == 'M' && h[20] == '\r' &&
           h[21] == '\n' && h[22] == '\r' && h[23] == '\n';
}

#endif
