import pytest

from exporter.kernel.iface_slots import InterfaceSlots


class FakeMaps:
    """iface_slots and monitored_ifaces as dicts, looked up the way bpf/classifier.c does; after
    every single write, each interface in `steady` must still be found with its flags."""

    def __init__(self, slots: int):
        self.slots = {i: (0, 0, False) for i in range(slots)}
        self.overflow: dict[int, int] = {}
        self.steady: dict[int, int] = {}
        self.writes = 0

    def lookup(self, ifindex):     # monitored() in bpf/classifier.c
        owner, flags, collided = self.slots[ifindex & (len(self.slots) - 1)]
        if owner == ifindex:
            return flags
        if not collided:
            return None
        return self.overflow.get(ifindex)

    def _check(self):
        self.writes += 1
        for ifindex, flags in self.steady.items():
            assert self.lookup(ifindex) == flags, (ifindex, self.slots, self.overflow)

    def write_slot(self, slot, ifindex, flags, collided):
        self.slots[slot] = (ifindex, flags, collided)
        self._check()

    def put_overflow(self, ifindex, flags):
        self.overflow[ifindex] = flags
        self._check()

    def delete_overflow(self, ifindex):
        self.overflow.pop(ifindex, None)
        self._check()


def test_interfaces_with_the_same_low_bits_share_a_slot_through_the_hash():
    maps = FakeMaps(4)
    placement = InterfaceSlots(4, maps)
    placement.add(2, 1)                 # slot 2
    maps.steady[2] = 1
    placement.add(6, 0)                 # slot 2 too: to the hash, slot marked
    maps.steady[6] = 0
    placement.add(10, 1)                # and a third
    maps.steady[10] = 1
    placement.add(3, 1)                 # slot 3, no collision
    maps.steady[3] = 1
    assert maps.slots[2] == (2, 1, True) and maps.overflow == {6: 0, 10: 1}
    assert maps.slots[3] == (3, 1, False)
    assert maps.lookup(14) is None and maps.lookup(7) is None    # same low bits, not monitored
    assert placement.in_overflow(6) and not placement.in_overflow(2)

    del maps.steady[2]                  # the slot's owner goes: one from the hash takes the slot
    placement.remove(2)
    assert maps.lookup(2) is None
    assert maps.slots[2] in {(6, 0, True), (10, 1, True)}
    assert len(maps.overflow) == 1 and maps.lookup(6) == 0 and maps.lookup(10) == 1

    del maps.steady[6]
    placement.remove(6)
    del maps.steady[10]
    placement.remove(10)
    assert maps.slots[2] == (0, 0, False) and maps.overflow == {}
    assert maps.lookup(3) == 1 and maps.lookup(6) is None and maps.lookup(10) is None


def test_removing_the_hashed_one_clears_the_mark_and_re_adding_updates_flags():
    maps = FakeMaps(8)
    placement = InterfaceSlots(8, maps)
    placement.add(5, 1)
    placement.add(13, 1)
    maps.steady.update({5: 1, 13: 1})
    assert maps.slots[5] == (5, 1, True)
    del maps.steady[13]
    placement.remove(13)
    assert maps.slots[5] == (5, 1, False) and maps.overflow == {}
    del maps.steady[5]
    placement.add(5, 0)                 # attached again as a non-Ethernet link
    maps.steady[5] = 0
    assert maps.slots[5] == (5, 0, False)
    placement.remove(99)                # never added: nothing written
    writes = maps.writes
    placement.remove(99)
    assert maps.writes == writes and maps.lookup(5) == 0


def test_the_array_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        InterfaceSlots(6, FakeMaps(8))
