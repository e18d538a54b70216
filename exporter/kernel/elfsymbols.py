"""Where a function is in an ELF file, as a uprobe wants it: the file offset of its code, from
the symbol tables (.symtab, then .dynsym) and the loadable segment that holds it. Read with
pyelftools, so the exporter needs no bcc after start-up to probe a process started later."""

from __future__ import annotations

import mmap
from collections.abc import Iterable

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

_SYMBOL_TABLES = ("SHT_SYMTAB", "SHT_DYNSYM")


def _mentioned(path: str, names: Iterable[str]) -> set[str]:
    """The names that are somewhere in the file followed by a NUL: a symbol table's strings
    are (a linker may store "readline" as the tail of "rl_readline", so no NUL is looked for
    before it), so a file without a name has no such symbol. Most executables a scan meets
    are ruled out here, at the speed of a byte search."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return {name for name in names if data.find(name.encode() + b"\0") >= 0}
    except (OSError, ValueError):       # unreadable, or empty (mmap of 0 bytes)
        return set()


def function_offsets(path: str, names: Iterable[str]) -> dict[str, int]:
    """File offsets of the functions among `names` that the file at `path` defines; the
    others are left out (so is every name, when the file is not ELF or cannot be read)."""
    wanted = _mentioned(path, set(names))
    found: dict[str, int] = {}
    if not wanted:
        return found
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            addresses: dict[str, int] = {}
            for section in elf.iter_sections():
                if section["sh_type"] not in _SYMBOL_TABLES:
                    continue
                for symbol in section.iter_symbols():
                    if (symbol.name in wanted and symbol.name not in addresses
                            and symbol["st_shndx"] != "SHN_UNDEF" and symbol["st_value"]):
                        addresses[symbol.name] = symbol["st_value"]
                if len(addresses) == len(wanted):
                    break
            segments = [s.header for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
    except (OSError, ELFError, ValueError):
        return found
    for name, address in addresses.items():
        for segment in segments:
            if segment.p_vaddr <= address < segment.p_vaddr + segment.p_memsz:
                found[name] = address - segment.p_vaddr + segment.p_offset
                break
    return found


def defines(path: str, names: Iterable[str]) -> bool:
    """Whether the file at `path` defines every one of these functions."""
    wanted = set(names)
    return len(function_offsets(path, wanted)) == len(wanted)
