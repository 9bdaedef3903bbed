"""OffloadedExperts: a family's own experts module, computing on an ExpertStore's slots in waves.

The family's MoE block stays untouched: its router picks ``top_k_index`` / ``top_k_weights`` and calls
``self.experts(hidden_states, top_k_index, top_k_weights)`` as usual. That call lands here. We keep an
instance of the family's experts class whose parameters are views of the store's slot arena
(``[num_slots, ...]``), translate expert ids to slot ids and call that instance's own forward, so the expert
math (activation, GPT-OSS's clamped SwiGLU, biases, transposed layouts) is the reference's by construction.

Experts already resident are computed at once; the others in a later wave, as they land. Each route (token,
expert) is its own row with a unit weight, and each expert's rows go through a call of the family's forward
that sees that expert alone (its slot as a one-expert module), so each route is computed exactly once, the
same way whatever else is resident; the routes are weighted and summed at the end, as the family's forward
does. So which experts arrive together, and in what order (reads decide that, run to run), changes no bit of
the output: greedy decoding repeats, in any dtype.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from expertflow.config import StoreConfig
from expertflow.core import ExpertKey
from expertflow.model import single_route
from expertflow.model.adapters import ExpertsAdapter
from expertflow.model.quantized_experts import (
    QUANTIZED_IMPLEMENTATION,
    FusedRoutes,
    fused_ffn,
    quantized_single_route,
    single_route_supported,
)
from expertflow.pipeline.budget import BudgetPlan
from expertflow.pipeline.schedule import plan_layer
from expertflow.pipeline.stats import StoreStats
from expertflow.pipeline.store import ExpertHandle
from expertflow.tiers.layout import ExpertLayout

# (layer, hidden_states [tokens, H], top_k_index [tokens, k], top_k_weights [tokens, k])
RouteHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class SlotStore(Protocol):
    """What a model loaded by ``load_model`` needs from its expert store; :class:`ExpertStore` is one."""

    layout: ExpertLayout
    config: StoreConfig
    device: torch.device
    num_slots: int
    slot_nbytes: int
    budget: BudgetPlan
    last_fetch_waited: bool
    holds_every_expert: bool

    def stacked(self, layer: int, roles: str | tuple[str, ...]) -> torch.Tensor: ...

    def tensor(self, key: ExpertKey, slot: int, role: str) -> torch.Tensor: ...

    def region(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor: ...

    def fetch_as_ready(self, keys: Sequence[ExpertKey]) -> Iterator[list[ExpertHandle]]: ...

    def release(self, handles: Iterable[ExpertHandle]) -> None: ...

    def fixed_slots(self, keys: Sequence[ExpertKey]) -> list[int] | None: ...

    def count_hits(self, n: int) -> None: ...

    @property
    def closed(self) -> bool: ...

    def prefetch(self, keys: Iterable[ExpertKey], priority: float = 0.0) -> None: ...

    def prefetch_ranked(self, ranked: Iterable[tuple[ExpertKey, float]]) -> None: ...

    def prefetch_floor(self) -> float: ...

    def cancel_prefetches(self, keep: Iterable[ExpertKey] = ()) -> None: ...

    def resident(self) -> list[ExpertKey]: ...

    def set_scorer(self, scorer: Callable[[ExpertKey], float] | None) -> None: ...

    def set_fill_transform(self, transform: Callable[[ExpertKey, int], None] | None) -> None: ...

    def stats(self) -> StoreStats: ...

    def close(self) -> None: ...


def _expert_tables(
    experts: nn.Module, num_experts: int, slot_params: set[str]
) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Tensors of the experts module kept resident, one row per expert, that its forward indexes by expert id
    (a ``[num_experts, hidden]`` per-expert norm weight in a submodule): taken out of their modules' registries,
    so that each call can hand the module the rows of the experts in its slots, in slot order."""
    found: list[tuple[nn.Module, str, torch.Tensor]] = []
    for name, tensor in (*experts.named_parameters(), *experts.named_buffers()):
        if name in slot_params or tensor.dim() == 0 or tensor.shape[0] != num_experts:
            continue
        path, _, leaf = name.rpartition(".")
        owner = experts.get_submodule(path)
        registry = owner._parameters if leaf in owner._parameters else owner._buffers
        del registry[leaf]
        found.append((owner, leaf, tensor.detach()))
    return found


@dataclasses.dataclass
class _RoutePlan:
    """One call's routes and where their outputs go, shared by the waves that compute them."""

    flat: torch.Tensor  # [tokens, H]
    route_index: torch.Tensor  # [tokens * k]: each route's expert
    ids: list[int] | None  # one token to distinct experts: the experts in route order
    top_k: int
    weight_dtype: torch.dtype
    grouped: dict[int, list[int]] | None  # expert -> its routes, when the native kernels take many rows
    rows: torch.Tensor  # [tokens * k, H] (or the token's one row): each route's input
    routes: torch.Tensor | None = None  # [tokens * k, H]: each route's unweighted output, once any is known

    @classmethod
    def of(
        cls,
        flat: torch.Tensor,
        route_index: torch.Tensor,
        ids: list[int] | None,
        top_k: int,
        weight_dtype: torch.dtype,
        fused: bool,
    ) -> _RoutePlan:
        # Several tokens on the native kernels: each wave's experts in one call, every expert's weights read
        # once for all the routes to it (route r takes token r // top_k).
        grouped: dict[int, list[int]] | None = None
        if ids is None and fused:
            grouped = {}
            for r, e in enumerate(route_index.tolist()):
                grouped.setdefault(e, []).append(r)
        # a decode step's routes all take the token's one row
        rows = flat if ids is not None or grouped is not None else flat.repeat_interleave(top_k, dim=0)
        return cls(flat, route_index, ids, top_k, weight_dtype, grouped, rows)

    def place(self, part: torch.Tensor, at: list[int] | torch.Tensor) -> None:
        """Route outputs ``part`` into their places ``at`` (routes of distinct experts never overlap: exact)."""
        if self.routes is None:
            shape = (self.route_index.shape[0], self.flat.shape[-1])
            self.routes = torch.zeros(shape, dtype=part.dtype, device=part.device)
        index = at if isinstance(at, torch.Tensor) else torch.tensor(at, device=part.device)
        self.routes.index_copy_(0, index, part)


class OffloadedExperts(nn.Module):
    """Replaces one layer's ``*Experts`` module; called exactly like it.

    ``experts`` is the family's module (built on the meta device); its parameters are swapped for slot views
    and it is kept out of the module tree, so ``state_dict``, ``.to()`` and weight initialisation never see
    the store's memory. ``route_hooks`` are called with ``(layer, hidden_states, top_k_index, top_k_weights)`` before the
    experts are requested, e.g. by a predictor that prefetches for the next layers.
    """

    def __init__(
        self, experts: nn.Module, adapter: ExpertsAdapter, store: SlotStore, implementation: str
    ) -> None:
        super().__init__()
        self.layer = adapter.layer
        self.module_path = adapter.module_path
        self.num_experts = adapter.num_experts
        self.implementation = implementation
        self.store = store
        self.route_hooks: list[RouteHook] = []
        self.calls = 0
        self.waves = 0
        self.compute_seconds = 0.0  # in the experts kernel (CPU: wall time; CUDA: launch time only)
        self.forward_seconds = 0.0  # in this module's forward: the kernel, waiting for experts, and the store
        self.one_token_path = True  # a decode step places each expert's route by position (see _forward)
        # Lossy, opt-in (expertflow.model.routing): rewrites routing toward resident experts.
        self.routing: Any = None
        self.last_stalled = False
        self._fixed: dict[int, int] = {}  # expert id -> slot, once resident for good (see _fixed_slots)
        # [num_slots, *per_expert] views over the slot arena. Each call hands the kernel the one slot it computes
        # (a free slice): a grouped kernel's cost grows with the number of groups it is given.
        self._slot_views: dict[str, Any] = {}  # tensors, or QuantizedStack for quantized weights
        for fill in adapter.fills:
            del experts._parameters[fill.param]
            self._slot_views[fill.param] = fill.bind(store, adapter.layer)
        self._tables = _expert_tables(experts, adapter.num_experts, set(self._slot_views))
        # One row for one expert (every decode step) skips the family's grouping, which one row makes a no-op.
        self._single_route = (
            implementation == QUANTIZED_IMPLEMENTATION
            and not self._tables
            and single_route_supported(experts, self._slot_views)
        )
        # The same for unquantized experts run by transformers' grouped forward (same kernels, same bits).
        self._direct = not self._tables and single_route.supported(experts, self._slot_views, implementation)
        # ...and where the native kernels take the family's experts, a wave of them is one call.
        ffn = fused_ffn(experts, self._slot_views) if self._single_route else None
        self._fused = None if ffn is None else FusedRoutes(self._slot_views, ffn)
        # A private config so that our kernel choice does not leak into the rest of the model.
        config: Any = copy.copy(experts.config)
        config._experts_implementation_internal = implementation
        experts.__dict__["config"] = config
        self.__dict__["_experts"] = experts  # unregistered on purpose (see the class docstring)

    @property
    def experts_class(self) -> type[nn.Module]:
        return type(self.__dict__["_experts"])

    @property
    def family_module(self) -> nn.Module:
        """The family's experts module this one runs (meta-device; its parameters are the slot views)."""
        module: nn.Module = self.__dict__["_experts"]
        return module

    def slot_parameters(self, slot: int) -> dict[str, torch.Tensor]:
        """The module's expert parameters as the family sees them, for the expert held in ``slot`` (views of the
        slot: valid while the caller holds the expert's pin)."""
        return {name: view[slot] for name, view in self._slot_views.items() if isinstance(view, torch.Tensor)}

    def _kernel(self, rows: torch.Tensor, slot: int, expert: int, weight_dtype: torch.dtype) -> torch.Tensor:
        """The family's own experts forward of ``rows``, every one a route to ``expert`` (held in ``slot``) with a
        unit weight: the module sees one expert, the one in that slot."""
        experts: nn.Module = self.__dict__["_experts"]
        if self._single_route and rows.shape[0] == 1:
            return quantized_single_route(experts, self._slot_views, rows, slot)
        if self._direct and rows.shape[0] == 1:
            return single_route.single_route(experts, self._slot_views, rows, slot)
        for name, view in self._slot_views.items():
            experts.__dict__[name] = view[slot : slot + 1]
        for owner, name, per_expert in self._tables:
            # Resident per-expert tensors (Ergo's per-expert norm) are indexed like the slots: the module's
            # expert 0 is this one.
            owner.__dict__[name] = per_expert[expert : expert + 1]
        experts.__dict__.update(num_experts=1, _is_expert_parallel=False)
        index = torch.zeros(rows.shape[0], 1, dtype=torch.long, device=rows.device)
        unit = torch.ones(rows.shape[0], 1, dtype=weight_dtype, device=rows.device)
        return experts(rows, index, unit)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self._forward(hidden_states, top_k_index, top_k_weights)
        finally:
            self.forward_seconds += time.perf_counter() - t0

    def _forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        self.calls += 1
        if self.routing is not None:
            resident = [k.expert for k in self.store.resident() if k.layer == self.layer]
            top_k_index = self.routing(hidden_states, top_k_index, resident)
        for hook in self.route_hooks:
            hook(self.layer, hidden_states, top_k_index, top_k_weights)
        # Each route is its own row with a unit weight, and each expert's routes are computed by a call of the
        # family's kernel that holds only them, in a fresh tensor: its output then depends on its own rows alone.
        # (A grouped GEMM's rounding depends on where a group's rows sit, so computing an expert beside others
        # gives other bits than computing it alone.) Which experts arrive together, and in what order, then
        # changes no bit. The routes are weighted and summed at the end, as the family's own forward does.
        width = hidden_states.shape[-1]
        top_k = top_k_index.shape[-1]
        route_index = top_k_index.reshape(-1)  # [tokens * k]
        flat = hidden_states.reshape(-1, width).contiguous()
        # One token (a decode step) routed to distinct experts: each expert has one route, found by its position
        # instead of a search over the routes (a few small ops per expert; fine-grained models call hundreds).
        ids = route_index.tolist() if route_index.shape[0] == top_k and self.one_token_path else None
        if ids is not None and len(set(ids)) != len(ids):
            ids = None
        routes: torch.Tensor | None  # [tokens * k, H]: each route's unweighted output
        if ids is not None and (slots := self._fixed_slots(ids)) is not None:
            routes = self._resident_routes(flat, ids, slots, top_k_weights.dtype)
        else:
            plan = _RoutePlan.of(flat, route_index, ids, top_k, top_k_weights.dtype, self._fused is not None)
            # Most-wanted experts are requested first; the store yields the resident ones before any read. One
            # token wants each of its experts once: plan_layer's order is then the experts' ids, sorted.
            wanted = sorted(ids) if ids is not None else plan_layer(top_k_index)
            fixed = self._fixed_slots(wanted) if ids is None else None
            if fixed is not None:  # several tokens, every expert resident for good: one wave, no pins
                self.last_stalled = False
                self._compute_wave(plan, list(zip(fixed, wanted)))
                self.store.count_hits(len(wanted))
            else:
                self._routes_in_waves(plan, wanted)
            routes = plan.routes
        if routes is None:  # no tokens routed here
            return torch.zeros_like(hidden_states)
        # The family's combination: routing weights times route outputs, summed over a token's k routes in one
        # reduction (fp32 inside for half types), rounded once.
        weighted = routes * top_k_weights.reshape(-1, 1)
        out = weighted.view(-1, top_k, width).sum(dim=1)
        return out.to(hidden_states.dtype).reshape(hidden_states.shape)

    def _fixed_slots(self, ids: list[int]) -> list[int] | None:
        """The slots of experts ``ids`` while they stay resident for good (see ``ExpertStore.fixed_slots``), else
        None. A slot learnt once is kept: it cannot change while the store is open."""
        store = self.store
        if not store.holds_every_expert or store.closed:  # (closed: the waves' path raises the store's error)
            return None
        known = self._fixed
        slots = [known.get(e, -1) for e in ids]
        if -1 in slots:
            found = store.fixed_slots([ExpertKey(self.layer, e) for e in ids])
            if found is None:
                return None
            known.update(zip(ids, found))
            slots = found
        return slots

    def _resident_routes(
        self, flat: torch.Tensor, ids: list[int], slots: list[int], weight_dtype: torch.dtype
    ) -> torch.Tensor:
        """A decode step's routes, one per expert in ``ids``' order, computed on ``slots`` (theirs, which cannot
        change): no pin, no release, no wave. The same kernels on the same rows as the waves' path: the same
        bits."""
        t0 = time.perf_counter()
        self.last_stalled = False
        self.waves += 1
        if self._fused is not None:
            routes = self._fused(flat, slots)
        else:
            routes = torch.cat([self._kernel(flat, slot, e, weight_dtype) for slot, e in zip(slots, ids)])
        self.compute_seconds += time.perf_counter() - t0
        self.store.count_hits(len(ids))
        return routes

    def _routes_in_waves(self, plan: _RoutePlan, wanted: list[int]) -> None:
        """Every route's output into ``plan``, computed wave by wave as the store pins the experts ``wanted``
        (in that order of preference; resident ones come first)."""
        self.last_stalled = False
        for wave in self.store.fetch_as_ready([ExpertKey(self.layer, e) for e in wanted]):
            try:
                # Did compute have to wait for some of this layer's experts? (set by the store per fetch)
                self.last_stalled = self.store.last_fetch_waited
                self._compute_wave(plan, [(h.slot, h.key.expert) for h in wave])
                routes = plan.routes
                if routes is not None and routes.device.type == "cuda":
                    # Kernels run asynchronously: a released slot may be refilled by the copy stream at once,
                    # so the kernels reading this wave's slots must be done first.
                    torch.cuda.current_stream(routes.device).synchronize()
            finally:
                self.store.release(wave)

    def _compute_wave(self, plan: _RoutePlan, wave: list[tuple[int, int]]) -> None:
        """The routes to the experts of one wave (``(slot, expert)`` pairs, each resident while this runs) into
        ``plan.routes``: each expert's routes computed on their own, so the bits do not depend on the wave."""
        self.waves += 1
        t0 = time.perf_counter()
        ids, top_k, flat = plan.ids, plan.top_k, plan.flat
        one_by_one = wave
        if ids is not None and self._fused is not None:
            placed = sorted((ids.index(expert), slot) for slot, expert in wave)  # in route order
            part = self._fused(flat, [slot for _, slot in placed])
            if plan.routes is None and len(placed) == top_k:
                plan.routes = part  # the whole layer in one wave: already every route in its place
            else:
                plan.place(part, [i for i, _ in placed])
            one_by_one = []
        elif plan.grouped is not None and self._fused is not None:
            members = [(slot, plan.grouped[expert]) for slot, expert in wave]
            part = self._fused.rows(flat, [(slot, [r // top_k for r in rs]) for slot, rs in members])
            plan.place(part, [r for _, rs in members for r in rs])
            one_by_one = []
        for slot, expert in one_by_one:
            if ids is not None:
                plan.place(self._kernel(flat, slot, expert, plan.weight_dtype), [ids.index(expert)])
                continue
            mine = (plan.route_index == expert).nonzero().squeeze(1)
            part = self._kernel(plan.rows.index_select(0, mine), slot, expert, plan.weight_dtype)
            plan.place(part, mine)
        self.compute_seconds += time.perf_counter() - t0

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer}, experts={self.num_experts}, class={self.experts_class.__name__}, "
            f"slots={self.store.num_slots}, implementation={self.implementation}"
        )
