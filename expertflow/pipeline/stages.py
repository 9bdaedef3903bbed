"""Building blocks of the load pipeline: cache entries, the priority queue of pending loads, slot tables.

Order of service: every demand load before any prefetch; among prefetches, higher priority first (nearer
layers); ties FIFO. The queue is bounded for prefetches (the lowest-priority one is dropped when full);
demand loads are bounded by their callers, who wait for them.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from expertflow.errors import BudgetError
from expertflow.pipeline.policy import EvictionPolicy
from expertflow.tiers.layout import ExpertKey


class State(Enum):
    QUEUED = "queued"  # waiting for a loader
    LOADING = "loading"  # has a slot, bytes are moving
    READY = "ready"  # resident and usable


@dataclass(eq=False)
class Entry:
    """One expert in (or on its way into) the compute tier."""

    key: ExpertKey
    ready: asyncio.Future[None]
    state: State = State.QUEUED
    slot: int | None = None
    pins: int = 0
    demanded: bool = False  # some fetch asked for it (vs. only prefetched)
    prefetched: bool = False  # it was brought in by a prefetch
    used: bool = False  # a fetch used it after a prefetch brought it
    priority: float = 0.0
    generation: int = 0  # bumps invalidate stale queue items
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class LoadQueue:
    """Pending loads, demand first. Lazy deletion: items whose entry moved on are skipped on pop."""

    def __init__(self, max_prefetches: int) -> None:
        self._heap: list[tuple[int, float, int, int, Entry]] = []
        self._seq = itertools.count()
        self._max_prefetches = max(1, max_prefetches)
        self._prefetches = 0
        self._wakeup = asyncio.Event()

    def push(self, entry: Entry, *, demand: bool) -> Entry | None:
        """Queue ``entry``; returns a prefetch entry that was pushed out to keep the bound, if any."""
        entry.generation += 1
        cls = 0 if demand else 1
        heapq.heappush(self._heap, (cls, -entry.priority, next(self._seq), entry.generation, entry))
        dropped = None
        if not demand:
            self._prefetches += 1
            if self._prefetches > self._max_prefetches:
                dropped = self._drop_lowest_prefetch()
        self._wakeup.set()
        return dropped

    def _live(self, item: tuple[int, float, int, int, Entry]) -> bool:
        entry = item[4]
        return entry.state is State.QUEUED and entry.generation == item[3]

    def _drop_lowest_prefetch(self) -> Entry | None:
        live = [it for it in self._heap if it[0] == 1 and self._live(it)]
        self._prefetches = len(live)
        if len(live) <= self._max_prefetches:
            return None
        worst = max(live, key=lambda it: (it[1], it[2]))
        worst[4].generation += 1  # invalidates the item
        self._prefetches -= 1
        return worst[4]

    async def pop(self) -> Entry:
        while True:
            while self._heap:
                item = heapq.heappop(self._heap)
                if item[0] == 1:
                    self._prefetches = max(0, self._prefetches - 1)
                if self._live(item):
                    return item[4]
            self._wakeup.clear()
            await self._wakeup.wait()

    def pending(self) -> int:
        return sum(1 for it in self._heap if self._live(it))


class SlotTable:
    """Which entry holds which slot; free slots; eviction through a policy; waiting for space."""

    def __init__(self, num_slots: int, policy: EvictionPolicy, name: str) -> None:
        self.name = name
        self.num_slots = num_slots
        self.policy = policy
        self.free: list[int] = list(range(num_slots - 1, -1, -1))
        self.holder: dict[int, Entry] = {}
        self.changed = asyncio.Condition()

    def _victim(self, allow: Callable[[Entry], bool]) -> Entry | None:
        candidates = {
            e.key: e for e in self.holder.values() if e.state is State.READY and e.pins == 0 and allow(e)
        }
        if not candidates:
            return None
        key = self.policy.choose_victim(list(candidates))
        return candidates.get(key) if key is not None else None

    def try_acquire(
        self, allow_victim: Callable[[Entry], bool], evict: Callable[[Entry], None]
    ) -> int | None:
        """A free slot, or one freed by evicting a policy victim accepted by ``allow_victim``; else None."""
        if self.free:
            return self.free.pop()
        victim = self._victim(allow_victim)
        if victim is None:
            return None
        evict(victim)  # gives the victim's slot back to the free list
        return self.free.pop()

    async def acquire(
        self,
        allow_victim: Callable[[Entry], bool],
        evict: Callable[[Entry], None],
        timeout: float,
    ) -> int:
        """Like :meth:`try_acquire`, but waits for a release; :class:`BudgetError` after ``timeout`` s."""
        slot = self.try_acquire(allow_victim, evict)
        if slot is not None:
            return slot
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self.changed:
            while True:
                slot = self.try_acquire(allow_victim, evict)
                if slot is not None:
                    return slot
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise BudgetError(
                        f"no free {self.name} slot for {timeout:.1f} s: all {self.num_slots} slots are pinned "
                        "by experts in use; release handles sooner or raise the budget"
                    )
                try:
                    await asyncio.wait_for(self.changed.wait(), remaining)
                except asyncio.TimeoutError:
                    continue

    def assign(self, slot: int, entry: Entry) -> None:
        entry.slot = slot
        self.holder[slot] = entry

    def release_slot(self, slot: int) -> None:
        self.holder.pop(slot, None)
        self.free.append(slot)

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def resident_keys(self) -> Iterable[ExpertKey]:
        return (e.key for e in self.holder.values() if e.state is State.READY)
