"""AsyncExpertStore: experts move source chain -> host buffer -> device slot under fixed budgets.

The store composes parts that each do one job: a :class:`~expertflow.pipeline.sources.SourceChain` (where
missing bytes come from), a :class:`~expertflow.tiers.host.HostPool` (the budgeted RAM), a device tier (slots
on the compute device), one :class:`~expertflow.pipeline.cache.CacheLevel` per level of memory (the same class
for host and device), and :class:`~expertflow.pipeline.views.SlotViews` (typed tensors over slots). It lives
on one event loop; :mod:`expertflow.pipeline.sync` is its synchronous face.

Invariants (each has a test): budgets are never exceeded (slot tables are fixed-size); one read per key in
flight (later requests join the entry's future); a pinned expert is never evicted or overwritten; demand
loads overtake prefetches; a prefetch never evicts an expert that is pinned, belongs to the layer being
computed or the next one, or is scored as more likely to be needed than the one it would load; a cancelled
prefetch gives its slot back; a read error reaches exactly the callers waiting for that key and the store
stays usable.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from expertflow.config import StoreConfig
from expertflow.core import ExpertKey
from expertflow.errors import BudgetError, ConfigError, ExpertReadError, StoreClosedError
from expertflow.pipeline.cache import CacheLevel, Entry, Fill, Scorer
from expertflow.pipeline.planner import plan_store, resolve_read_mode
from expertflow.pipeline.policy import EvictionPolicy, PredictivePolicy, make_policy
from expertflow.pipeline.sources import SourceChain
from expertflow.pipeline.stats import StoreStats
from expertflow.pipeline.views import SlotViews
from expertflow.tiers.base import ExpertSource
from expertflow.tiers.device import CopyDeviceTier, SharedDeviceTier
from expertflow.tiers.host import HostPool
from expertflow.tiers.layout import ExpertLayout
from expertflow.tiers.nvme import NvmeTier
from expertflow.tiers.safetensors_index import open_checkpoint

#: ``(key, device slot) -> None``: converts an expert's stored bytes in its slot in place.
FillTransform = Callable[[ExpertKey, int], None]

log = logging.getLogger(__name__)

#: Seconds over which the read path's busy fraction is measured for prefetch admission.
PRESSURE_WINDOW = 0.05

SourceBuilder = Callable[[ExpertLayout, StoreConfig], Awaitable[Sequence[ExpertSource]]]


@dataclass(eq=False)
class ExpertHandle:
    """A resident, pinned expert: its key and the device slot holding it. Release it when compute is done."""

    key: ExpertKey
    slot: int
    _entry: Entry = field(repr=False)
    _released: bool = field(default=False, repr=False)


class PendingFetch:
    """Experts pinned by :meth:`AsyncExpertStore.start_fetch`, handed out in waves as they become resident.

    ``ready`` holds the handles of the experts resident at once. :meth:`next_wave` waits for more;
    :meth:`cancel` unpins what was not handed out (safe from any thread, idempotent).
    """

    def __init__(self, store: AsyncExpertStore, ready: list[ExpertHandle], pending: list[Entry]) -> None:
        self._store = store
        self.ready = ready
        self._pending = pending

    @property
    def remaining(self) -> int:
        return len(self._pending)

    async def next_wave(self) -> list[ExpertHandle]:
        """Wait until some of the remaining experts are resident; their handles. Raises a key's own error."""
        if not self._pending:
            return []
        wave, self._pending = await self._store._next_wave(self._pending)
        return wave

    def cancel(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            self._store._device.unpin(pending)


def _as_layout(layout_or_path: ExpertLayout | str | Path) -> ExpertLayout:
    return layout_or_path if isinstance(layout_or_path, ExpertLayout) else open_checkpoint(layout_or_path)


class AsyncExpertStore:
    """The tiered store on one event loop. Create with ``await AsyncExpertStore.open(...)``."""

    def __init__(
        self,
        layout: ExpertLayout,
        config: StoreConfig,
        sources: SourceChain,
        *,
        separate_device: bool | None = None,
    ) -> None:
        if not layout.experts:
            raise ConfigError(f"checkpoint {layout.root} has no routed experts to store")
        self.layout = layout
        self.config = config
        self.sources = sources
        self._closed = False
        self._stats = StoreStats()
        self._lock = threading.RLock()
        self._scorer: Scorer | None = None
        self._layers = sorted({k.layer for k in layout.experts})
        self._next_layer = dict(zip(self._layers, self._layers[1:]))
        self._current_layer: int | None = None
        self._fill_transform: FillTransform | None = None
        self._visit_observers: list[PredictivePolicy] = []  # policies that learn from each layer's visit

        self.plan = plan_store(layout, config, source_needs=sources.buffer_needs())
        self.slot_nbytes = self.plan.slot_nbytes
        self.budget = self.plan.budget
        device = torch.device(config.device)
        separate = device.type != "cpu" if separate_device is None else separate_device
        self.pool = HostPool(self.slot_nbytes, self.budget.host_bytes)
        try:
            self._host: CacheLevel | None = None
            if separate:
                slots = config.device_slots or min(self.pool.num_buffers, len(layout.experts))
                self.device_tier: SharedDeviceTier | CopyDeviceTier = CopyDeviceTier(
                    device, slots, self.slot_nbytes
                )
                self._host = self._level("host", self.pool.num_buffers, self._fill_host)
                fill_device: Fill = self._fill_from_host
            else:
                self.device_tier = SharedDeviceTier(self.pool)
                fill_device = self._fill_host
            self._fill_base = fill_device
            self._device = self._level("device", self.device_tier.num_slots, self._fill_device)
        except BaseException:
            self.pool.close()
            raise
        self._device.score = self._score
        self._device.protected = self._protected
        self._device.prefetch_floor = self._read_pressure
        self._pressure = 0.0
        self._pressure_at = (time.monotonic(), 0.0)
        self.device = self.device_tier.device
        self.num_slots = self.device_tier.num_slots
        self.views = SlotViews(layout, self.device_tier.arena)
        self._stats.num_slots = self.num_slots
        #: Every expert has a slot of its own and stays once loaded: nothing is ever evicted (see fixed_slots).
        self.holds_every_expert = self._device.keep_after_use and self.num_slots >= len(layout.experts)
        self._stats.host_buffers = self.pool.num_buffers
        self._stats.host_bytes = self.pool.nbytes

    def _level(self, name: str, num_slots: int, fill: Fill) -> CacheLevel:
        workers = self.plan.reads_in_flight
        return CacheLevel(
            name,
            num_slots,
            self._make_policy(),
            fill,
            stats=self._stats,
            lock=self._lock,
            workers=workers,
            fetch_timeout=self.config.fetch_timeout,
            keep_after_use=self.config.policy != "none",
        )

    def _make_policy(self) -> EvictionPolicy:
        name = self.config.policy
        if name == "none":
            return make_policy("lru")
        if name == "static":
            keys = [ExpertKey(int(layer), int(e)) for layer, e in self.config.static_experts]
            return make_policy("static", keys=keys)
        if name == "predictive":
            policy = PredictivePolicy(self._predicted, layers=self._layers)
            self._visit_observers.append(policy)
            return policy
        return make_policy(name)

    @classmethod
    async def open(
        cls,
        layout_or_path: ExpertLayout | str | Path,
        config: StoreConfig | None = None,
        *,
        sources: Sequence[ExpertSource] | None = None,
        build_sources: SourceBuilder | None = None,
        separate_device: bool | None = None,
    ) -> AsyncExpertStore:
        """Open a store over a checkpoint; it owns its sources.

        The sources are ``sources``, else what ``build_sources(layout, config)`` returns (run on this loop), else
        the checkpoint's NVMe tier. Expert daemons (``config.remote``) need a builder that knows them:
        :func:`expertflow.open_store` and :func:`expertflow.open_async_store` pass
        :func:`expertflow.assemble.build_sources`.
        """
        config = config or StoreConfig()
        layout = await asyncio.to_thread(_as_layout, layout_or_path)
        if config.read_mode == "auto":
            config = await asyncio.to_thread(resolve_read_mode, layout, config)
        if sources is None and build_sources is not None:
            sources = await build_sources(layout, config)
        if sources is None:
            if config.remote:
                raise ConfigError(
                    "StoreConfig.remote names expert daemons: open the store with expertflow.open_store() or "
                    "expertflow.open_async_store(), which build the daemon sources, or pass sources="
                )
            sources = [
                NvmeTier(
                    layout,
                    config.read_mode,
                    max_concurrent_reads=config.max_concurrent_reads,
                    verify_checksums=config.verify_checksums,
                )
            ]
        chain = SourceChain(sources)
        try:
            return cls(layout, config, chain, separate_device=separate_device)
        except BaseException:
            await chain.aclose()
            raise

    # --- filling slots --------------------------------------------------------------------------------

    async def _fill_host(self, entry: Entry, index: int) -> None:
        await self.sources.read(entry.key, self.pool.buffer(index), self._stats)

    async def _fill_from_host(self, entry: Entry, slot: int) -> None:
        assert self._host is not None
        host = await self._host.obtain(entry.key)
        try:
            assert host.slot is not None
            nbytes = self.layout.spec(entry.key).nbytes
            await self.device_tier.upload(self.pool, host.slot, slot, nbytes)
            with self._lock:
                self._stats.bytes_uploaded += nbytes
        finally:
            self._host.unpin([host])

    async def _fill_device(self, entry: Entry, slot: int) -> None:
        await self._fill_base(entry, slot)
        transform = self._fill_transform
        if transform is None:
            return
        t0 = time.perf_counter()

        def run() -> None:
            self.device_tier.wait_ready(slot)  # a device slot's upload may still be in flight on its stream
            transform(entry.key, slot)

        await asyncio.to_thread(run)
        with self._lock:
            self._stats.fill_transforms += 1
            self._stats.fill_transform_seconds += time.perf_counter() - t0

    def set_fill_transform(self, transform: FillTransform | None) -> None:
        """Run ``transform(key, slot)`` on every device slot once it holds an expert's stored bytes, before
        anyone sees it: an expert conversion that is not a view of the stored bytes (a de-interleave), done
        once per fill, in a worker thread, and counted (``fill_transforms``, ``fill_transform_seconds``).

        Slots already filled would be left unconverted, so this is refused once any expert is resident, and
        a store converts for one model only. The host pool and the daemon keep the stored bytes.
        """
        with self._lock:
            if transform is not None and (self._fill_transform is not None or self._device.entries):
                raise ConfigError(
                    "a fill transform must be set on a fresh store, before any expert is read, and only once"
                )
            self._fill_transform = transform

    # --- prediction and admission -------------------------------------------------------------------

    def set_scorer(self, scorer: Scorer | None) -> None:
        """How likely each expert is needed soon (0..1): prefetch admission and the predictive policy use it."""
        self._scorer = scorer

    def _score(self, key: ExpertKey) -> float:
        scorer = self._scorer
        return scorer(key) if scorer is not None else 0.0

    def _predicted(self, key: ExpertKey) -> float | None:
        """The predictor's view of ``key``, or None without one (the predictive policy then uses its own)."""
        scorer = self._scorer
        return scorer(key) if scorer is not None else None

    def _protected(self, key: ExpertKey) -> bool:
        """Experts of the layer being computed and of the next one: a prefetch never evicts them."""
        current = self._current_layer
        return current is not None and (key.layer == current or key.layer == self._next_layer.get(current))

    def _read_pressure(self) -> float:
        """How busy the read path has been lately (0..1): the chance of use a prefetch needs to be admitted.

        A wasted prefetch costs a whole read; a used one saves only waiting, and only if the read path had
        time to spare. So when demand reads already keep it busy (decode bound by the disk), a prefetch must be
        nearly certain to pay, and when reads are rare, a likely one is enough. An explicit budget that leaves
        the process no memory headroom counts as fully loaded.
        """
        if not self.budget.fits:
            return 1.0
        now = time.monotonic()
        then, busy_then = self._pressure_at
        if now - then >= PRESSURE_WINDOW:
            busy = self.sources.busy_seconds()
            recent = min(1.0, (busy - busy_then) / (now - then))
            self._pressure = 0.5 * self._pressure + 0.5 * recent
            self._pressure_at = (now, busy)
        return self._pressure

    def _note_layer(self, keys: Sequence[ExpertKey]) -> None:
        if not keys:
            return
        layer = keys[0].layer
        with self._lock:
            self._current_layer = layer
            for policy in self._visit_observers:
                policy.on_layer(layer, keys)

    # --- views ----------------------------------------------------------------------------------------

    def tensor(self, key: ExpertKey, slot: int, role: str) -> torch.Tensor:
        """Tensor ``role`` of expert ``key`` as held in device ``slot`` (valid while its handle is pinned)."""
        return self.views.tensor(key, slot, role)

    def stacked(self, layer: int, roles: str | tuple[str, ...]) -> torch.Tensor:
        """``[num_slots, ...]`` typed view of ``layer``'s tensor(s) ``roles`` over every device slot."""
        return self.views.stacked(layer, roles)

    def region(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """``[num_slots, *shape]`` typed view of the bytes at ``offset`` of every device slot (see SlotViews)."""
        return self.views.region(offset, dtype, shape)

    def host_buffer(self, handle: ExpertHandle) -> memoryview:
        """The pinned expert's bytes in host memory (canonical layout; valid while the handle is pinned).

        Only when the device tier is the host pool (CPU compute, e.g. the expert daemon): a separate device
        tier keeps no host copy it could promise for the handle's lifetime.
        """
        if self._host is not None:
            raise ConfigError("host_buffer() needs the CPU store, whose slots are host buffers")
        return self.pool.buffer(handle.slot)[: self.layout.spec(handle.key).nbytes]

    # --- demand ---------------------------------------------------------------------------------------

    def _handle(self, entry: Entry) -> ExpertHandle:
        assert entry.slot is not None
        self.device_tier.wait_ready(entry.slot)
        return ExpertHandle(entry.key, entry.slot, entry)

    def _check_keys(self, keys: Sequence[ExpertKey]) -> None:
        if self._closed:
            raise StoreClosedError("the expert store is closed")
        for key in keys:
            if key not in self.layout.experts:
                raise ExpertReadError("no such expert in this checkpoint", key=key)

    def pin_resident(self, keys: Sequence[ExpertKey]) -> list[ExpertHandle] | None:
        """Handles for ``keys`` if every one is resident now, else None (and nothing changes).

        Safe from any thread: the compute thread's path for a layer whose experts are all resident, with no
        round trip to the store's event loop.
        """
        entries = self._device.pin_resident(keys)
        if entries is None:
            return None
        self._note_layer(keys)
        return [self._handle(e) for e in entries]

    def fixed_slots(self, keys: Sequence[ExpertKey]) -> list[int] | None:
        """The slot of each key once every one is resident for good, else None. Safe from any thread.

        For good: every expert of the checkpoint has a slot of its own and the cache keeps what it loaded, so
        no expert is ever evicted and a slot, once filled, holds its expert until the store closes. A caller
        may then remember these slots and compute on them without pinning (counting its uses with
        :meth:`count_hits`): a resident decode step's experts cost a list lookup instead of a pin and a
        release each.
        """
        if not self.holds_every_expert or self._closed:
            return None
        slots = self._device.resident_slots(keys)
        if slots is None:
            return None
        for slot in slots:
            self.device_tier.wait_ready(slot)  # a device copy still in flight (CUDA) lands first
        return slots

    def count_hits(self, n: int) -> None:
        """Count ``n`` uses of experts computed on :meth:`fixed_slots` (device hits, as a pin would count)."""
        self._device.count_hits(n)

    async def start_fetch(self, keys: Sequence[ExpertKey]) -> PendingFetch:
        """Pin every key (deduplicated) and queue the missing ones; resident ones come back at once.

        Keys may outnumber slots as long as the caller releases each wave before asking for the next.
        """
        unique = list(dict.fromkeys(keys))
        self._check_keys(unique)
        self._note_layer(unique)
        entries = self._device.pin(unique)
        ready = [e for e in entries if e.ready.done() and not e.failed and e.slot is not None]
        pending = [e for e in entries if e not in ready]
        return PendingFetch(self, [self._handle(e) for e in ready], pending)

    async def _next_wave(self, pending: list[Entry]) -> tuple[list[ExpertHandle], list[Entry]]:
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
                with self._lock:
                    self._stats.stall_seconds += time.perf_counter() - t0
            ready = [e for e in pending if e.ready.done()]
            if not ready:
                raise ExpertReadError(f"no expert became resident within {self.config.fetch_timeout} s")
        failed = [e for e in ready if e.failed]
        if failed:
            failed[0].ready.result()  # raises the key's own error; the caller still holds ``pending``
        rest = [e for e in pending if not e.ready.done()]
        return [self._handle(e) for e in ready], rest

    async def fetch_as_ready(self, keys: Sequence[ExpertKey]) -> AsyncGenerator[list[ExpertHandle], None]:
        """Yield pinned handles in waves: the resident experts first, then the others as they land.

        Errors of a key are raised when its wave would come; handles not yet yielded are unpinned on exit.
        """
        fetch = await self.start_fetch(keys)
        try:
            if fetch.ready:
                yield fetch.ready
            while fetch.remaining:
                yield await fetch.next_wave()
        finally:
            fetch.cancel()

    async def fetch(self, keys: Sequence[ExpertKey], *, timeout: float | None = None) -> list[ExpertHandle]:
        """Make every key resident and pinned; handles come back in the order of ``keys`` (deduplicated)."""
        unique = list(dict.fromkeys(keys))
        if len(unique) > self.num_slots:
            raise BudgetError(
                f"fetch of {len(unique)} experts at once needs {len(unique)} slots; the store has "
                f"{self.num_slots}. Raise the budget or use fetch_as_ready()"
            )
        self._check_keys(unique)
        self._note_layer(unique)
        entries = self._device.pin(unique)
        limit = timeout or 2 * self.config.fetch_timeout
        try:
            waiting = [e.ready for e in entries if not e.ready.done()]
            if waiting:
                t0 = time.perf_counter()
                try:
                    # A load gives up waiting for a slot after fetch_timeout with a precise BudgetError; the
                    # caller's own deadline leaves it room to do so.
                    await asyncio.wait_for(asyncio.gather(*waiting), limit)
                finally:
                    with self._lock:
                        self._stats.stall_seconds += time.perf_counter() - t0
            for e in entries:
                e.ready.result()  # re-raises that key's error
        except asyncio.TimeoutError:
            self._device.unpin(entries)
            raise ExpertReadError(f"experts not resident after {limit} s") from None
        except BaseException:
            self._device.unpin(entries)
            raise
        return [self._handle(e) for e in entries]

    def release(self, handles: Iterable[ExpertHandle]) -> None:
        """Unpin handles; released experts become evictable. Releasing twice is a no-op. Any thread."""
        entries = []
        with self._lock:
            for h in handles:
                if not h._released:
                    h._released = True
                    entries.append(h._entry)
            self._device.unpin(entries)

    # --- prefetch -------------------------------------------------------------------------------------

    def prefetch(self, keys: Iterable[ExpertKey], priority: float = 0.0) -> None:
        """Hint that ``keys`` will be needed soon (``priority``: 0..1, how likely and how soon). Never blocks.

        A prefetch is admitted only if it finds a free slot or can evict an expert that is unpinned, outside
        the current and next layer, and scored below it; otherwise it is dropped and counted.
        """
        if self._closed:
            return
        self._device.prefetch([k for k in keys if k in self.layout.experts], priority)

    def screen_prefetch(self, keys: Iterable[ExpertKey], priority: float = 0.0) -> list[ExpertKey]:
        """The keys worth passing to :meth:`prefetch` now (any thread): not resident or loading, and likely
        enough for the read path's current load; the unlikely ones are refused and counted here."""
        keys = [k for k in keys if k in self.layout.experts]
        if self._closed or not keys:
            return []
        return self._device.screen(keys, priority, self.prefetch_floor())

    def prefetch_floor(self) -> float:
        """The chance of use a prefetch needs now to be admitted (0..1, any thread); see :meth:`_read_pressure`."""
        with self._lock:
            return self._read_pressure()

    def cancel_prefetches(self, keep: Iterable[ExpertKey] = ()) -> int:
        """Withdraw queued or loading prefetches not in ``keep``; their slots come back. Returns how many."""
        return self._device.cancel_prefetches(keep)

    # --- introspection and shutdown -------------------------------------------------------------------

    def resident(self) -> list[ExpertKey]:
        return self._device.resident()

    def pinned(self) -> list[ExpertKey]:
        return self._device.pinned()

    def outstanding_prefetches(self) -> list[ExpertKey]:
        """Prefetches queued or loading that nothing waits for yet (any thread)."""
        return self._device.outstanding_prefetches()

    @property
    def free_slots(self) -> int:
        return self._device.free_slots

    def stats(self) -> StoreStats:
        with self._lock:
            return self._stats.copy()

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """Cancel loaders, fail outstanding waiters with StoreClosedError, free buffers and sources."""
        if self._closed:
            return
        self._closed = True
        await self._device.aclose()
        if self._host is not None:
            await self._host.aclose()
        await self.sources.aclose()
        self.views.close()
        self.device_tier.close()
        self.pool.close()
