/* The floor of the per-packet measurements: a TC program that does nothing. What the kernel
 * accounts for it (entering the program, sched_clock twice for the statistics, the return) is
 * what any TC program costs, so our classifier's cost is reported as what it adds over this.
 * TC_ACT_UNSPEC, like the classifier: the packet goes on to the next filter untouched. */
#include <uapi/linux/pkt_cls.h>

int bench_floor(struct __sk_buff *skb)
{
    return TC_ACT_UNSPEC;
}
