"""The one place that sizes an expert store's memory: slot size, slot count, host bytes, reads in flight, and
why. The store, the loader, ``inspect``, the benches and the eval grid all ask :func:`plan_store`.

A slot holds any one expert: the largest expert, the kernel's converted layout (``layout.slot_floor``) and
what a source needs to receive one (a direct read lands whole aligned extents), rounded up to
:data:`~expertflow.core.BLOCK` (:func:`expertflow.core.slot_nbytes`). The host budget is the caller's, or sized
from the memory available (:mod:`expertflow.pipeline.budget`) after what the process still needs besides the
pool (``reserve``: non-expert weights not loaded yet, activations) and the page cache of reads in flight.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from expertflow.config import StoreConfig, format_size
from expertflow.core import routed_top_k, slot_nbytes
from expertflow.errors import BudgetError
from expertflow.pipeline import budget as budget_module
from expertflow.pipeline.budget import (
    RUNTIME_SLACK,
    BudgetPlan,
    MemoryReading,
    explicit_budget_warning,
    plan_host_budget,
    reads_in_flight_bytes,
)
from expertflow.tiers.layout import ExpertLayout
from expertflow.tiers.nvme import direct_fits, read_need

log = logging.getLogger(__name__)

#: The margin of a plan too tight for one token's experts otherwise: past it, starting slower beats not starting.
TIGHT_MARGIN = RUNTIME_SLACK // 2


def slot_size(layout: ExpertLayout, read_mode: str, source_needs: Iterable[int] = ()) -> int:
    """Bytes of one slot that holds any expert of ``layout`` read in ``read_mode`` by sources needing
    ``source_needs``."""
    return slot_nbytes([read_need(layout, read_mode), layout.slot_floor, *source_needs])


def all_experts_bytes(layout: ExpertLayout, read_mode: str) -> int:
    """What holding every expert of ``layout`` takes: one slot each."""
    return slot_size(layout, read_mode) * len(layout.experts)


def budget_sizes(layout: ExpertLayout, read_mode: str, top_k: int | None = None) -> dict[str, int | None]:
    """The budgets a user chooses between, in whole slots: one slot, every expert, the widest layer's experts,
    and one token's ``top_k`` (default: as config.json names it; None when it names none)."""
    slot = slot_size(layout, read_mode)
    widest = max(layout.experts_per_layer().values(), default=0)
    top_k = routed_top_k(layout.config) if top_k is None else top_k
    return {
        "slot": slot,
        "all_experts": slot * len(layout.experts),
        "per_layer": slot * widest,
        "minimum": slot * top_k if top_k is not None and top_k > 0 else None,
    }


@dataclass(frozen=True)
class StorePlan:
    """How a store over ``layout`` uses memory, with the reason for its budget."""

    slot_nbytes: int  # one expert slot (host buffer; the device slot on CPU)
    num_slots: int  # host buffers: experts resident at once
    num_experts: int
    top_k: int | None  # experts one token needs resident together
    reads_in_flight: int  # concurrent reads (loader workers)
    io_bytes: int  # page cache the reads in flight occupy (mmap reads)
    reserve_bytes: int  # what the process allocates besides the pool (non-expert weights, activations)
    budget: BudgetPlan

    @property
    def host_bytes(self) -> int:
        """What the host pool allocates: whole slots."""
        return self.num_slots * self.slot_nbytes

    @property
    def all_experts_bytes(self) -> int:
        return self.num_experts * self.slot_nbytes

    @property
    def minimum_bytes(self) -> int | None:
        return None if self.top_k is None else self.top_k * self.slot_nbytes

    def describe(self) -> str:
        return (
            f"{self.num_slots} of {self.num_experts} experts resident ({format_size(self.host_bytes)} in "
            f"{format_size(self.slot_nbytes)} slots), {self.reads_in_flight} reads in flight: "
            f"{self.budget.describe()}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "slot_bytes": self.slot_nbytes,
            "slots": self.num_slots,
            "experts": self.num_experts,
            "host_bytes": self.host_bytes,
            "budget_bytes": self.budget.host_bytes,
            "all_experts_bytes": self.all_experts_bytes,
            "minimum_bytes": self.minimum_bytes,
            "reads_in_flight": self.reads_in_flight,
            "io_bytes": self.io_bytes,
            "reserve_bytes": self.reserve_bytes,
            "reason": self.budget.reason,
            "fits": self.budget.fits,
        }


def plan_store(
    layout: ExpertLayout,
    config: StoreConfig,
    reserve: int | None = None,
    *,
    source_needs: Iterable[int] = (),
    reading: MemoryReading | None = None,
) -> StorePlan:
    """The memory plan of a store over ``layout`` with ``config``.

    ``reserve`` is what the process still allocates besides the pool (default ``config.host_reserve_bytes``).
    An explicit budget that cannot fit beside it is kept, with a warning (``budget.fits`` False).
    """
    if config.read_mode == "auto":
        reading = reading or budget_module.read_memory()
        config = resolve_read_mode(layout, config, reserve, source_needs=source_needs, reading=reading)
    reserve = config.host_reserve_bytes if reserve is None else reserve
    slot = slot_size(layout, config.read_mode, source_needs)
    all_experts = slot * len(layout.experts)
    reads = max(1, min(config.max_concurrent_reads, config.max_inflight_bytes // slot))
    top_k = routed_top_k(layout.config)
    top_k = top_k if top_k is not None and top_k > 0 else None
    if config.host_bytes is None:
        reading = reading or budget_module.read_memory()  # one reading for every plan below
        if config.read_mode == "mmap":
            # A buffered read holds a page-cache copy of its expert until it is copied into a slot: reads in
            # flight take at most a quarter of what the pool could have (at least one), not a fixed count.
            room = plan_host_budget(all_experts, other_bytes=reserve, reading=reading).host_bytes
            reads = max(1, min(reads, room // 4 // slot))
        io = reads_in_flight_bytes(config.read_mode, reads, slot)
        budget = plan_host_budget(all_experts, other_bytes=reserve, io_bytes=io, reading=reading)
        minimum = (top_k or 1) * slot
        if budget.host_bytes < minimum:
            # Too tight for one token's experts: one read at a time and half the margin, rather than refusing
            # to start. Slower (no read overlaps another), and said so.
            one_read = reads_in_flight_bytes(config.read_mode, 1, slot)
            tight = plan_host_budget(
                all_experts, other_bytes=reserve, io_bytes=one_read, reading=reading, margin=TIGHT_MARGIN
            )
            if tight.host_bytes >= minimum:
                reads, io = 1, one_read
                budget = dataclasses.replace(
                    tight,
                    reason=f"{tight.reason}; TIGHT: one read in flight and a {format_size(TIGHT_MARGIN)} margin "
                    "so that one token's experts fit (slower than with room to spare)",
                )
    else:
        io = reads_in_flight_bytes(config.read_mode, reads, slot)
        used = min(config.host_bytes, all_experts)
        warning = explicit_budget_warning(used, other_bytes=reserve, io_bytes=io, reading=reading)
        if warning is None:
            budget = BudgetPlan(used, "set by the caller")
        else:
            log.warning("%s", warning)
            budget = BudgetPlan(used, f"set by the caller; {warning}", fits=False)
    return StorePlan(
        slot_nbytes=slot,
        num_slots=budget.host_bytes // slot,
        num_experts=len(layout.experts),
        top_k=top_k,
        reads_in_flight=reads,
        io_bytes=io,
        reserve_bytes=reserve,
        budget=budget,
    )


def resolve_read_mode(
    layout: ExpertLayout,
    config: StoreConfig,
    reserve: int | None = None,
    *,
    source_needs: Iterable[int] = (),
    reading: MemoryReading | None = None,
) -> StoreConfig:
    """``config`` with an ``auto`` read mode made concrete: ``mmap`` when the plan holds every expert (the page
    cache then only serves the first reads, and warms the next process), else ``direct``: beyond RAM a buffered
    read leaves a page-cache copy of each expert beside the pool's, which a memory limit charges and reclaims
    from the process's own pages."""
    if config.read_mode != "auto":
        return config
    if not direct_fits(layout):
        return config.with_(read_mode="mmap")
    buffered = config.with_(read_mode="mmap")
    if config.host_bytes is not None:  # (planning it would warn a second time about a budget that cannot fit)
        fits = config.host_bytes >= slot_size(layout, "mmap", source_needs) * len(layout.experts)
    else:
        plan = plan_store(layout, buffered, reserve, source_needs=source_needs, reading=reading)
        fits = plan.num_slots >= plan.num_experts
    return config.with_(read_mode="mmap" if fits else "direct")


def check_minimum(layout: ExpertLayout, config: StoreConfig, top_k: int) -> None:
    """Refuse, before anything is allocated, a budget below one token's ``top_k`` experts."""
    per_expert = slot_size(layout, config.read_mode)
    minimum = top_k * per_expert
    if config.host_bytes is not None and config.host_bytes < minimum:
        raise BudgetError(
            f"host budget {format_size(config.host_bytes)} is below the minimum of {format_size(minimum)} "
            f"({minimum} bytes): one token routes to {top_k} experts of {format_size(per_expert)} each, and they "
            "must be resident together"
        )
    if config.device_slots is not None and config.device_slots < top_k:
        raise BudgetError(
            f"device_slots={config.device_slots} is below the minimum of {top_k}: one token routes to "
            f"{top_k} experts, and they must be resident together"
        )
