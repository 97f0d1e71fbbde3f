"""The host side of a paged KV cache (models/paged.py): which pages each slot owns, as the page table the device
reads, and the free list. Continuous batching (continuous.py) grows a slot's pages between segments, one
segment ahead, and returns them when its row ends; when the pool cannot cover the next segment of every live
slot, the most recently admitted ones are preempted (their pages freed, their rows decoded again later: every
row draws its own numbers, so a restart emits the same tokens).

The last page of the pool is scratch: every unowned table entry points at it, so a free slot's writes land there
and never in another slot's page.
"""

from __future__ import annotations

import numpy as np


def pages_for(positions: int, page_size: int) -> int:
    return -(-positions // page_size)


class PagePool:
    def __init__(self, pages: int, page_size: int, slots: int, table_width: int):
        if pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is scratch), got {pages}")
        self.page_size, self.scratch = page_size, pages - 1
        self.free = list(range(pages - 1))
        self.table = np.full((slots, table_width), self.scratch, np.int32)
        self.owned = [0] * slots  # pages slot s owns: table[s, :owned[s]]
        self.peak = 0

    @property
    def capacity(self) -> int:
        """Pages a row can hold (the scratch page excluded)."""
        return self.scratch

    def used(self) -> int:
        return self.scratch - len(self.free)

    def missing(self, slot: int, positions: int) -> int:
        """Pages slot `slot` lacks to hold `positions` positions."""
        return max(pages_for(positions, self.page_size) - self.owned[slot], 0)

    def grow(self, slot: int, positions: int) -> None:
        need = self.missing(slot, positions)
        if need > len(self.free):
            raise RuntimeError(f"page pool: slot {slot} needs {need} pages, {len(self.free)} free")
        if self.owned[slot] + need > self.table.shape[1]:
            raise ValueError(f"slot {slot}: {positions} positions exceed the page table's "
                             f"{self.table.shape[1] * self.page_size}")
        for _ in range(need):
            self.table[slot, self.owned[slot]] = self.free.pop()
            self.owned[slot] += 1
        self.peak = max(self.peak, self.used())

    def release(self, slot: int) -> None:
        self.free.extend(int(p) for p in self.table[slot, :self.owned[slot]])
        self.table[slot] = self.scratch
        self.owned[slot] = 0

    def keep(self, slots: list[int]) -> None:
        """Only slots `slots` remain, renumbered 0.. in that order (continuous.compact); the others own nothing."""
        dropped = set(range(len(self.owned))) - set(slots)
        if any(self.owned[s] for s in dropped):
            raise ValueError("page pool: a slot that still owns pages was dropped")
        self.table = self.table[slots]
        self.owned = [self.owned[s] for s in slots]
