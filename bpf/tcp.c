/* TCP connection metrics from tracepoints (no kprobes: tracepoints are stable ABI).
 *
 * With the socket fields located (-DWITH_SOCK_FIELDS: offsets from the running kernel's BTF,
 * exporter/kernel/sockfields.py) sock:inet_sock_set_state and tcp:tcp_probe are raw
 * tracepoints that read what they need from the socket; without them, classic tracepoints
 * whose arguments say it, and no RTT.
 *
 * Every socket the program sees open is remembered in tcp_sockets (keyed by the socket's
 * address, which the kernel does not reuse while the socket lives) with its role and
 * endpoints. Client ports are folded to 0 in kernel keys once the role is known, so a map
 * entry stands for (client address, server address, server port), not for one connection.
 *
 * - opened: SYN_SENT -> ESTABLISHED (client), SYN_RECV -> ESTABLISHED (server)
 * - closed: -> CLOSE of a socket whose open was seen (so opened - closed = active)
 * - connect failures: SYN_SENT -> CLOSE; refused when a reset answered the SYN, timeout when
 *   the SYN was retransmitted without an answer, aborted otherwise (the application gave up
 *   or an ICMP error ended the attempt). With the socket fields, read from the socket at close
 *   (sk_err is ECONNREFUSED; tcp_sock.total_retrans), so a connecting socket needs no entry:
 *   a successful connect costs one insert, not an insert and a replace.
 * - RTT (-DWITH_SOCK_FIELDS, with the socket field offsets of exporter/kernel/sockfields.py):
 *   a socket's smoothed RTT (tcp_sock.srtt_us, read from the socket) is sampled once at close,
 *   and in flight at most once per window of rtt_window_jiffies it receives segments in, from
 *   its second window of life on. A short connection so counts once, with its final srtt.
 *   tcp:tcp_probe runs on every segment an established socket receives, so it is a raw
 *   tracepoint (no copy of its arguments) and looks at no map for a segment whose socket
 *   already received one in the same window: a per-CPU mark of the sockets it looked at last
 *   says so at once, else the socket's own receive timestamps (jiffies of its last ACK and
 *   its last data). The first segment of a window looks the socket up,
 *   and the entry's window guards against a second sample in the window, so a kernel that
 *   left those timestamps alone would only cost more, never count twice.
 * - process (opt-in, -DWITH_PROCESS): the command name of the socket's process, taken where the
 *   kernel runs in that process's context: connect() (SYN_SENT) for a client; for a server's
 *   accepted socket, whose handshake completes in softirq, its first send or receive
 *   (sock:sock_send_length, sock:sock_recv_length), so its open is counted then (or at close,
 *   with no process, if it never sent nor received). Part of every key, so it labels every
 *   TCP metric; the cgroup id goes to the live view only. */

/* Kernels >= 6.10 type tcp_send_reset's `reason` as enum sk_rst_reason, which older headers
 * lack. The enum is 4 bytes either way; give bcc's generated struct a tag we define. */
#define sk_rst_reason ebpf_net_sk_rst_reason
enum ebpf_net_sk_rst_reason { EBPF_NET_SK_RST_REASON_ANY };

#include "common.h"
#include "sock.h"
/* the live view's records (-DWITH_EVENTS); never in the exporter's programs */
#ifdef WITH_EVENTS
#include "events.h"
#endif

#define AF_INET_ 2
#define AF_INET6_ 10
#define PROTO_TCP 6

/* include/net/tcp_states.h */
#define TCPS_ESTABLISHED 1
#define TCPS_SYN_SENT 2
#define TCPS_SYN_RECV 3
#define TCPS_CLOSE 7

#define ROLE_UNKNOWN 0      /* the open was not seen (the socket predates the exporter) */
#define ROLE_CLIENT 1
#define ROLE_SERVER 2

#define SOCK_OPEN_SEEN 1
#define SOCK_SYN_RETRANSMITTED 2
#define SOCK_RESET_RECEIVED 4

#define CONNECT_REFUSED 0
#define CONNECT_TIMEOUT 1
#define CONNECT_ABORTED 2

#define ECONNREFUSED_ 111

/* A connecting socket needs an entry only for what its close cannot read from the socket: the
 * process of connect(), the live view's client port, or (no socket fields) the failure flags. */
#if defined(WITH_PROCESS) || defined(WITH_EVENTS) || !defined(WITH_SOCK_FIELDS)
#define REMEMBER_CONNECTING
#endif

#define RESET_SENT 0
#define RESET_RECEIVED 1

/* Metric ids (field `metric` of struct tcp_key), named in exporter/collectors/tcp.py. */
#define METRIC_OPENED 0
#define METRIC_CLOSED 1
#define METRIC_CONNECT_FAILURES 2
#define METRIC_RETRANSMITS 3
#define METRIC_RESETS 4
#define METRIC_RTT 5
#define METRIC_COUNT 6

/* The slots of map_update_failures (FAILURE_EVENTS, FAILURE_SOCKETS) come from
 * exporter/collectors/tcp.py as -D flags (exporter/app.py, tcp_program_flags). */
#ifndef FAILURE_COUNT
#error "compile with exporter/app.py's flags (tcp_program_flags)"
#endif

/* Open sockets tracked at once. Entries are allocated on demand (no prealloc); 131072 covers
 * busy nodes. A socket that does not fit is counted in map_update_failures: its open is still
 * counted but its close cannot be, so active connections over-read by that count. */
#ifndef SOCKET_CAPACITY
#define SOCKET_CAPACITY 131072
#endif
/* Distinct (metric, variant, client, server, server port) per scrape interval. A pair of
 * endpoints takes about 4 counter entries and 10 RTT slots; 65536 covers ~4000 active pairs per
 * interval. Counts that find it full go to tcp_overflow, so totals stay exact. Overridable. */
#ifndef EVENT_CAPACITY
#define EVENT_CAPACITY 65536
#endif

struct tcp_endpoints {
    u8 family;              /* 4 or 6 */
    u8 role;
    u16 lport;              /* local port, 0 when folded (the client side) */
    u16 rport;              /* remote port, 0 when folded */
    u16 pad;
    u8 laddr[16];
    u8 raddr[16];
#ifdef WITH_PROCESS
    char comm[16];          /* zero when not known */
#endif
};

struct sock_info {
    struct tcp_endpoints ep;
    u32 flags;
    u32 opened_jiffies;     /* when the open (or the socket) was seen: no RTT sample before */
    u32 rtt_window;         /* the window (jiffies / rtt_window_jiffies) of the last sample */
    u32 spare;              /* keeps what follows 8-byte aligned */
#ifdef WITH_EVENTS
    u16 client_port;        /* the live view shows connections, so it keeps the folded port */
    u16 pad[3];
#endif
#ifdef WITH_PROCESS
    u64 cgroup_id;
    u64 process_pending;    /* 1: a server socket whose open waits for its process (see top) */
#endif
};

/* One map holds every TCP counter and the RTT histogram, told apart by `metric`: bcc allows map
 * calls only in plain code, so one map means one counting function for all of them. */
struct tcp_key {
    u32 generation;
    u8 metric;
    u8 pad;
    u16 variant;            /* connect failure reason, reset direction, or histogram slot */
    struct tcp_endpoints ep;
};

BPF_ARRAY(generation, u32, 1);
BPF_F_TABLE("hash", u64, struct sock_info, tcp_sockets, SOCKET_CAPACITY, BPF_F_NO_PREALLOC);
BPF_PERCPU_HASH(tcp_events, struct tcp_key, u64, EVENT_CAPACITY);
/* Counts that found tcp_events full, by (metric, role, variant): index (metric*3+role)*64+variant */
BPF_PERCPU_ARRAY(tcp_overflow, u64, METRIC_COUNT * 3 * 64);
BPF_PERCPU_ARRAY(map_update_failures, u64, FAILURE_COUNT);
/* Entries in tcp_sockets (the sum over CPUs): inserts add one, deletes take one away. */
BPF_PERCPU_ARRAY(tcp_socket_count, s64, 1);

/* With the socket fields and BPF's atomics (Linux 5.12, -DWITH_SOCKET_MARKS; and neither the
 * process label nor the live view, which keep what connect() saw in an entry), a socket whose
 * open was seen is remembered by a mark instead of
 * a tcp_sockets entry: its address with its role in the low bits (a socket is 8-byte aligned
 * at least), in one of the MARK_WAYS words of the group its address hashes to, claimed with a
 * compare-and-swap and cleared at close. Its close reads the endpoints from the socket again.
 * A hash insert and delete cost some 200 ns each here, because a connection's two ends run on
 * two CPUs and the bucket's lock, the bucket and the entry move between their caches; a mark is
 * one word of one cache line and no lock. A socket whose group is full gets an entry as
 * before; so does a marked socket sampled in flight (MARK_HAS_ENTRY), for its window.
 * MARK_GROUPS (a power of two) is set by user space from tcp_sockets' capacity. */
#if defined(WITH_SOCK_FIELDS) && defined(WITH_SOCKET_MARKS) && !defined(REMEMBER_CONNECTING)
#define SOCKET_MARKS
#define MARK_WAYS 4
#define MARK_ROLE 3                 /* ROLE_CLIENT or ROLE_SERVER */
#define MARK_HAS_ENTRY 4
#define MARK_BITS 7
#ifndef MARK_GROUPS
#define MARK_GROUPS 65536
#endif
struct mark_group {
    u64 way[MARK_WAYS];             /* 0: free */
};
BPF_ARRAY(socket_marks, struct mark_group, MARK_GROUPS);
/* Marks in socket_marks (the sum over CPUs). */
BPF_PERCPU_ARRAY(socket_mark_count, s64, 1);
#endif

static __always_inline void count_sockets(s64 change)
{
    u32 zero = 0;
    s64 *count = tcp_socket_count.lookup(&zero);
    if (count)
        *count += change;
}

static __always_inline void count_failure(u32 idx)
{
    u64 *slot = map_update_failures.lookup(&idx);
    if (slot)
        *slot += 1;
}

static __always_inline void count_event(u8 metric, const struct tcp_endpoints *ep, u16 variant,
                                        u64 val)
{
    u32 zero = 0;
    u32 *gen = generation.lookup(&zero);
    struct tcp_key key = {};
    key.generation = gen ? *gen : 0;
    key.metric = metric;
    key.variant = variant;
    key.ep = *ep;

    u64 *count = tcp_events.lookup(&key);
    if (count) {
        *count += val;
        return;
    }
    /* fails with EEXIST when another CPU created it meanwhile, E2BIG when full */
    if (tcp_events.insert(&key, &val) == 0)
        return;
    count = tcp_events.lookup(&key);
    if (count) {
        *count += val;
        return;
    }
    count_failure(FAILURE_EVENTS);
    u32 idx = ((u32)metric * 3 + ep->role) * 64 + (variant & 63);
    count = tcp_overflow.lookup(&idx);
    if (count)
        *count += val;
}

static __always_inline void observe_rtt(const struct tcp_endpoints *ep, u32 srtt_us)
{
    count_event(METRIC_RTT, ep, log2_slot(srtt_us), 1);
    count_event(METRIC_RTT, ep, HIST_SUM_SLOT, srtt_us);
}

/* The client's port is ephemeral: fold it so one entry covers every connection of a pair. */
static __always_inline void fold_client_port(struct tcp_endpoints *ep)
{
    /* both stores unconditional: clang turns a store to one field or the other into
     * `pointer | offset`, which the verifier rejects */
    ep->lport = ep->role == ROLE_CLIENT ? 0 : ep->lport;
    ep->rport = ep->role == ROLE_SERVER ? 0 : ep->rport;
}

/* For tracepoints that give addresses as separate v4 and v6 fields. */
#define ENDPOINTS_FROM_FIELDS(ep, args) do {                                           \
    if ((args)->family == AF_INET6_) {                                                 \
        (ep)->family = 6;                                                              \
        __builtin_memcpy((ep)->laddr, (args)->saddr_v6, 16);                           \
        __builtin_memcpy((ep)->raddr, (args)->daddr_v6, 16);                           \
    } else {                                                                           \
        (ep)->family = 4;                                                              \
        __builtin_memcpy((ep)->laddr, (args)->saddr, 4);                               \
        __builtin_memcpy((ep)->raddr, (args)->daddr, 4);                               \
    }                                                                                  \
    (ep)->lport = (args)->sport;                                                       \
    (ep)->rport = (args)->dport;                                                       \
} while (0)

/* For tracepoints that give struct sockaddr_in / sockaddr_in6 in 28-byte fields. */
static __always_inline void endpoints_from_sockaddrs(struct tcp_endpoints *ep, const u8 *local,
                                                     const u8 *remote)
{
    u16 family = *(const u16 *)local;
    if (family == AF_INET6_) {
        ep->family = 6;
        __builtin_memcpy(ep->laddr, local + 8, 16);
        __builtin_memcpy(ep->raddr, remote + 8, 16);
    } else {
        ep->family = 4;
        __builtin_memcpy(ep->laddr, local + 4, 4);
        __builtin_memcpy(ep->raddr, remote + 4, 4);
    }
    ep->lport = bpf_ntohs(*(const u16 *)(local + 2));
    ep->rport = bpf_ntohs(*(const u16 *)(remote + 2));
}

#ifdef WITH_SOCK_FIELDS
/* the smoothed RTT in microseconds, 0 while none is measured */
static __always_inline u32 sock_srtt_us(const u8 *sk)
{
    return sock_u32(sk, TCP_SRTT_US) >> 3;
}

/* why a connect ended before the handshake completed, from the socket's state at its close */
static __always_inline u16 connect_failure(const u8 *sk)
{
    if (sock_u32(sk, SK_ERR) == ECONNREFUSED_)
        return CONNECT_REFUSED;
    return sock_u32(sk, TCP_TOTAL_RETRANS) ? CONNECT_TIMEOUT : CONNECT_ABORTED;
}

/* The IPv4 endpoints and the family lie in the first bytes of struct sock_common (user space
 * checks that they do, SK_HEAD_BYTES): one read for all of them. */
static __always_inline void endpoints_from_sock(struct tcp_endpoints *ep, const u8 *sk)
{
    struct sock_ends ends = {};
    sock_ends_of(&ends, sk);
    ep->family = ends.family;
    ep->lport = ends.local_port;
    ep->rport = ends.remote_port;
    __builtin_memcpy(ep->laddr, ends.local, 16);
    __builtin_memcpy(ep->raddr, ends.remote, 16);
}
#endif

static __always_inline u32 now_jiffies(void)
{
    return (u32)bpf_jiffies64();
}

#ifdef WITH_SOCK_FIELDS
/* The RTT sampling window in jiffies: tcp.rtt_sample_interval at the kernel's tick rate, which
 * user space measures with sample_clock once this program is loaded
 * (exporter/kernel/jiffies.py) and then writes here. 0 until then: no sample in flight. */
BPF_ARRAY(rtt_window_jiffies, u32, 1);

/* The kernel's two clocks read together, for user space to tell the tick rate: a TC program
 * that user space runs with BPF_PROG_TEST_RUN (it is never attached). */
BPF_ARRAY(clock_sample, u64, 2);

int sample_clock(struct __sk_buff *skb)
{
    u32 jiffies_index = 0, nanoseconds_index = 1;
    u64 *jiffies = clock_sample.lookup(&jiffies_index);
    u64 *nanoseconds = clock_sample.lookup(&nanoseconds_index);
    if (jiffies && nanoseconds) {
        *jiffies = bpf_jiffies64();
        *nanoseconds = bpf_ktime_get_ns();
    }
    return 0;
}
#endif

#ifdef WITH_EVENTS
static __always_inline void keep_client_port(struct sock_info *info)
{
    info->client_port = info->ep.role == ROLE_CLIENT ? info->ep.lport : info->ep.rport;
}

/* For the live view: one record per socket that closes (bpf/events.h). */
static __always_inline void emit_close(const struct sock_info *info, u32 outcome, u32 srtt_us)
{
    struct live_event *ev = live_events.ringbuf_reserve(sizeof(struct live_event));
    if (!ev)
        return;
    __builtin_memset(ev, 0, sizeof(*ev));
    ev->kind = LIVE_TCP_CLOSE;
    ev->family = info->ep.family;
    ev->transport = info->ep.role;
    if (info->ep.role == ROLE_SERVER) {
        __builtin_memcpy(ev->client, info->ep.raddr, 16);
        __builtin_memcpy(ev->server, info->ep.laddr, 16);
        ev->client_port = info->client_port;
        ev->server_port = info->ep.lport;
    } else {
        /* a client, or a socket whose role was not seen: local end first */
        __builtin_memcpy(ev->client, info->ep.laddr, 16);
        __builtin_memcpy(ev->server, info->ep.raddr, 16);
        ev->client_port = info->ep.role == ROLE_CLIENT ? info->client_port : info->ep.lport;
        ev->server_port = info->ep.rport;
    }
    ev->latency_us = srtt_us;
    ev->code = outcome;
#ifdef WITH_PROCESS
    __builtin_memcpy(ev->comm, info->ep.comm, sizeof(ev->comm));
    ev->cgroup_id = info->cgroup_id;
#endif
    live_events.ringbuf_submit(ev, 0);
}
#endif

#ifdef WITH_PROCESS
static __always_inline void take_process(struct sock_info *info)
{
    bpf_get_current_comm(info->ep.comm, sizeof(info->ep.comm));
    info->cgroup_id = bpf_get_current_cgroup_id();
}
#endif

/* 0 when remembered */
static __always_inline int remember_socket(u64 sk, struct sock_info *info)
{
    if (tcp_sockets.insert(&sk, info) == 0) {
        count_sockets(1);
        return 0;
    }
    /* EEXIST: known since SYN_SENT or an RTT sample; else the map is full */
    if (tcp_sockets.update(&sk, info) == 0)
        return 0;
    count_failure(FAILURE_SOCKETS);
    return -1;
}

#ifdef SOCKET_MARKS
static __always_inline struct mark_group *mark_group_of(u64 sk)
{
    u32 group = (u32)((sk * 0x9E3779B97F4A7C15ULL) >> 32) & (MARK_GROUPS - 1);
    return socket_marks.lookup(&group);
}

static __always_inline void count_marks(s64 change)
{
    u32 zero = 0;
    s64 *count = socket_mark_count.lookup(&zero);
    if (count)
        *count += change;
}

/* 1 when the socket is marked with its role; 0 when its group is full */
static __always_inline int mark_open(u64 sk, u8 role)
{
    struct mark_group *group = mark_group_of(sk);
    if (!group)
        return 0;
#pragma unroll
    for (int i = 0; i < MARK_WAYS; i++) {
        if (group->way[i] == 0 && __sync_val_compare_and_swap(&group->way[i], 0, sk | role) == 0) {
            count_marks(1);
            return 1;
        }
    }
    return 0;
}

/* The word that holds the socket's mark, or 0. Only the socket's own events (serialized by its
 * lock) change its mark once set, so a mark found stays the socket's until it clears it. */
static __always_inline u64 *find_mark(u64 sk)
{
    struct mark_group *group = mark_group_of(sk);
    if (!group)
        return 0;
#pragma unroll
    for (int i = 0; i < MARK_WAYS; i++) {
        if ((group->way[i] & ~(u64)MARK_BITS) == sk)
            return &group->way[i];
    }
    return 0;
}

/* The endpoints of a marked socket at its close, as its counters key them: read from the
 * socket and folded. The close has given the local port back by then (skc_num is 0), so a
 * server's port is read from inet_sport, which the kernel leaves. */
static __always_inline void marked_endpoints(struct tcp_endpoints *ep, u64 sk, u64 mark)
{
    endpoints_from_sock(ep, (const u8 *)sk);
    ep->role = mark & MARK_ROLE;
    if (ep->role == ROLE_SERVER)
        ep->lport = bpf_ntohs(sock_u16((const u8 *)sk, INET_SOURCE_PORT));
    fold_client_port(ep);
}
#endif

/* For the events that give the endpoints themselves: a socket with no entry may have a mark,
 * which gives its role, so that its client port is folded as in its other counters. */
static __always_inline void role_from_mark(struct tcp_endpoints *ep, u64 sk)
{
#ifdef SOCKET_MARKS
    u64 *marked = sk ? find_mark(sk) : 0;
    if (marked) {
        ep->role = *marked & MARK_ROLE;
        fold_client_port(ep);
    }
#endif
}

/* With the socket fields, a raw tracepoint: a classic one copies every argument into a buffer
 * first, for each of a connection's ten state changes, half of which matter here. The
 * endpoints are then read from the socket, and only where they are needed. */
#ifdef WITH_SOCK_FIELDS
#define STATE_ENDPOINTS(ep) endpoints_from_sock(ep, (const u8 *)sk)
RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    u64 sk = ctx->args[0];
    int oldstate = ctx->args[1];
    int newstate = ctx->args[2];
#ifdef REMEMBER_CONNECTING
    if (newstate != TCPS_SYN_SENT && newstate != TCPS_ESTABLISHED && newstate != TCPS_CLOSE)
        return 0;
#else
    if (newstate != TCPS_ESTABLISHED && newstate != TCPS_CLOSE)
        return 0;
#endif
    u16 protocol = 0;
    bpf_probe_read_kernel(&protocol, sizeof(protocol), (const u8 *)sk + SK_PROTOCOL);
    if (protocol != PROTO_TCP)
        return 0;
#else
#define STATE_ENDPOINTS(ep) ENDPOINTS_FROM_FIELDS(ep, args)
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != PROTO_TCP)
        return 0;
    u64 sk = (u64)args->skaddr;
    int oldstate = args->oldstate;
    int newstate = args->newstate;
#endif

    if (newstate == TCPS_SYN_SENT) {
#ifdef REMEMBER_CONNECTING
        struct sock_info info = {};
        STATE_ENDPOINTS(&info.ep);
        info.ep.role = ROLE_CLIENT;
#ifdef WITH_EVENTS
        keep_client_port(&info);
#endif
        fold_client_port(&info.ep);
#ifdef WITH_PROCESS
        take_process(&info);            /* connect(): the client's own process */
#endif
        remember_socket(sk, &info);
#endif
        return 0;
    }

    if (newstate == TCPS_ESTABLISHED &&
        (oldstate == TCPS_SYN_SENT || oldstate == TCPS_SYN_RECV)) {
        struct sock_info info = {};
        STATE_ENDPOINTS(&info.ep);
        info.ep.role = oldstate == TCPS_SYN_SENT ? ROLE_CLIENT : ROLE_SERVER;
#ifdef WITH_EVENTS
        keep_client_port(&info);
#endif
        fold_client_port(&info.ep);
        info.flags = SOCK_OPEN_SEEN;
        info.opened_jiffies = now_jiffies();
#ifdef WITH_PROCESS
        /* softirq here: a client keeps what connect() saw; a server waits for its process */
        struct sock_info *known = tcp_sockets.lookup(&sk);
        if (oldstate == TCPS_SYN_SENT && known) {
            __builtin_memcpy(info.ep.comm, known->ep.comm, sizeof(info.ep.comm));
            info.cgroup_id = known->cgroup_id;
        }
        if (oldstate == TCPS_SYN_RECV) {
            info.process_pending = 1;
            remember_socket(sk, &info);
            return 0;
        }
#endif
#ifdef SOCKET_MARKS
        if (!mark_open(sk, info.ep.role))
            remember_socket(sk, &info);
#else
        remember_socket(sk, &info);
#endif
        count_event(METRIC_OPENED, &info.ep, 0, 1);
        return 0;
    }

    if (newstate == TCPS_CLOSE) {
#ifdef SOCKET_MARKS
        u64 *marked = find_mark(sk);
        if (marked) {
            u64 mark = *marked;
            *marked = 0;
            count_marks(-1);
            struct tcp_endpoints ep = {};
            marked_endpoints(&ep, sk, mark);
            count_event(METRIC_CLOSED, &ep, 0, 1);
            u32 srtt_us = sock_srtt_us((const u8 *)sk);
            if (srtt_us)
                observe_rtt(&ep, srtt_us);
            if ((mark & MARK_HAS_ENTRY) && tcp_sockets.delete(&sk) == 0)
                count_sockets(-1);
            return 0;
        }
#endif
        struct sock_info *info = tcp_sockets.lookup(&sk);
#ifndef REMEMBER_CONNECTING
        if (!info && oldstate == TCPS_SYN_SENT) {
            struct tcp_endpoints ep = {};
            STATE_ENDPOINTS(&ep);
            ep.role = ROLE_CLIENT;
            fold_client_port(&ep);
            count_event(METRIC_CONNECT_FAILURES, &ep, connect_failure((const u8 *)sk), 1);
            return 0;
        }
#endif
        if (!info)
            return 0;
        u32 srtt_us = 0;
#ifdef WITH_SOCK_FIELDS
        srtt_us = sock_srtt_us((const u8 *)sk);   /* 0 for a failed connect */
#endif
        if (oldstate == TCPS_SYN_SENT) {
            u16 reason = CONNECT_ABORTED;
            if (info->flags & SOCK_RESET_RECEIVED)
                reason = CONNECT_REFUSED;
            else if (info->flags & SOCK_SYN_RETRANSMITTED)
                reason = CONNECT_TIMEOUT;
            count_event(METRIC_CONNECT_FAILURES, &info->ep, reason, 1);
#ifdef WITH_EVENTS
            emit_close(info, LIVE_TCP_REFUSED + reason, srtt_us);   /* order of CONNECT_* */
#endif
        } else if (info->flags & SOCK_OPEN_SEEN) {
#ifdef WITH_PROCESS
            if (__sync_fetch_and_and(&info->process_pending, 0))   /* never sent nor received */
                count_event(METRIC_OPENED, &info->ep, 0, 1);
#endif
            count_event(METRIC_CLOSED, &info->ep, 0, 1);
#ifdef WITH_EVENTS
            emit_close(info, LIVE_TCP_CLOSED, srtt_us);
#endif
        }
        if (srtt_us)
            observe_rtt(&info->ep, srtt_us);
        if (tcp_sockets.delete(&sk) == 0)
            count_sockets(-1);
    }
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    u64 sk = (u64)args->skaddr;
    struct sock_info *info = tcp_sockets.lookup(&sk);
    if (info) {
        if (args->state == TCPS_SYN_SENT)
            info->flags |= SOCK_SYN_RETRANSMITTED;
        count_event(METRIC_RETRANSMITS, &info->ep, 0, 1);
        return 0;
    }
    struct tcp_endpoints ep = {};
    ENDPOINTS_FROM_FIELDS(&ep, args);
    role_from_mark(&ep, sk);
    count_event(METRIC_RETRANSMITS, &ep, 0, 1);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    u64 sk = (u64)args->skaddr;
    struct sock_info *info = tcp_sockets.lookup(&sk);
    if (info) {
        info->flags |= SOCK_RESET_RECEIVED;
        count_event(METRIC_RESETS, &info->ep, RESET_RECEIVED, 1);
        return 0;
    }
    struct tcp_endpoints ep = {};
    ENDPOINTS_FROM_FIELDS(&ep, args);
    role_from_mark(&ep, sk);
    count_event(METRIC_RESETS, &ep, RESET_RECEIVED, 1);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
    u64 sk = (u64)args->skaddr;
    struct sock_info *info = sk ? tcp_sockets.lookup(&sk) : 0;
    if (info) {
        count_event(METRIC_RESETS, &info->ep, RESET_SENT, 1);
        return 0;
    }
    /* No socket (a reset for a closed port, kernels >= 6.10) or one opened before start. */
    struct tcp_endpoints ep = {};
#ifdef TCP_SEND_RESET_SOCKADDR
    endpoints_from_sockaddrs(&ep, args->saddr, args->daddr);
#else
    ENDPOINTS_FROM_FIELDS(&ep, args);
#endif
    role_from_mark(&ep, sk);
    count_event(METRIC_RESETS, &ep, RESET_SENT, 1);
    return 0;
}

/* NO_RTT_IN_FLIGHT (tcp.rtt_sample_interval: off): no tcp_probe at all, so a received segment
 * costs nothing here; the RTT is then sampled at close only. */
#if defined(WITH_SOCK_FIELDS) && !defined(NO_RTT_IN_FLIGHT)
/* The sockets a CPU's tcp_probe looked at last, each with the end of the window it was looked
 * at in: under bulk traffic a CPU's segments are mostly those of one or two sockets (a
 * transfer's data and its ACKs), and a socket already looked at in its window needs no second
 * look until the window ends. Measured under TCP bulk: all but a few dozen of 400k segments
 * end here, without the socket reads and divisions (some 25 ns of a ~65 ns run). Mapped by a
 * hash of the socket's address; a socket freed, and another allocated at its address, in one
 * window on one CPU, is looked at from the next window on. */
#define PROBE_MARKS 4               /* a power of two: the top 2 bits of the hash */
struct probe_mark {
    u64 sk;
    u32 window_end;                 /* jiffies */
    u32 pad;
};
BPF_PERCPU_ARRAY(probe_marks, struct probe_mark, PROBE_MARKS);

/* Every segment an established socket receives, before the kernel processes it. */
RAW_TRACEPOINT_PROBE(tcp_probe)
{
    const u8 *skp = (const u8 *)ctx->args[0];
    u32 now = now_jiffies();
    u32 index = (u32)(((u64)skp * 0x9E3779B97F4A7C15ULL) >> 62);
    struct probe_mark *mark = probe_marks.lookup(&index);
    if (mark && mark->sk == (u64)skp && (s32)(mark->window_end - now) > 0)
        return 0;                       /* looked at in this window already */
    u32 zero = 0;
    u32 *configured = rtt_window_jiffies.lookup(&zero);
    u32 length = configured ? *configured : 0;
    if (!length)
        return 0;                       /* the tick rate is not known yet */
    u32 window = now / length;
    if (mark) {
        mark->sk = (u64)skp;
        mark->window_end = (window + 1) * length;   /* wraps with jiffies: compared as s32 */
    }
    /* Not the window's first segment if the socket's previous receive, its last ACK or its
     * last data, is in this window. Each read costs some 30 ns: the second only when needed. */
    if (sock_u32(skp, TCP_RCV_TSTAMP) / length == window)
        return 0;
    if (sock_u32(skp, TCP_DATA_RCV_TSTAMP) / length == window)
        return 0;

    u64 sk = (u64)skp;
    struct sock_info *info = tcp_sockets.lookup(&sk);
    if (!info) {
        /* a connection that predates the exporter, or a marked one: remember it to sample it
         * from its next window on */
        struct sock_info fresh = {};
        endpoints_from_sock(&fresh.ep, skp);
        fresh.opened_jiffies = now;
        fresh.rtt_window = window;
#ifdef SOCKET_MARKS
        u64 *marked = find_mark(sk);
        if (marked) {
            fresh.ep.role = *marked & MARK_ROLE;
            fold_client_port(&fresh.ep);
            fresh.flags = SOCK_OPEN_SEEN;
            /* its close looks for the entry; a lost entry is one sample fewer, nothing else */
            if (remember_socket(sk, &fresh) == 0)
                __sync_fetch_and_or(marked, MARK_HAS_ENTRY);
            return 0;
        }
#endif
        remember_socket(sk, &fresh);
        return 0;
    }
    if (now - info->opened_jiffies < length || info->rtt_window == window)
        return 0;
    info->rtt_window = window;
    u32 srtt_us = sock_srtt_us(skp);
    if (srtt_us)
        observe_rtt(&info->ep, srtt_us);
    return 0;
}
#endif

#ifdef WITH_PROCESS
/* A server socket's first send or receive, in its process's context: its open is counted now,
 * with that process. The mark is cleared atomically, so two CPUs never count it twice. */
static __always_inline void take_pending_process(u64 sk)
{
    struct sock_info *info = tcp_sockets.lookup(&sk);
    if (!info || !info->process_pending)
        return;
    if (!__sync_fetch_and_and(&info->process_pending, 0))
        return;
    take_process(info);
    count_event(METRIC_OPENED, &info->ep, 0, 1);
}

TRACEPOINT_PROBE(sock, sock_send_length)
{
    if (args->protocol == PROTO_TCP)
        take_pending_process((u64)args->sk);
    return 0;
}

TRACEPOINT_PROBE(sock, sock_recv_length)
{
    if (args->protocol == PROTO_TCP)
        take_pending_process((u64)args->sk);
    return 0;
}
#endif
