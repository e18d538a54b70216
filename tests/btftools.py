"""Small BTF blobs built by hand, for unit tests of exporter/kernel/btf.py and its users: a
header, the type records and the string section (Documentation/bpf/btf.rst)."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from exporter.kernel import btf


class BtfWriter:
    """Types are numbered from 1 in the order they are added."""

    def __init__(self, names: Sequence[bytes]) -> None:
        self.strings = b"\0" + b"".join(name + b"\0" for name in names)
        self.types = b""

    def at(self, name: bytes) -> int:
        """The string section offset of a name; 0 (no name) for b""."""
        return self.strings.index(b"\0" + name + b"\0") + 1 if name else 0

    def add(self, kind: int, vlen: int, size_or_type: int, name: bytes = b"",
            items: bytes = b"", kind_flag: int = 0) -> None:
        info = (kind_flag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.at(name), info, size_or_type) + items

    def member(self, name: bytes, type_id: int, bits: int) -> bytes:
        return struct.pack("<III", self.at(name), type_id, bits)

    def enumerator(self, name: bytes, value: int) -> bytes:
        return struct.pack("<Ii", self.at(name), value)

    def blob(self) -> bytes:
        header = struct.pack("<HBBIIIII", btf.BTF_MAGIC, 1, 0, 24, 0, len(self.types),
                             len(self.types), len(self.strings))
        return header + self.types + self.strings
