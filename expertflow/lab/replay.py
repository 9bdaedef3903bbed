"""Replaying routing traces through cache policies, offline: hit rates and loads per token of each policy at
each capacity, beside Belady's optimum. An evaluation tool; the runtime never imports it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from expertflow.core import ExpertKey
from expertflow.errors import ConfigError
from expertflow.pipeline.cache import admits_prefetch
from expertflow.pipeline.policy import (
    EvictionPolicy,
    LFUPolicy,
    LRUPolicy,
    PredictivePolicy,
    StaticPolicy,
)
from expertflow.pipeline.predictor import Predictor
from expertflow.pipeline.traces import RoutingTrace


class BeladyPolicy:
    """Offline optimum: evict the key whose next use is furthest in the future. Needs the whole sequence.

    Call :meth:`advance` with the position of each access before the cache handles it.
    """

    def __init__(self, future: Sequence[ExpertKey]) -> None:
        self._uses: dict[ExpertKey, list[int]] = defaultdict(list)
        for i, k in enumerate(future):
            self._uses[k].append(i)
        self._ptr: dict[ExpertKey, int] = defaultdict(int)
        self._pos = 0

    def advance(self, position: int) -> None:
        self._pos = position

    def next_use(self, key: ExpertKey) -> float:
        uses = self._uses.get(key, [])
        i = self._ptr[key]
        while i < len(uses) and uses[i] <= self._pos:
            i += 1
        self._ptr[key] = i
        return uses[i] if i < len(uses) else math.inf

    def on_insert(self, key: ExpertKey) -> None:
        pass

    def on_access(self, key: ExpertKey) -> None:
        pass

    def on_remove(self, key: ExpertKey) -> None:
        pass

    def choose_victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey | None:
        if not candidates:
            return None
        return max(candidates, key=lambda k: (self.next_use(k), k))


def access_sequence(trace: RoutingTrace) -> list[ExpertKey]:
    """The order in which decoding touches experts: token by token, layer by layer, unique per (token, layer)."""
    seq: list[ExpertKey] = []
    for token in trace.experts.tolist():
        for lid, experts in zip(trace.layer_ids, token, strict=True):
            seq.extend(ExpertKey(lid, e) for e in dict.fromkeys(experts))
    return seq


@dataclass
class ReplayResult:
    """Hits and misses of the demand accesses; prefetch loads (predictive only) are counted apart.

    ``loads`` is every expert brought into the cache: one per miss plus one per prefetch, so policies that
    prefetch are compared on bytes moved too. ``outcomes`` is hit (True) or miss per access, in order.
    """

    policy: str
    capacity: int
    hits: int
    misses: int
    per_layer: dict[int, float]
    tokens: int = 0
    prefetch_loads: int = 0
    prefetch_used: int = 0
    outcomes: list[bool] = field(default_factory=list, repr=False)

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    @property
    def loads(self) -> int:
        return self.misses + self.prefetch_loads

    @property
    def loads_per_token(self) -> float:
        return self.loads / self.tokens if self.tokens else 0.0

    @property
    def prefetch_precision(self) -> float:
        return self.prefetch_used / self.prefetch_loads if self.prefetch_loads else 0.0


class RuntimePrediction:
    """The runtime's :class:`~expertflow.pipeline.predictor.Predictor` driven by a routing trace the way
    ``generate`` drives it: when a layer's router has run, its routing is observed and the experts of the
    next layers are predicted. A trace holds no hidden states, so the gate look-ahead has nothing to look at:
    the predictor runs on routing statistics (``stats`` mode), at a fixed depth (the adaptive one follows
    stalls, which a replay has none of)."""

    def __init__(self, trace: RoutingTrace, depth: int = 1) -> None:
        self.predictor = Predictor(trace.layer_ids, trace.num_experts, trace.top_k, mode="stats", depth=depth)
        self._state = torch.zeros(1, 1)  # one token; stats mode reads nothing else of it

    def route(self, layer: int, experts: Sequence[int]) -> list[tuple[ExpertKey, float]]:
        """Layer ``layer`` of the current token chose ``experts``: the predictions (key, priority) made now."""
        self.predictor.observe(layer, torch.tensor([list(experts)]))
        return self.predictor.predict(layer, self._state)

    def scores(self, key: ExpertKey) -> float:
        """The chance the runtime gives ``key`` of being used at its layer's next visit."""
        return self.predictor.scores(key)


class ReplayEvent(NamedTuple):
    """What happened during a replay: ``hit``/``miss`` of ``key``, a demand ``evict`` of ``victim`` to make
    room for ``key``, or a ``prefetch`` of ``key`` (evicting ``victim`` or filling a free slot), while
    token ``token`` computes layer ``layer``."""

    kind: str
    token: int
    layer: int
    key: ExpertKey
    victim: ExpertKey | None = None


@dataclass
class _Cache:
    policy: EvictionPolicy
    capacity: int
    resident: set[ExpertKey] = field(default_factory=set)
    unused_prefetch: set[ExpertKey] = field(default_factory=set)
    position: int = 0


def replay(
    trace: RoutingTrace,
    policy: str,
    capacity_per_layer: int,
    *,
    partitioned: bool = False,
    static_profile: Mapping[ExpertKey, float] | None = None,
    prefetch: bool = True,
    prediction: RuntimePrediction | None = None,
    on_event: Callable[[ReplayEvent], None] | None = None,
) -> ReplayResult:
    """Simulate a cache of ``capacity_per_layer * layers`` experts (or one of that size per layer).

    Accesses come token by token, layer by layer (:func:`access_sequence`). ``predictive`` is what
    ``generate`` runs: the runtime predictor (:class:`RuntimePrediction`; a fresh one by default) observes
    each layer's routing when it is known and predicts the next layers; the runtime's predictive policy evicts
    by its chances; and, if ``prefetch``, each prediction is loaded likeliest first through the cache level's
    admission rule (:func:`~expertflow.pipeline.cache.admits_prefetch`, at no read load): only over a less
    likely expert, never one of the layer being computed or the next, never an unused prefetch.
    ``predictive_demand`` is the same without prefetching. Belady is the demand-only offline optimum.
    ``on_event`` sees every :class:`ReplayEvent`.
    """
    replayer = _Replayer(
        trace,
        policy,
        capacity_per_layer,
        partitioned=partitioned,
        static_profile=static_profile,
        prefetch=prefetch,
        prediction=prediction,
        on_event=on_event,
    )
    for t, token_routing in enumerate(trace.experts.tolist()):
        replayer.run_token(t, token_routing)
    return replayer.result()


class _Replayer:
    """The state of one :func:`replay`: its caches, its routing model and the running counts."""

    def __init__(
        self,
        trace: RoutingTrace,
        policy: str,
        capacity_per_layer: int,
        *,
        partitioned: bool,
        static_profile: Mapping[ExpertKey, float] | None,
        prefetch: bool,
        prediction: RuntimePrediction | None,
        on_event: Callable[[ReplayEvent], None] | None,
    ) -> None:
        self.trace = trace
        self.policy = policy
        self.capacity_per_layer = capacity_per_layer
        self.partitioned = partitioned
        seq = access_sequence(trace)
        self.predictive = policy in ("predictive", "predictive_demand")
        self.do_prefetch = self.predictive and prefetch and policy == "predictive"
        if self.predictive and prediction is None:
            prediction = RuntimePrediction(trace)
        self.prediction = prediction if self.predictive else None
        self.caches = self._build_caches(seq, static_profile)
        self.on_event = on_event
        self.hits = self.misses = self.prefetch_loads = self.prefetch_used = 0
        self.outcomes: list[bool] = []
        self.layer_hits: dict[int, list[int]] = defaultdict(lambda: [0, 0])

    def _group(self, lid: int) -> int:
        """The cache serving layer ``lid``: its own when partitioned, else the shared one (0)."""
        return lid if self.partitioned else 0

    def _build_caches(
        self, seq: Sequence[ExpertKey], static_profile: Mapping[ExpertKey, float] | None
    ) -> dict[int, _Cache]:
        """One empty cache per group, each with its policy and capacity."""
        futures: dict[int, list[ExpertKey]] = defaultdict(list)
        for k in seq:
            futures[self._group(k.layer)].append(k)
        n_layers = self.trace.num_layers
        caches: dict[int, _Cache] = {}
        for lid in self.trace.layer_ids if self.partitioned else (0,):
            cap = self.capacity_per_layer if self.partitioned else self.capacity_per_layer * n_layers
            caches[lid] = _Cache(self._build_policy(cap, futures[lid], seq, static_profile), cap)
        return caches

    def _build_policy(
        self,
        cap: int,
        future: Sequence[ExpertKey],
        seq: Sequence[ExpertKey],
        static_profile: Mapping[ExpertKey, float] | None,
    ) -> EvictionPolicy:
        """The eviction policy named ``self.policy`` for a cache of ``cap`` experts."""
        if self.policy == "lru":
            return LRUPolicy()
        if self.policy == "lfu":
            return LFUPolicy()
        if self.policy == "static":
            counts = static_profile or _counts(seq)
            return StaticPolicy.from_counts(counts, cap)
        if self.predictive:
            assert self.prediction is not None
            return PredictivePolicy(self.prediction.scores, layers=self.trace.layer_ids)
        if self.policy == "belady":
            return BeladyPolicy(future)
        raise ConfigError(f"unknown policy {self.policy!r}")

    def _emit(self, kind: str, t: int, lid: int, key: ExpertKey, victim: ExpertKey | None = None) -> None:
        """Report an event to ``on_event``, if there is one."""
        if self.on_event is not None:
            self.on_event(ReplayEvent(kind, t, lid, key, victim))

    def run_token(self, t: int, routing: Sequence[Sequence[int]]) -> None:
        """Replay token ``t``, whose top-k experts per layer are ``routing``."""
        for li, lid in enumerate(self.trace.layer_ids):
            experts = tuple(dict.fromkeys(routing[li]))
            # The router of this layer has run: its choice is known, and predicted from, before its experts.
            predictions = self.prediction.route(lid, experts) if self.prediction is not None else []
            demanded = {ExpertKey(lid, e) for e in experts}
            cache = self.caches[self._group(lid)]
            if isinstance(cache.policy, PredictivePolicy):
                cache.policy.on_layer(lid, demanded)
            for e in experts:
                self._access(cache, t, lid, ExpertKey(lid, e), demanded)
            if self.do_prefetch:  # demand reads overtake prefetches
                self._prefetch(t, li, lid, predictions)

    def _access(self, cache: _Cache, t: int, lid: int, key: ExpertKey, pinned: set[ExpertKey]) -> None:
        """One demand access of ``key``; ``pinned`` are the experts the current layer is computing."""
        if isinstance(cache.policy, BeladyPolicy):
            cache.policy.advance(cache.position)
        cache.position += 1
        if key in cache.resident:
            self._hit(cache, t, lid, key)
        else:
            self._miss(cache, t, lid, key, pinned)

    def _hit(self, cache: _Cache, t: int, lid: int, key: ExpertKey) -> None:
        """Count a hit, and the first use of a prefetched expert."""
        self.hits += 1
        self.layer_hits[lid][0] += 1
        cache.policy.on_access(key)
        if key in cache.unused_prefetch:
            cache.unused_prefetch.discard(key)
            self.prefetch_used += 1
        self.outcomes.append(True)
        self._emit("hit", t, lid, key)

    def _miss(self, cache: _Cache, t: int, lid: int, key: ExpertKey, pinned: set[ExpertKey]) -> None:
        """Count a miss and load ``key``, evicting a victim first if the cache is full."""
        self.misses += 1
        self.layer_hits[lid][1] += 1
        self.outcomes.append(False)
        self._emit("miss", t, lid, key)
        if len(cache.resident) >= cache.capacity:
            self._evict_for(cache, t, lid, key, pinned)
        cache.resident.add(key)
        cache.policy.on_insert(key)
        cache.policy.on_access(key)

    def _evict_for(self, cache: _Cache, t: int, lid: int, key: ExpertKey, pinned: set[ExpertKey]) -> None:
        """Evict the policy's victim to make room for ``key`` (if the policy names one)."""
        # No policy evicts what this layer of the token is computing: the runtime pins a layer's experts before
        # it loads any of them. Only a cache smaller than one layer's experts has to (the runtime would compute
        # that layer in waves).
        cands = sorted(cache.resident - pinned) or sorted(cache.resident)
        victim = cache.policy.choose_victim(cands)
        if victim is not None:
            cache.resident.discard(victim)
            cache.unused_prefetch.discard(victim)
            cache.policy.on_remove(victim)
            self._emit("evict", t, lid, key, victim)

    def _prefetch(self, t: int, li: int, lid: int, predictions: Sequence[tuple[ExpertKey, float]]) -> None:
        """Load the predictions of layer ``lid`` likeliest first, each through the runtime's admission rule."""
        assert self.prediction is not None
        ids = self.trace.layer_ids
        protected = {lid, ids[li + 1]} if li + 1 < len(ids) else {lid}  # computing now, and next
        for key, priority in sorted(predictions, key=lambda kp: (-kp[1], kp[0])):
            cache = self.caches[self._group(key.layer)]
            if key in cache.resident:
                continue
            victim = None
            if len(cache.resident) >= cache.capacity:
                want = max(priority, self.prediction.scores(key))
                candidates = [
                    k
                    for k in sorted(cache.resident)
                    if k.layer not in protected
                    and k not in cache.unused_prefetch
                    and admits_prefetch(want, self.prediction.scores(k), 0.0)
                ]
                victim = cache.policy.choose_victim(candidates)
                if victim is None:  # refused by admission, as the runtime refuses it
                    continue
                cache.resident.discard(victim)
                cache.policy.on_remove(victim)
            cache.resident.add(key)
            cache.unused_prefetch.add(key)
            cache.policy.on_insert(key)
            self.prefetch_loads += 1
            self._emit("prefetch", t, lid, key, victim)

    def result(self) -> ReplayResult:
        """The counts so far as a :class:`ReplayResult`."""
        per_layer = {lid: h / (h + m) if h + m else 0.0 for lid, (h, m) in sorted(self.layer_hits.items())}
        return ReplayResult(
            self.policy,
            self.capacity_per_layer,
            self.hits,
            self.misses,
            per_layer,
            tokens=self.trace.tokens,
            prefetch_loads=self.prefetch_loads,
            prefetch_used=self.prefetch_used,
            outcomes=self.outcomes,
        )


def _counts(seq: Iterable[ExpertKey]) -> dict[ExpertKey, float]:
    counts: dict[ExpertKey, float] = defaultdict(float)
    for k in seq:
        counts[k] += 1
    return counts


def compare_policies(
    traces: Mapping[str, RoutingTrace],
    capacities: Sequence[int] = (2, 3, 4, 6),
    policies: Sequence[str] = ("lru", "lfu", "static", "predictive", "belady"),
    *,
    partitioned: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Hit rate of every policy at every per-layer capacity, summed over the traces, beside Belady's: demand-only
    (``belady``) and the bound for prefetching policies (``belady_lookahead``: every load a hit, at Belady's
    loads per token).

    Each row also has ``{policy}_loads_per_token`` (experts brought in per decoded token: misses plus
    prefetches) and, for policies that prefetch, ``{policy}_prefetch_precision`` (prefetches later used
    / prefetches).
    """
    rows = []
    for cap in capacities:
        results: dict[str, list[ReplayResult]] = {p: [] for p in policies}
        for name, tr in traces.items():
            if progress:
                progress(f"capacity {cap}: {name}")
            # The static profile comes from the other traces: profiling on the evaluated trace would cheat.
            others = [access_sequence(t) for n, t in traces.items() if n != name] or [access_sequence(tr)]
            profile = _counts(k for s in others for k in s)
            for p in policies:
                results[p].append(replay(tr, p, cap, partitioned=partitioned, static_profile=profile))
        hits = {p: sum(r.hits for r in rs) for p, rs in results.items()}
        accesses = {p: sum(r.hits + r.misses for r in rs) for p, rs in results.items()}
        rates = {p: hits[p] / accesses[p] if accesses[p] else 0.0 for p in policies}
        row: dict[str, Any] = {"capacity": cap}
        row.update({p: rates[p] for p in policies})
        if rates.get("belady"):
            row.update({f"{p}/belady": rates[p] / rates["belady"] for p in policies if p != "belady"})
        for p, rs in results.items():
            tokens = sum(r.tokens for r in rs)
            row[f"{p}_loads_per_token"] = sum(r.loads for r in rs) / tokens if tokens else 0.0
        for p, rs in results.items():
            issued = sum(r.prefetch_loads for r in rs)
            if issued:
                row[f"{p}_prefetch_precision"] = sum(r.prefetch_used for r in rs) / issued
        if "belady" in rates:
            # The bound for a prefetching policy: knowing the future, every one of Belady's loads can be
            # issued early enough to be a hit, and no schedule needs fewer loads than Belady's.
            row["belady_lookahead"] = 1.0
            row["belady_lookahead_loads_per_token"] = row["belady_loads_per_token"]
        rows.append(row)
    return rows
