"""Reads the running kernel's BTF (/sys/kernel/btf/vmlinux): byte offsets of struct members and
the values of enums, as this kernel lays them out.

The headers bcc compiles against need not match the running kernel, so a program that must read
a kernel struct (the drop tracepoint's skb) is given the offsets found here as -D flags, the way
CO-RE relocations would give them. Anonymous structs and unions are looked through, as C does.
The format: Documentation/bpf/btf.rst (a header, then the type and string sections)."""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG = 8, 9, 10, 11, 18
KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_DECL_TAG, KIND_ENUM64 = 13, 14, 15, 17, 19
# kinds that only qualify or rename the type they refer to (their size field is that type's id)
_ALIASES = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)
_SIZED = (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64)
POINTER_BYTES = 8
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
    bitfield_size: int = 0      # 0: not a bitfield


@dataclass(frozen=True)
class BtfType:
    kind: int
    name: str
    vlen: int
    size_or_type: int = 0       # bytes (int, struct, union, enum) or the referred type's id
    members: tuple[Member, ...] = ()
    array: tuple[int, int] = (0, 0)     # an array's element type id and element count
    enumerators: tuple[tuple[str, int], ...] = ()


_RECORD = struct.Struct("<III")
_NAMED_KINDS = (KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64)


class Btf:
    """A kernel's BTF holds some 130k types: they are indexed (where each record starts, and the
    named structs, unions and enums) and decoded one by one when asked for. Decoding all of
    them into Python objects took 60 MiB that an exporter would have kept for good."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError("BTF data too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BtfError(f"not BTF (magic {magic:#x})")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
        self._section = data[hdr_len + type_off:hdr_len + type_off + type_len]
        self._starts = array("I", [0])          # type id 0 is void
        self._named: dict[tuple[int, int], int] = {}    # (kind, name offset) -> type id
        self._index()

    def _index(self) -> None:
        section, starts, named = self._section, self._starts, self._named
        fixed, per_item = _EXTRA_FIXED, _EXTRA_PER_ITEM
        pos, end = 0, len(section)
        while pos < end:
            name_off, info, _ = _RECORD.unpack_from(section, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            starts.append(pos)
            if name_off and kind in _NAMED_KINDS:
                named.setdefault((kind, name_off), len(starts) - 1)
            pos += 12 + fixed.get(kind, 0) + per_item.get(kind, 0) * vlen

    def _name(self, offset: int) -> str:
        end = self._strings.index(b"\0", offset)
        return self._strings[offset:end].decode()

    def type(self, type_id: int) -> BtfType | None:
        """The type of this id, decoded; None for void and ids out of range."""
        if not 0 < type_id < len(self._starts):
            return None
        section, pos = self._section, self._starts[type_id]
        name_off, info, size_or_type = _RECORD.unpack_from(section, pos)
        pos += 12
        kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        members: list[Member] = []
        enumerators: list[tuple[str, int]] = []
        dimension = (0, 0)
        if kind == KIND_ARRAY:
            element, _index, count = _RECORD.unpack_from(section, pos)
            dimension = (element, count)
        elif kind in (KIND_STRUCT, KIND_UNION):
            for i in range(vlen):
                m_name, m_type, m_offset = _RECORD.unpack_from(section, pos + 12 * i)
                bits, size = (m_offset & 0xFFFFFF, m_offset >> 24) if kind_flag else (m_offset, 0)
                members.append(Member(self._name(m_name), m_type, bits, size))
        elif kind == KIND_ENUM:
            for i in range(vlen):
                e_name, value = struct.unpack_from("<Ii", section, pos + 8 * i)
                enumerators.append((self._name(e_name), value))
        elif kind == KIND_ENUM64:
            for i in range(vlen):
                e_name, lo, hi = _RECORD.unpack_from(section, pos + 12 * i)
                enumerators.append((self._name(e_name), (hi << 32) | lo))
        return BtfType(kind, self._name(name_off), vlen, size_or_type, tuple(members),
                       dimension, tuple(enumerators))

    def find(self, kind: int, name: str) -> BtfType:
        """The first type of this kind and name (structs, unions and enums)."""
        found = self.type(self.find_id(kind, name))
        assert found is not None
        return found

    def find_id(self, kind: int, name: str) -> int:
        """The id of the first type of this kind and name (structs, unions and enums)."""
        wanted = b"\0" + name.encode() + b"\0"
        at = self._strings.find(wanted)
        while at >= 0:
            type_id = self._named.get((kind, at + 1))
            if type_id is not None:
                return type_id
            at = self._strings.find(wanted, at + 1)
        raise BtfError(f"BTF has no {name}")

    def member_offset(self, struct_name: str, member: str) -> int:
        """Byte offset of a member of `struct struct_name`, looking through anonymous members;
        `a.b` names member b of the struct or union that member a is."""
        return self.member(struct_name, member)[0]

    def member(self, struct_name: str, path: str) -> tuple[int, int]:
        """Byte offset and size of a member of `struct struct_name` (see member_offset)."""
        composite = self.find(KIND_STRUCT, struct_name)
        bits, type_id, walked = 0, 0, struct_name
        for part in path.split("."):
            found = self._search(composite, part)
            if found is None:
                raise BtfError(f"struct {walked} has no member {part}")
            if found[2]:
                raise BtfError(f"struct {struct_name}.{path} is a bitfield")
            bits += found[0]
            type_id = found[1]
            walked += "." + part
            inner = self.resolve(type_id)
            if inner.kind in (KIND_STRUCT, KIND_UNION):
                composite = inner
            elif part != path.split(".")[-1]:
                raise BtfError(f"{walked} is not a struct or union")
        if bits % 8:
            raise BtfError(f"struct {struct_name}.{path} is a bitfield")
        return bits // 8, self.size(type_id)

    def _search(self, composite: BtfType, member: str) -> tuple[int, int, int] | None:
        """(bit offset, type id, bitfield size) of a member, looking through anonymous ones."""
        for m in composite.members:
            if m.name == member:
                return m.bit_offset, m.type_id, m.bitfield_size
            if m.name:
                continue
            inner = self.type(m.type_id)
            if inner is not None and inner.kind in (KIND_STRUCT, KIND_UNION):
                found = self._search(inner, member)
                if found is not None:
                    return m.bit_offset + found[0], found[1], found[2]
        return None

    def resolve(self, type_id: int) -> BtfType:
        """The type behind typedefs and qualifiers."""
        for _ in range(32):
            found = self.type(type_id)
            if found is None:
                raise BtfError(f"BTF type {type_id} is void or out of range")
            if found.kind not in _ALIASES:
                return found
            type_id = found.size_or_type
        raise BtfError(f"BTF type {type_id}: qualifiers nest too deep")

    def size(self, type_id: int) -> int:
        """Bytes of a type: what a read of a member of that type has to take."""
        found = self.resolve(type_id)
        if found.kind in _SIZED:
            return found.size_or_type
        if found.kind == KIND_PTR:
            return POINTER_BYTES
        if found.kind == KIND_ARRAY:
            return self.size(found.array[0]) * found.array[1]
        raise BtfError(f"BTF type {found.name or type_id} has no size")

    def enum(self, name: str) -> dict[str, int]:
        try:
            found = self.find(KIND_ENUM, name)
        except BtfError:
            found = self.find(KIND_ENUM64, name)
        return dict(found.enumerators)


def kernel_btf(path: Path = VMLINUX) -> Btf:
    """Read afresh by each caller (about 0.07 s), so its 6 MB are not kept for the exporter's
    life: the offsets are all that is wanted from it, once, at start-up."""
    try:
        return Btf(path.read_bytes())
    except OSError as e:
        raise BtfError(f"{path}: {e.strerror}") from e
