/* HTTP/2's frame walk, shared by the classifier (TCP segments, bpf/http2.h) and the HTTPS
 * program (the plaintext handed to OpenSSL, bpf/tls.c): each direction of a connection has a
 * struct h2_dir, the walk steps over frames across the pieces of its bytes as they come (a
 * frame header cut by a piece's end is kept byte by byte, a payload's remainder in
 * frame_left), and the frames that matter go to user space as struct h2_record through the
 * program's own ring buffer h2_records (exporter/decoding/http2.py decodes them).
 *
 * Handed over (records of 200 bytes, one per H2_CHUNK bytes of payload at most, so that a
 * steady connection's blocks, mostly table references, take one each): HEADERS, CONTINUATION
 * and PUSH_PROMISE payloads up to H2_BLOCK_CAPTURE bytes per frame (a block past it cannot be
 * decoded and user space says so), SETTINGS (for the HPACK table size), RST_STREAM's error code
 * and GOAWAY's last stream id. DATA, PING, WINDOW_UPDATE and PRIORITY are stepped over. The ring
 * is read by user space on a timer (no wake-ups); a record that finds it full is counted in
 * map_update_failures and the direction's next record says records were lost before it.
 *
 * A direction that loses its place (h2_lose: a gap, a piece not walked to its end, a first
 * piece that does not start with a frame) says so in an H2_RECORD_LOST and starts again at a
 * later piece that begins with a plausible frame header.
 *
 * A direction's records name their connection as HTTP/1's are keyed (struct http_conn_key:
 * the client, and the server as the client addressed it). The including program defines
 * H2_LOAD(src, off, dst, len) (< 0 when the bytes cannot be read) and H2_STEPS, and provides
 * count_failure(), count_parse_error(), FAILURE_H2_RECORDS and PARSE_ERROR_HTTP2. */
#ifndef EBPF_NET_HTTP2_WALK_H
#define EBPF_NET_HTTP2_WALK_H

#include "common.h"
#include "http.h"

#define H2_PREFACE_BYTES 24
#define H2_FRAME_HEADER_BYTES 9
#define H2_CHUNK 128
#define H2_BLOCK_CAPTURE 16384

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

struct h2_dir {
    u64 last_seen_ns;
    u32 next_seq;           /* sequence number of the next byte to walk (the classifier's) */
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
    u16 server_port;        /* the server as the client addressed it (the classifier's) */
    u8 server[16];
    u8 header[16];          /* H2_FRAME_HEADER_BYTES used */
};

/* Field order and offsets are mirrored in exporter/decoding/http2.py (RECORD). */
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

/* where a walk goes on (the classifier's parse_http2 tail-calls itself with it) */
struct h2_walk {
    u32 off;                /* into the segment's payload, or the call's buffer */
    u32 resume;             /* set before a tail call, cleared by the run it starts */
};

/* where a direction's bytes are read from: a packet (skb, the payload's offset in it) or a
 * TLS call's plaintext (skb unused, the buffer's address); H2_LOAD reads them */
struct h2_src {
    void *skb;
    u64 base;
};

/* pages of 4 KiB for h2_records (a power of two; maps.http2_ring_mib) */
#ifndef H2_RING_PAGES
#define H2_RING_PAGES 1024
#endif
BPF_PERCPU_ARRAY(h2_walks, struct h2_walk, 1);
BPF_RINGBUF_OUTPUT(h2_records, H2_RING_PAGES);
LAYOUT_ANCHOR(h2_record);

/* v & mask, with the mask kept: the verifier wants bounds in the register that indexes or
 * sizes a copy, and the compiler drops a mask whose bounds it has proved already */
static __always_inline u32 h2_masked(u32 v, u32 mask)
{
    asm volatile("" : "+r"(v));
    return v & mask;
}

/* Sends a record of `kind` for the direction, of the connection `e`; for a frame, `len` bytes
 * of the source at `at` (at most H2_CHUNK) that start `chunk_offset` bytes into the current
 * frame's payload. */
static __always_inline int h2_emit(const struct h2_src *src, const struct http_conn_key *e,
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
    r->family = e->family;
    r->from_server = d->from_server;
    r->frame_type = d->frame_type;
    r->frame_flags = d->frame_flags;
    r->stream = d->stream;
    r->frame_len = d->frame_len;
    r->chunk_offset = chunk_offset;
    r->capture_len = chunk_offset + d->capture_left;
    r->client_port = e->client_port;
    r->server_port = e->server_port;
    __builtin_memcpy(r->client, e->client, 16);
    __builtin_memcpy(r->server, e->server, 16);
    if (len > 0 && len <= H2_CHUNK) {
        u32 n = h2_masked(len - 1, H2_CHUNK - 1) + 1;      /* 1 to H2_CHUNK */
        if (H2_LOAD(src, at, r->data, n) < 0) {
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
static __always_inline void h2_lose(const struct h2_src *src, const struct http_conn_key *e,
                                    struct h2_dir *d, u64 now)
{
    d->state = H2_DIR_LOST;
    d->frame_left = 0;
    d->capture_left = 0;
    d->header_have = 0;
    count_parse_error(PARSE_ERROR_HTTP2);
    h2_emit(src, e, d, H2_RECORD_LOST, 0, 0, 0, now);
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
static __always_inline int h2_take_header(const struct h2_src *src, const struct http_conn_key *e,
                                          struct h2_dir *d, u64 now)
{
    const u8 *h = d->header;
    u32 len = (u32)h[0] << 16 | (u32)h[1] << 8 | h[2];
    u8 type = h[3], flags = h[4];
    u32 stream = ((u32)h[5] & 0x7f) << 24 | (u32)h[6] << 16 | (u32)h[7] << 8 | h[8];
    if (d->state != H2_DIR_SYNCED) {
        if (!h2_plausible(len, type, flags, stream, h[5])) {
            if (d->state == H2_DIR_UNSYNCED)
                h2_lose(src, e, d, now);        /* the server's first segment: said once */
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
        h2_emit(src, e, d, H2_RECORD_FRAME, 0, 0, 0, now);        /* an empty payload */
    return 1;
}

/* Copies bytes of the source at [off, end) into d->header after the header_have held, up to
 * a whole header; returns the new offset. */
static __always_inline u32 h2_gather_header(const struct h2_src *src, struct h2_dir *d,
                                            u32 off, u32 end)
{
    u32 have = d->header_have;
#pragma clang loop unroll(disable)
    for (int j = 0; j < H2_FRAME_HEADER_BYTES; j++) {
        if (have >= H2_FRAME_HEADER_BYTES || off >= end)
            break;
        H2_LOAD(src, off, d->header + h2_masked(have, 15), 1);
        have += 1;
        off += 1;
    }
    d->header_have = have;
    return off;
}

/* Walks the source's bytes [w->off, end) for up to H2_STEPS steps; leaves w->off where it
 * stopped. A frame header the last piece cut is finished first, and one this piece cuts is
 * kept last: byte by byte, outside the loop, whose every step the verifier follows. */
static __always_inline void h2_walk_steps(const struct h2_src *src, const struct http_conn_key *e,
                                          struct h2_dir *d, struct h2_walk *w, u32 end,
                                          u64 now)
{
    u32 off = w->off;
    if (d->header_have && off < end) {
        off = h2_gather_header(src, d, off, end);
        if (d->header_have < H2_FRAME_HEADER_BYTES) {
            w->off = off;
            return;
        }
        d->header_have = 0;
        if (!h2_take_header(src, e, d, now)) {
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
                h2_emit(src, e, d, H2_RECORD_FRAME, at, take, d->frame_len - left, now);
                d->capture_left = capture - take;
            }
            d->frame_left = left - take;
            *(volatile u32 *)&w->off = at + take;
            continue;
        }
        if (avail < H2_FRAME_HEADER_BYTES)
            break;
        if (H2_LOAD(src, at, d->header, H2_FRAME_HEADER_BYTES) < 0)
            break;
        *(volatile u32 *)&w->off = at + H2_FRAME_HEADER_BYTES;
        if (!h2_take_header(src, e, d, now)) {
            *(volatile u32 *)&w->off = end;     /* not in step: the next segment, maybe */
            break;
        }
    }
    off = *(volatile u32 *)&w->off;
    if (off < end && end - off < H2_FRAME_HEADER_BYTES && !d->frame_left &&
        d->state == H2_DIR_SYNCED)
        off = h2_gather_header(src, d, off, end);          /* a header cut by the end */
    w->off = off;
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
