"""A loaded kernel map, held by its file descriptor and read and written with bpf(2): what the
exporter uses in place of bcc's tables once the compiler process has handed it the maps.

Its key and value types (`Key`, `Leaf`, and `sLeaf`, one CPU's value of a per-CPU map) are
ctypes types built from the map's BTF, which bcc gives every map it creates, so C code and
Python agree on a layout without it being written twice; a map without BTF has plain integers
(4 or 8 bytes) or byte arrays. Items are read, written and deleted as with bcc's tables:
`table[key]`, `table[key] = value`, `del table[key]` (KeyError when the key is not there)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from . import bpfsys
from .btf import (
    KIND_ARRAY,
    KIND_ENUM,
    KIND_ENUM64,
    KIND_INT,
    KIND_PTR,
    KIND_STRUCT,
    KIND_UNION,
    Btf,
    BtfError,
)

# enum bpf_map_type: the per-CPU kinds, whose values come one per possible CPU
PER_CPU_TYPES = {5, 6, 10}      # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
_UNSIGNED = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64}


def _plain(size: int) -> Any:
    return _UNSIGNED.get(size) or ctypes.c_uint8 * size


def ctypes_type(btf: Btf, type_id: int) -> Any:
    """The ctypes type of a BTF type, laid out as C lays it out; BtfError for what ctypes
    cannot say the same way (bitfields, members out of their natural place)."""
    found = btf.resolve(type_id)
    if found.kind in (KIND_INT, KIND_ENUM, KIND_ENUM64):
        return _plain(found.size_or_type)
    if found.kind == KIND_PTR:
        return ctypes.c_uint64
    if found.kind == KIND_ARRAY:
        element, count = found.array
        return ctypes_type(btf, element) * count
    if found.kind not in (KIND_STRUCT, KIND_UNION):
        raise BtfError(f"BTF type {found.name or type_id}: kind {found.kind} has no ctypes type")
    fields, anonymous = [], []
    for index, member in enumerate(found.members):
        if member.bitfield_size or member.bit_offset % 8:
            raise BtfError(f"{found.name}.{member.name}: a bitfield")
        name = member.name or f"_anonymous{index}"
        if not member.name:
            anonymous.append(name)
        fields.append((name, ctypes_type(btf, member.type_id)))
    base = ctypes.Structure if found.kind == KIND_STRUCT else ctypes.Union
    made = type(found.name or f"btf_{type_id}", (base,),
                {"_anonymous_": anonymous, "_fields_": fields})
    for member, (name, _) in zip(found.members, fields, strict=True):
        if getattr(made, name).offset != member.bit_offset // 8:
            raise BtfError(f"{found.name}.{member.name}: not where ctypes would put it")
    padding = found.size_or_type - ctypes.sizeof(made)
    if padding < 0:
        raise BtfError(f"{found.name}: {ctypes.sizeof(made)} bytes in ctypes, "
                       f"{found.size_or_type} in C")
    if padding:     # trailing padding C has and ctypes' alignment does not give
        made = type(made.__name__, (made,), {"_fields_": [("_tail", ctypes.c_uint8 * padding)]})
    return made


def _as_bytes(value: Any, size: int, what: str) -> bytes:
    raw = value.to_bytes(size, "little") if isinstance(value, int) else bytes(value)
    if len(raw) != size:
        raise ValueError(f"{what} is {len(raw)} bytes, the map's is {size}")
    return raw


class KernelMap:
    """One map of a loaded program; it does not own its descriptor (the program does)."""

    def __init__(self, name: str, fd: int,
                 btf_of: Callable[[int], Btf | None] = lambda _: None) -> None:
        """btf_of: the BTF object of an id (the map's types are in its program's)."""
        info = bpfsys.map_info(fd)
        btf = btf_of(int(info.btf_id)) if info.btf_id else None
        self.name = name
        self.map_fd = fd
        self.map_type = int(info.type)
        self.key_size = int(info.key_size)
        self.value_size = int(info.value_size)
        self.max_entries = int(info.max_entries)
        self.per_cpu = self.map_type in PER_CPU_TYPES
        self.cpus = bpfsys.possible_cpus() if self.per_cpu else 1
        self.Key = self._type(btf, int(info.btf_key_type_id), self.key_size)
        self.sLeaf = self._type(btf, int(info.btf_value_type_id), self.value_size)
        self.Leaf = self.sLeaf * self.cpus if self.per_cpu else self.sLeaf
        # a per-CPU map's values come padded to 8 bytes each
        self._stride = (self.value_size + 7) // 8 * 8 if self.per_cpu else self.value_size

    def get_fd(self) -> int:
        return self.map_fd

    @staticmethod
    def _type(btf: Btf | None, type_id: int, size: int) -> Any:
        if btf is not None and type_id:
            try:
                made = ctypes_type(btf, type_id)
                if ctypes.sizeof(made) == size:
                    return made
            except BtfError:
                pass
        return _plain(size)

    def _key(self, key: Any) -> bytes:
        return _as_bytes(key, self.key_size, f"{self.name}: key")

    def __getitem__(self, key: Any) -> Any:
        raw = bpfsys.map_lookup(self.map_fd, self._key(key), self._stride * self.cpus)
        if raw is None:
            raise KeyError(key)
        if not self.per_cpu:
            return self.sLeaf.from_buffer_copy(raw)
        return [self.sLeaf.from_buffer_copy(raw, cpu * self._stride)
                for cpu in range(self.cpus)]

    def sum(self, key: Any) -> Any:
        """A per-CPU map's integer value summed over CPUs (a one-CPU value)."""
        return self.sLeaf(sum(int(cpu.value) for cpu in self[key]))

    def __setitem__(self, key: Any, value: Any) -> None:
        """OSError when the kernel refuses (E2BIG: the map is full)."""
        if self.per_cpu:
            raise TypeError(f"{self.name}: per-CPU maps are written by their programs only")
        bpfsys.map_update(self.map_fd, self._key(key),
                          _as_bytes(value, self.value_size, f"{self.name}: value"))

    def __delitem__(self, key: Any) -> None:
        if not bpfsys.map_delete(self.map_fd, self._key(key)):
            raise KeyError(key)
