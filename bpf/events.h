/* Records for the live view (`ebpf-net-exporter flows`), sent through a ring buffer as each
 * exchange completes. Compiled in only with -DWITH_EVENTS, which only the live view passes:
 * the exporter's programs never carry this map or the code that fills it. */
#ifndef EBPF_NET_EVENTS_H
#define EBPF_NET_EVENTS_H

#include "common.h"

#define LIVE_DNS 1          /* a DNS response matched to its query */
#define LIVE_HTTP 2         /* an HTTP response matched to its request */
#define LIVE_TCP_CLOSE 3    /* a TCP socket closed (or a connect failed) */
#define LIVE_NAME_BYTES 128

/* Field order and offsets are mirrored in exporter/live/events.py. */
struct live_event {
    u8 kind;                /* LIVE_* */
    u8 family;              /* 4 or 6 */
    u8 transport;           /* DNS: 0 udp, 1 tcp; HTTP: 0 http, 1 https; TCP close: the
                             * socket's role */
    u8 pad;
    u16 client_port;
    u16 server_port;
    u8 client[16];
    u8 server[16];
    u64 latency_us;         /* DNS, HTTP: query to response; TCP close: last smoothed RTT */
    u32 code;               /* DNS rcode, HTTP status, TCP close outcome (LIVE_TCP_*) */
    u32 what;               /* DNS qtype, HTTP method */
    u64 cgroup_id;          /* TCP close, with -DWITH_PROCESS: cgroup of the process */
    char comm[16];          /* TCP close, with -DWITH_PROCESS: command name of the process */
    u8 name[LIVE_NAME_BYTES];   /* DNS question name (wire format), HTTP request target */
};

/* outcome of a TCP socket (code of LIVE_TCP_CLOSE) */
#define LIVE_TCP_CLOSED 0
#define LIVE_TCP_REFUSED 1
#define LIVE_TCP_TIMEOUT 2
#define LIVE_TCP_ABORTED 3

/* 256 KiB: ~1200 records between two polls of the live view (every 100 ms) */
BPF_RINGBUF_OUTPUT(live_events, 64);
LAYOUT_ANCHOR(live_event);

#endif
