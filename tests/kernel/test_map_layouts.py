"""Every kernel map and ring record that user space reads is laid out twice: as a C struct in
bpf/ and as a numpy dtype in exporter/. This loads each program, in the variants whose options
change a layout, and proves the two equal member by member (name, byte offset, size, nested
structs too) against the BTF the kernel holds for the loaded maps: a field moved, resized or
renamed on one side only fails here, naming it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from exporter import config
from exporter.collectors import bash, dns, drops, flows, http, tcp
from exporter.decoding.http2 import RECORD as H2_RECORD
from exporter.kernel import bpfsys, btf, classifier, environment, tlsprobes
from exporter.kernel.loader import Program
from exporter.kernel.programs import tcp_program_flags
from exporter.live.events import LIVE_EVENT
from exporter.naming.externalnames import ANSWER_RECORD

pytestmark = pytest.mark.kernel

U32 = np.dtype("<u4")
ANCHORS = "-DLAYOUT_ANCHORS"
TRACEFS_EVENTS = environment.TRACEFS / "events"


@dataclass(frozen=True)
class Layout:
    """A map's key and value dtypes (None: not read by user space), or a ring record's."""
    name: str                       # the map's name, or the record's struct name
    key: np.dtype | None = None
    value: np.dtype | None = None
    record: np.dtype | None = None


def options(**settings: object) -> config.Config:
    return config.load(None, {}, settings)


def compiled(name: str, source: str, flags: list[str]) -> Program:
    """With its ring buffers' record types in its BTF (LAYOUT_ANCHOR in bpf/common.h)."""
    return Program(name, source, [*flags, ANCHORS])


def classifier_program(settings: config.Config, name: str) -> Program:
    flags = [*classifier.cflags(settings, once_per_cluster=True, answering_servers=True),
             "-DWITH_EVENTS"]           # the live view's records
    return compiled(name, "classifier.c", flags)


def tcp_program(process: bool) -> Program:
    flags = tcp_program_flags(options(**{"tcp.process_label": process}))
    return compiled("layout-tcp", "tcp.c", [*flags, "-DWITH_EVENTS"])


def drops_program() -> Program:
    reasons = drops.reason_names(TRACEFS_EVENTS)
    return compiled("layout-drops", "drops.c", drops.program_flags(1024, reasons))


def tls_program(paths: bool) -> Program:
    settings = options(**({"http.paths": ["/"]} if paths else {}))
    return compiled("layout-tls", "tls.c", tlsprobes.program_flags(settings, False))


FULL = {"dns.query_names": ["*"], "http.paths": ["/"], "labels.external_names": ["*"]}
PROGRAMS = {  # variant -> (how to build it, the layouts it holds)
    "classifier, every option": (
        lambda: classifier_program(options(**FULL), "layout-full"), [
            Layout("flows_0", flows.FLOW_KEY, flows.KERNEL_FLOW_VALUE),
            Layout("recent_flows", U32, flows.RECENT_FLOW),
            Layout("answering_servers", flows.CLIENT_END, flows.SERVER_END),
            Layout("dns_events", dns.DNS_KEY_NAMED, dns.COUNT),
            Layout("dns_pending", dns.PENDING_KEY, dns.PENDING_VALUE_NAMED),
            Layout("http_events", http.HTTP_KEY_PATHS, http.COUNT),
            Layout("http_conns", http.CONN_KEY, http.CONN_PATHS),
            Layout("h2_record", record=H2_RECORD),
            Layout("dns_answer_record", record=ANSWER_RECORD),
            Layout("live_event", record=LIVE_EVENT)]),
    "classifier, defaults": (
        lambda: classifier_program(options(), "layout-plain"), [
            Layout("dns_events", dns.DNS_KEY, dns.COUNT),
            Layout("dns_pending", dns.PENDING_KEY, dns.PENDING_VALUE),
            Layout("http_events", http.HTTP_KEY, http.COUNT),
            Layout("http_conns", http.CONN_KEY, http.CONN)]),
    "tcp": (lambda: tcp_program(False), [Layout("tcp_events", tcp.TCP_KEY, tcp.COUNT)]),
    "tcp, process label": (lambda: tcp_program(True),
                           [Layout("tcp_events", tcp.TCP_KEY_PROCESS, tcp.COUNT)]),
    "drops": (drops_program, [Layout("drops", drops.DROP_KEY, drops.COUNT)]),
    "https": (lambda: tls_program(False), [
        Layout("http_events", http.HTTP_KEY, http.COUNT),
        Layout("http_conns", http.CONN_KEY, http.CONN),
        Layout("h2_record", record=H2_RECORD)]),
    "https, paths": (lambda: tls_program(True), [
        Layout("http_events", http.HTTP_KEY_PATHS, http.COUNT),
        Layout("http_conns", http.CONN_KEY, http.CONN_PATHS)]),
    "bash": (lambda: compiled("layout-bash", "bash.c", []),
             [Layout("bash_command", record=bash.BASH_COMMAND)]),
}


def members(types: btf.Btf, type_id: int) -> dict[str, tuple[int, int, int]]:
    """A struct's members: name -> (byte offset, bytes, type id); the members of an anonymous
    struct or union are its container's, as in C."""
    found = types.resolve(type_id)
    out: dict[str, tuple[int, int, int]] = {}
    for member in found.members:
        if member.bitfield_size or member.bit_offset % 8:
            raise AssertionError(f"{found.name}.{member.name}: a bitfield")
        offset = member.bit_offset // 8
        if not member.name:
            out.update({name: (offset + inner, size, tid) for name, (inner, size, tid)
                        in members(types, member.type_id).items()})
        else:
            out[member.name] = (offset, types.size(member.type_id), member.type_id)
    return out


def differences(types: btf.Btf, type_id: int, dtype: np.dtype, where: str) -> list[str]:
    """What differs between the C type `type_id` and `dtype`. C members named pad* that the
    dtype leaves out are padding; a member that is a struct may be flattened in the dtype (its
    members as fields of their own, at their offsets); every other member must be on both
    sides, at the same offset and of the same size."""
    found = []
    size = types.size(type_id)
    if size != dtype.itemsize:
        found.append(f"{where}: {size} bytes in C, {dtype.itemsize} in Python")
    kind = types.resolve(type_id).kind
    if kind not in (btf.KIND_STRUCT, btf.KIND_UNION):
        if dtype.fields:
            found.append(f"{where}: a scalar in C, fields {list(dtype.fields)} in Python")
        return found
    if not dtype.fields:
        return [*found, f"{where}: a struct in C, a scalar in Python"]
    in_c = flattened(types, members(types, type_id), set(dtype.fields))
    for name, (offset, size, member_type) in in_c.items():
        if name not in dtype.fields:
            if not name.startswith("pad"):
                found.append(f"{where}.{name}: in C, not in Python")
            continue
        field, field_offset = dtype.fields[name][:2]
        if field_offset != offset:
            found.append(f"{where}.{name}: at byte {offset} in C, {field_offset} in Python")
        if field.itemsize != size:
            found.append(f"{where}.{name}: {size} bytes in C, {field.itemsize} in Python")
        elif field.fields:
            found += differences(types, member_type, field, f"{where}.{name}")
    found += [f"{where}.{name}: in Python, not in C" for name in dtype.fields
              if name not in in_c]
    return found


def flattened(types: btf.Btf, in_c: dict[str, tuple[int, int, int]],
              in_python: set[str]) -> dict[str, tuple[int, int, int]]:
    """`in_c` with each struct member that Python does not name, but whose own members it
    does, replaced by those members (at their offsets in the container)."""
    out: dict[str, tuple[int, int, int]] = {}
    for name, (offset, size, member_type) in in_c.items():
        inner = types.resolve(member_type)
        if name not in in_python and inner.kind == btf.KIND_STRUCT:
            nested = members(types, member_type)
            if set(nested) & in_python:
                out.update({n: (offset + o, s, t) for n, (o, s, t) in nested.items()})
                continue
        out[name] = (offset, size, member_type)
    return out


@pytest.fixture(scope="module")
def loaded(kernel_ready: None) -> Iterator[dict[str, Program]]:
    environment.prepare()
    programs: dict[str, Program] = {}
    try:
        for variant, (build, _) in PROGRAMS.items():
            if variant.startswith("drops") and not drops.tracepoint_has_reason(TRACEFS_EVENTS):
                continue
            programs[variant] = build()
        yield programs
    finally:
        for program in programs.values():
            program.close()


def program_btf(program: Program, layouts: list[Layout]) -> btf.Btf:
    """The program's BTF, which its maps' key and value type ids refer to: that of one of its
    maps (every program here keeps its failures in map_update_failures)."""
    name = next((layout.name for layout in layouts if layout.record is None),
                "map_update_failures")
    info = bpfsys.map_info(program.table(name).map_fd)
    assert info.btf_id, f"{program.name}: its maps carry no BTF"
    return btf.Btf(bpfsys.btf_data(info.btf_id))


@pytest.mark.parametrize("variant", PROGRAMS)
def test_each_dtype_is_its_c_struct_member_by_member(loaded: dict[str, Program],
                                                     variant: str) -> None:
    if variant not in loaded:
        pytest.skip("the kernel has no skb:kfree_skb with a drop reason")
    program, layouts = loaded[variant], PROGRAMS[variant][1]
    types = program_btf(program, layouts)
    problems: list[str] = []
    for layout in layouts:
        if layout.record is not None:
            record = types.find_id(btf.KIND_STRUCT, layout.name)
            problems += differences(types, record, layout.record, f"struct {layout.name}")
            continue
        info = bpfsys.map_info(program.table(layout.name).map_fd)
        assert info.btf_key_type_id and info.btf_value_type_id, \
            f"{layout.name}: no BTF key or value type"
        for part, type_id, dtype in (("key", info.btf_key_type_id, layout.key),
                                     ("value", info.btf_value_type_id, layout.value)):
            if dtype is not None:
                problems += differences(types, type_id, dtype, f"{layout.name} {part}")
    assert not problems, "\n".join(problems)


def test_a_difference_is_named() -> None:
    """The comparison itself, against a layout known to differ (a field moved and one
    missing), with a BTF blob built by hand."""
    from tests.btftools import BtfWriter

    writer = BtfWriter([b"u8", b"u16", b"pair", b"a", b"b", b"pad"])
    writer.add(btf.KIND_INT, 0, 1, b"u8", items=(8).to_bytes(4, "little"))
    writer.add(btf.KIND_INT, 0, 2, b"u16", items=(16).to_bytes(4, "little"))
    writer.add(btf.KIND_STRUCT, 3, 4, b"pair", items=writer.member(b"a", 1, 0)
               + writer.member(b"pad", 1, 8) + writer.member(b"b", 2, 16))
    types = btf.Btf(writer.blob())
    same = np.dtype({"names": ["a", "b"], "formats": ["u1", "<u2"], "offsets": [0, 2],
                     "itemsize": 4})
    assert differences(types, 3, same, "pair") == []
    moved = np.dtype({"names": ["a", "c"], "formats": ["u1", "<u2"], "offsets": [1, 2],
                      "itemsize": 4})
    assert differences(types, 3, moved, "pair") == [
        "pair.a: at byte 0 in C, 1 in Python", "pair.b: in C, not in Python",
        "pair.c: in Python, not in C"]
