"""Bash audit records decoded from kernel-shaped bytes, and what they hold."""

from __future__ import annotations

import json
import os

from exporter.collectors.bash import LINE_BYTES, BashCollector, CommandLog, decode
from exporter.serving.selfmetrics import KernelStats

from .batches import BashSource, bash_record


def test_a_record_has_time_pid_user_and_the_line_as_typed(tmp_path):
    command = decode(bash_record(b"ls -la /tmp  # look"), 1_000_000.0, names={1000: "ada"}.get)
    assert command is not None
    record = command.record()
    assert record == {"time": "1970-01-12T13:46:45.000000Z", "type": "bash_command",
                      "pid": 42, "uid": 1000, "user": "ada", "command": "ls -la /tmp  # look",
                      "truncated": False}
    out = tmp_path / "audit.jsonl"
    log = CommandLog(str(out))
    log.write(command)
    log.close()
    assert json.loads(out.read_text()) == record


def test_blank_lines_are_not_commands_and_long_ones_are_flagged():
    assert decode(bash_record(b"   "), 0.0, names=str) is None
    long = decode(bash_record(b"x" * 2000), 0.0, names=str)
    assert long is not None and long.truncated and len(long.line) == LINE_BYTES - 1
    assert decode(b"short", 0.0) is None


def test_the_collector_counts_commands_by_user_and_reports_lost_records():
    stats = KernelStats()
    source = BashSource([bash_record(b"ls", uid=0), bash_record(b"pwd", uid=0),
                         bash_record(b"  ", uid=0), bash_record(b"id", uid=4242)],
                        lost_records=3)
    collector = BashCollector(source, CommandLog(os.devnull), stats, 100, 300)
    (family,) = collector.collect()
    assert {s.labels["user"]: s.value for s in family.samples} == {"root": 2, "4242": 1}
    assert stats.update_failures["bash_commands"] == 3
