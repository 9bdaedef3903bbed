"""Replaying routing traces through cache policies, offline: hit rates and loads per token of each policy at
each capacity, beside Belady's optimum. An evaluation tool; the runtime never imports it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from expertflow.core import ExpertKey
from expertflow.errors import ConfigError
from expertflow.pipeline.policy import (
    EvictionPolicy,
    LFUPolicy,
    LRUPolicy,
    PredictivePolicy,
    StaticPolicy,
)
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


class OnlineRoutingModel:
    """How likely each expert is to be routed at a layer's next visit, from the routing seen so far only.

    It knows what a decoding runtime knows: the routing of every finished token (learned with
    :meth:`end_token`) and, for the token being computed, the routing of the layers already computed
    (:meth:`observe_layer`). Per layer it keeps counts, learned online, of: expert use; layer-to-layer
    transitions (expert a at layer l-1-j of a token -> expert b at layer l of the same token, j < depth);
    and token-to-token reuse (expert a at layer l of the previous token -> expert b at layer l). They are
    combined naive-Bayes style: log prior + weighted log likelihood ratios, with Dirichlet smoothing
    (``prior`` per expert for the frequencies; conditionals shrunk towards the layer's frequencies).

    For a layer not yet computed for the current token the context is that token's earlier layers and the
    previous token's routing at the layer; for a layer already computed, the next visit is the next token,
    whose only known context is the current token's routing at that layer.
    """

    def __init__(
        self,
        layer_ids: Sequence[int],
        num_experts: int,
        top_k: int = 2,
        *,
        layer_weights: Sequence[float] = (0.5, 0.4, 0.3, 0.2),
        reuse_weight: float = 0.5,
        prior: float = 0.5,
        decay: float = 1.0,
    ) -> None:
        self.layer_ids = tuple(layer_ids)
        self._pos = {lid: i for i, lid in enumerate(self.layer_ids)}
        n, e = len(self.layer_ids), num_experts
        self.num_experts, self.top_k = num_experts, top_k
        self.layer_weights = tuple(layer_weights)
        self.reuse_weight = reuse_weight
        if prior <= 0 or not 0 < decay <= 1:
            raise ConfigError("the routing model needs prior > 0 and decay in (0, 1]")
        self.prior, self.decay = prior, decay
        # counts of what was seen (decayed per token when decay < 1); the prior is added when predicting
        self.use = np.zeros((n, e))
        self.transition = np.zeros((len(self.layer_weights), n, e, e))
        self.reuse = np.zeros((n, e, e))
        self.current: dict[int, tuple[int, ...]] = {}
        self.previous: dict[int, tuple[int, ...]] = {}
        self.tokens_seen = 0
        self._memo: dict[int, np.ndarray] = {}

    def observe_layer(self, layer: int, experts: Iterable[int]) -> None:
        """The current token has been routed at ``layer`` (a model layer id)."""
        self.current[self._pos[layer]] = tuple(int(x) for x in experts)
        self._memo.clear()

    def end_token(self) -> None:
        """The current token is finished: learn from it, then it becomes the previous token."""
        cur, prev = self.current, self.previous
        if self.decay < 1:
            for counts in (self.use, self.transition, self.reuse):
                counts *= self.decay
        for li, experts in cur.items():
            for b in experts:
                self.use[li, b] += 1.0
                for j in range(len(self.layer_weights)):
                    for a in cur.get(li - 1 - j, ()):
                        self.transition[j, li, a, b] += 1.0
                for a in prev.get(li, ()):
                    self.reuse[li, a, b] += 1.0
        self.previous, self.current = cur, {}
        self.tokens_seen += 1
        self._memo.clear()

    def probabilities(self, layer: int) -> np.ndarray:
        """Estimated probability, per expert, of being routed at the next visit of ``layer`` (a model layer id)."""
        li = self._pos[layer]
        if li in self._memo:
            return self._memo[li]
        use = self.use[li] + self.prior
        marginal = use / use.sum()
        log_prior = np.log(marginal)
        s = log_prior.copy()
        strength = self.prior * self.num_experts

        def add(rows: np.ndarray, weight: float) -> None:
            # a conditional row is smoothed towards the layer's marginal: an unseen context says nothing
            nonlocal s
            rows = rows + strength * marginal
            s = s + weight * (np.log(rows / rows.sum(axis=-1, keepdims=True)) - log_prior).sum(axis=0)

        if li in self.current:  # next visit = next token: only this token's routing at the layer is known
            reuse_from: tuple[int, ...] = self.current[li]
        else:
            reuse_from = self.previous.get(li, ())
            for j, w in enumerate(self.layer_weights):
                before = self.current.get(li - 1 - j)
                if before and w:
                    add(self.transition[j, li, list(before)], w)
        if reuse_from and self.reuse_weight:
            add(self.reuse[li, list(reuse_from)], self.reuse_weight)
        p = np.exp(s - s.max())
        p = np.minimum(1.0, p * (self.top_k / p.sum()))
        self._memo[li] = p
        return p

    def score(self, key: ExpertKey) -> float:
        return float(self.probabilities(key.layer)[key.expert])


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
    prefetch_width: int | None = None,
    prefetch_min_probability: float = 0.0,
    model: OnlineRoutingModel | None = None,
    on_event: Callable[[ReplayEvent], None] | None = None,
) -> ReplayResult:
    """Simulate a cache of ``capacity_per_layer * layers`` experts (or one of that size per layer).

    Accesses come token by token, layer by layer (:func:`access_sequence`). ``predictive`` evicts by the
    :class:`OnlineRoutingModel`'s probabilities (``model``: a fresh one by default, which learns from the
    replayed tokens as they finish) and, if ``prefetch``, after each layer of a token makes resident the
    ``prefetch_width`` (default: the router's top-k) experts it finds most likely at the next layer (the
    next token's first layer after the last), skipping those below ``prefetch_min_probability``. Each
    prefetch passes admission control (:meth:`PredictivePolicy.admit`): it may only evict a less likely
    expert, never one the token demanded at the current or the next layer. ``predictive_demand`` is the
    same policy without prefetching. Belady is the demand-only offline optimum. ``on_event`` sees every
    :class:`ReplayEvent`.
    """
    replayer = _Replayer(
        trace,
        policy,
        capacity_per_layer,
        partitioned=partitioned,
        static_profile=static_profile,
        prefetch=prefetch,
        prefetch_width=prefetch_width,
        prefetch_min_probability=prefetch_min_probability,
        model=model,
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
        prefetch_width: int | None,
        prefetch_min_probability: float,
        model: OnlineRoutingModel | None,
        on_event: Callable[[ReplayEvent], None] | None,
    ) -> None:
        self.trace = trace
        self.policy = policy
        self.capacity_per_layer = capacity_per_layer
        self.partitioned = partitioned
        seq = access_sequence(trace)
        self.predictive = policy in ("predictive", "predictive_demand")
        self.do_prefetch = self.predictive and prefetch and policy == "predictive"
        if self.predictive and model is None:
            model = OnlineRoutingModel(trace.layer_ids, trace.num_experts, trace.top_k)
        self.model = model
        self.caches = self._build_caches(seq, static_profile)
        self.width = trace.top_k if prefetch_width is None else prefetch_width
        self.min_probability = prefetch_min_probability
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
            assert self.model is not None
            return PredictivePolicy(self.model.score, layers=self.trace.layer_ids)
        if self.policy == "belady":
            return BeladyPolicy(future)
        raise ConfigError(f"unknown policy {self.policy!r}")

    def _emit(self, kind: str, t: int, lid: int, key: ExpertKey, victim: ExpertKey | None = None) -> None:
        """Report an event to ``on_event``, if there is one."""
        if self.on_event is not None:
            self.on_event(ReplayEvent(kind, t, lid, key, victim))

    def run_token(self, t: int, routing: Sequence[Sequence[int]]) -> None:
        """Replay token ``t``, whose top-k experts per layer are ``routing``."""
        n_layers = self.trace.num_layers
        demanded: dict[int, set[ExpertKey]] = {}
        for li, lid in enumerate(self.trace.layer_ids):
            experts = tuple(dict.fromkeys(routing[li]))
            if (
                self.model is not None
            ):  # the router of this layer has run: its choice is known before its experts
                self.model.observe_layer(lid, experts)
            demanded[lid] = {ExpertKey(lid, e) for e in experts}
            cache = self.caches[self._group(lid)]
            if isinstance(cache.policy, PredictivePolicy):
                cache.policy.on_layer(lid, demanded[lid])
            for e in experts:
                self._access(cache, t, lid, ExpertKey(lid, e), demanded[lid])
            if self.model is not None and li == n_layers - 1:
                self.model.end_token()  # the token is complete: learn from it before predicting the next one
            if self.do_prefetch:
                self._prefetch_next(t, li, lid, demanded)

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

    def _prefetch_next(self, t: int, li: int, lid: int, demanded: Mapping[int, set[ExpertKey]]) -> None:
        """After layer ``lid`` of token ``t``, prefetch for the next layer (or the next token's first)."""
        assert self.model is not None
        n_layers = self.trace.num_layers
        nxt = self.trace.layer_ids[(li + 1) % n_layers]
        protect = demanded[lid] | demanded.get(nxt, set()) if li + 1 < n_layers else demanded[lid]
        for key, victim in _prefetch(
            self.caches[self._group(nxt)], nxt, self.model, protect, self.width, self.min_probability
        ):
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


def _prefetch(
    cache: _Cache,
    layer: int,
    model: OnlineRoutingModel,
    protect: set[ExpertKey],
    width: int,
    min_probability: float,
) -> list[tuple[ExpertKey, ExpertKey | None]]:
    """Load the most likely experts of ``layer`` not yet resident, each only past admission control.

    Returns each load with the expert it evicted (None for a free slot).
    """
    pol = cache.policy
    assert isinstance(pol, PredictivePolicy)
    probs = model.probabilities(layer)
    loads: list[tuple[ExpertKey, ExpertKey | None]] = []
    for e in sorted(range(len(probs)), key=lambda x: (-probs[x], x))[:width]:
        key = ExpertKey(layer, e)
        if probs[e] < min_probability:
            break
        if key in cache.resident:
            continue
        victim = None
        if len(cache.resident) >= cache.capacity:
            victim = pol.admit(key, sorted(cache.resident - protect))
            if victim is None:
                break  # every evictable expert is at least as likely as this one (and the ones after it)
            cache.resident.discard(victim)
            cache.unused_prefetch.discard(victim)
            pol.on_remove(victim)
        cache.resident.add(key)
        cache.unused_prefetch.add(key)
        pol.on_insert(key)
        loads.append((key, victim))
    return loads


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
    partitioned: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Hit rate of every policy at every per-layer capacity, summed over the traces, beside Belady's.

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
        rows.append(row)
    return rows
