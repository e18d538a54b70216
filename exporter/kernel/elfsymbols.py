"""Where a function is in an ELF file, as a uprobe wants it: the file offset of its code, from
the symbol tables (.symtab, then .dynsym) and the loadable segment that holds it.

Read here with numpy from the file's bytes (64-bit little-endian ELF: x86_64 and aarch64),
not with pyelftools: importing pyelftools cost the long-lived exporter 4.4 MiB of RSS, a
tenth of what it holds when idle, for two tables and a header. tests/unit/test_elfsymbols.py
checks these offsets against pyelftools' on real files."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterable

import numpy as np

ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB = 2, 1
SHT_SYMTAB, SHT_DYNSYM = 2, 11
SHN_UNDEF = 0
PT_LOAD = 1
# Elf64_Ehdr from e_phoff: e_phoff, e_shoff, e_flags, e_ehsize, e_phentsize, e_phnum,
# e_shentsize, e_shnum
_HEADER = struct.Struct("<QQIHHHHH")
_SECTION = np.dtype([("name", "<u4"), ("type", "<u4"), ("flags", "<u8"), ("addr", "<u8"),
                     ("offset", "<u8"), ("size", "<u8"), ("link", "<u4"), ("info", "<u4"),
                     ("addralign", "<u8"), ("entsize", "<u8")])
_SEGMENT = np.dtype([("type", "<u4"), ("flags", "<u4"), ("offset", "<u8"), ("vaddr", "<u8"),
                     ("paddr", "<u8"), ("filesz", "<u8"), ("memsz", "<u8"), ("align", "<u8")])
_SYMBOL = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"),
                    ("value", "<u8"), ("size", "<u8")])


class _Malformed(Exception):
    pass


def _table(data: mmap.mmap, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
    if offset + count * dtype.itemsize > len(data):
        raise _Malformed("a table runs past the end of the file")
    # a copy: a view would keep the mapping from closing
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).copy()


def _places(strings: bytes, name: str) -> list[int]:
    """Where `name` starts in a string table: wherever it is followed by a NUL, since a
    linker may store "readline" as the tail of "rl_readline"."""
    wanted, found, at = name.encode() + b"\0", [], strings.find(name.encode() + b"\0")
    while at >= 0:
        found.append(at)
        at = strings.find(wanted, at + 1)
    return found


def _addresses(data: mmap.mmap, names: set[str]) -> tuple[dict[str, int], np.ndarray]:
    """Each name's address among the defined symbols, and the loadable segments. Only the
    headers and the symbol tables' strings are read first: a file whose strings lack every
    name (most executables a TLS scan meets) costs no more, however large it is."""
    if data[:4] != ELF_MAGIC or data[4] != ELFCLASS64 or data[5] != ELFDATA2LSB:
        raise _Malformed("not a 64-bit little-endian ELF file")
    phoff, shoff, _, _, phentsize, phnum, shentsize, shnum = _HEADER.unpack_from(data, 0x20)
    if phentsize != _SEGMENT.itemsize or shentsize != _SECTION.itemsize:
        raise _Malformed("unexpected header sizes")
    sections = _table(data, shoff, shnum, _SECTION)
    addresses: dict[str, int] = {}
    for table_type in (SHT_SYMTAB, SHT_DYNSYM):
        for section in sections[sections["type"] == table_type]:
            if section["link"] >= shnum:
                raise _Malformed("a symbol table's string table is missing")
            strtab = sections[section["link"]]
            start, size = int(strtab["offset"]), int(strtab["size"])
            if start + size > len(data):
                raise _Malformed("a string table runs past the end of the file")
            strings = data[start:start + size]
            places = {name: _places(strings, name) for name in names - set(addresses)}
            places = {name: found for name, found in places.items() if found}
            if not places:
                continue
            symbols = _table(data, int(section["offset"]),
                             int(section["size"]) // _SYMBOL.itemsize, _SYMBOL)
            defined = symbols[(symbols["shndx"] != SHN_UNDEF) & (symbols["value"] != 0)]
            for name, found in places.items():
                hits = defined[np.isin(defined["name"], found)]
                if len(hits):
                    addresses[name] = int(hits["value"][0])
        if len(addresses) == len(names):
            break
    if not addresses:
        return addresses, np.empty(0, dtype=_SEGMENT)
    segments = _table(data, phoff, phnum, _SEGMENT)
    return addresses, segments[segments["type"] == PT_LOAD]


def function_offsets(path: str, names: Iterable[str]) -> dict[str, int]:
    """File offsets of the functions among `names` that the file at `path` defines; the
    others are left out (so is every name, when the file is not such an ELF file or cannot be
    read)."""
    wanted = set(names)
    if not wanted:
        return {}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            addresses, loads = _addresses(data, wanted)
    except (OSError, ValueError, struct.error, _Malformed):
        return {}
    found: dict[str, int] = {}
    for name, address in addresses.items():
        holding = loads[(loads["vaddr"] <= address) & (address < loads["vaddr"] + loads["memsz"])]
        if len(holding):
            found[name] = address - int(holding["vaddr"][0]) + int(holding["offset"][0])
    return found


def defines(path: str, names: Iterable[str]) -> bool:
    """Whether the file at `path` defines every one of these functions."""
    wanted = set(names)
    return len(function_offsets(path, wanted)) == len(wanted)
