import pytest

from exporter import config, errors
from exporter.kernel import bpfsys, classifier, programs
from exporter.kernel.interfaces import TcAttacher
from exporter.kernel.tcx import TcxAttacher
from exporter.live.attach import LiveAttacher, LiveTcxAttacher


def flags(**overrides):
    return classifier.cflags(config.load(None, {}, overrides))


def test_every_part_is_compiled_only_when_its_collector_is_on():
    all_on = flags()
    assert {"-DWITH_FLOWS", "-DWITH_DNS", "-DWITH_HTTP"} <= set(all_on)
    assert "-DDNS_PORT(p)=((p)==53)" in all_on
    assert not any(f.startswith("-DHTTP_PORT") for f in all_on)   # every port by default
    assert "-DDNS_QUERY_NAMES" not in all_on and "-DHTTP_PATHS" not in all_on
    only_http = flags(**{"collectors.flows": False, "collectors.dns": False})
    assert "-DWITH_FLOWS" not in only_http and "-DWITH_DNS" not in only_http
    assert classifier.wanted(config.load(None, {}, {"collectors.flows": False,
                                                   "collectors.dns": False,
                                                   "collectors.http": False})) is False


def test_port_lists_and_opt_in_labels_become_defines():
    out = flags(**{"dns.ports": [53, 5353], "http.ports": [80, 8080],
                   "dns.query_names": ["*.svc.cluster.local"], "http.paths": ["/api/"]})
    assert "-DDNS_PORT(p)=((p)==53||(p)==5353)" in out
    assert "-DHTTP_PORT(p)=((p)==80||(p)==8080)" in out
    assert "-DDNS_QUERY_NAMES" in out and "-DHTTP_PATHS" in out


@pytest.mark.parametrize("kinds", [(TcxAttacher, TcAttacher), (LiveTcxAttacher, LiveAttacher)],
                         ids=["exporter", "live view"])
@pytest.mark.parametrize("mode,kernel_has_tcx,tcx", [
    ("auto", True, True), ("auto", False, False), ("tcx", True, True), ("clsact", True, False),
    ("clsact", False, False)])
def test_interfaces_attach_picks_tcx_only_where_the_kernel_has_it(monkeypatch, kinds, mode,
                                                                  kernel_has_tcx, tcx):
    monkeypatch.setattr(bpfsys, "has_tcx", lambda fd: kernel_has_tcx)
    attacher = kinds[0] if tcx else kinds[1]
    monkeypatch.setattr(attacher, "__init__", lambda self, ingress, egress: None)
    assert type(programs.choose_attacher(mode, 3, 4, *kinds)()) is attacher


def test_interfaces_attach_tcx_on_a_kernel_without_it_is_a_start_up_error(monkeypatch):
    monkeypatch.setattr(bpfsys, "has_tcx", lambda fd: False)
    with pytest.raises(errors.StartupError, match=r"interfaces.attach: tcx needs Linux 6.6 or "
                                               r"newer \(this kernel is .+\); use auto or clsact"):
        programs.choose_attacher("tcx", 3, 4)
