"""ExpertStore: experts move source (NVMe / remote) -> host buffer -> device slot under fixed budgets.

``AsyncExpertStore`` is the real thing and lives on one event loop. ``ExpertStore`` is a thin sync wrapper
that owns a background loop thread, for model code that runs outside any loop.

Invariants (each has a test): budgets are never exceeded (slot tables are fixed-size); one read per key in
flight (later requests join the entry's future); a pinned expert is never evicted or overwritten; demand
loads overtake prefetches; a cancelled prefetch gives its slot back; a read error reaches exactly the
callers waiting for that key and the store stays usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from expertflow.config import StoreConfig
from expertflow.errors import (
    BudgetError,
    ChecksumError,
    ConfigError,
    ExpertFlowError,
    ExpertReadError,
    RemoteError,
    StoreClosedError,
)
from expertflow.pipeline.policy import EvictionPolicy, make_policy
from expertflow.pipeline.runtime import LoopThread
from expertflow.pipeline.stages import Entry, LoadQueue, SlotTable, State
from expertflow.tiers.base import ExpertSource
from expertflow.tiers.device import CopyDeviceTier, SharedDeviceTier
from expertflow.tiers.dtypes import torch_dtype
from expertflow.tiers.host import HostPool, round_up
from expertflow.tiers.layout import ExpertKey, ExpertLayout
from expertflow.tiers.nvme import BLOCK, NvmeTier
from expertflow.tiers.safetensors_index import open_checkpoint

log = logging.getLogger(__name__)


@dataclass
class StoreStats:
    """Counters of one store. Cheap: plain integer/float updates on the loop thread."""

    device_hits: int = 0
    device_misses: int = 0
    joined_inflight: int = 0
    host_hits: int = 0
    host_misses: int = 0
    bytes_read: dict[str, int] = field(default_factory=dict)
    reads: dict[str, int] = field(default_factory=dict)
    source_errors: dict[str, int] = field(default_factory=dict)
    bytes_uploaded: int = 0
    evictions: int = 0
    stall_seconds: float = 0.0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    prefetch_cancelled: int = 0
    prefetch_dropped: int = 0
    read_errors: int = 0
    num_slots: int = 0
    host_buffers: int = 0
    host_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.device_hits + self.device_misses
        return self.device_hits / total if total else 0.0

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        return d


@dataclass(eq=False)
class ExpertHandle:
    """A resident, pinned expert. Release it (or the store) when compute no longer needs it."""

    key: ExpertKey
    slot: int
    buffer: memoryview
    _store: AsyncExpertStore = field(repr=False)
    _released: bool = field(default=False, repr=False)

    def tensor(self, role: str) -> torch.Tensor:
        """View of one tensor of this expert on the compute device."""
        return self._store.tensor(self.key, self.slot, role)


def _as_layout(layout_or_path: ExpertLayout | str | Path) -> ExpertLayout:
    if isinstance(layout_or_path, ExpertLayout):
        return layout_or_path
    return open_checkpoint(layout_or_path)


class AsyncExpertStore:
    """The tiered store on one event loop. Create with ``await AsyncExpertStore.open(...)``."""

    def __init__(
        self,
        layout: ExpertLayout,
        config: StoreConfig,
        sources: list[ExpertSource],
        *,
        owned_sources: Sequence[ExpertSource] = (),
        separate_device: bool | None = None,
    ) -> None:
        if not layout.experts:
            raise ConfigError(f"checkpoint {layout.root} has no routed experts to store")
        self.layout = layout
        self.config = config
        self.sources = list(sources)
        self._owned_sources = list(owned_sources)
        self._closed = False
        self._stats = StoreStats()
        self._entries: dict[ExpertKey, Entry] = {}
        self._loop = asyncio.get_running_loop()
        self._scorer: Callable[[ExpertKey], float] | None = None

        buffer_nbytes = max(max(s.buffer_nbytes() for s in self.sources), layout.max_expert_nbytes)
        self.buffer_nbytes = round_up(buffer_nbytes, BLOCK)
        device = torch.device(config.device)
        if separate_device is None:
            separate_device = device.type != "cpu"
        host_budget = config.host_bytes
        if host_budget is None:
            host_budget = self.buffer_nbytes * len(layout.experts)
        self.pool = HostPool(self.buffer_nbytes, host_budget)
        try:
            if separate_device:
                slots = config.device_slots or min(self.pool.num_buffers, len(layout.experts))
                self.device_tier: SharedDeviceTier | CopyDeviceTier = CopyDeviceTier(
                    device, slots, self.buffer_nbytes
                )
                self._host: SlotTable | None = SlotTable(self.pool.num_buffers, self._make_policy(), "host")
                self._host_entries: dict[ExpertKey, Entry] = {}
            else:
                self.device_tier = SharedDeviceTier(self.pool)
                self._host = None
                self._host_entries = {}
        except BaseException:
            self.pool.close()
            raise
        self.device = self.device_tier.device
        self.num_slots = self.device_tier.num_slots
        self.slot_arena = self.device_tier.arena
        self._slots = SlotTable(self.num_slots, self._make_policy(), "device")
        self._no_cache = config.policy == "none"
        self._queue = LoadQueue(max_prefetches=self.num_slots)
        workers = max(
            1, min(config.max_concurrent_reads, config.max_inflight_bytes // self.buffer_nbytes or 1)
        )
        self._workers = [
            self._loop.create_task(self._worker(), name=f"expertflow-loader-{i}") for i in range(workers)
        ]
        self._stats.num_slots = self.num_slots
        self._stats.host_buffers = self.pool.num_buffers
        self._stats.host_bytes = self.pool.nbytes
        self._stacked_cache: dict[tuple[int, tuple[str, ...]], torch.Tensor] = {}

    def _make_policy(self) -> EvictionPolicy:
        name = self.config.policy
        if name == "none":
            return make_policy("lru")
        if name == "static":
            keys = [ExpertKey(int(layer), int(e)) for layer, e in self.config.static_experts]
            return make_policy("static", keys=keys)
        if name == "predictive":
            return make_policy("predictive", scores=self._score)
        return make_policy(name)

    def _score(self, key: ExpertKey) -> float:
        return self._scorer(key) if self._scorer is not None else 0.0

    def set_scorer(self, scorer: Callable[[ExpertKey], float] | None) -> None:
        """Scores (higher = needed sooner) the predictive eviction policy consults."""
        self._scorer = scorer

    @classmethod
    async def open(
        cls,
        layout_or_path: ExpertLayout | str | Path,
        config: StoreConfig | None = None,
        *,
        sources: list[ExpertSource] | None = None,
        separate_device: bool | None = None,
    ) -> AsyncExpertStore:
        """Open a store over a checkpoint. ``sources`` default to the checkpoint's NVMe tier."""
        config = config or StoreConfig()
        layout = await asyncio.to_thread(_as_layout, layout_or_path)
        owned: list[ExpertSource] = []
        if sources is None:
            nvme = NvmeTier(
                layout,
                config.read_mode,
                max_concurrent_reads=config.max_concurrent_reads,
                verify_checksums=config.verify_checksums,
            )
            owned.append(nvme)
            sources = []
            if config.remote:
                from expertflow.tiers.remote import RemoteTier

                try:
                    remote = await RemoteTier.connect(layout, config)
                except BaseException:
                    nvme.close()
                    raise
                owned.append(remote)
                sources.append(remote)
            sources.append(nvme)
        try:
            return cls(layout, config, sources, owned_sources=owned, separate_device=separate_device)
        except BaseException:
            for s in owned:
                s.close()
            raise

    # --- views -------------------------------------------------------------------------------------

    def tensor(self, key: ExpertKey, slot: int, role: str) -> torch.Tensor:
        spec = self.layout.spec(key)
        for t, off in spec.views():
            if t.role == role:
                dtype = torch_dtype(t.dtype)
                raw = self.slot_arena[slot, off : off + t.nbytes]
                return raw.view(dtype).view(t.shape)
        raise KeyError(f"expert {key} has no tensor {role!r}; it has {[t.role for t in spec.tensors]}")

    def stacked(self, layer: int, roles: str | tuple[str, ...]) -> torch.Tensor:
        """Typed ``[num_slots, *shape]`` view of tensor(s) ``roles`` of ``layer``'s experts over every slot.

        Several roles must be adjacent in the slot, same dtype and trailing shape; they come back concatenated
        along the expert tensor's first dimension (``("w1.weight", "w3.weight")`` -> ``[slots, 2I, H]``).
        """
        roles_t = (roles,) if isinstance(roles, str) else tuple(roles)
        cache_key = (layer, roles_t)
        if cache_key in self._stacked_cache:
            return self._stacked_cache[cache_key]
        spec = self.layout.spec(ExpertKey(layer, 0))
        by_role = {t.role: (t, off) for t, off in spec.views()}
        missing = [r for r in roles_t if r not in by_role]
        if missing:
            raise ConfigError(f"layer {layer} experts have no tensors {missing}; they have {sorted(by_role)}")
        parts = [by_role[r] for r in roles_t]
        first, start = parts[0]
        pos = start
        for t, off in parts:
            if off != pos or t.dtype != first.dtype or tuple(t.shape[1:]) != tuple(first.shape[1:]):
                raise ConfigError(
                    f"tensors {roles_t} of layer {layer} are not adjacent slices of one dtype/shape"
                )
            pos += t.nbytes
        dtype = torch_dtype(first.dtype)
        el = dtype.itemsize
        shape = (sum(t.shape[0] for t, _ in parts), *first.shape[1:]) if first.shape else ()
        numel = (pos - start) // el
        typed = self.slot_arena.view(dtype)  # [num_slots, slot_nbytes / el]
        view = typed[:, start // el : start // el + numel].view(self.num_slots, *shape)
        self._stacked_cache[cache_key] = view
        return view

    # --- demand --------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the expert store is closed")

    def _request(self, key: ExpertKey, *, demand: bool, priority: float = 0.0) -> Entry:
        """Find or create the entry for ``key`` and make sure a load is queued with the right urgency."""
        if key not in self.layout.experts:
            raise ExpertReadError("no such expert in this checkpoint", key=key)
        entry = self._entries.get(key)
        if entry is None:
            entry = Entry(key=key, ready=self._loop.create_future(), priority=priority)
            entry.ready.add_done_callback(_consume_exception)
            self._entries[key] = entry
            if not demand:
                entry.prefetched = True
                self._stats.prefetch_issued += 1
            self._push(entry, demand=demand)
        elif entry.state is State.QUEUED and demand and not entry.demanded:
            self._push(entry, demand=True)  # overtakes the prefetch queue
        if demand:
            entry.demanded = True
        return entry

    def _push(self, entry: Entry, *, demand: bool) -> None:
        dropped = self._queue.push(entry, demand=demand)
        if dropped is not None and dropped.pins == 0 and not dropped.demanded:
            self._stats.prefetch_dropped += 1
            self._forget(dropped, StoreClosedError("prefetch dropped"))

    def _forget(self, entry: Entry, exc: BaseException | None) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        if not entry.ready.done():
            if exc is None:
                entry.ready.cancel()
            else:
                entry.ready.set_exception(exc)

    def _account(self, entry: Entry) -> None:
        if entry.state is State.READY:
            self._stats.device_hits += 1
            self._slots.policy.on_access(entry.key)
        else:
            self._stats.device_misses += 1
            if entry.state is State.LOADING or entry.prefetched:
                self._stats.joined_inflight += 1
        if entry.prefetched and not entry.used:
            entry.used = True
            self._stats.prefetch_used += 1

    def _pin(self, keys: Sequence[ExpertKey]) -> list[Entry]:
        self._check_open()
        unique = list(dict.fromkeys(keys))
        entries = []
        try:
            for key in unique:
                entry = self._request(key, demand=True)
                self._account(entry)
                entry.pins += 1
                entries.append(entry)
        except BaseException:
            self._unpin(entries)
            raise
        return entries

    def _unpin(self, entries: Iterable[Entry]) -> None:
        freed = False
        for entry in entries:
            entry.pins -= 1
            if entry.pins == 0:
                freed = True
                if self._no_cache and entry.state is State.READY:
                    self._evict(entry)
        if freed:
            self._loop.create_task(self._slots.notify()).add_done_callback(_consume_exception)

    def _handle(self, entry: Entry) -> ExpertHandle:
        assert entry.slot is not None
        self.device_tier.wait_ready(entry.slot)
        spec = self.layout.spec(entry.key)
        # With a separate device tier the host copy may be evicted while the handle lives: no buffer then.
        buffer = self.pool.buffer(entry.slot)[: spec.nbytes] if self._host is None else memoryview(b"")
        return ExpertHandle(entry.key, entry.slot, buffer, self)

    async def fetch(self, keys: Sequence[ExpertKey], *, timeout: float | None = None) -> list[ExpertHandle]:
        """Make every key resident and pinned; handles come back in the order of ``keys`` (deduplicated)."""
        unique = list(dict.fromkeys(keys))
        if len(unique) > self.num_slots:
            raise BudgetError(
                f"fetch of {len(unique)} experts at once needs {len(unique)} slots; the store has "
                f"{self.num_slots}. Raise the budget or use fetch_as_ready()"
            )
        entries = self._pin(unique)
        try:
            waiting = [e.ready for e in entries if not e.ready.done()]
            if waiting:
                t0 = time.perf_counter()
                try:
                    # The load itself gives up waiting for a slot after fetch_timeout with a precise
                    # BudgetError; the caller's own deadline leaves it room to do so.
                    await asyncio.wait_for(asyncio.gather(*waiting), timeout or 2 * self.config.fetch_timeout)
                finally:
                    self._stats.stall_seconds += time.perf_counter() - t0
            for e in entries:
                e.ready.result()  # re-raises that key's error
        except asyncio.TimeoutError:
            self._unpin(entries)
            raise ExpertReadError(
                f"experts not resident after {timeout or 2 * self.config.fetch_timeout} s"
            ) from None
        except BaseException:
            self._unpin(entries)
            raise
        return [self._handle(e) for e in entries]

    async def fetch_as_ready(self, keys: Sequence[ExpertKey]) -> AsyncGenerator[list[ExpertHandle], None]:
        """Yield pinned handles in waves: the resident experts first, then the others as they land.

        Keys may outnumber slots as long as the caller releases each wave before asking for the next.
        Errors of a key are raised when its wave would come; handles not yet yielded are unpinned on exit.
        """
        pending = self._pin(keys)
        try:
            while pending:
                wave, pending = await self.next_wave(pending)
                yield wave
        finally:
            if pending:
                self._unpin(pending)

    async def next_wave(self, pending: list[Entry]) -> tuple[list[ExpertHandle], list[Entry]]:
        """Wait until some of the pinned ``pending`` entries are resident; their handles and the rest.

        On error nothing is unpinned here: the caller still holds ``pending`` and unpins all of it.
        """
        ready = [e for e in pending if e.ready.done()]
        if not ready:
            t0 = time.perf_counter()
            try:
                await asyncio.wait(
                    [e.ready for e in pending],
                    timeout=self.config.fetch_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                self._stats.stall_seconds += time.perf_counter() - t0
            ready = [e for e in pending if e.ready.done()]
            if not ready:
                raise ExpertReadError(f"no expert became resident within {self.config.fetch_timeout} s")
        rest = [e for e in pending if not e.ready.done()]
        failed = [e for e in ready if e.ready.cancelled() or e.ready.exception() is not None]
        if failed:
            failed[0].ready.result()  # raises the key's own error
        return [self._handle(e) for e in ready], rest

    async def begin_waves(self, keys: Sequence[ExpertKey]) -> tuple[list[ExpertHandle], list[Entry]]:
        """Pin every key; the handles of those already resident (possibly none) and the pending entries.

        One call (one loop round-trip from a sync caller) when the whole layer is resident.
        """
        entries = self._pin(keys)
        ready = [
            e for e in entries if e.ready.done() and not e.ready.cancelled() and e.ready.exception() is None
        ]
        if len(ready) == len(entries):
            return [self._handle(e) for e in ready], []
        rest = [e for e in entries if e not in ready]
        return [self._handle(e) for e in ready], rest

    def unpin_pending(self, pending: Iterable[Entry]) -> None:
        self._unpin(pending)

    def release(self, handles: Iterable[ExpertHandle]) -> None:
        """Unpin handles; released experts become evictable. Releasing twice is a no-op."""
        entries = []
        for h in handles:
            if h._released:
                continue
            h._released = True
            entry = self._entries.get(h.key)
            if entry is not None and entry.slot == h.slot:
                entries.append(entry)
        self._unpin(entries)

    # --- prefetch ------------------------------------------------------------------------------------

    def prefetch(self, keys: Iterable[ExpertKey], priority: float = 0.0) -> None:
        """Hint that ``keys`` will be needed soon (higher ``priority`` = sooner). Never blocks, may be dropped."""
        if self._closed:
            return
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                self._request(key, demand=False, priority=priority)
            elif entry.state is State.QUEUED and not entry.demanded and priority > entry.priority:
                entry.priority = priority
                self._push(entry, demand=False)

    def cancel_prefetches(self, keep: Iterable[ExpertKey] = ()) -> int:
        """Cancel queued or loading prefetches not in ``keep``; their slots come back. Returns how many."""
        keep_set = set(keep)
        cancelled = 0
        for entry in list(self._entries.values()):
            if entry.key in keep_set or entry.demanded or entry.pins or entry.state is State.READY:
                continue
            cancelled += 1
            if entry.state is State.LOADING and entry.task is not None:
                entry.task.cancel()
            else:
                entry.generation += 1
                self._forget(entry, None)
        self._stats.prefetch_cancelled += cancelled
        return cancelled

    # --- loading -------------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            entry = await self._queue.pop()
            if self._entries.get(entry.key) is not entry:
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

    def _evictable(self, demand: bool) -> Callable[[Entry], bool]:
        if demand:
            return lambda e: True
        # A prefetch never pushes out another prefetch that has not been used yet.
        return lambda e: not (e.prefetched and not e.used and not e.demanded)

    def _evict(self, entry: Entry) -> None:
        if entry.prefetched and not entry.used and not entry.demanded:
            self._stats.prefetch_wasted += 1
        self._stats.evictions += 1
        self._slots.policy.on_remove(entry.key)
        if entry.slot is not None:
            self._slots.release_slot(entry.slot)
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        entry.slot = None
        entry.state = State.QUEUED
        entry.generation += 1

    async def _load(self, entry: Entry) -> None:
        demand = entry.demanded or entry.pins > 0
        slot: int | None = None
        try:
            if demand:
                slot = await self._slots.acquire(
                    self._evictable(True), self._evict, self.config.fetch_timeout
                )
            else:
                slot = self._slots.try_acquire(self._evictable(False), self._evict)
                if slot is None:
                    self._stats.prefetch_dropped += 1
                    self._forget(entry, StoreClosedError("prefetch dropped: no evictable slot"))
                    return
            self._slots.assign(slot, entry)
            entry.state = State.LOADING
            nbytes = self.layout.spec(entry.key).nbytes
            if self._host is None:
                await self._read(entry.key, self.pool.buffer(slot))
            else:
                host_index = await self._host_resident(entry.key, demand)
                try:
                    await self.device_tier.upload(self.pool, host_index, slot, nbytes)
                    self._stats.bytes_uploaded += nbytes
                finally:
                    self._host_unpin(entry.key)
            entry.state = State.READY
            self._slots.policy.on_insert(entry.key)
            if not entry.ready.done():
                entry.ready.set_result(None)
        except asyncio.CancelledError:
            if self._closed:
                self._fail(entry, slot, StoreClosedError("the expert store was closed"))
            elif entry.demanded or entry.pins:
                # A fetch joined a prefetch that was being cancelled: load it again, as demand.
                self._fail(entry, slot, None, forget=False)
                self._push(entry, demand=True)
            else:
                self._fail(entry, slot, None)
            raise
        except BaseException as exc:
            self._stats.read_errors += 1
            self._fail(entry, slot, exc if isinstance(exc, ExpertFlowError) else ExpertReadError(str(exc)))

    def _fail(
        self, entry: Entry, slot: int | None, exc: BaseException | None, *, forget: bool = True
    ) -> None:
        if slot is not None:
            self._slots.release_slot(slot)
            entry.slot = None
        entry.state = State.QUEUED
        entry.generation += 1
        if forget:
            self._forget(entry, exc)
        self._loop.create_task(self._slots.notify()).add_done_callback(_consume_exception)

    async def _read(self, key: ExpertKey, buf: memoryview) -> None:
        """Fill ``buf`` from the first source that can; remote failures fall through to the next source."""
        last: BaseException | None = None
        for source in self.sources:
            try:
                n = await source.read(key, buf)
            except (RemoteError, ChecksumError) as exc:
                if isinstance(exc, ChecksumError) and source is self.sources[-1]:
                    raise
                self._stats.source_errors[source.name] = self._stats.source_errors.get(source.name, 0) + 1
                log.warning("source %s failed for %s: %s; trying the next source", source.name, key, exc)
                last = exc
                continue
            self._stats.reads[source.name] = self._stats.reads.get(source.name, 0) + 1
            self._stats.bytes_read[source.name] = self._stats.bytes_read.get(source.name, 0) + n
            return
        raise ExpertReadError(f"every source failed; last error: {last}", key=key)

    # --- host level (only when the device tier has its own slots) -----------------------------------

    async def _host_resident(self, key: ExpertKey, demand: bool) -> int:
        """Make ``key`` resident in a host buffer (inclusive cache) and pin it for the upload."""
        assert self._host is not None
        while True:
            host = self._host_entries.get(key)
            if host is None:
                break
            if host.state is State.READY:
                self._stats.host_hits += 1
                self._host.policy.on_access(key)
                host.pins += 1
                assert host.slot is not None
                return host.slot
            await asyncio.shield(host.ready)
        self._stats.host_misses += 1
        host = Entry(key=key, ready=self._loop.create_future())
        host.ready.add_done_callback(_consume_exception)
        host.pins = 1
        self._host_entries[key] = host

        def evict_host(victim: Entry) -> None:
            assert self._host is not None
            self._host.policy.on_remove(victim.key)
            if victim.slot is not None:
                self._host.release_slot(victim.slot)
            self._host_entries.pop(victim.key, None)

        try:
            index = await self._host.acquire(lambda e: True, evict_host, self.config.fetch_timeout)
            self._host.assign(index, host)
            host.state = State.LOADING
            await self._read(key, self.pool.buffer(index))
        except BaseException as exc:
            if host.slot is not None:
                self._host.release_slot(host.slot)
            self._host_entries.pop(key, None)
            if not host.ready.done():
                host.ready.set_exception(exc if isinstance(exc, Exception) else StoreClosedError("cancelled"))
            raise
        host.state = State.READY
        self._host.policy.on_insert(key)
        host.ready.set_result(None)
        return index

    def _host_unpin(self, key: ExpertKey) -> None:
        host = self._host_entries.get(key)
        if host is not None and self._host is not None:
            host.pins -= 1
            if host.pins == 0:
                self._loop.create_task(self._host.notify()).add_done_callback(_consume_exception)

    # --- introspection and shutdown -------------------------------------------------------------------

    def resident(self) -> list[ExpertKey]:
        return sorted(e.key for e in self._entries.values() if e.state is State.READY)

    def pinned(self) -> list[ExpertKey]:
        return sorted(e.key for e in self._entries.values() if e.pins > 0)

    def stats(self) -> StoreStats:
        return StoreStats(**asdict(self._stats))

    async def aclose(self) -> None:
        """Cancel loaders, fail outstanding waiters with StoreClosedError, free buffers and sources."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for entry in list(self._entries.values()):
            if not entry.ready.done():
                entry.ready.set_exception(StoreClosedError("the expert store was closed"))
        self._entries.clear()
        self._stacked_cache.clear()
        for s in self._owned_sources:
            aclose = getattr(s, "aclose", None)
            if aclose is not None:
                await aclose()
            else:
                s.close()
        self.device_tier.close()
        self.slot_arena = torch.empty(0, dtype=torch.uint8)
        self.pool.close()


def _consume_exception(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as retrieved: errors are delivered to waiters, not logged as lost."""
    if not fut.cancelled():
        fut.exception()


class ExpertStore:
    """Synchronous face of :class:`AsyncExpertStore`, for model code; owns the loop thread."""

    def __init__(
        self,
        layout_or_path: ExpertLayout | str | Path,
        config: StoreConfig | None = None,
        *,
        sources: list[ExpertSource] | None = None,
        separate_device: bool | None = None,
    ) -> None:
        self.config = config or StoreConfig()
        self.runtime = LoopThread()
        try:
            self._store: AsyncExpertStore = self.runtime.run(
                AsyncExpertStore.open(
                    layout_or_path, self.config, sources=sources, separate_device=separate_device
                )
            )
        except BaseException:
            self.runtime.close()
            raise
        self.layout = self._store.layout
        self.device = self._store.device
        self.num_slots = self._store.num_slots
        self.last_fetch_waited = False

    @property
    def slot_arena(self) -> torch.Tensor:
        return self._store.slot_arena

    @property
    def async_store(self) -> AsyncExpertStore:
        return self._store

    def _call(self, fn: Callable[[], object]) -> object:
        async def call() -> object:
            return fn()

        return self.runtime.run(call())

    def stacked(self, layer: int, roles: str | tuple[str, ...]) -> torch.Tensor:
        return self._store.stacked(layer, roles)

    def fetch(self, keys: Sequence[ExpertKey], timeout: float | None = None) -> list[ExpertHandle]:
        return self.runtime.run(self._store.fetch(keys, timeout=timeout))

    def fetch_as_ready(self, keys: Sequence[ExpertKey]) -> Iterator[list[ExpertHandle]]:
        store = self._store
        first, pending = self.runtime.run(store.begin_waves(keys))
        self.last_fetch_waited = bool(pending)
        try:
            if first:
                yield first
            while pending:
                wave, pending = self.runtime.run(store.next_wave(pending))
                yield wave
        finally:
            if pending and not store._closed:
                self._post(store.unpin_pending, pending)

    def prefetch(self, keys: Iterable[ExpertKey], priority: float = 0.0) -> None:
        self._post(self._store.prefetch, list(keys), priority)

    def cancel_prefetches(self, keep: Iterable[ExpertKey] = ()) -> int:
        keep = list(keep)
        return int(self._call(lambda: self._store.cancel_prefetches(keep)))  # type: ignore[call-overload]

    def cancel_prefetches_nowait(self, keep: Iterable[ExpertKey] = ()) -> None:
        """Like :meth:`cancel_prefetches`, without waiting for the loop (for the compute hot path)."""
        self._post(self._store.cancel_prefetches, list(keep))

    def release(self, handles: Iterable[ExpertHandle]) -> None:
        self._post(self._store.release, list(handles))

    def _post(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn`` on the loop without waiting. Hints and releases after close() are no-ops."""
        try:
            self.runtime.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the store is gone, nothing to hint or release
            if not self.runtime.loop.is_closed():
                raise

    def set_scorer(self, scorer: Callable[[ExpertKey], float] | None) -> None:
        self._call(lambda: self._store.set_scorer(scorer))

    def stats(self) -> StoreStats:
        return self._call(self._store.stats)  # type: ignore[return-value]

    def resident(self) -> list[ExpertKey]:
        return self._call(self._store.resident)  # type: ignore[return-value]

    def close(self) -> None:
        if self.runtime.loop.is_closed():
            return
        with contextlib.suppress(StoreClosedError):
            self.runtime.run(self._store.aclose())
        self.runtime.close()

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
