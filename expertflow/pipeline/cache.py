"""One cache level: a fixed number of expert slots, with single-flight loads, pins, eviction and admission.

The store uses this class twice: for the compute device's slots and, when the device has its own memory, for
the host-RAM buffers in front of it. A level knows nothing about where bytes come from: it is given a
``fill(entry, slot)`` coroutine that puts one expert's bytes into one slot.

Order of service: every demand load before any prefetch; among prefetches, higher priority first; ties FIFO.
The prefetch queue is bounded (the lowest-priority prefetch is dropped when it is full); demand loads are
bounded by their callers, who wait for them.

Threads: the level lives on one event loop, but pinning experts that are already resident and unpinning may
happen on any thread (the compute thread's fast path). Every change of the level's state is made under one
``threading.RLock`` shared with the store; nothing awaits while holding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from expertflow.core import ExpertKey
from expertflow.errors import BudgetError, ExpertFlowError, ExpertReadError, StoreClosedError
from expertflow.pipeline.policy import EvictionPolicy
from expertflow.pipeline.stats import StoreStats


class State(Enum):
    QUEUED = "queued"  # waiting for a loader
    LOADING = "loading"  # has a slot, bytes are moving
    READY = "ready"  # resident and usable
    GONE = "gone"  # evicted, cancelled or failed: no longer in the level


@dataclass(eq=False)
class Entry:
    """One expert in (or on its way into) a level. Internal to the pipeline: handles are what callers see."""

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

    @property
    def failed(self) -> bool:
        return self.ready.done() and (self.ready.cancelled() or self.ready.exception() is not None)


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

    @staticmethod
    def _live(item: tuple[int, float, int, int, Entry]) -> bool:
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


Fill = Callable[[Entry, int], Awaitable[None]]
Scorer = Callable[[ExpertKey], float]


def admits_prefetch(want: float, victim: float, load: float) -> bool:
    """Whether a prefetch of an expert used with chance ``want`` may evict one used with chance ``victim`` while
    the read path is ``load`` busy (0..1). A prefetch saves waiting only out of the read path's spare time
    (1 - load) and costs a whole read when wasted, plus the victim's re-read, which matters as much as the path
    is loaded: worth it iff want * (1 - load) > (1 - want + victim) * load, i.e. want > load * (1 + victim);
    never over a likelier victim. The trace replay applies the same rule (at no load)."""
    return victim < want and want >= load * (1 + victim)


class CacheLevel:
    """``num_slots`` slots on one level; see the module docstring for the rules."""

    def __init__(
        self,
        name: str,
        num_slots: int,
        policy: EvictionPolicy,
        fill: Fill,
        *,
        stats: StoreStats,
        lock: threading.RLock,
        workers: int,
        fetch_timeout: float,
        keep_after_use: bool = True,
    ) -> None:
        if num_slots < 1:
            raise BudgetError(f"the {name} level needs at least one slot")
        self.name = name
        self.num_slots = num_slots
        self.policy = policy
        self.stats = stats
        self.lock = lock
        self.fetch_timeout = fetch_timeout
        # keep_after_use=False is the "no cache" baseline: an expert leaves as soon as its last pin goes.
        self.keep_after_use = keep_after_use
        self.entries: dict[ExpertKey, Entry] = {}
        self._fill = fill
        self._holder: dict[int, Entry] = {}
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._freed = asyncio.Event()
        self._waiters = 0
        self._closed = False
        self._queue = LoadQueue(max_prefetches=num_slots)
        # Admission control for prefetches: how likely a key is needed soon, and keys a prefetch must not evict.
        self.score: Scorer = lambda key: 0.0
        self.protected: Callable[[ExpertKey], bool] = lambda key: False
        # How loaded the read path is (0..1): the prefetch admission rule in _try_acquire weighs it.
        self.prefetch_floor: Callable[[], float] = lambda: 0.0
        self._hit, self._miss = f"{name}_hits", f"{name}_misses"
        self._workers = [
            self._loop.create_task(self._worker(), name=f"expertflow-{name}-loader-{i}")
            for i in range(max(1, workers))
        ]

    # --- requests (loop thread) --------------------------------------------------------------------

    def _request(self, key: ExpertKey, *, demand: bool, priority: float = 0.0) -> Entry:
        """Find or create the entry for ``key`` and make sure a load is queued with the right urgency."""
        entry = self.entries.get(key)
        if entry is None:
            entry = Entry(key=key, ready=self._loop.create_future(), priority=priority)
            entry.ready.add_done_callback(_consume_exception)
            self.entries[key] = entry
            if not demand:
                entry.prefetched = True
                self.stats.prefetch_issued += 1
            self._push(entry, demand=demand)
        elif entry.state is State.QUEUED and demand and not entry.demanded:
            self._push(entry, demand=True)  # overtakes the prefetch queue
        if demand:
            entry.demanded = True
        return entry

    def _push(self, entry: Entry, *, demand: bool) -> None:
        dropped = self._queue.push(entry, demand=demand)
        if dropped is not None and dropped.pins == 0 and not dropped.demanded:
            self.stats.prefetch_dropped += 1
            self._forget(dropped, None)

    def _forget(self, entry: Entry, exc: BaseException | None) -> None:
        """Take ``entry`` out of the level; its waiters get ``exc`` (or a cancellation when None)."""
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
        entry.state = State.GONE
        entry.generation += 1
        if not entry.ready.done():
            if exc is None:
                entry.ready.cancel()
            else:
                entry.ready.set_exception(exc)

    def _account(self, entry: Entry) -> None:
        if entry.state is State.READY:
            setattr(self.stats, self._hit, getattr(self.stats, self._hit) + 1)
            self.policy.on_access(entry.key)
        else:
            setattr(self.stats, self._miss, getattr(self.stats, self._miss) + 1)
            if self.name == "device" and (entry.state is State.LOADING or entry.prefetched):
                self.stats.joined_inflight += 1
        if entry.prefetched and not entry.used:
            entry.used = True
            self.stats.prefetch_used += 1

    def pin(self, keys: Sequence[ExpertKey]) -> list[Entry]:
        """Request and pin every key (deduplicated, in order); loads are queued as demand."""
        self._check_open()
        entries: list[Entry] = []
        with self.lock:
            try:
                for key in dict.fromkeys(keys):
                    entry = self._request(key, demand=True)
                    self._account(entry)
                    entry.pins += 1
                    entries.append(entry)
            except BaseException:
                self._unpin_locked(entries)
                raise
        return entries

    def prefetch(self, keys: Iterable[ExpertKey], priority: float) -> None:
        """Queue loads of ``keys`` at ``priority`` (higher = sooner); never blocks, may be dropped."""
        if self._closed:
            return
        with self.lock:
            for key in keys:
                entry = self.entries.get(key)
                if entry is None:
                    self._request(key, demand=False, priority=priority)
                elif entry.state is State.QUEUED and not entry.demanded and priority > entry.priority:
                    entry.priority = priority
                    self._push(entry, demand=False)

    def cancel_prefetches(self, keep: Iterable[ExpertKey] = ()) -> int:
        """Withdraw queued or loading prefetches not in ``keep``; their slots come back. Returns how many."""
        keep_set = set(keep)
        cancelled = 0
        with self.lock:
            for entry in list(self.entries.values()):
                if entry.key in keep_set or not _withdrawable(entry):
                    continue
                cancelled += 1
                if entry.state is State.LOADING and entry.task is not None:
                    entry.task.cancel()
                else:
                    self._forget(entry, None)
            self.stats.prefetch_cancelled += cancelled
        return cancelled

    # --- resident experts (any thread) -------------------------------------------------------------

    def pin_resident(self, keys: Sequence[ExpertKey]) -> list[Entry] | None:
        """Pin every key if all are resident, else change nothing and return None. Safe from any thread."""
        with self.lock:
            if self._closed:
                return None
            entries = []
            for key in dict.fromkeys(keys):
                entry = self.entries.get(key)
                if entry is None or entry.state is not State.READY:
                    return None
                entries.append(entry)
            for entry in entries:
                self._account(entry)
                entry.pins += 1
            return entries

    def resident_slots(self, keys: Sequence[ExpertKey]) -> list[int] | None:
        """The slot of each key if every one is resident now, else None; pins nothing, counts nothing."""
        with self.lock:
            if self._closed:
                return None
            slots = []
            for key in keys:
                entry = self.entries.get(key)
                if entry is None or entry.state is not State.READY or entry.slot is None:
                    return None
                slots.append(entry.slot)
            return slots

    def count_hits(self, n: int) -> None:
        """Count ``n`` uses of resident experts made without a pin (see AsyncExpertStore.fixed_slots)."""
        with self.lock:
            setattr(self.stats, self._hit, getattr(self.stats, self._hit) + n)

    def screen(self, keys: Iterable[ExpertKey], priority: float, floor: float) -> list[ExpertKey]:
        """The keys a prefetch at ``priority`` may still be queued for (safe from any thread).

        Keys resident or loading are left out, and so are keys whose chance of use is below ``floor`` (the read
        path's load): :meth:`_try_acquire` would refuse them, so they are refused here, counted, and never cost
        the loop a request. Queued prefetches stay in, as a new priority may move them up.
        """
        out: list[ExpertKey] = []
        with self.lock:
            for key in keys:
                entry = self.entries.get(key)
                if entry is not None and entry.state is not State.QUEUED:
                    continue
                if entry is None and max(priority, self.score(key)) < floor:
                    self.stats.prefetch_dropped += 1
                    self.stats.prefetch_refused += 1
                    continue
                out.append(key)
        return out

    def unpin(self, entries: Iterable[Entry]) -> None:
        """Drop one pin of each entry; experts left without pins become evictable. Safe from any thread."""
        with self.lock:
            self._unpin_locked(entries)

    def _unpin_locked(self, entries: Iterable[Entry]) -> None:
        freed = False
        for entry in entries:
            if entry.pins <= 0:
                raise RuntimeError(f"{entry.key} unpinned more often than pinned")
            entry.pins -= 1
            if entry.pins == 0:
                freed = True
                if not self.keep_after_use and entry.state is State.READY:
                    self._evict(entry)
        if freed:
            self._signal()

    def _signal(self) -> None:
        """Wake loads waiting for a slot (called under the lock)."""
        if self._waiters == 0:
            return
        if threading.get_ident() == self._loop_thread:
            self._freed.set()
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._freed.set)

    # --- slots -------------------------------------------------------------------------------------

    def _evictable(self, entry: Entry, demand: bool) -> bool:
        if entry.state is not State.READY or entry.pins > 0:
            return False
        if demand:
            return True
        # A prefetch never pushes out another prefetch that has not been used yet, nor an expert of the layer
        # being computed or the next one.
        unused_prefetch = entry.prefetched and not entry.used and not entry.demanded
        return not unused_prefetch and not self.protected(entry.key)

    def _try_acquire(self, demand: bool, incoming: Entry) -> int | None:
        """A free slot, or one freed by evicting a victim (for a prefetch: one scored below ``incoming``)."""
        # A prefetch of an expert used with chance p saves waiting only while the read path has time to spare
        # (1 - load), and costs a whole read when wasted, plus the victim's re-read (its chance q), which
        # matters as much as the read path is loaded. Admitted iff p * (1 - load) > (1 - p + q) * load, that
        # is p > load * (1 + q) (a certain prefetch always is); never over a victim likelier than itself.
        want = 0.0 if demand else max(incoming.priority, self.score(incoming.key))
        load = 0.0 if demand else self.prefetch_floor()
        if not demand and want < load:  # the rule screen() applies before a prefetch is queued
            self.stats.prefetch_refused += 1
            return None
        if self._free:
            return self._free.pop()
        candidates = [e.key for e in self._holder.values() if self._evictable(e, demand)]
        if not demand:
            candidates = [k for k in candidates if admits_prefetch(want, self.score(k), load)]
            if not candidates:
                self.stats.prefetch_refused += 1
        if not candidates:
            return None
        victim_key = self.policy.choose_victim(candidates)
        if victim_key is None:
            return None
        self._evict(self.entries[victim_key])
        return self._free.pop()

    async def _acquire(self, entry: Entry) -> int | None:
        """A slot for ``entry``: prefetches take one only if admitted now; demand waits up to fetch_timeout."""
        demand = entry.demanded or entry.pins > 0
        with self.lock:
            slot = self._try_acquire(demand, entry)
            if slot is not None or not demand:
                return slot
            self._waiters += 1
        try:
            deadline = self._loop.time() + self.fetch_timeout
            while True:
                self._freed.clear()
                with self.lock:
                    slot = self._try_acquire(True, entry)
                if slot is not None:
                    return slot
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    raise BudgetError(
                        f"no free {self.name} slot for {self.fetch_timeout:.1f} s: all {self.num_slots} slots "
                        "are pinned by experts in use; release handles sooner or raise the budget"
                    )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), remaining)
        finally:
            with self.lock:
                self._waiters -= 1

    def _evict(self, entry: Entry) -> None:
        if entry.prefetched and not entry.used and not entry.demanded:
            self.stats.prefetch_wasted += 1
        self.stats.evictions += 1
        self.policy.on_remove(entry.key)
        self._release_slot(entry)
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
        entry.state = State.GONE
        entry.generation += 1

    def _release_slot(self, entry: Entry) -> None:
        if entry.slot is not None:
            self._holder.pop(entry.slot, None)
            self._free.append(entry.slot)
            entry.slot = None
            self._signal()

    # --- loading (loop thread) ---------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            entry = await self._queue.pop()
            if self.entries.get(entry.key) is not entry:
                continue
            entry.task = self._loop.create_task(self._load(entry))
            try:
                await asyncio.wait([entry.task])
            except asyncio.CancelledError:
                entry.task.cancel()
                with contextlib.suppress(BaseException):
                    await entry.task
                raise
            finally:
                entry.task = None

    async def _load(self, entry: Entry) -> None:
        try:
            slot = await self._acquire(entry)
            with self.lock:
                if slot is None:
                    self.stats.prefetch_dropped += 1
                    self._forget(entry, None)
                    return
                entry.slot = slot
                self._holder[slot] = entry
                entry.state = State.LOADING
            await self._fill(entry, slot)
            with self.lock:
                entry.state = State.READY
                self.policy.on_insert(entry.key)
                if entry.pins == 0:
                    # Landed unpinned (a prefetch): its slot is now evictable, so a demand load that found every
                    # slot loading must look again, or it would wait for an unpin that may never come.
                    self._signal()
            if not entry.ready.done():
                entry.ready.set_result(None)
        except asyncio.CancelledError:
            with self.lock:
                self._release_slot(entry)
                if self._closed:
                    self._forget(entry, StoreClosedError("the expert store was closed"))
                elif entry.demanded or entry.pins:
                    # A fetch joined a prefetch that was being cancelled: load it again, as demand.
                    entry.state = State.QUEUED
                    self._push(entry, demand=True)
                else:
                    self._forget(entry, None)
            raise
        except BaseException as exc:
            with self.lock:
                self.stats.read_errors += 1
                self._release_slot(entry)
                error = exc if isinstance(exc, ExpertFlowError) else ExpertReadError(str(exc), key=entry.key)
                self._forget(entry, error)

    async def obtain(self, key: ExpertKey) -> Entry:
        """Pin ``key`` and wait until it is resident (for a level in front of another). Unpin when done."""
        (entry,) = self.pin([key])
        try:
            await asyncio.wait_for(asyncio.shield(entry.ready), 2 * self.fetch_timeout)
        except BaseException:
            self.unpin([entry])
            raise
        return entry

    # --- introspection and shutdown ----------------------------------------------------------------

    def resident(self) -> list[ExpertKey]:
        with self.lock:
            return sorted(e.key for e in self.entries.values() if e.state is State.READY)

    def pinned(self) -> list[ExpertKey]:
        with self.lock:
            return sorted(e.key for e in self.entries.values() if e.pins > 0)

    def outstanding_prefetches(self) -> list[ExpertKey]:
        """Prefetches queued or loading that nothing waits for: what :meth:`cancel_prefetches` would withdraw."""
        with self.lock:
            return sorted(e.key for e in self.entries.values() if _withdrawable(e))

    @property
    def free_slots(self) -> int:
        with self.lock:
            return len(self._free)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the expert store is closed")

    async def aclose(self) -> None:
        """Stop the loaders; every waiter still waiting gets :class:`StoreClosedError`."""
        if self._closed:
            return
        self._closed = True
        # One cancellation, then wait (not expertflow.aio.cancel_and_wait): a worker cancelled again while it
        # waits for its load would end before that load's read stops writing into the slot.
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        with self.lock:
            for entry in list(self.entries.values()):
                if not entry.ready.done():
                    entry.ready.set_exception(StoreClosedError("the expert store was closed"))
            self.entries.clear()


def _consume_exception(fut: asyncio.Future[None]) -> None:
    """Mark a future's exception as retrieved: errors are delivered to waiters, not logged as lost."""
    if not fut.cancelled():
        fut.exception()


def _withdrawable(entry: Entry) -> bool:
    """A prefetch not yet resident that no one demands or holds: withdrawing it loses nothing."""
    return not (entry.demanded or entry.pins or entry.state is State.READY)
