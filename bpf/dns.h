/* DNS over UDP and TCP, parsed in the TC classifier in both directions.
 *
 * A query (QR=0, opcode QUERY, one question) is counted and remembered in dns_pending under
 * (family, transport, client address and port, DNS id) with its time, qtype and server. A
 * response removes that entry and is counted with its rcode and the latency since the query,
 * as a log2 histogram. Queries never answered are swept by user space after dns.timeout.
 *
 * Over TCP a message is a 2-byte length and the DNS message. The exporter parses a segment
 * only where a message starts: it follows each direction of a DNS connection from its SYN (the
 * next message starts at the sequence number after the previous one), so a continuation or a
 * retransmitted segment is never taken for a message. Only the first message of a segment is
 * parsed (a segment carrying several pipelined messages is counted once, for its first). For a
 * connection that began before the exporter, segments are parsed only if they look like a
 * message start, and a failure is not counted as an error.
 *
 * With external names on (-DDNS_ANSWERS), a response with answers to a query of this node's
 * client is copied, up to DNS_ANSWER_CAPTURE bytes, to the ring buffer dns_answers: user
 * space (exporter/decoding/dnsanswers.py) reads its A, AAAA and CNAME records and names the
 * addresses the client resolved. The kernel only copies: a name with compression pointers,
 * chained through CNAMEs, is far easier to follow safely in Python, and answers are few next
 * to packets.
 *
 * Packets that only look like DNS (truncated header, question past the end of the message,
 * a compression pointer or over-long name in the question, qdcount other than 1) and responses
 * with no pending query are skipped and counted in parse_errors[PARSE_ERROR_DNS]. */
#ifndef EBPF_NET_DNS_H
#define EBPF_NET_DNS_H

#include "common.h"
#include "packet.h"

#define DNS_HEADER_LEN 12
#define DNS_MAX_LABELS 128      /* a 255-byte name holds at most 127 labels */
#define DNS_MAX_NAME 255

#define DNS_TRANSPORT_UDP 0
#define DNS_TRANSPORT_TCP 1

#define DNS_KIND_REQUEST 0
#define DNS_KIND_RESPONSE 1
#define DNS_KIND_LATENCY 2

#define TCPHDR_FIN 0x01
#define TCPHDR_RST 0x04

/* DNS_PORT(p): whether p is one of dns.ports, passed by user space, e.g. ((p) == 53) */
#ifndef DNS_PORT
#define DNS_PORT(p) ((p) == 53)
#endif
/* Queries awaiting their response. 65536 covers 13k queries/s unanswered for the 5 s timeout;
 * a query that does not fit is counted in map_update_failures and its response, if any, in
 * parse_errors (no pending query). Overridable. */
#ifndef DNS_PENDING_CAPACITY
#define DNS_PENDING_CAPACITY 65536
#endif
/* Distinct (kind, qtype, rcode, client, server) per scrape interval. */
#ifndef DNS_EVENT_CAPACITY
#define DNS_EVENT_CAPACITY 16384
#endif
/* TCP DNS connections followed at once (LRU: the oldest is forgotten first). */
#define DNS_TCP_STREAMS 4096
/* With the opt-in `query` label (-DDNS_QUERY_NAMES) the question name is kept, in wire format,
 * up to this many bytes (copy_bytes_128); user space labels longer names `other`. */
#define DNS_NAME_CAPTURE 128

/* A query is keyed by its client's end and its id, not by the server's: a query to a Service's
 * ClusterIP is rewritten (DNAT) to a backend after the classifier saw it, and its response
 * reaches the classifier from the backend before the rewrite is undone. The server the client
 * asked is kept in the value, for the labels. A client socket asking two servers the same id
 * at the same time is paired with the first answer. */
struct dns_pending_key {
    u8 family;
    u8 transport;
    u16 id;
    u16 client_port;
    u16 pad;
    u8 client[16];
};

struct dns_pending_value {
    u64 queried_ns;         /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    u16 qtype;
    u16 server_port;
    u32 pad;
    u8 server[16];
#ifdef DNS_QUERY_NAMES
    u8 name[DNS_NAME_CAPTURE];
#endif
};

struct dns_key {
    u32 generation;
    u8 kind;                /* DNS_KIND_* */
    u8 transport;
    u8 family;
    u8 rcode;
    u16 qtype;
    u16 variant;            /* histogram slot for DNS_KIND_LATENCY */
    u16 server_port;
    u16 pad;
    u8 client[16];
    u8 server[16];
#ifdef DNS_QUERY_NAMES
    u8 name[DNS_NAME_CAPTURE];  /* zero for latency entries, which are by rcode only */
#endif
};


BPF_ARRAY(dns_generation, u32, 1);
BPF_HASH(dns_pending, struct dns_pending_key, struct dns_pending_value, DNS_PENDING_CAPACITY);
BPF_PERCPU_HASH(dns_events, struct dns_key, u64, DNS_EVENT_CAPACITY);
/* next expected message start (sequence number) per direction of a TCP DNS connection */
BPF_TABLE("lru_hash", struct packet_direction, u32, dns_tcp_streams, DNS_TCP_STREAMS);
/* counts that found dns_events full: index kind * 16 + rcode (requests: rcode 0) */
BPF_PERCPU_ARRAY(dns_overflow, u64, 3 * 16);


struct dns_header {
    __be16 id;
    __be16 flags;
    __be16 qdcount;
    __be16 ancount;
    __be16 nscount;
    __be16 arcount;
};

struct dns_message {
    u16 id;
    u8 is_response;
    u8 rcode;
    u16 qtype;
    u16 ancount;
    u16 name_len;           /* bytes of the question name, its final zero included */
    u32 name_off;
};

#ifdef DNS_ANSWERS
/* Bytes of a response kept: a query's answers with a few CNAMEs fit in far less, and a cut
 * message keeps the records that fit (user space reads those and counts the cut). */
#define DNS_ANSWER_CAPTURE 512
/* pages of 4 KiB for dns_answers (a power of two; maps.dns_answer_ring_mib) */
#ifndef DNS_ANSWER_PAGES
#define DNS_ANSWER_PAGES 512
#endif
struct dns_answer_record {
    u8 family;
    u8 cut;                 /* the message is longer than the bytes kept */
    u16 length;             /* bytes of message kept */
    u32 pad;
    u8 client[16];          /* the address that asked */
    u8 message[DNS_ANSWER_CAPTURE];
};
BPF_RINGBUF_OUTPUT(dns_answers, DNS_ANSWER_PAGES);
LAYOUT_ANCHOR(dns_answer_record);

/* Copies the response in [off, end) of the packet, `message_len` bytes long in all (more than
 * end - off when a TCP message continues in later segments), for user space. */
static __always_inline void dns_answers_emit(struct __sk_buff *skb, const u8 *client,
                                             u8 family, u32 off, u32 end, u32 message_len)
{
    u32 len = end - off;
    if (len < DNS_HEADER_LEN || len > 0xffff)
        return;
    struct dns_answer_record *r = dns_answers.ringbuf_reserve(sizeof(*r));
    if (!r) {
        count_failure(FAILURE_DNS_ANSWERS);
        return;
    }
    r->cut = message_len > len || len > DNS_ANSWER_CAPTURE;
    if (len > DNS_ANSWER_CAPTURE)
        len = DNS_ANSWER_CAPTURE;
    r->family = family;
    r->length = len;
    r->pad = 0;
    __builtin_memcpy(r->client, client, 16);
    /* the same length, in bounds the verifier can see: [1, DNS_ANSWER_CAPTURE] in the
     * register that sizes the copy (the compiler would drop a mask it has proved useless) */
    u32 size = len - 1;
    asm volatile("" : "+r"(size));
    size = (size & (DNS_ANSWER_CAPTURE - 1)) + 1;
    if (bpf_skb_load_bytes(skb, off, r->message, size) < 0) {
        dns_answers.ringbuf_discard(r, BPF_RB_NO_WAKEUP);
        return;
    }
    /* user space reads the ring on a timer: no wake-up per answer */
    dns_answers.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
}
#endif

/* The key, the pending value and the parsed message live here rather than on the stack: with
 * query names they would not fit in the 512 bytes of BPF stack beside the packet parser's; and
 * the verifier, which cannot know what a map holds, need not follow every length the question
 * name can have through the rest of the program (it would, for values on the stack). */
struct dns_scratch {
    struct dns_key key;
    struct dns_pending_value value;
    struct dns_message msg;
};
BPF_PERCPU_ARRAY(dns_scratch, struct dns_scratch, 1);

enum dns_parse {
    DNS_OK = 0,
    DNS_IGNORE = 1,         /* valid DNS that is not a query or its response (NOTIFY, UPDATE) */
    DNS_MALFORMED = 2,
};

/* Parses the header and question of the message in [off, end) of the packet. */
static __always_inline int dns_parse_message(struct __sk_buff *skb, u32 off, u32 end,
                                             struct dns_message *msg)
{
    struct dns_header hdr;
    if (off + DNS_HEADER_LEN > end || bpf_skb_load_bytes(skb, off, &hdr, sizeof(hdr)) < 0)
        return DNS_MALFORMED;
    u16 flags = bpf_ntohs(hdr.flags);
    if (((flags >> 11) & 0xf) != 0)
        return DNS_IGNORE;                  /* opcode other than QUERY */
    if (bpf_ntohs(hdr.qdcount) != 1)
        return DNS_MALFORMED;
    msg->id = bpf_ntohs(hdr.id);
    msg->is_response = flags >> 15;
    msg->rcode = flags & 0xf;
    msg->ancount = bpf_ntohs(hdr.ancount);

    /* walk the question name: length-prefixed labels up to a zero byte; no compression
     * pointer is allowed in a question (that is also what rules out pointer loops) */
    u32 pos = off + DNS_HEADER_LEN;
    u32 name_start = pos;
    int done = 0;
#pragma clang loop unroll(disable)
    for (int i = 0; i < DNS_MAX_LABELS; i++) {
        u8 len;
        if (pos >= end || bpf_skb_load_bytes(skb, pos, &len, 1) < 0)
            return DNS_MALFORMED;
        if (len == 0) {
            pos += 1;
            done = 1;
            break;
        }
        if (len & 0xc0)
            return DNS_MALFORMED;
        pos += 1 + len;
        if (pos - name_start > DNS_MAX_NAME)
            return DNS_MALFORMED;
    }
    if (!done)
        return DNS_MALFORMED;
    __be16 qtype;
    if (pos + 4 > end || bpf_skb_load_bytes(skb, pos, &qtype, sizeof(qtype)) < 0)
        return DNS_MALFORMED;
    msg->qtype = bpf_ntohs(qtype);
    msg->name_off = name_start;
    msg->name_len = pos - name_start;
    return DNS_OK;
}


static __always_inline void dns_count(struct dns_key *key, u64 val)
{
    u64 *count = dns_events.lookup(key);
    if (count) {
        *count += val;
        return;
    }
    /* fails with EEXIST when another CPU created it meanwhile, E2BIG when full */
    if (dns_events.insert(key, &val) == 0)
        return;
    count = dns_events.lookup(key);
    if (count) {
        *count += val;
        return;
    }
    count_failure(FAILURE_DNS_EVENTS);
    u32 idx = (u32)key->kind * 16 + (key->kind == DNS_KIND_LATENCY ? 0 : key->rcode);
    if (key->kind == DNS_KIND_LATENCY)
        return;             /* the response itself is counted in overflow; its latency is not */
    count = dns_overflow.lookup(&idx);
    if (count)
        *count += val;
}

#ifdef WITH_EVENTS
/* For the live view: one record per answered query (bpf/events.h). */
static __always_inline void dns_emit(const struct dns_pending_key *pending,
                                     const struct dns_message *msg, u64 latency_us,
                                     const struct dns_key *key)
{
    struct live_event *ev = live_events.ringbuf_reserve(sizeof(struct live_event));
    if (!ev)
        return;
    __builtin_memset(ev, 0, sizeof(*ev));
    ev->kind = LIVE_DNS;
    ev->family = pending->family;
    ev->transport = pending->transport;
    ev->client_port = pending->client_port;
    ev->server_port = key->server_port;
    __builtin_memcpy(ev->client, pending->client, 16);
    __builtin_memcpy(ev->server, key->server, 16);
    ev->latency_us = latency_us;
    ev->code = msg->rcode;
    ev->what = msg->qtype;
#ifdef DNS_QUERY_NAMES
    __builtin_memcpy(ev->name, key->name, DNS_NAME_CAPTURE);
#endif
    live_events.ringbuf_submit(ev, 0);
}
#endif

/* Handles one DNS message of the packet; the ends are oriented by the QR bit. */
static __always_inline void dns_handle(struct __sk_buff *skb, const struct packet *pkt,
                                       u8 transport, u32 off, u32 end, u32 message_len,
                                       u32 generation, int count_errors)
{
    u32 zero = 0;
    struct dns_scratch *scratch = dns_scratch.lookup(&zero);
    if (!scratch)
        return;
    __builtin_memset(scratch, 0, sizeof(*scratch));
    struct dns_message *msg = &scratch->msg;
    int res = dns_parse_message(skb, off, end, msg);
    if (res == DNS_IGNORE)
        return;
    if (res == DNS_MALFORMED) {
        if (count_errors)
            count_parse_error(PARSE_ERROR_DNS);
        return;
    }

#ifdef ONCE_PER_CLUSTER
    /* the client's node counts the exchange: a query from another node's client is neither
     * counted nor remembered here, and its response passes unpaired and uncounted */
    if (counted_by_its_node(pkt->family, msg->is_response ? pkt->daddr : pkt->saddr)) {
        struct left_counts *left = left_counts();
        if (left && !msg->is_response)
            left->dns_queries += 1;
        return;
    }
#endif

#ifdef DNS_QUERY_NAMES
    /* volatile: read it back from the map, where the verifier no longer knows which of the
     * name loop's exits it came from (clang would forward the loop's register otherwise) */
    u32 captured = *(volatile u16 *)&msg->name_len;
    if (captured > DNS_NAME_CAPTURE)
        captured = DNS_NAME_CAPTURE;    /* truncated: user space sees no final zero */
#endif
    struct dns_key *key = &scratch->key;

    struct dns_pending_key pending = {};
    pending.family = pkt->family;
    pending.transport = transport;
    pending.id = msg->id;
    key->generation = generation;
    key->transport = transport;
    key->family = pkt->family;
    key->qtype = msg->qtype;
    if (!msg->is_response) {
        pending.client_port = pkt->sport;
        __builtin_memcpy(pending.client, pkt->saddr, 16);
        struct dns_pending_value *value = &scratch->value;
        value->queried_ns = bpf_ktime_get_ns();
        value->qtype = msg->qtype;
        value->server_port = pkt->dport;
        __builtin_memcpy(value->server, pkt->daddr, 16);
#ifdef DNS_QUERY_NAMES
        copy_bytes_128(skb, msg->name_off, captured, value->name);
        __builtin_memcpy(key->name, value->name, DNS_NAME_CAPTURE);
#endif
        /* a retransmitted query keeps the first one's time (EEXIST); E2BIG: map full */
        int err = dns_pending.insert(&pending, value);
        if (err && !dns_pending.lookup(&pending))
            count_failure(FAILURE_DNS_PENDING);
        key->kind = DNS_KIND_REQUEST;
        key->server_port = pkt->dport;
        __builtin_memcpy(key->client, pkt->saddr, 16);
        __builtin_memcpy(key->server, pkt->daddr, 16);
        dns_count(key, 1);
        return;
    }

    pending.client_port = pkt->dport;
    __builtin_memcpy(pending.client, pkt->daddr, 16);
    struct dns_pending_value *query = dns_pending.lookup(&pending);
    if (!query) {
        if (count_errors)
            count_parse_error(PARSE_ERROR_DNS);     /* a response nobody asked for */
        return;
    }
    u64 queried_ns = query->queried_ns;
    /* the server as the client asked it (a ClusterIP, not the backend that answered) */
    u16 server_port = query->server_port;
    __builtin_memcpy(key->server, query->server, 16);
#ifdef DNS_QUERY_NAMES
    /* copied before the delete: a freed element may be reused by another CPU at once */
    __builtin_memcpy(key->name, query->name, DNS_NAME_CAPTURE);
#endif
    /* delete first: if user space's timeout sweep got here before us, it counted a timeout */
    if (dns_pending.delete(&pending) != 0)
        return;
#ifdef DNS_ANSWERS
    if (msg->rcode == 0 && msg->ancount)
        dns_answers_emit(skb, pkt->daddr, pkt->family, off, end, message_len);
#endif
    u64 latency_us = (bpf_ktime_get_ns() - queried_ns) / 1000;
    key->kind = DNS_KIND_RESPONSE;
    key->rcode = msg->rcode;
    key->server_port = server_port;
    __builtin_memcpy(key->client, pkt->daddr, 16);
#ifdef WITH_EVENTS
    dns_emit(&pending, msg, latency_us, key);
#endif
    dns_count(key, 1);
    key->kind = DNS_KIND_LATENCY;
    key->qtype = 0;             /* the histogram is by rcode only */
#ifdef DNS_QUERY_NAMES
    __builtin_memset(key->name, 0, DNS_NAME_CAPTURE);
#endif
    key->variant = log2_slot(latency_us);
    dns_count(key, 1);
    key->variant = HIST_SUM_SLOT;
    dns_count(key, latency_us);
}

/* For TCP: whether this segment starts a message, following the stream from its SYN. */
static __always_inline void dns_tcp(struct __sk_buff *skb, const struct packet *pkt,
                                    u32 generation)
{
    struct packet_direction stream = {};
    direction_of(&stream, pkt, 0);

    if (pkt->tcp_flags & TCPHDR_SYN) {
        u32 first = pkt->tcp_seq + 1;
        dns_tcp_streams.update(&stream, &first);
        return;
    }
    u32 segment_end = pkt->l3_off + pkt->ip_len;
    if (skb->gso_segs > 1 || segment_end > skb->len)
        segment_end = skb->len;
    if (pkt->tcp_flags & (TCPHDR_FIN | TCPHDR_RST)) {
        dns_tcp_streams.delete(&stream);
        if (pkt->payload_off >= segment_end)
            return;
    }
    if (pkt->payload_off + 2 > segment_end)
        return;                             /* no data */

    u32 *next = dns_tcp_streams.lookup(&stream);
    if (next && *next != pkt->tcp_seq)
        return;                             /* continuation or retransmission */
    __be16 prefix;
    if (bpf_skb_load_bytes(skb, pkt->payload_off, &prefix, sizeof(prefix)) < 0)
        return;
    u32 length = bpf_ntohs(prefix);
    if (next)
        *next = pkt->tcp_seq + 2 + length;
    u32 start = pkt->payload_off + 2;
    u32 end = start + length < segment_end ? start + length : segment_end;
    dns_handle(skb, pkt, DNS_TRANSPORT_TCP, start, end, length, generation, next != 0);
}

static __always_inline void account_dns(struct __sk_buff *skb, const struct packet *pkt)
{
    u32 zero = 0;
    u32 *gen = dns_generation.lookup(&zero);
    u32 generation = gen ? *gen : 0;
    if (pkt->protocol == IPPROTO_UDP) {
        u32 end = pkt->l3_off + pkt->ip_len;
        if (end > skb->len)
            end = skb->len;
        u32 whole = pkt->l3_off + pkt->ip_len;     /* the datagram, beyond a short skb */
        dns_handle(skb, pkt, DNS_TRANSPORT_UDP, pkt->payload_off, end,
                   whole - pkt->payload_off, generation, 1);
    } else if (pkt->protocol == IPPROTO_TCP) {
        dns_tcp(skb, pkt, generation);
    }
}

#endif
