"""The host side of a paged KV cache (models/paged.py): which pages each slot owns, as the page table the device
reads, and the free list. Continuous batching (continuous.py) grows a slot's pages between segments, one
segment ahead, and returns them when its row ends; when the pool cannot cover the next segment of every live
slot, the most recently admitted ones are preempted (their pages freed, their rows decoded again later: every
row draws its own numbers, so a restart emits the same tokens).

With `shards` > 1 (the pool split over the batch axes, models/paged.PageShards) the slots are cut into as many
contiguous groups and the pool into as many parts of `pages` pages each: slot s belongs to shard
s // (slots / shards), draws pages only from its shard's part, and its table holds ids local to that part (the
device's pool is the parts one after another; admission writes at shard * pages + local id).

The last page of each part is scratch: every unowned table entry points at it, so a free slot's writes land there
and never in another slot's page.
"""

from __future__ import annotations

import numpy as np


def pages_for(positions: int, page_size: int) -> int:
    return -(-positions // page_size)


class PagePool:
    def __init__(self, pages: int, page_size: int, slots: int, table_width: int, shards: int = 1):
        """pages: per shard, its scratch page included."""
        if pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is scratch), got {pages}")
        if shards < 1 or slots % shards:
            raise ValueError(f"page pool: {slots} slots do not split into {shards} shards")
        self.page_size, self.scratch, self.shards = page_size, pages - 1, shards
        self.free_by_shard = [list(range(pages - 1)) for _ in range(shards)]
        self.table = np.full((slots, table_width), self.scratch, np.int32)
        self.owned = [0] * slots  # pages slot s owns: table[s, :owned[s]]
        self.peak = 0

    @property
    def capacity(self) -> int:
        """Pages a row can hold (the scratch page excluded)."""
        return self.scratch

    def shard_of(self, slot: int) -> int:
        return slot // (len(self.owned) // self.shards)

    def free(self, shard: int) -> int:
        """Free pages in `shard`'s part."""
        return len(self.free_by_shard[shard])

    def used(self) -> int:
        return self.scratch * self.shards - sum(map(len, self.free_by_shard))

    def missing(self, slot: int, positions: int) -> int:
        """Pages slot `slot` lacks to hold `positions` positions."""
        return max(pages_for(positions, self.page_size) - self.owned[slot], 0)

    def grow(self, slot: int, positions: int) -> None:
        need, free = self.missing(slot, positions), self.free_by_shard[self.shard_of(slot)]
        if need > len(free):
            raise RuntimeError(f"page pool: slot {slot} needs {need} pages, {len(free)} free")
        if self.owned[slot] + need > self.table.shape[1]:
            raise ValueError(f"slot {slot}: {positions} positions exceed the page table's "
                             f"{self.table.shape[1] * self.page_size}")
        for _ in range(need):
            self.table[slot, self.owned[slot]] = free.pop()
            self.owned[slot] += 1
        self.peak = max(self.peak, self.used())

    def release(self, slot: int) -> None:
        self.free_by_shard[self.shard_of(slot)].extend(int(p) for p in self.table[slot, :self.owned[slot]])
        self.table[slot] = self.scratch
        self.owned[slot] = 0

    def keep(self, slots: list[int]) -> None:
        """Only slots `slots` remain, renumbered 0.. in that order (continuous.compact); the others own nothing.
        Split over shards, each kept slot stays in its shard (its pages are there)."""
        dropped = set(range(len(self.owned))) - set(slots)
        if any(self.owned[s] for s in dropped):
            raise ValueError("page pool: a slot that still owns pages was dropped")
        if len(slots) % self.shards or any(self.shard_of(s) != i // (len(slots) // self.shards)
                                           for i, s in enumerate(slots)):
            raise ValueError(f"page pool: slots {slots} would leave their shards ({self.shards})")
        self.table = self.table[slots]
        self.owned = [self.owned[s] for s in slots]
