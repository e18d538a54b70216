"""exporter/kernel/maps.py against real kernel maps: chunked batch reads, exact batch deletes (keys
with padding), per-CPU value layout and the generation flip."""

from __future__ import annotations

import ctypes
import errno

import numpy as np
import pytest

from exporter.kernel import bpfsys, maps

pytestmark = pytest.mark.kernel

SOURCE = b"""
struct key { u32 generation; u8 tag; /* 3 bytes of padding */ u64 id; };
BPF_PERCPU_HASH(counts, struct key, u64, 30000);
BPF_ARRAY(generation, u32, 1);
"""
KEY = np.dtype({"names": ["generation", "tag", "id"], "formats": ["<u4", "u1", "<u8"],
                "offsets": [0, 4, 8], "itemsize": 16})


@pytest.fixture(scope="module")
def program(kernel_ready):
    import bcc

    bpf = bcc.BPF(text=SOURCE)
    yield bpf
    bpf.cleanup()


def fill(table, n: int, generation: int) -> None:
    cpus = bpfsys.possible_cpus()
    for i in range(n):
        key = table.Key(generation=generation, tag=i % 7, id=i)
        value = table.Leaf(*([0] * cpus))
        value[0] = i            # CPU 0 holds i, the last CPU 1: the sum is i + 1 when cpus > 1
        value[cpus - 1] += 1
        table[key] = value


def test_a_read_larger_than_one_chunk_returns_every_entry_once(program):
    table = program[b"counts"]
    table.clear()
    entries = 20000
    assert entries > maps.READ_CHUNK_ENTRIES
    fill(table, entries, generation=0)
    reader = maps.BatchMap("counts", table, KEY, np.dtype("<u8"), per_cpu=True)
    snapshot = reader.read()
    keys = snapshot.keys
    assert len(keys) == entries
    assert sorted(keys["id"].tolist()) == list(range(entries))
    totals = snapshot.values.sum(axis=1)
    expected = keys["id"] + 1           # i on the first CPU, 1 on the last
    assert np.array_equal(totals, expected.astype(np.uint64))


def filled_reader(program, entries: int) -> maps.BatchMap:
    table = program[b"counts"]
    table.clear()
    fill(table, entries, generation=0)
    return maps.BatchMap("counts", table, KEY, np.dtype("<u8"), per_cpu=True)


def failing_take(monkeypatch: pytest.MonkeyPatch, fail_from: int) -> None:
    """BPF_MAP_LOOKUP_AND_DELETE_BATCH failing (EIO) from its `fail_from`-th call, having done
    nothing in that call, as the kernel reports it."""
    real, calls = bpfsys.map_batch, [0]

    def map_batch(command: int, *args: int) -> tuple[int, int]:
        if command == bpfsys.MAP_LOOKUP_AND_DELETE_BATCH:
            calls[0] += 1
            if calls[0] >= fail_from:
                return 0, errno.EIO
        return real(command, *args)

    monkeypatch.setattr(bpfsys, "map_batch", map_batch)


def test_take_returns_every_entry_once_and_empties_the_map(program):
    entries = 20000
    reader = filled_reader(program, entries)
    taken = reader.take()
    assert sorted(taken.keys["id"].tolist()) == list(range(entries))
    assert np.array_equal(taken.values.sum(axis=1),
                          (taken.keys["id"] + 1).astype(np.uint64))
    assert len(reader.read().keys) == 0


def test_a_take_that_fails_midway_returns_what_it_took_and_leaves_the_rest(program, monkeypatch):
    entries = 20000
    reader = filled_reader(program, entries)
    with monkeypatch.context() as patched:
        failing_take(patched, fail_from=2)
        taken = reader.take()
    # the first chunk, not an exception (the kernel ends a chunk on a bucket's boundary, so it
    # may hold a few entries fewer than asked for)
    assert 0 < len(taken.keys) <= maps.READ_CHUNK_ENTRIES
    left = reader.read().keys
    # nothing lost: what was not taken is still in the map, and nothing is in both
    assert sorted(left["id"].tolist() + taken.keys["id"].tolist()) == list(range(entries))


def test_a_failing_first_take_raises_and_takes_nothing(program, monkeypatch):
    reader = filled_reader(program, 100)
    with monkeypatch.context() as patched:
        failing_take(patched, fail_from=1)
        with pytest.raises(maps.MapReadError, match="BPF_MAP_LOOKUP_AND_DELETE_BATCH failed"):
            reader.take()
    assert len(reader.read().keys) == 100


def test_delete_removes_exactly_the_selected_keys(program):
    table = program[b"counts"]
    table.clear()
    fill(table, 5000, generation=0)
    fill(table, 3000, generation=1)
    reader = maps.BatchMap("counts", table, KEY, np.dtype("<u8"), per_cpu=True)
    snapshot = reader.read()
    old = snapshot.select(snapshot.keys["generation"] == 0)
    reader.delete(old)                  # padding bytes travel with the raw keys
    left = reader.read().keys
    assert len(left) == 3000
    assert set(left["generation"].tolist()) == {1}


def test_generation_flip_returns_the_old_one_and_switches(program):
    generation = maps.Generation(program[b"generation"])
    program[b"generation"][ctypes.c_int(0)] = ctypes.c_uint32(0)
    assert generation.flip() == 0
    assert generation.current() == 1
    assert generation.flip() == 1
    assert generation.current() == 0


def test_a_counting_generation_goes_up_by_one_and_wraps(program):
    generation = maps.Generation(program[b"generation"], counting=True)
    program[b"generation"][ctypes.c_int(0)] = ctypes.c_uint32(6)
    assert generation.flip() == 6
    assert generation.current() == 7
    program[b"generation"][ctypes.c_int(0)] = ctypes.c_uint32(0xFFFFFFFF)
    assert generation.flip() == 0xFFFFFFFF
    assert generation.current() == 0


def test_counter_arrays_report_growth_since_the_last_read(kernel_ready):
    import bcc

    bpf = bcc.BPF(text=b"BPF_PERCPU_ARRAY(failures, u64, 4);")
    try:
        table = bpf[b"failures"]
        counter = maps.CounterArray("failures", table)
        cpus = bpfsys.possible_cpus()
        table[ctypes.c_int(2)] = table.Leaf(*([5] * cpus))
        assert counter.read_deltas().tolist() == [0, 0, 5 * cpus, 0]
        table[ctypes.c_int(2)] = table.Leaf(*([6] * cpus))
        assert counter.read_deltas().tolist() == [0, 0, cpus, 0]
        assert counter.read_deltas().tolist() == [0, 0, 0, 0]
    finally:
        bpf.cleanup()


def test_a_key_is_claimed_once_whoever_deletes_it_first(program):
    table = program[b"counts"]
    table.clear()
    fill(table, 10, generation=0)
    reader = maps.BatchMap("counts", table, KEY, np.dtype("<u8"), per_cpu=True)
    snapshot = reader.read()
    rows = np.flatnonzero(snapshot.keys["id"] < 4)
    # another party (the kernel, in the exporter) deletes one of them first
    first = snapshot.keys[rows[0]]
    del table[table.Key(generation=int(first["generation"]), tag=int(first["tag"]),
                        id=int(first["id"]))]
    assert reader.claim(snapshot, rows) == [int(r) for r in rows[1:]]
    assert reader.claim(snapshot, rows) == []          # nothing is claimed twice
    assert len(reader.read().raw_keys) == 6
