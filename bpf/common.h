/* Pieces shared by every program of ebpf-net-exporter.
 *
 * Counting protocol (see exporter/kernel/maps.py): every counter map's key starts with a
 * generation number. Programs write to the generation held in `generation[0]`; at scrape
 * time user space flips it, waits for an RCU grace period (membarrier), and then reads
 * and deletes the old generation, which no program can still be writing. So no count is
 * ever lost between a read and a delete.
 *
 * Only stable ABI is used: tracepoint arguments, struct __sk_buff and packet bytes. The
 * kernel headers bcc compiles against need not match the running kernel. */
#ifndef EBPF_NET_COMMON_H
#define EBPF_NET_COMMON_H

#include <uapi/linux/bpf.h>

/* A ring buffer's record type is not a map's key or value, so the BTF that the kernel keeps
 * for the maps leaves it out. With -DLAYOUT_ANCHORS (tests/kernel/test_map_layouts.py only) a
 * one-entry array of it puts it there, for the test that proves the record's numpy dtype
 * equal to it. */
#ifdef LAYOUT_ANCHORS
#define LAYOUT_ANCHOR(record) BPF_ARRAY(layout_##record, struct record, 1)
#else
#define LAYOUT_ANCHOR(record)
#endif

/* One end of a connection: the client's (by family, port and address) and the server's, as
 * keys and values of the maps that tie a client end to a server (bpf/http.h, bpf/flows.h). */
struct client_end {
    u8 family;
    u8 pad;
    u16 port;
    u8 addr[16];
};
struct server_end {
    u16 port;
    u16 pad;
    u8 addr[16];
};

static __always_inline void client_end_of(struct client_end *end, u8 family, u16 port,
                                          const u8 *addr)
{
    end->family = family;
    end->port = port;
    __builtin_memcpy(end->addr, addr, 16);
}

static __always_inline void server_end_of(struct server_end *end, u16 port, const u8 *addr)
{
    end->port = port;
    __builtin_memcpy(end->addr, addr, 16);
}

/* Histograms keep one slot per power of two of microseconds: slot i counts values v with
 * 2^(i-1) < v <= 2^i (slot 0 takes v <= 1), so its Prometheus bucket is exactly le = 2^i us.
 * Slot HIST_INF_SLOT takes values past 2^(HIST_INF_SLOT-1) us (33.5 s) and feeds only +Inf.
 * HIST_SUM_SLOT holds the exact sum of the observed microseconds. */
#define HIST_INF_SLOT 26
#define HIST_SUM_SLOT 63

/* ceil(log2(v)), 0 for v <= 1, capped at HIST_INF_SLOT */
static __always_inline u32 log2_slot(u64 v)
{
    if (v <= 1)
        return 0;
    v -= 1;
    u32 slot = 1;
    if (v >> 32) { v >>= 32; slot += 32; }
    if (v >> 16) { v >>= 16; slot += 16; }
    if (v >> 8) { v >>= 8; slot += 8; }
    if (v >> 4) { v >>= 4; slot += 4; }
    if (v >> 2) { v >>= 2; slot += 2; }
    if (v >> 1) { slot += 1; }
    return slot > HIST_INF_SLOT ? HIST_INF_SLOT : slot;
}

/* bcc rewrites map calls (`map.lookup(...)`) only in plain code, not inside macros and not
 * through a map passed as an argument; so each program writes its own small helpers. */

#endif
