"""Where a monitored interface goes in the classifier's maps (bpf/classifier.c): the slot
`ifindex & (slots - 1)` of the direct-mapped array `iface_slots` when that slot is free, else
(another monitored interface has the same low bits) the hash `monitored_ifaces`, with the slot
marked `collided` so the classifier looks there."""

from __future__ import annotations

from typing import Protocol


class InterfaceMaps(Protocol):
    """The two kernel maps, as the placement writes them."""

    def write_slot(self, slot: int, ifindex: int, flags: int, collided: bool) -> None: ...

    def put_overflow(self, ifindex: int, flags: int) -> None: ...

    def delete_overflow(self, ifindex: int) -> None: ...


class InterfaceSlots:
    """Keeps the placement of every monitored interface and writes each change to the maps in
    an order where a packet always finds a monitored interface in one of them."""

    def __init__(self, slots: int, maps: InterfaceMaps) -> None:
        if slots <= 0 or slots & (slots - 1):
            raise ValueError(f"iface_slots has {slots} entries, not a power of two")
        self._mask = slots - 1
        self._maps = maps
        self._owners: dict[int, tuple[int, int]] = {}       # slot -> (ifindex, flags)
        self._overflow: dict[int, int] = {}                  # ifindex -> flags, in the hash

    def slot_of(self, ifindex: int) -> int:
        return ifindex & self._mask

    def in_overflow(self, ifindex: int) -> bool:
        return ifindex in self._overflow

    def add(self, ifindex: int, flags: int) -> None:
        slot = self.slot_of(ifindex)
        owner = self._owners.get(slot)
        if owner is None or owner[0] == ifindex:
            self._owners[slot] = (ifindex, flags)
            self._maps.write_slot(slot, ifindex, flags, self._collided(slot))
            return
        self._maps.put_overflow(ifindex, flags)     # first in the hash, then the mark
        self._overflow[ifindex] = flags
        self._maps.write_slot(slot, owner[0], owner[1], True)

    def remove(self, ifindex: int) -> None:
        slot = self.slot_of(ifindex)
        if ifindex in self._overflow:
            del self._overflow[ifindex]
            self._maps.delete_overflow(ifindex)
            owner = self._owners[slot]
            self._maps.write_slot(slot, owner[0], owner[1], self._collided(slot))
            return
        owner = self._owners.get(slot)
        if owner is None or owner[0] != ifindex:
            return
        # an interface waiting in the hash takes the slot (written before leaving the hash)
        waiting = next((i for i in self._overflow if self.slot_of(i) == slot), None)
        if waiting is None:
            del self._owners[slot]
            self._maps.write_slot(slot, 0, 0, False)
            return
        flags = self._overflow.pop(waiting)
        self._owners[slot] = (waiting, flags)
        self._maps.write_slot(slot, waiting, flags, self._collided(slot))
        self._maps.delete_overflow(waiting)

    def _collided(self, slot: int) -> bool:
        return any(self.slot_of(i) == slot for i in self._overflow)
