"""The names of packet drop reasons, as the running kernel names them.

Read from the `skb:kfree_skb` tracepoint's format (its print format maps each `reason` value
to a name with __print_symbolic), else from the BTF enum `skb_drop_reason`, whose names carry an
`SKB_DROP_REASON_` prefix that is taken off. Never from a table compiled in, which would go
stale: kernels add reasons in most releases."""

from __future__ import annotations

import re
from pathlib import Path

from . import btf

_SYMBOLIC = re.compile(r"__print_symbolic\(REC->reason,(.*)\)\s*$", re.DOTALL)
_ENTRY = re.compile(r"\{\s*(\d+)\s*,\s*\"([^\"]*)\"\s*\}")
BTF_PREFIX = "SKB_DROP_REASON_"
# values that do not mean "dropped" (older kernels passed them through kfree_skb too)
NOT_DROPS = ("NOT_DROPPED_YET", "CONSUMED")


def from_format(text: str) -> dict[int, str]:
    match = _SYMBOLIC.search(text)
    if not match:
        return {}
    return {int(value): name for value, name in _ENTRY.findall(match.group(1))}


def from_btf(table: btf.Btf) -> dict[int, str]:
    reasons = {}
    for name, value in table.enum("skb_drop_reason").items():
        if value < 0 or name.endswith("_MASK"):
            continue            # SKB_DROP_REASON_SUBSYS_MASK: a bit mask, not a reason
        short = name[len(BTF_PREFIX):] if name.startswith(BTF_PREFIX) else \
            name.removeprefix("SKB_")
        reasons[value] = short
    return reasons


def kernel_reasons(format_path: Path) -> dict[int, str]:
    """Reason value -> name for this kernel; empty when neither source names them."""
    try:
        reasons = from_format(format_path.read_text())
    except OSError:
        reasons = {}
    if reasons:
        return reasons
    try:
        return from_btf(btf.kernel_btf())
    except btf.BtfError:
        return {}


def name_of(reasons: dict[int, str], value: int) -> str:
    return reasons.get(value, f"unknown:{value}")


def not_drop_values(reasons: dict[int, str]) -> list[int]:
    return sorted(value for value, name in reasons.items() if name in NOT_DROPS)
