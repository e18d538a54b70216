/* The bash audit: every line an interactive bash reads with readline(), from a uretprobe on
 * `readline` in the bash binary (user space, so no kernel struct is read at all). A record per
 * non-empty line goes to user space through a ring buffer, with the reader's pid and uid. */
#include <uapi/linux/ptrace.h>
#include "common.h"

/* Bytes of a command line kept; longer lines are cut (and flagged). */
#define BASH_LINE_BYTES 512

struct bash_command {
    u64 time_ns;            /* bpf_ktime_get_ns: CLOCK_MONOTONIC */
    u32 pid;                /* the bash process (tgid) */
    u32 uid;
    s32 length;             /* what bpf_probe_read_user_str returned: bytes with the NUL */
    u32 pad;
    char line[BASH_LINE_BYTES];
};

/* 64 KiB: ~120 commands between two polls (every 100 ms): far more than anyone types. */
BPF_RINGBUF_OUTPUT(bash_commands, 16);
LAYOUT_ANCHOR(bash_command);
/* records the ring buffer had no room for */
BPF_PERCPU_ARRAY(map_update_failures, u64, 1);

int on_readline_return(struct pt_regs *ctx)
{
    const char *line = (const char *)PT_REGS_RC(ctx);
    if (!line)
        return 0;           /* end of input */
    struct bash_command *cmd = bash_commands.ringbuf_reserve(sizeof(struct bash_command));
    if (!cmd) {
        u32 zero = 0;
        u64 *lost = map_update_failures.lookup(&zero);
        if (lost)
            *lost += 1;
        return 0;
    }
    cmd->length = bpf_probe_read_user_str(cmd->line, sizeof(cmd->line), line);
    if (cmd->length <= 1) {
        bash_commands.ringbuf_discard(cmd, 0);      /* an empty line, or unreadable */
        return 0;
    }
    cmd->time_ns = bpf_ktime_get_ns();
    cmd->pid = bpf_get_current_pid_tgid() >> 32;
    cmd->uid = (u32)bpf_get_current_uid_gid();
    cmd->pad = 0;
    bash_commands.ringbuf_submit(cmd, 0);
    return 0;
}
