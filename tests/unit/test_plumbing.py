"""Loader source expansion, privilege checks, header discovery and interface selection."""

import pytest

from exporter.kernel import environment, loader
from exporter.kernel.interfaces import Link, NameFilter, select_links


def test_local_includes_are_inlined_once_with_line_markers(tmp_path):
    (tmp_path / "a.h").write_text('#include "b.h"\nint a;\n')
    (tmp_path / "b.h").write_text("int b;\n")
    (tmp_path / "main.c").write_text('#include "a.h"\n#include "b.h"\n#include <linux/x.h>\n'
                                     "int main_;\n")
    text = loader.expand_source(tmp_path / "main.c")
    assert text.count("int b;") == 1
    assert '#line 1 "a.h"' in text
    assert '#line 3 "main.c"' in text
    assert "#include <linux/x.h>" in text       # system headers are bcc's business


def test_a_missing_local_include_names_file_and_line(tmp_path):
    (tmp_path / "main.c").write_text('int x;\n#include "nope.h"\n')
    with pytest.raises(loader.LoadError, match=r"main.c:2: included file nope.h not found"):
        loader.expand_source(tmp_path / "main.c")


def test_the_shipped_programs_expand():
    for name in ("classifier.c", "tcp.c"):
        text = loader.expand_source(loader.bpf_dir() / name)
        assert '#include "' not in text


def caps(*names):
    return sum(1 << environment.CAPABILITIES[n] for n in names)


def test_missing_capabilities():
    assert environment.missing_capabilities(0) == ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
    assert environment.missing_capabilities(caps("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN")) == []
    assert environment.missing_capabilities(caps("CAP_SYS_ADMIN", "CAP_NET_ADMIN")) == []
    assert environment.missing_capabilities(caps("CAP_SYS_ADMIN")) == ["CAP_NET_ADMIN"]


def test_debian_split_headers_are_merged_into_one_tree(tmp_path):
    build = tmp_path / "linux-headers-6.1.0-9-amd64"
    common = tmp_path / "linux-headers-6.1.0-9-common"
    (build / "include/generated").mkdir(parents=True)
    (build / "include/generated/autoconf.h").write_text("x")
    (build / "Makefile").write_text("include ../common")
    (common / "include/linux").mkdir(parents=True)
    (common / "include/linux/kconfig.h").write_text("k")
    pairs = environment._debian_header_pairs(tmp_path)
    assert pairs == [(build, common)]
    target = tmp_path / "merged"
    environment._merge_tree(build, common, target)
    assert (target / "include/linux/kconfig.h").read_text() == "k"
    assert (target / "include/generated/autoconf.h").read_text() == "x"
    assert (target / "Makefile").is_symlink()


def link(index, name, kind="veth", master=None, lower=None):
    return Link(index, name, True, kind, master, lower)


def test_interface_selection_by_regex_and_stacking():
    links = [link(1, "lo", kind=None), link(2, "eth0", kind=None), link(3, "br0", "bridge"),
             link(4, "veth1", master=3), link(5, "veth2", master=3),
             link(6, "eth0.100", "vlan", lower=2), link(7, "vethx")]
    chosen, skipped = select_links(links, NameFilter([".*"], ["lo"]))
    assert sorted(x.name for x in chosen.values()) == ["eth0", "veth1", "veth2", "vethx"]
    assert any("br0: master of monitored veth1, veth2" in s for s in skipped)
    assert any("eth0.100: vlan on monitored eth0" in s for s in skipped)
    # ports not monitored: the bridge itself is
    chosen, _ = select_links(links, NameFilter(["br0", "eth0.100"], []))
    assert sorted(x.name for x in chosen.values()) == ["br0", "eth0.100"]
    # full match, not search
    chosen, _ = select_links(links, NameFilter(["veth"], []))
    assert chosen == {}


def test_a_pattern_written_for_a_search_gets_a_hint():
    names = ["lo", "eth0", "veth1a2b", "cali123"]
    hints = NameFilter(["^veth", "cali.*", "nothing"], []).hints(names)
    # '^veth' is found in veth1a2b but matches nothing in full; 'cali.*' matches; 'nothing'
    # is found nowhere, so there is nothing to suggest
    assert hints == ["'^veth' matches no name in full but is found in 'veth1a2b': patterns "
                     "match the whole name, try 'veth.*'"]
    assert NameFilter(["eth"], []).hints(names) == [
        "'eth' matches no name in full but is found in 'eth0': patterns match the whole "
        "name, try 'eth.*'"]
    assert NameFilter(["veth.*"], []).hints(names) == []


def test_no_headers_anywhere_is_one_clear_line(tmp_path, monkeypatch):
    # set first, so that the variable ensure_headers() sets is undone after the test (it would
    # point later tests' exporters at this test's deleted directory)
    monkeypatch.setenv("BCC_KERNEL_SOURCE", "")
    monkeypatch.delenv("BCC_KERNEL_SOURCE")
    monkeypatch.setattr(environment.platform, "release", lambda: "9.9.9-nowhere")
    with pytest.raises(environment.EnvironmentProblem,
                       match=r"no kernel headers for 9\.9\.9-nowhere: install linux-headers"):
        environment.ensure_headers(src=tmp_path)


def test_headers_found_in_usr_src_are_merged_and_used(tmp_path, monkeypatch):
    # set first, so that the variable ensure_headers() sets is undone after the test (it would
    # point later tests' exporters at this test's deleted directory)
    monkeypatch.setenv("BCC_KERNEL_SOURCE", "")
    monkeypatch.delenv("BCC_KERNEL_SOURCE")
    monkeypatch.setattr(environment.platform, "release", lambda: "9.9.9-nowhere")
    monkeypatch.setattr(environment, "MERGED_HEADERS", tmp_path / "merged")
    build = tmp_path / "linux-headers-6.1.0-9-amd64"
    common = tmp_path / "linux-headers-6.1.0-9-common"
    (build / "include/generated").mkdir(parents=True)
    (build / "Makefile").write_text("")
    (common / "include/linux").mkdir(parents=True)
    (common / "include/linux/kconfig.h").write_text("k")
    where = environment.ensure_headers(src=tmp_path)
    assert where == str(tmp_path / "merged" / build.name)
    assert environment.os.environ["BCC_KERNEL_SOURCE"] == where


@pytest.mark.parametrize("listed, cpus", [("0\n", 1), ("0-1\n", 2), ("0-3,8-11\n", 8),
                                          ("0,2,4-5\n", 4)])
def test_possible_cpus_counts_the_kernels_ranges(tmp_path, listed, cpus):
    from exporter.kernel import bpfsys

    path = tmp_path / "possible"
    path.write_text(listed)
    assert bpfsys.possible_cpus(str(path)) == cpus
