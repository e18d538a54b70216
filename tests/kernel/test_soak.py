"""60 s of churn (new TCP connections, DNS, HTTP, new UDP flows past the flow map's capacity)
with a scrape every second; `make soak` runs the same for 10 minutes (benchmarks/soak.py)."""

from __future__ import annotations

import pytest

from benchmarks.soak import run

pytestmark = pytest.mark.kernel


def test_a_minute_of_churn(kernel_ready: None):
    result = run(60)
    assert result.scrapes >= 55
    assert result.decreases == []               # no counter ever went down
    assert result.over_capacity == []           # no kernel map past its capacity
    # RSS flat after warm-up: the median of the last quarter within 8 MiB of the first's
    assert result.rss_end_mib - result.rss_warm_mib < 8, result
    assert result.scrape_p99_ms < 2000, result   # bounded (2 shared cores, other tests running)
    # the churn was counted (the clients ran on a little after the last scrape); an HTTP
    # request whose answer came too late for the client is counted all the same
    for counted, done, most in ((result.tcp_connections, result.churn["tcp"], None),
                                (result.http_requests, result.churn["http"],
                                 result.churn["http_sent"]),
                                (result.dns_responses, result.churn["dns"], None)):
        assert 0.95 * done <= counted <= (done if most is None else most), result
    assert result.udp_flows_overflowed > 0      # the flow map overflowed, nothing was lost
