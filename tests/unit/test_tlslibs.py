"""Finding the files with OpenSSL in processes' memory maps (exporter/kernel/tlslibs.py)."""

from __future__ import annotations

import os
from pathlib import Path

from exporter.kernel.tlslibs import FileScan, mapped_files

MAPS = b"""\
55d0c0a00000-55d0c0a2e000 r--p 00000000 08:01 1311 /usr/bin/curl
55d0c0a2e000-55d0c0a5e000 r-xp 0002e000 08:01 1311 /usr/bin/curl
7f1a2b000000-7f1a2b05d000 r--p 00000000 08:01 2222 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1a2b05d000-7f1a2b0d9000 r-xp 0005d000 08:01 2222 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1a2b200000-7f1a2b300000 r-xp 00028000 08:01 3333 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1a2c000000-7f1a2c080000 r-xp 00010000 00:2a 4444 /opt/app/lib/libssl.so.1.1 (deleted)
7f1a2d000000-7f1a2d001000 r-xp 00000000 00:00 0 [vdso]
7f1a2e000000-7f1a2e010000 r-xp 00000000 08:01 5555 /usr/lib/x86_64-linux-gnu/libssl3.so
"""


def test_libssl_files_are_found_by_device_and_inode_through_the_process_root():
    found = {m.file: m for m in mapped_files(42, MAPS, b"/usr/bin/curl")}
    assert set(found) == {(8, 1, 1311), (8, 1, 2222), (0, 42, 4444)}
    library = found[(8, 1, 2222)]
    assert library.shared_library
    assert library.reach == "/proc/42/root/usr/lib/x86_64-linux-gnu/libssl.so.3"
    assert library.path == "/usr/lib/x86_64-linux-gnu/libssl.so.3"
    # replaced on disk since it was mapped: only the mapping itself still reaches it
    deleted = found[(0, 42, 4444)]
    assert deleted.reach == "/proc/42/map_files/7f1a2c000000-7f1a2c080000"
    assert deleted.path == "/opt/app/lib/libssl.so.1.1"
    # the executable is a candidate (static OpenSSL), not a library; NSS's libssl3 is not
    assert not found[(8, 1, 1311)].shared_library


def _process(proc: Path, pid: int, maps: bytes, exe: str) -> None:
    directory = proc / str(pid)
    directory.mkdir()
    (directory / "maps").write_bytes(maps)
    os.symlink(exe, directory / "exe")


def test_scans_look_into_each_executable_once_and_forget_files_no_longer_mapped(tmp_path):
    looked: list[str] = []

    def has_openssl(path: str) -> bool:
        looked.append(path)
        return path.endswith("/usr/bin/node")

    node_maps = b"5000-6000 r-xp 00000000 08:01 77 /usr/bin/node\n"
    _process(tmp_path, 10, MAPS, "/usr/bin/curl")
    _process(tmp_path, 11, node_maps, "/usr/bin/node")
    _process(tmp_path, 12, node_maps, "/usr/bin/node")
    scan = FileScan(has_openssl, proc=tmp_path, own_pid=1)
    files = scan.scan(full=True)
    assert set(files) == {(8, 1, 2222), (0, 42, 4444), (8, 1, 77)}
    assert files[(8, 1, 77)].reach == "/proc/11/root/usr/bin/node"
    assert sorted(looked) == ["/proc/10/root/usr/bin/curl", "/proc/11/root/usr/bin/node"]

    # a process started since: only it is read, and what it maps is added
    _process(tmp_path, 13, b"1000-2000 r-xp 00000000 08:02 9 /lib/libssl.so.3\n", "/bin/sh")
    files = scan.scan(full=False)
    assert (8, 2, 9) in files and (8, 1, 2222) in files

    # the processes of curl and the new one end: a full scan drops their files
    for pid in (10, 13):
        for entry in (tmp_path / str(pid)).iterdir():
            entry.unlink()
        (tmp_path / str(pid)).rmdir()
    files = scan.scan(full=True)
    assert set(files) == {(8, 1, 77)}
    assert looked.count("/proc/11/root/usr/bin/node") == 1
