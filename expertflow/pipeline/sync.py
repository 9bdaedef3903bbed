"""ExpertStore: the synchronous face of :class:`~expertflow.pipeline.store.AsyncExpertStore`, for model code.

It owns a background event-loop thread and uses only the async store's public API. A layer whose experts
are all resident costs no round trip to that thread: :meth:`AsyncExpertStore.pin_resident` and
:meth:`~AsyncExpertStore.release` are safe from the calling thread. Hints (prefetch, cancel) are posted to the
loop without waiting, and skipped when there is nothing to do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from expertflow.config import StoreConfig
from expertflow.core import ExpertKey
from expertflow.errors import StoreClosedError
from expertflow.pipeline.budget import BudgetPlan
from expertflow.pipeline.planner import StorePlan
from expertflow.pipeline.runtime import LoopThread
from expertflow.pipeline.stats import StoreStats
from expertflow.pipeline.store import AsyncExpertStore, ExpertHandle, SourceBuilder
from expertflow.tiers.base import ExpertSource
from expertflow.tiers.layout import ExpertLayout


class ExpertStore:
    """Synchronous expert store; see :class:`AsyncExpertStore` for the semantics of every call."""

    def __init__(
        self,
        layout_or_path: ExpertLayout | str | Path,
        config: StoreConfig | None = None,
        *,
        sources: Sequence[ExpertSource] | None = None,
        build_sources: SourceBuilder | None = None,
        separate_device: bool | None = None,
    ) -> None:
        self.config = config or StoreConfig()
        self.runtime = LoopThread()
        try:
            self.async_store: AsyncExpertStore = self.runtime.run(
                AsyncExpertStore.open(
                    layout_or_path,
                    self.config,
                    sources=sources,
                    build_sources=build_sources,
                    separate_device=separate_device,
                )
            )
        except BaseException:
            self.runtime.close()
            raise
        self.layout: ExpertLayout = self.async_store.layout
        self.device: torch.device = self.async_store.device
        self.num_slots: int = self.async_store.num_slots
        self.slot_nbytes: int = self.async_store.slot_nbytes
        self.budget: BudgetPlan = self.async_store.budget
        self.plan: StorePlan = self.async_store.plan
        self.holds_every_expert: bool = self.async_store.holds_every_expert
        #: Whether the last :meth:`fetch_as_ready` had to wait for a read (compute stalled on that layer).
        self.last_fetch_waited = False

    def stacked(self, layer: int, roles: str | tuple[str, ...]) -> torch.Tensor:
        return self.async_store.stacked(layer, roles)

    def tensor(self, key: ExpertKey, slot: int, role: str) -> torch.Tensor:
        return self.async_store.tensor(key, slot, role)

    def region(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self.async_store.region(offset, dtype, shape)

    def fetch(self, keys: Sequence[ExpertKey], timeout: float | None = None) -> list[ExpertHandle]:
        return self.runtime.run(self.async_store.fetch(keys, timeout=timeout))

    def fetch_as_ready(self, keys: Sequence[ExpertKey]) -> Iterator[list[ExpertHandle]]:
        """Waves of pinned handles, resident experts first; release each wave before the next is needed."""
        store = self.async_store
        resident = store.pin_resident(keys)
        if resident is not None:
            self.last_fetch_waited = False
            yield resident
            return
        pending = self.runtime.run(store.start_fetch(keys))
        self.last_fetch_waited = bool(pending.remaining)
        try:
            if pending.ready:
                yield pending.ready
            while pending.remaining:
                yield self.runtime.run(pending.next_wave())
        finally:
            pending.cancel()

    def release(self, handles: Iterable[ExpertHandle]) -> None:
        self.async_store.release(handles)

    def fixed_slots(self, keys: Sequence[ExpertKey]) -> list[int] | None:
        return self.async_store.fixed_slots(keys)

    def count_hits(self, n: int) -> None:
        self.async_store.count_hits(n)

    @property
    def closed(self) -> bool:
        return self.async_store.closed

    def prefetch(self, keys: Iterable[ExpertKey], priority: float = 0.0) -> None:
        self.prefetch_ranked((key, priority) for key in keys)

    def prefetch_ranked(self, ranked: Iterable[tuple[ExpertKey, float]]) -> None:
        """Prefetch each key at its own priority, likeliest first, with one wake-up of the loop thread.

        Each post to the loop costs a hand-over of the interpreter lock, which the compute thread then waits
        to get back: a layer's predictions go as one post, not one per priority. Screened on this thread: a
        prefetch that admission would refuse never wakes the loop."""
        groups: dict[float, list[ExpertKey]] = {}
        for key, priority in ranked:
            groups.setdefault(priority, []).append(key)
        batches = []
        for priority in sorted(groups, reverse=True):
            keys = self.async_store.screen_prefetch(groups[priority], priority)
            if keys:
                batches.append((keys, priority))
        if batches:
            self._post(self._prefetch_batches, batches)

    def _prefetch_batches(self, batches: list[tuple[list[ExpertKey], float]]) -> None:
        for keys, priority in batches:
            self.async_store.prefetch(keys, priority)

    def prefetch_floor(self) -> float:
        return self.async_store.prefetch_floor()

    def cancel_prefetches(self, keep: Iterable[ExpertKey] = ()) -> None:
        """Withdraw stale prefetches (posted to the loop; does not wait). No post when none is outstanding: a
        decode bound by the disk refuses most prefetches, and the post would cost every token a hand-over."""
        keep = set(keep)
        if any(key not in keep for key in self.async_store.outstanding_prefetches()):
            self._post(self.async_store.cancel_prefetches, keep)

    def set_scorer(self, scorer: Callable[[ExpertKey], float] | None) -> None:
        self.async_store.set_scorer(scorer)

    def set_fill_transform(self, transform: Callable[[ExpertKey, int], None] | None) -> None:
        self.async_store.set_fill_transform(transform)

    def stats(self) -> StoreStats:
        return self.async_store.stats()

    def resident(self) -> list[ExpertKey]:
        return self.async_store.resident()

    def pinned(self) -> list[ExpertKey]:
        return self.async_store.pinned()

    def _post(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn`` on the loop without waiting. Hints after close() are no-ops."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the store is gone, nothing to hint
            self.runtime.loop.call_soon_threadsafe(fn, *args)

    def close(self) -> None:
        if self.runtime.loop.is_closed():
            return
        with contextlib.suppress(StoreClosedError):
            self.runtime.run(self.async_store.aclose())
        self.runtime.close()

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
