/* The counters of what a program could not do, shared by the programs that parse messages
 * (classifier.c, tls.c). The including program declares map_update_failures and parse_errors
 * and numbers their slots. */
#ifndef EBPF_NET_COUNTERS_H
#define EBPF_NET_COUNTERS_H

#include "common.h"

static __always_inline void count_failure(u32 idx)
{
    u64 *slot = map_update_failures.lookup(&idx);
    if (slot)
        *slot += 1;
}

static __always_inline void count_parse_error(u32 idx)
{
    u64 *slot = parse_errors.lookup(&idx);
    if (slot)
        *slot += 1;
}

#endif
