"""exporter/kernel/elfsymbols.py against pyelftools, on the files the HTTPS probes and the
bash audit reach on this machine, and on files that are not what it reads."""

from __future__ import annotations

import glob
import os
import shutil
import sys

import pytest
from elftools.elf.elffile import ELFFile

from exporter.kernel import elfsymbols, tlsprobes

PROBED = [symbol for symbol, *_ in tlsprobes.PROBES]
FILES = sorted({*glob.glob("/usr/lib/*/libssl.so.3"), *glob.glob("/usr/lib/*/libcrypto.so.3"),
                os.path.realpath(sys.executable),
                *(os.path.realpath(path) for path in (shutil.which("bash"),) if path)})


def reference(path: str, names: list[str]) -> dict[str, int]:
    """pyelftools' answer: a defined symbol's address, as a file offset of its segment."""
    found: dict[str, int] = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for section in elf.iter_sections():
            if section["sh_type"] not in ("SHT_SYMTAB", "SHT_DYNSYM"):
                continue
            for symbol in section.iter_symbols():
                if (symbol.name in names and symbol.name not in found
                        and symbol["st_shndx"] != "SHN_UNDEF" and symbol["st_value"]):
                    found[symbol.name] = symbol["st_value"]
        for name, address in list(found.items()):
            for segment in elf.iter_segments():
                if segment["p_type"] == "PT_LOAD" and \
                        segment["p_vaddr"] <= address < segment["p_vaddr"] + segment["p_memsz"]:
                    found[name] = address - segment["p_vaddr"] + segment["p_offset"]
                    break
    return found


@pytest.mark.parametrize("path", FILES)
def test_offsets_match_pyelftools(path: str):
    names = [*PROBED, "readline", "main", "malloc", "no_such_function_anywhere"]
    assert elfsymbols.function_offsets(path, names) == reference(path, names)


def test_libssl_has_the_required_probes_and_bash_has_readline():
    libssl = [p for p in FILES if "libssl" in p]
    if not libssl:
        pytest.skip("no libssl.so.3 on this machine")
    assert elfsymbols.defines(libssl[0], ["SSL_write", "SSL_read"])
    bash = shutil.which("bash")
    assert bash and elfsymbols.defines(bash, ["readline"])   # a tail of rl_readline's string
    assert not elfsymbols.defines(bash, ["SSL_write"])


def test_files_that_are_not_elf_or_are_cut_short_have_no_functions(tmp_path):
    text = tmp_path / "script"
    text.write_bytes(b"#!/bin/sh\nSSL_write\0SSL_read\0")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    cut = tmp_path / "cut"
    libssl = [p for p in FILES if "libssl" in p]
    with open(libssl[0] if libssl else "/bin/sh", "rb") as f:
        cut.write_bytes(f.read(4096) + b"SSL_write\0")     # headers point past the end
    for path in (text, empty, cut, tmp_path / "missing"):
        assert elfsymbols.function_offsets(str(path), ["SSL_write"]) == {}
