"""Reads the running kernel's BTF (/sys/kernel/btf/vmlinux): byte offsets of struct members and
the values of enums, as this kernel lays them out.

The headers bcc compiles against need not match the running kernel, so a program that must read
a kernel struct (the drop tracepoint's skb) is given the offsets found here as -D flags, the way
CO-RE relocations would give them. Anonymous structs and unions are looked through, as C does.
The format: Documentation/bpf/btf.rst (a header, then the type and string sections)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_DECL_TAG, KIND_ENUM64 = 13, 14, 15, 17, 19
# bytes that follow the 12-byte common header: fixed, and per item of vlen
_EXTRA_FIXED = {KIND_INT: 4, KIND_ARRAY: 12, KIND_VAR: 4, KIND_DECL_TAG: 4}
_EXTRA_PER_ITEM = {KIND_STRUCT: 12, KIND_UNION: 12, KIND_ENUM: 8, KIND_FUNC_PROTO: 8,
                   KIND_DATASEC: 12, KIND_ENUM64: 12}


class BtfError(Exception):
    pass


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int


@dataclass(frozen=True)
class BtfType:
    kind: int
    name: str
    vlen: int
    members: tuple[Member, ...] = ()
    enumerators: tuple[tuple[str, int], ...] = ()


class Btf:
    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError("BTF data too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BtfError(f"not BTF (magic {magic:#x})")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
        self.types: list[BtfType | None] = [None]      # type id 0 is void
        self._by_name: dict[tuple[int, str], int] = {}
        self._parse(data[hdr_len + type_off:hdr_len + type_off + type_len])

    def _name(self, offset: int) -> str:
        end = self._strings.index(b"\0", offset)
        return self._strings[offset:end].decode()

    def _parse(self, section: bytes) -> None:
        pos = 0
        while pos < len(section):
            name_off, info, _size = struct.unpack_from("<III", section, pos)
            pos += 12
            kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            name = self._name(name_off)
            members: list[Member] = []
            enumerators: list[tuple[str, int]] = []
            if kind in (KIND_STRUCT, KIND_UNION):
                for i in range(vlen):
                    m_name, m_type, m_offset = struct.unpack_from("<III", section, pos + 12 * i)
                    bits = m_offset & 0xFFFFFF if kind_flag else m_offset
                    members.append(Member(self._name(m_name), m_type, bits))
            elif kind == KIND_ENUM:
                for i in range(vlen):
                    e_name, value = struct.unpack_from("<Ii", section, pos + 8 * i)
                    enumerators.append((self._name(e_name), value))
            elif kind == KIND_ENUM64:
                for i in range(vlen):
                    e_name, lo, hi = struct.unpack_from("<III", section, pos + 12 * i)
                    enumerators.append((self._name(e_name), (hi << 32) | lo))
            pos += _EXTRA_FIXED.get(kind, 0) + _EXTRA_PER_ITEM.get(kind, 0) * vlen
            if name:
                self._by_name.setdefault((kind, name), len(self.types))
            self.types.append(BtfType(kind, name, vlen, tuple(members), tuple(enumerators)))

    def find(self, kind: int, name: str) -> BtfType:
        type_id = self._by_name.get((kind, name))
        if type_id is None:
            raise BtfError(f"BTF has no {name}")
        found = self.types[type_id]
        assert found is not None
        return found

    def member_offset(self, struct_name: str, member: str) -> int:
        """Byte offset of a member of `struct struct_name`, looking through anonymous members."""
        offset = self._search(self.find(KIND_STRUCT, struct_name), member)
        if offset is None:
            raise BtfError(f"struct {struct_name} has no member {member}")
        if offset % 8:
            raise BtfError(f"struct {struct_name}.{member} is a bitfield")
        return offset // 8

    def _search(self, composite: BtfType, member: str) -> int | None:
        for m in composite.members:
            if m.name == member:
                return m.bit_offset
            inner = self.types[m.type_id]
            if not m.name and inner is not None and inner.kind in (KIND_STRUCT, KIND_UNION):
                found = self._search(inner, member)
                if found is not None:
                    return m.bit_offset + found
        return None

    def enum(self, name: str) -> dict[str, int]:
        try:
            found = self.find(KIND_ENUM, name)
        except BtfError:
            found = self.find(KIND_ENUM64, name)
        return dict(found.enumerators)


@cache
def kernel_btf(path: Path = VMLINUX) -> Btf:
    try:
        return Btf(path.read_bytes())
    except OSError as e:
        raise BtfError(f"{path}: {e.strerror}") from e
