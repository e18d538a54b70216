"""Reading kernel maps: batch lookups into numpy arrays, and the generation protocol.

Counter maps carry a generation number in their key (bpf/common.h). To read them without
racing the programs that write them:

1. flip ``generation[0]``: programs now write new entries under the other generation;
2. wait for an RCU grace period (``membarrier(MEMBARRIER_CMD_GLOBAL)`` runs synchronize_rcu):
   every program run that read the old generation has finished, since BPF programs run inside
   RCU read-side sections;
3. read the whole map with BPF_MAP_LOOKUP_BATCH and keep the old generation's entries;
4. delete exactly those keys with BPF_MAP_DELETE_BATCH. Nobody writes them any more, so
   nothing counted between the read and the delete can be lost.

A program may instead keep one map per generation (the flows map: bpf/flows.h); then steps 3
and 4 are one pass of BPF_MAP_LOOKUP_AND_DELETE_BATCH over the map nobody writes (take())."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import logs
from . import bpfsys

log = logs.get("maps")

_MEMBARRIER_SYSCALL = {"x86_64": 324, "aarch64": 283}
_MEMBARRIER_CMD_GLOBAL = 1
_FALLBACK_GRACE_SECONDS = 0.05
_libc = ctypes.CDLL(None, use_errno=True)
_grace_warned = False
READ_CHUNK_ENTRIES = 8192


def wait_for_rcu_grace_period() -> None:
    """Returns once every BPF program run that started before the call has finished."""
    global _grace_warned
    number = _MEMBARRIER_SYSCALL.get(platform.machine())
    if number is not None and _libc.syscall(number, _MEMBARRIER_CMD_GLOBAL, 0, 0) == 0:
        return
    if not _grace_warned:
        _grace_warned = True
        log.warning("membarrier(MEMBARRIER_CMD_GLOBAL) unavailable, waiting a fixed grace period",
                    extra={"seconds": _FALLBACK_GRACE_SECONDS,
                           "errno": errno.errorcode.get(ctypes.get_errno(), "?")})
    time.sleep(_FALLBACK_GRACE_SECONDS)


class MapReadError(Exception):
    pass


@dataclass
class MapSnapshot:
    """Keys are kept as opaque bytes (padding included, as the kernel wants them back for a
    delete); `keys` views them through the key's structured dtype."""
    raw_keys: np.ndarray        # dtype V<key size>, one row per entry
    values: np.ndarray          # (rows,) or, for per-CPU maps, (rows, cpus)
    key_dtype: np.dtype

    @property
    def keys(self) -> np.ndarray:
        return self.raw_keys.view(self.key_dtype)

    def select(self, rows: np.ndarray) -> MapSnapshot:
        return MapSnapshot(self.raw_keys[rows], self.values[rows], self.key_dtype)


class BatchMap:
    """A hash or array map read and deleted with batch syscalls into preallocated buffers."""

    def __init__(self, name: str, table: Any, key_dtype: np.dtype, value_dtype: np.dtype,
                 per_cpu: bool) -> None:
        self.name = name
        self.fd = table.map_fd
        self.capacity = int(table.max_entries)
        self.key_dtype = key_dtype
        self.value_dtype = value_dtype
        self.cpus = bpfsys.possible_cpus() if per_cpu else 1
        self.per_cpu = per_cpu
        if key_dtype.itemsize != ctypes.sizeof(table.Key):
            raise MapReadError(f"{self.name}: key is {ctypes.sizeof(table.Key)} bytes in C, "
                               f"{key_dtype.itemsize} in Python")
        leaf = table.sLeaf if per_cpu else table.Leaf   # one CPU's type in sLeaf
        if ctypes.sizeof(leaf) != value_dtype.itemsize:
            raise MapReadError(f"{self.name}: value is {ctypes.sizeof(leaf)} bytes in C, "
                               f"{value_dtype.itemsize} in Python")
        if per_cpu and value_dtype.itemsize % 8:
            raise MapReadError(f"{self.name}: per-CPU values must be a multiple of 8 bytes")
        # per-CPU values come back as one 8-byte aligned slot per possible CPU
        self._value_stride = value_dtype.itemsize * self.cpus
        self._chunk = min(self.capacity, READ_CHUNK_ENTRIES)
        self._lock = threading.Lock()

    def read(self) -> MapSnapshot:
        """Every entry of the map, copied out of the kernel with BPF_MAP_LOOKUP_BATCH."""
        return self._walk(bpfsys.MAP_LOOKUP_BATCH, "BPF_MAP_LOOKUP_BATCH")

    def take(self) -> MapSnapshot:
        """Every entry of the map, copied out and deleted in one pass with
        BPF_MAP_LOOKUP_AND_DELETE_BATCH. Only for a map no program writes any more (a
        generation's map after Generation.flip): a program could otherwise add to an entry after
        it was copied and before it was deleted, and that count would be lost.

        The chunks already taken are deleted from the map: if a later one fails, they are
        returned (and the failure logged) rather than dropped with an exception. The entries
        not reached stay in the map, to be taken at its next drain."""
        return self._walk(bpfsys.MAP_LOOKUP_AND_DELETE_BATCH,
                          "BPF_MAP_LOOKUP_AND_DELETE_BATCH", keep_partial=True)

    def _walk(self, command: int, call_name: str, keep_partial: bool = False) -> MapSnapshot:
        # The kernel writes each chunk straight into arrays of the map's capacity, which are
        # then only sliced: no copy of a chunk, no concatenation (a 1M-flow drain copied 72 MB
        # twice). Arrays that large are fresh mappings from malloc, whose pages are backed only
        # once the kernel writes to them: memory follows the entries present, not the capacity
        # (a 65536-entry per-CPU map on a 64-CPU node has 67 MB of values).
        key_size = self.key_dtype.itemsize
        keys = np.empty(self.capacity, dtype=f"V{key_size}")
        values = np.empty(self.capacity * self.cpus, dtype=self.value_dtype)
        keys_at, values_at = keys.ctypes.data, values.ctypes.data
        with self._lock:
            # the kernel's position in the map: a key-sized opaque token (for a hash map)
            token = ctypes.create_string_buffer(max(key_size, 8))
            next_token = ctypes.create_string_buffer(max(key_size, 8))
            first, total = True, 0
            while total < self.capacity:
                done, err = bpfsys.map_batch(
                    command, self.fd, 0 if first else ctypes.addressof(token),
                    ctypes.addressof(next_token), keys_at + total * key_size,
                    values_at + total * self._value_stride,
                    min(self._chunk, self.capacity - total))
                total += done
                if err:
                    if err == errno.ENOENT:
                        break       # walked the whole map
                    if keep_partial and total:
                        log.warning("batch walk of a map stopped early; the rest waits for the "
                                    "next drain", extra={"map": self.name, "call": call_name,
                                                         "entries": total,
                                                         "error": os.strerror(err)})
                        break
                    raise MapReadError(f"{self.name}: {call_name} failed: {os.strerror(err)}")
                first = False
                ctypes.memmove(token, next_token, len(token))
        flat = values[:total * self.cpus]
        return MapSnapshot(keys[:total], flat.reshape(total, self.cpus) if self.per_cpu else flat,
                           self.key_dtype)

    def drain(self, generation: int) -> tuple[MapSnapshot, int]:
        """Reads the map, deletes the entries of `generation` (which no program may be writing:
        see Generation.flip) and returns them, with the number of entries the map held."""
        snapshot = self.read()
        old = snapshot.keys["generation"] == generation
        # usually every entry is of the old generation: no copy of a million rows then
        drained = snapshot if old.all() else snapshot.select(old)
        self.delete(drained)
        return drained, len(snapshot.raw_keys)

    def claim(self, snapshot: MapSnapshot, rows: Iterable[int]) -> list[int]:
        """Deletes these rows' keys one by one and returns the rows whose delete succeeded.

        For maps the kernel also deletes from (a DNS query answered, an HTTP connection
        ended): whichever side deletes a key first owns what it stood for, so it is counted
        once, by the kernel or by user space, never by both."""
        claimed = []
        for row in rows:
            raw = snapshot.raw_keys[row].tobytes()
            if bpfsys.map_delete(self.fd, raw):
                claimed.append(int(row))
        return claimed

    def delete(self, snapshot: MapSnapshot) -> None:
        """Deletes the snapshot's keys with BPF_MAP_DELETE_BATCH."""
        keys = snapshot.raw_keys
        if len(keys) == 0:
            return
        buffer = np.ascontiguousarray(keys)     # the kernel reads the keys in place
        done, err = bpfsys.map_batch(bpfsys.MAP_DELETE_BATCH, self.fd, 0, 0,
                                     buffer.ctypes.data, 0, len(keys))
        if err:
            raise MapReadError(f"{self.name}: BPF_MAP_DELETE_BATCH failed after "
                               f"{done} of {len(keys)} keys: {os.strerror(err)}")


def older_than(timestamps_ns: np.ndarray, now_ns: int, limit_ns: int) -> np.ndarray:
    """Rows whose timestamp (bpf_ktime_get_ns: CLOCK_MONOTONIC, like time.monotonic_ns) is
    more than limit_ns before now_ns."""
    return np.flatnonzero(timestamps_ns < now_ns - limit_ns)


class Generation:
    """The `generation` array of one program: flip it to drain that program's counter maps.

    It alternates 0 and 1, or with `counting` goes up by one at each flip (wrapping at 2**32),
    for a program that stamps what it keeps with the generation and must tell the current one
    from the one two flips ago (the flows' recent_flows, bpf/flows.h)."""

    def __init__(self, table: Any, counting: bool = False) -> None:
        self._table = table
        self._counting = counting
        self._lock = threading.Lock()

    def current(self) -> int:
        return int(self._table[ctypes.c_int(0)].value)

    def flip(self) -> int:
        """Switches writers to the other generation and returns the old one, which no program
        writes any more when this returns."""
        with self._lock:
            old = self.current()
            following = (old + 1) & 0xFFFFFFFF if self._counting else old ^ 1
            self._table[ctypes.c_int(0)] = ctypes.c_uint32(following)
            wait_for_rcu_grace_period()
            return old


class CounterArray:
    """A per-CPU array whose values only grow in the kernel (failures, parse errors, overflow):
    read_deltas() returns what each index gained since the previous read, summed over CPUs.
    A value of `width` u64 counters gives rows of `width` deltas."""

    def __init__(self, name: str, table: Any, width: int = 1) -> None:
        value = np.dtype([("counts", "<u8", (width,))])
        self._map = BatchMap(name, table, np.dtype("<u4"), value, per_cpu=True)
        self.capacity = self._map.capacity
        self.width = width
        self._last = np.zeros((self.capacity, width), dtype=np.uint64)

    def read_deltas(self) -> np.ndarray:
        snapshot = self._map.read()
        totals = np.zeros((self.capacity, self.width), dtype=np.uint64)
        totals[snapshot.keys.astype(np.int64)] = snapshot.values["counts"].sum(
            axis=1, dtype=np.uint64)
        deltas = totals - self._last
        self._last = totals
        return deltas if self.width > 1 else deltas[:, 0]
